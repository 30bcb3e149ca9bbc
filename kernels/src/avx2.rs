//! AVX2 + FMA inner loops. Weights are dequantized 32 at a time into four
//! registers of 8 floats and multiplied with the f32 activations. Every
//! output keeps one accumulator of 8 lanes, fed in the order of the row and
//! added up in one fixed order at the end; several outputs are computed side
//! by side so that the multiply-adds do not wait on each other.
//!
//! [`dot_rows_quantized`] (weights read straight from their blocks, used for
//! one activation row) and [`dequantize_row`] + [`dot_rows_f32`] (rows
//! dequantized once and reused for many activation rows) run the same float
//! operations in the same order for every output, so a product does not
//! depend on how many rows were computed together.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use crate::format::{BlockFormat, GROUP};

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

    /// How one format's blocks turn into weights, 32 at a time.
    trait Format {
        /// Bytes of a block.
        const BYTES: usize;
        /// Groups of 32 weights in a block.
        const GROUPS: usize;
        /// What a block's groups share (its scales), read once per block.
        type Header: Copy + Default;
        unsafe fn header(block: *const u8) -> Self::Header;
        /// Weights `32 g .. 32 g + 32` of the block, in four registers.
        unsafe fn group(block: *const u8, header: &Self::Header, g: usize) -> [__m256; 4];
    }

    struct Q8_0;
    struct Q4_0;
    struct Q4_1;
    struct Q5_0;
    struct Q5_1;
    struct Q4K;
    struct Q6K;

    #[inline(always)]
    unsafe fn f16_at(block: *const u8, at: usize) -> f32 {
        half::f16::from_le_bytes([*block.add(at), *block.add(at + 1)]).to_f32()
    }

    /// Eight bytes from `p` as eight 32-bit integers, zero-extended.
    #[inline(always)]
    unsafe fn widen8(p: __m128i) -> __m256i {
        _mm256_cvtepu8_epi32(p)
    }

    /// 32 bytes (two registers of 16) as four registers of eight i32.
    #[inline(always)]
    unsafe fn widen32(lo: __m128i, hi: __m128i) -> [__m256i; 4] {
        [widen8(lo), widen8(_mm_srli_si128(lo, 8)), widen8(hi), widen8(_mm_srli_si128(hi, 8))]
    }

    /// The 32 four-bit values of a 32-weight block, as 32-bit integers
    /// 0..=15 in weight order (low nibbles are weights 0..16, high 16..32).
    #[inline(always)]
    unsafe fn nibbles(qs: *const u8) -> [__m256i; 4] {
        let raw = _mm_loadu_si128(qs as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        widen32(_mm_and_si128(raw, mask), _mm_and_si128(_mm_srli_epi16(raw, 4), mask))
    }

    /// The 32 five-bit values of a Q5 block as bytes 0..=31 in weight order:
    /// four low bits from the nibbles at `qs` (low nibbles are weights
    /// 0..16), the fifth from bit i of `qh` for weight i.
    #[inline(always)]
    unsafe fn q5_bytes(qs: *const u8, qh: u32) -> __m256i {
        let raw = _mm_loadu_si128(qs as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let nibbles = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
        // Byte i gets byte i / 8 of `qh` (the shuffle stays within each
        // 128-bit half, and both halves hold `qh` four times), then is
        // compared with its own bit i % 8.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(qh as i32),
            _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_or_si256(nibbles, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
    }

    /// 32 bytes as four registers of eight i32, sign- or zero-extended.
    #[inline(always)]
    unsafe fn widen_bytes<const SIGNED: bool>(v: __m256i) -> [__m256i; 4] {
        let lo = _mm256_castsi256_si128(v);
        let hi = _mm256_extracti128_si256::<1>(v);
        let parts = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
        parts.map(|p| if SIGNED { _mm256_cvtepi8_epi32(p) } else { _mm256_cvtepu8_epi32(p) })
    }

    impl Format for Q8_0 {
        const BYTES: usize = 34;
        const GROUPS: usize = 1;
        type Header = f32;
        #[inline(always)]
        unsafe fn header(block: *const u8) -> f32 {
            f16_at(block, 0)
        }
        #[inline(always)]
        unsafe fn group(block: *const u8, d: &f32, _: usize) -> [__m256; 4] {
            let d = _mm256_set1_ps(*d);
            let qs = block.add(2);
            let mut w = [_mm256_setzero_ps(); 4];
            for (g, w) in w.iter_mut().enumerate() {
                let q = _mm_loadl_epi64(qs.add(8 * g) as *const __m128i);
                *w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
            }
            w
        }
    }

    impl Format for Q4_0 {
        const BYTES: usize = 18;
        const GROUPS: usize = 1;
        type Header = f32;
        #[inline(always)]
        unsafe fn header(block: *const u8) -> f32 {
            f16_at(block, 0)
        }
        #[inline(always)]
        unsafe fn group(block: *const u8, d: &f32, _: usize) -> [__m256; 4] {
            let d = _mm256_set1_ps(*d);
            let eight = _mm256_set1_epi32(8);
            let q = nibbles(block.add(2));
            let mut w = [_mm256_setzero_ps(); 4];
            for (w, q) in w.iter_mut().zip(q) {
                *w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, eight)), d);
            }
            w
        }
    }

    impl Format for Q4_1 {
        const BYTES: usize = 20;
        const GROUPS: usize = 1;
        type Header = (f32, f32);
        #[inline(always)]
        unsafe fn header(block: *const u8) -> (f32, f32) {
            (f16_at(block, 0), f16_at(block, 2))
        }
        #[inline(always)]
        unsafe fn group(block: *const u8, &(d, m): &(f32, f32), _: usize) -> [__m256; 4] {
            let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
            let q = nibbles(block.add(4));
            let mut w = [_mm256_setzero_ps(); 4];
            for (w, q) in w.iter_mut().zip(q) {
                *w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), d, m);
            }
            w
        }
    }

    impl Format for Q5_0 {
        const BYTES: usize = 22;
        const GROUPS: usize = 1;
        type Header = f32;
        #[inline(always)]
        unsafe fn header(block: *const u8) -> f32 {
            f16_at(block, 0)
        }
        #[inline(always)]
        unsafe fn group(block: *const u8, d: &f32, _: usize) -> [__m256; 4] {
            let d = _mm256_set1_ps(*d);
            let qh = (block.add(2) as *const u32).read_unaligned().to_le();
            let q = _mm256_sub_epi8(q5_bytes(block.add(6), qh), _mm256_set1_epi8(16));
            let mut w = [_mm256_setzero_ps(); 4];
            for (w, q) in w.iter_mut().zip(widen_bytes::<true>(q)) {
                *w = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
            }
            w
        }
    }

    impl Format for Q5_1 {
        const BYTES: usize = 24;
        const GROUPS: usize = 1;
        type Header = (f32, f32);
        #[inline(always)]
        unsafe fn header(block: *const u8) -> (f32, f32) {
            (f16_at(block, 0), f16_at(block, 2))
        }
        #[inline(always)]
        unsafe fn group(block: *const u8, &(d, m): &(f32, f32), _: usize) -> [__m256; 4] {
            let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
            let qh = (block.add(4) as *const u32).read_unaligned().to_le();
            let q = q5_bytes(block.add(8), qh);
            let mut w = [_mm256_setzero_ps(); 4];
            for (w, q) in w.iter_mut().zip(widen_bytes::<false>(q)) {
                *w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), d, m);
            }
            w
        }
    }

    /// Per sub-block of 32: `d * scale` and `-(dmin * min)`.
    #[derive(Clone, Copy, Default)]
    struct Q4KHeader {
        scale: [f32; 8],
        neg_min: [f32; 8],
    }

    impl Format for Q4K {
        const BYTES: usize = 144;
        const GROUPS: usize = 8;
        type Header = Q4KHeader;
        #[inline(always)]
        unsafe fn header(block: *const u8) -> Q4KHeader {
            let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
            let scales = std::slice::from_raw_parts(block.add(4), 12);
            let mut h = Q4KHeader { scale: [0.0; 8], neg_min: [0.0; 8] };
            for j in 0..8 {
                let (sc, m) = crate::format::q4k_scale_min(scales, j);
                h.scale[j] = d * sc as f32;
                h.neg_min[j] = -(dmin * m as f32);
            }
            h
        }
        #[inline(always)]
        unsafe fn group(block: *const u8, h: &Q4KHeader, g: usize) -> [__m256; 4] {
            let qs = block.add(16 + 32 * (g / 2));
            let mut lo = _mm_loadu_si128(qs as *const __m128i);
            let mut hi = _mm_loadu_si128(qs.add(16) as *const __m128i);
            if g % 2 == 1 {
                lo = _mm_srli_epi16(lo, 4);
                hi = _mm_srli_epi16(hi, 4);
            }
            let mask = _mm_set1_epi8(0x0F);
            let q = widen32(_mm_and_si128(lo, mask), _mm_and_si128(hi, mask));
            let (scale, neg_min) = (_mm256_set1_ps(h.scale[g]), _mm256_set1_ps(h.neg_min[g]));
            let mut w = [_mm256_setzero_ps(); 4];
            for (w, q) in w.iter_mut().zip(q) {
                *w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), scale, neg_min);
            }
            w
        }
    }

    impl Format for Q6K {
        const BYTES: usize = 210;
        const GROUPS: usize = 8;
        /// `d * scale` of each of the 16 sub-blocks of 16.
        type Header = [f32; 16];
        #[inline(always)]
        unsafe fn header(block: *const u8) -> [f32; 16] {
            let d = f16_at(block, 208);
            let mut s = [0f32; 16];
            for (j, s) in s.iter_mut().enumerate() {
                *s = d * (*block.add(192 + j) as i8) as f32;
            }
            s
        }
        #[inline(always)]
        unsafe fn group(block: *const u8, scales: &[f32; 16], g: usize) -> [__m256; 4] {
            let (half, r) = (g / 4, g % 4);
            let ql = block.add(64 * half + 32 * (r % 2));
            let qh = block.add(128 + 32 * half);
            let mask4 = _mm_set1_epi8(0x0F);
            let mask2 = _mm_set1_epi8(3);
            let shift = _mm_cvtsi32_si128(2 * r as i32);
            let mut bytes = [_mm_setzero_si128(); 2];
            for (i, bytes) in bytes.iter_mut().enumerate() {
                let mut low = _mm_loadu_si128(ql.add(16 * i) as *const __m128i);
                if r >= 2 {
                    low = _mm_srli_epi16(low, 4);
                }
                let low = _mm_and_si128(low, mask4);
                let high = _mm_loadu_si128(qh.add(16 * i) as *const __m128i);
                let high = _mm_and_si128(_mm_srl_epi16(high, shift), mask2);
                *bytes = _mm_or_si128(low, _mm_slli_epi16(high, 4));
            }
            let q = widen32(bytes[0], bytes[1]);
            let base = 8 * half + 2 * r;
            let thirty_two = _mm256_set1_epi32(32);
            let mut w = [_mm256_setzero_ps(); 4];
            for (i, (w, q)) in w.iter_mut().zip(q).enumerate() {
                let scale = _mm256_set1_ps(scales[base + i / 2]);
                *w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q, thirty_two)), scale);
            }
            w
        }
    }

    /// How far ahead of the block being read its row is asked for, in bytes.
    /// The hardware prefetcher alone leaves a decode step (one activation
    /// row, every weight read once) waiting on memory: 1 KiB ahead made
    /// these loops 1.5-2x faster on a 2-core Xeon (examples/format_speed.rs).
    const PREFETCH_AHEAD: usize = 8192;

    #[inline(always)]
    unsafe fn prefetch_block<F: Format>(block: *const u8) {
        for line in 0..F::BYTES.div_ceil(64) {
            _mm_prefetch::<_MM_HINT_T0>(block.add(PREFETCH_AHEAD + 64 * line) as *const i8);
        }
    }

    /// The eight lanes of one accumulator, added in one fixed order.
    #[inline(always)]
    unsafe fn hsum(acc: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `R` quantized rows of `blocks` blocks each, times one activation row.
    /// Each output keeps one accumulator, fed eight weights at a time in
    /// the order of the row; the rows are read side by side, so `R` streams
    /// of weights are in flight and each activation vector is loaded once.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_rows_quantized_t<F: Format, const R: usize>(
        rows: [*const u8; R],
        blocks: usize,
        x: *const f32,
    ) -> [f32; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut xp = x;
        for b in 0..blocks {
            let mut header = [F::Header::default(); R];
            for t in 0..R {
                let block = rows[t].add(b * F::BYTES);
                prefetch_block::<F>(block);
                header[t] = F::header(block);
            }
            for g in 0..F::GROUPS {
                let xv = [
                    _mm256_loadu_ps(xp),
                    _mm256_loadu_ps(xp.add(8)),
                    _mm256_loadu_ps(xp.add(16)),
                    _mm256_loadu_ps(xp.add(24)),
                ];
                for t in 0..R {
                    let w = F::group(rows[t].add(b * F::BYTES), &header[t], g);
                    for r in 0..4 {
                        acc[t] = _mm256_fmadd_ps(w[r], xv[r], acc[t]);
                    }
                }
                xp = xp.add(GROUP);
            }
        }
        let mut out = [0f32; R];
        for t in 0..R {
            out[t] = hsum(acc[t]);
        }
        out
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dequantize_row_t<F: Format>(row: &[u8], out: &mut [f32]) {
        let mut o = out.as_mut_ptr();
        for block in row.chunks_exact(F::BYTES) {
            let block = block.as_ptr();
            prefetch_block::<F>(block);
            let h = F::header(block);
            for g in 0..F::GROUPS {
                for (r, w) in F::group(block, &h, g).into_iter().enumerate() {
                    _mm256_storeu_ps(o.add(8 * r), w);
                }
                o = o.add(GROUP);
            }
        }
    }

    /// `R` dequantized weight rows times `M` activation rows, `k` values
    /// each: every output is summed exactly as [`dot_rows_quantized_t`] sums
    /// it, with `R · M` accumulators in registers (each weight vector loaded
    /// once for the `M` rows, each activation vector once for the `R`).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_rows_f32_t<const R: usize, const M: usize>(
        w: [*const f32; R],
        x: [*const f32; M],
        k: usize,
    ) -> [[f32; M]; R] {
        let mut acc = [[_mm256_setzero_ps(); M]; R];
        for c in (0..k).step_by(8) {
            let mut xv = [_mm256_setzero_ps(); M];
            for i in 0..M {
                xv[i] = _mm256_loadu_ps(x[i].add(c));
            }
            for t in 0..R {
                let wv = _mm256_loadu_ps(w[t].add(c));
                for i in 0..M {
                    acc[t][i] = _mm256_fmadd_ps(wv, xv[i], acc[t][i]);
                }
            }
        }
        let mut out = [[0f32; M]; R];
        for t in 0..R {
            for i in 0..M {
                out[t][i] = hsum(acc[t][i]);
            }
        }
        out
    }

    macro_rules! by_format {
        ($format:expr, $f:ident, $($args:tt)*) => {
            match $format {
                BlockFormat::Q8_0 => $f::<Q8_0, $($args)*>,
                BlockFormat::Q4_0 => $f::<Q4_0, $($args)*>,
                BlockFormat::Q4_1 => $f::<Q4_1, $($args)*>,
                BlockFormat::Q5_0 => $f::<Q5_0, $($args)*>,
                BlockFormat::Q5_1 => $f::<Q5_1, $($args)*>,
                BlockFormat::Q4K => $f::<Q4K, $($args)*>,
                BlockFormat::Q6K => $f::<Q6K, $($args)*>,
            }
        };
    }

    /// [`dot_rows_quantized_t`] for 1 to 4 rows, written to `out`.
    pub(super) unsafe fn dot_rows_quantized(format: BlockFormat, rows: &[&[u8]], x: &[f32], out: &mut [f32]) {
        let blocks = rows[0].len() / format.block_bytes();
        let p = |t: usize| rows[t].as_ptr();
        let x = x.as_ptr();
        match rows.len() {
            1 => out.copy_from_slice(&by_format!(format, dot_rows_quantized_t, 1)([p(0)], blocks, x)),
            2 => out.copy_from_slice(&by_format!(format, dot_rows_quantized_t, 2)([p(0), p(1)], blocks, x)),
            3 => out.copy_from_slice(&by_format!(format, dot_rows_quantized_t, 3)([p(0), p(1), p(2)], blocks, x)),
            4 => out.copy_from_slice(&by_format!(format, dot_rows_quantized_t, 4)([p(0), p(1), p(2), p(3)], blocks, x)),
            r => unreachable!("{r} rows"),
        }
    }

    pub(super) unsafe fn dequantize_row(format: BlockFormat, row: &[u8], out: &mut [f32]) {
        match format {
            BlockFormat::Q8_0 => dequantize_row_t::<Q8_0>(row, out),
            BlockFormat::Q4_0 => dequantize_row_t::<Q4_0>(row, out),
            BlockFormat::Q4_1 => dequantize_row_t::<Q4_1>(row, out),
            BlockFormat::Q5_0 => dequantize_row_t::<Q5_0>(row, out),
            BlockFormat::Q5_1 => dequantize_row_t::<Q5_1>(row, out),
            BlockFormat::Q4K => dequantize_row_t::<Q4K>(row, out),
            BlockFormat::Q6K => dequantize_row_t::<Q6K>(row, out),
        }
    }

    /// [`dot_rows_f32_t`] for 1 to 4 weight rows and 1 to 3 activation rows;
    /// `out[t][i]` is weight row `t` times activation row `i`.
    pub(super) unsafe fn dot_rows_f32(w: &[&[f32]], x: &[&[f32]], out: &mut [[f32; 3]; 4]) {
        let k = w[0].len();
        macro_rules! run {
            ($r:literal, $m:literal) => {{
                let wp: [*const f32; $r] = std::array::from_fn(|t| w[t].as_ptr());
                let xp: [*const f32; $m] = std::array::from_fn(|i| x[i].as_ptr());
                let y = dot_rows_f32_t::<$r, $m>(wp, xp, k);
                for t in 0..$r {
                    out[t][..$m].copy_from_slice(&y[t]);
                }
            }};
        }
        match (w.len(), x.len()) {
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
            (r, m) => unreachable!("{r} x {m} rows"),
        }
    }
}

