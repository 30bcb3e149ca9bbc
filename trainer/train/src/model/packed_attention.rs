//! Causal (sliding-window) attention over sequences packed end to end, each sequence
//! attending only within itself, as one fused CPU op with its backward pass.
//!
//! Composed from candle ops, packed attention cuts every sequence out of the packed q, k and
//! v (a copy each), keeps its scores and probabilities alive for the backward pass and joins
//! the outputs; candle's backward of each cut is a zero-padded copy as large as the whole
//! pack, so a pack of `n` sequences pays `3n` pack-sized passes per layer on one thread. The
//! fused op runs each (sequence, head) on the machine's threads with `gemm` straight from
//! the packed buffers, keeps only its output, and recomputes the probabilities in the
//! backward pass (a score matmul is cheap beside the layer's projections), so the
//! activation memory of attention no longer grows with the square of the sequence length.
//!
//! Checked against the composition, forward and gradients, in `tests/model_grad.rs`.

use std::sync::Arc;

use rayon::prelude::*;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use super::layers::attention;
use super::ops::{self, exp_in_place, fusable, input, max_of, threads, visible, Real};

/// Attention of `q: (1, h, T, d)` (already scaled) over `k, v: (1, kv, T, d)`, where the
/// `T` positions are sequences of `lens` end to end, each causal within itself (keys at
/// most `window` back). Query head `i` reads kv head `i / (h / kv)`. Returns `(T, h * d)`.
pub(crate) fn packed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    lens: &[usize],
    window: Option<usize>,
    softcap: Option<f64>,
    fused: bool,
) -> Result<Tensor> {
    let (_, h, t, _) = q.dims4()?;
    let kv = k.dim(1)?;
    if lens.iter().sum::<usize>() != t || kv == 0 || h % kv != 0 {
        candle_core::bail!(
            "packed_attention: lens {lens:?} must add up to the {t} positions, and {kv} kv heads divide {h} heads"
        );
    }
    if fused && softcap.is_none() && fusable(q) && q.dtype() == k.dtype() && k.dtype() == v.dtype()
    {
        let op = PackedAttention {
            lens: Arc::new(lens.to_vec()),
            window,
        };
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    let mut outs = Vec::with_capacity(lens.len());
    let mut start = 0;
    for &n in lens {
        let part = |x: &Tensor| x.narrow(2, start, n)?.contiguous();
        outs.push(attention(
            &part(q)?,
            &part(k)?,
            &part(v)?,
            window,
            softcap,
            fused,
        )?);
        start += n;
    }
    Tensor::cat(&outs, 0)
}

struct PackedAttention {
    lens: Arc<Vec<usize>>,
    window: Option<usize>,
}

/// The sizes of one call, read from the layouts.
#[derive(Clone, Copy)]
struct Dims {
    heads: usize,
    kv_heads: usize,
    positions: usize,
    head_dim: usize,
}

impl Dims {
    fn of(q: &[usize], k: &[usize]) -> Result<Self> {
        match (q, k) {
            ([1, h, t, d], [1, kv, tk, dk]) if tk == t && dk == d => Ok(Self {
                heads: *h,
                kv_heads: *kv,
                positions: *t,
                head_dim: *d,
            }),
            _ => candle_core::bail!("packed_attention: q {q:?} and k/v {k:?} do not match"),
        }
    }

    fn rep(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// A buffer that several threads write at disjoint places.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: every use below gives each thread its own (sequence, head) blocks to write.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// The pointer, through a method so that closures capture the `Sync` wrapper rather
    /// than its field.
    fn at(self, offset: usize) -> *mut T {
        // SAFETY: callers pass offsets inside the buffer.
        unsafe { self.0.add(offset) }
    }
}

/// `dst (m x n) = [dst +] a (m x k) b (k x n)` on this thread (the op spreads its
/// (sequence, head) tasks over the threads itself).
///
/// SAFETY: as [`ops::gemm`].
unsafe fn matmul<T: Real>(
    dims: (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    a: (*const T, usize, usize),
    b: (*const T, usize, usize),
) {
    ops::gemm(dims, (dst, dst_rs), accumulate, T::ONE, a, b, false)
}

/// Causal softmax of the `n x n` scores in place; hidden entries become 0.
fn softmax_in_place<T: Real>(s: &mut [T], n: usize, window: Option<usize>) {
    for (i, row) in s.chunks_mut(n).enumerate() {
        let lo = visible(i, window);
        let max = max_of(&row[lo..=i]);
        let sum = exp_in_place(&mut row[lo..=i], max);
        let inv = T::ONE / sum;
        row[..lo].iter_mut().for_each(|x| *x = T::ZERO);
        row[lo..=i].iter_mut().for_each(|x| *x = *x * inv);
        row[i + 1..].iter_mut().for_each(|x| *x = T::ZERO);
    }
}

/// `ds = p * (dp - sum(p * dp))` per row, in place over `dp`; 0 where `p` is hidden.
fn softmax_backward_in_place<T: Real>(p: &[T], dp: &mut [T], n: usize) {
    for (pr, gr) in p.chunks(n).zip(dp.chunks_mut(n)) {
        let dot = pr
            .iter()
            .zip(gr.iter())
            .fold(T::ZERO, |a, (&p, &g)| a + p * g);
        for (g, &p) in gr.iter_mut().zip(pr) {
            *g = p * (*g - dot);
        }
    }
}

impl PackedAttention {
    /// `(offset, len)` of each sequence in the pack.
    fn sequences(&self) -> Vec<(usize, usize)> {
        let mut offset = 0;
        self.lens
            .iter()
            .map(|&n| {
                offset += n;
                (offset - n, n)
            })
            .collect()
    }

    /// Runs `task` for every (sequence, index < `per_sequence`) on the machine's threads,
    /// longest sequences first, dealt round-robin; `task` gets its thread's scratch
    /// buffers, each long enough for the longest sequence's scores.
    fn for_each<T: Real>(
        &self,
        per_sequence: usize,
        task: impl Fn((usize, usize), usize, &mut [T], &mut [T]) + Sync,
    ) {
        let mut tasks: Vec<_> = self
            .sequences()
            .into_iter()
            .filter(|&(_, n)| n > 0)
            .flat_map(|seq| (0..per_sequence).map(move |i| (seq, i)))
            .collect();
        tasks.sort_by_key(|&((_, n), _)| std::cmp::Reverse(n));
        let longest = tasks.first().map_or(0, |&((_, n), _)| n);
        let workers = threads().min(tasks.len()).max(1);
        let run = |w: usize| {
            let mut a = vec![T::ZERO; longest * longest];
            let mut b = vec![T::ZERO; longest * longest];
            for &(seq, i) in tasks.iter().skip(w).step_by(workers) {
                task(seq, i, &mut a, &mut b);
            }
        };
        if workers == 1 {
            return run(0);
        }
        (0..workers).into_par_iter().for_each(run);
    }

    /// `P = softmax(Q Kᵀ)` of one head over one sequence into `p`.
    ///
    /// SAFETY: `q`, `k` address at least `n` rows of `d`.
    unsafe fn probabilities<T: Real>(
        &self,
        q: *const T,
        k: *const T,
        n: usize,
        d: usize,
        p: &mut [T],
    ) {
        let p = &mut p[..n * n];
        matmul((n, n, d), p.as_mut_ptr(), n, false, (q, d, 1), (k, 1, d));
        softmax_in_place(p, n, self.window);
    }

    fn forward<T: Real>(&self, q: &[T], k: &[T], v: &[T], dims: Dims) -> Vec<T> {
        let Dims {
            heads: h,
            positions: t,
            head_dim: d,
            ..
        } = dims;
        let rep = dims.rep();
        let mut out = vec![T::ZERO; t * h * d];
        let dst = Shared(out.as_mut_ptr());
        self.for_each::<T>(h, |(off, n), head, p, _| {
            let g = head / rep;
            // SAFETY: offsets stay inside q (h*t*d), k and v (kv*t*d) and out (t*h*d); this
            // task alone writes head `head`'s columns of the sequence's rows of out.
            unsafe {
                self.probabilities(
                    q.as_ptr().add((head * t + off) * d),
                    k.as_ptr().add((g * t + off) * d),
                    n,
                    d,
                    p,
                );
                let o = dst.at(off * h * d + head * d);
                matmul(
                    (n, d, n),
                    o,
                    h * d,
                    false,
                    (p.as_ptr(), n, 1),
                    (v.as_ptr().add((g * t + off) * d), d, 1),
                );
            }
        });
        out
    }

    /// Gradients of q, k and v given the output's gradient `go: (T, h * d)`.
    fn backward<T: Real>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        go: &[T],
        dims: Dims,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let Dims {
            heads: h,
            kv_heads: kv,
            positions: t,
            head_dim: d,
        } = dims;
        let rep = dims.rep();
        let mut dq = vec![T::ZERO; h * t * d];
        let mut dk = vec![T::ZERO; kv * t * d];
        let mut dv = vec![T::ZERO; kv * t * d];
        let (dq_p, dk_p, dv_p) = (
            Shared(dq.as_mut_ptr()),
            Shared(dk.as_mut_ptr()),
            Shared(dv.as_mut_ptr()),
        );
        // One task per (sequence, kv head): the query heads sharing a kv head add into the
        // same rows of dk and dv, so they run in one task.
        self.for_each::<T>(kv, |(off, n), g, p, dp| {
            // SAFETY: offsets stay inside their buffers as in `forward`; this task alone
            // writes kv head `g`'s rows of the sequence in dk and dv, and the rows of its
            // query heads in dq.
            unsafe {
                let kg = k.as_ptr().add((g * t + off) * d);
                let vg = v.as_ptr().add((g * t + off) * d);
                for head in g * rep..(g + 1) * rep {
                    let qh = q.as_ptr().add((head * t + off) * d);
                    let goh = go.as_ptr().add(off * h * d + head * d);
                    self.probabilities(qh, kg, n, d, p);
                    let (p, dp) = (&p[..n * n], &mut dp[..n * n]);
                    // dP = dO Vᵀ, dV += Pᵀ dO
                    matmul(
                        (n, n, d),
                        dp.as_mut_ptr(),
                        n,
                        false,
                        (goh, h * d, 1),
                        (vg, 1, d),
                    );
                    matmul(
                        (n, d, n),
                        dv_p.at((g * t + off) * d),
                        d,
                        true,
                        (p.as_ptr(), 1, n),
                        (goh, h * d, 1),
                    );
                    // dS = P (dP - rowsum(P dP)); dQ = dS K, dK += dSᵀ Q
                    softmax_backward_in_place(p, dp, n);
                    matmul(
                        (n, d, n),
                        dq_p.at((head * t + off) * d),
                        d,
                        false,
                        (dp.as_ptr(), n, 1),
                        (kg, d, 1),
                    );
                    matmul(
                        (n, d, n),
                        dk_p.at((g * t + off) * d),
                        d,
                        true,
                        (dp.as_ptr(), 1, n),
                        (qh, d, 1),
                    );
                }
            }
        });
        (dq, dk, dv)
    }

    fn backward_tensors<T: Real + candle_core::WithDType>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dims = Dims::of(q.dims(), k.dims())?;
        let (dq, dk, dv) = {
            let (qs, ql) = q.storage_and_layout();
            let (ks, kl) = k.storage_and_layout();
            let (vs, vl) = v.storage_and_layout();
            let (gs, gl) = grad.storage_and_layout();
            match (&*qs, &*ks, &*vs, &*gs) {
                (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs), Storage::Cpu(gs)) => self
                    .backward::<T>(
                        input(qs, ql, self.name())?,
                        input(ks, kl, self.name())?,
                        input(vs, vl, self.name())?,
                        input(gs, gl, self.name())?,
                        dims,
                    ),
                _ => candle_core::bail!("{}: CPU tensors only", self.name()),
            }
        };
        let device = q.device();
        Ok((
            Tensor::from_vec(dq, q.shape(), device)?,
            Tensor::from_vec(dk, k.shape(), device)?,
            Tensor::from_vec(dv, v.shape(), device)?,
        ))
    }
}

