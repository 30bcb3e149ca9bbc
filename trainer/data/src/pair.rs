//! `fusechat pair`: from the scored store, the SFT and DPO files the trainer
//! reads, and the report.
//!
//! - Training prompts are split into an SFT part and a DPO part by a seeded
//!   hash of their id (paper 4:6); with `pairing.dpo_prompts = "all"` the
//!   DPO pairs come from every training prompt, the SFT part's included
//!   (for runs too small to give up the pairs of the SFT prompts).
//! - SFT: the single best response to a prompt over all sources (correct
//!   first for math and code, then the highest reward, or the judge's rating
//!   where no reward model scored, or the agreement with the prompt's
//!   reference response where neither did). Responses that still tie (every correct
//!   answer, where neither a reward model nor a judge scored) are told apart
//!   by the judge where it scored, else by a seeded hash of (prompt, source,
//!   index), so equally good sources share the rows instead of the first
//!   source in the config taking them all.
//! - DPO: best as chosen and worst as rejected from the same source (math
//!   and code: chosen correct, rejected incorrect), kept only when the reward
//!   gap lies in the window (only where a reward model scored); where several
//!   sources give a pair, the one with the best chosen response.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use crate::error::{DataError, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::{Config, Domain, DpoPrompts};
use crate::prompts::{unit_hash, Side};
use crate::store::{Sample, ScoreRecord, Store, StoredPrompt};

/// One scored response as pairing sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub source: String,
    pub idx: u32,
    pub text: String,
    pub truncated: bool,
    pub passed: Option<bool>,
    pub reward: Option<f64>,
    pub judge: Option<f64>,
    /// Agreement with the prompt's reference response.
    pub reference: Option<f64>,
    /// Breaks exact ties, in [0, 1): [`tiebreak`] of (prompt, source, index).
    pub tiebreak: f64,
}

/// The tie-breaker of a response: a hash of (prompt, source, index) and the
/// pairing seed, uniform in [0, 1).
pub fn tiebreak(seed: u64, prompt_id: &str, source: &str, idx: u32) -> f64 {
    unit_hash(seed, &format!("tie/{prompt_id}/{source}/{idx}"))
}

#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub domain: Domain,
    /// A reward model scored this domain: rank by reward and apply the window.
    pub use_reward: bool,
    /// Without a reward model: the judge rated some response of this prompt,
    /// so the judge ranks (else the agreement with the reference does; the
    /// two scales are never mixed).
    pub use_judge: bool,
    pub window: [f64; 2],
    pub allow_truncated_chosen: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Index of the chosen candidate.
    Sft(usize),
    /// Indices of chosen and rejected.
    Dpo(usize, usize),
    Dropped(String),
}

fn correctness_domain(d: Domain) -> bool {
    matches!(d, Domain::Math | Domain::Code)
}

/// How a candidate ranks, compared field by field: correctness (math and
/// code), the score (the reward, or the judge's rating for instruction
/// without a reward model), the judge's rating as a tie-breaker where it
/// scored, then [`Candidate::tiebreak`].
#[derive(Debug, Clone, Copy)]
struct Key {
    pass: i32,
    score: f64,
    judge: f64,
    tie: f64,
}

/// The ranking key of a candidate, `None` when it is not scored enough to rank.
fn key(c: &Candidate, r: &Rules) -> Option<Key> {
    if c.text.trim().is_empty() {
        return None;
    }
    let (pass, score) = if correctness_domain(r.domain) {
        let p = c.passed?;
        let s = if r.use_reward { c.reward? } else { 0.0 };
        (p as i32, s)
    } else if r.use_reward {
        (0, c.reward?)
    } else {
        // The judge's rating, else the agreement with the reference.
        (0, if r.use_judge { c.judge? } else { c.reference? })
    };
    Some(Key {
        pass,
        score,
        judge: c.judge.unwrap_or(f64::NEG_INFINITY),
        tie: c.tiebreak,
    })
}

/// `a` ranks above `b`, tie-breakers included.
fn better(a: Key, b: Key) -> bool {
    a.pass
        .cmp(&b.pass)
        .then(a.score.total_cmp(&b.score))
        .then(a.judge.total_cmp(&b.judge))
        .then(a.tie.total_cmp(&b.tie))
        .is_gt()
}

