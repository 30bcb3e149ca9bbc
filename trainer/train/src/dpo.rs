//! Direct preference optimization (sigmoid, length-normalised `ln`, `ipo`).
//! The reference model's log-probabilities of every chosen and rejected
//! response are computed once, with the frozen starting weights, before the
//! first step, and cached in `OUT/reference_logps.json` under a key made of
//! the model's and the data's hashes: only one model is ever in memory.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use crate::batch::Batch;
use crate::chat::{ChatTokenizer, Encoded};
use crate::data::{self, DpoExample, OnBadInput};
use crate::error::{io, Result};
use crate::fingerprint;
use crate::loss::{learned_logps, preference_loss, row_sums, PairLogps, Preference};
use crate::memory::ForwardShape;
use crate::model::CausalLm;
use crate::trainer::{
    self, GradSum, Objective, RunInputs, RunSummary, StepOutput, StepTimes, TrainOptions,
};

pub struct DpoOptions {
    pub model: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub max_len: usize,
    pub on_bad_input: OnBadInput,
    pub preference: Preference,
    pub train: TrainOptions,
}

pub struct DpoObjective {
    pub examples: Vec<DpoExample>,
    /// Reference (chosen, rejected) summed log-probs, per example.
    pub reference: Vec<(f32, f32)>,
    pub preference: Preference,
    pub device: Device,
}

/// Summed learned-token log-probs of each row, with the model as it is now.
fn logps_of(model: &CausalLm, rows: &[&Encoded], device: &Device) -> Result<(Tensor, Batch)> {
    let batch = Batch::new(rows, device)?;
    let learned = learned_logps(model, &batch)?;
    Ok((row_sums(&batch, &learned)?, batch))
}

