//! Trainable causal language models in candle: llama, qwen2 and gemma3 (text), loaded from
//! and saved to Hugging Face folders (`config.json` + `model.safetensors`), with every weight
//! a `candle_core::Var` and a forward pass that records a full backward graph.
//!
//! ```no_run
//! # use fusechat_train::model::CausalLm;
//! # use candle_core::{Device, Tensor, DType};
//! let dev = Device::Cpu;
//! let model = CausalLm::load("path/to/hf-folder".as_ref(), &dev)?;
//! let ids = Tensor::new(&[[1u32, 2, 3]], &dev)?;
//! let logits = model.forward(&ids)?; // (1, 3, vocab)
//! let grads = logits.sum_all()?.backward()?;
//! for (name, var) in model.parameters() {
//!     let _g = grads.get(var.as_tensor());
//! }
//! model.save("out".as_ref(), DType::BF16)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod config;
mod gemma3;
mod layers;
mod llama;
mod lora;
mod ops;
mod packed_attention;
mod recompute;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

pub use config::{Activation, Architecture, ModelConfig, RopeScaling};
pub use lora::{adapter_name, LoraConfig, LoraTarget, PeftAdapterConfig};
pub use ops::token_logprobs;

use layers::{Linear, Sequences};
use lora::Adapter;

