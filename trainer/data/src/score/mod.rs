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
use crate::config::{Config, Domain};
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
    let store = Arc::new(Store::open(&config.store_path())?);
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
    eprintln!("fusechat score: {} scoring tasks", tasks.len());

    let sandbox = Arc::new(code::Sandbox::new(&config.scoring.code));
    let judge_ep = match &config.scoring.judge {
        Some(j) => Some(Endpoint::new(config.endpoint(&j.endpoint).unwrap())?),
        None => None,
    };
    let reward = match &config.scoring.reward {
        Some(r) => Some(Arc::new(reward::RewardClient::new(r)?)),
        None => None,
    };
    let prompts = Arc::new(prompts);
    let bar = if config.sampling.progress {
        indicatif::ProgressBar::new(tasks.len() as u64)
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

    let judge_cfg = config.scoring.judge.clone();
    let results = futures::stream::iter(tasks.into_iter().map(|t| {
        let sandbox = sandbox.clone();
        let prompts = prompts.clone();
        let judge_ep = judge_ep.clone();
        let judge_cfg = judge_cfg.clone();
        let reward = reward.clone();
        async move {
            let mut out: Vec<(Sample, ScoreRecord)> = Vec::new();
            match t {
                Task::Math(s) => {
                    let gold = prompts[&s.prompt_id]
                        .gold
                        .get("answer")
                        .and_then(|a| a.as_str())
                        .unwrap_or("")
                        .to_string();
                    let v = math::check(&s.text, &gold);
                    let detail =
                        serde_json::json!({"extracted": v.extracted, "rule": v.rule, "gold": gold})
                            .to_string();
                    out.push((
                        s,
                        ScoreRecord {
                            scorer: "math".into(),
                            score: Some(v.correct as u8 as f64),
                            passed: Some(v.correct),
                            detail,
                        },
                    ));
                }
                Task::Reference(s, reference) => {
                    let score = reference::agreement(&s.text, &reference);
                    out.push((
                        s,
                        ScoreRecord {
                            scorer: "reference".into(),
                            score: Some(score),
                            passed: None,
                            detail: String::new(),
                        },
                    ));
                }
                Task::Code(s) => {
                    let v = sandbox
                        .check_response(&s.text, &prompts[&s.prompt_id].gold)
                        .await;
                    let broken = v.reason == "sandbox_error";
                    let detail =
                        serde_json::json!({"reason": v.reason, "detail": v.detail}).to_string();
                    out.push((
                        s,
                        ScoreRecord {
                            scorer: "code".into(),
                            score: (!broken).then_some(v.passed as u8 as f64),
                            passed: (!broken).then_some(v.passed),
                            detail,
                        },
                    ));
                }
                Task::Judge(s) => {
                    let j = judge_cfg.as_ref().unwrap();
                    let ep = judge_ep.as_ref().unwrap();
                    let q = &prompts[&s.prompt_id].text;
                    let rec = match judge::judge(ep, &j.model, j.max_tokens, q, &s.text).await {
                        Ok((v, reply)) => ScoreRecord {
                            scorer: "judge".into(),
                            score: Some(v),
                            passed: None,
                            detail: reply,
                        },
                        Err(e) => ScoreRecord {
                            scorer: "judge".into(),
                            score: None,
                            passed: None,
                            detail: e,
                        },
                    };
                    out.push((s, rec));
                }
                Task::Reward(pid, group) => {
                    let q = &prompts[&pid].text;
                    let texts: Vec<String> = group.iter().map(|s| s.text.clone()).collect();
                    match reward.as_ref().unwrap().score(q, &texts).await {
                        Ok(scores) => {
                            for (s, x) in group.into_iter().zip(scores) {
                                out.push((
                                    s,
                                    ScoreRecord {
                                        scorer: "reward".into(),
                                        score: Some(x),
                                        passed: None,
                                        detail: String::new(),
                                    },
                                ));
                            }
                        }
                        Err(e) => {
                            for s in group {
                                out.push((
                                    s,
                                    ScoreRecord {
                                        scorer: "reward".into(),
                                        score: None,
                                        passed: None,
                                        detail: e.clone(),
                                    },
                                ));
                            }
                        }
                    }
                }
            }
            out
        }
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
    Ok(summary)
}
