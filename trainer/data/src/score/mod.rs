//! `fusechat score`: run the configured scorers over every successful sample
//! that lacks their score, writing each score next to the sample. A scorer
//! that fails (judge without a rating, reward endpoint down, sandbox broken)
//! leaves a NULL score with the reason, retried by the next run.

pub mod code;
pub mod judge;
pub mod latex;
pub mod math;
pub mod reference;
pub mod reward;

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{DataError, Result};
use futures::StreamExt;
use serde::Serialize;

use crate::client::Endpoint;
use crate::config::{Config, Domain, JudgeConfig};
use crate::prompts::Side;
use crate::store::{Sample, ScoreRecord, Store, StoredPrompt};

#[derive(Debug, Default, Clone, Serialize)]
pub struct ScoreSummary {
    pub scored: HashMap<String, usize>,
    pub failed: HashMap<String, usize>,
}

enum Task {
    Math(Sample),
    Reference(Sample, String),
    Code(Sample),
    Judge(Sample),
    Reward(String, Vec<Sample>),
}

pub async fn run(config: &Config) -> Result<ScoreSummary> {
    let store = Store::open(&config.store_path())?;
    store.check_split_rule()?;
    let prompts: HashMap<String, StoredPrompt> = store
        .prompts(Some(Side::Train))?
        .into_iter()
        .map(|p| (p.id.clone(), p))
        .collect();
    if prompts.is_empty() {
        return Err(DataError::Stage(format!(
            "the store {} holds no prompts: run `fusechat sample` first",
            config.store_path().display()
        )));
    }
    let tasks = missing_scores(config, &prompts, &store)?;
    eprintln!("fusechat score: {} scoring tasks", tasks.len());
    let bar = progress_bar(config, tasks.len());
    let scorers = Arc::new(Scorers::new(config, prompts)?);
    let results = futures::stream::iter(tasks.into_iter().map(|task| {
        let scorers = scorers.clone();
        async move { scorers.score(task).await }
    }))
    .buffer_unordered(config.scoring.concurrency.max(1));
    futures::pin_mut!(results);
    let mut summary = ScoreSummary::default();
    let mut last_failure = None;
    while let Some(batch) = results.next().await {
        for (s, rec) in batch {
            store.put_score(&s.prompt_id, &s.source, s.idx, &rec)?;
            if rec.score.is_some() {
                *summary.scored.entry(rec.scorer.clone()).or_default() += 1;
            } else {
                *summary.failed.entry(rec.scorer.clone()).or_default() += 1;
                last_failure = Some(format!(
                    "{} on {}/{}/{}: {}",
                    rec.scorer, s.prompt_id, s.source, s.idx, rec.detail
                ));
            }
        }
        bar.inc(1);
    }
    bar.finish();
    tell(&summary, last_failure);
    Ok(summary)
}

/// The scoring tasks of every successful sample that lacks a score from a
/// scorer its prompt's domain calls for; reward samples go in groups, one
/// per prompt.
fn missing_scores(config: &Config, prompts: &HashMap<String, StoredPrompt>, store: &Store) -> Result<Vec<Task>> {
    let samples: Vec<Sample> = store.samples()?.into_iter().filter(|s| s.ok).collect();
    let existing = store.scores()?;
    let has = |s: &Sample, scorer: &str| {
        existing
            .get(&(s.prompt_id.clone(), s.source.clone(), s.idx))
            .is_some_and(|v| v.iter().any(|r| r.scorer == scorer && r.score.is_some()))
    };
    let reward_domains = config.scoring.reward.as_ref().map(|r| r.domains.clone());
    let judge_domains = config.scoring.judge.as_ref().map(|j| j.domains.clone());
    let mut tasks = Vec::new();
    let mut reward_groups: HashMap<String, Vec<Sample>> = HashMap::new();
    for s in samples {
        let Some(p) = prompts.get(&s.prompt_id) else {
            continue;
        };
        match p.domain {
            Domain::Math if !has(&s, "math") => tasks.push(Task::Math(s.clone())),
            Domain::Code if !has(&s, "code") => tasks.push(Task::Code(s.clone())),
            _ => {}
        }
        if let Some(r) = &config.scoring.reference {
            let reference = p.gold.get("reference").and_then(|r| r.as_str());
            if let Some(reference) = reference.filter(|_| r.domains.contains(&p.domain)) {
                if !has(&s, "reference") {
                    tasks.push(Task::Reference(s.clone(), reference.to_string()));
                }
            }
        }
        if let Some(ds) = &judge_domains {
            if ds.contains(&p.domain) && !has(&s, "judge") {
                tasks.push(Task::Judge(s.clone()));
            }
        }
        if let Some(ds) = &reward_domains {
            if ds.as_ref().is_none_or(|ds| ds.contains(&p.domain)) && !has(&s, "reward") {
                reward_groups
                    .entry(s.prompt_id.clone())
                    .or_default()
                    .push(s.clone());
            }
        }
    }
    for (pid, group) in reward_groups {
        tasks.push(Task::Reward(pid, group));
    }
    Ok(tasks)
}