impl CustomOp3 for PackedAttention {
    fn name(&self) -> &'static str {
        "fused-packed-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::of(ql.dims(), kl.dims())?;
        if vl.dims() != kl.dims() {
            candle_core::bail!(
                "{}: v {:?} must have k's shape {:?}",
                self.name(),
                vl.dims(),
                kl.dims()
            );
        }
        let out = match qs {
            CpuStorage::F32(_) => f32::storage(self.forward(
                input::<f32>(qs, ql, self.name())?,
                input(ks, kl, self.name())?,
                input(vs, vl, self.name())?,
                dims,
            )),
            CpuStorage::F64(_) => f64::storage(self.forward(
                input::<f64>(qs, ql, self.name())?,
                input(ks, kl, self.name())?,
                input(vs, vl, self.name())?,
                dims,
            )),
            _ => candle_core::bail!("{}: f32/f64 only", self.name()),
        };
        Ok((
            out,
            Shape::from((dims.positions, dims.heads * dims.head_dim)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.backward_tensors::<f32>(q, k, v, &grad)?,
            DType::F64 => self.backward_tensors::<f64>(q, k, v, &grad)?,
            dtype => candle_core::bail!("{}: f32/f64 only, got {dtype:?}", self.name()),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect()
    }

    fn var(shape: (usize, usize, usize, usize), seed: u64) -> Var {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Var::from_tensor(&Tensor::from_vec(values(n, seed), shape, &Device::Cpu).unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn fused_matches_the_composition_with_gradients() {
        let (h, kv, d) = (4, 2, 8);
        let lens = [5, 1, 9, 3];
        let t: usize = lens.iter().sum();
        let (q, k, v) = (
            var((1, h, t, d), 1),
            var((1, kv, t, d), 2),
            var((1, kv, t, d), 3),
        );
        let weights = Tensor::from_vec(values(t * h * d, 4), (t, h * d), &Device::Cpu).unwrap();
        for window in [None, Some(3)] {
            let run = |fused: bool| {
                let out = packed_attention(
                    q.as_tensor(),
                    k.as_tensor(),
                    v.as_tensor(),
                    &lens,
                    window,
                    None,
                    fused,
                )
                .unwrap();
                let grads = (&out * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let grad = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
                (out, [grad(&q), grad(&k), grad(&v)])
            };
            let (out, grads) = run(true);
            let (want, want_grads) = run(false);
            assert_eq!(out.dims(), &[t, h * d]);
            assert!(
                max_diff(&out, &want) < 1e-12,
                "window {window:?}: outputs differ"
            );
            for (name, (g, w)) in ["q", "k", "v"].iter().zip(grads.iter().zip(&want_grads)) {
                assert!(
                    max_diff(g, w) < 1e-12,
                    "window {window:?}: d{name} differs by {}",
                    max_diff(g, w)
                );
            }
        }
    }

    #[test]
    fn lens_must_cover_the_positions() {
        let (q, k) = (var((1, 2, 6, 4), 1), var((1, 1, 6, 4), 2));
        let err = packed_attention(
            q.as_tensor(),
            k.as_tensor(),
            k.as_tensor(),
            &[2, 3],
            None,
            None,
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("add up to the 6 positions"), "{err}");
    }
}
