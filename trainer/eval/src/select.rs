//! Which prompts are evaluated: for each pool named in `[sizes]`, `n`
//! prompts drawn from the pool's EVALUATION side (the data config's split
//! by normalised question text and seed), ordered by a seeded hash of
//! their id so the draw is stable when the size grows. A prompt of the
//! training side is refused, checked twice: by the side the data crate
//! assigned and by recomputing the split, and against the set of prompts
//! the data builder trains on.

use std::collections::{BTreeMap, HashSet};

use fusechat_data::config::{Config, Domain};
use fusechat_data::prompts::{self, Prompt, Side};

use crate::error::{EvalError, Result};

/// The selected prompts, pool by pool, in the order of `sizes`.
#[derive(Debug, Clone)]
pub struct Selection {
    pub prompts: Vec<Prompt>,
    /// Pools whose evaluation side holds fewer prompts than asked for:
    /// (pool, asked, available).
    pub short: Vec<(String, usize, usize)>,
}

/// Refuse any prompt that is not on the evaluation side of `data`.
pub fn assert_eval_side(data: &Config, train_ids: &HashSet<&str>, p: &Prompt) -> Result<()> {
    let recomputed = prompts::side(
        &p.split_key,
        data.prompts.split_seed,
        data.prompts.eval_fraction,
    );
    if p.side != Side::Eval || recomputed != Side::Eval || train_ids.contains(p.id.as_str()) {
        return Err(EvalError::TrainingPrompt(p.id.clone()));
    }
    Ok(())
}

/// Draw `sizes[pool]` evaluation-side prompts of each pool.
pub fn select(data: &Config, sizes: &BTreeMap<String, usize>, seed: u64) -> Result<Selection> {
    let (all, train) =
        prompts::load_all(data).map_err(|e| EvalError::data("loading the prompt pools", e))?;
    select_from(data, &all, &train, sizes, seed)
}

/// [`select`] on prompts already loaded (`all` both sides, `train` what the
/// data builder samples).
pub fn select_from(
    data: &Config,
    all: &[Prompt],
    train: &[Prompt],
    sizes: &BTreeMap<String, usize>,
    seed: u64,
) -> Result<Selection> {
    let train_ids: HashSet<&str> = train.iter().map(|p| p.id.as_str()).collect();
    let mut out = Vec::new();
    let mut short = Vec::new();
    for (pool, &n) in sizes {
        if !data.pools.iter().any(|p| &p.name == pool) {
            return Err(EvalError::UnknownPool(pool.clone()));
        }
        let mut eval: Vec<&Prompt> = all
            .iter()
            .filter(|p| &p.pool == pool && p.side == Side::Eval)
            .collect();
        let available = eval.len();
        eval.sort_by(|a, b| {
            let ka = prompts::unit_hash(seed, &a.id);
            let kb = prompts::unit_hash(seed, &b.id);
            ka.total_cmp(&kb).then_with(|| a.id.cmp(&b.id))
        });
        if available < n {
            short.push((pool.clone(), n, available));
        }
        for p in eval.into_iter().take(n) {
            assert_eval_side(data, &train_ids, p)?;
            out.push(p.clone());
        }
    }
    Ok(Selection {
        prompts: out,
        short,
    })
}

/// The domain of a pool of the data config.
pub fn domain_of(data: &Config, pool: &str) -> Option<Domain> {
    data.pools.iter().find(|p| p.name == pool).map(|p| p.domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Config {
        Config::load(None).unwrap()
    }

    fn sizes(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn selection_is_eval_side_only_disjoint_from_training_and_seeded() {
        let d = data();
        let (all, train) = prompts::load_all(&d).unwrap();
        let train_ids: HashSet<&str> = train.iter().map(|p| p.id.as_str()).collect();
        // Every training-side prompt of these pools, not just the sampled ones.
        let train_side: HashSet<&str> = all
            .iter()
            .filter(|p| p.side == Side::Train)
            .map(|p| p.id.as_str())
            .collect();
        let s = sizes(&[
            ("gsm8k", 50),
            ("mawps", 20),
            ("asdiv", 20),
            ("mbpp_plus", 10),
            ("alpaca_eval", 10),
        ]);
        let a = select_from(&d, &all, &train, &s, 42).unwrap();
        assert_eq!(a.prompts.len(), 110);
        assert!(a.short.is_empty());
        for p in &a.prompts {
            assert_eq!(p.side, Side::Eval, "{}", p.id);
            assert!(!train_ids.contains(p.id.as_str()), "{}", p.id);
            assert!(!train_side.contains(p.id.as_str()), "{}", p.id);
            assert_eq!(
                prompts::side(&p.split_key, d.prompts.split_seed, d.prompts.eval_fraction),
                Side::Eval
            );
        }
        let ids: HashSet<&str> = a.prompts.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids.len(), 110, "no prompt drawn twice");
        // Same seed, same draw; a bigger size keeps the smaller draw as its prefix.
        let b = select_from(&d, &all, &train, &s, 42).unwrap();
        let ia: Vec<&str> = a.prompts.iter().map(|p| p.id.as_str()).collect();
        let ib: Vec<&str> = b.prompts.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ia, ib);
        let small = select_from(&d, &all, &train, &sizes(&[("gsm8k", 5)]), 42).unwrap();
        let big = select_from(&d, &all, &train, &sizes(&[("gsm8k", 9)]), 42).unwrap();
        let is: Vec<&str> = small.prompts.iter().map(|p| p.id.as_str()).collect();
        let ig: Vec<&str> = big.prompts.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(is[..], ig[..5]);
        // Another seed draws other prompts.
        let other = select_from(&d, &all, &train, &sizes(&[("gsm8k", 9)]), 7).unwrap();
        let io: Vec<&str> = other.prompts.iter().map(|p| p.id.as_str()).collect();
        assert_ne!(ig, io);
    }

    #[test]
    fn a_training_prompt_is_refused() {
        let d = data();
        let (all, train) = prompts::load_all(&d).unwrap();
        let train_ids: HashSet<&str> = train.iter().map(|p| p.id.as_str()).collect();
        let t = all.iter().find(|p| p.side == Side::Train).unwrap();
        assert!(matches!(
            assert_eval_side(&d, &train_ids, t),
            Err(EvalError::TrainingPrompt(_))
        ));
        // A prompt relabelled as eval but hashing to the training side is refused too.
        let mut forged = t.clone();
        forged.side = Side::Eval;
        assert!(assert_eval_side(&d, &HashSet::new(), &forged).is_err());
        // An eval prompt the data builder trains on (a broken split) is refused.
        let e = all.iter().find(|p| p.side == Side::Eval).unwrap();
        assert!(assert_eval_side(&d, &train_ids, e).is_ok());
        let leaked: HashSet<&str> = [e.id.as_str()].into_iter().collect();
        assert!(assert_eval_side(&d, &leaked, e).is_err());
    }

    #[test]
    fn unknown_pools_and_short_pools() {
        let d = data();
        let (all, train) = prompts::load_all(&d).unwrap();
        assert!(matches!(
            select_from(&d, &all, &train, &sizes(&[("nope", 3)]), 42),
            Err(EvalError::UnknownPool(_))
        ));
        let s = select_from(&d, &all, &train, &sizes(&[("mbpp_plus", 100_000)]), 42).unwrap();
        assert_eq!(s.short.len(), 1);
        assert_eq!(s.short[0].2, s.prompts.len());
    }
}
