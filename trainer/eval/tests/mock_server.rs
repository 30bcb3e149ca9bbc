//! The evaluation against a scripted OpenAI server (actix-web in its own
//! thread): a model that is always right (math gold answers, MBPP+ canonical
//! solutions, outputs the judge prefers), one always wrong, one the judge
//! calls a tie, one whose requests fail; judges that are fair, always say
//! "A", or never give a verdict. The scores are known exactly, a rerun sends
//! no request, and a log cut as by kill -9 is finished by the next run.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use actix_web::{web, App, HttpResponse, HttpServer};
use fusechat_eval::config::{EvalConfig, JudgeEntry, ModelEntry};
use serde_json::{json, Value};

struct State {
    /// Prompt text -> gold (`{"answer"}` for math, the MBPP+ task for code).
    gold: HashMap<String, Value>,
    /// (model, first 40 chars of the last message) per request.
    log: Mutex<Vec<(String, String)>>,
}

fn completion(content: &str) -> Value {
    json!({
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17},
    })
}

fn section<'a>(text: &'a str, head: &str, next: &str) -> &'a str {
    let start = text.find(head).map(|i| i + head.len()).unwrap_or(0);
    let end = text[start..]
        .find(next)
        .map(|i| start + i)
        .unwrap_or(text.len());
    &text[start..end]
}

/// How output (a) compares with output (b): the right answer beats the
/// reference, which ties with the tie answer and beats the wrong one.
fn compare(user: &str) -> std::cmp::Ordering {
    let a = section(user, "## Output (a)\n", "## Output (b)");
    let b = section(user, "## Output (b)\n", "## Your verdict");
    let rank = |s: &str| {
        if s.contains("RIGHT-ANSWER") {
            2
        } else if s.contains("TIE-ANSWER") {
            1
        } else if s.contains("WRONG-ANSWER") {
            0
        } else {
            1 // the reference
        }
    };
    rank(a).cmp(&rank(b))
}

fn fair_verdict(user: &str) -> String {
    // Different reply shapes, all of which the parser must read.
    match compare(user) {
        std::cmp::Ordering::Greater => "Verdict: A".into(),
        std::cmp::Ordering::Less => "Output (b) is better because it answers the question.".into(),
        std::cmp::Ordering::Equal => "tie".into(),
    }
}

async fn chat(body: web::Json<Value>, state: web::Data<Arc<State>>) -> HttpResponse {
    let model = body["model"].as_str().unwrap_or("").to_string();
    let msgs = body["messages"].as_array().cloned().unwrap_or_default();
    let last = msgs
        .last()
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    state
        .log
        .lock()
        .unwrap()
        .push((model.clone(), last.chars().take(40).collect()));
    assert_eq!(body["temperature"], 0.0, "greedy decoding");
    let gold = state.gold.get(&last);
    let model = match model.strip_prefix("slow-") {
        Some(m) => {
            actix_web::rt::time::sleep(std::time::Duration::from_millis(300)).await;
            m.to_string()
        }
        None => model,
    };
    let reply = match model.as_str() {
        "right" => match gold {
            Some(g) if g.get("answer").is_some() => format!(
                "Let me think step by step.\nThe answer is {}.",
                g["answer"].as_str().unwrap()
            ),
            Some(g) => format!(
                "Here it is:\n```python\n{}\n```",
                g["canonical_solution"].as_str().unwrap()
            ),
            None => "RIGHT-ANSWER: a careful, complete answer.".into(),
        },
        "wrong" => match gold {
            Some(g) if g.get("answer").is_some() => "The answer is 987654321.".into(),
            Some(g) => format!(
                "```python\ndef {}(*args):\n    raise ValueError('nope')\n```",
                g["entry_point"].as_str().unwrap()
            ),
            None => "WRONG-ANSWER".into(),
        },
        "tie" => match gold {
            Some(_) => String::new(),
            None => "TIE-ANSWER".into(),
        },
        "down" => return HttpResponse::InternalServerError().body("boom"),
        "judge-fair" => fair_verdict(&last),
        "judge-first" => "A".into(),
        "judge-leaning" => {
            // Always "A", but surer when (a) is the better output.
            let p_a: f64 = match compare(&last) {
                std::cmp::Ordering::Greater => 0.9,
                std::cmp::Ordering::Equal => 0.6,
                std::cmp::Ordering::Less => 0.55,
            };
            let mut c = completion("A");
            if body["logprobs"] == json!(true) {
                assert_eq!(body["top_logprobs"], 10);
                c["choices"][0]["logprobs"] = json!({"content": [{
                    "token": "A", "logprob": p_a.ln(),
                    "top_logprobs": [
                        {"token": "A", "logprob": p_a.ln()},
                        {"token": "B", "logprob": (1.0 - p_a).ln()},
                    ],
                }]});
            }
            return HttpResponse::Ok().json(c);
        }
        "judge-garbage" => "I cannot decide which one is better, they differ.".into(),
        other => return HttpResponse::NotFound().body(format!("no model {other}")),
    };
    HttpResponse::Ok().json(completion(&reply))
}

