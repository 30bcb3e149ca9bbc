//! Intel MKL's `cblas_sgemm` for the CPU's f32 matrix products, when the
//! machine has MKL (`pip install mkl` puts `libmkl_rt` in the Python prefix's
//! `lib`): found and loaded at run time, so the binary neither needs it to
//! build nor to run.
//!
//! Why: a training step on the CPU is three quarters matrix products, and on
//! the AVX-512 machines measured here candle's `gemm` crate reaches 240-330
//! GFLOP/s on a step's shapes where MKL reaches 330-370 (PyTorch's CPU
//! products are MKL's). Nothing else changes: the products are the same, in
//! f32, summed in another order.
//!
//! MKL runs single-threaded in each call (its sequential layer: its own
//! OpenMP threads would compete with rayon's, which run everything else) and
//! a product is cut into one block of rows (or columns) per rayon thread. Its
//! conditional numerical reproducibility mode is strict, so a product gives
//! the same bits whatever the alignment of its operands, as the resumed run
//! of a killed one must. The bits do depend on the thread count (it decides
//! the cut) and on MKL being there at all: a run resumes bit for bit on the
//! machine (and settings) that started it.
//!
//! `FUSECHAT_MKL=/path/to/libmkl_rt.so.N` names the library; `FUSECHAT_MKL=none`
//! keeps candle's gemm.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::cpu_backend::Sgemm;
use rayon::prelude::*;

type CblasSgemm = unsafe extern "C" fn(
    layout: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;
/// `MKL_THREADING_SEQUENTIAL`.
const SEQUENTIAL: c_int = 1;
/// `MKL_INTERFACE_LP64`.
const LP64: c_int = 0;
/// `MKL_CBWR_AUTO | MKL_CBWR_STRICT`: reproducible bits on this machine's
/// fastest code path, whatever the operands' alignment.
const CBWR_AUTO_STRICT: c_int = 2 | 0x10000;

struct Mkl {
    sgemm: CblasSgemm,
    /// What was loaded, for the log.
    description: String,
}

static MKL: OnceLock<Option<Mkl>> = OnceLock::new();

/// Loads MKL (once) and routes candle's CPU f32 products through it. Returns
/// what the products run on, for the log.
pub fn install() -> String {
    let mkl = MKL.get_or_init(|| match load() {
        Ok(mkl) => mkl,
        Err(why) => {
            tracing::warn!("not using MKL: {why}");
            None
        }
    });
    match mkl {
        Some(mkl) => {
            candle_core::cpu_backend::set_sgemm(run);
            mkl.description.clone()
        }
        None => "candle's gemm".into(),
    }
}

/// The library to load: `FUSECHAT_MKL`, else the first `libmkl_rt` in the
/// places pip, conda and the system put it.
fn candidates() -> Vec<PathBuf> {
    if let Some(path) = std::env::var_os("FUSECHAT_MKL") {
        return vec![PathBuf::from(path)];
    }
    let mut dirs: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(|v| std::env::var_os(v))
        .map(|p| PathBuf::from(p).join("lib"))
        .collect();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(&home).join(".local/lib"));
        // pyenv's interpreters, where a plain `pip install mkl` lands.
        if let Ok(versions) = std::fs::read_dir(PathBuf::from(&home).join(".pyenv/versions")) {
            dirs.extend(versions.flatten().map(|v| v.path().join("lib")));
        }
    }
    dirs.extend(
        [
            "/usr/local/lib",
            "/usr/lib/x86_64-linux-gnu",
            "/opt/intel/oneapi/mkl/latest/lib",
        ]
        .map(PathBuf::from),
    );
    let mut found = Vec::new();
    for dir in dirs {
        for name in ["libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"] {
            let path = dir.join(name);
            if path.is_file() {
                found.push(path);
            }
        }
    }
    found
}

