//! The GGML block formats these kernels read, and their portable (scalar)
//! dequantization. Layouts follow GGML: a block holds 32 weights of one row
//! (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) or 256 (the k-quants Q4_K and Q6_K), with
//! its scales in f16 (and, for the k-quants, 6- or 8-bit sub-block scales).
//!
//! Every format is read 32 weights at a time (a "group"): the SIMD loops
//! keep one set of accumulators per group position, so a row of any format
//! is summed in the same order.

use half::f16;

/// Weights per group: the unit the dot products are summed in.
pub const GROUP: usize = 32;

/// A weight format the kernels handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockFormat {
    /// `d: f16, qs: [i8; 32]`; weight = q * d.
    Q8_0,
    /// `d: f16, qs: [u8; 16]` (two 4-bit values per byte); weight = (q - 8) * d.
    Q4_0,
    /// `d: f16, m: f16, qs: [u8; 16]`; weight = q * d + m.
    Q4_1,
    /// `d: f16, qh: u32, qs: [u8; 16]`: 4 low bits in `qs`, the fifth in `qh`;
    /// weight = (q - 16) * d.
    Q5_0,
    /// `d: f16, m: f16, qh: u32, qs: [u8; 16]`; weight = q * d + m.
    Q5_1,
    /// 256 weights in 8 sub-blocks of 32: `d: f16, dmin: f16, scales: [u8; 12]`
    /// (a 6-bit scale and a 6-bit min per sub-block), `qs: [u8; 128]`;
    /// weight = d * scale * q - dmin * min.
    Q4K,
    /// 256 weights in 16 sub-blocks of 16: `ql: [u8; 128]` (4 low bits),
    /// `qh: [u8; 64]` (2 high bits), `scales: [i8; 16]`, `d: f16`;
    /// weight = d * scale * (q - 32).
    Q6K,
}

impl BlockFormat {
    /// Every format, for tests and benchmarks.
    pub const ALL: [BlockFormat; 7] = [
        BlockFormat::Q8_0,
        BlockFormat::Q4_0,
        BlockFormat::Q4_1,
        BlockFormat::Q5_0,
        BlockFormat::Q5_1,
        BlockFormat::Q4K,
        BlockFormat::Q6K,
    ];

    /// Weights per block.
    pub const fn block_values(self) -> usize {
        match self {
            BlockFormat::Q4K | BlockFormat::Q6K => 256,
            _ => GROUP,
        }
    }

    /// Bytes of one block.
    pub const fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q5_0 => 22,
            BlockFormat::Q5_1 => 24,
            BlockFormat::Q4K => 144,
            BlockFormat::Q6K => 210,
        }
    }

    /// Bytes of one row of `k` weights (`k` a multiple of the block).
    pub const fn row_bytes(self, k: usize) -> usize {
        k / self.block_values() * self.block_bytes()
    }

    /// The format of a candle quantized dtype, if these kernels handle it.
    pub fn from_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType;
        match dtype {
            GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
            GgmlDType::Q4_0 => Some(BlockFormat::Q4_0),
            GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
            GgmlDType::Q5_0 => Some(BlockFormat::Q5_0),
            GgmlDType::Q5_1 => Some(BlockFormat::Q5_1),
            GgmlDType::Q4K => Some(BlockFormat::Q4K),
            GgmlDType::Q6K => Some(BlockFormat::Q6K),
            _ => None,
        }
    }
}

