//! `ModelConfig`: the fields of a Hugging Face `config.json` the trainable models need
//! (llama, qwen2, gemma3 text), with the defaults of transformers' config classes, plus the
//! checks that turn an unsupported or inconsistent config into a clear error.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ModelError;

/// The model families the trainer implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// `LlamaForCausalLM` (SmolLM2, Llama 2/3...).
    Llama,
    /// `Qwen2ForCausalLM`: llama with biases on q/k/v.
    Qwen2,
    /// `Gemma3ForCausalLM` (text-only Gemma 3, `model_type` `gemma3_text`).
    Gemma3,
}

impl Architecture {
    /// The `architectures[0]` value Hugging Face writes for this family.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    /// The `model_type` value of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Gemma3 => "gemma3_text",
        }
    }
}

/// How the feed-forward gate is activated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GeLU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
    /// Exact GeLU (`gelu`).
    GeluErf,
}

/// RoPE frequency scaling (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The fields of a Hugging Face `config.json` that the trainer reads. Unset optional fields
/// take the defaults of transformers' config class for the architecture (see the accessors).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ModelConfig {
    /// e.g. `["LlamaForCausalLM"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    /// e.g. `llama`, `qwen2`, `gemma3_text`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Old-style scaling dict (`{"rope_type": "linear", "factor": 8.0}`); null when unscaled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5 style RoPE parameters (per layer type for Gemma 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    /// Llama: biases on q/k/v/o.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Llama: biases on gate/up/down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// Llama / Qwen2 activation name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Gemma activation name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
    /// Qwen2: sliding-window attention (not supported when true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Gemma 3: attention scale is `query_pre_attn_scalar^-0.5`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "integral_as_int"
    )]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3: window of the local layers (a query sees keys with `q - k < sliding_window`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Gemma 3: `sliding_attention` / `full_attention` per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3 (old configs): every `sliding_window_pattern`-th layer is global.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3: RoPE base of the local layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 3 embedding models: bidirectional attention (not supported when true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_bidirectional_attention: Option<bool>,
}

/// transformers types `query_pre_attn_scalar` as an int (and its strict configs reject 8.0).
fn integral_as_int<S: serde::Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => s.serialize_i64(*x as i64),
        Some(x) => s.serialize_f64(*x),
        None => s.serialize_none(),
    }
}

fn default_eps() -> f64 {
    1e-6
}

