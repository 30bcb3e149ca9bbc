//! Evaluation (issue 5, "Evaluation"): score one or more OpenAI-compatible
//! endpoints on the EVALUATION side of the data config's prompt pools (never
//! the training side), greedy decoding (temperature 0):
//!
//! - math accuracy per pool (GSM8K, MAWPS, ASDiv) and over all math pools
//!   (`math`), with the data builder's answer checker and math prompt suffix
//!   ([`fusechat_data::score::math`], the prompts of [`fusechat_data::prompts`]);
//! - code pass@1 on MBPP+ with its base tests (`<pool>.base`) and with its
//!   base and plus tests (`<pool>.plus`), in the data builder's sandbox;
//! - the win rate against AlpacaEval's GPT-4 reference outputs
//!   (`<pool>.win_rate`), judged pairwise in both orders ([`judge`]).
//!
//! [`run`] does it all: select the prompts ([`select`]), generate, score,
//! keep every result in the resumable log ([`store`]), and write
//! `report.md`, `report.json`, `report.svg` and `samples.jsonl`
//! ([`report`]), with 95% Wilson intervals ([`stats`]).

pub mod config;
pub mod error;
pub mod judge;
pub mod report;
pub mod select;
pub mod stats;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use fusechat_data::client::Endpoint;
use fusechat_data::config::{Config as DataConfig, Domain, PoolFormat};
use fusechat_data::prompts::Prompt;
use fusechat_data::score::code::Sandbox;
use fusechat_data::score::math;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

pub use config::EvalConfig;
pub use error::{EvalError, Result};
pub use report::Report;

use judge::{Order, Verdict};
use store::{key_of, Record, Store};

/// What one model did on one prompt, and its score on each benchmark the
/// prompt belongs to (`None`: not counted, see `note`).
#[derive(Debug, Clone, Serialize)]
pub struct SampleResult {
    pub model: String,
    pub prompt: String,
    pub pool: String,
    pub domain: Domain,
    pub response: Option<String>,
    pub finish_reason: Option<String>,
    /// Benchmark id -> score in [0, 1].
    pub scores: BTreeMap<String, Option<f64>>,
    /// Math: the extracted answer and the gold one; code: the sandbox's
    /// verdicts; instruction: the judge's verdicts per order.
    pub detail: Value,
    /// Why a score is missing (request failed, judge failed, sandbox broken).
    pub note: Option<String>,
}

/// Benchmark ids of a pool, in report order.
pub fn benchmarks_of(pool: &str, domain: Domain) -> Vec<String> {
    match domain {
        Domain::Math => vec![pool.to_string()],
        Domain::Code => vec![format!("{pool}.base"), format!("{pool}.plus")],
        Domain::Instruction => vec![format!("{pool}.win_rate")],
    }
}

/// The aggregate benchmark over every math pool.
pub const MATH_ALL: &str = "math";

/// AlpacaEval's reference outputs of an `alpaca_eval` pool: prompt id ->
/// (instruction, reference output). The prompt ids are `<pool>/<index>`.
pub fn references(data: &DataConfig, pool: &str) -> Result<HashMap<String, (String, String)>> {
    let p = data
        .pools
        .iter()
        .find(|p| p.name == pool)
        .ok_or_else(|| EvalError::UnknownPool(pool.into()))?;
    if p.format != PoolFormat::AlpacaEval {
        return Err(EvalError::Pool {
            pool: pool.into(),
            msg: "the win rate needs reference outputs: only the `alpaca_eval` format has them"
                .into(),
        });
    }
    let path = data.pool_path(p);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| EvalError::io(format!("reading {}", path.display()), e))?;
    let arr: Vec<Value> = serde_json::from_str(&text).map_err(|e| EvalError::Pool {
        pool: pool.into(),
        msg: format!("{}: not a JSON array: {e}", path.display()),
    })?;
    let mut out = HashMap::new();
    for (i, v) in arr.iter().enumerate() {
        let ins = v.get("instruction").and_then(Value::as_str);
        let outp = v.get("output").and_then(Value::as_str);
        if let (Some(ins), Some(o)) = (ins, outp) {
            out.insert(
                format!("{pool}/{i}"),
                (ins.trim().to_string(), o.to_string()),
            );
        }
    }
    Ok(out)
}