fn load() -> Result<Option<Mkl>, String> {
    if std::env::var("FUSECHAT_MKL").as_deref() == Ok("none") {
        return Ok(None);
    }
    let Some(path) = candidates().into_iter().next() else {
        return Ok(None);
    };
    let shown = path.display().to_string();
    let c_path = CString::new(shown.clone()).map_err(|_| format!("{shown}: not a path"))?;
    // SAFETY: dlopen/dlsym with NUL-terminated names; the library stays loaded
    // for the life of the process (never dlclosed), so its functions stay valid.
    unsafe {
        let lib = libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if lib.is_null() {
            return Err(format!("{shown}: {}", dl_error()));
        }
        let symbol = |name: &CStr| -> Result<*mut c_void, String> {
            let f = libc::dlsym(lib, name.as_ptr());
            match f.is_null() {
                true => Err(format!("{shown} has no {}", name.to_string_lossy())),
                false => Ok(f),
            }
        };
        let set_layer: unsafe extern "C" fn(c_int) -> c_int =
            std::mem::transmute(symbol(c"MKL_Set_Threading_Layer")?);
        let set_cbwr: unsafe extern "C" fn(c_int) -> c_int =
            std::mem::transmute(symbol(c"MKL_CBWR_Set")?);
        let version: unsafe extern "C" fn(*mut c_char, c_int) =
            std::mem::transmute(symbol(c"MKL_Get_Version_String")?);
        let set_interface: unsafe extern "C" fn(c_int) -> c_int =
            std::mem::transmute(symbol(c"MKL_Set_Interface_Layer")?);
        let sgemm: CblasSgemm = std::mem::transmute(symbol(c"cblas_sgemm")?);
        // 32-bit integers, as `CblasSgemm` declares them, whatever
        // MKL_INTERFACE_LAYER says.
        if set_interface(LP64) != LP64 {
            return Err(format!("{shown}: its LP64 interface is missing"));
        }
        if set_layer(SEQUENTIAL) < 0 {
            return Err(format!(
                "{shown}: its sequential threading layer is missing"
            ));
        }
        let status = set_cbwr(CBWR_AUTO_STRICT);
        if status != 0 {
            return Err(format!(
                "{shown}: strict reproducibility refused ({status})"
            ));
        }
        let mut buf = [0 as c_char; 256];
        version(buf.as_mut_ptr(), buf.len() as c_int);
        let name = CStr::from_ptr(buf.as_ptr())
            .to_string_lossy()
            .trim()
            .to_string();
        Ok(Some(Mkl {
            sgemm,
            description: format!("{name} ({shown})"),
        }))
    }
}

fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated message.
    unsafe {
        let e = libc::dlerror();
        match e.is_null() {
            true => "unknown error".into(),
            false => CStr::from_ptr(e).to_string_lossy().into_owned(),
        }
    }
}

/// How a matrix reaches BLAS: its transposition flag and leading dimension,
/// when one of its strides is 1 (`rows × cols`, row-major view).
fn operand(rows: usize, cols: usize, rs: isize, cs: isize) -> Option<(c_int, c_int)> {
    let fits = |ld: isize, min: usize| ld >= min.max(1) as isize && ld <= c_int::MAX as isize;
    if cs == 1 && fits(rs, cols) {
        Some((NO_TRANS, rs as c_int))
    } else if rs == 1 && fits(cs, rows) {
        Some((TRANS, cs as c_int))
    } else {
        None
    }
}

/// The pointers of one block of a product, sent to a rayon thread.
#[derive(Clone, Copy)]
struct Block(Sgemm);
// SAFETY: each block writes its own rows (or columns) of `dst`; the inputs are
// only read.
unsafe impl Send for Block {}
unsafe impl Sync for Block {}

/// Rows (or columns) below which a product is not cut for the threads.
const MIN_CUT: usize = 64;

