//! CPU products of GGML-quantized weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
//! Q4_K, Q6_K) with f32 activations, for the serving engine (the vendored
//! `mistralrs-quant` calls [`qmatmul`] before candle's own quantized matmul).
//!
//! Why not candle's: its CPU quantized matmul first quantizes the activations
//! to 8 bits per block of 32 (256 for the k-quants). SmolLM2's `down_proj`
//! inputs reach about 3,000 where most values are below 1, and that rounding
//! alone turns its answers into nonsense. It also walks a batch row by row,
//! reading the weights once per sequence, and has no SIMD path for Q4_1 or
//! Q5_1. Here the activations stay f32, the weights are dequantized 32 at a
//! time in registers, a batch shares one pass over the weights, and each
//! output value is computed by the same instructions whatever the batch, so
//! a sequence's logits do not depend on what it is batched with.
//!
//! [`attention::prompt_attention`] is the attention of a prompt over its
//! keys, tiled, for the engine's CPU attention backend.

pub mod attention;
mod avx2;
mod avx512;
mod format;
mod matmul;

pub use format::{dequantize_row_scalar, BlockFormat, GROUP};
pub use matmul::{matmul, matmul_with, Isa};

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};

/// `x · wᵀ` for a quantized `w` of shape (n, k) and `x` of shape (…, k),
/// or `None` when these kernels do not apply (not on the CPU, `x` not f32,
/// or a weight format they do not handle) and the caller should fall back.
pub fn qmatmul(w: &QTensor, x: &Tensor) -> Result<Option<Tensor>> {
    let Some(format) = BlockFormat::from_ggml(w.dtype()) else {
        return Ok(None);
    };
    if !matches!(w.device(), Device::Cpu) || !matches!(x.device(), Device::Cpu) || x.dtype() != DType::F32 {
        return Ok(None);
    }
    // Stacked weights (experts of a mixture, 3-D) are not for this kernel.
    let Ok((n, k)) = w.shape().dims2() else {
        return Ok(None);
    };
    let dims = x.dims();
    match dims.last() {
        Some(&last) if last == k => {}
        _ => candle_core::bail!("qmatmul: x has shape {:?}, the weights take rows of {k}", x.shape()),
    }
    if k % format.block_values() != 0 {
        return Ok(None);
    }
    let m = x.elem_count() / k;
    let x = x.contiguous()?;
    let weights = w.data()?;
    let mut y = vec![0f32; m * n];
    {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(values)) = &*storage else {
            candle_core::bail!("qmatmul: x is not f32 CPU storage")
        };
        let start = layout.start_offset();
        matmul(format, &weights, n, k, &values[start..start + m * k], m, &mut y);
    }
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("x has a last dimension") = n;
    Tensor::from_vec(y, out_dims, &Device::Cpu).map(Some)
}

