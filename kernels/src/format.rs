//! The GGML block formats these kernels read, and their portable (scalar)
//! dequantization. Layouts follow GGML: every block holds 32 weights of one
//! row, its scale(s) first as f16.

use half::f16;

/// Weights per block, for every format here.
pub const BLOCK: usize = 32;

/// A weight format the kernels handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockFormat {
    /// `d: f16, qs: [i8; 32]`; weight = q * d.
    Q8_0,
    /// `d: f16, qs: [u8; 16]` (two 4-bit values per byte); weight = (q - 8) * d.
    Q4_0,
    /// `d: f16, m: f16, qs: [u8; 16]`; weight = q * d + m.
    Q4_1,
}

impl BlockFormat {
    /// Bytes of one block of 32 weights.
    pub const fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
        }
    }

    /// Bytes of one row of `k` weights (`k` a multiple of 32).
    pub const fn row_bytes(self, k: usize) -> usize {
        k / BLOCK * self.block_bytes()
    }

    /// The format of a candle quantized dtype, if these kernels handle it.
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        match dtype {
            GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
            GgmlDType::Q4_0 => Some(BlockFormat::Q4_0),
            GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
            _ => None,
        }
    }
}

pub(crate) fn read_f16(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantizes one row (`row.len()` = whole blocks) into `out` (32 values
/// per block), without SIMD.
pub fn dequantize_row_scalar(format: BlockFormat, row: &[u8], out: &mut [f32]) {
    let bb = format.block_bytes();
    assert_eq!(row.len() % bb, 0, "a row is whole blocks");
    assert_eq!(out.len(), row.len() / bb * BLOCK, "one output per weight");
    for (block, out) in row.chunks_exact(bb).zip(out.chunks_exact_mut(BLOCK)) {
        let d = read_f16(block, 0);
        match format {
            BlockFormat::Q8_0 => {
                for (o, &q) in out.iter_mut().zip(&block[2..]) {
                    *o = (q as i8) as f32 * d;
                }
            }
            BlockFormat::Q4_0 => {
                for (j, &q) in block[2..].iter().enumerate() {
                    out[j] = ((q & 0x0F) as f32 - 8.0) * d;
                    out[j + 16] = ((q >> 4) as f32 - 8.0) * d;
                }
            }
            BlockFormat::Q4_1 => {
                let m = read_f16(block, 2);
                for (j, &q) in block[4..].iter().enumerate() {
                    out[j] = (q & 0x0F) as f32 * d + m;
                    out[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// Our reading of each layout agrees with candle's own dequantization.
    #[test]
    fn scalar_dequantization_matches_candle() {
        let dev = Device::Cpu;
        let values: Vec<f32> = (0..4 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0).collect();
        let t = Tensor::from_vec(values, (4, 64), &dev).unwrap();
        for (dtype, format) in [
            (GgmlDType::Q8_0, BlockFormat::Q8_0),
            (GgmlDType::Q4_0, BlockFormat::Q4_0),
            (GgmlDType::Q4_1, BlockFormat::Q4_1),
        ] {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let want: Vec<f32> = q.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let data = q.data().unwrap();
            assert_eq!(data.len(), 4 * format.row_bytes(64));
            let mut got = vec![0f32; 4 * 64];
            dequantize_row_scalar(format, &data, &mut got);
            assert_eq!(got, want, "{format:?}");
        }
    }
}
