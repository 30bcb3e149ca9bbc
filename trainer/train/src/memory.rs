//! What a training run will hold in memory, estimated before the first step
//! from the model's config and the largest forward pass the data asks for, so
//! that a run which cannot fit stops at once with the numbers instead of
//! after an hour.
//!
//! The terms follow how this trainer computes (every weight a `Var` in the
//! parameter dtype, AdamW's two moments, candle's autograd keeping every
//! intermediate tensor of the forward pass alive until the backward pass):
//!
//! - weights, gradients: one value per parameter each, in the run's dtype;
//! - optimizer: AdamW's first and second moments, two f32 values per
//!   parameter, and the f32 master weights when a bf16 run keeps them;
//! - activations, per layer and token: the tensors the layer creates (norms,
//!   projections, rotary halves, the attention's per-sequence scores and
//!   probabilities, the gated feed-forward), counted from the layer code;
//! - logits: the learned positions' vocabulary rows, and the f32 copy and
//!   gradient the log-softmax works on;
//! - backward: what the backward pass holds on top, at its peak: about two
//!   layers' activation gradients and the vocabulary-wide gradients of the
//!   embedding and output layer before they are summed.
//!
//! On SmolLM2-135M (f32, 4 rows of 447-511 tokens, packed, fused attention)
//! this comes to 5.96 GB against a measured peak RSS of 4.85 GB for the whole
//! process (bench/results/training.md): the estimate errs on the safe side,
//! mostly in the backward term (candle frees each node's gradient as soon as
//! its inputs have theirs). With gradient checkpointing the same run is
//! estimated at 3.67 GB and peaked at 3.20 GB (2026-12-06).

use std::fmt;

use crate::error::{Result, TrainError};
use crate::model::{LoraConfig, ModelConfig};
use crate::precision::Precision;

/// The largest forward pass of a run: the lengths of the sequences it packs
/// and how many of its positions are learned (reach the vocabulary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardShape {
    pub lens: Vec<usize>,
    pub learned: usize,
}

impl ForwardShape {
    /// The `rows` longest sequences of `lens_and_learned` (length, learned tokens):
    /// no micro-batch of `rows` sequences is larger.
    pub fn largest(mut lens_and_learned: Vec<(usize, usize)>, rows: usize) -> Self {
        lens_and_learned.sort_unstable_by(|a, b| b.cmp(a));
        lens_and_learned.truncate(rows.max(1));
        Self {
            lens: lens_and_learned.iter().map(|&(n, _)| n).collect(),
            learned: lens_and_learned.iter().map(|&(_, l)| l).sum(),
        }
    }
}

/// What a forward pass keeps for the backward pass beyond the layers' inputs
/// and outputs, which depends on the kernels it runs: composed candle ops keep
/// the attention's scores and probabilities and, under LoRA, each adapted
/// layer's frozen product and low-rank update; the CPU's fused kernels
/// recompute the first and accumulate the second in place. Under gradient
/// checkpointing a block keeps only its input, and one block at a time holds
/// its activations while it runs again in the backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    pub attention_scores: bool,
    pub lora_updates: bool,
    /// Every block's activations (false under gradient checkpointing).
    pub block_activations: bool,
}

impl Kept {
    /// Every device but the CPU in f32/f64.
    pub const COMPOSED: Kept = Kept {
        attention_scores: true,
        lora_updates: true,
        block_activations: true,
    };
    /// The CPU's fused kernels.
    pub const FUSED: Kept = Kept {
        attention_scores: false,
        lora_updates: false,
        block_activations: true,
    };

    /// The same kernels under gradient checkpointing.
    pub fn recomputing(self) -> Kept {
        Kept {
            block_activations: false,
            ..self
        }
    }
}

/// Bytes a run holds, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub logits: u64,
    pub backward: u64,
}

