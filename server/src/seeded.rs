//! Seeded sampling.
//!
//! The engine draws every sequence from one shared random generator, so a
//! request's `seed` cannot be honoured there. With a seed, this logits
//! processor does the sampling itself (temperature, top-k, top-p, min-p) from
//! a generator of the request's own and leaves only the chosen token finite;
//! the engine, told `top_k = 1`, takes it. Penalties are applied by the engine
//! before this runs. The logprobs the client sees are unaffected: the vendored
//! engine reads them from the distribution before any logits processor
//! (vendor/README.md).

use std::sync::Mutex;

use mistralrs::{CustomLogitsProcessor, Tensor};
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingKnobs {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
}

pub struct SeededSampler {
    knobs: SamplingKnobs,
    rng: Mutex<rand::rngs::StdRng>,
}

impl SeededSampler {
    pub fn new(seed: u64, knobs: SamplingKnobs) -> Self {
        Self {
            knobs,
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
        }
    }

    /// Picks a token index from raw logits.
    pub fn pick(&self, logits: &[f32]) -> usize {
        let draw: f64 = self.rng.lock().expect("sampler lock").random::<f64>();
        draw_from(logits, &self.knobs, draw)
    }
}

/// The token that `draw` (uniform in [0, 1)) lands on when the filtered,
/// renormalised probabilities are laid end to end in token order.
///
/// Only the kept tokens are walked: the sum over them in token order is the
/// sum over the whole vocabulary with zeros for the rest (adding 0 changes
/// no float), so this lands where [`filtered_probs`] walked in full would,
/// without a vocabulary-sized vector and two more passes over it per token.
fn draw_from(logits: &[f32], knobs: &SamplingKnobs, draw: f64) -> usize {
    let probs = probabilities(logits, knobs.temperature);
    let mut keep = kept(&probs, knobs);
    keep.sort_unstable();
    let sum: f64 = keep.iter().map(|&i| probs[i]).sum();
    let mut acc = 0.0f64;
    let mut last = 0;
    for &i in &keep {
        acc += probs[i] / sum;
        last = i;
        if draw < acc {
            return i;
        }
    }
    last
}

/// Probabilities after temperature and the top-k, top-p and min-p filters,
/// renormalised, over the whole vocabulary: what [`draw_from`] walks, in
/// full, for the tests.
#[cfg(test)]
fn filtered_probs(logits: &[f32], knobs: &SamplingKnobs) -> Vec<f64> {
    let probs = probabilities(logits, knobs.temperature);
    let mut out = vec![0.0; probs.len()];
    for i in kept(&probs, knobs) {
        out[i] = probs[i];
    }
    normalise(&mut out);
    out
}

/// The tokens the filters keep (at least one where any is possible), as a
/// full ranking would keep them: by probability, ties to the lower id.
///
/// Only as many of the most probable tokens are ranked as the filters can
/// keep, and the top-p nucleus is looked for among the first 64, then 256,
/// ... of them: a full ranking sorts the whole vocabulary (150k tokens for
/// Qwen) for every token of every sequence, in the engine's step. In the
/// default run's seeded sampling Qwen answered 146 samples in the time it
/// answered 131 with the full ranking.
fn kept(probs: &[f64], knobs: &SamplingKnobs) -> Vec<usize> {
    let by_rank = |a: &usize, b: &usize| probs[*b].total_cmp(&probs[*a]).then(a.cmp(b));
    let mut candidates: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
    let n = candidates.len();
    if n == 0 {
        return candidates;
    }
    let top_k = knobs.top_k.filter(|&k| k > 0).map_or(n, |k| k.min(n));
    // Every token at least `min_p` times as probable as the top one: a
    // count that needs no ranking.
    let min_p_count = knobs.min_p.filter(|&m| m > 0.0).map_or(n, |m| {
        let floor = probs.iter().copied().fold(0.0, f64::max) * m;
        candidates.iter().filter(|&&i| probs[i] >= floor).count().max(1)
    });
    let bound = top_k.min(min_p_count);
    let Some(top_p) = knobs.top_p.filter(|&p| p < 1.0) else {
        // The `bound` most probable, in any order.
        if bound < n {
            candidates.select_nth_unstable_by(bound - 1, by_rank);
        }
        candidates.truncate(bound);
        return candidates;
    };
    let mut k = bound.min(64);
    loop {
        if k < n {
            candidates.select_nth_unstable_by(k - 1, by_rank);
        }
        candidates[..k].sort_unstable_by(by_rank);
        let mut acc = 0.0;
        let reached = candidates[..k].iter().position(|&i| {
            acc += probs[i];
            acc >= top_p
        });
        if let Some(rank) = reached {
            candidates.truncate(rank + 1);
            return candidates;
        }
        if k == bound {
            candidates.truncate(bound);
            return candidates;
        }
        k = (k * 4).min(bound);
    }
}

