//! The batched product of [`crate::avx2::dot_rows_f32`] with 512-bit
//! registers, where the CPU has AVX-512 (F and DQ).
//!
//! Each 512-bit accumulator holds two outputs side by side, one per 256-bit
//! half: the same weight vector (broadcast to both halves) times two
//! activation rows. Every half then goes through exactly the multiply-adds
//! of an AVX2 accumulator of that output, in the same order, and is added up
//! the same way, so the results are bit for bit those of the AVX2 loops
//! (and of a row alone, which runs those) while each instruction does twice
//! the work.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::avx2::{ROWS, XS};
use crate::format::GROUP;

/// Activation rows one call takes: pairs of them, `XS` pairs.
pub const XS512: usize = 2 * XS;

/// Whether this CPU can run these loops (checked once by std, then cached).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::avx2::available() && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::*;

    /// The eight lanes of one 256-bit half, added up as the AVX2 loops add up
    /// an accumulator.
    #[inline(always)]
    unsafe fn hsum(acc: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `R` weight rows times `P` pairs of activation rows, `k` values each.
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    unsafe fn dot_rows_f32_t<const R: usize, const P: usize>(
        w: [*const f32; R],
        x: [[*const f32; 2]; P],
        k: usize,
    ) -> [[[f32; 2]; P]; R] {
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for c in (0..k).step_by(8) {
            let mut xv = [_mm512_setzero_ps(); P];
            for p in 0..P {
                let lo = _mm256_loadu_ps(x[p][0].add(c));
                let hi = _mm256_loadu_ps(x[p][1].add(c));
                xv[p] = _mm512_insertf32x8::<1>(_mm512_castps256_ps512(lo), hi);
            }
            for t in 0..R {
                let wv = _mm512_broadcast_f32x8(_mm256_loadu_ps(w[t].add(c)));
                for p in 0..P {
                    acc[t][p] = _mm512_fmadd_ps(wv, xv[p], acc[t][p]);
                }
            }
        }
        let mut out = [[[0f32; 2]; P]; R];
        for t in 0..R {
            for p in 0..P {
                out[t][p][0] = hsum(_mm512_castps512_ps256(acc[t][p]));
                out[t][p][1] = hsum(_mm512_extractf32x8_ps::<1>(acc[t][p]));
            }
        }
        out
    }

    pub(super) unsafe fn dot_rows_f32(w: &[&[f32]], x: &[&[f32]], out: &mut [[f32; XS512]; ROWS]) {
        let k = w[0].len();
        // Pairs of activation rows; an odd last row is paired with itself.
        let pair = |p: usize| [x[2 * p].as_ptr(), x[(2 * p + 1).min(x.len() - 1)].as_ptr()];
        macro_rules! run {
            ($r:literal, $p:literal) => {{
                let wp: [*const f32; $r] = std::array::from_fn(|t| w[t].as_ptr());
                let xp: [[*const f32; 2]; $p] = std::array::from_fn(pair);
                let y = dot_rows_f32_t::<$r, $p>(wp, xp, k);
                for t in 0..$r {
                    for (i, o) in out[t].iter_mut().take(x.len()).enumerate() {
                        *o = y[t][i / 2][i % 2];
                    }
                }
            }};
        }
        match (w.len(), x.len().div_ceil(2)) {
            (4, 3) => run!(4, 3),
            (4, 2) => run!(4, 2),
            (4, 1) => run!(4, 1),
            (3, 3) => run!(3, 3),
            (3, 2) => run!(3, 2),
            (3, 1) => run!(3, 1),
            (2, 3) => run!(2, 3),
            (2, 2) => run!(2, 2),
            (2, 1) => run!(2, 1),
            (1, 3) => run!(1, 3),
            (1, 2) => run!(1, 2),
            (1, 1) => run!(1, 1),
            (r, p) => unreachable!("{r} rows x {p} pairs"),
        }
    }
}

/// `out[t][i] = w[t] · x[i]` for 1 to [`ROWS`] f32 weight rows and 1 to
/// [`XS512`] activation rows, all of one length (a multiple of 32): bit for
/// bit [`crate::avx2::dot_rows_f32`]'s results, twice as many per instruction.
pub fn dot_rows_f32(w: &[&[f32]], x: &[&[f32]], out: &mut [[f32; XS512]; ROWS]) {
    assert!(available(), "AVX-512 F and DQ are needed");
    assert!((1..=ROWS).contains(&w.len()) && (1..=XS512).contains(&x.len()));
    let k = w[0].len();
    assert_eq!(k % GROUP, 0);
    assert!(w.iter().chain(x).all(|v| v.len() == k), "rows of one length");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the features are present (checked) and the lengths agree.
    unsafe {
        imp::dot_rows_f32(w, x, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}
