//! Fused CPU kernels with explicit, tested backward passes, for the memory-bound parts of a
//! training step: causal (sliding-window) softmax, gated activations (`silu(g) * u`,
//! `gelu_tanh(g) * u`), RMSNorm and the per-token log-probability of a target under a
//! log-softmax. candle's own element-wise CPU ops are single-threaded and record one graph
//! node (and one full-size tensor) per op; each kernel here is one multi-threaded pass
//! forward and one or two backward.
//!
//! Each public function takes the fused path for contiguous f32/f64 tensors on the CPU and
//! falls back to an equivalent composition of differentiable candle ops elsewhere (CUDA,
//! other dtypes), so results and gradients are the same on every device. The fused forward
//! and backward are checked against the compositions and against finite differences in
//! `tests/model_grad.rs`.

use std::ops::{Add, Div, Mul, Sub};

use rayon::prelude::*;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};

/// Float types the kernels run on.
pub(super) trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn storage(v: Vec<Self>) -> CpuStorage;
}

macro_rules! real {
    ($t:ty, $variant:ident, $exp:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INF: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
        }
    };
}
// f32: a vectorisable exp within 2.5e-7 of the true value (libm's is a call per element,
// a tenth of a training step); f64 (the exactness checks) keeps the standard library's.
real!(f32, F32, fusechat_kernels::attention::exp);
real!(f64, F64, f64::exp);

/// `combine` over `map` of every element of `x`, starting from `init`, in eight
/// independent lanes so that the compiler vectorises the loop (a single accumulator
/// is a chain of dependent float operations it must keep in order).
#[inline(always)]
fn fold_lanes<T: Real>(x: &[T], init: T, map: impl Fn(T) -> T, combine: impl Fn(T, T) -> T) -> T {
    let mut lanes = [init; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = combine(*l, map(v));
        }
    }
    let tail = rest.iter().fold(init, |a, &v| combine(a, map(v)));
    lanes.into_iter().fold(tail, &combine)
}

/// The largest of `x` (NEG_INF when empty).
#[inline]
pub(super) fn max_of<T: Real>(x: &[T]) -> T {
    fold_lanes(x, T::NEG_INF, |v| v, |m, v| if v > m { v } else { m })
}

/// The sum of `x`.
#[inline]
fn sum_of<T: Real>(x: &[T]) -> T {
    fold_lanes(x, T::ZERO, |v| v, |a, b| a + b)
}

/// `sum(exp(x[i] - shift))` without storing the terms.
#[inline]
fn exp_sum<T: Real>(x: &[T], shift: T) -> T {
    fold_lanes(x, T::ZERO, |v| (v - shift).exp(), |a, b| a + b)
}

/// `dst[i] = exp(src[i] - shift)`, and their sum.
#[inline]
pub(super) fn exp_into<T: Real>(dst: &mut [T], src: &[T], shift: T) -> T {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = (s - shift).exp();
    }
    sum_of(dst)
}

/// `x[i] = exp(x[i] - shift)` in place, and their sum.
#[inline]
pub(super) fn exp_in_place<T: Real>(x: &mut [T], shift: T) -> T {
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
    }
    sum_of(x)
}

/// `dst (m x n) = [dst +] beta a (m x k) b (k x n)`: `dst` with row stride `dst_rs`
/// (columns contiguous), `a` and `b` each a pointer with its row and column strides in
/// elements; on this thread or, with `parallel`, on the machine's threads.
///
/// SAFETY: the caller guarantees every addressed element is inside its buffer and that no
/// other thread touches `dst`'s elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm<T: Real>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut T, usize),
    accumulate: bool,
    beta: T,
    (a, a_rs, a_cs): (*const T, usize, usize),
    (b, b_rs, b_cs): (*const T, usize, usize),
    parallel: bool,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        T::ONE,
        beta,
        false,
        false,
        false,
        if parallel {
            gemm::Parallelism::Rayon(threads())
        } else {
            gemm::Parallelism::None
        },
    )
}