/// What can go wrong loading, running or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error(
        "no weights in {}: expected model.safetensors (or model.safetensors.index.json with its \
         shards); convert the checkpoint to safetensors or import it with `fusechat models import`",
        dir.display()
    )]
    NoWeights { dir: PathBuf },
    #[error("cannot read the weights {}: {message}", path.display())]
    Weights { path: PathBuf, message: String },
    #[error(
        "tensor `{name}` is missing from {}: the checkpoint does not match its config.json \
         ({arch:?}, {layers} layers); check `architectures`, `num_hidden_layers` and \
         `tie_word_embeddings`",
        path.display()
    )]
    MissingTensor {
        name: String,
        path: PathBuf,
        arch: Architecture,
        layers: usize,
    },
    #[error(
        "tensor `{name}` in {} has shape {found:?} where config.json implies {expected:?}; \
         the config does not describe these weights",
        path.display()
    )]
    Shape {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` in {} has dtype {dtype:?}; only f32, f16 and bf16 weights are supported", path.display())]
    Dtype {
        name: String,
        path: PathBuf,
        dtype: DType,
    },
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("cannot save in {dtype:?}: use DType::F32, DType::BF16 or DType::F16")]
    SaveDtype { dtype: DType },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub(crate) type Result<T> = std::result::Result<T, ModelError>;

/// How a parameter is initialized by [`CausalLm::random`].
#[derive(Debug, Clone, Copy)]
enum Init {
    /// N(0, 0.02) (the transformers `initializer_range`).
    Normal,
    /// Llama norm: 1 + N(0, 0.1); Gemma norm (used as `1 + w`): N(0, 0.1).
    Norm { centre: f64 },
    /// Biases: N(0, 0.02).
    Bias,
}

struct ParamSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

/// The parameters of an architecture, with Hugging Face names, in transformers'
/// `named_parameters()` order. A tied lm_head is not listed (it is the embedding).
fn param_specs(config: &ModelConfig) -> Vec<ParamSpec> {
    let arch = config.architecture();
    let gemma = arch == Architecture::Gemma3;
    let (h, i, v) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let (d, nh, nkv) = (
        config.head_dim(),
        config.num_attention_heads,
        config.num_kv_heads(),
    );
    let norm = Init::Norm {
        centre: if gemma { 0.0 } else { 1.0 },
    };
    let mut specs = Vec::new();
    let mut push =
        |name: String, shape: Vec<usize>, init: Init| specs.push(ParamSpec { name, shape, init });
    push("model.embed_tokens.weight".into(), vec![v, h], Init::Normal);
    let (qkv_bias, o_bias, mlp_bias) = (config.qkv_bias(), config.o_bias(), config.mlp_bias());
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (proj, out, inp, bias) in [
            ("q_proj", nh * d, h, qkv_bias),
            ("k_proj", nkv * d, h, qkv_bias),
            ("v_proj", nkv * d, h, qkv_bias),
            ("o_proj", h, nh * d, o_bias),
        ] {
            push(
                format!("{p}.self_attn.{proj}.weight"),
                vec![out, inp],
                Init::Normal,
            );
            if bias {
                push(format!("{p}.self_attn.{proj}.bias"), vec![out], Init::Bias);
            }
        }
        if gemma {
            push(format!("{p}.self_attn.q_norm.weight"), vec![d], norm);
            push(format!("{p}.self_attn.k_norm.weight"), vec![d], norm);
        }
        for (proj, out, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
            push(
                format!("{p}.mlp.{proj}.weight"),
                vec![out, inp],
                Init::Normal,
            );
            if mlp_bias {
                push(format!("{p}.mlp.{proj}.bias"), vec![out], Init::Bias);
            }
        }
        push(format!("{p}.input_layernorm.weight"), vec![h], norm);
        push(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            norm,
        );
        if gemma {
            push(
                format!("{p}.pre_feedforward_layernorm.weight"),
                vec![h],
                norm,
            );
            push(
                format!("{p}.post_feedforward_layernorm.weight"),
                vec![h],
                norm,
            );
        }
    }
    push("model.norm.weight".into(), vec![h], norm);
    if !config.tied_embeddings() {
        push("lm_head.weight".into(), vec![v, h], Init::Normal);
    }
    specs
}

/// Name -> tensor lookup used while assembling an architecture.
pub(crate) struct Weights {
    map: HashMap<String, Tensor>,
    source: PathBuf,
    /// The LoRA scale when the map holds adapters (under their peft names).
    lora_scale: Option<f64>,
}

impl Weights {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.map.get(name).cloned().ok_or_else(|| {
            ModelError::InvalidConfig(format!("internal: parameter `{name}` was not created"))
        })
    }

    /// The linear layer `module` (`model.layers.0.self_attn.q_proj`), with its bias when
    /// `bias`, and its LoRA adapter when it has one.
    fn linear(&self, module: &str, bias: bool) -> Result<Linear> {
        let adapter = match self.lora_scale {
            Some(scale) if self.map.contains_key(&adapter_name(module, 'A')) => Some(Adapter {
                a: self.get(&adapter_name(module, 'A'))?,
                b: self.get(&adapter_name(module, 'B'))?,
                scale,
            }),
            _ => None,
        };
        Ok(Linear {
            weight: self.get(&format!("{module}.weight"))?,
            bias: if bias {
                Some(self.get(&format!("{module}.bias"))?)
            } else {
                None
            },
            adapter,
        })
    }

    fn config_error(&self, message: String) -> ModelError {
        ModelError::Config {
            path: self.source.join("config.json"),
            message,
        }
    }
}

#[derive(Clone)]
enum Body {
    Llama(llama::Llama),
    Gemma3(gemma3::Gemma3),
}

impl Body {
    fn new(config: &ModelConfig, weights: &Weights) -> Result<Self> {
        Ok(match config.architecture() {
            Architecture::Llama | Architecture::Qwen2 => {
                Body::Llama(llama::Llama::new(config, weights)?)
            }
            Architecture::Gemma3 => Body::Gemma3(gemma3::Gemma3::new(config, weights)?),
        })
    }
}

/// The adapters of a LoRA model, under their peft names.
struct Lora {
    config: LoraConfig,
    adapters: Vec<(String, Var)>,
}

/// A trainable causal LM: the parameters are `Var`s (f32 when loaded), the forward pass is
/// fully differentiable. With LoRA ([`CausalLm::with_lora`]) the model's own weights are
/// frozen and only the adapters train.
pub struct CausalLm {
    config: ModelConfig,
    /// config.json as read (or as serialized for a random model), rewritten on save.
    raw_config: serde_json::Value,
    /// The model's own weights, under their Hugging Face names.
    params: Vec<(String, Var)>,
    lora: Option<Lora>,
    body: Body,
    dtype: DType,
    device: Device,
    fused: bool,
    /// Set under gradient checkpointing: the weight gradients its blocks find.
    recomputed: Option<Arc<recompute::Recomputed>>,
}

impl CausalLm {
    /// Loads config.json and model.safetensors (bf16/f16/f32 on disk; sharded checkpoints
    /// with model.safetensors.index.json too) from a Hugging Face folder into trainable f32
    /// `Var`s on `device`. A missing tensor is an error naming it; extra tensors are ignored.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_with_dtype(dir, device, DType::F32)
    }

    /// [`CausalLm::load`] into `dtype` variables (F32 or BF16 for training; F64 for exact
    /// checks).
    pub fn load_with_dtype(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        check_param_dtype(dtype)?;
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
            what: "read the model config".into(),
            path: config_path.clone(),
            source,
        })?;
        let raw_config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Config {
                path: config_path.clone(),
                message: format!("not valid JSON: {e}"),
            })?;
        let config = ModelConfig::from_value(&raw_config, &config_path)?;
        let files = weight_files(dir)?;
        let shown = files[0].clone();
        // SAFETY: the files are memory-mapped read-only; they must not be modified while
        // loading, which is the usual contract for safetensors checkpoints.
        let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| ModelError::Weights {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        let available: HashSet<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        let arch = config.architecture();
        let mut params = Vec::new();
        for spec in param_specs(&config) {
            if !available.contains(&spec.name) {
                return Err(ModelError::MissingTensor {
                    name: spec.name,
                    path: shown,
                    arch,
                    layers: config.num_hidden_layers,
                });
            }
            let t = st
                .load(&spec.name, &Device::Cpu)
                .map_err(|e| ModelError::Weights {
                    path: shown.clone(),
                    message: format!("tensor `{}`: {e}", spec.name),
                })?;
            if !matches!(
                t.dtype(),
                DType::F32 | DType::F16 | DType::BF16 | DType::F64
            ) {
                return Err(ModelError::Dtype {
                    name: spec.name,
                    path: shown,
                    dtype: t.dtype(),
                });
            }
            if t.dims() != spec.shape.as_slice() {
                return Err(ModelError::Shape {
                    name: spec.name,
                    path: shown,
                    expected: spec.shape,
                    found: t.dims().to_vec(),
                });
            }
            let t = t.to_dtype(dtype)?.to_device(device)?;
            params.push((spec.name, Var::from_tensor(&t)?));
        }
        let used: HashSet<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
        let unused: Vec<&String> = available
            .iter()
            .filter(|n| !used.contains(n.as_str()) && n.as_str() != "lm_head.weight")
            .collect();
        if !unused.is_empty() {
            tracing::warn!(dir = %dir.display(), ?unused, "tensors not used by the model");
        }
        Self::assemble(config, raw_config, params, dir, dtype, device)
    }

    /// Freezes the model's weights and adds LoRA adapters to the `lora` targets of every
    /// layer: `A` drawn from `seed` as peft draws it, `B` zero, so the model computes what
    /// it computed before. [`CausalLm::parameters`] are then the adapters.
    pub fn with_lora(mut self, lora: LoraConfig, seed: u64) -> Result<Self> {
        if self.lora.is_some() {
            return Err(ModelError::InvalidConfig(
                "the model already has LoRA adapters".into(),
            ));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut adapters = Vec::new();
        for (module, target) in lora.modules(&self.config) {
            let (fan_in, fan_out) = target.features(&self.config);
            // peft: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)).
            let bound = 1.0 / (fan_in as f64).sqrt();
            let a: Vec<f64> = (0..lora.rank() * fan_in)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let a =
                Tensor::from_vec(a, (lora.rank(), fan_in), &self.device)?.to_dtype(self.dtype)?;
            let b = Tensor::zeros((fan_out, lora.rank()), self.dtype, &self.device)?;
            adapters.push((adapter_name(&module, 'A'), Var::from_tensor(&a)?));
            adapters.push((adapter_name(&module, 'B'), Var::from_tensor(&b)?));
        }
        // The body reads the weights through detached tensors (same storage): no gradient
        // is recorded for them.
        let map = self
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .chain(
                adapters
                    .iter()
                    .map(|(n, v)| (n.clone(), v.as_tensor().clone())),
            )
            .collect();
        let weights = Weights {
            map,
            source: PathBuf::from("<lora>"),
            lora_scale: Some(lora.scale()),
        };
        self.body = Body::new(&self.config, &weights)?;
        self.lora = Some(Lora {
            config: lora,
            adapters,
        });
        Ok(self)
    }

    /// The LoRA settings, when the model trains adapters.
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.lora.as_ref().map(|l| &l.config)
    }

    /// Random init (for unit tests; tiny configs), f32.
    pub fn random(config: ModelConfig, device: &Device, seed: u64) -> Result<Self> {
        Self::random_with_dtype(config, device, seed, DType::F32)
    }

    /// Random init in `dtype` (F32, or F64 for finite-difference checks). Weights are
    /// N(0, 0.02); norm weights are perturbed around their identity value so that tests see
    /// non-trivial norms; the same seed gives the same values on any device.
    pub fn random_with_dtype(
        config: ModelConfig,
        device: &Device,
        seed: u64,
        dtype: DType,
    ) -> Result<Self> {
        check_param_dtype(dtype)?;
        config.validate().map_err(ModelError::InvalidConfig)?;
        let raw_config = serde_json::to_value(&config)
            .map_err(|e| ModelError::InvalidConfig(format!("config does not serialize: {e}")))?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut normal = move |mean: f64, std: f64| -> f64 {
            // Box-Muller.
            let u1: f64 = rng.random::<f64>().max(1e-300);
            let u2: f64 = rng.random::<f64>();
            mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        };
        let mut params = Vec::new();
        for spec in param_specs(&config) {
            let n: usize = spec.shape.iter().product();
            let values: Vec<f64> = (0..n)
                .map(|_| match spec.init {
                    Init::Normal | Init::Bias => normal(0.0, 0.02),
                    Init::Norm { centre } => normal(centre, 0.1),
                })
                .collect();
            let t = Tensor::from_vec(values, spec.shape.as_slice(), device)?.to_dtype(dtype)?;
            params.push((spec.name, Var::from_tensor(&t)?));
        }
        Self::assemble(
            config,
            raw_config,
            params,
            Path::new("<random>"),
            dtype,
            device,
        )
    }

    fn assemble(
        config: ModelConfig,
        raw_config: serde_json::Value,
        params: Vec<(String, Var)>,
        source: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let weights = Weights {
            map: params
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect(),
            source: source.to_path_buf(),
            lora_scale: None,
        };
        let body = Body::new(&config, &weights)?;
        Ok(Self {
            config,
            raw_config,
            params,
            lora: None,
            body,
            dtype,
            device: device.clone(),
            fused: true,
            recomputed: None,
        })
    }

    /// `input_ids: (batch, seq)` u32 (i64 is accepted) -> logits `(batch, seq, vocab)` in the
    /// parameter dtype (f32). Causal attention; rows are right-padded by the caller, so no
    /// padding mask is applied.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (rows, len) = input_ids.dims2().map_err(|_| {
            ModelError::Input(format!(
                "input_ids must be (batch, seq), got shape {:?}",
                input_ids.dims()
            ))
        })?;
        self.run(input_ids, &Sequences::Padded { rows, len }, None)
    }

    /// Sequences packed end to end with no padding: `input_ids: (sum of lens,)` holds
    /// sequence after sequence, `lens` their lengths. Each sequence attends only to itself
    /// and its positions start at 0, so its logits are those of the sequence alone.
    /// `rows` (u32) picks the positions whose logits are wanted; returns `(rows, vocab)`.
    /// Training needs the vocabulary projection only where a token is learned, which saves
    /// its matmul (and memory) on prompt positions, and packing saves every padded
    /// position's work in every layer.
    pub fn forward_packed(
        &self,
        input_ids: &Tensor,
        lens: &[usize],
        rows: &Tensor,
    ) -> Result<Tensor> {
        let total: usize = lens.iter().sum();
        if input_ids.dims() != [total] || lens.contains(&0) {
            return Err(ModelError::Input(format!(
                "packed input_ids must be (sum of lens,) = ({total},) with no empty sequence, \
                 got shape {:?} for lens {lens:?}",
                input_ids.dims()
            )));
        }
        let rows = rows.to_device(&self.device)?;
        let seqs = Sequences::Packed { lens: lens.into() };
        self.run(input_ids, &seqs, Some(&rows))
    }

    fn run(&self, input_ids: &Tensor, seqs: &Sequences, rows: Option<&Tensor>) -> Result<Tensor> {
        let (b, s) = seqs.dims();
        if b == 0 || s == 0 {
            return Err(ModelError::Input(format!(
                "input_ids is empty: shape {:?}",
                input_ids.dims()
            )));
        }
        let ids = match input_ids.dtype() {
            DType::U32 => input_ids.clone(),
            DType::I64 | DType::U8 => input_ids.to_dtype(DType::U32)?,
            other => {
                return Err(ModelError::Input(format!(
                    "input_ids must be u32 token ids, got {other:?}"
                )))
            }
        };
        let ids = ids.to_device(&self.device)?;
        let checkpointing = self.checkpointing();
        let checkpointing = checkpointing.as_ref();
        let logits = match &self.body {
            Body::Llama(m) => m.forward(&ids, seqs, self.fused, rows, checkpointing)?,
            Body::Gemma3(m) => m.forward(&ids, seqs, self.fused, rows, checkpointing)?,
        };
        Ok(logits)
    }

    /// Gradient checkpointing: each decoder block keeps only its input for the backward
    /// pass and runs again there, trading about a third more arithmetic for every
    /// block's activations but one. The gradients are those without it (up to the order
    /// of float sums); take them with [`CausalLm::backward`].
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.recomputed = on.then(Default::default);
    }

    pub fn gradient_checkpointing(&self) -> bool {
        self.recomputed.is_some()
    }

    fn checkpointing(&self) -> Option<recompute::Checkpointing> {
        let found = self.recomputed.as_ref()?;
        let params = self.parameters().iter().map(|(_, v)| v.clone()).collect();
        Some(recompute::Checkpointing {
            found: Arc::clone(found),
            params: Arc::new(params),
        })
    }

    /// The gradients of `loss` (a scalar computed from this model's outputs) for every
    /// tensor of its graph, the trainable parameters included. Under gradient
    /// checkpointing the blocks' weight gradients come from their recomputation, which
    /// `loss.backward()` alone does not return.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        if let Some(found) = &self.recomputed {
            found.clear();
        }
        let mut grads = loss.backward()?;
        if let Some(found) = &self.recomputed {
            found.merge_into(&mut grads)?;
        }
        Ok(grads)
    }

    /// Trainable parameters with their Hugging Face names, in transformers'
    /// `named_parameters()` order. A tied embedding appears once (as
    /// `model.embed_tokens.weight`) and is used for both embedding and lm_head, so its
    /// gradient has both contributions. With LoRA: the adapters, under the names peft
    /// saves them with, layer by layer.
    pub fn parameters(&self) -> &[(String, Var)] {
        match &self.lora {
            Some(lora) => &lora.adapters,
            None => &self.params,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Whether the fused CPU kernels are used (the default). With `false` every device runs
    /// the plain composition of candle ops (what CUDA runs); for tests and comparisons.
    pub fn set_fused_kernels(&mut self, fused: bool) {
        self.fused = fused;
    }

    /// What a packed forward pass keeps for the backward pass, by the kernels it runs:
    /// the fused CPU kernels recompute the attention scores (not with Gemma's
    /// soft-capping, which runs composed) and accumulate LoRA updates in place; gradient
    /// checkpointing keeps only each block's input.
    pub fn kept(&self) -> crate::memory::Kept {
        let fused =
            self.fused && self.device.is_cpu() && matches!(self.dtype, DType::F32 | DType::F64);
        crate::memory::Kept {
            attention_scores: !(fused && self.config.attn_logit_softcapping.is_none()),
            lora_updates: !fused,
            block_activations: self.recomputed.is_none(),
        }
    }

    /// Dtype of the parameters and logits.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of scalar parameters of the model itself (adapters not counted).
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Number of scalar parameters that train: the model's, or its adapters' under LoRA.
    pub fn num_trainable_parameters(&self) -> usize {
        self.parameters().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The file of a folder written by [`CausalLm::save_trainable`].
    pub fn trainable_file(&self) -> &'static str {
        match self.lora {
            Some(_) => ADAPTER_WEIGHTS,
            None => MODEL_WEIGHTS,
        }
    }

    /// What a checkpoint needs to restore the trainable parameters, in f32: the whole
    /// model ([`CausalLm::save`]) or, under LoRA, the adapter folder
    /// ([`CausalLm::save_adapter`]).
    pub fn save_trainable(&self, dir: &Path) -> Result<()> {
        match self.lora {
            Some(_) => self.save_adapter(dir, None),
            None => self.save(dir, DType::F32),
        }
    }

    /// Writes the LoRA adapters as peft saves them: `dir/adapter_model.safetensors` (f32)
    /// and `dir/adapter_config.json`, with `base` as `base_model_name_or_path`.
    pub fn save_adapter(&self, dir: &Path, base: Option<String>) -> Result<()> {
        let lora = self.lora.as_ref().ok_or_else(|| {
            ModelError::InvalidConfig("the model has no LoRA adapters to save".into())
        })?;
        let tensors = lora
            .adapters
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        write_safetensors(dir, ADAPTER_WEIGHTS, tensors, DType::F32)?;
        let config = PeftAdapterConfig::new(&lora.config, base);
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| ModelError::InvalidConfig(format!("adapter config: {e}")))?;
        write_atomically(dir, "adapter_config.json", text.as_bytes())
    }

    /// The model's weights as they compute: under LoRA, each adapted weight merged with its
    /// adapter (`W + scale B A`).
    fn weights_as_computed(&self) -> Result<Vec<(String, Tensor)>> {
        let Some(lora) = &self.lora else {
            return Ok(self
                .params
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect());
        };
        let adapters: HashMap<&str, &Var> =
            lora.adapters.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let mut out = Vec::with_capacity(self.params.len());
        for (name, var) in &self.params {
            let module = name.strip_suffix(".weight");
            let pair = module.and_then(|m| {
                let a = adapters.get(adapter_name(m, 'A').as_str())?;
                let b = adapters.get(adapter_name(m, 'B').as_str())?;
                Some((a.as_tensor().clone(), b.as_tensor().clone()))
            });
            let weight = match pair {
                Some((a, b)) => Adapter {
                    a,
                    b,
                    scale: lora.config.scale(),
                }
                .merged(var.as_tensor())?,
                None => var.as_tensor().clone(),
            };
            out.push((name.clone(), weight));
        }
        Ok(out)
    }

    /// Writes `dir/model.safetensors` with the Hugging Face names in `dtype` (F32, BF16 or
    /// F16), atomically (temporary file in `dir`, fsync, rename), and `dir/config.json` (the
    /// original config with `torch_dtype` set) the same way. `dir` is created if needed.
    /// Under LoRA the adapters are merged into the weights they adapt: the folder is a plain
    /// model that computes what this one computes. Tokenizer files are the caller's.
    pub fn save(&self, dir: &Path, dtype: DType) -> Result<()> {
        let dtype_name = match dtype {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            other => return Err(ModelError::SaveDtype { dtype: other }),
        };
        write_safetensors(dir, MODEL_WEIGHTS, self.weights_as_computed()?, dtype)?;
        let mut config = self.raw_config.clone();
        if let Some(obj) = config.as_object_mut() {
            obj.insert("torch_dtype".into(), dtype_name.into());
            if obj.contains_key("dtype") {
                obj.insert("dtype".into(), dtype_name.into());
            }
        }
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| ModelError::InvalidConfig(format!("config does not serialize: {e}")))?;
        write_atomically(dir, "config.json", text.as_bytes())
    }
}

const MODEL_WEIGHTS: &str = "model.safetensors";
const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

fn io_error(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> ModelError {
    let what = what.to_string();
    let path = path.to_path_buf();
    move |source| ModelError::Io { what, path, source }
}

/// Writes `tensors` in `dtype` to `dir/name` as safetensors (a temporary file in `dir`,
/// fsynced, renamed into place); `dir` is created if needed.
fn write_safetensors(
    dir: &Path,
    name: &str,
    tensors: Vec<(String, Tensor)>,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_error("create the folder", dir))?;
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_dtype(dtype)?.to_device(&Device::Cpu)?.contiguous()?;
        views.push((name, TensorBytes::new(&t)?));
    }
    let target = dir.join(name);
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io_error("create a temporary file in", dir))?;
    safetensors::serialize_to_file(views, metadata, tmp.path()).map_err(|e| {
        ModelError::Weights {
            path: tmp.path().to_path_buf(),
            message: format!("writing failed: {e}"),
        }
    })?;
    persist(tmp, &target)
}

/// Writes `bytes` to `dir/name` the same way; `dir` is created if needed.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_error("create the folder", dir))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io_error("create a temporary file in", dir))?;
    tmp.write_all(bytes)
        .map_err(io_error("write", tmp.path()))?;
    persist(tmp, &dir.join(name))
}

/// fsync, rename into place, and make the rename durable.
fn persist(tmp: tempfile::NamedTempFile, target: &Path) -> Result<()> {
    tmp.as_file()
        .sync_all()
        .map_err(io_error("fsync", tmp.path()))?;
    tmp.persist(target).map_err(|e| ModelError::Io {
        what: "rename a temporary file to".into(),
        path: target.to_path_buf(),
        source: e.error,
    })?;
    if let Some(dir) = target.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl std::fmt::Debug for CausalLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CausalLm")
            .field("architecture", &self.config.architecture())
            .field("parameters", &self.num_parameters())
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .finish()
    }
}

fn check_param_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F64 => Ok(()),
        other => Err(ModelError::InvalidConfig(format!(
            "parameters must be F32 or BF16 (or F64 for checks), not {other:?}"
        ))),
    }
}

/// The safetensors files of a folder: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(ModelError::NoWeights {
            dir: dir.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
        what: "read".into(),
        path: index.clone(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::Weights {
            path: index.clone(),
            message: format!("not valid JSON: {e}"),
        })?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Weights {
            path: index.clone(),
            message: "no `weight_map` object".into(),
        })?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(ModelError::Weights {
            path: index,
            message: format!("lists the shard {} which does not exist", missing.display()),
        });
    }
    if files.is_empty() {
        return Err(ModelError::NoWeights {
            dir: dir.to_path_buf(),
        });
    }
    Ok(files)
}

/// A CPU tensor's little-endian bytes, as the safetensors writer wants them.
struct TensorBytes {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl TensorBytes {
    fn new(t: &Tensor) -> Result<Self> {
        let flat = t.flatten_all()?;
        let (dtype, data) = match t.dtype() {
            DType::F32 => (
                safetensors::Dtype::F32,
                flat.to_vec1::<f32>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                safetensors::Dtype::BF16,
                flat.to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            DType::F16 => (
                safetensors::Dtype::F16,
                flat.to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            other => return Err(ModelError::SaveDtype { dtype: other }),
        };
        Ok(Self {
            dtype,
            shape: t.dims().to_vec(),
            data,
        })
    }
}

impl safetensors::View for TensorBytes {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}
