//! The training loop SFT and DPO share: data order, gradient accumulation,
//! gradient-norm clipping, AdamW under the cosine schedule, metrics, progress,
//! checkpoints and resume, and the final Hugging Face folder.
//!
//! One optimizer step: take the step's examples (micro_batch x grad_accum of
//! the epoch's seeded permutation), let the objective run forward + backward
//! over them micro-batch by micro-batch (it normalises so the summed gradient
//! is the step's mean), clip, update, log, and checkpoint every N steps.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::Serialize;

use crate::checkpoint::{self, TrainerState};
use crate::error::{io, Result, TrainError};
use crate::memory::{ForwardShape, MemoryPlan};
use crate::metrics::{self, MetricsLog};
use crate::model::{CausalLm, LoraConfig};
use crate::optim::{AdamW, AdamWConfig};
use crate::precision::Precision;
use crate::schedule::CosineSchedule;

/// Settings of the loop itself (the objective has its own).
#[derive(Debug, Clone, Serialize)]
pub struct TrainOptions {
    pub epochs: usize,
    /// Stop after this many optimizer steps (the schedule spans them).
    pub max_steps: Option<usize>,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Train LoRA adapters on the frozen model instead of the model itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
    /// f32, or bf16 with or without f32 master weights.
    #[serde(skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    // Not part of the run's identity:
    /// Recompute each block in the backward pass (same gradients, less memory).
    #[serde(skip)]
    pub gradient_checkpointing: bool,
    #[serde(skip)]
    pub checkpoint_every: usize,
    #[serde(skip)]
    pub keep_checkpoints: usize,
    /// Weights of OUT/final; `None`: the dtype the run trained in.
    #[serde(skip)]
    pub save_dtype: Option<DType>,
    /// Under LoRA, also write `OUT/final` with the adapters merged into the model (the
    /// adapters alone are always written to `OUT/adapter`).
    #[serde(skip)]
    pub merge: bool,
    /// What to do with checkpoints already in OUT.
    #[serde(skip)]
    pub resume: Resume,
}

/// What a run does with the checkpoints (and final folder) already in its
/// output folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resume {
    /// Continue from the newest checkpoint of the same run (same model, data
    /// and settings); refuse one of another run (`fusechat sft` / `dpo`).
    #[default]
    SameRunOnly,
    /// Continue the same run; discard the checkpoints of another run and
    /// start over (`fusechat fuse`, whose inputs change when the data grows).
    SameRunOrStartOver,
    /// Discard what is there and start over (`--fresh`).
    Fresh,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            epochs: 3,
            max_steps: None,
            micro_batch: 4,
            grad_accum: 2,
            lr: 5e-6,
            warmup_ratio: 0.1,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
            lora: None,
            precision: Precision::F32,
            gradient_checkpointing: false,
            checkpoint_every: 50,
            keep_checkpoints: 2,
            save_dtype: None,
            merge: false,
            resume: Resume::SameRunOnly,
        }
    }
}

/// What an objective returns for one optimizer step.
pub struct StepOutput {
    /// Summed gradients, one per parameter (already normalised to the step's mean).
    pub grads: Vec<Tensor>,
    pub loss: f64,
    /// Real tokens processed (forward + backward) in the step.
    pub tokens: usize,
    /// Extra metrics for the log (e.g. `rewards/margins`).
    pub extra: Vec<(&'static str, f64)>,
    pub times: StepTimes,
}

/// Seconds a step spent in forward and in backward passes (logged beside the
/// optimizer's, so that every run says where its time goes).
#[derive(Debug, Default, Clone, Copy)]
pub struct StepTimes {
    pub forward: f64,
    pub backward: f64,
}

impl StepTimes {
    /// Runs `f` as forward work.
    pub fn forward<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.forward += start.elapsed().as_secs_f64();
        out
    }

    /// Runs `f` as backward work.
    pub fn backward<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.backward += start.elapsed().as_secs_f64();
        out
    }
}

/// SFT or DPO: how one optimizer step's examples become gradients.
pub trait Objective {
    /// `"sft"` or `"dpo"` (titles, provenance).
    fn name(&self) -> &'static str;
    fn len(&self) -> usize;
    fn step(&self, model: &CausalLm, examples: &[usize], micro_batch: usize) -> Result<StepOutput>;
    /// The largest forward pass a micro-batch of `micro_batch` examples can make
    /// (for the memory estimate before the first step).
    fn largest_forward(&self, micro_batch: usize) -> ForwardShape;
    /// Metrics drawn at the end.
    fn curves(&self) -> &'static [&'static str];
}