fn progress_bar(config: &Config, len: usize) -> indicatif::ProgressBar {
    let bar = if config.sampling.progress {
        indicatif::ProgressBar::new(len as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} scored  {per_sec}  ETA {eta}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    bar
}

/// Each scorer's count on stderr, and the last failure.
fn tell(summary: &ScoreSummary, last_failure: Option<String>) {
    let mut names: Vec<_> = summary
        .scored
        .keys()
        .chain(summary.failed.keys())
        .cloned()
        .collect();
    names.sort();
    names.dedup();
    for n in names {
        eprintln!(
            "fusechat score: {n}: {} scored, {} failed",
            summary.scored.get(&n).unwrap_or(&0),
            summary.failed.get(&n).unwrap_or(&0)
        );
    }
    if let Some(f) = last_failure {
        eprintln!("fusechat score: last failure: {f}");
    }
}

/// What the scorers need: the training prompts, the code sandbox, and the
/// judge and reward model where the config has them.
struct Scorers {
    prompts: HashMap<String, StoredPrompt>,
    sandbox: code::Sandbox,
    judge: Option<(Arc<Endpoint>, JudgeConfig)>,
    reward: Option<reward::RewardClient>,
}

/// A score that carries no pass/fail verdict.
fn graded(scorer: &str, score: Option<f64>, detail: String) -> ScoreRecord {
    ScoreRecord {
        scorer: scorer.into(),
        score,
        passed: None,
        detail,
    }
}

impl Scorers {
    fn new(config: &Config, prompts: HashMap<String, StoredPrompt>) -> Result<Self> {
        let judge = match &config.scoring.judge {
            Some(j) => {
                let endpoint = config.endpoint(&j.endpoint).ok_or_else(|| {
                    DataError::Config(format!("[scoring.judge] names endpoint `{}`, which is not in [[endpoints]]", j.endpoint))
                })?;
                Some((Endpoint::new(endpoint)?, j.clone()))
            }
            None => None,
        };
        let reward = config.scoring.reward.as_ref().map(reward::RewardClient::new).transpose()?;
        Ok(Self {
            prompts,
            sandbox: code::Sandbox::new(&config.scoring.code),
            judge,
            reward,
        })
    }

    /// The scores one task gives (a reward group gives one per sample).
    async fn score(&self, task: Task) -> Vec<(Sample, ScoreRecord)> {
        match task {
            Task::Math(s) => {
                let rec = self.math(&s);
                vec![(s, rec)]
            }
            Task::Reference(s, reference) => {
                let rec = graded("reference", Some(reference::agreement(&s.text, &reference)), String::new());
                vec![(s, rec)]
            }
            Task::Code(s) => {
                let rec = self.code(&s).await;
                vec![(s, rec)]
            }
            Task::Judge(s) => {
                let rec = self.judge(&s).await;
                vec![(s, rec)]
            }
            Task::Reward(pid, group) => self.reward(&pid, group).await,
        }
    }

    fn math(&self, s: &Sample) -> ScoreRecord {
        let gold = self.prompts[&s.prompt_id]
            .gold
            .get("answer")
            .and_then(|a| a.as_str())
            .unwrap_or("")
            .to_string();
        let v = math::check(&s.text, &gold);
        let detail = serde_json::json!({"extracted": v.extracted, "rule": v.rule, "gold": gold}).to_string();
        ScoreRecord {
            scorer: "math".into(),
            score: Some(v.correct as u8 as f64),
            passed: Some(v.correct),
            detail,
        }
    }

    /// A broken sandbox gives no score (retried by the next run), not a fail.
    async fn code(&self, s: &Sample) -> ScoreRecord {
        let v = self
            .sandbox
            .check_response(&s.text, &self.prompts[&s.prompt_id].gold)
            .await;
        let broken = v.reason == "sandbox_error";
        let detail = serde_json::json!({"reason": v.reason, "detail": v.detail}).to_string();
        ScoreRecord {
            scorer: "code".into(),
            score: (!broken).then_some(v.passed as u8 as f64),
            passed: (!broken).then_some(v.passed),
            detail,
        }
    }

    async fn judge(&self, s: &Sample) -> ScoreRecord {
        let (ep, j) = self.judge.as_ref().expect("judge tasks only with [scoring.judge]");
        let q = &self.prompts[&s.prompt_id].text;
        match judge::judge(ep, &j.model, j.max_tokens, q, &s.text).await {
            Ok((v, reply)) => graded("judge", Some(v), reply),
            Err(e) => graded("judge", None, e),
        }
    }

    /// One request for all of a prompt's samples; when it fails, each
    /// sample gets no score and the reason.
    async fn reward(&self, prompt_id: &str, group: Vec<Sample>) -> Vec<(Sample, ScoreRecord)> {
        let reward = self.reward.as_ref().expect("reward tasks only with [scoring.reward]");
        let q = &self.prompts[prompt_id].text;
        let texts: Vec<String> = group.iter().map(|s| s.text.clone()).collect();
        match reward.score(q, &texts).await {
            Ok(scores) => group
                .into_iter()
                .zip(scores)
                .map(|(s, x)| (s, graded("reward", Some(x), String::new())))
                .collect(),
            Err(e) => group
                .into_iter()
                .map(|s| (s, graded("reward", None, e.clone())))
                .collect(),
        }
    }
}