/// `(start, size)` of the blocks `len` rows (or columns) are cut into for
/// `threads` threads: equal blocks of at least `MIN_CUT`, the last one
/// shorter, together exactly `0..len`.
fn cuts(len: usize, threads: usize) -> Vec<(usize, usize)> {
    let wanted = if len >= 2 * MIN_CUT {
        threads.clamp(1, len / MIN_CUT)
    } else {
        1
    };
    let per = len.div_ceil(wanted).max(1);
    (0..len)
        .step_by(per)
        .map(|start| (start, per.min(len - start)))
        .collect()
}

/// The [`candle_core::cpu_backend::SgemmFn`] installed by [`install`].
///
/// # Safety
/// As for `SgemmFn`: the pointers are valid for the whole product.
unsafe fn run(p: &Sgemm) -> bool {
    let Some(Some(mkl)) = MKL.get() else {
        return false;
    };
    let too_big = [p.m, p.n, p.k].iter().any(|&d| d > c_int::MAX as usize);
    if p.dst_cs != 1 || p.k == 0 || too_big {
        return false;
    }
    // Cutting rows or columns keeps each operand's flag and leading dimension.
    let (Some((ta, lda)), Some((tb, ldb))) = (
        operand(p.m, p.k, p.lhs_rs, p.lhs_cs),
        operand(p.k, p.n, p.rhs_rs, p.rhs_cs),
    ) else {
        return false;
    };
    if p.dst_rs < p.n as isize {
        return false;
    }
    let threads = rayon::current_num_threads().max(1);
    // Cut the longer of m and n, in one block per thread.
    let (cut_rows, len) = if p.m >= p.n {
        (true, p.m)
    } else {
        (false, p.n)
    };
    let blocks: Vec<Block> = cuts(len, threads)
        .into_iter()
        .map(|(start, size)| {
            let mut b = *p;
            let start = start as isize;
            // SAFETY: the offsets stay inside the product's rows (columns).
            unsafe {
                if cut_rows {
                    b.m = size;
                    b.dst = b.dst.offset(start * p.dst_rs);
                    b.lhs = b.lhs.offset(start * p.lhs_rs);
                } else {
                    b.n = size;
                    b.dst = b.dst.offset(start * p.dst_cs);
                    b.rhs = b.rhs.offset(start * p.rhs_cs);
                }
            }
            Block(b)
        })
        .collect();
    let one = |Block(b): &Block| {
        // SAFETY: the block's operands lie inside the caller's, which are valid.
        unsafe {
            (mkl.sgemm)(
                ROW_MAJOR,
                ta,
                tb,
                b.m as c_int,
                b.n as c_int,
                b.k as c_int,
                1.0,
                b.lhs,
                lda,
                b.rhs,
                ldb,
                0.0,
                b.dst,
                b.dst_rs as c_int,
            )
        };
    };
    match blocks.len() {
        1 => one(&blocks[0]),
        _ => blocks.par_iter().for_each(one),
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_cover_the_product_exactly() {
        for threads in [1, 2, 3, 16, 67, 72, 96, 256] {
            for len in (1..5000).chain([4289, 4353, 65_536, 200_003]) {
                let cuts = cuts(len, threads);
                assert!(cuts.len() <= threads.max(1), "{len} on {threads}: {cuts:?}");
                let mut next = 0;
                for &(start, size) in &cuts {
                    assert!(start == next && size > 0, "{len} on {threads}: {cuts:?}");
                    next += size;
                }
                assert_eq!(next, len, "{len} on {threads}");
            }
        }
    }

    #[test]
    fn operands_map_to_blas_flags() {
        // (3 x 4) row-major: NoTrans, ld 4; its transposed view (4 x 3): Trans, ld 4.
        assert_eq!(operand(3, 4, 4, 1), Some((NO_TRANS, 4)));
        assert_eq!(operand(4, 3, 1, 4), Some((TRANS, 4)));
        // Padded rows are fine; a stride below the row length is not a matrix BLAS takes.
        assert_eq!(operand(3, 4, 8, 1), Some((NO_TRANS, 8)));
        assert_eq!(operand(3, 4, 2, 1), None);
        assert_eq!(operand(3, 4, 8, 2), None);
    }
}