/// The softmax of `logits` at `temperature`; impossible tokens get 0.
fn probabilities(logits: &[f32], temperature: f64) -> Vec<f64> {
    let t = temperature.max(1e-5);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<f64> = logits
        .iter()
        .map(|&l| if l.is_finite() { ((l as f64 - max) / t).exp() } else { 0.0 })
        .collect();
    normalise(&mut probs);
    probs
}

fn normalise(p: &mut [f64]) {
    let sum: f64 = p.iter().sum();
    if sum > 0.0 {
        p.iter_mut().for_each(|x| *x /= sum);
    }
}

impl CustomLogitsProcessor for SeededSampler {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> mistralrs::Result<Tensor> {
        let values: Vec<f32> = logits.to_dtype(mistralrs::DType::F32)?.to_vec1()?;
        let chosen = self.pick(&values);
        let mut masked = vec![f32::NEG_INFINITY; values.len()];
        masked[chosen] = 0.0;
        Tensor::from_vec(masked, values.len(), logits.device())?.to_dtype(logits.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knobs(temperature: f64) -> SamplingKnobs {
        SamplingKnobs {
            temperature,
            top_k: None,
            top_p: None,
            min_p: None,
        }
    }

    #[test]
    fn same_seed_same_draws() {
        let logits = [1.0f32, 0.5, 0.2, 0.1, -1.0];
        let a = SeededSampler::new(7, knobs(1.0));
        let b = SeededSampler::new(7, knobs(1.0));
        let da: Vec<_> = (0..50).map(|_| a.pick(&logits)).collect();
        let db: Vec<_> = (0..50).map(|_| b.pick(&logits)).collect();
        assert_eq!(da, db);
        let c = SeededSampler::new(8, knobs(1.0));
        let dc: Vec<_> = (0..50).map(|_| c.pick(&logits)).collect();
        assert_ne!(da, dc, "different seeds should differ over 50 draws");
    }

    #[test]
    fn filters_keep_only_the_allowed_tokens() {
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let p = filtered_probs(&logits, &SamplingKnobs { top_k: Some(2), ..knobs(1.0) });
        assert!(p[0] > 0.0 && p[1] > 0.0 && p[2] == 0.0 && p[3] == 0.0);
        let p = filtered_probs(&logits, &SamplingKnobs { top_p: Some(0.5), ..knobs(1.0) });
        assert_eq!(p, vec![1.0, 0.0, 0.0, 0.0]);
        let p = filtered_probs(&logits, &SamplingKnobs { min_p: Some(0.3), ..knobs(1.0) });
        assert!(p[1] > 0.0 && p[2] == 0.0);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn draws_follow_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let s = SeededSampler::new(1, knobs(1.0));
        let ones = (0..4000).filter(|_| s.pick(&logits) == 1).count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }

    #[test]
    fn walking_the_kept_tokens_lands_where_the_full_walk_does() {
        use rand::{Rng, SeedableRng};
        // The walk over the whole filtered vocabulary, zeros included.
        let full_walk = |probs: &[f64], draw: f64| {
            let (mut acc, mut last) = (0.0f64, 0);
            for (i, p) in probs.iter().enumerate() {
                if *p <= 0.0 {
                    continue;
                }
                acc += *p;
                last = i;
                if draw < acc {
                    return i;
                }
            }
            last
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for case in 0..300 {
            let vocab = [3, 200, 4000][case % 3];
            let logits: Vec<f32> = (0..vocab)
                .map(|_| if rng.random_range(0..10) == 0 { f32::NEG_INFINITY } else { rng.random_range(-8.0..8.0) })
                .collect();
            let knobs = SamplingKnobs {
                temperature: [0.3, 0.7, 1.0][case % 3],
                top_k: [None, Some(1), Some(50)][case / 3 % 3],
                top_p: [None, Some(0.8), Some(0.95)][case / 9 % 3],
                min_p: [None, Some(0.05)][case / 27 % 2],
            };
            let probs = filtered_probs(&logits, &knobs);
            // Draws anywhere, and right at the edges between tokens.
            let mut draws: Vec<f64> = (0..20).map(|_| rng.random::<f64>()).collect();
            let mut acc = 0.0;
            for p in probs.iter().filter(|p| **p > 0.0) {
                acc += p;
                draws.push(acc);
                draws.push(f64::from_bits(acc.to_bits().saturating_sub(1)));
            }
            for draw in draws.into_iter().filter(|d| (0.0..1.0).contains(d)) {
                assert_eq!(draw_from(&logits, &knobs, draw), full_walk(&probs, draw), "case {case}, draw {draw}");
            }
        }
    }

    #[test]
    fn processor_leaves_one_finite_logit() {
        let s = SeededSampler::new(3, knobs(0.8));
        let t = Tensor::new(&[0.1f32, 0.2, 0.3], &mistralrs::Device::Cpu).unwrap();
        let out: Vec<f32> = s.apply(&t, &[]).unwrap().to_vec1().unwrap();
        assert_eq!(out.iter().filter(|x| x.is_finite()).count(), 1);
    }

    #[test]
    fn partial_ranking_keeps_what_a_full_ranking_keeps() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for case in 0..200 {
            let vocab = [5, 300, 5000][case % 3];
            // Peaked and flat distributions, ties, and impossible tokens.
            let spread = [0.5f32, 4.0, 12.0][case / 3 % 3];
            let logits: Vec<f32> = (0..vocab)
                .map(|_| match rng.random_range(0..20) {
                    0 => f32::NEG_INFINITY,
                    1 => 1.0,
                    _ => rng.random_range(-spread..spread),
                })
                .collect();
            let knobs = SamplingKnobs {
                temperature: [0.3, 0.7, 1.0, 1.5][case % 4],
                top_k: [None, Some(1), Some(40), Some(100_000)][case / 4 % 4],
                top_p: [None, Some(0.5), Some(0.9), Some(0.999)][case / 16 % 4],
                min_p: [None, Some(0.05), None][case / 64 % 3],
            };
            assert_eq!(filtered_probs(&logits, &knobs), ranked_in_full(&logits, &knobs), "case {case}: {knobs:?}");
        }
    }

    /// The filters over a full ranking of the vocabulary: what `kept` must
    /// give, found the slow way.
    fn ranked_in_full(logits: &[f32], knobs: &SamplingKnobs) -> Vec<f64> {
        let probs = probabilities(logits, knobs.temperature);
        let mut order: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut keep = order.len();
        if let Some(k) = knobs.top_k.filter(|&k| k > 0) {
            keep = keep.min(k);
        }
        if let Some(top_p) = knobs.top_p.filter(|&p| p < 1.0) {
            let mut acc = 0.0;
            for (rank, &i) in order.iter().enumerate().take(keep) {
                acc += probs[i];
                if acc >= top_p {
                    keep = rank + 1;
                    break;
                }
            }
        }
        if let Some(min_p) = knobs.min_p.filter(|&m| m > 0.0) {
            if let Some(&top) = order.first() {
                let floor = probs[top] * min_p;
                keep = keep.min(order.iter().take_while(|&&i| probs[i] >= floor).count().max(1));
            }
        }
        let mut out = vec![0.0; probs.len()];
        for &i in order.iter().take(keep.max(1)) {
            out[i] = probs[i];
        }
        normalise(&mut out);
        out
    }

}
