//! Speed of the kernels on SmolLM2-135M's linear layers (30 layers of q, k,
//! v, o, gate, up, down plus the tied lm_head), one thread or rayon's pool:
//! `cargo run --release -p fusechat-kernels --example qmatmul_speed`.
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)];
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
        let layers: Vec<QTensor> = shapes
            .iter()
            .map(|&(n, k)| QTensor::quantize(&Tensor::randn(0f32, 1.0, (n, k), &dev)?, dtype))
            .collect::<candle_core::Result<_>>()?;
        let lm_head = QTensor::quantize(&Tensor::randn(0f32, 1.0, (49152, 576), &dev)?, dtype)?;
        let bytes: usize = layers.iter().map(|l| l.storage_size_in_bytes()).sum::<usize>() * 30 + lm_head.storage_size_in_bytes();
        for m in [1usize, 4, 16] {
            let x576 = Tensor::randn(0f32, 1.0, (m, 576), &dev)?;
            let x1536 = Tensor::randn(0f32, 1.0, (m, 1536), &dev)?;
            // `hot`: one layer's weights over and over (they stay in cache).
            let forward = |hot: bool| -> candle_core::Result<()> {
                for _ in 0..30 {
                    for (i, &(_, k)) in shapes.iter().enumerate() {
                        let l = if hot { &layers[0] } else { &layers[i] };
                        let x = if hot || k == 576 { &x576 } else { &x1536 };
                        fusechat_kernels::qmatmul(l, x)?.unwrap();
                    }
                }
                if !hot {
                    fusechat_kernels::qmatmul(&lm_head, &x576)?.unwrap();
                }
                Ok(())
            };
            for hot in [false, true] {
                let run = || -> candle_core::Result<f64> {
                    forward(hot)?;
                    let reps = 10;
                    let t = Instant::now();
                    for _ in 0..reps {
                        forward(hot)?;
                    }
                    Ok(t.elapsed().as_secs_f64() / reps as f64)
                };
                // Inside the pool, as the server calls it.
                let s = rayon::scope(|_| run())?;
                let macs = if hot { 30.0 * 7.0 * 576.0 * 576.0 } else { bytes as f64 / dtype.type_size() as f64 * dtype.block_size() as f64 };
                println!(
                    "{dtype:?} m={m:2} {}: {:6.2} ms per forward, {:5.1} GB/s of weights, {:5.1} G multiply-adds/s",
                    if hot { "cached" } else { "all   " },
                    s * 1e3,
                    if hot { 30.0 * 7.0 * layers[0].storage_size_in_bytes() as f64 } else { bytes as f64 } / s / 1e9,
                    macs * m as f64 / s / 1e9,
                );
            }
        }
    }
    Ok(())
}
