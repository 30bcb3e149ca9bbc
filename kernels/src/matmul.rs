//! `y = x · wᵀ` for quantized `w` (n rows of k weights) and f32 `x` (m rows
//! of k values), split over rayon's threads by blocks of output columns
//! (weight rows). Each thread reads its weight rows once per tile of
//! activation rows, so a batch of m sequences costs about one pass over the
//! weights, not m.

use rayon::prelude::*;

use crate::format::{dequantize_row_scalar, BlockFormat};
use crate::{avx2, avx512};

/// Products below this many multiply-adds run on the calling thread: waking
/// the pool costs more than they take.
const PARALLEL_MIN_MACS: usize = 1 << 17;

/// Activation values per tile (1 MiB of f32): a tile of x stays in L2 while
/// a thread's weight rows stream past it.
const TILE_VALUES: usize = 1 << 18;

const LONE_ROWS: usize = 4;

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of output columns.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Which inner loops to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 for batched products, AVX2 for the rest: the same results
    /// as `Avx2`, bit for bit.
    Avx512,
    Avx2,
    Scalar,
}

impl Isa {
    /// The widest loops this CPU runs, or fewer where `FUSECHAT_KERNELS_ISA`
    /// (`avx512`, `avx2`, `scalar`) says so: to compare them on one machine.
    pub fn best() -> Self {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let detected = if avx512::available() {
                Isa::Avx512
            } else if avx2::available() {
                Isa::Avx2
            } else {
                Isa::Scalar
            };
            let asked = match std::env::var("FUSECHAT_KERNELS_ISA").as_deref() {
                Ok("avx2") => Isa::Avx2,
                Ok("scalar") => Isa::Scalar,
                _ => detected,
            };
            // Never more than the CPU has.
            match (detected, asked) {
                (Isa::Scalar, _) => Isa::Scalar,
                (Isa::Avx2, Isa::Avx512) => Isa::Avx2,
                (_, asked) => asked,
            }
        })
    }
}

/// `y[i][j] = Σ_k x[i][k] · w[j][k]`. `w` holds n rows of `format` blocks,
/// `x` is m × k and `y` is m × n, both row-major; `k` is a multiple of the
/// format's block (32, or 256 for the k-quants).
pub fn matmul(format: BlockFormat, w: &[u8], n: usize, k: usize, x: &[f32], m: usize, y: &mut [f32]) {
    matmul_with(Isa::best(), format, w, n, k, x, m, y)
}

#[allow(clippy::too_many_arguments)]
pub fn matmul_with(isa: Isa, format: BlockFormat, w: &[u8], n: usize, k: usize, x: &[f32], m: usize, y: &mut [f32]) {
    let bv = format.block_values();
    assert_eq!(k % bv, 0, "k = {k} is not a multiple of {format:?}'s block of {bv}");
    assert_eq!(w.len(), n * format.row_bytes(k), "weights are n = {n} rows of k = {k}");
    assert_eq!(x.len(), m * k, "x is m = {m} rows of k = {k}");
    assert_eq!(y.len(), m * n, "y is m = {m} rows of n = {n}");
    if m == 0 || n == 0 {
        return;
    }
    let out = OutPtr(y.as_mut_ptr());
    let macs = m * n * k;
    let threads = rayon::current_num_threads().max(1);
    if macs < PARALLEL_MIN_MACS || threads == 1 {
        // SAFETY: all columns, on this thread only.
        unsafe { columns(isa, format, w, n, k, x, m, out, 0..n) };
        return;
    }
    // A few chunks per thread so that a thread slowed by other work does not
    // hold the others up; chunks of 8 rows or more.
    let chunk = n.div_ceil(threads * 4).max(8);
    (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let cols = c * chunk..((c + 1) * chunk).min(n);
        // SAFETY: chunks are disjoint column ranges of y.
        unsafe { columns(isa, format, w, n, k, x, m, out, cols) };
    });
}