/// Sums the gradients of several backward passes, parameter by parameter.
pub struct GradSum {
    grads: Vec<Option<Tensor>>,
}

impl GradSum {
    pub fn new(params: &[(String, Var)]) -> Self {
        Self {
            grads: vec![None; params.len()],
        }
    }

    pub fn add(&mut self, params: &[(String, Var)], store: &GradStore) -> Result<()> {
        for ((_, var), slot) in params.iter().zip(self.grads.iter_mut()) {
            if let Some(g) = store.get(var.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(sum) => (sum + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    }

    /// The sums; a parameter the loss never reached is an error (it would
    /// mean a gradient is silently cut somewhere in the model).
    pub fn finish(self, params: &[(String, Var)]) -> Result<Vec<Tensor>> {
        params
            .iter()
            .zip(self.grads)
            .map(|((name, _), g)| {
                g.ok_or_else(|| {
                    TrainError::Config(format!("no gradient reached {name}: the graph is cut"))
                })
            })
            .collect()
    }
}

/// The global L2 norm of `grads`, and the factor that brings it down to
/// `max_norm` (1 when it is within it, or when `max_norm` is 0). The
/// optimizer applies the factor as it reads the gradients.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<(f64, f64)> {
    let mut total = 0f64;
    for g in grads {
        total += sum_of_squares(g)?;
    }
    let norm = total.sqrt();
    let scale = if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    };
    Ok((norm, scale))
}

/// `sum(g^2)` in f64; on the CPU read in place, without a squared copy.
fn sum_of_squares(g: &Tensor) -> Result<f64> {
    if g.device().is_cpu() && g.dtype() == DType::F32 && g.is_contiguous() {
        return Ok(g.apply_op1_no_bwd(&SumOfSquares)?.to_scalar::<f64>()?);
    }
    // A bf16 sum of thousands of squares rounds most of them away.
    let g = match g.dtype() {
        DType::BF16 | DType::F16 => g.to_dtype(DType::F32)?,
        _ => g.clone(),
    };
    Ok(g.sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

struct SumOfSquares;

impl candle_core::CustomOp1 for SumOfSquares {
    fn name(&self) -> &'static str {
        "sum-of-squares"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let values = match (storage, layout.contiguous_offsets()) {
            (candle_core::CpuStorage::F32(v), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("sum-of-squares: a contiguous f32 tensor"),
        };
        // Pieces summed on every thread, then in order: the same total on every run.
        let pieces: Vec<f64> = values
            .par_chunks(1 << 16)
            .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
            .collect();
        let sum = pieces.iter().sum();
        Ok((candle_core::CpuStorage::F64(vec![sum]), ().into()))
    }
}

/// The examples of the epoch in training order.
fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    // splitmix64 of the epoch, mixed into the seed: (seed, epoch) pairs never collide
    // the way seed + epoch would (seed 43 epoch 0 = seed 42 epoch 1).
    let mut z = (epoch as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ z ^ (z >> 31));
    order.shuffle(&mut rng);
    order
}

#[derive(Debug)]
pub struct RunSummary {
    pub out: PathBuf,
    pub final_dir: PathBuf,
    pub steps: usize,
    pub resumed_from: Option<usize>,
    pub last_loss: Option<f64>,
    pub tokens_per_s: f64,
}

/// Paths of a run folder: the trained model (under LoRA: merged with its adapters).
pub fn final_dir(out: &Path) -> PathBuf {
    out.join("final")
}

/// Under LoRA: the adapters in peft's folder format.
pub fn adapter_dir(out: &Path) -> PathBuf {
    out.join("adapter")
}

/// Where a finished run's result lies, and the file that says it is complete.
fn result(model: &CausalLm, out: &Path, options: &TrainOptions) -> (PathBuf, &'static str) {
    if model.lora().is_some() && !options.merge {
        (adapter_dir(out), "adapter_model.safetensors")
    } else {
        (final_dir(out), "model.safetensors")
    }
}

fn checkpoints(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// What a run is made of, besides the loop settings: where the model and
/// the data came from, and the identity (model hash, data hash, every setting
/// that changes the trajectory) that keys its checkpoints and is saved as
/// provenance next to the final model.
pub struct RunInputs<'a> {
    /// The model folder (tokenizer and generation config are copied from it).
    pub source: &'a Path,
    pub data: &'a Path,
    pub identity: serde_json::Value,
    /// Bad lines skipped while loading the data.
    pub skipped: usize,
}

impl RunInputs<'_> {
    /// A checkpoint with another key is refused rather than mixed in.
    fn run_key(&self) -> String {
        crate::fingerprint::json(&self.identity)
    }

    /// What produced a final folder: saved as `fusechat_train.json`.
    fn provenance(&self) -> serde_json::Value {
        serde_json::json!({
            "base_model": self.source.display().to_string(),
            "data": self.data.display().to_string(),
            "skipped_lines": self.skipped,
            "run": self.identity,
            "fusechat_version": env!("CARGO_PKG_VERSION"),
        })
    }
}

/// The model a run trains, loaded from `dir`: under LoRA its weights frozen
/// and adapters added, drawn from the run's seed; checkpointed if asked.
pub fn load_model(dir: &Path, options: &TrainOptions, device: &Device) -> Result<CausalLm> {
    if device.is_cpu() && !options.precision.is_f32() {
        tracing::warn!(
            "training in {} on the CPU: it has no bf16 arithmetic, so this runs slower than f32 \
             (bf16 is for GPUs; on the CPU it is there to check a run before it goes to one)",
            options.precision.describe()
        );
    }
    let model = CausalLm::load_with_dtype(dir, device, options.precision.dtype())?;
    let mut model = match &options.lora {
        Some(lora) => model.with_lora(lora.clone(), options.seed)?,
        None => model,
    };
    model.set_gradient_checkpointing(options.gradient_checkpointing);
    Ok(model)
}

/// Logs what the run will hold in memory and, on the CPU, refuses a run that
/// cannot fit in what the machine has (the loaded weights count as available:
/// they are already held).
fn check_memory(model: &CausalLm, objective: &dyn Objective, options: &TrainOptions) -> Result<()> {
    let shape = objective.largest_forward(options.micro_batch);
    let precision = options.precision;
    let kept = model.kept();
    let plan = match model.lora() {
        Some(lora) => MemoryPlan::lora(model.config(), lora, precision, &shape, kept),
        None => MemoryPlan::full_fine_tune(model.config(), precision, &shape, kept),
    };
    tracing::info!(
        "memory estimate ({}, largest micro-batch: {} sequences, {} tokens): {plan}",
        precision.describe(),
        shape.lens.len(),
        shape.lens.iter().sum::<usize>()
    );
    if model.device().is_cpu() {
        if let Some(available) = fusechat_host::available_memory() {
            plan.check_fits(available + plan.weights, "this machine")?;
        }
    }
    Ok(())
}

/// Trains `model` with `objective` into `out`.
pub fn run(
    model: &CausalLm,
    objective: &dyn Objective,
    options: &TrainOptions,
    out: &Path,
    inputs: RunInputs,
) -> Result<RunSummary> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let run_key = inputs.run_key();
    let run_key = run_key.as_str();
    let n = objective.len();
    let per_step = options.micro_batch.max(1) * options.grad_accum.max(1);
    let steps_per_epoch = n.div_ceil(per_step);
    let full = steps_per_epoch * options.epochs.max(1);
    let total = options.max_steps.unwrap_or(full).max(1);
    let schedule = CosineSchedule::new(options.lr, options.warmup_ratio, total);
    let params = model.parameters();
    let mut optimizer = AdamW::new(
        params,
        AdamWConfig {
            weight_decay: options.weight_decay,
            ..AdamWConfig::default()
        },
        options.precision.master_weights(),
    )?;

