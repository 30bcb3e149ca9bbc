//! `fusechat sft` and `fusechat dpo`: flags in, `fusechat_train` does the work.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use fusechat_train::data::OnBadInput;
use fusechat_train::dpo::{self, DpoOptions};
use fusechat_train::loss::{Preference, PreferenceLoss};
use fusechat_train::memory::{parameter_count, ForwardShape, Kept, MemoryPlan};
use fusechat_train::model::LoraConfig;
use fusechat_train::sft::{self, SftOptions};
use fusechat_train::trainer::{Resume, RunSummary, TrainOptions};

/// What a stage trains with when its flags do not say.
struct StageDefaults {
    epochs: usize,
    lr: f64,
}

const SFT_DEFAULTS: StageDefaults = StageDefaults {
    epochs: 3,
    lr: 5e-6,
};
const DPO_DEFAULTS: StageDefaults = StageDefaults {
    epochs: 1,
    lr: 1e-6,
};

/// Flags both stages share.
#[derive(clap::Args)]
pub struct CommonArgs {
    /// The model to train: a Hugging Face folder (`fusechat import` makes one from a GGUF).
    #[arg(long)]
    model: PathBuf,
    /// Training data (JSONL).
    #[arg(long)]
    data: PathBuf,
    /// Run folder: metrics.jsonl, curves.svg, checkpoints/, final/ (and adapter/ under LoRA).
    #[arg(long)]
    out: PathBuf,
    /// Passes over the data [default: 3 for SFT, 1 for DPO, as in the paper].
    #[arg(long)]
    epochs: Option<usize>,
    /// Stop after this many optimizer steps (the schedule spans them).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Sequences (SFT) or pairs (DPO) per forward pass.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 2)]
    grad_accum: usize,
    /// Longest sequence in tokens (prompt + response); longer lines are bad input.
    #[arg(long, default_value_t = 1024)]
    max_len: usize,
    /// Peak learning rate (default: 5e-6 for SFT, 1e-6 for DPO).
    #[arg(long)]
    lr: Option<f64>,
    /// Share of the steps spent warming up linearly before the cosine decay.
    #[arg(long, default_value_t = 0.1)]
    warmup_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write a checkpoint every N optimizer steps (and at the end).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Checkpoints kept in OUT/checkpoints.
    #[arg(long, default_value_t = 2)]
    keep_checkpoints: usize,
    /// Weights of OUT/final: f32 (keeps small updates) or bf16 (half the size).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    save_dtype: String,
    /// Discard the checkpoints in OUT and start over (default: resume from the newest).
    #[arg(long)]
    fresh: bool,
    /// A bad line (not JSON, no assistant turn, too long, ...): skip it or stop.
    #[arg(long, default_value = "skip", value_parser = ["skip", "fail"])]
    on_bad_input: String,
    /// Train on the CPU even when built with CUDA.
    #[arg(long)]
    cpu: bool,
    #[command(flatten)]
    lora: LoraArgs,
    /// Under LoRA, also write OUT/final: the model with the adapters merged in, which
    /// `fusechat serve` and transformers load like any model folder.
    #[arg(long)]
    merge: bool,
}

/// LoRA: adapters trained on the frozen model (peft's LoRA, with its defaults).
#[derive(clap::Args)]
struct LoraArgs {
    /// Train LoRA adapters instead of every weight (implied by any --lora-* flag);
    /// OUT/adapter is then peft's adapter folder.
    #[arg(long)]
    lora: bool,
    /// Rank of the adapters [default: 8].
    #[arg(long)]
    lora_rank: Option<usize>,
    /// The update is scaled by alpha / rank [default: 8].
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// Layers to adapt: a comma-separated list of q_proj, k_proj, v_proj, o_proj,
    /// gate_proj, up_proj, down_proj, or all-linear [default: q_proj,v_proj].
    #[arg(long)]
    lora_targets: Option<String>,
}