/// Rows `ids` of a quantized (n, k) table, dequantized to f32 as the
/// products see them: an embedding lookup that keeps the table quantized.
/// `None` when the table is not a 2-D CPU tensor in a format read here.
pub fn embedding(table: &QTensor, ids: &[u32]) -> Result<Option<Tensor>> {
    let Some(format) = BlockFormat::from_ggml(table.dtype()) else {
        return Ok(None);
    };
    let Ok((n, k)) = table.shape().dims2() else {
        return Ok(None);
    };
    if !matches!(table.device(), Device::Cpu) || k % format.block_values() != 0 {
        return Ok(None);
    }
    let data = table.data()?;
    let rb = format.row_bytes(k);
    let mut out = vec![0f32; ids.len() * k];
    for (&id, row) in ids.iter().zip(out.chunks_exact_mut(k)) {
        let id = id as usize;
        if id >= n {
            candle_core::bail!("embedding: token id {id} is outside the table's {n} rows");
        }
        let bytes = &data[id * rb..(id + 1) * rb];
        match Isa::best() {
            Isa::Avx2 | Isa::Avx512 => avx2::dequantize_row(format, bytes, row),
            Isa::Scalar => dequantize_row_scalar(format, bytes, row),
        }
    }
    Tensor::from_vec(out, (ids.len(), k), &Device::Cpu).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use rand::{Rng, SeedableRng};

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    const FORMATS: [GgmlDType; 7] = [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ];

    /// Equal (to f32 rounding) to dequantizing with candle and multiplying in f32.
    #[test]
    fn matches_dequantized_f32_matmul() {
        for dtype in FORMATS {
            for (m, n, k) in [(1, 40, 256), (3, 300, 768), (17, 129, 1536), (70, 64, 2048)] {
                let w = QTensor::quantize(&random((n, k), 1), dtype).unwrap();
                let x = random((m, k), 2);
                let want = x.matmul(&w.dequantize(&Device::Cpu).unwrap().t().unwrap()).unwrap();
                let got = qmatmul(&w, &x).unwrap().expect("format handled");
                let err: f32 = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(err <= 1e-5 * scale.max(1.0), "{dtype:?} m={m} n={n} k={k}: max error {err} (scale {scale})");
            }
        }
    }

    /// Activations keep their outliers: one value of 3000 in a block does not
    /// wipe out its small neighbours (candle's 8-bit activations would).
    #[test]
    fn outliers_in_activations_are_kept() {
        let k = 64;
        let w = QTensor::quantize(&Tensor::ones((1, k), DType::F32, &Device::Cpu).unwrap(), GgmlDType::Q8_0).unwrap();
        let mut xv = vec![0.01f32; k];
        xv[0] = 3000.0;
        let x = Tensor::from_vec(xv, (1, k), &Device::Cpu).unwrap();
        let y: Vec<f32> = qmatmul(&w, &x).unwrap().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // The one weight value (1 in Q8_0: 127 × an f16 scale).
        let wq: Vec<f32> = w.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want = wq[0] as f64 * (3000.0 + 0.01 * 63.0);
        assert!((y[0] as f64 - want).abs() < 1e-3, "got {}, want {want}", y[0]);
    }

    /// A row's result is bit for bit the same alone or in a batch of any size.
    #[test]
    fn rows_do_not_depend_on_the_batch() {
        if !avx2::available() {
            return;
        }
        for dtype in FORMATS {
            let (n, k) = (257, 768);
            let w = QTensor::quantize(&random((n, k), 3), dtype).unwrap();
            let x = random((9, k), 4);
            let alone: Vec<Vec<f32>> = (0..9)
                .map(|i| qmatmul(&w, &x.narrow(0, i, 1).unwrap()).unwrap().unwrap().flatten_all().unwrap().to_vec1().unwrap())
                .collect();
            // Batches that leave one, two and no rows over a group of three.
            for m in [2, 4, 9] {
                let batched: Vec<Vec<f32>> = qmatmul(&w, &x.narrow(0, 0, m).unwrap()).unwrap().unwrap().to_vec2().unwrap();
                for (i, row) in batched.iter().enumerate() {
                    assert_eq!(&alone[i], row, "{dtype:?} row {i} of {m}");
                }
            }
        }
    }

    /// The SIMD and portable loops agree.
    #[test]
    fn avx2_matches_scalar() {
        if !avx2::available() {
            return;
        }
        for dtype in FORMATS {
            let format = BlockFormat::from_ggml(dtype).unwrap();
            let (m, n, k) = (5, 100, 512);
            let w = QTensor::quantize(&random((n, k), 5), dtype).unwrap();
            let data = w.data().unwrap();
            let x: Vec<f32> = random((m, k), 6).flatten_all().unwrap().to_vec1().unwrap();
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul_with(Isa::Avx2, format, &data, n, k, &x, m, &mut a);
            matmul_with(Isa::Scalar, format, &data, n, k, &x, m, &mut b);
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-4, "{dtype:?}: {p} vs {q}");
            }
        }
    }

    #[test]
    fn leading_dimensions_are_kept_and_other_formats_fall_back() {
        let w = QTensor::quantize(&random((32, 64), 7), GgmlDType::Q8_0).unwrap();
        let x = random((6, 64), 8).reshape((2, 3, 64)).unwrap();
        assert_eq!(qmatmul(&w, &x).unwrap().unwrap().dims(), &[2, 3, 32]);
        let k = QTensor::quantize(&random((32, 256), 7), GgmlDType::Q5K).unwrap();
        assert!(qmatmul(&k, &random((1, 256), 9)).unwrap().is_none());
        let bad = random((1, 63), 9);
        assert!(qmatmul(&w, &bad).is_err());
        let experts = QTensor::quantize(&random((64, 64), 10).reshape((2, 32, 64)).unwrap(), GgmlDType::Q8_0).unwrap();
        assert!(qmatmul(&experts, &random((1, 64), 11)).unwrap().is_none());
    }

    #[test]
    fn embedding_rows_are_the_dequantized_rows() {
        for dtype in FORMATS {
            let table = QTensor::quantize(&random((50, 512), 12), dtype).unwrap();
            let dense: Vec<Vec<f32>> = table.dequantize(&Device::Cpu).unwrap().to_vec2().unwrap();
            let rows: Vec<Vec<f32>> = embedding(&table, &[7, 0, 49, 7]).unwrap().unwrap().to_vec2().unwrap();
            for (row, id) in rows.iter().zip([7, 0, 49, 7]) {
                for (a, b) in row.iter().zip(&dense[id]) {
                    assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{dtype:?} row {id}: {a} vs {b}");
                }
            }
            assert!(embedding(&table, &[50]).is_err());
        }
    }

    /// The AVX-512 batched loops give the AVX2 loops' results bit for bit
    /// (so a batch answers as its rows alone on either kind of CPU).
    #[test]
    fn avx512_matches_avx2_exactly() {
        if !avx512::available() {
            return;
        }
        for dtype in FORMATS {
            let format = BlockFormat::from_ggml(dtype).unwrap();
            let (n, k) = (37, 768);
            let w = QTensor::quantize(&random((n, k), 13), dtype).unwrap();
            let data = w.data().unwrap();
            for m in [2, 5, 6, 7, 13] {
                let x: Vec<f32> = random((m, k), 14).flatten_all().unwrap().to_vec1().unwrap();
                let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
                matmul_with(Isa::Avx512, format, &data, n, k, &x, m, &mut a);
                matmul_with(Isa::Avx2, format, &data, n, k, &x, m, &mut b);
                assert_eq!(a, b, "{dtype:?} m={m}");
            }
        }
    }
}