async fn models() -> HttpResponse {
    HttpResponse::Ok().json(json!({"object": "list", "data": []}))
}

struct Mock {
    port: u16,
    state: Arc<State>,
}

impl Mock {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
    fn count(&self) -> usize {
        self.state.log.lock().unwrap().len()
    }
    fn count_model(&self, m: &str) -> usize {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|(x, _)| x == m)
            .count()
    }
}

fn start_mock(gold: HashMap<String, Value>) -> Mock {
    let state = Arc::new(State {
        gold,
        log: Mutex::new(Vec::new()),
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let st = state.clone();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            HttpServer::new(move || {
                App::new()
                    .app_data(web::Data::new(st.clone()))
                    .app_data(web::JsonConfig::default().limit(16 << 20))
                    .route("/v1/chat/completions", web::post().to(chat))
                    .route("/v1/models", web::get().to(models))
            })
            .workers(2)
            .listen(listener)
            .unwrap()
            .run()
            .await
            .unwrap()
        })
    });
    Mock { port, state }
}

fn sizes() -> BTreeMap<String, usize> {
    [
        ("gsm8k", 3),
        ("mawps", 2),
        ("asdiv", 2),
        ("mbpp_plus", 2),
        ("alpaca_eval", 2),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), *v))
    .collect()
}

fn config(out: &Path, url: &str, models: &[&str], judge: &str) -> EvalConfig {
    let mut c = EvalConfig::load(None).unwrap();
    c.data_config = fusechat_data::config_file::repository_configs().join("data-tiny.toml");
    c.output = out.to_path_buf();
    c.sizes = sizes();
    c.max_tokens = 64;
    c.max_retries = 0;
    c.progress = false;
    c.models = models
        .iter()
        .map(|m| ModelEntry {
            name: format!("row-{m}"),
            base_url: url.into(),
            model: Some(m.to_string()),
            api_key_env: None,
            concurrency: Some(4),
        })
        .collect();
    c.judge = Some(JudgeEntry {
        base_url: url.into(),
        model: judge.into(),
        api_key_env: None,
        max_tokens: 16,
        concurrency: Some(4),
        scoring: Default::default(),
    });
    c
}

