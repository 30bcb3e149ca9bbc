//! CUDA check of fusechat's trainer: the same SFT run (tiny random models of
//! the three architectures, SmolLM2's tokenizer and template) on the CPU and
//! on the GPU must give the same losses and weights; then the time of one
//! SFT step of a SmolLM2-135M-shaped model (random weights, timing only) on
//! the GPU. Then the same in bf16 (weights, activations, gradients; f32
//! master weights and moments): a LoRA SFT run and a DPO run, CPU against GPU
//! within bf16's rounding. Usage: fusechat-cuda-check WORKDIR TOKENIZER_DIR (a folder with SmolLM2's
//! tokenizer.json and tokenizer_config.json). Built and staged by
//! scripts/cuda_check.sh; run on the GPU machine by tests/cuda/run.sh.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use fusechat_train::data::OnBadInput;
use fusechat_train::dpo::{dpo, DpoOptions};
use fusechat_train::loss::{Preference, PreferenceLoss};
use fusechat_train::model::{Architecture, CausalLm, LoraConfig, ModelConfig};
use fusechat_train::precision::Precision;
use fusechat_train::sft::{sft, SftOptions};
use fusechat_train::trainer::{Resume, TrainOptions};

fn options(steps: usize, micro: usize) -> TrainOptions {
    TrainOptions {
        epochs: 100,
        max_steps: Some(steps),
        micro_batch: micro,
        grad_accum: 1,
        lr: 1e-3,
        warmup_ratio: 0.0,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        seed: 42,
        checkpoint_every: 0,
        keep_checkpoints: 1,
        save_dtype: Some(DType::F32),
        resume: Resume::default(),
        ..TrainOptions::default()
    }
}

fn folder(work: &Path, name: &str, cfg: ModelConfig, tok: &Path) -> Result<PathBuf> {
    let dir = work.join(name).join("model");
    std::fs::create_dir_all(&dir)?;
    let m = CausalLm::random(cfg, &Device::Cpu, 7)?;
    m.save(&dir, DType::F32)?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), dir.join(f)).with_context(|| format!("copy {f}"))?;
    }
    Ok(dir)
}

fn data(work: &Path, rows: usize, words: usize) -> Result<PathBuf> {
    let path = work.join(format!("sft-{rows}-{words}.jsonl"));
    let mut s = String::new();
    for a in 0..rows {
        let pad = "and then some more words ".repeat(words / 5);
        s.push_str(&serde_json::json!({"messages": [
            {"role": "user", "content": format!("What is {a} plus {}? {pad}", a + 30)},
            {"role": "assistant", "content": format!("{a} + {} = {}. The answer is {}. {pad}", a + 30, 2 * a + 30, 2 * a + 30)},
        ]}).to_string());
        s.push('\n');
    }
    std::fs::write(&path, s)?;
    Ok(path)
}