impl ModelConfig {
    /// Reads and checks `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            what: "read the model config".into(),
            path: path.clone(),
            source,
        })?;
        Self::from_json_str(&text, &path)
    }

    /// Parses and checks a `config.json` text (`path` is only used in messages).
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, ModelError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ModelError::Config {
                path: path.to_path_buf(),
                message: format!("not valid JSON: {e}"),
            })?;
        Self::from_value(&value, path)
    }

    pub(crate) fn from_value(value: &serde_json::Value, path: &Path) -> Result<Self, ModelError> {
        if value.get("text_config").is_some() && value.get("hidden_size").is_none() {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: "this is a multimodal config (fields under `text_config`); the trainer \
                          takes text-only checkpoints (e.g. Gemma3ForCausalLM with model_type \
                          `gemma3_text`)"
                    .into(),
            });
        }
        let config: ModelConfig =
            serde_json::from_value(value.clone()).map_err(|e| ModelError::Config {
                path: path.to_path_buf(),
                message: format!("missing or mistyped field: {e}"),
            })?;
        config.validate().map_err(|message| ModelError::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// The architecture; fails for an unsupported `architectures` / `model_type`.
    pub fn try_architecture(&self) -> Result<Architecture, String> {
        let from_class = |c: &str| match c {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            "Gemma3ForCausalLM" => Some(Architecture::Gemma3),
            _ => None,
        };
        let from_type = |t: &str| match t {
            "llama" => Some(Architecture::Llama),
            "qwen2" => Some(Architecture::Qwen2),
            "gemma3_text" => Some(Architecture::Gemma3),
            _ => None,
        };
        // `architectures` names the class (and wins); `model_type` is the fallback.
        let found = match self.architectures.first() {
            Some(a) => from_class(a),
            None => from_type(&self.model_type),
        };
        if let Some(arch) = found {
            return Ok(arch);
        }
        Err(format!(
            "unsupported model: architectures {:?}, model_type {:?}; the trainer implements \
             LlamaForCausalLM (llama), Qwen2ForCausalLM (qwen2) and Gemma3ForCausalLM (gemma3_text)",
            self.architectures, self.model_type
        ))
    }

    /// The architecture. Configs from [`ModelConfig::from_dir`] and the ones
    /// [`super::CausalLm`] accepts are checked, so this only panics on a hand-built config
    /// naming an unsupported model.
    pub fn architecture(&self) -> Architecture {
        match self.try_architecture() {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        match (self.head_dim, self.try_architecture()) {
            (Some(d), _) => d,
            (None, Ok(Architecture::Gemma3)) => 256,
            (None, _) => self.hidden_size / self.num_attention_heads.max(1),
        }
    }

    /// Whether `lm_head` is the embedding matrix (transformers' default: false for llama and
    /// qwen2, true for gemma3).
    pub fn tied_embeddings(&self) -> bool {
        self.tie_word_embeddings
            .unwrap_or(matches!(self.try_architecture(), Ok(Architecture::Gemma3)))
    }

    /// Biases of q/k/v (qwen2 always; llama with `attention_bias`).
    pub fn qkv_bias(&self) -> bool {
        match self.try_architecture() {
            Ok(Architecture::Qwen2) => true,
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    /// Bias of o_proj (llama and gemma3 with `attention_bias`; never qwen2).
    pub fn o_bias(&self) -> bool {
        match self.try_architecture() {
            Ok(Architecture::Qwen2) => false,
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    /// Biases of gate/up/down (llama `mlp_bias`).
    pub fn mlp_bias(&self) -> bool {
        match self.try_architecture() {
            Ok(Architecture::Llama) => self.mlp_bias.unwrap_or(false),
            _ => false,
        }
    }

    pub fn activation(&self) -> Result<Activation, String> {
        let name = match self.try_architecture()? {
            Architecture::Gemma3 => self
                .hidden_activation
                .clone()
                .or_else(|| self.hidden_act.clone())
                .unwrap_or_else(|| "gelu_pytorch_tanh".into()),
            _ => self.hidden_act.clone().unwrap_or_else(|| "silu".into()),
        };
        match name.as_str() {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new" | "gelu_fast" => {
                Ok(Activation::GeluTanh)
            }
            "gelu" => Ok(Activation::GeluErf),
            other => Err(format!(
                "activation `{other}` is not implemented (silu, gelu, gelu_pytorch_tanh are)"
            )),
        }
    }

    /// Per layer: true for a sliding-window (local) layer. Always false for llama/qwen2.
    pub fn sliding_layers(&self) -> Vec<bool> {
        if !matches!(self.try_architecture(), Ok(Architecture::Gemma3)) {
            return vec![false; self.num_hidden_layers];
        }
        match &self.layer_types {
            Some(types) => types.iter().map(|t| t == "sliding_attention").collect(),
            None => {
                let pattern = self.sliding_window_pattern.unwrap_or(6).max(1);
                (0..self.num_hidden_layers)
                    .map(|i| (i + 1) % pattern != 0)
                    .collect()
            }
        }
    }

    /// Gemma 3 sliding window (transformers' default 4096).
    pub fn sliding_window_len(&self) -> usize {
        self.sliding_window.unwrap_or(4096)
    }

    /// The attention scale: `head_dim^-0.5`, or `query_pre_attn_scalar^-0.5` for gemma3.
    pub fn attention_scale(&self) -> f64 {
        match self.try_architecture() {
            Ok(Architecture::Gemma3) => self.query_pre_attn_scalar.unwrap_or(256.0).powf(-0.5),
            _ => (self.head_dim() as f64).powf(-0.5),
        }
    }

    /// RoPE base and scaling of the global layers (all layers for llama/qwen2).
    pub fn rope_global(&self) -> Result<(f64, RopeScaling), String> {
        let arch = self.try_architecture()?;
        let default_theta = if arch == Architecture::Gemma3 {
            1e6
        } else {
            1e4
        };
        // transformers 5 writes `rope_parameters` (per layer type for gemma3).
        let params = self.rope_parameters.as_ref().map(|p| {
            if arch == Architecture::Gemma3 {
                p.get("full_attention")
                    .cloned()
                    .unwrap_or(serde_json::Value::Null)
            } else {
                p.clone()
            }
        });
        let theta = self
            .rope_theta
            .or_else(|| {
                params
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(default_theta);
        let scaling = match (&self.rope_scaling, &params) {
            (Some(s), _) if !s.is_null() => parse_scaling(s, self)?,
            (_, Some(p)) if !p.is_null() => parse_scaling(p, self)?,
            _ => RopeScaling::None,
        };
        Ok((theta, scaling))
    }

    /// Gemma 3 local layers: RoPE base (`rope_local_base_freq`, default 10000), never scaled.
    pub fn rope_local_theta(&self) -> f64 {
        self.rope_local_base_freq
            .or_else(|| {
                self.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("sliding_attention"))
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(1e4)
    }

    /// Checks that the config describes a model the trainer implements.
    pub fn validate(&self) -> Result<(), String> {
        let arch = self.try_architecture()?;
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", self.head_dim()),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("`{name}` must be positive"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err("`rms_norm_eps` must be positive".into());
        }
        self.activation()?;
        self.rope_global()?;
        if arch == Architecture::Qwen2 && self.use_sliding_window == Some(true) {
            return Err("qwen2 with `use_sliding_window: true` is not implemented".into());
        }
        if arch == Architecture::Gemma3 {
            if self.use_bidirectional_attention == Some(true) {
                return Err(
                    "gemma3 with `use_bidirectional_attention: true` is not implemented".into(),
                );
            }
            if let Some(types) = &self.layer_types {
                if types.len() != self.num_hidden_layers {
                    return Err(format!(
                        "`layer_types` has {} entries for {} layers",
                        types.len(),
                        self.num_hidden_layers
                    ));
                }
                if let Some(t) = types
                    .iter()
                    .find(|t| *t != "sliding_attention" && *t != "full_attention")
                {
                    return Err(format!("unknown layer type `{t}` in `layer_types`"));
                }
            }
            if self.sliding_window_len() == 0 {
                return Err("`sliding_window` must be positive".into());
            }
        }
        Ok(())
    }

    /// A tiny config for tests: 2 layers, hidden 32, 4 heads of 8 (2 kv heads), vocab 64.
    /// Gemma 3 gets one sliding (window 3) and one global layer.
    pub fn tiny(arch: Architecture) -> Self {
        let gemma = arch == Architecture::Gemma3;
        ModelConfig {
            architectures: vec![arch.hf_class().into()],
            model_type: arch.model_type().into(),
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: Some(8),
            rms_norm_eps: 1e-6,
            rope_theta: Some(if gemma { 1e6 } else { 1e4 }),
            rope_scaling: None,
            rope_parameters: None,
            tie_word_embeddings: Some(arch != Architecture::Qwen2),
            attention_bias: None,
            mlp_bias: None,
            hidden_act: if gemma { None } else { Some("silu".into()) },
            hidden_activation: if gemma {
                Some("gelu_pytorch_tanh".into())
            } else {
                None
            },
            max_position_embeddings: Some(256),
            use_sliding_window: None,
            query_pre_attn_scalar: if gemma { Some(8.0) } else { None },
            sliding_window: if gemma { Some(3) } else { None },
            layer_types: if gemma {
                Some(vec!["sliding_attention".into(), "full_attention".into()])
            } else {
                None
            },
            sliding_window_pattern: None,
            rope_local_base_freq: if gemma { Some(1e4) } else { None },
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            use_bidirectional_attention: None,
        }
    }
}

fn parse_scaling(v: &serde_json::Value, config: &ModelConfig) -> Result<RopeScaling, String> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64, String> {
        v.get(key)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| format!("rope scaling `{kind}` needs a numeric `{key}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings").or_else(
                |_| {
                    config
                        .max_position_embeddings
                        .map(|m| m as f64)
                        .ok_or_else(|| {
                            "llama3 rope scaling needs original_max_position_embeddings".to_string()
                        })
                },
            )?,
        }),
        other => Err(format!(
            "RoPE scaling `{other}` is not implemented (default, linear and llama3 are)"
        )),
    }
}
