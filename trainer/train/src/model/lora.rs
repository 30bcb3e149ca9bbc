//! LoRA (Hu et al., 2021) as peft implements it: a frozen linear layer `W` gains a
//! trainable low-rank update, `y = x W^T + (alpha / r) (x A^T) B^T`, with `A: (r, in)`
//! drawn as peft draws it (Kaiming-uniform, bound `1/sqrt(in)`) and `B: (out, r)` zero,
//! so training starts from the base model exactly.
//!
//! Adapters are named as peft saves them
//! (`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`), so the trainer's
//! parameter names are the keys of `adapter_model.safetensors`, and
//! [`PeftAdapterConfig`] is the `adapter_config.json` peft reads beside it.

use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::config::ModelConfig;

/// A linear layer of a decoder block that LoRA can adapt, by its Hugging Face name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
        LoraTarget::GateProj,
        LoraTarget::UpProj,
        LoraTarget::DownProj,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::QProj => "q_proj",
            LoraTarget::KProj => "k_proj",
            LoraTarget::VProj => "v_proj",
            LoraTarget::OProj => "o_proj",
            LoraTarget::GateProj => "gate_proj",
            LoraTarget::UpProj => "up_proj",
            LoraTarget::DownProj => "down_proj",
        }
    }

    /// The layer's path inside decoder layer `layer`, as transformers names it.
    pub fn module(self, layer: usize) -> String {
        let block = match self {
            LoraTarget::QProj | LoraTarget::KProj | LoraTarget::VProj | LoraTarget::OProj => {
                "self_attn"
            }
            LoraTarget::GateProj | LoraTarget::UpProj | LoraTarget::DownProj => "mlp",
        };
        format!("model.layers.{layer}.{block}.{}", self.name())
    }

    /// `(in, out)` features of the layer under `config`.
    pub fn features(self, config: &ModelConfig) -> (usize, usize) {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let (q, kv) = (
            config.num_attention_heads * config.head_dim(),
            config.num_kv_heads() * config.head_dim(),
        );
        match self {
            LoraTarget::QProj => (h, q),
            LoraTarget::KProj | LoraTarget::VProj => (h, kv),
            LoraTarget::OProj => (q, h),
            LoraTarget::GateProj | LoraTarget::UpProj => (h, i),
            LoraTarget::DownProj => (i, h),
        }
    }
}

impl fmt::Display for LoraTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LoraTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        LoraTarget::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = LoraTarget::ALL.iter().map(|t| t.name()).collect();
                format!(
                    "`{s}` is not a layer LoRA can adapt: use {} or all-linear",
                    names.join(", ")
                )
            })
    }
}

/// The LoRA settings fusechat trains with: peft's `LoraConfig` with no dropout, no trained
/// biases and the standard `alpha / r` scale.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraConfig {
    rank: usize,
    alpha: f64,
    targets: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    /// peft's defaults: r 8, lora_alpha 8, q_proj and v_proj (its choice for llama, qwen2
    /// and gemma3).
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 8.0,
            targets: vec![LoraTarget::QProj, LoraTarget::VProj],
        }
    }
}

impl LoraConfig {
    /// `targets` in any order (duplicates are dropped); rank at least 1, alpha positive.
    pub fn new(rank: usize, alpha: f64, mut targets: Vec<LoraTarget>) -> Result<Self, String> {
        if rank == 0 {
            return Err("the LoRA rank must be at least 1".into());
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(format!("lora alpha must be a positive number, got {alpha}"));
        }
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            return Err("LoRA needs at least one target layer".into());
        }
        Ok(Self {
            rank,
            alpha,
            targets,
        })
    }

    /// A comma-separated list of layer names (`q_proj,v_proj`), or `all-linear` for
    /// every linear layer of the decoder blocks (peft's shorthand; the output layer is
    /// never adapted).
    pub fn parse_targets(list: &str) -> Result<Vec<LoraTarget>, String> {
        if list.trim() == "all-linear" {
            return Ok(LoraTarget::ALL.to_vec());
        }
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(LoraTarget::from_str)
            .collect()
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    pub fn targets(&self) -> &[LoraTarget] {
        &self.targets
    }

    /// What the low-rank update is multiplied by.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Every adapted layer of a model with `config`: `(module path, target)`, layer by
    /// layer.
    pub fn modules(&self, config: &ModelConfig) -> Vec<(String, LoraTarget)> {
        (0..config.num_hidden_layers)
            .flat_map(|l| self.targets.iter().map(move |&t| (t.module(l), t)))
            .collect()
    }

    /// Trainable parameters the adapters of a model with `config` hold.
    pub fn parameter_count(&self, config: &ModelConfig) -> u64 {
        let per_layer: usize = self
            .targets
            .iter()
            .map(|t| {
                let (i, o) = t.features(config);
                self.rank * (i + o)
            })
            .sum();
        (per_layer * config.num_hidden_layers) as u64
    }
}

