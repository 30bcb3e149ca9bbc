//! Differentiable building blocks shared by the architectures: linear layers, RMSNorm,
//! rotary embeddings, causal (optionally sliding-window) attention with grouped kv heads.
//!
//! Everything here is written with candle ops that record a backward pass. candle-nn's fused
//! `softmax_last_dim`, `rms_norm` and `rotary_emb::rope*` do NOT (the gradient silently
//! stops there), so they are not used.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use super::config::{Activation, RopeScaling};
use super::lora::Adapter;
use super::ops::{self, Gate};
use super::packed_attention::packed_attention;

pub(crate) type Result<T> = candle_core::Result<T>;

/// `y = x W^T (+ b)` on a 2-D input `(n, in)`, plus the LoRA update when adapted.
#[derive(Clone)]
pub(crate) struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub adapter: Option<Adapter>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        if let Some(adapter) = &self.adapter {
            return adapter.forward(x, &self.weight, self.bias.as_ref(), fused);
        }
        let y = ops::matmul(x, &self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * w`, or `* (1 + w)` for
/// Gemma (`plus_one`).
#[derive(Clone)]
pub(crate) struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
    pub plus_one: bool,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        if self.plus_one {
            ops::rms_norm(x, &(&self.weight + 1.0)?, self.eps, fused)
        } else {
            ops::rms_norm(x, &self.weight, self.eps, fused)
        }
    }
}

/// Gated feed-forward: `down(act(gate(x)) * up(x))`.
#[derive(Clone)]
pub(crate) struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub act: Activation,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        let g = self.gate.forward(x, fused)?;
        let u = self.up.forward(x, fused)?;
        let h = match self.act {
            Activation::Silu => ops::gated(&g, &u, Gate::Silu, fused)?,
            Activation::GeluTanh => ops::gated(&g, &u, Gate::GeluTanh, fused)?,
            Activation::GeluErf => (g.gelu_erf()? * u)?,
        };
        self.down.forward(&h, fused)
    }
}

/// Inverse RoPE frequencies, computed in f32 as transformers does.
pub(crate) fn inv_freq(head_dim: usize, theta: f64, scaling: RopeScaling) -> Vec<f32> {
    let base = theta as f32;
    let freqs: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    match scaling {
        RopeScaling::None => freqs,
        RopeScaling::Linear { factor } => freqs.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            freqs
                .iter()
                .map(|&f| {
                    let f = f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                    } else {
                        scaled as f32
                    }
                })
                .collect()
        }
    }
}

/// How the tokens of one forward pass are laid out (owned, so that a checkpointed block
/// can run again in the backward pass).
#[derive(Debug, Clone)]
pub(crate) enum Sequences {
    /// `rows` sequences of `len` tokens each (right-padded by the caller).
    Padded { rows: usize, len: usize },
    /// Sequences of these lengths end to end, no padding: attention stays within each
    /// sequence and positions restart at 0 for each.
    Packed { lens: Arc<[usize]> },
}

impl Sequences {
    /// `(b, s)` of the activations: `(rows, len)`, or one row of every token when packed.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Sequences::Padded { rows, len } => (*rows, *len),
            Sequences::Packed { lens } => (1, lens.iter().sum()),
        }
    }

    /// The position of each token along the activations' sequence dimension.
    pub fn positions(&self) -> Vec<usize> {
        match self {
            Sequences::Padded { len, .. } => (0..*len).collect(),
            Sequences::Packed { lens } => lens.iter().flat_map(|&n| 0..n).collect(),
        }
    }
}

/// cos/sin tables `(positions, head_dim/2)` (no gradient), in `dtype`.
/// `scale` multiplies both tables (used to fold the attention scale into the queries).
#[derive(Clone)]
pub(crate) struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTables {
    pub fn new(
        inv_freq: &[f32],
        positions: &[usize],
        scale: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (seq, half) = (positions.len(), inv_freq.len());
        let mut cos = Vec::with_capacity(seq * half);
        let mut sin = Vec::with_capacity(seq * half);
        for &p in positions {
            for &f in inv_freq {
                // In f32 like transformers (which casts the f32 tables to the model dtype).
                let angle = p as f32 * f;
                cos.push(angle.cos() as f64 * scale);
                sin.push(angle.sin() as f64 * scale);
            }
        }
        let cos = Tensor::from_vec(cos, (seq, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (seq, half), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }
}

/// Additive attention mask `(seq, seq)`: 0 where query `i` may see key `j` (`j <= i`, and
/// `i - j < window` when a window is given), a large negative value elsewhere.
pub(crate) fn attention_mask(
    seq: usize,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let neg = f32::NEG_INFINITY;
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..seq).map(move |j| {
                let visible = j <= i && window.is_none_or(|w| i - j < w);
                if visible {
                    0.0
                } else {
                    neg
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (seq, seq), device)?.to_dtype(dtype)
}

/// Numerically stable softmax over the last dimension. The max is detached: softmax does
/// not depend on it, and this keeps its (zero) gradient out of the graph.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_mul(&sum.recip()?)
}

/// Scaled dot-product attention with grouped kv heads.
///
/// `q: (b, h, s, d)` already scaled, `k, v: (b, kv, s, d)`, contiguous; causal, and keys
/// limited to `window` positions back when given. The `h / kv` query heads sharing a kv
/// head are folded into the row dimension of one batched matmul, so kv heads are never
/// copied. Returns `(b * s, h * d)`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
    softcap: Option<f64>,
    fused: bool,
) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let rep = h / kv;
    let q = q.reshape((b * kv, rep * s, d))?;
    let k = k.reshape((b * kv, s, d))?;
    let v = v.reshape((b * kv, s, d))?;
    let mut scores = ops::matmul(&q, &k.t()?)?; // (b*kv, rep*s, s)
    if let Some(cap) = softcap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    let scores = scores.reshape((b * h, s, s))?;
    let probs = ops::causal_softmax(&scores, window, fused)?.reshape((b * kv, rep * s, s))?;
    let out = ops::matmul(&probs, &v)?; // (b*kv, rep*s, d) = (b, h, s, d)
    out.reshape((b, h, s, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * s, h * d))
}

/// Self-attention of one decoder layer: q/k/v/o projections, optional per-head q/k RMSNorm
/// (Gemma 3), RoPE, grouped-query attention.
#[derive(Clone)]
pub(crate) struct SelfAttention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub softcap: Option<f64>,
}

impl SelfAttention {
    /// `x: (b * s, hidden)` laid out as `seqs` says; `rope_q` carries the attention
    /// scale, `rope_k` does not.
    pub fn forward(
        &self,
        x: &Tensor,
        seqs: &Sequences,
        rope_q: &RopeTables,
        rope_k: &RopeTables,
        window: Option<usize>,
        fused: bool,
    ) -> Result<Tensor> {
        let d = self.head_dim;
        let (b, s) = seqs.dims();
        // (b * s, n * d) projections -> (b, n, s, d) heads, rotated for q and k.
        let rotated = |t: Tensor, n: usize, norm: &Option<RmsNorm>, rope: &RopeTables| {
            let t = match norm {
                Some(norm) => norm
                    .forward(&t.reshape((b * s * n, d))?, fused)?
                    .reshape((b * s, n * d))?,
                None => t,
            };
            ops::rotary_heads(&t, (b, s, n), &rope.cos, &rope.sin, fused)
        };
        let q = rotated(self.q.forward(x, fused)?, self.heads, &self.q_norm, rope_q)?;
        let k = rotated(
            self.k.forward(x, fused)?,
            self.kv_heads,
            &self.k_norm,
            rope_k,
        )?;
        let v = self
            .v
            .forward(x, fused)?
            .reshape((b, s, self.kv_heads, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let out = match seqs {
            Sequences::Padded { .. } => attention(&q, &k, &v, window, self.softcap, fused)?,
            Sequences::Packed { lens } => {
                packed_attention(&q, &k, &v, lens, window, self.softcap, fused)?
            }
        };
        self.o.forward(&out, fused)
    }
}

/// The vocabulary projection after the last block: the final norm and `lm_head` (then
/// Gemma's soft-cap) on the rows of `x: (b * s, hidden)` that `rows` picks, or on all of
/// them, returned as `(b, s, vocab)`. Training needs logits only where a token is learned,
/// so picking rows first saves the largest matmul of the model on the others.
pub(crate) fn output_logits(
    x: Tensor,
    rows: Option<&Tensor>,
    (b, s): (usize, usize),
    norm: &RmsNorm,
    lm_head: &Tensor,
    softcap: Option<f64>,
    fused: bool,
) -> Result<Tensor> {
    let x = match rows {
        Some(rows) => x.index_select(rows, 0)?,
        None => x,
    };
    let x = norm.forward(&x, fused)?;
    let mut logits = ops::matmul(&x, &lm_head.t()?)?;
    if let Some(cap) = softcap {
        logits = ((logits / cap)?.tanh()? * cap)?;
    }
    match rows {
        Some(_) => Ok(logits),
        None => logits.reshape((b, s, logits.dim(D::Minus1)?)),
    }
}