/// `a.matmul(b)`, and on the CPU for bf16 or f16 operands the product of
/// their f32 values rounded to their dtype: candle's CPU product has no bf16
/// kernel, and a GPU's bf16 product (cuBLAS) also accumulates in f32 and
/// rounds the result once, so the CPU computes what the GPU does.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match half_precision(a) {
        Some(narrow) if a.device().is_cpu() => a
            .to_dtype(DType::F32)?
            .matmul(&b.to_dtype(DType::F32)?)?
            .to_dtype(narrow),
        _ => a.matmul(b),
    }
}

/// The dtype of a bf16 or f16 tensor, whose reductions (norms, softmax,
/// log-softmax) run in f32.
fn half_precision(t: &Tensor) -> Option<DType> {
    matches!(t.dtype(), DType::BF16 | DType::F16).then(|| t.dtype())
}

/// Whether `t` can take the fused CPU path.
pub(super) fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

pub(super) fn input<'a, T: Real>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let v =
        T::slice(s).ok_or_else(|| candle_core::Error::Msg(format!("{what}: unexpected dtype")))?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => Err(candle_core::Error::Msg(format!(
            "{what}: input must be contiguous"
        ))),
    }
}

pub(super) fn threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

/// Runs `f(first_row, chunk)` on consecutive chunks of rows (`row_len` elements each) of
/// `out`, on all threads when the work is large enough.
fn par_rows<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let rows = out.len() / row_len.max(1);
    let n = threads().min(rows).max(1);
    if n == 1 || out.len() < 1 << 15 {
        f(0, out);
        return;
    }
    let per = rows.div_ceil(n);
    out.par_chunks_mut(per * row_len)
        .enumerate()
        .for_each(|(ci, chunk)| f(ci * per, chunk));
}

// ---------------------------------------------------------------------------------------
// Causal softmax

/// Softmax over the last dimension of square `(…, s, s)` attention scores, where query row
/// `i` only sees keys `j <= i` (and `i - j < window`); hidden entries get probability 0.
pub(crate) fn causal_softmax(
    scores: &Tensor,
    window: Option<usize>,
    fused: bool,
) -> Result<Tensor> {
    let s = scores.dim(D::Minus1)?;
    if scores.dim(D::Minus2)? != s {
        candle_core::bail!(
            "causal_softmax: scores must be square, got {:?}",
            scores.dims()
        );
    }
    if let Some(narrow) = half_precision(scores) {
        // As transformers' eager attention: the softmax in f32.
        return causal_softmax(&scores.to_dtype(DType::F32)?, window, fused)?.to_dtype(narrow);
    }
    if fused && fusable(scores) {
        return scores.contiguous()?.apply_op1(CausalSoftmax { window });
    }
    let mask = super::layers::attention_mask(s, window, scores.dtype(), scores.device())?;
    super::layers::softmax_last_dim(&scores.broadcast_add(&mask)?)
}

/// The visible key range `lo..=i` of query row `i`.
pub(super) fn visible(i: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (i + 1).saturating_sub(w))
}

struct CausalSoftmax {
    window: Option<usize>,
}