fn gold_map() -> HashMap<String, Value> {
    let c = EvalConfig::load(None).unwrap();
    let data = c.load_data_config().unwrap();
    // The draw is prefix-stable: 30 GSM8K prompts include the first 3.
    let mut sz = sizes();
    sz.insert("gsm8k".into(), 30);
    let sel = fusechat_eval::select::select(&data, &sz, c.seed).unwrap();
    sel.prompts
        .iter()
        // Math and code golds; an instruction's gold is only its reference.
        .filter(|p| p.gold.get("answer").is_some() || p.gold.get("canonical_solution").is_some())
        .map(|p| (p.text.clone(), p.gold.clone()))
        .collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn score(r: &fusechat_eval::Report, model: &str, bench: &str) -> (Option<f64>, usize, usize) {
    let c = r
        .cell(&format!("row-{model}"), bench)
        .unwrap_or_else(|| panic!("no cell {model} {bench}"));
    (c.score, c.n, c.failed)
}

#[test]
fn exact_scores_and_a_rerun_sends_nothing() {
    let mock = start_mock(gold_map());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &mock.url(),
        &["right", "wrong", "tie", "down"],
        "judge-fair",
    );
    let out = rt().block_on(fusechat_eval::run(&cfg)).unwrap();
    let r = &out.report;
    assert_eq!(
        r.benchmarks,
        [
            "gsm8k",
            "mawps",
            "asdiv",
            "math",
            "mbpp_plus.base",
            "mbpp_plus.plus",
            "alpaca_eval.win_rate",
            "alpaca_eval.reference"
        ]
    );
    for b in ["asdiv", "mawps"] {
        assert_eq!(score(r, "right", b), (Some(1.0), 2, 0), "{b}");
        assert_eq!(score(r, "wrong", b), (Some(0.0), 2, 0), "{b}");
    }
    assert_eq!(score(r, "right", "gsm8k"), (Some(1.0), 3, 0));
    assert_eq!(score(r, "right", "math"), (Some(1.0), 7, 0));
    assert_eq!(score(r, "wrong", "math"), (Some(0.0), 7, 0));
    assert_eq!(
        score(r, "tie", "math"),
        (Some(0.0), 7, 0),
        "an empty answer is wrong"
    );
    assert_eq!(score(r, "right", "mbpp_plus.base"), (Some(1.0), 2, 0));
    assert_eq!(score(r, "right", "mbpp_plus.plus"), (Some(1.0), 2, 0));
    assert_eq!(score(r, "wrong", "mbpp_plus.base"), (Some(0.0), 2, 0));
    assert_eq!(score(r, "wrong", "mbpp_plus.plus"), (Some(0.0), 2, 0));
    assert_eq!(score(r, "right", "alpaca_eval.win_rate"), (Some(1.0), 2, 0));
    assert_eq!(score(r, "wrong", "alpaca_eval.win_rate"), (Some(0.0), 2, 0));
    assert_eq!(score(r, "tie", "alpaca_eval.win_rate"), (Some(0.5), 2, 0));
    // Agreement with the reference is scored from the answer alone: for every answer.
    for m in ["right", "wrong", "tie"] {
        let (s, n, failed) = score(r, m, "alpaca_eval.reference");
        assert!(s.is_some_and(|s| (0.0..=1.0).contains(&s)) && (n, failed) == (2, 0), "{m}: {s:?}");
    }
    // Failed requests are counted apart, never as scores.
    for b in &r.benchmarks {
        let (s, n, failed) = score(r, "down", b);
        assert_eq!((s, n), (None, 0), "{b}");
        assert!(failed > 0, "{b}");
    }
    // Intervals: Wilson on n.
    let c = r.cell("row-right", "math").unwrap();
    let (lo, hi) = fusechat_eval::stats::wilson(1.0, 7, fusechat_eval::stats::Z95);
    assert_eq!((c.ci_low, c.ci_high), (lo, hi));
    assert!(c.ci_low < 1.0 && c.ci_high == 1.0);

    // Requests: 11 prompts per model; the judge twice per instruction prompt
    // for right, wrong and tie (the failed model has nothing to judge).
    assert_eq!(out.generated, 44);
    assert_eq!(out.judged, 12);
    assert_eq!(mock.count_model("judge-fair"), 12);
    for m in ["right", "wrong", "tie"] {
        assert_eq!(mock.count_model(m), 11, "{m}");
    }
    // Files.
    for f in [
        "report.md",
        "report.json",
        "report.svg",
        "samples.jsonl",
        "results.jsonl",
    ] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert_eq!(md.lines().filter(|l| l.starts_with("| row-")).count(), 4);
    let json1 = std::fs::read_to_string(dir.path().join("report.json")).unwrap();
    let v: Value = serde_json::from_str(&json1).unwrap();
    assert_eq!(v["results"]["row-right"]["math"]["score"], 1.0);
    assert_eq!(v["results"]["row-right"]["math"]["n"], 7);
    let samples = std::fs::read_to_string(dir.path().join("samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 44);

    // The same config again: no request at all, the same report. The failed
    // model's requests are retried (retry_failed), so leave it out here.
    let before = mock.count();
    let mut cfg2 = cfg.clone();
    cfg2.retry_failed = false;
    let again = rt().block_on(fusechat_eval::run(&cfg2)).unwrap();
    assert_eq!(mock.count(), before, "a rerun sent requests");
    assert_eq!((again.generated, again.judged, again.sandboxed), (0, 0, 0));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("report.json")).unwrap(),
        json1
    );

    // A changed setting (max_tokens) is new work.
    let mut cfg3 = cfg2.clone();
    cfg3.max_tokens = 65;
    cfg3.models.retain(|m| m.name == "row-right");
    let third = rt().block_on(fusechat_eval::run(&cfg3)).unwrap();
    assert_eq!(third.generated, 11);
}