pub(crate) fn read_f16(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

pub(crate) fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K block, from its 12 packed
/// bytes: the first four sub-blocks keep 6 bits in bytes 0..8, the last four
/// 4 bits in bytes 8..12 and their top 2 bits in the spare bits of 0..8.
pub(crate) fn q4k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// Dequantizes one row (`row.len()` = whole blocks) into `out`, without SIMD.
pub fn dequantize_row_scalar(format: BlockFormat, row: &[u8], out: &mut [f32]) {
    let bb = format.block_bytes();
    let bv = format.block_values();
    assert_eq!(row.len() % bb, 0, "a row is whole blocks");
    assert_eq!(out.len(), row.len() / bb * bv, "one output per weight");
    for (block, out) in row.chunks_exact(bb).zip(out.chunks_exact_mut(bv)) {
        match format {
            BlockFormat::Q8_0 => {
                let d = read_f16(block, 0);
                for (o, &q) in out.iter_mut().zip(&block[2..]) {
                    *o = (q as i8) as f32 * d;
                }
            }
            BlockFormat::Q4_0 => {
                let d = read_f16(block, 0);
                for (j, &q) in block[2..].iter().enumerate() {
                    out[j] = ((q & 0x0F) as f32 - 8.0) * d;
                    out[j + 16] = ((q >> 4) as f32 - 8.0) * d;
                }
            }
            BlockFormat::Q4_1 => {
                let (d, m) = (read_f16(block, 0), read_f16(block, 2));
                for (j, &q) in block[4..].iter().enumerate() {
                    out[j] = (q & 0x0F) as f32 * d + m;
                    out[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
            BlockFormat::Q5_0 | BlockFormat::Q5_1 => {
                let d = read_f16(block, 0);
                let (m, qh_at) = match format {
                    BlockFormat::Q5_1 => (read_f16(block, 2), 4),
                    _ => (-16.0 * d, 2),
                };
                let qh = read_u32(block, qh_at);
                for (j, &q) in block[qh_at + 4..].iter().enumerate() {
                    let lo = (q & 0x0F) as u32 | ((qh >> j) & 1) << 4;
                    let hi = (q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
                    if format == BlockFormat::Q5_0 {
                        out[j] = (lo as f32 - 16.0) * d;
                        out[j + 16] = (hi as f32 - 16.0) * d;
                    } else {
                        out[j] = lo as f32 * d + m;
                        out[j + 16] = hi as f32 * d + m;
                    }
                }
            }
            BlockFormat::Q4K => {
                let (d, dmin) = (read_f16(block, 0), read_f16(block, 2));
                let scales = &block[4..16];
                let qs = &block[16..144];
                for g in 0..8 {
                    let (sc, mn) = q4k_scale_min(scales, g);
                    let (scale, min) = (d * sc as f32, dmin * mn as f32);
                    let bytes = &qs[32 * (g / 2)..32 * (g / 2) + 32];
                    for (l, &q) in bytes.iter().enumerate() {
                        let q = if g % 2 == 0 { q & 0x0F } else { q >> 4 };
                        out[32 * g + l] = q as f32 * scale - min;
                    }
                }
            }
            BlockFormat::Q6K => {
                let (ql, qh) = (&block[0..128], &block[128..192]);
                let scales = &block[192..208];
                let d = read_f16(block, 208);
                for g in 0..8 {
                    let (half, r) = (g / 4, g % 4);
                    for l in 0..32 {
                        let low = ql[64 * half + l + 32 * (r % 2)];
                        let low = if r < 2 { low & 0x0F } else { low >> 4 };
                        let high = (qh[32 * half + l] >> (2 * r)) & 3;
                        let q = (low | (high << 4)) as i32 - 32;
                        let sc = scales[8 * half + 2 * r + l / 16] as i8;
                        out[32 * g + l] = d * sc as f32 * q as f32;
                    }
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

    pub(crate) fn ggml(format: BlockFormat) -> GgmlDType {
        match format {
            BlockFormat::Q8_0 => GgmlDType::Q8_0,
            BlockFormat::Q4_0 => GgmlDType::Q4_0,
            BlockFormat::Q4_1 => GgmlDType::Q4_1,
            BlockFormat::Q5_0 => GgmlDType::Q5_0,
            BlockFormat::Q5_1 => GgmlDType::Q5_1,
            BlockFormat::Q4K => GgmlDType::Q4K,
            BlockFormat::Q6K => GgmlDType::Q6K,
        }
    }

    /// Our reading of each layout agrees with candle's own dequantization.
    #[test]
    fn scalar_dequantization_matches_candle() {
        let dev = Device::Cpu;
        let values: Vec<f32> = (0..4 * 512).map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0).collect();
        let t = Tensor::from_vec(values, (4, 512), &dev).unwrap();
        for format in BlockFormat::ALL {
            let q = QTensor::quantize(&t, ggml(format)).unwrap();
            assert_eq!(BlockFormat::from_ggml(q.dtype()), Some(format));
            let want: Vec<f32> = q.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let data = q.data().unwrap();
            assert_eq!(data.len(), 4 * format.row_bytes(512), "{format:?}");
            let mut got = vec![0f32; 4 * 512];
            dequantize_row_scalar(format, &data, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // candle rounds `d * sc * q - m` in two steps as we do; allow
                // for a fused multiply-add on either side.
                assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{format:?} weight {i}: {g} vs {w}");
            }
        }
    }
}