fn weights(dir: &Path) -> Result<Vec<(String, Vec<f32>)>> {
    let bytes = std::fs::read(dir.join("model.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut out = vec![];
    for (name, view) in st.tensors() {
        let v: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.push((name.to_string(), v));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// (loss, grad_norm) of every step, from the run's metrics.jsonl.
fn curve(out: &Path) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            let num = |k: &str| v[k].as_f64().with_context(|| format!("no {k} in {l}"));
            Ok((num("loss")?, num("grad_norm")?))
        })
        .collect()
}

type Run = (Vec<(f64, f64)>, Vec<(String, Vec<f32>)>);

/// How close the CPU and GPU runs must be, and how far training must have
/// moved the weights for that to mean something: f32 runs to 1e-4 (loss and
/// gradient norm, relative) and 1e-5 (weights), moved by 1e-4 or more; bf16
/// runs round every product, in another order on each device, so to 2e-2 and
/// 1e-2 (one bf16 step of a weight near 1 is 3.9e-3 to 7.8e-3), moved by
/// 2e-2 or more (their learning rate is ten times the f32 runs').
struct Tolerance {
    curve: f64,
    weights: f32,
    moved: f32,
}

const F32_TOLERANCE: Tolerance = Tolerance {
    curve: 1e-4,
    weights: 1e-5,
    moved: 1e-4,
};
const BF16_TOLERANCE: Tolerance = Tolerance {
    curve: 2e-2,
    weights: 1e-2,
    moved: 2e-2,
};

/// The CPU and GPU runs agree within `tol`, while training moved the weights
/// by more than that. NaN anywhere fails.
fn compare(
    initial: &[(String, Vec<f32>)],
    cpu: &Run,
    gpu: &Run,
    tol: &Tolerance,
) -> std::result::Result<String, String> {
    let close = |a: f64, b: f64| (a - b).abs() <= tol.curve * a.abs().max(1.0);
    if cpu.0.len() != gpu.0.len() || cpu.0.is_empty() {
        return Err(format!(
            "{} steps on the CPU, {} on the GPU",
            cpu.0.len(),
            gpu.0.len()
        ));
    }
    for (i, (c, g)) in cpu.0.iter().zip(&gpu.0).enumerate() {
        if !close(c.0, g.0) || !close(c.1, g.1) {
            return Err(format!(
                "step {}: loss {:.6} / {:.6}, grad_norm {:.6} / {:.6} (CPU / GPU)",
                i + 1,
                c.0,
                g.0,
                c.1,
                g.1
            ));
        }
    }
    if cpu.1.len() != gpu.1.len() || cpu.1.len() != initial.len() {
        return Err(format!(
            "{} tensors on the CPU, {} on the GPU, {} at the start",
            cpu.1.len(),
            gpu.1.len(),
            initial.len()
        ));
    }
    let (mut apart, mut moved) = (0f32, 0f32);
    for (((n0, a), (n1, b)), (n2, w)) in cpu.1.iter().zip(&gpu.1).zip(initial) {
        if n0 != n1 || n0 != n2 || a.len() != b.len() || a.len() != w.len() {
            return Err(format!("tensor {n0} / {n1} / {n2} differs in name or size"));
        }
        for ((x, y), z) in a.iter().zip(b).zip(w) {
            let d = (x - y).abs();
            if !(d <= apart) {
                apart = d; // NaN sticks
            }
            moved = moved.max((x - z).abs());
        }
    }
    let line = format!(
        "{} steps, losses {:.6} / {:.6} (CPU / GPU), weights moved up to {moved:.2e}, CPU and GPU weights apart by {apart:.2e}",
        cpu.0.len(), cpu.0.last().unwrap().0, gpu.0.last().unwrap().0
    );
    if apart <= tol.weights && moved >= tol.moved {
        Ok(line)
    } else {
        Err(line)
    }
}

fn dpo_data(work: &Path, rows: usize) -> Result<PathBuf> {
    let path = work.join(format!("dpo-{rows}.jsonl"));
    let mut s = String::new();
    for a in 0..rows {
        s.push_str(&serde_json::json!({
            "prompt": format!("What is {a} plus {}?", a + 30),
            "chosen": format!("{a} + {} = {}. The answer is {}.", a + 30, 2 * a + 30, 2 * a + 30),
            "rejected": format!("The answer is {}.", 3 * a),
        }).to_string());
        s.push('\n');
    }
    std::fs::write(&path, s)?;
    Ok(path)
}

/// bf16 with f32 master weights on both devices: a LoRA SFT run (adapters on
/// every linear layer, merged into OUT/final) and a DPO run of a tiny llama.
fn bf16_checks(work: &Path, tok: &Path, gpu: &Device, sft_data: &Path) -> Result<bool> {
    let mut cfg = ModelConfig::tiny(Architecture::Llama);
    cfg.vocab_size = 49152;
    cfg.max_position_embeddings = Some(512);
    let model = folder(work, "bf16", cfg, tok)?;
    let pairs = dpo_data(work, 8)?;
    let bf16 = |lora: bool| TrainOptions {
        precision: Precision::Bf16 {
            master_weights: true,
        },
        lora: lora.then(|| {
            LoraConfig::new(8, 16.0, LoraConfig::parse_targets("all-linear").unwrap()).unwrap()
        }),
        merge: lora,
        lr: 1e-2,
        ..options(3, 4)
    };
    let mut ok = true;
    for stage in ["lora-sft", "dpo"] {
        let mut finals = vec![];
        for (dev_name, dev) in [("cpu", Device::Cpu), ("cuda", gpu.clone())] {
            let out = work.join("bf16").join(format!("{stage}-{dev_name}"));
            let t = Instant::now();
            let s = if stage == "dpo" {
                dpo(
                    &DpoOptions {
                        model: model.clone(),
                        data: pairs.clone(),
                        out,
                        max_len: 128,
                        on_bad_input: OnBadInput::default(),
                        preference: Preference::new(PreferenceLoss::Sigmoid, 0.5, 0.0)?,
                        train: TrainOptions {
                            micro_batch: 2,
                            ..bf16(false)
                        },
                    },
                    &dev,
                )?
            } else {
                sft(
                    &SftOptions {
                        model: model.clone(),
                        data: sft_data.to_path_buf(),
                        out,
                        max_len: 128,
                        on_bad_input: OnBadInput::default(),
                        train: bf16(true),
                    },
                    &dev,
                )?
            };
            println!(
                "bf16 {stage} {dev_name}: {} steps, last loss {:?}, {:.2} s",
                s.steps,
                s.last_loss,
                t.elapsed().as_secs_f64()
            );
            finals.push((curve(&s.out)?, weights(&s.final_dir)?));
        }
        let verdict = compare(&weights(&model)?, &finals[0], &finals[1], &BF16_TOLERANCE);
        ok &= verdict.is_ok();
        match verdict {
            Ok(line) => println!("bf16 {stage}: {line}: SAME"),
            Err(line) => println!("bf16 {stage}: {line}: DIFFERENT"),
        }
    }
    Ok(ok)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let work = PathBuf::from(&args[1]);
    let tok = PathBuf::from(&args[2]);
    let gpu = Device::new_cuda(0).context("no CUDA device")?;
    println!("device: {}", fusechat_train::device::describe(&gpu));
    let mut ok = true;
    let small = data(&work, 8, 0)?;
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Gemma3,
    ] {
        let mut cfg = ModelConfig::tiny(arch);
        cfg.vocab_size = 49152;
        cfg.max_position_embeddings = Some(512);
        let name = format!("{arch:?}").to_lowercase();
        let model = folder(&work, &name, cfg, &tok)?;
        let mut finals = vec![];
        for (dev_name, dev) in [("cpu", Device::Cpu), ("cuda", gpu.clone())] {
            let t = Instant::now();
            let s = sft(
                &SftOptions {
                    model: model.clone(),
                    data: small.clone(),
                    out: work.join(&name).join(dev_name),
                    max_len: 128,
                    on_bad_input: OnBadInput::default(),
                    train: options(3, 4),
                },
                &dev,
            )?;
            println!(
                "{name} {dev_name}: {} steps, last loss {:?}, {:.2} s",
                s.steps,
                s.last_loss,
                t.elapsed().as_secs_f64()
            );
            finals.push((curve(&s.out)?, weights(&s.final_dir)?));
        }
        let initial = weights(&model)?;
        let verdict = compare(&initial, &finals[0], &finals[1], &F32_TOLERANCE);
        ok &= verdict.is_ok();
        match verdict {
            Ok(line) => println!("{name}: {line}: SAME"),
            Err(line) => println!("{name}: {line}: DIFFERENT"),
        }
    }
    ok &= bf16_checks(&work, &tok, &gpu, &small)?;
    // Speed: a SmolLM2-135M-shaped llama (random weights), batch 4 x ~512 tokens.
    let mut cfg = ModelConfig::tiny(Architecture::Llama);
    cfg.vocab_size = 49152;
    cfg.hidden_size = 576;
    cfg.intermediate_size = 1536;
    cfg.num_hidden_layers = 30;
    cfg.num_attention_heads = 9;
    cfg.num_key_value_heads = Some(3);
    cfg.head_dim = Some(64);
    cfg.max_position_embeddings = Some(2048);
    cfg.rope_theta = Some(1e5);
    let model = folder(&work, "smollm2-shape", cfg, &tok)?;
    let long = data(&work, 24, 200)?;
    for (steps, label) in [(1usize, "1 step"), (6, "6 steps")] {
        let t = Instant::now();
        let s = sft(
            &SftOptions {
                model: model.clone(),
                data: long.clone(),
                out: work.join(format!("speed-{steps}")),
                max_len: 512,
                on_bad_input: OnBadInput::default(),
                train: options(steps, 4),
            },
            &gpu,
        )?;
        println!(
            "smollm2-shape cuda {label}: {:.2} s, {:.0} tokens/s reported, last loss {:?}",
            t.elapsed().as_secs_f64(),
            s.tokens_per_s,
            s.last_loss
        );
    }
    println!(
        "{}",
        if ok {
            "CUDA CHECK: PASS"
        } else {
            "CUDA CHECK: FAIL"
        }
    );
    std::process::exit(if ok { 0 } else { 1 });
}
