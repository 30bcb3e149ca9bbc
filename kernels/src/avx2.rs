//! AVX2 + FMA inner loops. A block of 32 weights is dequantized into four
//! registers of 8 floats and multiplied with the f32 activations; the four
//! registers keep four running sums, added in one fixed order at the end.
//!
//! [`dot_quantized`] (weights read straight from their blocks, used for one
//! activation row) and [`dequantize_row`] + [`dot_f32`] (a row dequantized
//! once and reused for many activation rows) run the same float operations
//! in the same order, so a product does not depend on how many rows were
//! computed together.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::format::{read_f16, BlockFormat, BLOCK};

/// Whether this CPU can run these loops (checked once by std, then cached).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::*;

    /// One block's 32 weights in four registers.
    trait Block {
        const BYTES: usize;
        unsafe fn load(block: &[u8]) -> [__m256; 4];
    }

    struct Q8_0;
    struct Q4_0;
    struct Q4_1;

    impl Block for Q8_0 {
        const BYTES: usize = 34;
        #[inline(always)]
        unsafe fn load(block: &[u8]) -> [__m256; 4] {
            debug_assert!(block.len() >= Self::BYTES);
            let d = _mm256_set1_ps(read_f16(block, 0));
            let qs = block.as_ptr().add(2);
            let mut w = [_mm256_setzero_ps(); 4];
            for (g, w) in w.iter_mut().enumerate() {
                let q = _mm_loadl_epi64(qs.add(8 * g) as *const __m128i);
                *w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
            }
            w
        }
    }

    /// The 32 four-bit values of a Q4 block, as 32-bit integers 0..=15 in
    /// weight order (low nibbles are weights 0..16, high nibbles 16..32).
    #[inline(always)]
    unsafe fn nibbles(qs: *const u8) -> [__m256i; 4] {
        let raw = _mm_loadu_si128(qs as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        [
            _mm256_cvtepu8_epi32(lo),
            _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)),
            _mm256_cvtepu8_epi32(hi),
            _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)),
        ]
    }

    impl Block for Q4_0 {
        const BYTES: usize = 18;
        #[inline(always)]
        unsafe fn load(block: &[u8]) -> [__m256; 4] {
            debug_assert!(block.len() >= Self::BYTES);
            let d = _mm256_set1_ps(read_f16(block, 0));
            let eight = _mm256_set1_epi32(8);
            let q = nibbles(block.as_ptr().add(2));
            let mut w = [_mm256_setzero_ps(); 4];
            for (w, q) in w.iter_mut().zip(q) {
                *w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, eight)), d);
            }
            w
        }
    }

    impl Block for Q4_1 {
        const BYTES: usize = 20;
        #[inline(always)]
        unsafe fn load(block: &[u8]) -> [__m256; 4] {
            debug_assert!(block.len() >= Self::BYTES);
            let d = _mm256_set1_ps(read_f16(block, 0));
            let m = _mm256_set1_ps(read_f16(block, 2));
            let q = nibbles(block.as_ptr().add(4));
            let mut w = [_mm256_setzero_ps(); 4];
            for (w, q) in w.iter_mut().zip(q) {
                *w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), d, m);
            }
            w
        }
    }

    #[inline(always)]
    unsafe fn sum(acc: [__m256; 4]) -> f32 {
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn accumulate(acc: &mut [__m256; 4], w: [__m256; 4], x: *const f32) {
        for g in 0..4 {
            acc[g] = _mm256_fmadd_ps(w[g], _mm256_loadu_ps(x.add(8 * g)), acc[g]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_quantized_t<B: Block>(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        for (b, block) in row.chunks_exact(B::BYTES).enumerate() {
            accumulate(&mut acc, B::load(block), x.as_ptr().add(b * BLOCK));
        }
        sum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dequantize_row_t<B: Block>(row: &[u8], out: &mut [f32]) {
        for (b, block) in row.chunks_exact(B::BYTES).enumerate() {
            let w = B::load(block);
            let o = out.as_mut_ptr().add(b * BLOCK);
            for (g, w) in w.into_iter().enumerate() {
                _mm256_storeu_ps(o.add(8 * g), w);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..w.len() / BLOCK {
            let p = w.as_ptr().add(b * BLOCK);
            let wb = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            accumulate(&mut acc, wb, x.as_ptr().add(b * BLOCK));
        }
        sum(acc)
    }

    /// [`dot_f32`] for three activation rows at once: each weight vector is
    /// loaded once for the three, and twelve independent sums keep the FMA
    /// units busy. Per row the operations are those of `dot_f32`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_f32_x3(w: &[f32], x: [&[f32]; 3]) -> [f32; 3] {
        let mut acc = [[_mm256_setzero_ps(); 4]; 3];
        for b in 0..w.len() / BLOCK {
            for g in 0..4 {
                let at = b * BLOCK + 8 * g;
                let wv = _mm256_loadu_ps(w.as_ptr().add(at));
                for r in 0..3 {
                    acc[r][g] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[r].as_ptr().add(at)), acc[r][g]);
                }
            }
        }
        [sum(acc[0]), sum(acc[1]), sum(acc[2])]
    }

    pub(super) unsafe fn dot_quantized(format: BlockFormat, row: &[u8], x: &[f32]) -> f32 {
        match format {
            BlockFormat::Q8_0 => dot_quantized_t::<Q8_0>(row, x),
            BlockFormat::Q4_0 => dot_quantized_t::<Q4_0>(row, x),
            BlockFormat::Q4_1 => dot_quantized_t::<Q4_1>(row, x),
        }
    }

    pub(super) unsafe fn dequantize_row(format: BlockFormat, row: &[u8], out: &mut [f32]) {
        match format {
            BlockFormat::Q8_0 => dequantize_row_t::<Q8_0>(row, out),
            BlockFormat::Q4_0 => dequantize_row_t::<Q4_0>(row, out),
            BlockFormat::Q4_1 => dequantize_row_t::<Q4_1>(row, out),
        }
    }
}

fn check(format: BlockFormat, row: &[u8], n: usize) {
    assert!(available(), "AVX2 and FMA are needed");
    assert_eq!(row.len() % format.block_bytes(), 0, "a row is whole blocks");
    assert_eq!(row.len() / format.block_bytes() * BLOCK, n, "one activation per weight");
}

/// `row · x` for one quantized row and an f32 vector of the same length.
pub fn dot_quantized(format: BlockFormat, row: &[u8], x: &[f32]) -> f32 {
    check(format, row, x.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 and FMA are present (checked) and the lengths agree.
    unsafe {
        imp::dot_quantized(format, row, x)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

/// Dequantizes one row into `out`, as [`dot_quantized`] sees its weights.
pub fn dequantize_row(format: BlockFormat, row: &[u8], out: &mut [f32]) {
    check(format, row, out.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as above.
    unsafe {
        imp::dequantize_row(format, row, out)
    }
}

/// [`dot_f32`] of `w` with three vectors, bit for bit the same results.
pub fn dot_f32_x3(w: &[f32], x: [&[f32]; 3]) -> [f32; 3] {
    assert!(available(), "AVX2 and FMA are needed");
    assert_eq!(w.len() % BLOCK, 0);
    assert!(x.iter().all(|x| x.len() == w.len()));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as above.
    unsafe {
        imp::dot_f32_x3(w, x)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

/// `w · x` for two f32 vectors whose length is a multiple of 32, summed
/// exactly as [`dot_quantized`] sums.
pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    assert!(available(), "AVX2 and FMA are needed");
    assert_eq!(w.len(), x.len());
    assert_eq!(w.len() % BLOCK, 0);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as above.
    unsafe {
        imp::dot_f32(w, x)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}
