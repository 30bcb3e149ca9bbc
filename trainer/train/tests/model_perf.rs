//! Timing of one training forward + backward of the real SmolLM2-135M at batch 4 x 512
//! (random token ids, mean cross-entropy through the fused `token_logprobs`; set
//! `FUSECHAT_PERF_CANDLE_CE=1` for candle-nn's `cross_entropy` instead). Ignored by default (it takes tens of seconds on a
//! 2-core CPU); run with
//! `cargo test --release -p fusechat-train --test model_perf -- --ignored --nocapture`
//! (under `/usr/bin/time -v` for the peak RSS). `FUSECHAT_PERF_BATCH` / `FUSECHAT_PERF_SEQ`
//! / `FUSECHAT_PERF_STEPS` change the shape and the number of timed steps.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor, D};
use fusechat_train::model::{token_logprobs, CausalLm};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[ignore]
fn smollm2_forward_backward_time() {
    let base = std::env::var_os("FUSECHAT_IMPORTED_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into()))
                .join(".cache/fusechat/test-imported")
        });
    let dir = base.join("smollm2-135m-instruct");
    assert!(
        dir.is_dir(),
        "{} missing: run scripts/test.sh",
        dir.display()
    );
    let (b, s, steps) = (
        env("FUSECHAT_PERF_BATCH", 4),
        env("FUSECHAT_PERF_SEQ", 512),
        env("FUSECHAT_PERF_STEPS", 2),
    );
    let dev = Device::Cpu;
    let model = CausalLm::load(&dir, &dev).unwrap();
    let vocab = model.config().vocab_size as u32;
    let mut x = 12345u32;
    let mut next = || {
        x = x.wrapping_mul(1103515245).wrapping_add(12345);
        (x >> 8) % vocab
    };
    let ids: Vec<u32> = (0..b * s).map(|_| next()).collect();
    let targets: Vec<u32> = (0..b * s).map(|_| next()).collect();
    let ids = Tensor::from_vec(ids, (b, s), &dev).unwrap();
    let targets = Tensor::from_vec(targets, b * s, &dev).unwrap();
    for step in 0..steps {
        let t0 = Instant::now();
        let logits = model.forward(&ids).unwrap();
        let logits = logits
            .reshape(((), logits.dim(D::Minus1).unwrap()))
            .unwrap();
        let loss = if std::env::var_os("FUSECHAT_PERF_CANDLE_CE").is_some() {
            candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
        } else {
            token_logprobs(&logits, &targets)
                .unwrap()
                .mean_all()
                .unwrap()
                .neg()
                .unwrap()
        };
        let loss_value = loss.to_scalar::<f32>().unwrap();
        let t1 = Instant::now();
        let grads = loss.backward().unwrap();
        let t2 = Instant::now();
        let n = model
            .parameters()
            .iter()
            .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
            .count();
        assert_eq!(n, model.parameters().len());
        let total = (t2 - t0).as_secs_f64();
        println!(
            "step {step}: ({b}, {s}) loss {loss_value:.3}: forward {:.2} s, backward {:.2} s, total {total:.2} s \
             = {:.0} tokens/s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (b * s) as f64 / total
        );
    }
}
