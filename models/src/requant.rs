//! Requantising GGUF tensors into types candle multiplies fast on CPU.
//!
//! candle (under mistralrs) has SIMD dot products for Q4_0, Q8_0 and the
//! k-quants, but only a scalar loop for Q4_1, Q5_0 and Q5_1. Those tensors are
//! rewritten as Q8_0: every Q4_1 value `d*q + m` is re-expressed on a 255-level
//! grid, which adds an error of at most 1/255 of the block's range on top of
//! the original 1/15. Everything else (metadata, tokenizer, other tensors) is
//! copied unchanged.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

#[derive(Debug, thiserror::Error)]
pub enum RequantError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Gguf {
        path: String,
        source: candle_core::Error,
    },
}

/// The types candle has no SIMD dot product for.
pub fn is_slow_on_cpu(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

/// Whether `path` holds a tensor of a slow type (reads the header only).
pub fn needs_requant(path: &Path) -> Result<bool, RequantError> {
    let content = read_content(path)?;
    Ok(content.tensor_infos.values().any(|t| is_slow_on_cpu(t.ggml_dtype)))
}

fn read_content(path: &Path) -> Result<gguf_file::Content, RequantError> {
    let p = path.display().to_string();
    let mut file = File::open(path).map_err(|source| RequantError::Io { path: p.clone(), source })?;
    gguf_file::Content::read(&mut file).map_err(|source| RequantError::Gguf { path: p, source })
}

/// Writes `out`: `src` with every slow tensor turned into Q8_0. Returns how
/// many tensors were converted. The file appears only when complete.
pub fn requant_to_q8_0(src: &Path, out: &Path) -> Result<usize, RequantError> {
    let sp = src.display().to_string();
    let op = out.display().to_string();
    let gguf = |path: &str| {
        let path = path.to_string();
        move |source| RequantError::Gguf { path, source }
    };
    let io = |path: &str| {
        let path = path.to_string();
        move |source| RequantError::Io { path, source }
    };
    let mut reader = BufReader::new(File::open(src).map_err(io(&sp))?);
    let content = gguf_file::Content::read(&mut reader).map_err(gguf(&sp))?;

    // Keep the file's tensor order so the output reads like the input.
    let mut infos: Vec<_> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, info)| info.offset);
    let mut converted = 0;
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(infos.len());
    for (name, info) in infos {
        let tensor = content.tensor(&mut reader, name, &Device::Cpu).map_err(gguf(&sp))?;
        let tensor = if is_slow_on_cpu(info.ggml_dtype)
            && info.shape.dims().last().is_some_and(|d| d % GgmlDType::Q8_0.block_size() == 0)
        {
            converted += 1;
            let values = tensor.dequantize(&Device::Cpu).map_err(gguf(&sp))?;
            QTensor::quantize(&values, GgmlDType::Q8_0).map_err(gguf(&sp))?
        } else {
            tensor
        };
        tensors.push((name.clone(), tensor));
    }
    let mut metadata: Vec<(&str, &gguf_file::Value)> =
        content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    metadata.sort_by_key(|(k, _)| *k);
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();

    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(io(&op))?;
    }
    let partial = out.with_extension("partial");
    {
        let file = File::create(&partial).map_err(io(&op))?;
        let mut writer = BufWriter::new(file);
        gguf_file::write(&mut writer, &metadata, &tensor_refs).map_err(gguf(&op))?;
        writer.flush().map_err(io(&op))?;
        writer.get_ref().sync_all().map_err(io(&op))?;
    }
    std::fs::rename(&partial, out).map_err(io(&op))?;
    Ok(converted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn q4_1_tensors_become_q8_0_with_small_extra_error() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("in.gguf");
        let out = dir.path().join("out.gguf");
        let values: Vec<f32> = (0..64 * 32).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let t = Tensor::from_vec(values, (64, 32), &Device::Cpu).unwrap();
        let q41 = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
        let q80 = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let name = gguf_file::Value::String("test".into());
        {
            let mut f = File::create(&src).unwrap();
            gguf_file::write(&mut f, &[("general.name", &name)], &[("a", &q41), ("b", &q80)]).unwrap();
        }
        assert!(needs_requant(&src).unwrap());
        assert_eq!(requant_to_q8_0(&src, &out).unwrap(), 1);
        assert!(!needs_requant(&out).unwrap());

        let mut r = File::open(&out).unwrap();
        let content = gguf_file::Content::read(&mut r).unwrap();
        assert_eq!(content.metadata["general.name"].to_string().unwrap(), "test");
        let a = content.tensor(&mut r, "a", &Device::Cpu).unwrap();
        assert_eq!(a.dtype(), GgmlDType::Q8_0);
        let before: Vec<f32> = q41.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let after: Vec<f32> = a.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let range = 4.0f32; // values span [-2, 2]
        let worst = before.iter().zip(&after).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(worst <= range / 127.0, "requantisation error {worst}");
        let b = content.tensor(&mut r, "b", &Device::Cpu).unwrap();
        assert_eq!(b.dtype(), GgmlDType::Q8_0);
    }
}

#[cfg(test)]
mod kernel_tests {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// candle's quantized matmul (the CPU kernels the engine runs) against a dense matmul of
    /// the dequantized weights, at decode (1 row) and prefill (37 rows) shapes.
    #[test]
    fn quantized_matmul_matches_dense() {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q5_0] {
            let w = Tensor::randn(0f32, 1.0, (1536, 576), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let wd = q.dequantize(&dev).unwrap();
            let mm = QMatMul::from_qtensor(q).unwrap();
            for m in [1usize, 37] {
                let x = Tensor::randn(0f32, 1.0, (m, 576), &dev).unwrap();
                let got = mm.forward(&x).unwrap();
                let want = x.matmul(&wd.t().unwrap()).unwrap();
                let err: f32 = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                println!("{dtype:?} m={m}: max err {err} of {scale}");
                assert!(err < 0.05 * scale, "{dtype:?} m={m}: max err {err} of {scale}");
            }
        }
    }
}
