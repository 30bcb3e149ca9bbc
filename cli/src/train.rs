//! `fusechat sft` and `fusechat dpo`: flags in, `fusechat_train` does the work.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use fusechat_train::data::OnBadInput;
use fusechat_train::dpo::{self, DpoOptions};
use fusechat_train::loss::{Preference, PreferenceLoss};
use fusechat_train::memory::{parameter_count, ForwardShape, Kept, MemoryPlan};
use fusechat_train::precision::WeightDtype;
use fusechat_train::settings::{Stage, StageOptions, StageSettings};
use fusechat_train::sft::{self, SftOptions};
use fusechat_train::trainer::{Resume, RunSummary};

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
    /// Sequences (SFT) or pairs (DPO) per forward pass [default: 4 for SFT, 2 for DPO].
    #[arg(long)]
    batch: Option<usize>,
    /// Micro-batches per optimizer step [default: 2].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Longest sequence in tokens (prompt + response); longer lines are bad input
    /// [default: 1024].
    #[arg(long)]
    max_len: Option<usize>,
    /// Peak learning rate [default: 5e-6 for SFT, 1e-6 for DPO].
    #[arg(long)]
    lr: Option<f64>,
    /// Share of the steps spent warming up linearly before the cosine decay [default: 0.1].
    #[arg(long)]
    warmup_ratio: Option<f64>,
    /// [default: 0]
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Clip the global gradient norm to this (0: no clipping) [default: 1].
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// [default: 42]
    #[arg(long)]
    seed: Option<u64>,
    /// Write a checkpoint every N optimizer steps (and at the end).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Checkpoints kept in OUT/checkpoints.
    #[arg(long, default_value_t = 2)]
    keep_checkpoints: usize,
    /// Weights of OUT/final: f32 or bf16 (half the size) [default: the dtype
    /// the run trains in]. A bf16 run's final folder holds the model it
    /// computed with (the master weights, if kept, rounded to bf16); the
    /// masters themselves are in the checkpoints.
    #[arg(long, value_parser = ["f32", "bf16"])]
    save_dtype: Option<String>,
    /// What the weights, activations and gradients are kept in: f32, or bf16
    /// (half the memory; norms, softmax and the loss still in f32, AdamW's
    /// moments in f32). bf16 is for GPUs: this CPU has no bf16 arithmetic, so
    /// there it runs, slower than f32, for checks [default: f32].
    #[arg(long)]
    dtype: Option<WeightDtype>,
    /// With --dtype bf16: the optimizer updates f32 copies of the weights
    /// (4 more bytes a parameter), so updates smaller than bf16's spacing
    /// accumulate instead of rounding away.
    #[arg(long)]
    master_weights: bool,
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
    /// Keep only each block's input for the backward pass and run the block again
    /// there: about a third more arithmetic, a fraction of the activation memory.
    #[arg(long)]
    gradient_checkpointing: bool,
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

impl CommonArgs {
    /// The stage's settings as the flags give them.
    fn settings(&self) -> StageSettings {
        let l = &self.lora;
        StageSettings {
            epochs: self.epochs,
            max_steps: self.max_steps,
            batch: self.batch,
            grad_accum: self.grad_accum,
            max_len: self.max_len,
            lr: self.lr,
            warmup_ratio: self.warmup_ratio,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            lora: l.lora,
            lora_rank: l.lora_rank,
            lora_alpha: l.lora_alpha,
            lora_targets: l.lora_targets.clone(),
            gradient_checkpointing: self.gradient_checkpointing,
            dtype: self.dtype,
            master_weights: self.master_weights,
        }
    }

    /// The stage's options: the flags over its defaults, checked, with the
    /// CLI's own choices for checkpoints, saving and resuming.
    fn options(&self, stage: Stage) -> Result<StageOptions> {
        self.check()?;
        let mut options = self
            .settings()
            .resolve(stage)
            .map_err(|e| anyhow::anyhow!(e.flag()))?;
        let lora = options.train.lora.is_some();
        if !lora && self.merge {
            bail!("--merge merges LoRA adapters: add --lora (or --lora-rank R)");
        }
        if lora && !self.merge && self.save_dtype.is_some() {
            bail!(
                "--save-dtype is the dtype of OUT/final, which a LoRA run writes only with \
                 --merge (the adapter is saved in f32, as peft saves it): add --merge"
            );
        }
        let t = &mut options.train;
        t.merge = self.merge;
        t.checkpoint_every = self.checkpoint_every;
        t.keep_checkpoints = self.keep_checkpoints;
        t.save_dtype = self.save_dtype.as_deref().map(|d| match d {
            "bf16" => candle_core::DType::BF16,
            _ => candle_core::DType::F32,
        });
        t.resume = if self.fresh {
            Resume::Fresh
        } else {
            Resume::SameRunOnly
        };
        Ok(options)
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
    /// The run's --dtype: f32, or bf16 (weights, gradients and activations
    /// in half the bytes; AdamW's moments stay f32).
    #[arg(long, default_value = "f32")]
    dtype: WeightDtype,
    /// The run's --master-weights (with bf16: f32 copies of the weights).
    #[arg(long)]
    master_weights: bool,
    /// The CPU's fused kernels (attention scores recomputed in the backward
    /// pass, LoRA updates accumulated in place) instead of the composed ops
    /// other devices run.
    #[arg(long)]
    cpu: bool,
    /// Gradient checkpointing (`--gradient-checkpointing` of sft and dpo).
    #[arg(long)]
    gradient_checkpointing: bool,
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
    let kept = match (args.cpu, args.gradient_checkpointing) {
        (true, false) => Kept::FUSED,
        (true, true) => Kept::FUSED.recomputing(),
        (false, false) => Kept::COMPOSED,
        (false, true) => Kept::COMPOSED.recomputing(),
    };
    let train = StageSettings {
        lora: args.lora.lora,
        lora_rank: args.lora.lora_rank,
        lora_alpha: args.lora.lora_alpha,
        lora_targets: args.lora.lora_targets.clone(),
        dtype: Some(args.dtype),
        master_weights: args.master_weights,
        ..Default::default()
    }
    .resolve(Stage::Sft)
    .map_err(|e| anyhow::anyhow!(e.flag()))?
    .train;
    let precision = train.precision;
    let (what, plan) = match train.lora {
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
            MemoryPlan::lora(&config, &lora, precision, &shape, kept),
        ),
        None => (
            "full fine-tuning".to_string(),
            MemoryPlan::full_fine_tune(&config, precision, &shape, kept),
        ),
    };
    println!(
        "{} ({} parameters), {what}{}, {}, {} x {} tokens: {plan}",
        args.model.display(),
        parameter_count(&config),
        if args.gradient_checkpointing {
            ", gradient checkpointing"
        } else {
            ""
        },
        precision.describe(),
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
    let stage = c.options(Stage::Sft)?;
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
        max_len: stage.max_len,
        on_bad_input: c.on_bad_input(),
        train: stage.train,
    };
    let summary =
        sft::sft(&options, &device).with_context(|| format!("SFT into {}", c.out.display()))?;
    report(&summary);
    Ok(())
}

pub fn dpo(args: DpoArgs) -> Result<()> {
    let c = &args.common;
    let stage = c.options(Stage::Dpo)?;
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
        max_len: stage.max_len,
        on_bad_input: c.on_bad_input(),
        preference,
        train: stage.train,
    };
    let summary =
        dpo::dpo(&options, &device).with_context(|| format!("DPO into {}", c.out.display()))?;
    report(&summary);
    Ok(())
}