    let (start, resumed_from) = match start_point(model, options, out, run_key, total)? {
        Start::Finished(summary) => return Ok(summary),
        Start::Scratch => {
            check_memory(model, objective, options)?;
            (0, None)
        }
        Start::Checkpoint(dir, state) => {
            check_memory(model, objective, options)?;
            checkpoint::restore(&dir, model, &mut optimizer, &state)?;
            tracing::info!("resuming from {} (step {} of {total})", dir.display(), state.step);
            (state.step, Some(state.step))
        }
    };
    let ckpt_root = checkpoints(out);
    let mut log = MetricsLog::open(&out.join("metrics.jsonl"), start)?;

    let bar = step_bar(objective.name(), start, total);
    let started = Instant::now();
    let mut tokens_done = 0usize;
    let mut last_loss = None;
    let mut order_epoch = usize::MAX;
    let mut order = Vec::new();
    for step in start..total {
        let epoch = step / steps_per_epoch;
        let in_epoch = step % steps_per_epoch;
        if epoch != order_epoch {
            order = epoch_order(n, options.seed, epoch);
            order_epoch = epoch;
        }
        let examples = &order[in_epoch * per_step..((in_epoch + 1) * per_step).min(n)];
        let step_start = Instant::now();
        let output = objective.step(model, examples, options.micro_batch.max(1))?;
        if !output.loss.is_finite() {
            return Err(TrainError::Config(format!(
                "the loss became {} at step {}: lower the learning rate",
                output.loss,
                step + 1
            )));
        }
        let (grad_norm, grad_scale) = clip_grad_norm(&output.grads, options.max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(TrainError::Config(format!(
                "the gradient norm became {grad_norm} at step {}: lower the learning rate; the \
                 last checkpoint is untouched",
                step + 1
            )));
        }
        let lr = schedule.lr(step);
        let optimizer_start = Instant::now();
        optimizer.step(params, &output.grads, lr, grad_scale)?;
        let report = StepReport {
            step: step + 1,
            epoch: (step + 1) as f64 / steps_per_epoch as f64,
            lr,
            grad_norm,
            seconds: step_start.elapsed().as_secs_f64(),
            optimizer_seconds: optimizer_start.elapsed().as_secs_f64(),
        };
        log.write(&report.record(&output))?;
        report.show(&bar, objective.name(), total, &output);
        tokens_done += output.tokens;
        last_loss = Some(output.loss);
        let done = step + 1;
        if done == total || (options.checkpoint_every > 0 && done % options.checkpoint_every == 0) {
            let state = TrainerState {
                step: done,
                total_steps: total,
                epoch: done / steps_per_epoch,
                step_in_epoch: done % steps_per_epoch,
                seed: options.seed,
                run_key: run_key.to_string(),
            };
            checkpoint::save(&ckpt_root, model, &optimizer, &state, options.keep_checkpoints)?;
        }
    }
    bar.finish();
    let result_dir = write_results(model, out, &inputs, options)?;
    metrics::plot(
        &out.join("metrics.jsonl"),
        &out.join("curves.svg"),
        objective.name(),
        objective.curves(),
    )?;
    let elapsed = started.elapsed().as_secs_f64();
    Ok(RunSummary {
        out: out.into(),
        final_dir: result_dir,
        steps: total,
        resumed_from,
        last_loss,
        tokens_per_s: tokens_done as f64 / elapsed.max(1e-9),
    })
}

