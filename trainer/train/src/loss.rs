//! The objectives: log-probabilities of the learned tokens, the SFT
//! cross-entropy, and the preference losses (DPO, length-normalised DPO, IPO).
//! Everything here is built from differentiable candle ops.

use candle_core::{DType, Tensor};

use crate::batch::Batch;
use crate::error::Result;
use crate::model::CausalLm;

/// log p(target) at every position: (rows, len, vocab) logits and (rows, len)
/// targets give (rows, len). On the CPU one fused pass forward and one
/// backward over the logits (`model::token_logprobs`), never materializing the
/// log-softmax; elsewhere `logit[target] - logsumexp(logits)`.
pub fn token_logps(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(crate::model::token_logprobs(
        &logits.contiguous()?,
        targets,
    )?)
}

/// log p(target) of each learned position of `batch`: (n,). The model projects
/// only those positions onto the vocabulary.
pub fn learned_logps(model: &CausalLm, batch: &Batch) -> Result<Tensor> {
    let logits = model.forward_rows(&batch.inputs, &batch.learned_positions)?;
    token_logps(&logits, &batch.learned_targets)
}

/// Per-row sums of `learned_logps`: (rows,).
pub fn row_sums(batch: &Batch, learned: &Tensor) -> Result<Tensor> {
    Ok(batch
        .membership
        .matmul(&learned.unsqueeze(1)?)?
        .squeeze(1)?)
}

/// `log(1 + exp(x))`, stable for large |x|.
fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + ((x.abs()?.neg()?.exp()? + 1.0)?.log()?))?)
}

/// `-log sigmoid(x)` = softplus(-x).
fn neg_log_sigmoid(x: &Tensor) -> Result<Tensor> {
    softplus(&x.neg()?)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreferenceLoss {
    /// DPO (Rafailov et al.): `-log sigmoid(beta * (log-ratio chosen - log-ratio rejected))`.
    Sigmoid,
    /// Length-normalised DPO (FuseChat-3.0): each log-ratio divided by its
    /// response's token count first.
    Ln,
    /// IPO (Azar et al.) as TRL computes it: `(logits - 1/(2 beta))^2` on
    /// per-token (length-averaged) log-ratios.
    Ipo,
}

impl std::str::FromStr for PreferenceLoss {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sigmoid" | "dpo" => Ok(Self::Sigmoid),
            "ln" | "ln-dpo" => Ok(Self::Ln),
            "ipo" => Ok(Self::Ipo),
            other => Err(format!("unknown loss {other:?}: sigmoid, ln or ipo")),
        }
    }
}

/// One batch of pairs: the policy's and the reference's summed log-probs of
/// chosen and rejected (all (pairs,) f32) and the response lengths in tokens.
pub struct PairLogps<'a> {
    pub policy_chosen: &'a Tensor,
    pub policy_rejected: &'a Tensor,
    pub reference_chosen: &'a Tensor,
    pub reference_rejected: &'a Tensor,
    pub chosen_len: &'a Tensor,
    pub rejected_len: &'a Tensor,
}

