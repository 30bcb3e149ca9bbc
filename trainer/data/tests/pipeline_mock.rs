//! sample -> score -> pair against a mock OpenAI server with sources that
//! misbehave in every way the issue lists; the run goes on, failures are
//! recorded per sample, a rerun asks only for what failed.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use fusechat_data::{pair, prompts::Side, sample, score, store::Store, Config};
use serde_json::Value;

fn config_text(dir: &std::path::Path, mock: &str, dead: u16) -> String {
    format!(
        r#"
[run]
output = "{out}"

[prompts]
data_dir = "{data}"
eval_fraction = 0.3
math_suffix = ""

[[pools]]
name = "p"
domain = "math"
format = "jsonl"
file = "pool.jsonl"

[[endpoints]]
name = "mock"
base_url = "{mock}"
concurrency = 4
timeout_s = 10
max_retries = 2
backoff_s = 0.05

[[endpoints]]
name = "dead"
base_url = "http://127.0.0.1:{dead}/v1"
max_retries = 1
backoff_s = 0.05

[[sources]]
id = "good"
endpoint = "mock"
temperature = 0.8
top_p = 0.95

[[sources]]
id = "garbage"
endpoint = "mock"

[[sources]]
id = "empty"
endpoint = "mock"

[[sources]]
id = "cut"
endpoint = "mock"

[[sources]]
id = "flaky"
endpoint = "mock"

[[sources]]
id = "limited"
endpoint = "mock"

[[sources]]
id = "broken"
endpoint = "mock"

[[sources]]
id = "down"
endpoint = "dead"

[sampling]
n = {{ math = 2 }}
max_tokens = 32
progress = false

[pairing]
sft_fraction = 0.4
"#,
        out = dir.join("out").display(),
        data = dir.display(),
    )
}