/// The name of one of a layer's adapter matrices in peft's saved state dict;
/// `matrix` is `A` or `B`.
pub fn adapter_name(module: &str, matrix: char) -> String {
    format!("base_model.model.{module}.lora_{matrix}.weight")
}

/// The trainable update of one linear layer: `A: (r, in)`, `B: (out, r)`.
#[derive(Clone)]
pub(crate) struct Adapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

impl Adapter {
    /// `scale (x A^T) B^T` for `x: (n, in)`; the scale is applied to the rank-wide
    /// product, not to the output-wide one.
    pub fn delta(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        (x.matmul(&self.a.t()?)? * self.scale)?.matmul(&self.b.t()?)
    }

    /// `W + scale B A`: the weight that computes what `W` and the adapter compute together.
    pub fn merged(&self, weight: &Tensor) -> candle_core::Result<Tensor> {
        weight + (self.b.matmul(&self.a)? * self.scale)?
    }
}

/// `adapter_config.json` as peft writes it for a LoRA adapter of a causal LM (the fields
/// peft 0.x reads; the rest take peft's defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftAdapterConfig {
    pub peft_type: String,
    pub task_type: String,
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    pub bias: String,
    pub fan_in_fan_out: bool,
    pub inference_mode: bool,
    pub init_lora_weights: bool,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub modules_to_save: Option<Vec<String>>,
}

impl PeftAdapterConfig {
    pub fn new(lora: &LoraConfig, base: Option<String>) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            base_model_name_or_path: base,
            r: lora.rank,
            lora_alpha: lora.alpha,
            lora_dropout: 0.0,
            target_modules: lora.targets.iter().map(|t| t.name().to_string()).collect(),
            bias: "none".into(),
            fan_in_fan_out: false,
            inference_mode: true,
            init_lora_weights: true,
            use_rslora: false,
            use_dora: false,
            modules_to_save: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Architecture;

    #[test]
    fn targets_parse_as_peft_names_them() {
        assert_eq!(
            LoraConfig::parse_targets("v_proj, q_proj").unwrap(),
            vec![LoraTarget::VProj, LoraTarget::QProj]
        );
        assert_eq!(LoraConfig::parse_targets("all-linear").unwrap().len(), 7);
        let err = LoraConfig::parse_targets("q_proj,lm_head").unwrap_err();
        assert!(
            err.contains("lm_head") && err.contains("down_proj"),
            "{err}"
        );
        let config = LoraConfig::new(
            4,
            8.0,
            vec![LoraTarget::VProj, LoraTarget::QProj, LoraTarget::VProj],
        )
        .unwrap();
        assert_eq!(config.targets(), &[LoraTarget::QProj, LoraTarget::VProj]);
        assert_eq!(config.scale(), 2.0);
        assert!(LoraConfig::new(0, 8.0, vec![LoraTarget::QProj]).is_err());
        assert!(LoraConfig::new(8, 8.0, vec![]).is_err());
    }

    #[test]
    fn adapter_parameters_are_counted_per_layer() {
        let config = ModelConfig::tiny(Architecture::Llama);
        let lora = LoraConfig::new(2, 4.0, LoraTarget::ALL.to_vec()).unwrap();
        // hidden 32, q 4x8 = 32, kv 2x8 = 16, intermediate 48; 2 layers.
        let per_layer = 2 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 2 * (32 + 48) + (48 + 32));
        assert_eq!(lora.parameter_count(&config), 2 * per_layer as u64);
        let modules = lora.modules(&config);
        assert_eq!(modules.len(), 14);
        assert_eq!(modules[0].0, "model.layers.0.self_attn.q_proj");
        assert_eq!(
            adapter_name(&modules[13].0, 'B'),
            "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
        );
    }
}
