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
    let logits = model.forward_packed(&batch.inputs, &batch.lens, &batch.learned_positions)?;
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

/// A preference objective whose settings have been checked once, here, for
/// every caller (`fusechat dpo`, `fusechat fuse`): beta positive, label
/// smoothing in [0, 0.5) and only with the losses that have a smoothed form.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preference {
    loss: PreferenceLoss,
    beta: f64,
    label_smoothing: f64,
}

impl Preference {
    pub fn new(loss: PreferenceLoss, beta: f64, label_smoothing: f64) -> Result<Self> {
        let bad = |m: String| Err(crate::error::TrainError::Config(m));
        if !(beta.is_finite() && beta > 0.0) {
            return bad(format!("DPO beta must be a positive number, got {beta}"));
        }
        if !(0.0..0.5).contains(&label_smoothing) {
            return bad(format!(
                "DPO label smoothing must lie in [0, 0.5), got {label_smoothing}"
            ));
        }
        if loss == PreferenceLoss::Ipo && label_smoothing > 0.0 {
            return bad(
                "DPO label smoothing applies to the sigmoid and ln losses, not to ipo: \
                 set it to 0 or choose another loss"
                    .into(),
            );
        }
        Ok(Self {
            loss,
            beta,
            label_smoothing,
        })
    }

    pub fn loss(&self) -> PreferenceLoss {
        self.loss
    }

    pub fn beta(&self) -> f64 {
        self.beta
    }

    pub fn label_smoothing(&self) -> f64 {
        self.label_smoothing
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

pub fn preference_loss(logps: &PairLogps, preference: &Preference) -> Result<PreferenceOutput> {
    let Preference {
        loss,
        beta,
        label_smoothing,
    } = *preference;
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
            let out =
                preference_loss(&logps, &Preference::new(kind, beta, smoothing).unwrap()).unwrap();
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
        let out = preference_loss(
            &logps,
            &Preference::new(PreferenceLoss::Sigmoid, beta, 0.0).unwrap(),
        )
        .unwrap();
        assert!((out.losses.to_vec1::<f32>().unwrap()[0] - 0.313_261_7).abs() < 1e-5);
    }

    #[test]
    fn preference_settings_are_checked_once_for_every_caller() {
        assert!(Preference::new(PreferenceLoss::Ln, 10.0, 0.1).is_ok());
        for (loss, beta, smoothing) in [
            (PreferenceLoss::Ipo, 0.1, 0.1),
            (PreferenceLoss::Sigmoid, 0.0, 0.0),
            (PreferenceLoss::Sigmoid, f64::NAN, 0.0),
            (PreferenceLoss::Sigmoid, 0.1, 0.5),
            (PreferenceLoss::Ln, 0.1, -0.1),
        ] {
            let err = Preference::new(loss, beta, smoothing)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("DPO "), "{err}");
        }
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
            let out = preference_loss(&logps, &Preference::new(kind, 10.0, 0.0).unwrap()).unwrap();
            for l in out.losses.to_vec1::<f32>().unwrap() {
                assert!((l as f64 - std::f64::consts::LN_2).abs() < 1e-6);
            }
        }
    }

    /// Packed rows, projected on their learned positions only, give each row's
    /// log-probs and gradients as that row run alone through the full forward
    /// (tiny Gemma's window of 3 is shorter than the rows, so it is exercised).
    #[test]
    fn packed_learned_rows_match_each_row_alone() {
        use crate::chat::Encoded;
        use crate::model::{Architecture, ModelConfig};
        for arch in [Architecture::Llama, Architecture::Gemma3] {
            let model = CausalLm::random(ModelConfig::tiny(arch), &Device::Cpu, 3).unwrap();
            let rows = [
                Encoded {
                    ids: vec![1, 5, 9, 12, 7, 3],
                    learn: vec![false, false, false, true, true, true],
                },
                Encoded {
                    ids: vec![2, 8, 4, 6],
                    learn: vec![false, true, false, true],
                },
                Encoded {
                    ids: vec![11, 3, 3, 9, 10, 1, 4],
                    learn: vec![false, false, true, false, true, true, true],
                },
            ];
            let alone: Vec<Tensor> = rows
                .iter()
                .map(|r| {
                    let n = r.ids.len() - 1;
                    let ids = Tensor::new(&r.ids[..n], &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap();
                    let targets = Tensor::new(&r.ids[1..], &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap();
                    let mask: Vec<f32> = r.learn[1..]
                        .iter()
                        .map(|&l| f32::from(u8::from(l)))
                        .collect();
                    let mask = Tensor::new(mask, &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap();
                    let full = token_logps(&model.forward(&ids).unwrap(), &targets).unwrap();
                    (full * mask).unwrap().sum_all().unwrap()
                })
                .collect();
            let want_sum = Tensor::stack(&alone, 0).unwrap();
            let want = want_sum.to_vec1::<f32>().unwrap();
            let refs: Vec<&Encoded> = rows.iter().collect();
            let batch = Batch::new(&refs, &Device::Cpu).unwrap();
            let learned = learned_logps(&model, &batch).unwrap();
            assert_eq!(learned.dims(), &[9]);
            let got_sum = row_sums(&batch, &learned).unwrap();
            let got = got_sum.to_vec1::<f32>().unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{arch:?}: {got:?} vs {want:?}");
            }
            let grads_got = got_sum.sum_all().unwrap().backward().unwrap();
            let grads_want = want_sum.sum_all().unwrap().backward().unwrap();
            for (name, var) in model.parameters() {
                let g = grads_got.get(var.as_tensor()).unwrap();
                let w = grads_want.get(var.as_tensor()).unwrap();
                let diff = (g - w)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let scale = w
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    diff <= 1e-4 * scale.max(1.0),
                    "{arch:?} {name}: {diff} (scale {scale})"
                );
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
