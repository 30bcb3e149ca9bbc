//! `fusechat sample`: N responses per training prompt and source, through
//! the sources' OpenAI endpoints, into the store. Resumable: keys already in
//! the store are not requested again.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use crate::error::{Context, DataError, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::client::{ChatFailure, ChatResponse, Endpoint, Replicas};
use crate::config::{Config, OnChange, SampleOrder, SourceConfig};
use crate::prompts::{self, Prompt, Side};
use crate::store::{SampleKey, SampleRecord, Store};

#[derive(Debug, Clone, Serialize)]
pub struct SampleSummary {
    pub planned: usize,
    pub already_done: usize,
    pub requested: usize,
    pub ok: usize,
    pub failed: usize,
    pub truncated: usize,
    pub empty: usize,
    pub completion_tokens: u64,
    pub elapsed_s: f64,
    pub responses_per_s: f64,
    pub tokens_per_s: f64,
    pub per_source: HashMap<String, SourceStats>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStats {
    pub ok: usize,
    pub failed: usize,
    pub completion_tokens: u64,
}

/// The request body for one sample.
pub fn request_body(config: &Config, source: &SourceConfig, prompt: &Prompt, idx: u32) -> Value {
    let mut body = json!({
        "model": source.model(),
        "messages": [{"role": "user", "content": prompt.text}],
        "max_tokens": source.max_tokens.unwrap_or(config.sampling.max_tokens),
        "user": format!("fusechat-data/{}/{}/{}", prompt.id, source.id, idx),
    });
    let o = body.as_object_mut().unwrap();
    if let Some(t) = source.temperature {
        o.insert("temperature".into(), json!(t));
    }
    if let Some(t) = source.top_p {
        o.insert("top_p".into(), json!(t));
    }
    if let Some(t) = source.top_k {
        o.insert("top_k".into(), json!(t));
    }
    if let Some(t) = source.repetition_penalty {
        o.insert("repetition_penalty".into(), json!(t));
    }
    if config.sampling.seeded {
        let key = format!("{}/{}/{}", prompt.id, source.id, idx);
        let seed = (prompts::unit_hash(config.sampling.seed, &key) * (1u64 << 31) as f64) as u64;
        o.insert("seed".into(), json!(seed));
    }
    body
}

/// What a config samples: each training prompt, for each source that
/// serves its domain, `n` indices (the source's own `n` where it has one).
pub fn plan<'a>(
    config: &'a Config,
    train: &'a [Prompt],
) -> impl Iterator<Item = (&'a Prompt, &'a SourceConfig, u32)> + 'a {
    train.iter().flat_map(move |p| {
        config
            .sources
            .iter()
            .filter(move |s| s.serves(p.domain))
            .flat_map(move |s| (0..s.n_for(p.domain, &config.sampling)).map(move |idx| (p, s, idx)))
    })
}

