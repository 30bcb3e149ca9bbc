//! What the CPU's fused multiply-adds give at most: independent FMA chains
//! on registers only, on 1 thread and on every CPU, with 256-bit (AVX2) and,
//! where the CPU has it, 512-bit registers. The ceiling to hold the
//! products' GFLOP/s against (bench/results/qwen-decode-profile.md):
//! `cargo run --release -p fusechat-kernels --example fma_peak`.
use std::time::Instant;

/// Multiply-adds per chain.
const STEPS: usize = 100_000_000;
/// Multiply-adds per chain between two points where the compiler must
/// assume the registers were read.
const ROUND: usize = 1_000_000;
/// Independent chains: more than the FMA latency times the FMA ports.
const CHAINS: usize = 12;

#[cfg(target_arch = "x86_64")]
mod fma {
    use std::arch::x86_64::*;
    use std::hint::black_box;

    use super::{CHAINS, ROUND, STEPS};

    /// Floating-point operations done (2 per lane per multiply-add).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2() -> (f64, f32) {
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        let (a, b) = black_box((_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(-0.000_000_1)));
        for _ in 0..STEPS / ROUND {
            for _ in 0..ROUND {
                for v in acc.iter_mut() {
                    *v = _mm256_fmadd_ps(*v, a, b);
                }
            }
            // Opaque to the compiler, which would otherwise fold the loop.
            acc = black_box(acc);
        }
        let sum: f32 = acc.iter().map(|v| _mm256_cvtss_f32(*v)).sum();
        ((STEPS * CHAINS * 8 * 2) as f64, sum)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512() -> (f64, f32) {
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        let (a, b) = black_box((_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(-0.000_000_1)));
        for _ in 0..STEPS / ROUND {
            for _ in 0..ROUND {
                for v in acc.iter_mut() {
                    *v = _mm512_fmadd_ps(*v, a, b);
                }
            }
            // Opaque to the compiler, which would otherwise fold the loop.
            acc = black_box(acc);
        }
        let sum: f32 = acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum();
        ((STEPS * CHAINS * 16 * 2) as f64, sum)
    }
}

#[cfg(target_arch = "x86_64")]
fn main() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // (name, loop): each loop returns its FLOP count and the chains' sum.
    type Loop = unsafe fn() -> (f64, f32);
    let mut kinds: Vec<(&str, Loop)> = Vec::new();
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        kinds.push(("avx2", fma::avx2));
    }
    if is_x86_feature_detected!("avx512f") {
        kinds.push(("avx512", fma::avx512));
    }
    for (name, run) in kinds {
        for n in [1, threads] {
            let start = Instant::now();
            let flops: f64 = std::thread::scope(|s| {
                let handles: Vec<_> = (0..n)
                    .map(|_| {
                        s.spawn(move || {
                            // SAFETY: the features were detected above.
                            let (flops, sum) = unsafe { run() };
                            // The sums are used, so the chains are computed.
                            std::hint::black_box(sum);
                            flops
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("an FMA thread")).sum()
            });
            let secs = start.elapsed().as_secs_f64();
            println!("{name} on {n} thread(s): {:6.1} GFLOP/s", flops / secs / 1e9);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("fma_peak measures x86-64 only");
}
