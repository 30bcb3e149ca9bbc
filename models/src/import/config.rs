//! The model's hyperparameters, read from the GGUF metadata, and the Hugging Face `config.json`
//! written from them.
//!
//! Every number comes from the file. Where llama.cpp itself runs a model with a value that the
//! file does not carry (Gemma 3's sliding-window layout, its local RoPE base, its attention
//! scale), the same value llama.cpp uses is written, so the imported checkpoint computes what the
//! GGUF computes under llama.cpp.

use serde_json::{json, Value};

use super::error::ImportError;
use super::gguf::GgufFile;
use super::OutputDType;

/// The architectures the import knows how to map, by their GGUF `general.architecture` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Gemma3,
}

impl Architecture {
    pub const SUPPORTED: &'static [&'static str] = &["llama", "qwen2", "gemma3"];

    pub fn from_gguf_name(name: &str) -> Result<Self, ImportError> {
        match name {
            "llama" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            "gemma3" => Ok(Architecture::Gemma3),
            other => Err(ImportError::UnsupportedArchitecture {
                found: other.to_string(),
                supported: Self::SUPPORTED.join(", "),
            }),
        }
    }

    /// The prefix of the architecture's metadata keys (`llama.block_count`, ...).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Gemma3 => "gemma3",
        }
    }

    /// The `architectures` entry of config.json.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    /// The `model_type` of config.json.
    pub fn hf_model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Gemma3 => "gemma3_text",
        }
    }
}

/// RoPE scaling as the GGUF states it (`<arch>.rope.scaling.*`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Linear {
        factor: f64,
    },
    Yarn {
        factor: f64,
        original_context_length: usize,
    },
}

/// What only Gemma 3 has.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Params {
    pub sliding_window: usize,
    /// One entry per layer: true for a sliding-window (local) layer, false for a global one.
    pub sliding_layers: Vec<bool>,
    pub rope_local_base_freq: f64,
    pub query_pre_attn_scalar: usize,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
}

impl Gemma3Params {
    /// The period `p` such that exactly the layers with `(i + 1) % p == 0` are global, if the
    /// layout has one (it is what mistral.rs reads; transformers reads `layer_types`).
    pub fn sliding_window_pattern(&self) -> Option<usize> {
        let n = self.sliding_layers.len();
        let first_global = self.sliding_layers.iter().position(|s| !s)?;
        let p = first_global + 1;
        let periodic = (0..n).all(|i| self.sliding_layers[i] == ((i + 1) % p != 0));
        periodic.then_some(p)
    }

    pub fn layer_types(&self) -> Vec<&'static str> {
        self.sliding_layers
            .iter()
            .map(|&s| {
                if s {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect()
    }
}

/// The hyperparameters of the model in the GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelParams {
    pub arch: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub context_length: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// Rows of the embedding matrix (can exceed the tokenizer's token count when padded).
    pub vocab_size: usize,
    /// True when the file has no separate `output.weight`: the LM head reuses the embeddings.
    pub tie_word_embeddings: bool,
    /// True when the attention projections have biases (`blk.0.attn_q.bias`).
    pub attention_bias: bool,
    pub gemma3: Option<Gemma3Params>,
}

/// Token ids the configs mention, read from `tokenizer.ggml.*`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokenIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub unk: Option<u32>,
}

impl SpecialTokenIds {
    pub fn read(gguf: &GgufFile) -> Result<Self, ImportError> {
        Ok(SpecialTokenIds {
            bos: gguf.opt_u32("tokenizer.ggml.bos_token_id")?,
            eos: gguf.opt_u32("tokenizer.ggml.eos_token_id")?,
            pad: gguf.opt_u32("tokenizer.ggml.padding_token_id")?,
            unk: gguf.opt_u32("tokenizer.ggml.unknown_token_id")?,
        })
    }
}