/// Output columns `cols` of all m rows.
///
/// # Safety
/// `out` points to m × n floats and no other thread writes these columns.
#[allow(clippy::too_many_arguments)]
unsafe fn columns(
    isa: Isa,
    format: BlockFormat,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    out: OutPtr,
    cols: std::ops::Range<usize>,
) {
    let rb = format.row_bytes(k);
    let row = |j: usize| &w[j * rb..(j + 1) * rb];
    let write = |i: usize, j: usize, v: f32| *out.0.add(i * n + j) = v;
    let xi = |i: usize| &x[i * k..(i + 1) * k];
    // Weight rows in tiles of up to `avx2::ROWS`.
    let tiles = || {
        (cols.start..cols.end)
            .step_by(avx2::ROWS)
            .map(|j0| j0..(j0 + avx2::ROWS).min(cols.end))
    };
    match isa {
        Isa::Avx2 | Isa::Avx512 if m == 1 => {
            let mut y = [0f32; avx2::ROWS];
            let lone_tiles = (cols.start..cols.end)
                .step_by(LONE_ROWS)
                .map(|j0| j0..(j0 + LONE_ROWS).min(cols.end));
            for js in lone_tiles {
                let mut rows: [&[u8]; avx2::ROWS] = [&[]; avx2::ROWS];
                for (t, j) in js.clone().enumerate() {
                    rows[t] = row(j);
                }
                avx2::dot_rows_quantized(format, &rows[..js.len()], x, &mut y[..js.len()]);
                for (t, j) in js.enumerate() {
                    write(0, j, y[t]);
                }
            }
        }
        Isa::Avx2 | Isa::Avx512 => {
            // A tile of weight rows, dequantized once per tile of x, is
            // multiplied with x a few rows at a time; both stay in cache.
            let wide = isa == Isa::Avx512;
            let xs_per_call = if wide { avx512::XS512 } else { avx2::XS };
            let mut wpanel = vec![0f32; avx2::ROWS * k];
            let tile = (TILE_VALUES / k).max(1);
            let mut y = [[0f32; avx512::XS512]; avx2::ROWS];
            let mut y3 = [[0f32; avx2::XS]; avx2::ROWS];
            for start in (0..m).step_by(tile) {
                let rows = start..(start + tile).min(m);
                for js in tiles() {
                    for (t, j) in js.clone().enumerate() {
                        avx2::dequantize_row(format, row(j), &mut wpanel[t * k..(t + 1) * k]);
                    }
                    let mut ws: [&[f32]; avx2::ROWS] = [&[]; avx2::ROWS];
                    for (t, w) in ws.iter_mut().take(js.len()).enumerate() {
                        *w = &wpanel[t * k..(t + 1) * k];
                    }
                    for i0 in rows.clone().step_by(xs_per_call) {
                        let is = i0..(i0 + xs_per_call).min(rows.end);
                        let mut xs: [&[f32]; avx512::XS512] = [&[]; avx512::XS512];
                        for (r, i) in is.clone().enumerate() {
                            xs[r] = xi(i);
                        }
                        if wide {
                            avx512::dot_rows_f32(&ws[..js.len()], &xs[..is.len()], &mut y);
                        } else {
                            avx2::dot_rows_f32(&ws[..js.len()], &xs[..is.len()], &mut y3);
                            for (t, row) in y3.iter().enumerate() {
                                y[t][..avx2::XS].copy_from_slice(row);
                            }
                        }
                        for (t, j) in js.clone().enumerate() {
                            for (r, i) in is.clone().enumerate() {
                                write(i, j, y[t][r]);
                            }
                        }
                    }
                }
            }
        }
        Isa::Scalar => {
            let mut wrow = vec![0f32; k];
            for j in cols {
                dequantize_row_scalar(format, row(j), &mut wrow);
                for i in 0..m {
                    write(i, j, wrow.iter().zip(xi(i)).map(|(a, b)| a * b).sum());
                }
            }
        }
    }
}