impl CausalSoftmax {
    fn fwd<T: Real>(&self, x: &[T], s: usize) -> Vec<T> {
        let mut out = vec![T::ZERO; x.len()];
        let window = self.window;
        par_rows(&mut out, s, |row0, chunk| {
            for (r, o) in chunk.chunks_mut(s).enumerate() {
                let row = row0 + r;
                let i = row % s;
                let lo = visible(i, window);
                let xr = &x[row * s + lo..row * s + i + 1];
                let max = max_of(xr);
                let sum = exp_into(&mut o[lo..=i], xr, max);
                let inv = T::ONE / sum;
                for o in &mut o[lo..=i] {
                    *o = *o * inv;
                }
            }
        });
        out
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = l.dims()[l.dims().len() - 1];
        let out = match st {
            CpuStorage::F32(_) => f32::storage(self.fwd(input::<f32>(st, l, self.name())?, s)),
            CpuStorage::F64(_) => f64::storage(self.fwd(input::<f64>(st, l, self.name())?, s)),
            _ => candle_core::bail!("{}: f32/f64 only", self.name()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = res.apply_op2_no_bwd(
            &grad.contiguous()?,
            &CausalSoftmaxGrad {
                window: self.window,
            },
        )?;
        Ok(Some(g))
    }
}

/// d scores = p * (g - sum(p * g)) over the visible keys.
struct CausalSoftmaxGrad {
    window: Option<usize>,
}

impl CausalSoftmaxGrad {
    fn run<T: Real>(&self, p: &[T], g: &[T], s: usize) -> Vec<T> {
        let mut out = vec![T::ZERO; p.len()];
        let window = self.window;
        par_rows(&mut out, s, |row0, chunk| {
            for (r, o) in chunk.chunks_mut(s).enumerate() {
                let row = row0 + r;
                let i = row % s;
                let lo = visible(i, window);
                let (pr, gr) = (
                    &p[row * s + lo..row * s + i + 1],
                    &g[row * s + lo..row * s + i + 1],
                );
                let dot = pr.iter().zip(gr).fold(T::ZERO, |a, (&p, &g)| a + p * g);
                for ((o, &p), &g) in o[lo..=i].iter_mut().zip(pr).zip(gr) {
                    *o = p * (g - dot);
                }
            }
        });
        out
    }
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-causal-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = l1.dims()[l1.dims().len() - 1];
        let out = match s1 {
            CpuStorage::F32(_) => f32::storage(self.run(
                input::<f32>(s1, l1, self.name())?,
                input(s2, l2, self.name())?,
                s,
            )),
            CpuStorage::F64(_) => f64::storage(self.run(
                input::<f64>(s1, l1, self.name())?,
                input(s2, l2, self.name())?,
                s,
            )),
            _ => candle_core::bail!("{}: f32/f64 only", self.name()),
        };
        Ok((out, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------
// Gated activations

/// The activation of a gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gate {
    Silu,
    GeluTanh,
}

const GELU_C: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)
const GELU_A: f64 = 0.044_715;

impl Gate {
    #[inline]
    fn act<T: Real>(self, x: T) -> T {
        match self {
            Gate::Silu => x / (T::ONE + (T::ZERO - x).exp()),
            Gate::GeluTanh => {
                let (c, a, half) = (T::from_f64(GELU_C), T::from_f64(GELU_A), T::from_f64(0.5));
                half * x * (T::ONE + (c * (x + a * x * x * x)).tanh())
            }
        }
    }

    /// (act(x), act'(x))
    #[inline]
    fn act_and_grad<T: Real>(self, x: T) -> (T, T) {
        match self {
            Gate::Silu => {
                let s = T::ONE / (T::ONE + (T::ZERO - x).exp());
                (x * s, s * (T::ONE + x * (T::ONE - s)))
            }
            Gate::GeluTanh => {
                let (c, a, half) = (T::from_f64(GELU_C), T::from_f64(GELU_A), T::from_f64(0.5));
                let t = (c * (x + a * x * x * x)).tanh();
                let three = T::from_f64(3.0);
                let d = half * (T::ONE + t)
                    + half * x * (T::ONE - t * t) * c * (T::ONE + three * a * x * x);
                (half * x * (T::ONE + t), d)
            }
        }
    }
}

/// `act(gate) * up`, element-wise.
pub(crate) fn gated(gate: &Tensor, up: &Tensor, act: Gate, fused: bool) -> Result<Tensor> {
    if fused && fusable(gate) && gate.dtype() == up.dtype() && gate.dims() == up.dims() {
        return gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, Gated { act });
    }
    let a = match act {
        Gate::Silu => gate.silu()?,
        Gate::GeluTanh => gate.gelu()?,
    };
    a * up
}

fn binary_map<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::ZERO; a.len()];
    par_rows(&mut out, 1, |start, chunk| {
        let n = chunk.len();
        for ((o, &x), &y) in chunk
            .iter_mut()
            .zip(&a[start..start + n])
            .zip(&b[start..start + n])
        {
            *o = f(x, y);
        }
    });
    out
}

