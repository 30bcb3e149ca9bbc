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

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};

type Result<T> = candle_core::Result<T>;
use serde::{Deserialize, Serialize};

use super::config::ModelConfig;
use super::ops::{fusable, gemm, input, matmul, Real};

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

    fn from_str(s: &str) -> std::result::Result<Self, String> {
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
    pub fn new(
        rank: usize,
        alpha: f64,
        mut targets: Vec<LoraTarget>,
    ) -> std::result::Result<Self, String> {
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
    pub fn parse_targets(list: &str) -> std::result::Result<Vec<LoraTarget>, String> {
        if list.trim() == "all-linear" {
            return Ok(LoraTarget::ALL.to_vec());
        }
        if list.split(',').any(|s| s.trim() == "all-linear") {
            return Err("all-linear names every layer: give it alone, not in a list".into());
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
    /// `x W^T (+ bias) + scale (x A^T) B^T` for `x: (n, in)`, with `weight` and `bias`
    /// frozen (they get no gradient).
    ///
    /// Composed from candle ops, the frozen product, the update and their sum are three
    /// output-wide tensors that the graph keeps until the backward pass, and the sum is
    /// one more pass over them. On the CPU ([`AdaptedLinear`]) the update is accumulated
    /// into the frozen product's buffer by the matmul itself, so an adapted layer keeps
    /// what a plain one keeps; the backward pass recomputes the rank-wide `x A^T`.
    pub fn forward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        fused: bool,
    ) -> Result<Tensor> {
        let same = |t: &Tensor| t.dtype() == x.dtype() && t.is_contiguous();
        if fused
            && fusable(x)
            && [weight, &self.a, &self.b].into_iter().all(same)
            && bias.is_none_or(same)
        {
            let op = AdaptedLinear {
                weight: weight.detach(),
                bias: bias.map(Tensor::detach),
                scale: self.scale,
            };
            return x.contiguous()?.apply_op3(&self.a, &self.b, op);
        }
        let y = matmul(x, &weight.t()?)?;
        let y = match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        // The scale on the rank-wide product, not on the output-wide one.
        y + matmul(&(matmul(x, &self.a.t()?)? * self.scale)?, &self.b.t()?)?
    }

    /// `W + scale B A`: the weight that computes what `W` and the adapter compute together.
    pub fn merged(&self, weight: &Tensor) -> Result<Tensor> {
        weight + (matmul(&self.b, &self.a)? * self.scale)?
    }
}

/// [`Adapter::forward`] on the CPU: inputs `x: (n, in)`, `A: (r, in)`, `B: (out, r)`,
/// contiguous f32/f64; the frozen weight and bias ride along in the op.
struct AdaptedLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f64,
}

impl AdaptedLinear {
    fn forward<T: Real>(&self, x: &[T], a: &[T], b: &[T], n: usize) -> Result<Vec<T>> {
        let (out, input_len) = self.weight.dims2()?;
        let rank = a.len() / input_len;
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(w_cpu) = &*w_storage else {
            candle_core::bail!("adapted linear: the weight is not on the CPU")
        };
        let w = input::<T>(w_cpu, w_layout, "adapted linear weight")?;
        let mut y = vec![T::ZERO; n * out];
        let mut u = vec![T::ZERO; n * rank];
        let (x, w, a, b) = (x.as_ptr(), w.as_ptr(), a.as_ptr(), b.as_ptr());
        // SAFETY: every matrix below lies inside its buffer with the strides given.
        unsafe {
            // y = x W^T; u = x A^T; y += scale u B^T.
            let (yp, up) = ((y.as_mut_ptr(), out), (u.as_mut_ptr(), rank));
            gemm(
                (n, out, input_len),
                yp,
                false,
                T::ONE,
                (x, input_len, 1),
                (w, 1, input_len),
                true,
            );
            gemm(
                (n, rank, input_len),
                up,
                false,
                T::ONE,
                (x, input_len, 1),
                (a, 1, input_len),
                true,
            );
            let scale = T::from_f64(self.scale);
            gemm(
                (n, out, rank),
                yp,
                true,
                scale,
                (u.as_ptr(), rank, 1),
                (b, 1, rank),
                true,
            );
        }
        if let Some(bias) = &self.bias {
            let (b_storage, b_layout) = bias.storage_and_layout();
            let Storage::Cpu(b_cpu) = &*b_storage else {
                candle_core::bail!("adapted linear: the bias is not on the CPU")
            };
            let bias = input::<T>(b_cpu, b_layout, "adapted linear bias")?;
            for row in y.chunks_mut(out) {
                row.iter_mut().zip(bias).for_each(|(y, &b)| *y = *y + b);
            }
        }
        Ok(y)
    }
}

impl CustomOp3 for AdaptedLinear {
    fn name(&self) -> &'static str {
        "adapted-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, out) = (l1.dims()[0], self.weight.dim(0)?);
        let storage = match s1 {
            CpuStorage::F32(_) => {
                let (x, a, b) = (
                    input(s1, l1, "x")?,
                    input(s2, l2, "A")?,
                    input(s3, l3, "B")?,
                );
                f32::storage(self.forward::<f32>(x, a, b, n)?)
            }
            CpuStorage::F64(_) => {
                let (x, a, b) = (
                    input(s1, l1, "x")?,
                    input(s2, l2, "A")?,
                    input(s3, l3, "B")?,
                );
                f64::storage(self.forward::<f64>(x, a, b, n)?)
            }
            _ => candle_core::bail!("adapted linear: f32 or f64 only"),
        };
        Ok((storage, Shape::from((n, out))))
    }

    /// With `v = dy B`: `dx = dy W + scale v A`, `dA = scale v^T x`,
    /// `dB = scale dy^T (x A^T)`.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let v = (dy.matmul(&b)? * self.scale)?;
        let dx = (dy.matmul(&self.weight)? + v.matmul(&a)?)?;
        let da = v.t()?.matmul(&x)?;
        let u = (x.matmul(&a.t()?)? * self.scale)?;
        let db = dy.t()?.matmul(&u)?;
        Ok((Some(dx), Some(da), Some(db)))
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
        assert!(LoraConfig::parse_targets("all-linear,q_proj")
            .unwrap_err()
            .contains("alone"));
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