impl ModelParams {
    pub fn read(gguf: &GgufFile) -> Result<Self, ImportError> {
        let arch = Architecture::from_gguf_name(gguf.str("general.architecture")?)?;
        let key = |k: &str| format!("{}.{k}", arch.gguf_name());

        let hidden_size = gguf.usize(&key("embedding_length"))?;
        let num_layers = gguf.usize(&key("block_count"))?;
        let intermediate_size = gguf.usize(&key("feed_forward_length"))?;
        let context_length = gguf.usize(&key("context_length"))?;
        let num_heads = gguf.usize(&key("attention.head_count"))?;
        // llama.cpp: without the key, every head has its own K/V.
        let num_kv_heads = gguf
            .opt_usize(&key("attention.head_count_kv"))?
            .unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(ImportError::metadata(
                &key("attention.head_count_kv"),
                format!("{num_kv_heads}, which does not divide the {num_heads} attention heads"),
            ));
        }
        let head_dim = match gguf.opt_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None => hidden_size / num_heads,
        };
        if let Some(v) = gguf.opt_usize(&key("attention.value_length"))? {
            if v != head_dim {
                return Err(ImportError::UnsupportedModel(format!(
                    "value head size {v} differs from key head size {head_dim}"
                )));
            }
        }
        if let Some(rot) = gguf.opt_usize(&key("rope.dimension_count"))? {
            if rot != head_dim {
                return Err(ImportError::UnsupportedModel(format!(
                    "RoPE covers {rot} of {head_dim} head dimensions (partial rotary embeddings \
                     are not supported)"
                )));
            }
        }
        let rms_norm_eps = gguf.f64(&key("attention.layer_norm_rms_epsilon"))?;
        // llama.cpp's default base when the key is absent.
        let rope_theta = gguf.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let rope_scaling = read_rope_scaling(gguf, &key)?;

        let embd = gguf.tensor_shape("token_embd.weight").ok_or_else(|| {
            ImportError::MissingTensor {
                name: "token_embd.weight".into(),
                architecture: arch.gguf_name().into(),
            }
        })?;
        if embd.len() != 2 || embd[1] != hidden_size {
            return Err(ImportError::TensorShape {
                name: "token_embd.weight".into(),
                found: embd,
                expected: format!("[vocab, {hidden_size}]"),
            });
        }
        let vocab_size = embd[0];
        let tie_word_embeddings = gguf.tensor_shape("output.weight").is_none();
        let attention_bias = gguf.tensor_shape("blk.0.attn_q.bias").is_some();
        if arch == Architecture::Qwen2 && !attention_bias {
            return Err(ImportError::MissingTensor {
                name: "blk.0.attn_q.bias".into(),
                architecture: "qwen2".into(),
            });
        }

        let gemma3 = match arch {
            Architecture::Gemma3 => Some(read_gemma3(
                gguf,
                &key,
                num_layers,
                hidden_size,
                num_heads,
                head_dim,
            )?),
            _ => None,
        };

        Ok(ModelParams {
            arch,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            context_length,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            vocab_size,
            tie_word_embeddings,
            attention_bias,
            gemma3,
        })
    }

    /// The Hugging Face `config.json` for these parameters.
    pub fn config_json(&self, tokens: &SpecialTokenIds, dtype: OutputDType) -> Value {
        let mut c = json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.hf_model_type(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.context_length,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_json(),
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": true,
            "bos_token_id": tokens.bos,
            "eos_token_id": tokens.eos,
            "pad_token_id": tokens.pad,
            "torch_dtype": dtype.torch_name(),
        });
        let obj = c.as_object_mut().expect("json! object");
        match self.arch {
            Architecture::Llama => {
                obj.insert("hidden_act".into(), json!("silu"));
                obj.insert("attention_bias".into(), json!(self.attention_bias));
                obj.insert("mlp_bias".into(), json!(false));
                obj.insert("pretraining_tp".into(), json!(1));
            }
            Architecture::Qwen2 => {
                obj.insert("hidden_act".into(), json!("silu"));
                obj.insert("use_sliding_window".into(), json!(false));
                obj.insert("sliding_window".into(), Value::Null);
                obj.insert("max_window_layers".into(), json!(self.num_layers));
            }
            Architecture::Gemma3 => {
                let g = self.gemma3.as_ref().expect("gemma3 params read with the arch");
                obj.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
                obj.insert("attention_bias".into(), json!(self.attention_bias));
                obj.insert("query_pre_attn_scalar".into(), json!(g.query_pre_attn_scalar));
                obj.insert("sliding_window".into(), json!(g.sliding_window));
                obj.insert("layer_types".into(), json!(g.layer_types()));
                if let Some(p) = g.sliding_window_pattern() {
                    obj.insert("sliding_window_pattern".into(), json!(p));
                }
                obj.insert("rope_local_base_freq".into(), json!(g.rope_local_base_freq));
                obj.insert("attn_logit_softcapping".into(), json!(g.attn_logit_softcapping));
                obj.insert("final_logit_softcapping".into(), json!(g.final_logit_softcapping));
            }
        }
        c
    }

    fn rope_scaling_json(&self) -> Value {
        match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => json!({
                "rope_type": "linear",
                "type": "linear",
                "factor": factor,
            }),
            Some(RopeScaling::Yarn {
                factor,
                original_context_length,
            }) => json!({
                "rope_type": "yarn",
                "type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": original_context_length,
            }),
        }
    }

    /// A one-line summary of the shape of the model.
    pub fn describe(&self) -> String {
        format!(
            "{} layers, hidden {}, {} heads ({} KV) of {}, vocab {}",
            self.num_layers,
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.vocab_size
        )
    }
}