#[test]
fn a_position_biased_judge_gives_exactly_one_half() {
    let mock = start_mock(gold_map());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &mock.url(), &["right", "wrong"], "judge-first");
    cfg.sizes.retain(|k, _| k == "alpaca_eval");
    let out = rt().block_on(fusechat_eval::run(&cfg)).unwrap();
    assert_eq!(out.report.benchmarks, ["alpaca_eval.win_rate", "alpaca_eval.reference"]);
    assert_eq!(
        score(&out.report, "right", "alpaca_eval.win_rate"),
        (Some(0.5), 2, 0)
    );
    assert_eq!(
        score(&out.report, "wrong", "alpaca_eval.win_rate"),
        (Some(0.5), 2, 0)
    );
    assert_eq!(mock.count_model("judge-first"), 8);
}

#[test]
fn a_leaning_judge_is_read_by_its_probabilities() {
    let mock = start_mock(gold_map());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &mock.url(), &["right", "wrong", "tie"], "judge-leaning");
    cfg.sizes.retain(|k, _| k == "alpaca_eval");
    let out = rt().block_on(fusechat_eval::run(&cfg)).unwrap();
    let win = |m: &str| score(&out.report, m, "alpaca_eval.win_rate");
    // Model first and better: p(A) 0.9; reference first, model better:
    // p(B) 0.45. Wrong: 0.55 and 0.1. Tie: 0.6 and 0.4.
    let close = |got: (Option<f64>, usize, usize), want: f64| {
        assert!((got.0.unwrap() - want).abs() < 1e-9 && got.1 == 2 && got.2 == 0, "{got:?} vs {want}");
    };
    close(win("right"), 0.675);
    close(win("wrong"), 0.325);
    close(win("tie"), 0.5);
    let samples = std::fs::read_to_string(dir.path().join("samples.jsonl")).unwrap();
    assert!(samples.contains("\"probs\":{\"a\":0.9"), "{samples}");
    // The same judge scored by verdicts: every answer "A", every model 0.5.
    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg2 = cfg.clone();
    cfg2.output = dir2.path().to_path_buf();
    cfg2.judge.as_mut().unwrap().scoring = fusechat_eval::judge::Scoring::Verdict;
    let out2 = rt().block_on(fusechat_eval::run(&cfg2)).unwrap();
    for m in ["right", "wrong", "tie"] {
        assert_eq!(score(&out2.report, m, "alpaca_eval.win_rate"), (Some(0.5), 2, 0), "{m}");
    }
}

#[test]
fn a_judge_without_verdicts_is_recorded_not_a_win() {
    let mock = start_mock(gold_map());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &mock.url(), &["right"], "judge-garbage");
    cfg.sizes.retain(|k, _| k == "alpaca_eval");
    let out = rt().block_on(fusechat_eval::run(&cfg)).unwrap();
    assert_eq!(
        score(&out.report, "right", "alpaca_eval.win_rate"),
        (None, 0, 2)
    );
    let samples = std::fs::read_to_string(dir.path().join("samples.jsonl")).unwrap();
    assert!(samples.contains("no verdict in the judge"), "{samples}");
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(md.contains("(2 failed)"), "{md}");
    // The judge answered: a rerun does not ask again.
    let n = mock.count();
    rt().block_on(fusechat_eval::run(&cfg)).unwrap();
    assert_eq!(mock.count(), n);
}