/// The greedy chat request of a model for a prompt.
pub fn gen_request(model: &str, prompt: &Prompt, max_tokens: u64, name: &str) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt.text}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "user": format!("fusechat-eval/{name}/{}", prompt.id),
    })
}

fn progress(enabled: bool, len: usize, what: &str) -> indicatif::ProgressBar {
    if !enabled || len == 0 {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap()
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// What [`run`] did: the report, where it went, and how much it asked for.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub report: Report,
    pub output_dir: PathBuf,
    /// Chat requests sent to the models in this run (cached ones not counted).
    pub generated: usize,
    /// Judge requests sent in this run.
    pub judged: usize,
    /// Sandbox runs in this run.
    pub sandboxed: usize,
}

/// Run the evaluation of `config` and write the report.
pub async fn run(config: &EvalConfig) -> Result<Outcome> {
    let data = config.load_data_config()?;
    let selection = select::select(&data, &config.sizes, config.seed)?;
    for (pool, asked, got) in &selection.short {
        tracing::warn!("pool `{pool}`: {asked} prompts asked for, its evaluation side holds {got}");
    }
    let prompts = selection.prompts;
    // References of the instruction pools.
    let mut refs: HashMap<String, (String, String)> = HashMap::new();
    for pool in config.sizes.keys() {
        if select::domain_of(&data, pool) == Some(Domain::Instruction) {
            if config.judge.is_none() {
                return Err(EvalError::NoJudge);
            }
            refs.extend(references(&data, pool)?);
        }
    }
    for p in prompts.iter().filter(|p| p.domain == Domain::Instruction) {
        match refs.get(&p.id) {
            Some((ins, _)) if ins == p.text.trim() => {}
            _ => {
                return Err(EvalError::Pool {
                    pool: p.pool.clone(),
                    msg: format!("no reference output matching prompt `{}`", p.id),
                })
            }
        }
    }
    let out_dir = config.output_dir();
    let store = Arc::new(Store::open(&out_dir.join("results.jsonl"))?);

    // 1. Generation.
    struct GenJob {
        model_idx: usize,
        prompt_idx: usize,
        key: String,
        body: Value,
    }
    let mut jobs: Vec<GenJob> = Vec::new();
    let mut gen_keys: HashMap<(usize, usize), String> = HashMap::new();
    for (mi, m) in config.models.iter().enumerate() {
        for (pi, p) in prompts.iter().enumerate() {
            let body = gen_request(m.model(), p, config.max_tokens, &m.name);
            let key = key_of(
                "gen",
                &json!({
                    "base_url": m.base_url.trim_end_matches('/'),
                    "model": m.model(),
                    "text": p.text,
                    "max_tokens": config.max_tokens,
                    "temperature": 0.0,
                }),
            );
            gen_keys.insert((mi, pi), key.clone());
            let done = match store.get(&key) {
                Some(Record::Gen { ok, .. }) => ok || !config.retry_failed,
                _ => false,
            };
            if !done {
                jobs.push(GenJob {
                    model_idx: mi,
                    prompt_idx: pi,
                    key,
                    body,
                });
            }
        }
    }
    // Same key twice (two rows naming the same endpoint and model): ask once.
    let mut seen = std::collections::HashSet::new();
    jobs.retain(|j| seen.insert(j.key.clone()));
    let mut endpoints: Vec<Option<Arc<Endpoint>>> = vec![None; config.models.len()];
    for j in &jobs {
        if endpoints[j.model_idx].is_none() {
            let m = &config.models[j.model_idx];
            let ep = Endpoint::new(&config.endpoint_for(m))
                .map_err(|e| EvalError::data(format!("model `{}`: the HTTP client", m.name), e))?;
            ep.check().await.map_err(|e| {
                EvalError::Config(format!(
                    "model `{}` ({} at {}): {e}; start the server (`fusechat serve`) or fix base_url",
                    m.name,
                    m.model(),
                    m.base_url
                ))
            })?;
            endpoints[j.model_idx] = Some(ep);
        }
    }
    let generated = jobs.len();
    let pb = progress(config.progress, jobs.len(), "generate");
    let results: Vec<Result<()>> = futures::stream::iter(jobs.into_iter().map(|j| {
        let ep = endpoints[j.model_idx].clone().expect("endpoint made above");
        let store = store.clone();
        let name = config.models[j.model_idx].name.clone();
        let pid = prompts[j.prompt_idx].id.clone();
        let pb = pb.clone();
        async move {
            let rec = match ep.chat(&j.body).await {
                Ok(r) => Record::Gen {
                    key: j.key,
                    model: name,
                    prompt: pid,
                    ok: true,
                    response: Some(r.text),
                    finish_reason: r.finish_reason,
                    completion_tokens: r.completion_tokens,
                    error: None,
                },
                Err(e) => {
                    tracing::warn!("{name} on {pid}: {e}");
                    Record::Gen {
                        key: j.key,
                        model: name,
                        prompt: pid,
                        ok: false,
                        response: None,
                        finish_reason: None,
                        completion_tokens: None,
                        error: Some(e.to_string()),
                    }
                }
            };
            pb.inc(1);
            store.put(rec)
        }
    }))
    .buffer_unordered(256)
    .collect()
    .await;
    pb.finish_and_clear();
    results.into_iter().collect::<Result<Vec<()>>>()?;

    // 2. Scoring: math here, code in the sandbox, instruction by the judge.
    let sandbox_base = {
        let mut s = Sandbox::new(&config.code);
        s.plus_inputs = 0;
        s
    };
    let sandbox_plus = {
        let mut s = Sandbox::new(&config.code);
        s.plus_inputs = usize::MAX;
        s
    };
    let code_sem = Arc::new(tokio::sync::Semaphore::new(config.code_concurrency));
    let judge_ep = match &config.judge {
        Some(j) if !refs.is_empty() => Some(
            Endpoint::new(&config.judge_endpoint(j))
                .map_err(|e| EvalError::data("the judge's HTTP client", e))?,
        ),
        _ => None,
    };
    let judge_checked = Arc::new(tokio::sync::OnceCell::<std::result::Result<(), String>>::new());

    let mut samples: Vec<SampleResult> = Vec::new();
    struct ScoreJob {
        idx: usize,
        prompt_idx: usize,
        response: String,
    }
    let mut score_jobs = Vec::new();
    for (mi, m) in config.models.iter().enumerate() {
        for (pi, p) in prompts.iter().enumerate() {
            let key = &gen_keys[&(mi, pi)];
            let mut s = SampleResult {
                model: m.name.clone(),
                prompt: p.id.clone(),
                pool: p.pool.clone(),
                domain: p.domain,
                response: None,
                finish_reason: None,
                scores: benchmarks_of(&p.pool, p.domain)
                    .into_iter()
                    .map(|b| (b, None))
                    .collect(),
                detail: Value::Null,
                note: None,
            };
            match store.get(key) {
                Some(Record::Gen {
                    ok: true,
                    response,
                    finish_reason,
                    ..
                }) => {
                    s.response = response.clone();
                    s.finish_reason = finish_reason;
                    score_jobs.push(ScoreJob {
                        idx: samples.len(),
                        prompt_idx: pi,
                        response: response.unwrap_or_default(),
                    });
                }
                Some(Record::Gen { error, .. }) => {
                    s.note = Some(format!(
                        "request failed: {}",
                        error.unwrap_or_else(|| "unknown".into())
                    ));
                }
                _ => s.note = Some("no response recorded".into()),
            }
            samples.push(s);
        }
    }
    let counters = Arc::new(std::sync::Mutex::new((0usize, 0usize))); // (judged, sandboxed)
    let pb = progress(config.progress, score_jobs.len(), "score");
    let scored: Vec<Result<(usize, BTreeMap<String, Option<f64>>, Value, Option<String>)>> =
        futures::stream::iter(score_jobs.into_iter().map(|j| {
            let p = &prompts[j.prompt_idx];
            let model_name = samples[j.idx].model.clone();
            let store = store.clone();
            let sandbox_base = &sandbox_base;
            let sandbox_plus = &sandbox_plus;
            let code_sem = code_sem.clone();
            let judge_ep = judge_ep.clone();
            let judge_checked = judge_checked.clone();
            let refs = &refs;
            let counters = counters.clone();
            let pb = pb.clone();
            async move {
                let mut scores = BTreeMap::new();
                let mut note = None;
                let detail;
                match p.domain {
                    Domain::Math => {
                        let gold = p.gold.get("answer").and_then(Value::as_str).unwrap_or("");
                        let v = math::check(&j.response, gold);
                        scores.insert(p.pool.clone(), Some(if v.correct { 1.0 } else { 0.0 }));
                        detail = json!({"gold": gold, "extracted": v.extracted, "rule": v.rule, "correct": v.correct});
                    }
                    Domain::Code => {
                        let mut verdicts = serde_json::Map::new();
                        let mut base_passed = None;
                        for (tests, sandbox) in [("base", sandbox_base), ("plus", sandbox_plus)] {
                            let bench = format!("{}.{tests}", p.pool);
                            // Plus tests include the base tests: a base failure fails plus.
                            if tests == "plus" && base_passed == Some(false) {
                                scores.insert(bench, Some(0.0));
                                verdicts.insert(tests.into(), json!({"passed": false, "reason": "base_failed"}));
                                continue;
                            }
                            let key = key_of(
                                "code",
                                &json!({
                                    "response": j.response, "prompt": p.id, "tests": tests,
                                    "timeout_s": config.code.timeout_s, "memory_mb": config.code.memory_mb,
                                }),
                            );
                            let rec = match store.get(&key) {
                                Some(r @ Record::Code { .. }) => r,
                                _ => {
                                    let _permit = code_sem.acquire().await.expect("open semaphore");
                                    let v = sandbox.check_response(&j.response, &p.gold).await;
                                    counters.lock().unwrap().1 += 1;
                                    let r = Record::Code {
                                        key, model: model_name.clone(), prompt: p.id.clone(),
                                        tests: tests.into(), passed: v.passed, reason: v.reason, detail: v.detail,
                                    };
                                    // A broken sandbox is no verdict: not kept, redone next run.
                                    if !matches!(&r, Record::Code { reason, .. } if reason == "sandbox_error") {
                                        store.put(r.clone())?;
                                    }
                                    r
                                }
                            };
                            if let Record::Code { passed, reason, detail, .. } = rec {
                                if reason == "sandbox_error" {
                                    note = Some(format!("sandbox error: {detail}"));
                                    scores.insert(bench, None);
                                } else {
                                    scores.insert(bench, Some(if passed { 1.0 } else { 0.0 }));
                                }
                                if tests == "base" {
                                    base_passed = (reason != "sandbox_error").then_some(passed);
                                }
                                let clipped: String = detail.chars().take(300).collect();
                                verdicts.insert(tests.into(), json!({"passed": passed, "reason": reason, "detail": clipped}));
                            }
                        }
                        detail = Value::Object(verdicts);
                    }
                    Domain::Instruction => {
                        let bench = format!("{}.win_rate", p.pool);
                        let (instruction, reference) = refs.get(&p.id).cloned().expect("checked above");
                        let jc = config.judge.as_ref().expect("checked above");
                        let ep = judge_ep.expect("made above");
                        let mut judged = [judge::Judged::default(); 2];
                        let mut shown = serde_json::Map::new();
                        for (oi, order) in Order::BOTH.into_iter().enumerate() {
                            if j.response.trim().is_empty() {
                                // An empty output loses without asking the judge.
                                let loss = match order { Order::ModelFirst => Verdict::B, Order::ReferenceFirst => Verdict::A };
                                judged[oi] = judge::Judged { verdict: Some(loss), probs: None };
                                shown.insert(order.as_str().into(), json!({"verdict": loss, "reply": "empty output: a loss"}));
                                continue;
                            }
                            let body = judge::request(&jc.model, jc.max_tokens, jc.scoring, &instruction, &j.response, &reference, order);
                            let key = key_of(
                                "judge",
                                &json!({"base_url": jc.base_url.trim_end_matches('/'), "body": body}),
                            );
                            let cached = match store.get(&key) {
                                Some(r @ Record::Judge { .. }) => {
                                    let failed_request = matches!(&r, Record::Judge { error: Some(_), .. });
                                    (!(failed_request && config.retry_failed)).then_some(r)
                                }
                                _ => None,
                            };
                            let rec = match cached {
                                Some(r) => r,
                                None => {
                                    let up = judge_checked
                                        .get_or_init(|| async { ep.check().await })
                                        .await
                                        .clone();
                                    if let Err(e) = up {
                                        return Err(EvalError::Config(format!(
                                            "the judge ({} at {}): {e}", jc.model, jc.base_url
                                        )));
                                    }
                                    counters.lock().unwrap().0 += 1;
                                    let r = match ep.chat(&body).await {
                                        Ok(r) => {
                                            let read = judge::parse_verdict_at(&r.text);
                                            let verdict = read.map(|(v, _)| v);
                                            let probs = read.and_then(|(v, at)| judge::verdict_probs(&r.raw, &r.text, v, at));
                                            Record::Judge {
                                                key, model: model_name.clone(), prompt: p.id.clone(), order,
                                                verdict, probs, reply: Some(r.text), error: None,
                                            }
                                        }
                                        Err(e) => Record::Judge {
                                            key, model: model_name.clone(), prompt: p.id.clone(), order,
                                            verdict: None, probs: None, reply: None, error: Some(e.to_string()),
                                        },
                                    };
                                    store.put(r.clone())?;
                                    r
                                }
                            };
                            if let Record::Judge { verdict, probs, reply, error, .. } = rec {
                                judged[oi] = judge::Judged { verdict, probs };
                                if verdict.is_none() {
                                    note = Some(match &error {
                                        Some(e) => format!("judge request failed ({}): {e}", order.as_str()),
                                        None => format!("no verdict in the judge's reply ({})", order.as_str()),
                                    });
                                }
                                shown.insert(order.as_str().into(), json!({"verdict": verdict, "probs": probs, "reply": reply, "error": error}));
                            }
                        }
                        scores.insert(bench, judge::prompt_score(judged[0], judged[1]));
                        detail = Value::Object(shown);
                    }
                }
                pb.inc(1);
                Ok((j.idx, scores, detail, note))
            }
        }))
        .buffer_unordered(64)
        .collect()
        .await;
    pb.finish_and_clear();
    for r in scored {
        let (idx, scores, detail, note) = r?;
        let s = &mut samples[idx];
        s.scores = scores;
        s.detail = detail;
        s.note = note;
    }
    let (judged, sandboxed) = *counters.lock().unwrap();

    // 3. Report.
    // Columns: math pools, all math, code, instruction; pools in data-config order.
    let mut bench_order: Vec<String> = Vec::new();
    let evaluated = |d: Domain| {
        data.pools
            .iter()
            .filter(move |p| p.domain == d && config.sizes.contains_key(&p.name))
    };
    for p in evaluated(Domain::Math) {
        bench_order.push(p.name.clone());
    }
    if evaluated(Domain::Math).next().is_some() {
        bench_order.push(MATH_ALL.into());
    }
    for d in [Domain::Code, Domain::Instruction] {
        for p in evaluated(d) {
            bench_order.extend(benchmarks_of(&p.name, d));
        }
    }
    let report = Report::build(config, &bench_order, &samples);
    report::write(&out_dir, &report, &samples)?;
    Ok(Outcome {
        report,
        output_dir: out_dir,
        generated,
        judged,
        sandboxed,
    })
}