/// Per-pair losses and the implicit rewards `beta * log-ratio` (per token for
/// `ln` and `ipo`, as the loss sees them).
pub struct PreferenceOutput {
    pub losses: Tensor,
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

pub fn preference_loss(
    logps: &PairLogps,
    loss: PreferenceLoss,
    beta: f64,
    label_smoothing: f64,
) -> Result<PreferenceOutput> {
    let mut chosen = (logps.policy_chosen - logps.reference_chosen)?;
    let mut rejected = (logps.policy_rejected - logps.reference_rejected)?;
    if matches!(loss, PreferenceLoss::Ln | PreferenceLoss::Ipo) {
        chosen = chosen.div(&logps.chosen_len.to_dtype(DType::F32)?)?;
        rejected = rejected.div(&logps.rejected_len.to_dtype(DType::F32)?)?;
    }
    let logits = (&chosen - &rejected)?;
    let losses = match loss {
        PreferenceLoss::Sigmoid | PreferenceLoss::Ln => {
            let scaled = (&logits * beta)?;
            ((neg_log_sigmoid(&scaled)? * (1.0 - label_smoothing))?
                + (neg_log_sigmoid(&scaled.neg()?)? * label_smoothing)?)?
        }
        PreferenceLoss::Ipo => (logits - 1.0 / (2.0 * beta))?.sqr()?,
    };
    Ok(PreferenceOutput {
        losses,
        chosen_rewards: (chosen * beta)?.detach(),
        rejected_rewards: (rejected * beta)?.detach(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    fn ln_sigmoid(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }

    #[test]
    fn token_logps_match_log_softmax_and_have_gradients() {
        let logits = Var::from_tensor(
            &Tensor::new(&[[[1.0f32, 2.0, 3.0], [0.5, -1.0, 4.0]]], &Device::Cpu).unwrap(),
        )
        .unwrap();
        let targets = Tensor::new(&[[2u32, 0]], &Device::Cpu).unwrap();
        let lp = token_logps(logits.as_tensor(), &targets).unwrap();
        let got = lp.to_vec2::<f32>().unwrap()[0].clone();
        let lse0 = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        let lse1 = (0.5f64.exp() + (-1f64).exp() + 4f64.exp()).ln();
        assert!((got[0] as f64 - (3.0 - lse0)).abs() < 1e-5);
        assert!((got[1] as f64 - (0.5 - lse1)).abs() < 1e-5);
        // d/dlogits of log p(target) = onehot - softmax.
        let grads = lp.sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(logits.as_tensor())
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        let p2 = (3.0 - lse0).exp();
        assert!((g[0][0][2] as f64 - (1.0 - p2)).abs() < 1e-5, "{g:?}");
    }

    /// Two pairs worked by hand for each loss.
    #[test]
    fn hand_worked_pairs() {
        let (pc, pr, rc, rr) = (
            [-10.0f32, -20.0],
            [-12.0f32, -18.0],
            [-11.0f32, -19.0],
            [-11.0f32, -19.0],
        );
        let (lc, lr) = ([4.0f32, 10.0], [2.0f32, 5.0]);
        let (tpc, tpr, trc, trr, tlc, tlr) = (t(&pc), t(&pr), t(&rc), t(&rr), t(&lc), t(&lr));
        let logps = PairLogps {
            policy_chosen: &tpc,
            policy_rejected: &tpr,
            reference_chosen: &trc,
            reference_rejected: &trr,
            chosen_len: &tlc,
            rejected_len: &tlr,
        };
        let beta = 0.5;
        for (kind, smoothing) in [
            (PreferenceLoss::Sigmoid, 0.0),
            (PreferenceLoss::Sigmoid, 0.1),
            (PreferenceLoss::Ln, 0.0),
            (PreferenceLoss::Ipo, 0.0),
        ] {
            let out = preference_loss(&logps, kind, beta, smoothing).unwrap();
            let got = out.losses.to_vec1::<f32>().unwrap();
            for i in 0..2 {
                let (mut c, mut r) = ((pc[i] - rc[i]) as f64, (pr[i] - rr[i]) as f64);
                if kind != PreferenceLoss::Sigmoid {
                    c /= lc[i] as f64;
                    r /= lr[i] as f64;
                }
                let want = match kind {
                    PreferenceLoss::Ipo => (c - r - 1.0 / (2.0 * beta)).powi(2),
                    _ => {
                        -(1.0 - smoothing) * ln_sigmoid(beta * (c - r))
                            - smoothing * ln_sigmoid(-beta * (c - r))
                    }
                };
                assert!(
                    (got[i] as f64 - want).abs() < 1e-5,
                    "{kind:?} pair {i}: {} vs {want}",
                    got[i]
                );
                let reward = out.chosen_rewards.to_vec1::<f32>().unwrap()[i] as f64;
                assert!((reward - beta * c).abs() < 1e-5);
            }
        }
        // Pair 0 by hand (sigmoid): log-ratios +1 and -1, beta 0.5: -ln sigmoid(1) = 0.31326.
        let out = preference_loss(&logps, PreferenceLoss::Sigmoid, beta, 0.0).unwrap();
        assert!((out.losses.to_vec1::<f32>().unwrap()[0] - 0.313_261_7).abs() < 1e-5);
    }

    #[test]
    fn policy_equal_to_reference_gives_ln2() {
        let same = t(&[-5.0, -7.0]);
        let len = t(&[3.0, 4.0]);
        let logps = PairLogps {
            policy_chosen: &same,
            policy_rejected: &same,
            reference_chosen: &same,
            reference_rejected: &same,
            chosen_len: &len,
            rejected_len: &len,
        };
        for kind in [PreferenceLoss::Sigmoid, PreferenceLoss::Ln] {
            let out = preference_loss(&logps, kind, 10.0, 0.0).unwrap();
            for l in out.losses.to_vec1::<f32>().unwrap() {
                assert!((l as f64 - std::f64::consts::LN_2).abs() < 1e-6);
            }
        }
    }

    /// The vocabulary projection on learned rows only gives the same log-probs
    /// and per-row sums as the full logits, masked.
    #[test]
    fn learned_rows_match_the_full_forward() {
        use crate::chat::Encoded;
        use crate::model::{Architecture, ModelConfig};
        for arch in [Architecture::Llama, Architecture::Gemma3] {
            let model = CausalLm::random(ModelConfig::tiny(arch), &Device::Cpu, 3).unwrap();
            let a = Encoded {
                ids: vec![1, 5, 9, 12, 7, 3],
                learn: vec![false, false, false, true, true, true],
            };
            let b = Encoded {
                ids: vec![2, 8, 4, 6],
                learn: vec![false, true, false, true],
            };
            let batch = Batch::new(&[&a, &b], 0, &Device::Cpu).unwrap();
            let full = token_logps(&model.forward(&batch.inputs).unwrap(), &batch.targets).unwrap();
            let want = (full * &batch.mask)
                .unwrap()
                .sum(1)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let learned = learned_logps(&model, &batch).unwrap();
            assert_eq!(learned.dims(), &[5]);
            let got = row_sums(&batch, &learned)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{arch:?}: {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn softplus_is_stable() {
        let x = t(&[-100.0, 0.0, 100.0]);
        let y = softplus(&x).unwrap().to_vec1::<f32>().unwrap();
        assert!(y[0] >= 0.0 && y[0] < 1e-30);
        assert!((y[1] - std::f32::consts::LN_2).abs() < 1e-6);
        assert_eq!(y[2], 100.0);
    }
}