/// The progress bar of a run of `total` steps resumed at `start`.
fn step_bar(name: &str, start: usize, total: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64).with_position(start as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} steps {msg} ({elapsed} < {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(name.to_string());
    bar
}

/// One optimizer step as the metrics log and the progress display show it.
struct StepReport {
    step: usize,
    epoch: f64,
    lr: f64,
    grad_norm: f64,
    seconds: f64,
    optimizer_seconds: f64,
}

impl StepReport {
    /// The step's line of `metrics.jsonl`: the loop's numbers and the objective's.
    fn record(&self, output: &StepOutput) -> serde_json::Value {
        let mut record = serde_json::json!({
            "step": self.step,
            "epoch": self.epoch,
            "loss": output.loss,
            "learning_rate": self.lr,
            "grad_norm": self.grad_norm,
            "tokens": output.tokens,
            "tokens_per_s": self.tokens_per_s(output),
            "step_seconds": self.seconds,
            "forward_seconds": output.times.forward,
            "backward_seconds": output.times.backward,
            "optimizer_seconds": self.optimizer_seconds,
        });
        for (key, value) in &output.extra {
            record[*key] = serde_json::json!(value);
        }
        record
    }

    fn tokens_per_s(&self, output: &StepOutput) -> f64 {
        output.tokens as f64 / self.seconds.max(1e-9)
    }

    /// Advances the progress bar, or prints a line where there is no terminal.
    fn show(&self, bar: &ProgressBar, name: &str, total: usize, output: &StepOutput) {
        let (loss, tokens_per_s) = (output.loss, self.tokens_per_s(output));
        bar.set_message(format!("loss {loss:.4} | {tokens_per_s:.0} tok/s"));
        bar.inc(1);
        if bar.is_hidden() {
            eprintln!(
                "{name} step {}/{total} loss {loss:.4} lr {:.3e} grad_norm {:.3} {tokens_per_s:.0} tok/s",
                self.step, self.lr, self.grad_norm
            );
        }
    }
}

/// Where a run starts.
enum Start {
    Scratch,
    /// The newest checkpoint of the same run.
    Checkpoint(PathBuf, TrainerState),
    /// Nothing to do: the run is trained and its result written.
    Finished(RunSummary),
}

/// Applies `options.resume` to what `out` holds and says where the run starts;
/// a checkpoint of another run is refused unless the options discard it.
fn start_point(
    model: &CausalLm,
    options: &TrainOptions,
    out: &Path,
    run_key: &str,
    total: usize,
) -> Result<Start> {
    let ckpt_root = checkpoints(out);
    let discard = |why: &str| -> Result<()> {
        for stale in [ckpt_root.clone(), final_dir(out), adapter_dir(out)] {
            if stale.exists() {
                tracing::info!("removing {} ({why})", stale.display());
                std::fs::remove_dir_all(&stale).map_err(io(&stale))?;
            }
        }
        Ok(())
    };
    if options.resume == Resume::Fresh {
        discard("starting fresh")?;
    }
    if options.resume == Resume::SameRunOrStartOver {
        if let Some((_, state)) = checkpoint::latest(&ckpt_root)? {
            if state.run_key != run_key {
                discard("it belongs to a run with another model, data or settings")?;
            }
        }
    }
    let Some((dir, state)) = checkpoint::latest(&ckpt_root)? else {
        return Ok(Start::Scratch);
    };
    if state.run_key != run_key {
        return Err(TrainError::Checkpoint {
            path: dir,
            message: "belongs to a run with another model, data or settings; pass --fresh to \
                      discard it, or choose another --out"
                .into(),
        });
    }
    let (done_dir, done_file) = result(model, out, options);
    if state.step >= total && done_dir.join(done_file).is_file() {
        tracing::info!(
            "{} is already trained ({} steps): nothing to do",
            out.display(),
            state.step
        );
        return Ok(Start::Finished(RunSummary {
            out: out.into(),
            final_dir: done_dir,
            steps: state.step,
            resumed_from: Some(state.step),
            last_loss: None,
            tokens_per_s: 0.0,
        }));
    }
    Ok(Start::Checkpoint(dir, state))
}

/// Writes what a finished run leaves: `OUT/final` (the model, under LoRA the
/// merged model when asked for) and, under LoRA, `OUT/adapter`. Returns the
/// result's folder. A no-merge LoRA run removes an `OUT/final` left by an
/// earlier run, which would not be this run's model.
fn write_results(
    model: &CausalLm,
    out: &Path,
    inputs: &RunInputs,
    options: &TrainOptions,
) -> Result<PathBuf> {
    let provenance = inputs.provenance();
    if model.lora().is_some() {
        let base = std::path::absolute(inputs.source).unwrap_or_else(|_| inputs.source.into());
        write_folder(&adapter_dir(out), inputs.source, &provenance, |dir| {
            Ok(model.save_adapter(dir, Some(base.display().to_string()))?)
        })?;
    }
    let (result_dir, _) = result(model, out, options);
    if result_dir == final_dir(out) {
        write_folder(&result_dir, inputs.source, &provenance, |dir| {
            Ok(model.save(dir, options.save_dtype.unwrap_or(options.precision.dtype()))?)
        })?;
    } else if final_dir(out).exists() {
        let stale = final_dir(out);
        tracing::info!("removing {} (not this run's model)", stale.display());
        std::fs::remove_dir_all(&stale).map_err(io(&stale))?;
    }
    Ok(result_dir)
}

/// Files next to the weights that a Hugging Face folder needs.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// A result folder (`OUT/final`, `OUT/adapter`): what `save` writes, the
/// tokenizer files and the run's provenance, written beside and renamed into
/// place.
fn write_folder(
    dest: &Path,
    source: &Path,
    provenance: &serde_json::Value,
    save: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("result");
    let tmp = dest.with_file_name(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    save(&tmp)?;
    for name in TOKENIZER_FILES {
        let from = source.join(name);
        if from.is_file() {
            std::fs::copy(&from, tmp.join(name)).map_err(io(&from))?;
        }
    }
    let prov = tmp.join("fusechat_train.json");
    std::fs::write(&prov, serde_json::to_vec_pretty(provenance).expect("json"))
        .map_err(io(&prov))?;
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(io(dest))?;
    }
    std::fs::rename(&tmp, dest).map_err(io(dest))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_seeded_permutations() {
        let a = epoch_order(10, 1, 0);
        assert_eq!(a, epoch_order(10, 1, 0));
        assert_ne!(a, epoch_order(10, 1, 1));
        assert_ne!(epoch_order(10, 43, 0), epoch_order(10, 42, 1));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let dev = candle_core::Device::Cpu;
        let grads = vec![
            Tensor::new(&[3.0f32], &dev).unwrap(),
            Tensor::new(&[4.0f32], &dev).unwrap(),
        ];
        let (norm, scale) = clip_grad_norm(&grads, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((scale * norm - 1.0).abs() < 1e-5);
        assert_eq!(clip_grad_norm(&grads, 10.0).unwrap().1, 1.0);
        assert_eq!(clip_grad_norm(&grads, 0.0).unwrap().1, 1.0);
    }
}