/// `a` is better than `b` by what was scored (correctness, then the
/// score), not by a tie-breaker: what a DPO pair needs.
fn scored_better(a: Key, b: Key) -> bool {
    a.pass > b.pass || (a.pass == b.pass && a.score > b.score)
}

fn can_choose(c: &Candidate, r: &Rules) -> bool {
    r.allow_truncated_chosen || !c.truncated
}

/// SFT: the best response over every source.
pub fn pick_sft(cands: &[Candidate], r: &Rules) -> Outcome {
    let ranked: Vec<(usize, Key)> = cands
        .iter()
        .enumerate()
        .filter_map(|(i, c)| key(c, r).map(|k| (i, k)))
        .collect();
    if ranked.is_empty() {
        return Outcome::Dropped("no scored non-empty response".into());
    }
    let mut best: Option<(usize, Key)> = None;
    for &(i, k) in &ranked {
        if !can_choose(&cands[i], r) {
            continue;
        }
        if best.is_none_or(|(_, bk)| better(k, bk)) {
            best = Some((i, k));
        }
    }
    match best {
        None => Outcome::Dropped("every response was cut by the length limit".into()),
        Some((_, k)) if correctness_domain(r.domain) && k.pass == 0 => {
            if ranked.iter().any(|(_, k)| k.pass == 1) {
                Outcome::Dropped("the only correct responses were cut by the length limit".into())
            } else {
                Outcome::Dropped("every response is incorrect".into())
            }
        }
        Some((i, _)) => Outcome::Sft(i),
    }
}