#[test]
fn misbehaving_sources_are_recorded_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    common::math_pool(dir.path(), 20);
    let mock = common::mock(Duration::ZERO);
    let dead = common::free_port();
    let config =
        Config::parse(&config_text(dir.path(), &mock.base_url(), dead), dir.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();

    let summary = rt.block_on(sample::run(&config)).unwrap();
    let store = Store::open(&config.store_path()).unwrap();
    let train = store.prompts(Some(Side::Train)).unwrap();
    let eval = store.prompts(Some(Side::Eval)).unwrap();
    assert_eq!(
        train.len() + eval.len(),
        20,
        "every prompt's side is recorded"
    );
    assert!(!eval.is_empty() && !train.is_empty());
    assert_eq!(summary.planned, train.len() * 8 * 2);

    let samples = store.samples().unwrap();
    assert_eq!(samples.len(), summary.planned);
    let eval_ids: std::collections::HashSet<_> = eval.iter().map(|p| p.id.clone()).collect();
    assert!(
        samples.iter().all(|s| !eval_ids.contains(&s.prompt_id)),
        "an eval prompt was sampled"
    );
    let by_source = |src: &str| {
        samples
            .iter()
            .filter(|s| s.source == src)
            .collect::<Vec<_>>()
    };
    for s in by_source("garbage") {
        assert!(!s.ok);
        assert!(
            s.error.as_deref().unwrap().contains("garbage"),
            "{:?}",
            s.error
        );
    }
    for s in by_source("broken") {
        assert!(!s.ok);
        assert!(s.error.as_deref().unwrap().contains("400"), "{:?}", s.error);
    }
    for s in by_source("down") {
        assert!(!s.ok);
        assert!(
            s.error.as_deref().unwrap().contains("unreachable")
                || s.error.as_deref().unwrap().contains("connect"),
            "{:?}",
            s.error
        );
    }
    for s in by_source("empty") {
        assert!(s.ok && s.text.is_empty());
    }
    for s in by_source("cut") {
        assert!(s.ok && s.truncated && s.finish_reason.as_deref() == Some("length"));
    }
    for s in by_source("flaky").into_iter().chain(by_source("limited")) {
        assert!(s.ok, "{s:?}");
    }
    // Retry-After: 1 was honoured (the retry came at least ~1 s later).
    {
        let log = mock.log.lock().unwrap();
        let mut first: HashMap<&str, std::time::Instant> = HashMap::new();
        let mut gaps = Vec::new();
        for (user, model, t) in &log.requests {
            if model == "limited" {
                if let Some(t0) = first.get(user.as_str()) {
                    gaps.push(t.duration_since(*t0));
                } else {
                    first.insert(user, *t);
                }
            }
        }
        assert_eq!(gaps.len(), train.len() * 2);
        assert!(
            gaps.iter().all(|g| *g >= Duration::from_millis(950)),
            "{gaps:?}"
        );
    }

    // Scoring and pairing.
    rt.block_on(score::run(&config)).unwrap();
    let report = pair::run(&config).unwrap();
    let out = config.output_dir();
    for f in [
        "sft.jsonl",
        "dpo.jsonl",
        "report.md",
        "report.json",
        "report.svg",
        "split.jsonl",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let sft: Vec<Value> = std::fs::read_to_string(out.join("sft.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let dpo: Vec<Value> = std::fs::read_to_string(out.join("dpo.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(sft.len(), report.sft_rows);
    assert_eq!(dpo.len(), report.dpo_pairs);
    assert!(
        !sft.is_empty() && !dpo.is_empty(),
        "sft {} dpo {}",
        sft.len(),
        dpo.len()
    );
    for row in &sft {
        assert_eq!(row["messages"][0]["role"], "user");
        assert_eq!(row["messages"][1]["role"], "assistant");
        assert!(
            row["messages"][1]["content"]
                .as_str()
                .unwrap()
                .contains("Thinking"),
            "SFT took a wrong answer: {row}"
        );
    }
    for row in &dpo {
        assert_eq!(row["prompt"][0]["role"], "user");
        assert!(row["chosen"][0]["content"]
            .as_str()
            .unwrap()
            .contains("Thinking"));
        assert!(row["rejected"][0]["content"]
            .as_str()
            .unwrap()
            .contains("999999"));
        let src = row["metadata"]["source"].as_str().unwrap();
        assert!(["good", "flaky", "limited"].contains(&src), "{src}");
        assert_eq!(row["metadata"]["scores"]["chosen"]["passed"], true);
        assert_eq!(row["metadata"]["scores"]["rejected"]["passed"], false);
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| good |") && md.contains("dropped"), "{md}");
    let math = &report.domains["math"];
    assert_eq!(math.sources["good"].pass_rate, Some(0.5));
    assert_eq!(math.sources["garbage"].failed_requests, train.len() * 2);
    assert_eq!(math.sources["cut"].truncated, train.len() * 2);

    // A rerun asks again only for the failed samples; nothing ok is requested twice.
    let before = mock.count();
    let again = rt.block_on(sample::run(&config)).unwrap();
    assert_eq!(
        again.requested,
        train.len() * 2 * 3,
        "garbage, broken and down again"
    );
    let after = mock.users();
    let asked_again: Vec<&String> = after[before..].iter().collect();
    assert!(
        asked_again
            .iter()
            .all(|u| u.contains("/garbage/") || u.contains("/broken/")),
        "{asked_again:?}"
    );
    let (rows, distinct) = store.sample_counts().unwrap();
    assert_eq!(rows, distinct);
    assert_eq!(rows as usize, summary.planned);
}

#[test]
fn a_changed_split_is_refused_instead_of_leaking_eval_prompts() {
    let dir = tempfile::tempdir().unwrap();
    common::math_pool(dir.path(), 20);
    let mock = common::mock(Duration::ZERO);
    let text = config_text(dir.path(), &mock.base_url(), common::free_port());
    let config = Config::parse(&text, dir.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(sample::run(&config)).unwrap();
    let moved = Config::parse(
        &text.replace("eval_fraction = 0.3", "eval_fraction = 0.6"),
        dir.path(),
    )
    .unwrap();
    let err = format!("{:#}", rt.block_on(sample::run(&moved)).unwrap_err());
    assert!(err.contains("split"), "{err}");
}

#[test]
fn malformed_prompt_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pool.jsonl"),
        "{\"id\":1,\"prompt\":\"a\"}\n{\"id\":2,\"prompt\":\"b\"\n",
    )
    .unwrap();
    let config = Config::parse(
        &config_text(dir.path(), "http://127.0.0.1:9/v1", 9),
        dir.path(),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = format!("{:#}", rt.block_on(sample::run(&config)).unwrap_err());
    assert!(err.contains("pool.jsonl:2"), "{err}");
    assert!(
        !config.store_path().exists()
            || Store::open(&config.store_path())
                .unwrap()
                .samples()
                .unwrap()
                .is_empty()
    );
}

fn scorer_config(dir: &std::path::Path, base: &str, reward_api: &str, judge_model: &str) -> String {
    std::fs::write(
        dir.join("instr.jsonl"),
        (0..12)
            .map(|i| format!("{{\"id\":{i},\"prompt\":\"Tell me something [[{i}]]\"}}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let root = base.trim_end_matches("/v1");
    let rest = format!(
        r#"
[[pools]]
name = "i"
domain = "instruction"
format = "jsonl"
file = "instr.jsonl"
[[sources]]
id = "good"
endpoint = "mock"
[sampling]
n = {{ math = 2, instruction = 2 }}
progress = false
[scoring.reward]
url = "{root}/{reward_api}"
api = "{reward_api}"
model = "rm"
domains = ["math"]
[scoring.judge]
endpoint = "mock"
model = "{judge_model}"
[pairing]
sft_fraction = 0.0
window = [0.01, 0.1]
"#
    );
    common::mock_math_config(dir, base, 4, &rest)
}

#[test]
fn judge_and_reward_scorers_rank_and_the_window_filters() {
    let dir = tempfile::tempdir().unwrap();
    common::math_pool(dir.path(), 12);
    let mock = common::mock(Duration::ZERO);
    let rt = tokio::runtime::Runtime::new().unwrap();

    // /classify: gap 0.05, inside the window: every math prompt pairs.
    let config = Config::parse(
        &scorer_config(dir.path(), &mock.base_url(), "classify", "judge"),
        dir.path(),
    )
    .unwrap();
    rt.block_on(sample::run(&config)).unwrap();
    let s = rt.block_on(score::run(&config)).unwrap();
    assert_eq!(s.scored["judge"], 24);
    assert_eq!(s.scored["reward"], 24);
    assert_eq!(s.scored["math"], 24);
    let report = pair::run(&config).unwrap();
    assert_eq!(report.domains["math"].dpo_pairs, 12);
    assert_eq!(
        report.domains["instruction"].dpo_pairs, 12,
        "judge 8 vs 3 pairs every instruction prompt"
    );
    assert_eq!(
        report.domains["instruction"].sources["good"].mean_judge,
        Some(5.5)
    );
    let dpo = std::fs::read_to_string(config.output_dir().join("dpo.jsonl")).unwrap();
    let first: Value = serde_json::from_str(dpo.lines().next().unwrap()).unwrap();
    assert!(first["metadata"]["scores"]["chosen"]
        .get("reward")
        .is_some());

    // {"scores"} shape: gap 0.8, outside the window: math pairs are dropped, with the reason.
    let dir2 = tempfile::tempdir().unwrap();
    common::math_pool(dir2.path(), 12);
    let config = Config::parse(
        &scorer_config(dir2.path(), &mock.base_url(), "scores", "judge-garbage"),
        dir2.path(),
    )
    .unwrap();
    rt.block_on(sample::run(&config)).unwrap();
    let s = rt.block_on(score::run(&config)).unwrap();
    assert_eq!(s.scored["reward"], 24);
    assert_eq!(
        s.failed["judge"], 24,
        "an unparsable judge reply is a recorded failure"
    );
    let report = pair::run(&config).unwrap();
    assert_eq!(report.domains["math"].dpo_pairs, 0);
    assert_eq!(
        report.domains["math"].dropped["dpo: reward gap outside the window"],
        12
    );
    assert_eq!(report.domains["instruction"].dpo_pairs, 0);
    // Failed judge scores are retried by the next `score`.
    let again = rt.block_on(score::run(&config)).unwrap();
    assert_eq!(again.failed["judge"], 24);
    assert!(
        again.scored.get("reward").is_none(),
        "reward scores were redone"
    );
}

/// `sampling.order`: "source" sends one source's requests after the
/// other's (the models take turns on a shared machine), at most the
/// endpoint's concurrency at a time.
#[test]
fn source_order_sends_one_source_after_the_other() {
    let mock = common::mock(Duration::from_millis(30));
    let dir = tempfile::tempdir().unwrap();
    // 7 requests per source, 2 at a time: the last one of `first` goes alone.
    common::math_pool(dir.path(), 7);
    let text = common::mock_math_config(
        dir.path(),
        &mock.base_url(),
        2,
        r#"
[[sources]]
id = "first"
endpoint = "mock"

[[sources]]
id = "second"
endpoint = "mock"

[sampling]
n = { math = 1 }
progress = false
order = "source"
"#,
    );
    let config = Config::parse(&text, dir.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let summary = rt.block_on(sample::run(&config)).unwrap();
    assert_eq!(summary.ok, 14);
    let log = mock.log.lock().unwrap();
    let models: Vec<&str> = log.requests.iter().map(|r| r.1.as_str()).collect();
    let switch = models.iter().position(|m| *m == "second").unwrap();
    assert_eq!(switch, 7, "{models:?}");
    assert!(models[switch..].iter().all(|m| *m == "second"), "{models:?}");
    // ... and `second` only once the last of `first` came back (it takes
    // the mock's 30 ms), so the two never decode at the same time.
    // At most the endpoint's 2 in flight: request k+2 only after request k
    // came back.
    for k in 0..switch - 2 {
        let gap = log.requests[k + 2].2.duration_since(log.requests[k].2);
        assert!(gap >= Duration::from_millis(30), "request {} sent {gap:?} after request {k}", k + 2);
    }
    let last_first = log.requests[switch - 1].2;
    let first_second = log.requests[switch].2;
    assert!(
        first_second.duration_since(last_first) >= Duration::from_millis(30),
        "`second` was sent {:?} after the last `first`",
        first_second.duration_since(last_first)
    );
}

#[test]
fn a_changed_request_is_refused_or_resampled_never_mixed() {
    let mock = common::mock(Duration::from_millis(0));
    let dir = tempfile::tempdir().unwrap();
    common::math_pool(dir.path(), 6);
    let text = |temperature: f64, on_change: &str| {
        let rest = format!(
            r#"
[[sources]]
id = "a"
endpoint = "mock"
temperature = {temperature}
{B}
[sampling]
n = {{ math = 1 }}
progress = false
on_change = "{on_change}"
"#,
            B = "[[sources]]\nid = \"b\"\nendpoint = \"mock\"\ntemperature = 0.8\n"
        );
        common::mock_math_config(dir.path(), &mock.base_url(), 4, &rest)
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let first = Config::parse(&text(0.8, "refuse"), dir.path()).unwrap();
    assert_eq!(rt.block_on(sample::run(&first)).unwrap().ok, 12);
    rt.block_on(score::run(&first)).unwrap();
    let store = Store::open(&first.store_path()).unwrap();
    assert_eq!(store.scores().unwrap().len(), 12);
    let sent = mock.count();

    // The same config again: nothing to send.
    assert_eq!(rt.block_on(sample::run(&first)).unwrap().requested, 0);
    assert_eq!(mock.count(), sent);

    // Source `a` at another temperature: refused before anything is sent,
    // and the store keeps every sample and score.
    let changed = Config::parse(&text(0.3, "refuse"), dir.path()).unwrap();
    let err = format!("{:#}", rt.block_on(sample::run(&changed)).unwrap_err());
    assert!(err.contains("6 sample(s)") && err.contains("temperature: 0.8 -> 0.3"), "{err}");
    assert!(err.contains("on_change"), "{err}");
    assert_eq!(mock.count(), sent);
    assert_eq!(store.done_requests(true).unwrap().len(), 12);
    assert_eq!(store.scores().unwrap().len(), 12);

    // Resample: only `a`'s six are requested again, at the new temperature;
    // their old scores are gone, `b`'s stay.
    let resample = Config::parse(&text(0.3, "resample"), dir.path()).unwrap();
    let s = rt.block_on(sample::run(&resample)).unwrap();
    assert_eq!((s.requested, s.ok, s.already_done), (6, 6, 6));
    assert_eq!(mock.count(), sent + 6);
    let requests = store.done_requests(true).unwrap();
    for ((_, source, _), request) in &requests {
        let want = if source == "a" { 0.3 } else { 0.8 };
        assert_eq!(request["temperature"], want, "{source}: {request}");
    }
    let scores = store.scores().unwrap();
    assert_eq!(scores.len(), 6);
    assert!(scores.keys().all(|(_, source, _)| source == "b"));
    // ... and a rerun of the new config sends nothing more.
    assert_eq!(rt.block_on(sample::run(&resample)).unwrap().requested, 0);

    // Pairing takes only what the config samples: without source `b`, its
    // samples stay in the store but not in the report or the SFT rows.
    let only_a = {
        let t = text(0.3, "resample");
        let start = t.find("[[sources]]\nid = \"b\"").unwrap();
        let end = start + t[start..].find("[sampling]").unwrap();
        format!("{}{}", &t[..start], &t[end..])
    };
    let only_a = Config::parse(&only_a, dir.path()).unwrap();
    rt.block_on(score::run(&only_a)).unwrap();
    let report = pair::run(&only_a).unwrap();
    let sources: Vec<&String> = report.domains["math"].sources.keys().collect();
    assert_eq!(sources, ["a"]);
    assert_eq!(store.done_requests(true).unwrap().len(), 12, "nothing deleted");
}

/// One source over two replicas: requests spread over both, each replica
/// keeps its own concurrency, and a replica that cannot be reached is left
/// to the others.
#[test]
fn a_source_fans_out_over_its_replicas() {
    let (a, b) = (common::mock(Duration::from_millis(40)), common::mock(Duration::from_millis(40)));
    let dead = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    common::math_pool(dir.path(), 16);
    let replicas = |names: &str| {
        common::mock_math_config(
            dir.path(),
            &a.base_url(),
            2,
            &format!(
                r#"
[[endpoints]]
name = "b"
base_url = "{b}"
concurrency = 2

[[endpoints]]
name = "dead"
base_url = "http://127.0.0.1:{dead}/v1"
concurrency = 2
max_retries = 0

[[sources]]
id = "m"
endpoints = [{names}]

[sampling]
n = {{ math = 1 }}
progress = false
order = "source"
"#,
                b = b.base_url()
            ),
        )
    };
    let config = Config::parse(&replicas(r#""mock", "b""#), dir.path()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let summary = rt.block_on(sample::run(&config)).unwrap();
    assert_eq!((summary.ok, summary.failed), (16, 0));
    let (na, nb) = (a.count(), b.count());
    assert_eq!(na + nb, 16);
    assert!(na >= 6 && nb >= 6, "a {na}, b {nb}");
    // Each replica at most 2 in flight: its request k+2 only after its request k came back.
    for mock in [&a, &b] {
        let log = mock.log.lock().unwrap();
        for k in 0..log.requests.len().saturating_sub(2) {
            let gap = log.requests[k + 2].2.duration_since(log.requests[k].2);
            assert!(gap >= Duration::from_millis(40), "request {} came {gap:?} after request {k}", k + 2);
        }
    }
    // A replica that is down: the requests go to the one that answers.
    std::fs::remove_dir_all(dir.path().join("out")).unwrap();
    let config = Config::parse(&replicas(r#""dead", "b""#), dir.path()).unwrap();
    let summary = rt.block_on(sample::run(&config)).unwrap();
    assert_eq!((summary.ok, summary.failed), (16, 0));
    assert_eq!(b.count(), nb + 16);
    // `endpoint` and `endpoints` together is refused.
    let both = replicas(r#""b""#).replace("endpoints = [", "endpoint = \"b\"\nendpoints = [");
    let err = format!("{:#}", Config::parse(&both, dir.path()).unwrap_err());
    assert!(err.contains("endpoint") && err.contains("one of the two"), "{err}");
}