impl LoraArgs {
    /// The LoRA settings, when any LoRA flag is given.
    fn config(&self) -> Result<Option<LoraConfig>> {
        let wanted = self.lora
            || self.lora_rank.is_some()
            || self.lora_alpha.is_some()
            || self.lora_targets.is_some();
        if !wanted {
            return Ok(None);
        }
        let peft = LoraConfig::default();
        let targets = match &self.lora_targets {
            Some(list) => LoraConfig::parse_targets(list)
                .map_err(|e| anyhow::anyhow!("--lora-targets: {e}"))?,
            None => peft.targets().to_vec(),
        };
        let config = LoraConfig::new(
            self.lora_rank.unwrap_or(peft.rank()),
            self.lora_alpha.unwrap_or(peft.alpha()),
            targets,
        )
        .map_err(|e| anyhow::anyhow!("--lora-rank, --lora-alpha, --lora-targets: {e}"))?;
        Ok(Some(config))
    }
}

impl CommonArgs {
    fn train_options(&self, defaults: StageDefaults) -> Result<TrainOptions> {
        Ok(TrainOptions {
            epochs: self.epochs.unwrap_or(defaults.epochs),
            max_steps: self.max_steps,
            micro_batch: self.batch,
            grad_accum: self.grad_accum,
            lr: self.lr.unwrap_or(defaults.lr),
            warmup_ratio: self.warmup_ratio,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            lora: self.lora.config()?,
            merge: self.merge,
            checkpoint_every: self.checkpoint_every,
            keep_checkpoints: self.keep_checkpoints,
            save_dtype: if self.save_dtype == "bf16" {
                candle_core::DType::BF16
            } else {
                candle_core::DType::F32
            },
            resume: if self.fresh {
                Resume::Fresh
            } else {
                Resume::SameRunOnly
            },
        })
    }

    fn on_bad_input(&self) -> OnBadInput {
        if self.on_bad_input == "fail" {
            OnBadInput::Fail
        } else {
            OnBadInput::Skip
        }
    }

    fn check(&self) -> Result<()> {
        if !self.model.join("config.json").is_file() {
            bail!(
                "{} is not a Hugging Face model folder (no config.json); make one from a GGUF file \
                 with `fusechat import FILE.gguf DIR`",
                self.model.display()
            );
        }
        if self.batch == 0 || self.grad_accum == 0 {
            bail!("--batch and --grad-accum must be at least 1");
        }
        if self.epochs == Some(0) || self.max_steps == Some(0) {
            bail!("--epochs and --max-steps must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            bail!(
                "--warmup-ratio must lie in [0, 1], got {}",
                self.warmup_ratio
            );
        }
        if let Some(lr) = self.lr {
            if !(lr.is_finite() && lr > 0.0) {
                bail!("--lr must be a positive number, got {lr}");
            }
        }
        if !(self.max_grad_norm >= 0.0) || self.weight_decay < 0.0 {
            bail!("--max-grad-norm and --weight-decay must not be negative");
        }
        let lora = self.lora.config()?.is_some();
        if !lora && self.merge {
            bail!("--merge merges LoRA adapters: add --lora (or --lora-rank R)");
        }
        if lora && !self.merge && self.save_dtype != "f32" {
            bail!(
                "--save-dtype is the dtype of OUT/final, which a LoRA run writes only with \
                 --merge (the adapter is saved in f32, as peft saves it): add --merge"
            );
        }
        Ok(())
    }
}

#[derive(clap::Args)]
pub struct SftArgs {
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(clap::Args)]
pub struct DpoArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// sigmoid (DPO), ln (length-normalised DPO, FuseChat-3.0) or ipo.
    #[arg(long, default_value = "ln")]
    loss: PreferenceLoss,
    /// Strength of the KL constraint (FuseChat-3.0: 10 with ln; plain DPO usually 0.01-0.1).
    #[arg(long, default_value_t = 10.0)]
    beta: f64,
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
}

