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
//!   (`<pool>.win_rate`), judged pairwise in both orders ([`judge`]), and
//!   the agreement with its reference output (`<pool>.reference`, no judge call).
//!
//! [`run`] does it all, one step after the other: select the prompts
//! ([`select`]), generate, score ([`score`]), keep every result in the
//! resumable log ([`store`]), and write
//! `report.md`, `report.json`, `report.svg` and `samples.jsonl`
//! ([`report`]), with 95% Wilson intervals ([`stats`]).

pub mod config;
pub mod error;
pub mod judge;
pub mod report;
pub mod score;
pub mod select;
pub mod stats;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use fusechat_data::client::Endpoint;
use fusechat_data::config::{Config as DataConfig, Domain, PoolFormat};
use fusechat_data::prompts::Prompt;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

pub use config::{EvalConfig, ModelEntry};
pub use error::{EvalError, Result};
pub use report::Report;

use score::{References, Scorer};
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
        Domain::Instruction => vec![format!("{pool}.win_rate"), format!("{pool}.reference")],
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
    let prompts = select_prompts(config, &data)?;
    let refs = instruction_references(config, &data, &prompts)?;
    let out_dir = config.output_dir();
    let store = Store::open(&out_dir.join("results.jsonl"))?;
    let tasks = tasks(config, &prompts);
    let generated = generate(config, &prompts, &tasks, &store).await?;
    let (mut samples, to_score) = recorded_samples(config, &prompts, &tasks, &store);
    let scorer = Scorer::new(config, &store, &refs)?;
    score(&scorer, &prompts, &mut samples, to_score).await?;
    let (judged, sandboxed) = scorer.counts();
    let report = Report::build(config, &benchmark_order(config, &data), &samples);
    report::write(&out_dir, &report, &samples)?;
    Ok(Outcome {
        report,
        output_dir: out_dir,
        generated,
        judged,
        sandboxed,
    })
}

/// The evaluation-side prompts of every pool `config` sizes.
fn select_prompts(config: &EvalConfig, data: &DataConfig) -> Result<Vec<Prompt>> {
    let selection = select::select(data, &config.sizes, config.seed)?;
    for (pool, asked, got) in &selection.short {
        tracing::warn!("pool `{pool}`: {asked} prompts asked for, its evaluation side holds {got}");
    }
    Ok(selection.prompts)
}

