//! The kernels on the linear layers of one decode step of the served models,
//! in their GGUF formats (the Q4_K_M files: Q5_0 where rows are not a
//! multiple of 256, Q4_K / Q6_K for `ffn_down`, Q8_0 output), for batches of
//! 1, 4 and 16 sequences and a 512-token prompt (whose output layer runs on
//! its last row only), in rayon's pool as the server calls them:
//! `cargo run --release -p fusechat-kernels --example format_speed`.
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

struct Model {
    name: &'static str,
    layers: usize,
    /// (rows, columns, format) of each linear layer of one block.
    block: Vec<(usize, usize, GgmlDType)>,
    output: (usize, usize, GgmlDType),
}

fn main() -> candle_core::Result<()> {
    use GgmlDType::*;
    let models = [
        Model {
            name: "qwen2.5-0.5b",
            layers: 24,
            block: vec![(896, 896, Q5_0), (128, 896, Q5_0), (128, 896, Q8_0), (896, 896, Q5_0), (4864, 896, Q5_0), (4864, 896, Q5_0), (896, 4864, Q6K)],
            output: (151936, 896, Q8_0),
        },
        Model {
            name: "gemma-3-270m",
            layers: 18,
            block: vec![(1024, 640, Q5_0), (256, 640, Q5_0), (256, 640, Q8_0), (640, 1024, Q4K), (2048, 640, Q5_0), (2048, 640, Q5_0), (640, 2048, Q6K)],
            output: (262144, 640, Q8_0),
        },
    ];
    let dev = Device::Cpu;
    // Optional: a model name, then a batch size and a repetition count (for
    // a profiler).
    let only: Option<String> = std::env::args().nth(1);
    let only_m: Option<usize> = std::env::args().nth(2).and_then(|m| m.parse().ok());
    let reps: usize = std::env::args().nth(3).and_then(|r| r.parse().ok()).unwrap_or(5);
    for model in &models {
        if only.as_deref().is_some_and(|o| o != model.name) {
            continue;
        }
        let quantize = |&(n, k, dtype): &(usize, usize, GgmlDType)| QTensor::quantize(&Tensor::randn(0f32, 1.0, (n, k), &dev)?, dtype);
        let layers: Vec<Vec<QTensor>> = (0..model.layers)
            .map(|_| model.block.iter().map(quantize).collect::<candle_core::Result<_>>())
            .collect::<candle_core::Result<_>>()?;
        let output = quantize(&model.output)?;
        let bytes: usize = layers.iter().flatten().map(|q| q.storage_size_in_bytes()).sum::<usize>() + output.storage_size_in_bytes();
        for m in [1usize, 4, 16, 512] {
            if only_m.is_some_and(|o| o != m) {
                continue;
            }
            let xs: Vec<Tensor> = [896usize, 640, 1024, 2048, 4864]
                .iter()
                .map(|&k| Tensor::randn(0f32, 1.0, (m, k), &dev))
                .collect::<candle_core::Result<_>>()?;
            let x = |k: usize| xs.iter().find(|x| x.dims()[1] == k).unwrap();
            let step = || -> candle_core::Result<()> {
                for layer in &layers {
                    for w in layer {
                        fusechat_kernels::qmatmul(w, x(w.shape().dims2()?.1))?.unwrap();
                    }
                }
                let last = x(model.output.1);
                let last = if m > 16 { last.narrow(0, m - 1, 1)? } else { last.clone() };
                fusechat_kernels::qmatmul(&output, &last)?.unwrap();
                Ok(())
            };
            let s = rayon::scope(|_| -> candle_core::Result<f64> {
                step()?;
                let t = Instant::now();
                for _ in 0..reps {
                    step()?;
                }
                Ok(t.elapsed().as_secs_f64() / reps as f64)
            })?;
            println!(
                "{} m={m:3}: {:6.1} ms per step ({:.0} MB of weights, {:4.1} GB/s), {:6.1} tokens/s",
                model.name,
                s * 1e3,
                bytes as f64 / 1e6,
                bytes as f64 / s / 1e9,
                m as f64 / s
            );
        }
    }
    Ok(())
}
