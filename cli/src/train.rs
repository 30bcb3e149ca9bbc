//! `fusechat sft` and `fusechat dpo`: flags in, `fusechat_train` does the work.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use fusechat_train::data::OnBadInput;
use fusechat_train::dpo::{self, DpoOptions};
use fusechat_train::loss::PreferenceLoss;
use fusechat_train::sft::{self, SftOptions};
use fusechat_train::trainer::{Resume, RunSummary, TrainOptions};

/// Flags both stages share.
#[derive(clap::Args)]
pub struct CommonArgs {
    /// The model to train: a Hugging Face folder (`fusechat import` makes one from a GGUF).
    #[arg(long)]
    model: PathBuf,
    /// Training data (JSONL).
    #[arg(long)]
    data: PathBuf,
    /// Run folder: metrics.jsonl, curves.svg, checkpoints/, final/.
    #[arg(long)]
    out: PathBuf,
    /// Passes over the data.
    #[arg(long, default_value_t = 3)]
    epochs: usize,
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
}

impl CommonArgs {
    fn train_options(&self, default_lr: f64) -> TrainOptions {
        TrainOptions {
            epochs: self.epochs,
            max_steps: self.max_steps,
            micro_batch: self.batch,
            grad_accum: self.grad_accum,
            lr: self.lr.unwrap_or(default_lr),
            warmup_ratio: self.warmup_ratio,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
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
        }
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
        if self.epochs == 0 || self.max_steps == Some(0) {
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
        train: c.train_options(5e-6),
    };
    let summary =
        sft::sft(&options, &device).with_context(|| format!("SFT into {}", c.out.display()))?;
    report(&summary);
    Ok(())
}

pub fn dpo(args: DpoArgs) -> Result<()> {
    let c = &args.common;
    c.check()?;
    if args.beta <= 0.0 {
        bail!("--beta must be positive");
    }
    if !(0.0..0.5).contains(&args.label_smoothing) {
        bail!("--label-smoothing must lie in [0, 0.5)");
    }
    if args.loss == PreferenceLoss::Ipo && args.label_smoothing > 0.0 {
        bail!("--label-smoothing applies to the sigmoid and ln losses, not to ipo");
    }
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
        loss: args.loss,
        beta: args.beta,
        label_smoothing: args.label_smoothing,
        train: c.train_options(1e-6),
    };
    let summary =
        dpo::dpo(&options, &device).with_context(|| format!("DPO into {}", c.out.display()))?;
    report(&summary);
    Ok(())
}