/// A request field's value for a message, shortened.
fn show(v: &Value) -> String {
    let s = if v.is_null() {
        "(unset)".to_string()
    } else {
        v.to_string()
    };
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

/// The top-level fields of a request body that differ between two
/// requests (a field only one of them has counts), in order.
fn changed_fields(stored: &Value, now: &Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let a = stored.as_object().unwrap_or(&empty);
    let b = now.as_object().unwrap_or(&empty);
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

fn write_split(config: &Config, all: &[Prompt]) -> Result<()> {
    let out = config.output_dir();
    std::fs::create_dir_all(&out)?;
    let tmp = out.join("split.jsonl.tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    for p in all {
        writeln!(
            f,
            "{}",
            json!({"id": p.id, "pool": p.pool, "domain": p.domain, "side": p.side.as_str()})
        )?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, out.join("split.jsonl"))?;
    Ok(())
}

/// One sample to request: a training prompt, a source, the response index.
type Job = (Prompt, SourceConfig, u32);

/// A finished request: which sample it was, the body sent, and the answer
/// or the failure.
struct Answered {
    prompt_id: String,
    source: String,
    idx: u32,
    request: Value,
    answer: std::result::Result<ChatResponse, ChatFailure>,
}

pub async fn run(config: &Config) -> Result<SampleSummary> {
    if config.sources.is_empty() {
        return Err(DataError::Config("no [[sources]] in the config".into()));
    }
    let (all, train) = prompts::load_all(config)?;
    if train.is_empty() {
        return Err(DataError::Config("no training prompts: check [[pools]]".into()));
    }
    let store = open_store(config, &all)?;
    assert!(train.iter().all(|p| p.side == Side::Train));
    let replicas = connect(config).await?;
    let (jobs, planned) = pending_jobs(config, &train, &store)?;
    let already_done = planned - jobs.len();
    eprintln!(
        "fusechat sample: {} training prompts, {} sources: {planned} samples planned, {already_done} already in {}, {} to request",
        train.len(),
        config.sources.len(),
        config.store_path().display(),
        jobs.len()
    );
    let mut summary = SampleSummary {
        planned,
        already_done,
        requested: jobs.len(),
        ok: 0,
        failed: 0,
        truncated: 0,
        empty: 0,
        completion_tokens: 0,
        elapsed_s: 0.0,
        responses_per_s: 0.0,
        tokens_per_s: 0.0,
        per_source: HashMap::new(),
    };
    let start = Instant::now();
    let last_error = request_all(config, jobs, &replicas, &store, &mut summary).await?;
    finish(config, summary, start.elapsed().as_secs_f64(), last_error)
}

/// The store, with the split's seed, fraction and prompts recorded, and
/// `split.jsonl` written beside it.
fn open_store(config: &Config, all: &[Prompt]) -> Result<Store> {
    let store = Store::open(&config.store_path())?;
    store.set_meta("split_seed", &config.prompts.split_seed.to_string())?;
    store.set_meta("eval_fraction", &config.prompts.eval_fraction.to_string())?;
    store.record_prompts(all).context("recording the split")?;
    write_split(config, all)?;
    Ok(store)
}

/// Each source's endpoints (one, or its replicas), after asking every
/// endpoint a source uses whether it answers: one that does not is
/// warned about, and its samples are recorded as failed.
async fn connect(config: &Config) -> Result<HashMap<String, Arc<Replicas>>> {
    let mut endpoints: HashMap<String, Arc<Endpoint>> = HashMap::new();
    for e in &config.endpoints {
        endpoints.insert(e.name.clone(), Endpoint::new(e)?);
    }
    let replicas = config
        .sources
        .iter()
        .map(|s| {
            let eps = s
                .endpoint_names()
                .into_iter()
                .map(|n| endpoints[n].clone())
                .collect();
            (s.id.clone(), Arc::new(Replicas::new(eps)))
        })
        .collect();
    for (name, e) in &endpoints {
        if config
            .sources
            .iter()
            .any(|s| s.endpoint_names().contains(&name.as_str()))
        {
            if let Err(msg) = e.check().await {
                tracing::warn!("endpoint `{name}`: {msg}; its samples will be recorded as failed");
                eprintln!("fusechat sample: warning: endpoint `{name}`: {msg}");
            }
        }
    }
    Ok(replicas)
}

/// The samples still to request, in the order to request them, and how
/// many the config plans in all. A stored sample made with another request
/// than the config sends now is refused or resampled (`on_change`).
fn pending_jobs(config: &Config, train: &[Prompt], store: &Store) -> Result<(Vec<Job>, usize)> {
    let done = store.done_requests(config.sampling.retry_failed)?;
    let mut jobs = Vec::new();
    let mut stale: Vec<(SampleKey, Vec<String>)> = Vec::new();
    let mut planned = 0;
    for (p, s, idx) in plan(config, train) {
        planned += 1;
        let key = (p.id.clone(), s.id.clone(), idx);
        match done.get(&key) {
            None => jobs.push((p.clone(), s.clone(), idx)),
            Some(stored) => {
                // Through the same JSON text and parser as the stored one.
                let now: Value =
                    serde_json::from_str(&request_body(config, s, p, idx).to_string())?;
                let fields = changed_fields(stored, &now);
                if !fields.is_empty() {
                    let shown = fields
                        .iter()
                        .map(|f| match f.as_str() {
                            "messages" => "messages (the prompt text)".to_string(),
                            f => format!("{f}: {} -> {}", show(&stored[f]), show(&now[f])),
                        })
                        .collect();
                    stale.push((key, shown));
                    jobs.push((p.clone(), s.clone(), idx));
                }
            }
        }
    }
    if !stale.is_empty() {
        drop_stale(config, store, &stale)?;
    }
    if config.sampling.order == SampleOrder::Source {
        // Stable: within a source, prompts keep their order.
        let rank = |id: &str| config.sources.iter().position(|s| s.id == id);
        jobs.sort_by_key(|(_, s, _)| rank(&s.id));
    }
    Ok((jobs, planned))
}

/// Samples made with another request than the config sends now: an error
/// (`on_change = "refuse"`), or deleted with their scores to be requested
/// again (`"resample"`).
fn drop_stale(config: &Config, store: &Store, stale: &[(SampleKey, Vec<String>)]) -> Result<()> {
    let ((prompt, source, idx), first) = &stale[0];
    let first = format!("{prompt} / {source} / {idx}: {}", first.join(", "));
    let keys: Vec<SampleKey> = stale.iter().map(|(k, _)| k.clone()).collect();
    match config.sampling.on_change {
        OnChange::Refuse => Err(DataError::Stage(format!(
            "{} sample(s) in {} were made with another request than this config sends now \
             (the first, {first}); nothing was sent. Sample into a new folder (`run.output`), \
             restore the old settings, or set `on_change = \"resample\"` in [sampling] \
             to delete those samples and their scores and request them again",
            keys.len(),
            config.store_path().display(),
        ))),
        OnChange::Resample => {
            store
                .delete_samples(&keys)
                .context("deleting samples made with an older request")?;
            eprintln!(
                "fusechat sample: {} sample(s) were made with another request (the first, {first}); \
                 deleted with their scores, requesting them again",
                keys.len()
            );
            Ok(())
        }
    }
}

fn progress_bar(config: &Config, len: usize) -> indicatif::ProgressBar {
    let bar = if config.sampling.progress {
        indicatif::ProgressBar::new(len as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} responses  {per_sec}  ETA {eta}  {msg}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    bar
}

/// Requests every job and stores each answer as it comes back; returns the
/// last failure's message.
///
/// Source order: one source at a time. Its requests go out up to its
/// endpoint's concurrency, and the next source's first request only once
/// the last one of the previous source has come back, so the models really
/// take turns (two models decoding at once on one machine share it).
/// Prompt order: everything is queued at once and each endpoint's own
/// limit applies (in the client).
async fn request_all(
    config: &Config,
    jobs: Vec<Job>,
    replicas: &HashMap<String, Arc<Replicas>>,
    store: &Store,
    summary: &mut SampleSummary,
) -> Result<Option<String>> {
    let bar = progress_bar(config, jobs.len());
    let one_source_at_a_time = config.sampling.order == SampleOrder::Source;
    let mut queue = jobs.into_iter().peekable();
    let mut running: Option<String> = None;
    let mut set = tokio::task::JoinSet::new();
    let mut spawn_next = |set: &mut tokio::task::JoinSet<Answered>| {
        let Some((_, next, _)) = queue.peek() else {
            return false;
        };
        if one_source_at_a_time {
            let same_source = running.as_deref() == Some(next.id.as_str());
            let limit = replicas[&next.id].concurrency();
            if !set.is_empty() && (!same_source || set.len() >= limit) {
                return false;
            }
        }
        let Some((p, s, idx)) = queue.next() else {
            return false;
        };
        running = Some(s.id.clone());
        let ep = replicas[&s.id].clone();
        let body = request_body(config, &s, &p, idx);
        set.spawn(async move {
            let answer = ep.chat(&body).await;
            Answered {
                prompt_id: p.id,
                source: s.id,
                idx,
                request: body,
                answer,
            }
        });
        true
    };
    while spawn_next(&mut set) {}
    let mut last_error = None;
    while let Some(joined) = set.join_next().await {
        while spawn_next(&mut set) {}
        let answered = joined.context("a sampling task panicked")?;
        if let Err(f) = &answered.answer {
            last_error = Some(f.to_string());
        }
        let rec = count(summary, answered);
        store
            .put_sample(&rec)
            .context("writing a sample to the store")?;
        bar.inc(1);
        if summary.failed > 0 {
            bar.set_message(format!("{} failed", summary.failed));
        }
    }
    bar.finish();
    Ok(last_error)
}

/// Counts an answer in the summary and turns it into its store record.
fn count(summary: &mut SampleSummary, answered: Answered) -> SampleRecord {
    let Answered {
        prompt_id,
        source,
        idx,
        request,
        answer,
    } = answered;
    let stats = summary.per_source.entry(source.clone()).or_default();
    match answer {
        Ok(resp) => {
            summary.ok += 1;
            stats.ok += 1;
            let ct = resp.completion_tokens.unwrap_or(0);
            summary.completion_tokens += ct;
            stats.completion_tokens += ct;
            if resp.finish_reason.as_deref() == Some("length") {
                summary.truncated += 1;
            }
            if resp.text.trim().is_empty() {
                summary.empty += 1;
            }
            SampleRecord {
                prompt_id,
                source,
                idx,
                ok: true,
                request,
                text: Some(resp.text),
                finish_reason: resp.finish_reason,
                prompt_tokens: resp.prompt_tokens,
                completion_tokens: resp.completion_tokens,
                latency_ms: resp.latency.as_millis() as u64,
                attempts: resp.attempts,
                error: None,
            }
        }
        Err(f) => {
            summary.failed += 1;
            stats.failed += 1;
            SampleRecord {
                prompt_id,
                source,
                idx,
                ok: false,
                request,
                text: None,
                finish_reason: None,
                prompt_tokens: None,
                completion_tokens: None,
                latency_ms: 0,
                attempts: f.attempts,
                error: Some(f.message),
            }
        }
    }
}

/// The summary's rates, written to `sample_stats.json` and told on stderr.
fn finish(config: &Config, mut summary: SampleSummary, elapsed: f64, last_error: Option<String>) -> Result<SampleSummary> {
    summary.elapsed_s = elapsed;
    if elapsed > 0.0 {
        summary.responses_per_s = summary.ok as f64 / elapsed;
        summary.tokens_per_s = summary.completion_tokens as f64 / elapsed;
    }
    let out = config.output_dir();
    std::fs::write(
        out.join("sample_stats.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    eprintln!(
        "fusechat sample: {} ok ({} cut by the length limit, {} empty), {} failed, in {:.1}s: {:.2} responses/s, {:.1} tokens/s",
        summary.ok, summary.truncated, summary.empty, summary.failed, elapsed, summary.responses_per_s, summary.tokens_per_s
    );
    if let Some(e) = last_error {
        eprintln!("fusechat sample: last failure: {e}");
    }
    Ok(summary)
}