impl Objective for DpoObjective {
    fn name(&self) -> &'static str {
        "dpo"
    }

    fn len(&self) -> usize {
        self.examples.len()
    }

    fn curves(&self) -> &'static [&'static str] {
        &[
            "loss",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
        ]
    }

    /// Chosen and rejected run in one forward pass: 2 x `micro_batch` sequences.
    fn largest_forward(&self, micro_batch: usize) -> ForwardShape {
        let rows = self
            .examples
            .iter()
            .flat_map(|e| [&e.chosen, &e.rejected])
            .map(|r| (r.ids.len() - 1, r.learned_count()));
        ForwardShape::largest(rows.collect(), 2 * micro_batch)
    }

    fn step(&self, model: &CausalLm, examples: &[usize], micro_batch: usize) -> Result<StepOutput> {
        let params = model.parameters();
        let pairs = examples.len() as f64;
        let mut grads = GradSum::new(params);
        let mut sums = [0f64; 7];
        let mut tokens = 0;
        let mut times = StepTimes::default();
        for chunk in examples.chunks(micro_batch) {
            let m = chunk.len();
            let rows: Vec<&Encoded> = chunk
                .iter()
                .map(|&i| &self.examples[i].chosen)
                .chain(chunk.iter().map(|&i| &self.examples[i].rejected))
                .collect();
            let (logps, batch) = times.forward(|| logps_of(model, &rows, &self.device))?;
            tokens += batch.tokens;
            let policy_chosen = logps.narrow(0, 0, m)?;
            let policy_rejected = logps.narrow(0, m, m)?;
            let reference_chosen: Vec<f32> = chunk.iter().map(|&i| self.reference[i].0).collect();
            let reference_rejected: Vec<f32> = chunk.iter().map(|&i| self.reference[i].1).collect();
            let chosen_len: Vec<f32> = batch.learned[..m].iter().map(|&c| c as f32).collect();
            let rejected_len: Vec<f32> = batch.learned[m..].iter().map(|&c| c as f32).collect();
            let t = |v: Vec<f32>| Tensor::from_vec(v, m, &self.device);
            let (rc, rr, lc, lr) = (
                t(reference_chosen)?,
                t(reference_rejected)?,
                t(chosen_len)?,
                t(rejected_len)?,
            );
            let out = preference_loss(
                &PairLogps {
                    policy_chosen: &policy_chosen,
                    policy_rejected: &policy_rejected,
                    reference_chosen: &rc,
                    reference_rejected: &rr,
                    chosen_len: &lc,
                    rejected_len: &lr,
                },
                &self.preference,
            )?;
            let loss = (out.losses.sum_all()? / pairs)?;
            grads.add(params, &times.backward(|| model.backward(&loss))?)?;
            let chosen_rewards = out.chosen_rewards.to_vec1::<f32>()?;
            let rejected_rewards = out.rejected_rewards.to_vec1::<f32>()?;
            let pc = policy_chosen.to_vec1::<f32>()?;
            let pr = policy_rejected.to_vec1::<f32>()?;
            sums[0] += loss.to_scalar::<f32>()? as f64 * pairs;
            for i in 0..m {
                sums[1] += chosen_rewards[i] as f64;
                sums[2] += rejected_rewards[i] as f64;
                sums[3] += (chosen_rewards[i] - rejected_rewards[i]) as f64;
                sums[4] += f64::from(u8::from(chosen_rewards[i] > rejected_rewards[i]));
                sums[5] += pc[i] as f64;
                sums[6] += pr[i] as f64;
            }
        }
        let mean = |s: f64| s / pairs;
        Ok(StepOutput {
            grads: grads.finish(params)?,
            loss: mean(sums[0]),
            tokens,
            extra: vec![
                ("rewards/chosen", mean(sums[1])),
                ("rewards/rejected", mean(sums[2])),
                ("rewards/margins", mean(sums[3])),
                ("rewards/accuracies", mean(sums[4])),
                ("logps/chosen", mean(sums[5])),
                ("logps/rejected", mean(sums[6])),
            ],
            times,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct ReferenceCache {
    key: String,
    chosen: Vec<f32>,
    rejected: Vec<f32>,
}

/// The frozen model's log-probs of every pair, from the cache when its key matches.
pub fn reference_logps(
    model: &CausalLm,
    examples: &[DpoExample],
    micro_batch: usize,
    cache: &std::path::Path,
    key: &str,
    device: &Device,
) -> Result<Vec<(f32, f32)>> {
    if let Ok(text) = std::fs::read_to_string(cache) {
        if let Ok(saved) = serde_json::from_str::<ReferenceCache>(&text) {
            if saved.key == key && saved.chosen.len() == examples.len() {
                tracing::info!("reference log-probs from {}", cache.display());
                return Ok(saved.chosen.into_iter().zip(saved.rejected).collect());
            }
        }
    }
    let bar = ProgressBar::new(examples.len() as u64).with_prefix("reference log-probs");
    let mut result = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(micro_batch.max(1)) {
        let m = chunk.len();
        let rows: Vec<&Encoded> = chunk
            .iter()
            .map(|e| &e.chosen)
            .chain(chunk.iter().map(|e| &e.rejected))
            .collect();
        let (logps, _) = logps_of(model, &rows, device)?;
        let values = logps.detach().to_vec1::<f32>()?;
        result.extend((0..m).map(|i| (values[i], values[m + i])));
        bar.inc(m as u64);
    }
    bar.finish_and_clear();
    let saved = ReferenceCache {
        key: key.to_string(),
        chosen: result.iter().map(|p| p.0).collect(),
        rejected: result.iter().map(|p| p.1).collect(),
    };
    let tmp = cache.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&saved).expect("json")).map_err(io(&tmp))?;
    std::fs::rename(&tmp, cache).map_err(io(cache))?;
    Ok(result)
}

/// `fusechat dpo`: loads the model and pairs, caches the reference log-probs,
/// trains, writes `OUT/final`.
pub fn dpo(options: &DpoOptions, device: &Device) -> Result<RunSummary> {
    let chat = ChatTokenizer::load(&options.model)?;
    let data = data::load_dpo(&options.data, &chat, options.max_len, options.on_bad_input)?;
    tracing::info!(
        "{}: {} pairs ({} lines skipped)",
        options.data.display(),
        data.examples.len(),
        data.skipped.len()
    );
    let model = trainer::load_model(&options.model, &options.train, device)?;
    let model_hash = fingerprint::model_folder(&options.model)?;
    std::fs::create_dir_all(&options.out).map_err(io(&options.out))?;
    let mut reference_key = serde_json::json!({
        "model": model_hash, "data": data.sha256, "max_len": options.max_len,
    });
    if !options.train.precision.is_f32() {
        // bf16 log-probabilities differ from f32 ones in the last digits.
        reference_key["dtype"] = format!("{:?}", model.dtype()).into();
    }
    let reference_key = fingerprint::json(&reference_key);
    // Before any step: the model is still the frozen reference.
    let reference = reference_logps(
        &model,
        &data.examples,
        options.train.micro_batch,
        &options.out.join("reference_logps.json"),
        &reference_key,
        device,
    )?;
    let identity = serde_json::json!({
        "objective": "dpo",
        "model": model_hash,
        "data": data.sha256,
        "max_len": options.max_len,
        "loss": options.preference.loss(),
        "beta": options.preference.beta(),
        "label_smoothing": options.preference.label_smoothing(),
        "train": options.train,
    });
    let objective = DpoObjective {
        examples: data.examples,
        reference,
        preference: options.preference,
        device: device.clone(),
    };
    let inputs = RunInputs {
        source: &options.model,
        data: &options.data,
        identity,
        skipped: data.skipped.len(),
    };
    trainer::run(&model, &objective, &options.train, &options.out, inputs)
}