/// Weight rows one call takes together (and the most [`dot_rows_f32`] takes).
pub const ROWS: usize = 4;
/// Activation rows [`dot_rows_f32`] takes together.
pub const XS: usize = 3;

fn check(format: BlockFormat, row: &[u8], n: usize) {
    assert!(available(), "AVX2 and FMA are needed");
    assert_eq!(row.len() % format.block_bytes(), 0, "a row is whole blocks");
    assert_eq!(row.len() / format.block_bytes() * format.block_values(), n, "one activation per weight");
}

/// `out[t] = rows[t] · x` for 1 to [`ROWS`] quantized rows of one format and
/// an f32 vector as long as each row. Each output is one accumulator of
/// eight lanes fed in the order of the row, then added up in a fixed order,
/// whatever the number of rows: the same as [`dot_rows_f32`] on
/// [`dequantize_row`]'s values.
pub fn dot_rows_quantized(format: BlockFormat, rows: &[&[u8]], x: &[f32], out: &mut [f32]) {
    assert!((1..=ROWS).contains(&rows.len()), "1 to {ROWS} rows");
    assert_eq!(out.len(), rows.len(), "one output per row");
    for row in rows {
        check(format, row, x.len());
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 and FMA are present (checked) and the lengths agree.
    unsafe {
        imp::dot_rows_quantized(format, rows, x, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

/// Dequantizes one row into `out`, as [`dot_rows_quantized`] sees its weights.
pub fn dequantize_row(format: BlockFormat, row: &[u8], out: &mut [f32]) {
    check(format, row, out.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as above.
    unsafe {
        imp::dequantize_row(format, row, out)
    }
}

/// `out[t][i] = w[t] · x[i]` for 1 to [`ROWS`] f32 weight rows and 1 to
/// [`XS`] activation rows, all of one length (a multiple of 32), each summed
/// exactly as [`dot_rows_quantized`] sums.
pub fn dot_rows_f32(w: &[&[f32]], x: &[&[f32]], out: &mut [[f32; XS]; ROWS]) {
    assert!(available(), "AVX2 and FMA are needed");
    assert!((1..=ROWS).contains(&w.len()) && (1..=XS).contains(&x.len()));
    let k = w[0].len();
    assert_eq!(k % GROUP, 0);
    assert!(w.iter().chain(x).all(|v| v.len() == k), "rows of one length");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as above.
    unsafe {
        imp::dot_rows_f32(w, x, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}