fn ternary_map<T: Real>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::ZERO; a.len()];
    par_rows(&mut out, 1, |start, chunk| {
        let n = chunk.len();
        for (((o, &x), &y), &z) in chunk
            .iter_mut()
            .zip(&a[start..start + n])
            .zip(&b[start..start + n])
            .zip(&c[start..start + n])
        {
            *o = f(x, y, z);
        }
    });
    out
}

struct Gated {
    act: Gate,
}

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "fused-gated-activation"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let act = self.act;
        let out = match s1 {
            CpuStorage::F32(_) => f32::storage(binary_map(
                input::<f32>(s1, l1, self.name())?,
                input(s2, l2, self.name())?,
                |g, u| act.act(g) * u,
            )),
            CpuStorage::F64(_) => f64::storage(binary_map(
                input::<f64>(s1, l1, self.name())?,
                input(s2, l2, self.name())?,
                |g, u| act.act(g) * u,
            )),
            _ => candle_core::bail!("{}: f32/f64 only", self.name()),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let d_gate = gate.apply_op3_no_bwd(
            up,
            &grad,
            &GatedGrad {
                act: self.act,
                wrt_gate: true,
            },
        )?;
        let d_up = gate.apply_op3_no_bwd(
            up,
            &grad,
            &GatedGrad {
                act: self.act,
                wrt_gate: false,
            },
        )?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// d gate = g * up * act'(gate); d up = g * act(gate).
struct GatedGrad {
    act: Gate,
    wrt_gate: bool,
}

impl GatedGrad {
    fn run<T: Real>(&self, gate: &[T], up: &[T], g: &[T]) -> Vec<T> {
        let act = self.act;
        if self.wrt_gate {
            ternary_map(gate, up, g, |x, u, g| g * u * act.act_and_grad(x).1)
        } else {
            binary_map(gate, g, |x, g| g * act.act(x))
        }
    }
}

impl CustomOp3 for GatedGrad {
    fn name(&self) -> &'static str {
        "fused-gated-activation-grad"
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
        let n = self.name();
        let out = match s1 {
            CpuStorage::F32(_) => f32::storage(self.run(
                input::<f32>(s1, l1, n)?,
                input(s2, l2, n)?,
                input(s3, l3, n)?,
            )),
            CpuStorage::F64(_) => f64::storage(self.run(
                input::<f64>(s1, l1, n)?,
                input(s2, l2, n)?,
                input(s3, l3, n)?,
            )),
            _ => candle_core::bail!("{n}: f32/f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------
// RMSNorm

/// `x / sqrt(mean(x^2, last dim) + eps) * w` for `x: (…, d)`, `w: (d)`.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, fused: bool) -> Result<Tensor> {
    if let Some(narrow) = half_precision(x) {
        // As transformers: normalised in f32, scaled by the weight, rounded back.
        let w = w.to_dtype(DType::F32)?;
        return rms_norm(&x.to_dtype(DType::F32)?, &w, eps, fused)?.to_dtype(narrow);
    }
    let d = x.dim(D::Minus1)?;
    if fused && fusable(x) && x.dtype() == w.dtype() && w.dims() == [d] {
        return x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps });
    }
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

struct RmsNorm {
    eps: f64,
}

#[inline]
fn inv_rms<T: Real>(x: &[T], eps: f64) -> T {
    let ss = x.iter().fold(0.0f64, |a, &v| a + v.to_f64() * v.to_f64());
    T::from_f64(1.0 / (ss / x.len() as f64 + eps).sqrt())
}

impl RmsNorm {
    fn fwd<T: Real>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let d = w.len();
        let mut out = vec![T::ZERO; x.len()];
        par_rows(&mut out, d, |row0, chunk| {
            for (r, o) in chunk.chunks_mut(d).enumerate() {
                let xr = &x[(row0 + r) * d..(row0 + r + 1) * d];
                let inv = inv_rms(xr, self.eps);
                for ((o, &x), &w) in o.iter_mut().zip(xr).zip(w) {
                    *o = x * inv * w;
                }
            }
        });
        out
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.name();
        let out = match s1 {
            CpuStorage::F32(_) => {
                f32::storage(self.fwd(input::<f32>(s1, l1, n)?, input(s2, l2, n)?))
            }
            CpuStorage::F64(_) => {
                f64::storage(self.fwd(input::<f64>(s1, l1, n)?, input(s2, l2, n)?))
            }
            _ => candle_core::bail!("{n}: f32/f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &grad, &RmsNormGradX { eps: self.eps })?;
        let dw = x.apply_op2_no_bwd(
            &grad,
            &RmsNormGradW {
                eps: self.eps,
                d: w.dim(0)?,
            },
        )?;
        Ok((Some(dx), Some(dw)))
    }
}

/// dx = r * (g*w - x * r^2 * mean(g*w*x)), r = 1 / rms(x).
struct RmsNormGradX {
    eps: f64,
}

impl RmsNormGradX {
    fn run<T: Real>(&self, x: &[T], w: &[T], g: &[T]) -> Vec<T> {
        let d = w.len();
        let mut out = vec![T::ZERO; x.len()];
        par_rows(&mut out, d, |row0, chunk| {
            for (r, o) in chunk.chunks_mut(d).enumerate() {
                let range = (row0 + r) * d..(row0 + r + 1) * d;
                let (xr, gr) = (&x[range.clone()], &g[range]);
                let inv = inv_rms(xr, self.eps);
                let dot = xr
                    .iter()
                    .zip(gr)
                    .zip(w)
                    .fold(0.0f64, |a, ((&x, &g), &w)| a + (g * w * x).to_f64());
                let k = T::from_f64(dot / d as f64) * inv * inv;
                for (((o, &x), &g), &w) in o.iter_mut().zip(xr).zip(gr).zip(w) {
                    *o = inv * (g * w - x * k);
                }
            }
        });
        out
    }
}

impl CustomOp3 for RmsNormGradX {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad-x"
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
        let n = self.name();
        let out = match s1 {
            CpuStorage::F32(_) => f32::storage(self.run(
                input::<f32>(s1, l1, n)?,
                input(s2, l2, n)?,
                input(s3, l3, n)?,
            )),
            CpuStorage::F64(_) => f64::storage(self.run(
                input::<f64>(s1, l1, n)?,
                input(s2, l2, n)?,
                input(s3, l3, n)?,
            )),
            _ => candle_core::bail!("{n}: f32/f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// dw = sum over rows of g * x * r.
struct RmsNormGradW {
    eps: f64,
    d: usize,
}

impl RmsNormGradW {
    fn run<T: Real>(&self, x: &[T], g: &[T]) -> Vec<T> {
        let d = self.d;
        let rows = x.len() / d;
        let n = threads().min(rows).max(1);
        let per = rows.div_ceil(n);
        let partial = |r0: usize| -> Vec<f64> {
            let mut acc = vec![0.0f64; d];
            for row in r0..(r0 + per).min(rows) {
                let (xr, gr) = (&x[row * d..(row + 1) * d], &g[row * d..(row + 1) * d]);
                let inv = inv_rms(xr, self.eps).to_f64();
                for ((a, &x), &g) in acc.iter_mut().zip(xr).zip(gr) {
                    *a += (g * x).to_f64() * inv;
                }
            }
            acc
        };
        let partials: Vec<Vec<f64>> = if n == 1 || x.len() < 1 << 15 {
            (0..rows).step_by(per.max(1)).map(partial).collect()
        } else {
            // Collected in order, so the sum below is the same on every run.
            (0..n)
                .map(|c| c * per)
                .filter(|&r0| r0 < rows)
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(partial)
                .collect()
        };
        (0..d)
            .map(|j| T::from_f64(partials.iter().map(|p| p[j]).sum()))
            .collect()
    }
}

impl CustomOp2 for RmsNormGradW {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad-w"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.name();
        let out = match s1 {
            CpuStorage::F32(_) => {
                f32::storage(self.run(input::<f32>(s1, l1, n)?, input(s2, l2, n)?))
            }
            CpuStorage::F64(_) => {
                f64::storage(self.run(input::<f64>(s1, l1, n)?, input(s2, l2, n)?))
            }
            _ => candle_core::bail!("{n}: f32/f64 only"),
        };
        Ok((out, Shape::from(self.d)))
    }
}

// ---------------------------------------------------------------------------------------
// Rotary embedding

/// Splits the projection `x: (b * s, n * d)` into `n` heads and rotates each (transformers'
/// `rotate_half` convention) with the tables `cos, sin: (s, d / 2)`, scale folded in:
/// returns a contiguous `(b, n, s, d)`. Composed, this is a transpose, two halves, four
/// products, a sum, a difference and a concatenation, each a pass over the tensor with a
/// backward of its own; fused it is one pass each way.
pub(crate) fn rotary_heads(
    x: &Tensor,
    (b, s, n): (usize, usize, usize),
    cos: &Tensor,
    sin: &Tensor,
    fused: bool,
) -> Result<Tensor> {
    let d = x.dim(D::Minus1)? / n.max(1);
    let tables_fit = cos.dims() == [s, d / 2] && sin.dims() == [s, d / 2];
    if fused
        && fusable(x)
        && tables_fit
        && d % 2 == 0
        && x.dims() == [b * s, n * d]
        && cos.dtype() == x.dtype()
    {
        return x.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            Rotary { heads: n },
        );
    }
    let x = x.reshape((b, s, n, d))?.transpose(1, 2)?;
    let half = d / 2;
    let (x1, x2) = (
        x.narrow(D::Minus1, 0, half)?,
        x.narrow(D::Minus1, half, half)?,
    );
    // [x1, x2] * cos + [-x2, x1] * sin
    let lo = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let hi = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[&lo, &hi], D::Minus1)
}

/// Both directions of the rotation of one head's row: forward `[x1 c - x2 s, x2 c + x1 s]`,
/// and its transpose for the gradient `[g1 c + g2 s, g2 c - g1 s]`.
#[inline]
fn rotate<T: Real>(src: &[T], dst: &mut [T], cos: &[T], sin: &[T], inverse: bool) {
    let half = cos.len();
    let (s1, s2) = src.split_at(half);
    let (d1, d2) = dst.split_at_mut(half);
    for j in 0..half {
        let (c, s) = (cos[j], if inverse { T::ZERO - sin[j] } else { sin[j] });
        d1[j] = s1[j] * c - s2[j] * s;
        d2[j] = s2[j] * c + s1[j] * s;
    }
}

struct Rotary {
    heads: usize,
}

impl Rotary {
    /// `x: (b * s, n * d)` -> `(b, n, s, d)`.
    fn fwd<T: Real>(&self, x: &[T], cos: &[T], sin: &[T], s: usize) -> Vec<T> {
        let (n, half) = (self.heads, cos.len() / s);
        let d = 2 * half;
        let mut out = vec![T::ZERO; x.len()];
        // One output row per (sequence, head, position).
        par_rows(&mut out, d, |row0, chunk| {
            for (r, o) in chunk.chunks_mut(d).enumerate() {
                let row = row0 + r;
                let (pos, head, seq) = (row % s, (row / s) % n, row / (s * n));
                let src = &x[(seq * s + pos) * n * d + head * d..][..d];
                let t = pos * half..(pos + 1) * half;
                rotate(src, o, &cos[t.clone()], &sin[t], false);
            }
        });
        out
    }

    /// `g: (b, n, s, d)` -> `dx: (b * s, n * d)`.
    fn bwd<T: Real>(&self, g: &[T], cos: &[T], sin: &[T], s: usize) -> Vec<T> {
        let (n, half) = (self.heads, cos.len() / s);
        let d = 2 * half;
        let mut out = vec![T::ZERO; g.len()];
        // One dx row per token: its n heads.
        par_rows(&mut out, n * d, |row0, chunk| {
            for (r, o) in chunk.chunks_mut(n * d).enumerate() {
                let tok = row0 + r;
                let (pos, seq) = (tok % s, tok / s);
                let t = pos * half..(pos + 1) * half;
                for (head, o) in o.chunks_mut(d).enumerate() {
                    let src = &g[((seq * n + head) * s + pos) * d..][..d];
                    rotate(src, o, &cos[t.clone()], &sin[t.clone()], true);
                }
            }
        });
        out
    }
}

/// The storage of `f(x, cos, sin, s)` for f32/f64 inputs.
fn rotary_call(
    name: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
    f32_fn: impl Fn(&[f32], &[f32], &[f32], usize) -> Vec<f32>,
    f64_fn: impl Fn(&[f64], &[f64], &[f64], usize) -> Vec<f64>,
) -> Result<CpuStorage> {
    let s = l2.dims()[0];
    Ok(match s1 {
        CpuStorage::F32(_) => f32::storage(f32_fn(
            input(s1, l1, name)?,
            input(s2, l2, name)?,
            input(s3, l3, name)?,
            s,
        )),
        CpuStorage::F64(_) => f64::storage(f64_fn(
            input(s1, l1, name)?,
            input(s2, l2, name)?,
            input(s3, l3, name)?,
            s,
        )),
        _ => candle_core::bail!("{name}: f32/f64 only"),
    })
}

impl CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        "fused-rotary-heads"
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
        let out = rotary_call(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, c, s, n| self.fwd(x, c, s, n),
            |x, c, s, n| self.fwd(x, c, s, n),
        )?;
        let (tokens, width) = l1.shape().dims2()?;
        let s = l2.dims()[0];
        let d = width / self.heads;
        Ok((out, Shape::from((tokens / s, self.heads, s, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx =
            grad.contiguous()?
                .apply_op3_no_bwd(cos, sin, &RotaryGrad { heads: self.heads })?;
        debug_assert_eq!(dx.dims(), x.dims());
        Ok((Some(dx), None, None))
    }
}

/// The gradient of `Rotary` with respect to `x`; its first input is the output's gradient.
struct RotaryGrad {
    heads: usize,
}

impl CustomOp3 for RotaryGrad {
    fn name(&self) -> &'static str {
        "fused-rotary-heads-grad"
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
        let r = Rotary { heads: self.heads };
        let out = rotary_call(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |g, c, s, n| r.bwd(g, c, s, n),
            |g, c, s, n| r.bwd(g, c, s, n),
        )?;
        let (b, n, s, d) = l1.shape().dims4()?;
        Ok((out, Shape::from((b * s, n * d))))
    }
}

// ---------------------------------------------------------------------------------------
// Token log-probabilities

/// `log_softmax(logits)[…, target]`: the log-probability of each target token, for
/// `logits: (…, vocab)` and `targets: (…)` u32 (any out-of-range target is an error).
/// Differentiable with respect to `logits` (gradient `g * (onehot - softmax)`). On the CPU
/// this is one pass forward and one backward over the logits, without materializing the
/// log-softmax; elsewhere it is the usual composition.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let lead = &logits.dims()[..logits.rank() - 1];
    if targets.dims() != lead {
        candle_core::bail!(
            "token_logprobs: targets {:?} must have the logits' leading shape {:?}",
            targets.dims(),
            lead
        );
    }
    let targets = targets.to_dtype(DType::U32)?;
    if half_precision(logits).is_some() {
        // The log-softmax of bf16 logits in f32; the loss stays f32.
        return token_logprobs(&logits.to_dtype(DType::F32)?, &targets);
    }
    if fusable(logits) {
        let t: Vec<u32> = targets.flatten_all()?.to_vec1()?;
        if let Some(bad) = t.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("token_logprobs: target id {bad} is outside the vocabulary ({v})");
        }
        let op = TokenLogprobs {
            targets: std::sync::Arc::new(t),
            vocab: v,
        };
        return logits.contiguous()?.apply_op1(op)?.reshape(lead);
    }
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?;
    (picked - lse)?.squeeze(D::Minus1)
}

#[derive(Clone)]
struct TokenLogprobs {
    targets: std::sync::Arc<Vec<u32>>,
    vocab: usize,
}

impl TokenLogprobs {
    fn fwd<T: Real>(&self, x: &[T]) -> Vec<T> {
        let v = self.vocab;
        let mut out = vec![T::ZERO; x.len() / v];
        par_rows(&mut out, 1, |row0, chunk| {
            for (r, o) in chunk.iter_mut().enumerate() {
                let row = row0 + r;
                let xr = &x[row * v..(row + 1) * v];
                let max = max_of(xr);
                let sum = exp_sum(xr, max);
                *o = xr[self.targets[row] as usize] - max - sum.ln();
            }
        });
        out
    }

    /// d logits = g_row * (onehot(target) - softmax(logits)).
    fn bwd_run<T: Real>(&self, x: &[T], g: &[T]) -> Vec<T> {
        let v = self.vocab;
        let mut out = vec![T::ZERO; x.len()];
        par_rows(&mut out, v, |row0, chunk| {
            for (r, o) in chunk.chunks_mut(v).enumerate() {
                let row = row0 + r;
                let xr = &x[row * v..(row + 1) * v];
                let gr = g[row];
                let max = max_of(xr);
                let sum = exp_into(o, xr, max);
                let k = T::ZERO - gr / sum;
                for o in o.iter_mut() {
                    *o = *o * k;
                }
                let t = self.targets[row] as usize;
                o[t] = o[t] + gr;
            }
        });
        out
    }
}

impl CustomOp1 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "fused-token-logprobs"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let rows = l.shape().elem_count() / self.vocab;
        let out = match st {
            CpuStorage::F32(_) => f32::storage(self.fwd(input::<f32>(st, l, self.name())?)),
            CpuStorage::F64(_) => f64::storage(self.fwd(input::<f64>(st, l, self.name())?)),
            _ => candle_core::bail!("{}: f32/f64 only", self.name()),
        };
        Ok((out, Shape::from(rows)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = arg.apply_op2_no_bwd(&grad.contiguous()?, &TokenLogprobsGrad(self.clone()))?;
        Ok(Some(g))
    }
}

struct TokenLogprobsGrad(TokenLogprobs);

impl CustomOp2 for TokenLogprobsGrad {
    fn name(&self) -> &'static str {
        "fused-token-logprobs-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.name();
        let out = match s1 {
            CpuStorage::F32(_) => {
                f32::storage(self.0.bwd_run(input::<f32>(s1, l1, n)?, input(s2, l2, n)?))
            }
            CpuStorage::F64(_) => {
                f64::storage(self.0.bwd_run(input::<f64>(s1, l1, n)?, input(s2, l2, n)?))
            }
            _ => candle_core::bail!("{n}: f32/f64 only"),
        };
        Ok((out, l1.shape().clone()))
    }
}