/// The reference outputs of the instruction pools, one for every selected
/// instruction prompt (a judge is then required).
fn instruction_references(
    config: &EvalConfig,
    data: &DataConfig,
    prompts: &[Prompt],
) -> Result<References> {
    let mut refs = References::new();
    for pool in config.sizes.keys() {
        if select::domain_of(data, pool) == Some(Domain::Instruction) {
            if config.judge.is_none() {
                return Err(EvalError::NoJudge);
            }
            refs.extend(references(data, pool)?);
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
    Ok(refs)
}

/// One model on one prompt: its greedy response is stored under `key`.
struct Task {
    model: usize,
    prompt: usize,
    key: String,
}

/// Every model on every prompt, in report order.
fn tasks(config: &EvalConfig, prompts: &[Prompt]) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (mi, m) in config.models.iter().enumerate() {
        for (pi, p) in prompts.iter().enumerate() {
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
            tasks.push(Task {
                model: mi,
                prompt: pi,
                key,
            });
        }
    }
    tasks
}

/// Asks each model for the responses the store lacks (or recorded as failed,
/// with `retry_failed`); returns how many requests it sent.
async fn generate(
    config: &EvalConfig,
    prompts: &[Prompt],
    tasks: &[Task],
    store: &Store,
) -> Result<usize> {
    // Same key twice (two rows naming the same endpoint and model): ask once.
    let mut seen = std::collections::HashSet::new();
    let pending: Vec<&Task> = tasks
        .iter()
        .filter(|t| match store.get(&t.key) {
            Some(Record::Gen { ok, .. }) => !(ok || !config.retry_failed),
            _ => true,
        })
        .filter(|t| seen.insert(t.key.clone()))
        .collect();
    let endpoints = endpoints(config, &pending).await?;
    let pending = &pending;
    let pb = progress(config.progress, pending.len(), "generate");
    let ask = |i: usize| {
        let t: &Task = pending[i];
        let ep = endpoints[t.model].clone().expect("endpoint made above");
        let m = &config.models[t.model];
        let p = &prompts[t.prompt];
        let pb = pb.clone();
        async move {
            let body = gen_request(m.model(), p, config.max_tokens, &m.name);
            let (model, prompt, key) = (m.name.clone(), p.id.clone(), t.key.clone());
            let rec = match ep.chat(&body).await {
                Ok(r) => Record::Gen {
                    key,
                    model,
                    prompt,
                    ok: true,
                    response: Some(r.text),
                    finish_reason: r.finish_reason,
                    completion_tokens: r.completion_tokens,
                    error: None,
                },
                Err(e) => {
                    tracing::warn!("{model} on {prompt}: {e}");
                    Record::Gen {
                        key,
                        model,
                        prompt,
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
    };
    // One stream per model, as wide as its endpoint's concurrency, all at once.
    let per_model = (0..config.models.len()).map(|mi| {
        let width = config.endpoint_for(&config.models[mi]).concurrency;
        let tasks = (0..pending.len()).filter(move |&i| pending[i].model == mi);
        futures::stream::iter(tasks.map(ask))
            .buffer_unordered(width.max(1))
            .collect::<Vec<Result<()>>>()
    });
    let results = futures::future::join_all(per_model).await;
    pb.finish_and_clear();
    results.into_iter().flatten().collect::<Result<Vec<()>>>()?;
    Ok(pending.len())
}

/// A checked client for each model that has requests to make.
async fn endpoints(config: &EvalConfig, pending: &[&Task]) -> Result<Vec<Option<Arc<Endpoint>>>> {
    let mut endpoints: Vec<Option<Arc<Endpoint>>> = vec![None; config.models.len()];
    for t in pending {
        if endpoints[t.model].is_some() {
            continue;
        }
        let m = &config.models[t.model];
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
        endpoints[t.model] = Some(ep);
    }
    Ok(endpoints)
}

/// A response to score: the sample it belongs to and the prompt it answers.
struct ToScore {
    sample: usize,
    prompt: usize,
    response: String,
}

/// One sample per task, with the stored response (or why there is none),
/// and the responses to score.
fn recorded_samples(
    config: &EvalConfig,
    prompts: &[Prompt],
    tasks: &[Task],
    store: &Store,
) -> (Vec<SampleResult>, Vec<ToScore>) {
    let mut samples = Vec::with_capacity(tasks.len());
    let mut to_score = Vec::new();
    for t in tasks {
        let p = &prompts[t.prompt];
        let mut s = SampleResult {
            model: config.models[t.model].name.clone(),
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
        match store.get(&t.key) {
            Some(Record::Gen {
                ok: true,
                response,
                finish_reason,
                ..
            }) => {
                s.response = response.clone();
                s.finish_reason = finish_reason;
                to_score.push(ToScore {
                    sample: samples.len(),
                    prompt: t.prompt,
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
    (samples, to_score)
}

/// Scores every response into its sample.
async fn score(
    scorer: &Scorer<'_>,
    prompts: &[Prompt],
    samples: &mut [SampleResult],
    to_score: Vec<ToScore>,
) -> Result<()> {
    let pb = progress(scorer.progress(), to_score.len(), "score");
    let models: Vec<String> = to_score
        .iter()
        .map(|t| samples[t.sample].model.clone())
        .collect();
    let (to_score, models, bar) = (&to_score, &models, &pb);
    let one = move |i: usize| {
        let (t, model) = (&to_score[i], &models[i]);
        let pb = bar.clone();
        async move {
            let scored = scorer.score(model, &prompts[t.prompt], &t.response).await?;
            pb.inc(1);
            Ok((t.sample, scored))
        }
    };
    // One stream per domain, as wide as what bounds it (sandbox slots, the
    // judge's concurrency), all at once, so neither waits for the other.
    let per_domain = [Domain::Math, Domain::Code, Domain::Instruction].map(|d| {
        let jobs = (0..to_score.len()).filter(move |&i| prompts[to_score[i].prompt].domain == d);
        futures::stream::iter(jobs.map(&one))
            .buffer_unordered(scorer.width(d))
            .collect::<Vec<Result<(usize, score::Scored)>>>()
    });
    let scored: Vec<Result<(usize, score::Scored)>> = futures::future::join_all(per_domain)
        .await
        .into_iter()
        .flatten()
        .collect();
    pb.finish_and_clear();
    for r in scored {
        let (i, scored) = r?;
        let s = &mut samples[i];
        s.scores = scored.scores;
        s.detail = scored.detail;
        s.note = scored.note;
    }
    Ok(())
}

/// The report's columns: each math pool, all math, then code and
/// instruction benchmarks, pools in data-config order.
fn benchmark_order(config: &EvalConfig, data: &DataConfig) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let evaluated = |d: Domain| {
        data.pools
            .iter()
            .filter(move |p| p.domain == d && config.sizes.contains_key(&p.name))
    };
    for p in evaluated(Domain::Math) {
        order.push(p.name.clone());
    }
    if evaluated(Domain::Math).next().is_some() {
        order.push(MATH_ALL.into());
    }
    for d in [Domain::Code, Domain::Instruction] {
        for p in evaluated(d) {
            order.extend(benchmarks_of(&p.name, d));
        }
    }
    order
}
