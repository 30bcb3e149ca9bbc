//! `y = x · wᵀ` for quantized `w` (n rows of k weights) and f32 `x` (m rows
//! of k values), split over rayon's threads by blocks of output columns
//! (weight rows). Each thread reads its weight rows once per tile of
//! activation rows, so a batch of m sequences costs about one pass over the
//! weights, not m.

use rayon::prelude::*;

use crate::avx2;
use crate::format::{dequantize_row_scalar, BlockFormat, BLOCK};

/// Products below this many multiply-adds run on the calling thread: waking
/// the pool costs more than they take.
const PARALLEL_MIN_MACS: usize = 1 << 17;

/// Dequantized weight values per panel (16 KiB of f32).
const PANEL_VALUES: usize = 1 << 12;

/// Activation values per tile (256 KiB of f32): a tile of x stays in L2 while
/// a thread's weight rows stream past it.
const TILE_VALUES: usize = 1 << 16;

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of output columns.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Which inner loops to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx2,
    Scalar,
}

impl Isa {
    pub fn best() -> Self {
        if avx2::available() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }
}

/// `y[i][j] = Σ_k x[i][k] · w[j][k]`. `w` holds n rows of `format` blocks,
/// `x` is m × k and `y` is m × n, both row-major; `k` is a multiple of 32.
pub fn matmul(format: BlockFormat, w: &[u8], n: usize, k: usize, x: &[f32], m: usize, y: &mut [f32]) {
    matmul_with(Isa::best(), format, w, n, k, x, m, y)
}

#[allow(clippy::too_many_arguments)]
pub fn matmul_with(isa: Isa, format: BlockFormat, w: &[u8], n: usize, k: usize, x: &[f32], m: usize, y: &mut [f32]) {
    assert_eq!(k % BLOCK, 0, "k = {k} is not a multiple of {BLOCK}");
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
    match isa {
        Isa::Avx2 if m == 1 => {
            for j in cols {
                write(0, j, avx2::dot_quantized(format, row(j), x));
            }
        }
        Isa::Avx2 => {
            // A panel of weight rows, dequantized once per tile of x, is
            // multiplied with x three rows at a time: each group of three x
            // rows is reused across the panel while both stay in L1.
            let panel = (PANEL_VALUES / k).max(1);
            let mut wpanel = vec![0f32; panel * k];
            let tile = (TILE_VALUES / k).max(1);
            let xi = |i: usize| &x[i * k..(i + 1) * k];
            for start in (0..m).step_by(tile) {
                let rows = start..(start + tile).min(m);
                let mut j0 = cols.start;
                while j0 < cols.end {
                    let js = j0..(j0 + panel).min(cols.end);
                    for (p, j) in js.clone().enumerate() {
                        avx2::dequantize_row(format, row(j), &mut wpanel[p * k..(p + 1) * k]);
                    }
                    let mut i = rows.start;
                    while i + 3 <= rows.end {
                        for (p, j) in js.clone().enumerate() {
                            let y3 = avx2::dot_f32_x3(&wpanel[p * k..(p + 1) * k], [xi(i), xi(i + 1), xi(i + 2)]);
                            for (r, v) in y3.into_iter().enumerate() {
                                write(i + r, j, v);
                            }
                        }
                        i += 3;
                    }
                    for i in i..rows.end {
                        for (p, j) in js.clone().enumerate() {
                            write(i, j, avx2::dot_f32(&wpanel[p * k..(p + 1) * k], xi(i)));
                        }
                    }
                    j0 = js.end;
                }
            }
        }
        Isa::Scalar => {
            let mut wrow = vec![0f32; k];
            for j in cols {
                dequantize_row_scalar(format, row(j), &mut wrow);
                for i in 0..m {
                    let xi = &x[i * k..(i + 1) * k];
                    write(i, j, wrow.iter().zip(xi).map(|(a, b)| a * b).sum());
                }
            }
        }
    }
}