fn read_rope_scaling(
    gguf: &GgufFile,
    key: &dyn Fn(&str) -> String,
) -> Result<Option<RopeScaling>, ImportError> {
    let kind = gguf.opt_str(&key("rope.scaling.type"))?;
    let factor = gguf.opt_f64(&key("rope.scaling.factor"))?;
    match (kind, factor) {
        (None | Some("none"), _) => Ok(None),
        (Some(_), None) | (Some(_), Some(1.0)) => Ok(None),
        (Some("linear"), Some(factor)) => Ok(Some(RopeScaling::Linear { factor })),
        (Some("yarn"), Some(factor)) => Ok(Some(RopeScaling::Yarn {
            factor,
            original_context_length: gguf.usize(&key("rope.scaling.original_context_length"))?,
        })),
        (Some(other), Some(_)) => Err(ImportError::UnsupportedModel(format!(
            "RoPE scaling `{other}` is not supported (only linear and yarn)"
        ))),
    }
}

fn read_gemma3(
    gguf: &GgufFile,
    key: &dyn Fn(&str) -> String,
    num_layers: usize,
    hidden_size: usize,
    num_heads: usize,
    head_dim: usize,
) -> Result<Gemma3Params, ImportError> {
    let sliding_window = gguf.usize(&key("attention.sliding_window"))?;

    // Newer files may state the layout; llama.cpp runs files without it with every sixth layer
    // global (`set_swa_pattern(6)` for LLM_ARCH_GEMMA3).
    let pattern_key = key("attention.sliding_window_pattern");
    let sliding_layers = if gguf.is_array(&pattern_key) {
        let layers = gguf.opt_bool_array(&pattern_key)?.unwrap_or_default();
        if layers.len() != num_layers {
            return Err(ImportError::metadata(
                &pattern_key,
                format!("{} entries for {num_layers} layers", layers.len()),
            ));
        }
        layers
    } else {
        let p = gguf.opt_usize(&pattern_key)?.unwrap_or(6);
        if p == 0 {
            return Err(ImportError::metadata(&pattern_key, "0"));
        }
        (0..num_layers).map(|i| (i + 1) % p != 0).collect()
    };

    // llama.cpp uses 10000 for the local layers' RoPE base unless the file says otherwise.
    let rope_local_base_freq = gguf
        .opt_f64(&key("rope.freq_base_swa"))?
        .unwrap_or(10_000.0);

    // llama.cpp scales queries by 1/sqrt(head_dim), except for the 62-layer (27B) model, which
    // uses 1/sqrt(hidden / heads); HF expresses the same as query_pre_attn_scalar.
    let query_pre_attn_scalar = if num_layers == 62 {
        hidden_size / num_heads
    } else {
        head_dim
    };

    Ok(Gemma3Params {
        sliding_window,
        sliding_layers,
        rope_local_base_freq,
        query_pre_attn_scalar,
        attn_logit_softcapping: gguf.opt_f64(&key("attn_logit_softcapping"))?,
        final_logit_softcapping: gguf.opt_f64(&key("final_logit_softcapping"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gemma(sliding_layers: Vec<bool>) -> Gemma3Params {
        Gemma3Params {
            sliding_window: 512,
            sliding_layers,
            rope_local_base_freq: 10_000.0,
            query_pre_attn_scalar: 256,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
        }
    }

    #[test]
    fn every_sixth_layer_is_global() {
        let g = gemma((0..18).map(|i| (i + 1) % 6 != 0).collect());
        assert_eq!(g.sliding_window_pattern(), Some(6));
        let types = g.layer_types();
        assert_eq!(types[5], "full_attention");
        assert_eq!(types[11], "full_attention");
        assert_eq!(types[17], "full_attention");
        assert_eq!(types.iter().filter(|t| **t == "full_attention").count(), 3);
    }

    #[test]
    fn irregular_layout_has_no_pattern() {
        let mut layers: Vec<bool> = (0..12).map(|i| (i + 1) % 6 != 0).collect();
        layers[2] = false;
        assert_eq!(gemma(layers).sliding_window_pattern(), None);
    }

    #[test]
    fn unknown_architecture_is_named_in_the_error() {
        let err = Architecture::from_gguf_name("phi3").unwrap_err().to_string();
        assert!(err.contains("phi3") && err.contains("llama, qwen2, gemma3"), "{err}");
    }
}