impl MemoryPlan {
    /// Full fine-tuning of a model with `config` in `precision`, for one
    /// forward pass of `shape` keeping what `kept` says.
    pub fn full_fine_tune(
        config: &ModelConfig,
        precision: Precision,
        shape: &ForwardShape,
        kept: Kept,
    ) -> Self {
        let params = parameter_count(config);
        let tokens: u64 = shape.lens.iter().map(|&n| n as u64).sum();
        let square: u64 = shape.lens.iter().map(|&n| (n as u64) * (n as u64)).sum();
        let (h, i) = (config.hidden_size as u64, config.intermediate_size as u64);
        let (nh, nkv, d) = (
            config.num_attention_heads as u64,
            config.num_kv_heads() as u64,
            config.head_dim() as u64,
        );
        // Per token: 6 hidden-wide tensors (input, norms, output projection,
        // residual sums, down projection), q/k/v (nh + 2 nkv heads), the
        // rotated q and k and the transposed v (nh + 2 nkv), the attention
        // output (nh), and gate, up and their product.
        let per_token = 6 * h + 2 * (nh + 2 * nkv) * d + nh * d + 3 * i;
        // Kept scores and probabilities: nh x len x len per sequence
        // (Gemma's soft-capping adds two more copies of the scores).
        let score_copies = match (
            kept.attention_scores,
            config.attn_logit_softcapping.is_some(),
        ) {
            (false, _) => 0,
            (true, false) => 2,
            (true, true) => 4,
        };
        let per_layer = per_token * tokens + score_copies * nh * square;
        let layers = config.num_hidden_layers as u64;
        let vocab = config.vocab_size as u64;
        // Checkpointed: every block's input, and one block's activations at a time.
        let blocks = match kept.block_activations {
            true => per_layer * layers,
            false => h * tokens * layers + per_layer,
        };
        let blocks_kept = if kept.block_activations { layers } else { 1 };
        let dtype_bytes = precision.bytes();
        // bf16 runs norms and the attention softmax in f32 (as transformers
        // runs a bf16 model): per layer and token the f32 copies of the two
        // norms' inputs and outputs, and per kept score the f32 copy, masked
        // scores and probabilities.
        let upcasts = match precision.bytes() < F32_BYTES {
            true => {
                let norms = 4 * h * tokens;
                let scores = if kept.attention_scores { 3 * nh * square } else { 0 };
                (norms + scores) * F32_BYTES * blocks_kept
            }
            false => 0,
        };
        Self {
            weights: params * dtype_bytes,
            gradients: params * dtype_bytes,
            optimizer: optimizer_bytes(params, precision),
            activations: (blocks + 2 * h * tokens) * dtype_bytes + upcasts,
            logits: vocab * shape.learned as u64 * (dtype_bytes + 2 * F32_BYTES),
            backward: (2 * per_layer + 2 * vocab * h) * dtype_bytes,
        }
    }

    /// LoRA on a model with `config`: the model's weights frozen (no gradient, no
    /// optimizer state, and no vocabulary-wide embedding gradient in the backward pass),
    /// the adapters trained, and (when `kept` says so) each adapted layer's
    /// frozen product and update on top of what full fine-tuning keeps.
    pub fn lora(
        config: &ModelConfig,
        lora: &LoraConfig,
        precision: Precision,
        shape: &ForwardShape,
        kept: Kept,
    ) -> Self {
        let full = Self::full_fine_tune(config, precision, shape, kept);
        let dtype_bytes = precision.bytes();
        let adapters = lora.parameter_count(config);
        let tokens: u64 = shape.lens.iter().map(|&n| n as u64).sum();
        // Per token and adapted layer, composed: x A^T (rank), its product with B^T
        // (out) and the frozen layer's output (out) beside their sum.
        let per_token: u64 = match kept.lora_updates {
            true => lora
                .targets()
                .iter()
                .map(|t| (lora.rank() + 2 * t.features(config).1) as u64)
                .sum(),
            false => 0,
        };
        let layers = match kept.block_activations {
            true => config.num_hidden_layers as u64,
            false => 1,
        };
        let vocab_grads = 2 * config.vocab_size as u64 * config.hidden_size as u64;
        Self {
            weights: full.weights + adapters * dtype_bytes,
            gradients: adapters * dtype_bytes,
            optimizer: optimizer_bytes(adapters, precision),
            activations: full.activations + per_token * tokens * layers * dtype_bytes,
            logits: full.logits,
            backward: full.backward - vocab_grads * dtype_bytes,
        }
    }