/// `fusechat memory`: what a training run would hold, from config.json alone.
#[derive(clap::Args)]
pub struct MemoryArgs {
    /// A Hugging Face model folder, or its config.json (no weights needed).
    #[arg(long)]
    model: PathBuf,
    /// Sequences in one forward pass (SFT: --batch; DPO: twice --batch).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence; every sequence is taken at this length and every
    /// token as learned (the worst case of --max-len).
    #[arg(long, default_value_t = 1024)]
    max_len: usize,
    /// Bytes per value of weights, gradients, AdamW moments and activations:
    /// f32 (what the trainer runs in) or bf16 (half; on paper for now).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    dtype: String,
    /// The CPU's fused kernels (attention scores recomputed in the backward
    /// pass, LoRA updates accumulated in place) instead of the composed ops
    /// other devices run.
    #[arg(long)]
    cpu: bool,
    #[command(flatten)]
    lora: LoraArgs,
}

pub fn memory(args: MemoryArgs) -> Result<()> {
    let dir = if args.model.is_file() {
        args.model.parent().map(PathBuf::from).unwrap_or_default()
    } else {
        args.model.clone()
    };
    let config = fusechat_train::model::ModelConfig::from_dir(&dir)
        .with_context(|| format!("reading {}", args.model.display()))?;
    if args.batch == 0 || args.max_len == 0 {
        bail!("--batch and --max-len must be at least 1");
    }
    let shape = ForwardShape {
        lens: vec![args.max_len; args.batch],
        learned: args.batch * args.max_len,
    };
    let bytes = if args.dtype == "bf16" { 2 } else { 4 };
    let kept = if args.cpu {
        Kept::FUSED
    } else {
        Kept::COMPOSED
    };
    let (what, plan) = match args.lora.config()? {
        Some(lora) => (
            format!(
                "LoRA rank {} on {} ({} adapter parameters)",
                lora.rank(),
                lora.targets()
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(","),
                lora.parameter_count(&config)
            ),
            MemoryPlan::lora(&config, &lora, bytes, &shape, kept),
        ),
        None => (
            "full fine-tuning".to_string(),
            MemoryPlan::full_fine_tune(&config, bytes, &shape, kept),
        ),
    };
    println!(
        "{} ({} parameters), {what}, {}, {} x {} tokens: {plan}",
        args.model.display(),
        parameter_count(&config),
        args.dtype,
        args.batch,
        args.max_len
    );
    Ok(())
}

fn report(summary: &RunSummary) {
    if let Some(loss) = summary.last_loss {
        eprintln!(
            "fusechat: {} steps, last loss {loss:.4}, {:.0} tokens/s",
            summary.steps, summary.tokens_per_s
        );
    }
    println!("{}", summary.final_dir.display());
}

pub fn sft(args: SftArgs) -> Result<()> {
    let c = &args.common;
    c.check()?;
    fusechat_train::device::tune_allocator();
    let device = fusechat_train::device::select(c.cpu)?;
    eprintln!(
        "fusechat: training on {}",
        fusechat_train::device::describe(&device)
    );
    let options = SftOptions {
        model: c.model.clone(),
        data: c.data.clone(),
        out: c.out.clone(),
        max_len: c.max_len,
        on_bad_input: c.on_bad_input(),
        train: c.train_options(SFT_DEFAULTS)?,
    };
    let summary =
        sft::sft(&options, &device).with_context(|| format!("SFT into {}", c.out.display()))?;
    report(&summary);
    Ok(())
}

pub fn dpo(args: DpoArgs) -> Result<()> {
    let c = &args.common;
    c.check()?;
    let preference = Preference::new(args.loss, args.beta, args.label_smoothing)
        .context("--loss, --beta and --label-smoothing")?;
    fusechat_train::device::tune_allocator();
    let device = fusechat_train::device::select(c.cpu)?;
    eprintln!(
        "fusechat: training on {}",
        fusechat_train::device::describe(&device)
    );
    let options = DpoOptions {
        model: c.model.clone(),
        data: c.data.clone(),
        out: c.out.clone(),
        max_len: c.max_len,
        on_bad_input: c.on_bad_input(),
        preference,
        train: c.train_options(DPO_DEFAULTS)?,
    };
    let summary =
        dpo::dpo(&options, &device).with_context(|| format!("DPO into {}", c.out.display()))?;
    report(&summary);
    Ok(())
}