/// DPO: chosen and rejected from the same source.
pub fn pick_dpo(cands: &[Candidate], sources: &[String], r: &Rules) -> Outcome {
    let ranked: Vec<(usize, Key)> = cands
        .iter()
        .enumerate()
        .filter_map(|(i, c)| key(c, r).map(|k| (i, k)))
        .collect();
    if ranked.is_empty() {
        return Outcome::Dropped("no scored non-empty response".into());
    }
    if correctness_domain(r.domain) && ranked.iter().all(|(_, k)| k.pass == 0) {
        return Outcome::Dropped("every response is incorrect".into());
    }
    let mut reasons: Vec<&str> = Vec::new();
    let mut best_pair: Option<(usize, usize, Key)> = None;
    for src in sources {
        let mine: Vec<&(usize, Key)> = ranked
            .iter()
            .filter(|(i, _)| &cands[*i].source == src)
            .collect();
        if mine.len() < 2 {
            continue;
        }
        let mut chosen: Option<(usize, Key)> = None;
        let mut rejected: Option<(usize, Key)> = None;
        for &&(i, k) in &mine {
            if can_choose(&cands[i], r) && chosen.is_none_or(|(_, ck)| better(k, ck)) {
                chosen = Some((i, k));
            }
            if rejected.is_none_or(|(_, rk)| better(rk, k)) {
                rejected = Some((i, k));
            }
        }
        let (Some((ci, ck)), Some((ri, rk))) = (chosen, rejected) else {
            reasons.push("chosen candidates were cut by the length limit");
            continue;
        };
        if ci == ri || !scored_better(ck, rk) {
            reasons.push(if correctness_domain(r.domain) {
                "no source has both a correct and an incorrect response"
            } else {
                "no score difference within a source"
            });
            continue;
        }
        if correctness_domain(r.domain) && !(ck.pass == 1 && rk.pass == 0) {
            reasons.push("no source has both a correct and an incorrect response");
            continue;
        }
        if r.use_reward {
            let gap = cands[ci].reward.unwrap_or(0.0) - cands[ri].reward.unwrap_or(0.0);
            if gap < r.window[0] || gap > r.window[1] {
                reasons.push("reward gap outside the window");
                continue;
            }
        }
        if best_pair.is_none_or(|(_, _, bk)| better(ck, bk)) {
            best_pair = Some((ci, ri, ck));
        }
    }
    match best_pair {
        Some((c, r, _)) => Outcome::Dpo(c, r),
        None if reasons.is_empty() => Outcome::Dropped("no source has two scored responses".into()),
        None => {
            // The most telling reason: the window, then the rest.
            let reason = if reasons.contains(&"reward gap outside the window") {
                "reward gap outside the window"
            } else {
                reasons[0]
            };
            Outcome::Dropped(reason.into())
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct SourceReport {
    pub samples: usize,
    pub failed_requests: usize,
    pub truncated: usize,
    pub scored: usize,
    /// Samples with a math or code verdict.
    pub checked: usize,
    pub passed: usize,
    pub pass_rate: Option<f64>,
    pub mean_reward: Option<f64>,
    pub mean_judge: Option<f64>,
    pub sft_rows: usize,
    pub dpo_pairs: usize,
    #[serde(skip)]
    reward_sum: f64,
    #[serde(skip)]
    reward_n: usize,
    #[serde(skip)]
    judge_sum: f64,
    #[serde(skip)]
    judge_n: usize,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct DomainReport {
    pub prompts: usize,
    pub sft_prompts: usize,
    pub dpo_prompts: usize,
    pub sft_rows: usize,
    pub dpo_pairs: usize,
    pub dropped: BTreeMap<String, usize>,
    pub sources: BTreeMap<String, SourceReport>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub sft_rows: usize,
    pub dpo_pairs: usize,
    pub domains: BTreeMap<String, DomainReport>,
    pub config: Value,
}

fn score_meta(c: &Candidate) -> Value {
    json!({"idx": c.idx, "passed": c.passed, "reward": c.reward, "judge": c.judge, "reference": c.reference, "truncated": c.truncated})
}

fn write_atomic(path: &Path, lines: &[String]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    for l in lines {
        writeln!(f, "{l}")?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

pub fn run(config: &Config) -> Result<Report> {
    let store = Store::open(&config.store_path())?;
    store.check_split_rule()?;
    let prompts: Vec<StoredPrompt> = store.prompts(Some(Side::Train))?;
    if prompts.is_empty() {
        return Err(DataError::Stage(format!(
            "the store {} holds no prompts: run `fusechat sample` first",
            config.store_path().display()
        )));
    }
    // Only what this config samples: a store may hold more (samples of a
    // source since removed, a larger `n`, a pool's larger `limit`).
    let (_, train) = crate::prompts::load_all(config)?;
    let planned: HashSet<crate::store::SampleKey> = crate::sample::plan(config, &train)
        .map(|(p, s, idx)| (p.id.clone(), s.id.clone(), idx))
        .collect();
    let mut samples = store.samples()?;
    let stored = samples.len();
    samples.retain(|s| planned.contains(&(s.prompt_id.clone(), s.source.clone(), s.idx)));
    if samples.len() < stored {
        eprintln!(
            "fusechat pair: {} stored sample(s) are not sampled by this config (another source, `n` or pool `limit`) and are left out",
            stored - samples.len()
        );
    }
    let scores = store.scores()?;
    let (report, sft_lines, dpo_lines) = build(config, &prompts, &samples, &scores)?;

    let out = config.output_dir();
    std::fs::create_dir_all(&out)?;
    write_atomic(&out.join("sft.jsonl"), &sft_lines)?;
    write_atomic(&out.join("dpo.jsonl"), &dpo_lines)?;
    crate::report::write(&out, &report)?;
    eprintln!(
        "fusechat pair: {} SFT rows, {} DPO pairs -> {}",
        report.sft_rows,
        report.dpo_pairs,
        out.display()
    );
    Ok(report)
}

/// The SFT line of a prompt: its best response as the assistant turn.
fn sft_line(p: &StoredPrompt, c: &Candidate) -> String {
    json!({
        "messages": [
            {"role": "user", "content": p.text},
            {"role": "assistant", "content": c.text},
        ],
        "metadata": {"prompt_id": p.id, "domain": p.domain, "source": c.source, "scores": score_meta(c)},
    })
    .to_string()
}

/// The DPO line of a prompt: chosen and rejected, both of one source.
fn dpo_line(p: &StoredPrompt, c: &Candidate, r: &Candidate) -> String {
    json!({
        "prompt": [{"role": "user", "content": p.text}],
        "chosen": [{"role": "assistant", "content": c.text}],
        "rejected": [{"role": "assistant", "content": r.text}],
        "metadata": {
            "prompt_id": p.id, "domain": p.domain, "source": c.source,
            "scores": {"chosen": score_meta(c), "rejected": score_meta(r)},
        },
    })
    .to_string()
}

type Scores = HashMap<crate::store::SampleKey, Vec<ScoreRecord>>;

/// The pairing of what the store holds: the report and the SFT and DPO
/// lines. Linear in the samples: they are grouped by prompt once.
fn build(
    config: &Config,
    prompts: &[StoredPrompt],
    samples: &[Sample],
    scores: &Scores,
) -> Result<(Report, Vec<String>, Vec<String>)> {
    let sources: Vec<String> = config.sources.iter().map(|s| s.id.clone()).collect();
    let mut report = Report {
        config: serde_json::to_value(&config.pairing)?,
        ..Default::default()
    };
    let (mut by_prompt, sampled) = candidates(config, prompts, samples, scores, &mut report);
    let reward_domains = config.scoring.reward.as_ref().map(|r| r.domains.clone());
    let mut sft_lines = Vec::new();
    let mut dpo_lines = Vec::new();
    for p in prompts {
        // Prompts never sampled (e.g. beyond a pool's limit) are not counted.
        if !sampled.contains(p.id.as_str()) {
            continue;
        }
        let dr = report.domains.entry(p.domain.as_str().into()).or_default();
        let cands = by_prompt.remove(p.id.as_str()).unwrap_or_default();
        dr.prompts += 1;
        let rules = Rules {
            domain: p.domain,
            use_reward: reward_domains
                .as_ref()
                .is_some_and(|ds| ds.as_ref().is_none_or(|ds| ds.contains(&p.domain))),
            window: config.pairing.window,
            allow_truncated_chosen: config.pairing.allow_truncated_chosen,
            use_judge: cands.iter().any(|c| c.judge.is_some()),
        };
        let sft_side =
            unit_hash(config.pairing.seed, &format!("sft/{}", p.id)) < config.pairing.sft_fraction;
        let dpo_side = !sft_side || config.pairing.dpo_prompts == DpoPrompts::All;
        if sft_side {
            dr.sft_prompts += 1;
            let outcome = match cands.is_empty() {
                true => Outcome::Dropped("no successful response".into()),
                false => pick_sft(&cands, &rules),
            };
            match outcome {
                Outcome::Sft(i) => {
                    let c = &cands[i];
                    sft_lines.push(sft_line(p, c));
                    dr.sft_rows += 1;
                    dr.sources.entry(c.source.clone()).or_default().sft_rows += 1;
                }
                Outcome::Dropped(reason) => {
                    *dr.dropped.entry(format!("sft: {reason}")).or_default() += 1
                }
                Outcome::Dpo(..) => unreachable!("pick_sft gives SFT rows"),
            }
        }
        if dpo_side {
            dr.dpo_prompts += 1;
            let outcome = match cands.is_empty() {
                true => Outcome::Dropped("no successful response".into()),
                false => pick_dpo(&cands, &sources, &rules),
            };
            match outcome {
                Outcome::Dpo(ci, ri) => {
                    dpo_lines.push(dpo_line(p, &cands[ci], &cands[ri]));
                    dr.dpo_pairs += 1;
                    dr.sources
                        .entry(cands[ci].source.clone())
                        .or_default()
                        .dpo_pairs += 1;
                }
                Outcome::Dropped(reason) => {
                    *dr.dropped.entry(format!("dpo: {reason}")).or_default() += 1
                }
                Outcome::Sft(_) => unreachable!("pick_dpo gives pairs"),
            }
        }
    }
    add_up(&mut report);
    Ok((report, sft_lines, dpo_lines))
}

/// Each prompt's successful samples as candidates with their scores, and
/// the prompts with any sample (failed ones included); counts each
/// source's samples in the report as it goes.
fn candidates<'a>(
    config: &Config,
    prompts: &'a [StoredPrompt],
    samples: &'a [Sample],
    scores: &Scores,
    report: &mut Report,
) -> (HashMap<&'a str, Vec<Candidate>>, HashSet<&'a str>) {
    let mut by_prompt: HashMap<&str, Vec<Candidate>> = HashMap::new();
    let mut sampled: HashSet<&str> = HashSet::new();
    let domain_of: HashMap<&str, Domain> =
        prompts.iter().map(|p| (p.id.as_str(), p.domain)).collect();
    for s in samples {
        let Some(&domain) = domain_of.get(s.prompt_id.as_str()) else {
            continue;
        };
        sampled.insert(s.prompt_id.as_str());
        let dr = report.domains.entry(domain.as_str().into()).or_default();
        let sr = dr.sources.entry(s.source.clone()).or_default();
        if !s.ok {
            sr.failed_requests += 1;
            continue;
        }
        sr.samples += 1;
        sr.truncated += s.truncated as usize;
        let recs = scores.get(&(s.prompt_id.clone(), s.source.clone(), s.idx));
        let get = |name: &str| {
            recs.and_then(|v| v.iter().find(|r| r.scorer == name && r.score.is_some()))
        };
        let passed = get("math").or_else(|| get("code")).and_then(|r| r.passed);
        let reward = get("reward").and_then(|r| r.score);
        let judge = get("judge").and_then(|r| r.score);
        let reference = get("reference").and_then(|r| r.score);
        if let Some(p) = passed {
            sr.scored += 1;
            sr.checked += 1;
            sr.passed += p as usize;
        } else if reward.is_some() || judge.is_some() || reference.is_some() {
            sr.scored += 1;
        }
        if let Some(x) = reward {
            sr.reward_sum += x;
            sr.reward_n += 1;
        }
        if let Some(x) = judge {
            sr.judge_sum += x;
            sr.judge_n += 1;
        }
        by_prompt
            .entry(s.prompt_id.as_str())
            .or_default()
            .push(Candidate {
                source: s.source.clone(),
                idx: s.idx,
                text: s.text.clone(),
                truncated: s.truncated,
                passed,
                reward,
                judge,
                reference,
                tiebreak: tiebreak(config.pairing.seed, &s.prompt_id, &s.source, s.idx),
            });
    }

    (by_prompt, sampled)
}

/// Each source's rates, and the report's totals over its domains.
fn add_up(report: &mut Report) {
    for dr in report.domains.values_mut() {
        for sr in dr.sources.values_mut() {
            sr.pass_rate = (sr.checked > 0).then(|| sr.passed as f64 / sr.checked as f64);
            sr.mean_reward = (sr.reward_n > 0).then(|| sr.reward_sum / sr.reward_n as f64);
            sr.mean_judge = (sr.judge_n > 0).then(|| sr.judge_sum / sr.judge_n as f64);
        }
        report.sft_rows += dr.sft_rows;
        report.dpo_pairs += dr.dpo_pairs;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(
        source: &str,
        idx: u32,
        passed: Option<bool>,
        reward: Option<f64>,
        judge: Option<f64>,
    ) -> Candidate {
        Candidate {
            source: source.into(),
            idx,
            text: format!("{source}-{idx}"),
            truncated: false,
            passed,
            reward,
            judge,
            reference: None,
            tiebreak: 0.0,
        }
    }

    fn rules(domain: Domain, use_reward: bool) -> Rules {
        Rules {
            domain,
            use_reward,
            window: [0.01, 0.1],
            allow_truncated_chosen: false,
            use_judge: true,
        }
    }

    fn srcs() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    #[test]
    fn sft_takes_the_best_correct_response() {
        let r = rules(Domain::Math, false);
        let cs = vec![
            c("a", 0, Some(false), None, None),
            c("b", 0, Some(true), None, None),
            c("b", 1, Some(false), None, None),
        ];
        assert_eq!(pick_sft(&cs, &r), Outcome::Sft(1));
        // With a reward model: correct first, then the highest reward.
        let r = rules(Domain::Math, true);
        let cs = vec![
            c("a", 0, Some(false), Some(0.9), None),
            c("a", 1, Some(true), Some(0.2), None),
            c("b", 0, Some(true), Some(0.5), None),
        ];
        assert_eq!(pick_sft(&cs, &r), Outcome::Sft(2));
        // Nothing correct: dropped.
        let cs = vec![c("a", 0, Some(false), Some(0.9), None)];
        assert_eq!(
            pick_sft(&cs, &r),
            Outcome::Dropped("every response is incorrect".into())
        );
        // Instruction ranks by the judge without a reward model.
        let r = rules(Domain::Instruction, false);
        let cs = vec![
            c("a", 0, None, None, Some(4.0)),
            c("b", 0, None, None, Some(8.0)),
            c("b", 1, None, None, None),
        ];
        assert_eq!(pick_sft(&cs, &r), Outcome::Sft(1));
    }

    #[test]
    fn truncated_and_empty_responses_are_never_chosen() {
        let r = rules(Domain::Math, false);
        let mut t = c("a", 0, Some(true), None, None);
        t.truncated = true;
        let cs = vec![t.clone(), c("a", 1, Some(false), None, None)];
        assert!(matches!(pick_sft(&cs, &r), Outcome::Dropped(m) if m.contains("length limit")));
        assert!(matches!(pick_dpo(&cs, &srcs(), &r), Outcome::Dropped(_)));
        let mut e = c("a", 2, Some(true), None, None);
        e.text = "  ".into();
        assert_eq!(
            pick_sft(&[e], &r),
            Outcome::Dropped("no scored non-empty response".into())
        );
        // A truncated response may still be the rejected one.
        let mut bad = c("a", 1, Some(false), None, None);
        bad.truncated = true;
        assert_eq!(
            pick_dpo(&[c("a", 0, Some(true), None, None), bad], &srcs(), &r),
            Outcome::Dpo(0, 1)
        );
    }

    #[test]
    fn dpo_pairs_come_from_one_source() {
        let r = rules(Domain::Math, false);
        // a: one correct, b: one incorrect -> no same-source pair.
        let cs = vec![
            c("a", 0, Some(true), None, None),
            c("b", 0, Some(false), None, None),
        ];
        assert_eq!(
            pick_dpo(&cs, &srcs(), &r),
            Outcome::Dropped("no source has two scored responses".into())
        );
        let cs = vec![
            c("a", 0, Some(true), None, None),
            c("a", 1, Some(true), None, None),
            c("b", 0, Some(false), None, None),
            c("b", 1, Some(true), None, None),
        ];
        assert_eq!(pick_dpo(&cs, &srcs(), &r), Outcome::Dpo(3, 2));
        // All correct within every source: dropped, with the reason.
        let cs = vec![
            c("a", 0, Some(true), None, None),
            c("a", 1, Some(true), None, None),
        ];
        assert_eq!(
            pick_dpo(&cs, &srcs(), &r),
            Outcome::Dropped("no source has both a correct and an incorrect response".into())
        );
        // Everything wrong.
        let cs = vec![
            c("a", 0, Some(false), None, None),
            c("a", 1, Some(false), None, None),
        ];
        assert_eq!(
            pick_dpo(&cs, &srcs(), &r),
            Outcome::Dropped("every response is incorrect".into())
        );
    }

    #[test]
    fn the_reward_window_applies_only_with_a_reward_model() {
        let r = rules(Domain::Instruction, true);
        let cs = vec![
            c("a", 0, None, Some(0.50), None),
            c("a", 1, None, Some(0.55), None),
        ];
        assert_eq!(pick_dpo(&cs, &srcs(), &r), Outcome::Dpo(1, 0));
        let cs = vec![
            c("a", 0, None, Some(0.10), None),
            c("a", 1, None, Some(0.60), None),
        ];
        assert_eq!(
            pick_dpo(&cs, &srcs(), &r),
            Outcome::Dropped("reward gap outside the window".into())
        );
        let cs = vec![
            c("a", 0, None, Some(0.500), None),
            c("a", 1, None, Some(0.505), None),
        ];
        assert_eq!(
            pick_dpo(&cs, &srcs(), &r),
            Outcome::Dropped("reward gap outside the window".into())
        );
        // The judge has no window: any strict difference pairs.
        let r = rules(Domain::Instruction, false);
        let cs = vec![
            c("a", 0, None, None, Some(2.0)),
            c("a", 1, None, None, Some(9.0)),
        ];
        assert_eq!(pick_dpo(&cs, &srcs(), &r), Outcome::Dpo(1, 0));
        let cs = vec![
            c("a", 0, None, None, Some(5.0)),
            c("a", 1, None, None, Some(5.0)),
        ];
        assert_eq!(
            pick_dpo(&cs, &srcs(), &r),
            Outcome::Dropped("no score difference within a source".into())
        );
        // Code with a reward model: correctness and the window together;
        // source b's pair fails the window, source a's passes.
        let r = rules(Domain::Code, true);
        let cs = vec![
            c("a", 0, Some(true), Some(0.40), None),
            c("a", 1, Some(false), Some(0.35), None),
            c("b", 0, Some(true), Some(0.90), None),
            c("b", 1, Some(false), Some(0.10), None),
        ];
        assert_eq!(pick_dpo(&cs, &srcs(), &r), Outcome::Dpo(0, 1));
    }

    #[test]
    fn ties_are_broken_by_the_judge_when_it_scored() {
        // Math without a reward model: both correct, the judge prefers b.
        let r = rules(Domain::Math, false);
        let cs = vec![
            c("a", 0, Some(true), None, Some(3.0)),
            c("b", 0, Some(true), None, Some(8.0)),
        ];
        assert_eq!(pick_sft(&cs, &r), Outcome::Sft(1));
        let cs = vec![
            c("a", 0, Some(true), None, Some(9.0)),
            c("b", 0, Some(true), None, Some(8.0)),
        ];
        assert_eq!(pick_sft(&cs, &r), Outcome::Sft(0));
        // Correctness still comes first.
        let cs = vec![
            c("a", 0, Some(false), None, Some(10.0)),
            c("b", 0, Some(true), None, Some(1.0)),
        ];
        assert_eq!(pick_sft(&cs, &r), Outcome::Sft(1));
    }

    /// A store of `n` math prompts where sources `a` and `b` each answer
    /// every prompt once, correctly, with no reward model and no judge.
    fn tied_run(n: usize, sft_fraction: f64) -> Report {
        tied_run_with(n, sft_fraction, "rest")
    }

    fn tied_run_with(n: usize, sft_fraction: f64, dpo_prompts: &str) -> Report {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"
[run]
output = "{out}"
[prompts]
data_dir = "."
eval_fraction = 0.0
[[pools]]
name = "m"
domain = "math"
format = "jsonl"
file = "m.jsonl"
[[endpoints]]
name = "e"
base_url = "http://127.0.0.1:9/v1"
[[sources]]
id = "a"
endpoint = "e"
[[sources]]
id = "b"
endpoint = "e"
[sampling]
n = {{ math = 2 }}
[pairing]
sft_fraction = {sft_fraction}
dpo_prompts = "{dpo_prompts}"
"#,
            out = dir.path().join("out").display()
        );
        let pool: String = (0..n)
            .map(|i| format!("{}\n", json!({"id": i, "prompt": format!("What is {i} + 1?"), "answer": (i + 1).to_string()})))
            .collect();
        std::fs::write(dir.path().join("m.jsonl"), pool).unwrap();
        let config = Config::parse(&text, dir.path()).unwrap();
        let store = Store::open(&config.store_path()).unwrap();
        let (prompts, _) = crate::prompts::load_all(&config).unwrap();
        assert_eq!(prompts.len(), n);
        store.record_prompts(&prompts).unwrap();
        for p in &prompts {
            for (src, idx, ok) in [
                ("a", 0, true),
                ("a", 1, false),
                ("b", 0, true),
                ("b", 1, false),
            ] {
                store
                    .put_sample(&crate::store::SampleRecord {
                        prompt_id: p.id.clone(),
                        source: src.into(),
                        idx,
                        ok: true,
                        request: json!({}),
                        text: Some(format!("{src} says {}", if ok { "right" } else { "wrong" })),
                        finish_reason: Some("stop".into()),
                        prompt_tokens: None,
                        completion_tokens: None,
                        latency_ms: 1,
                        attempts: 1,
                        error: None,
                    })
                    .unwrap();
                store
                    .put_score(
                        &p.id,
                        src,
                        idx,
                        &crate::store::ScoreRecord {
                            scorer: "math".into(),
                            score: Some(ok as i32 as f64),
                            passed: Some(ok),
                            detail: String::new(),
                        },
                    )
                    .unwrap();
            }
        }
        run(&config).unwrap()
    }

    #[test]
    fn equally_correct_sources_share_the_rows() {
        let report = tied_run(120, 1.0);
        let math = &report.domains["math"];
        assert_eq!(math.sft_rows, 120);
        let (a, b) = (math.sources["a"].sft_rows, math.sources["b"].sft_rows);
        assert!(a >= 30 && b >= 30, "SFT rows: a {a}, b {b}");
        // DPO: both sources have a correct/incorrect pair on every prompt.
        let report = tied_run(120, 0.0);
        let math = &report.domains["math"];
        assert_eq!(math.dpo_pairs, 120);
        let (a, b) = (math.sources["a"].dpo_pairs, math.sources["b"].dpo_pairs);
        assert!(a >= 30 && b >= 30, "DPO pairs: a {a}, b {b}");
        // Deterministic: the same store pairs the same way.
        let again = tied_run(120, 0.0);
        assert_eq!(again.domains["math"].sources["a"].dpo_pairs, a);
    }

    #[test]
    fn instruction_ranks_by_the_reference_where_no_judge_scored() {
        let with_ref = |idx, x| Candidate {
            reference: Some(x),
            ..c("a", idx, None, None, None)
        };
        let r = Rules {
            use_judge: false,
            ..rules(Domain::Instruction, false)
        };
        let cands = [with_ref(0, 0.2), with_ref(1, 0.6), with_ref(2, 0.1)];
        assert_eq!(pick_sft(&cands, &r), Outcome::Sft(1));
        assert_eq!(pick_dpo(&cands, &srcs(), &r), Outcome::Dpo(1, 2));
        // The judge's rating, where it scored, comes first.
        let judged = [
            Candidate {
                judge: Some(9.0),
                ..with_ref(0, 0.2)
            },
            Candidate {
                judge: Some(3.0),
                ..with_ref(1, 0.6)
            },
        ];
        assert_eq!(
            pick_sft(&judged, &rules(Domain::Instruction, false)),
            Outcome::Sft(0)
        );
    }

    #[test]
    fn dpo_from_every_prompt_keeps_the_sft_split() {
        let split = tied_run_with(100, 0.4, "rest");
        let all = tied_run_with(100, 0.4, "all");
        let (s, a) = (&split.domains["math"], &all.domains["math"]);
        // The SFT side is the same prompts either way.
        assert_eq!(a.sft_prompts, s.sft_prompts);
        assert_eq!(a.sft_rows, s.sft_rows);
        assert!(s.sft_rows > 20 && s.sft_rows < 60, "{}", s.sft_rows);
        // Split: each prompt feeds one stage; all: every prompt gives a pair.
        assert_eq!(s.sft_prompts + s.dpo_prompts, 100);
        assert_eq!(s.dpo_pairs, 100 - s.sft_rows);
        assert_eq!(a.dpo_prompts, 100);
        assert_eq!(a.dpo_pairs, 100);
    }

    #[test]
    fn pairing_is_linear_in_the_prompts() {
        // 100k prompts with one sample each: grouping per prompt takes well
        // under a second; scanning every sample per prompt takes minutes.
        let n = 100_000;
        let config = Config::load(None).unwrap();
        let prompts: Vec<StoredPrompt> = (0..n)
            .map(|i| StoredPrompt {
                id: format!("m/{i:06}"),
                pool: "m".into(),
                domain: Domain::Math,
                side: Side::Train,
                text: "q".into(),
                gold: json!({"answer": "1"}),
            })
            .collect();
        let samples: Vec<Sample> = (0..n)
            .map(|i| Sample {
                prompt_id: format!("m/{i:06}"),
                source: "a".into(),
                idx: 0,
                ok: true,
                text: "1".into(),
                finish_reason: Some("stop".into()),
                truncated: false,
                completion_tokens: None,
                error: None,
            })
            .collect();
        let t = std::time::Instant::now();
        let (report, sft, dpo) = build(&config, &prompts, &samples, &Scores::new()).unwrap();
        let took = t.elapsed();
        assert_eq!(report.domains["math"].prompts, n);
        assert!(sft.is_empty() && dpo.is_empty());
        assert!(
            took < std::time::Duration::from_secs(5),
            "pairing took {took:?}"
        );
    }
}