    pub fn total(&self) -> u64 {
        self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.backward
    }

    /// Refuses a plan larger than `available` bytes.
    pub fn check_fits(&self, available: u64, where_: &str) -> Result<()> {
        if self.total() <= available {
            return Ok(());
        }
        Err(TrainError::Config(format!(
            "this run needs about {} and {where_} has {} available ({self}): lower --batch or \
             --max-len, or train on a machine with more memory",
            gb(self.total()),
            gb(available)
        )))
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "weights {}, gradients {}, optimizer state {}, activations {}, logits {}, backward {}; \
             total {}",
            gb(self.weights),
            gb(self.gradients),
            gb(self.optimizer),
            gb(self.activations),
            gb(self.logits),
            gb(self.backward),
            gb(self.total())
        )
    }
}

const F32_BYTES: u64 = 4;

/// AdamW's two f32 moments per trained parameter, and its f32 master copy
/// when the run keeps one.
fn optimizer_bytes(params: u64, precision: Precision) -> u64 {
    let copies = if precision.master_weights() { 3 } else { 2 };
    copies * params * F32_BYTES
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// Parameters of a llama / qwen2 / gemma3 model with this config (a tied
/// output layer counted once), as transformers counts them.
pub fn parameter_count(config: &ModelConfig) -> u64 {
    let (h, i, v) = (
        config.hidden_size as u64,
        config.intermediate_size as u64,
        config.vocab_size as u64,
    );
    let (nh, nkv, d) = (
        config.num_attention_heads as u64,
        config.num_kv_heads() as u64,
        config.head_dim() as u64,
    );
    let gemma = config.architecture() == crate::model::Architecture::Gemma3;
    let mut layer = h * (nh + 2 * nkv) * d + nh * d * h + 3 * h * i + 2 * h;
    if config.qkv_bias() {
        layer += (nh + 2 * nkv) * d;
    }
    if config.o_bias() {
        layer += h;
    }
    if config.mlp_bias() {
        layer += 2 * i + h;
    }
    if gemma {
        layer += 2 * d + 2 * h;
    }
    let head = if config.tied_embeddings() { 0 } else { v * h };
    v * h + config.num_hidden_layers as u64 * layer + h + head
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Architecture, CausalLm};

    #[test]
    fn parameter_count_matches_the_model() {
        for arch in [
            Architecture::Llama,
            Architecture::Qwen2,
            Architecture::Gemma3,
        ] {
            let config = ModelConfig::tiny(arch);
            let model = CausalLm::random(config.clone(), &candle_core::Device::Cpu, 1).unwrap();
            assert_eq!(
                parameter_count(&config),
                model.num_parameters() as u64,
                "{arch:?}"
            );
        }
    }

    #[test]
    fn lora_trains_a_fraction_of_the_memory() {
        let config = ModelConfig::tiny(Architecture::Llama);
        let shape = ForwardShape {
            lens: vec![64; 4],
            learned: 100,
        };
        let lora = LoraConfig::default();
        let full = MemoryPlan::full_fine_tune(&config, Precision::F32, &shape, Kept::COMPOSED);
        let plan = MemoryPlan::lora(&config, &lora, Precision::F32, &shape, Kept::COMPOSED);
        let adapters = lora.parameter_count(&config);
        let model = CausalLm::random(config.clone(), &candle_core::Device::Cpu, 1)
            .unwrap()
            .with_lora(lora.clone(), 1)
            .unwrap();
        assert_eq!(adapters, model.num_trainable_parameters() as u64);
        assert_eq!(plan.gradients, 4 * adapters);
        assert_eq!(plan.optimizer, 8 * adapters);
        assert_eq!(plan.weights, full.weights + 4 * adapters);
        assert!(plan.activations > full.activations);
        let fused = MemoryPlan::lora(&config, &lora, Precision::F32, &shape, Kept::FUSED);
        let full_fused = MemoryPlan::full_fine_tune(&config, Precision::F32, &shape, Kept::FUSED);
        assert_eq!(fused.activations, full_fused.activations);
        // On SmolLM2-135M's shapes the frozen weights save far more than the
        // adapters' activations cost (on the tiny config they need not).
        let mut smollm2 = config;
        (
            smollm2.vocab_size,
            smollm2.hidden_size,
            smollm2.intermediate_size,
        ) = (49152, 576, 1536);
        (smollm2.num_hidden_layers, smollm2.num_attention_heads) = (30, 9);
        (smollm2.num_key_value_heads, smollm2.head_dim) = (Some(3), Some(64));
        let full = MemoryPlan::full_fine_tune(&smollm2, Precision::F32, &shape, Kept::COMPOSED);
        let plan = MemoryPlan::lora(&smollm2, &LoraConfig::default(), Precision::F32, &shape, Kept::COMPOSED);
        assert!(2 * plan.total() < full.total(), "{plan} vs {full}");
    }

    #[test]
    fn largest_forward_takes_the_longest_rows() {
        let shape = ForwardShape::largest(vec![(10, 2), (30, 5), (20, 1), (30, 4)], 2);
        assert_eq!(shape.lens, vec![30, 30]);
        assert_eq!(shape.learned, 9);
    }

    #[test]
    fn bf16_halves_weights_and_gradients_not_the_optimizer() {
        let config = ModelConfig::tiny(Architecture::Llama);
        let shape = ForwardShape {
            lens: vec![64; 4],
            learned: 100,
        };
        let f32 = MemoryPlan::full_fine_tune(&config, Precision::F32, &shape, Kept::COMPOSED);
        let plain = Precision::Bf16 {
            master_weights: false,
        };
        let bf16 = MemoryPlan::full_fine_tune(&config, plain, &shape, Kept::COMPOSED);
        assert_eq!(2 * bf16.weights, f32.weights);
        assert_eq!(2 * bf16.gradients, f32.gradients);
        // More than half: the norms and the attention softmax keep f32
        // copies (three f32 copies of every kept score against f32's two).
        assert!(2 * bf16.activations > f32.activations);
        assert_eq!(bf16.optimizer, f32.optimizer, "AdamW moments stay f32");
        let masters = Precision::Bf16 {
            master_weights: true,
        };
        let with_masters = MemoryPlan::full_fine_tune(&config, masters, &shape, Kept::COMPOSED);
        assert_eq!(with_masters.optimizer - bf16.optimizer, f32.weights);
    }

    #[test]
    fn a_plan_larger_than_the_memory_is_refused_with_its_numbers() {
        let config = ModelConfig::tiny(Architecture::Llama);
        let shape = ForwardShape {
            lens: vec![64; 4],
            learned: 100,
        };
        let plan = MemoryPlan::full_fine_tune(&config, Precision::F32, &shape, Kept::COMPOSED);
        assert_eq!(plan.optimizer, 2 * plan.weights);
        plan.check_fits(plan.total(), "this machine").unwrap();
        let err = plan
            .check_fits(plan.total() - 1, "this machine")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lower --batch or --max-len") && err.contains("activations"),
            "{err}"
        );
        // Twice the sequence length: kept attention scores grow with its
        // square; recomputed, the activations only double.
        let longer_shape = ForwardShape {
            lens: vec![128; 4],
            learned: 100,
        };
        let longer = MemoryPlan::full_fine_tune(&config, Precision::F32, &longer_shape, Kept::COMPOSED);
        assert!(longer.activations > 2 * plan.activations);
        let fused = MemoryPlan::full_fine_tune(&config, Precision::F32, &shape, Kept::FUSED);
        let fused_longer = MemoryPlan::full_fine_tune(&config, Precision::F32, &longer_shape, Kept::FUSED);
        assert!(fused.activations < plan.activations);
        assert!(fused_longer.activations <= 2 * fused.activations);
    }
}