#[test]
fn a_log_cut_by_a_kill_is_finished_by_the_next_run() {
    let mock = start_mock(gold_map());
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &mock.url(), &["right", "wrong"], "judge-fair");
    let first = rt().block_on(fusechat_eval::run(&cfg)).unwrap();
    let json1 = std::fs::read_to_string(dir.path().join("report.json")).unwrap();
    let log = dir.path().join("results.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Keep 10 whole lines and half of the 11th, as a kill -9 mid-write would.
    let keep = 10;
    let mut cut = lines[..keep].join("\n");
    cut.push('\n');
    cut.push_str(&lines[keep][..lines[keep].len() / 2]);
    std::fs::write(&log, cut).unwrap();
    let lost = lines.len() - keep;
    let before = mock.count();
    let second = rt().block_on(fusechat_eval::run(&cfg)).unwrap();
    let sent = mock.count() - before;
    // Only the lost records are redone (sandbox runs send no request).
    let lost_requests = lines[keep..]
        .iter()
        .filter(|l| l.contains("\"kind\":\"gen\"") || l.contains("\"kind\":\"judge\""))
        .count();
    assert_eq!(sent, lost_requests, "lost {lost} records");
    assert!(second.generated + second.judged + second.sandboxed == lost);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("report.json")).unwrap(),
        json1
    );
    assert_eq!(first.report.results, second.report.results);
}

#[test]
fn an_unreachable_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = config(
        dir.path(),
        &format!("http://127.0.0.1:{port}/v1"),
        &["right"],
        "judge-fair",
    );
    let err = rt()
        .block_on(fusechat_eval::run(&cfg))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("row-right") && err.contains("unreachable"),
        "{err}"
    );
}

/// The binary, killed with SIGKILL in the middle of a run, then run again:
/// the second run asks only for what the first had not written.
#[test]
fn kill_9_then_rerun_finishes_without_redoing_work() {
    let bin = std::env::var_os("FUSECHAT_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            exe.parent().unwrap().parent().unwrap().join("fusechat")
        });
    let help = std::process::Command::new(&bin).arg("--help").output();
    assert!(
        help.is_ok_and(|h| String::from_utf8_lossy(&h.stdout).contains("eval")),
        "{} with an `eval` subcommand is needed: `cargo build --release -p fusechat`",
        bin.display()
    );
    let mock = start_mock(gold_map());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cfg = dir.path().join("eval.toml");
    let data = fusechat_data::config_file::repository_configs().join("data-tiny.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_config = \"{}\"\noutput = \"{}\"\nmax_tokens = 32\nconcurrency = 2\nprogress = false\n\
             [sizes]\ngsm8k = 30\n\
             [[models]]\nname = \"m\"\nbase_url = \"{}\"\nmodel = \"slow-right\"\n",
            data.display(),
            out.display(),
            mock.url()
        ),
    )
    .unwrap();
    let log = out.join("results.jsonl");
    let mut child = std::process::Command::new(&bin)
        .args(["eval", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let lines = || {
        std::fs::read_to_string(&log)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    while lines() < 8 {
        assert!(std::time::Instant::now() < deadline, "no progress");
        assert!(child.try_wait().unwrap().is_none(), "finished too early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let written = lines();
    assert!(written < 30, "the kill came too late ({written})");
    let sent_first = mock.count();
    let o = std::process::Command::new(&bin)
        .args(["eval", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let sent_second = mock.count() - sent_first;
    assert_eq!(sent_second, 30 - written, "{err}");
    assert!(
        err.contains(&format!("{} generation(s)", 30 - written)),
        "{err}"
    );
    // At most the requests in flight at the kill (concurrency 2) were lost.
    assert!(
        sent_first <= written + 2,
        "{sent_first} sent, {written} written"
    );
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(v["results"]["m"]["gsm8k"]["n"], 30);
    assert_eq!(v["results"]["m"]["gsm8k"]["score"], 1.0);
}
