//! SFT and DPO on the real SmolLM2-135M-Instruct (imported by `scripts/test.sh`):
//! a few steps on a small set must move the model the right way, the first DPO
//! loss is ln 2 (policy = reference), and the final folder loads back with the
//! same logits.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use fusechat_train::data::OnBadInput;
use fusechat_train::dpo::{dpo, DpoOptions};
use fusechat_train::loss::{Preference, PreferenceLoss};
use fusechat_train::metrics;
use fusechat_train::model::{CausalLm, LoraConfig, LoraTarget};
use fusechat_train::sft::{sft, SftOptions};
use fusechat_train::trainer::{Resume, TrainOptions};

fn smollm2() -> PathBuf {
    let base = std::env::var_os("FUSECHAT_IMPORTED_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/fusechat/test-imported")
        });
    let dir = base.join("smollm2-135m-instruct");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run scripts/test.sh (its import test writes it)",
        dir.display()
    );
    dir
}

/// Word problems with their worked answers, in the format the fusion data uses.
fn problems() -> Vec<(String, String, String)> {
    (0..16)
        .map(|i| {
            let (a, b) = (3 + i * 7 % 11, 2 + i * 5 % 9);
            (
                format!("Tom has {a} apples and buys {b} more. How many apples does he have now?"),
                format!("Tom starts with {a} apples and buys {b} more, so he has {a} + {b} = {}. The answer is {}.", a + b, a + b),
                format!("Tom has {a} apples. The answer is {}.", a * b + 1),
            )
        })
        .collect()
}

/// The problems as SFT conversations, one JSON line each.
fn sft_lines() -> Vec<String> {
    problems()
        .iter()
        .map(|(q, good, _)| {
            serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": good}]}).to_string()
        })
        .collect()
}

fn options(steps: usize, lr: f64) -> TrainOptions {
    TrainOptions {
        epochs: 1,
        max_steps: Some(steps),
        micro_batch: 4,
        grad_accum: 1,
        lr,
        warmup_ratio: 0.0,
        checkpoint_every: 0,
        keep_checkpoints: 1,
        ..TrainOptions::default()
    }
}

#[test]
fn sft_lowers_the_loss_and_the_final_folder_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sft.jsonl");
    let lines = sft_lines();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = dir.path().join("run");
    let opts = SftOptions {
        model: smollm2(),
        data: data.clone(),
        out: out.clone(),
        max_len: 256,
        on_bad_input: OnBadInput::Fail,
        train: TrainOptions {
            epochs: 2,
            max_steps: None,
            ..options(0, 1e-4)
        },
    };
    let summary = sft(&opts, &Device::Cpu).unwrap();
    assert_eq!(summary.steps, 8, "16 conversations, batch 4, 2 epochs");
    let records = metrics::read(&out.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = records
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    eprintln!("sft losses: {losses:?}");
    for r in &records {
        assert!(r["grad_norm"].as_f64().unwrap() > 0.0);
    }
    let first = (losses[0] + losses[1]) / 2.0;
    let last = (losses[6] + losses[7]) / 2.0;
    assert!(last < first * 0.8, "loss {first:.4} -> {last:.4}");
    assert!(out.join("curves.svg").is_file());

    // The final folder is a Hugging Face folder with the trained weights.
    let final_dir = out.join("final");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "fusechat_train.json",
    ] {
        assert!(final_dir.join(f).is_file(), "{f} missing");
    }
    let base = CausalLm::load(&smollm2(), &Device::Cpu).unwrap();
    let trained = CausalLm::load(&final_dir, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 504, 3458, 314, 2489]], &Device::Cpu).unwrap();
    let diff = (base.forward(&ids).unwrap() - trained.forward(&ids).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff > 1e-3, "training changed the logits by only {diff}");

    // Running again with the same settings finds the run finished and does nothing.
    let again = sft(&opts, &Device::Cpu).unwrap();
    assert_eq!(again.resumed_from, Some(8));
    assert_eq!(metrics::read(&out.join("metrics.jsonl")).unwrap().len(), 8);

    // Other data: refused by default, started over with SameRunOrStartOver (`fusechat fuse`).
    std::fs::write(&data, lines[..12].join("\n")).unwrap();
    let err = sft(&opts, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("another model, data or settings"), "{err}");
    let over = SftOptions {
        train: TrainOptions {
            resume: Resume::SameRunOrStartOver,
            ..opts.train.clone()
        },
        ..opts
    };
    let redone = sft(&over, &Device::Cpu).unwrap();
    assert_eq!(
        (redone.steps, redone.resumed_from),
        (6, None),
        "12 conversations, batch 4, 2 epochs"
    );
    assert_eq!(metrics::read(&out.join("metrics.jsonl")).unwrap().len(), 6);
}

#[test]
fn dpo_starts_at_ln2_and_raises_the_margin() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dpo.jsonl");
    let lines: Vec<String> = problems()
        .iter()
        .take(8)
        .map(|(q, good, bad)| {
            serde_json::json!({
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
                "metadata": {"source": "test"}
            })
            .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    for loss in [PreferenceLoss::Ln, PreferenceLoss::Sigmoid] {
        let out = dir.path().join(format!("run-{loss:?}"));
        let opts = DpoOptions {
            model: smollm2(),
            data: data.clone(),
            out: out.clone(),
            max_len: 256,
            on_bad_input: OnBadInput::Fail,
            preference: Preference::new(
                loss,
                if loss == PreferenceLoss::Ln {
                    10.0
                } else {
                    0.1
                },
                0.0,
            )
            .unwrap(),
            train: TrainOptions {
                epochs: 3,
                max_steps: None,
                micro_batch: 2,
                grad_accum: 2,
                ..options(0, 2e-5)
            },
        };
        let summary = dpo(&opts, &Device::Cpu).unwrap();
        assert_eq!(summary.steps, 6);
        let records = metrics::read(&out.join("metrics.jsonl")).unwrap();
        let margins: Vec<f64> = records
            .iter()
            .map(|r| r["rewards/margins"].as_f64().unwrap())
            .collect();
        eprintln!(
            "{loss:?} losses {:?}",
            records
                .iter()
                .map(|r| r["loss"].as_f64().unwrap())
                .collect::<Vec<_>>()
        );
        eprintln!("{loss:?} margins {margins:?}");
        let first_loss = records[0]["loss"].as_f64().unwrap();
        assert!(
            (first_loss - std::f64::consts::LN_2).abs() < 2e-3,
            "first loss {first_loss}"
        );
        assert!(margins[0].abs() < 0.05, "first margin {}", margins[0]);
        assert!(margins[5] > margins[0] + 0.05, "margins {margins:?}");
        for key in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
            "learning_rate",
            "grad_norm",
        ] {
            assert!(records[0].get(key).is_some(), "{key} not logged");
        }
        assert!(out.join("reference_logps.json").is_file());
    }
}

/// peft's logits of the base model with `adapter`, for `ids` (f32, eager attention).
fn peft_logits(base: &std::path::Path, adapter: &std::path::Path, ids: &[u32]) -> Vec<f32> {
    const SCRIPT: &str = r#"
import json, sys, torch, transformers, peft
base, adapter, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = transformers.AutoModelForCausalLM.from_pretrained(
    base, dtype=torch.float32, attn_implementation="eager")
model = peft.PeftModel.from_pretrained(model, adapter).eval()
with torch.no_grad():
    print(json.dumps(model(torch.tensor([ids])).logits.flatten().tolist()))
"#;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(SCRIPT)
        .args([base, adapter])
        .arg(serde_json::to_string(ids).unwrap())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        out.status.success(),
        "peft failed (install it with `pip install -r tests/python/requirements.txt`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// LoRA SFT of the real SmolLM2: the loss falls with only the adapters training, the
/// adapter folder is peft's (peft over the same base gives fusechat's logits), and the
/// merged folder is the adapted model.
#[test]
fn lora_sft_lowers_the_loss_and_peft_loads_its_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sft.jsonl");
    let lines = sft_lines();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = dir.path().join("run");
    let lora = LoraConfig::new(8, 16.0, LoraTarget::ALL.to_vec()).unwrap();
    let opts = SftOptions {
        model: smollm2(),
        data,
        out: out.clone(),
        max_len: 256,
        on_bad_input: OnBadInput::Fail,
        train: TrainOptions {
            epochs: 2,
            max_steps: None,
            lora: Some(lora),
            merge: true,
            ..options(0, 1e-3)
        },
    };
    let summary = sft(&opts, &Device::Cpu).unwrap();
    assert_eq!(summary.final_dir, out.join("final"));
    let losses: Vec<f64> = metrics::read(&out.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .map(|r| r["loss"].as_f64().unwrap())
        .collect();
    eprintln!("lora sft losses: {losses:?}");
    let first = (losses[0] + losses[1]) / 2.0;
    let last = (losses[6] + losses[7]) / 2.0;
    assert!(last < first * 0.8, "loss {first:.4} -> {last:.4}");

    let adapter = out.join("adapter");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
    ] {
        assert!(
            adapter.join(f).is_file(),
            "{f} missing from the adapter folder"
        );
    }
    let ids = [1u32, 504, 3458, 314, 2489, 28, 1116, 253];
    let merged = CausalLm::load(&out.join("final"), &Device::Cpu).unwrap();
    let ours: Vec<f32> = merged
        .forward(&Tensor::new(&[ids], &Device::Cpu).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f32> = CausalLm::load(&smollm2(), &Device::Cpu)
        .unwrap()
        .forward(&Tensor::new(&[ids], &Device::Cpu).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let theirs = peft_logits(&smollm2(), &adapter, &ids);
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let (peft, moved) = (max_diff(&ours, &theirs), max_diff(&ours, &base));
    eprintln!("peft vs fusechat: {peft:.2e}; the adapters moved the logits by {moved:.2}");
    assert!(
        moved > 0.1,
        "the adapters changed the logits by only {moved}"
    );
    // f32 through 30 layers, merged weights against base + low-rank update.
    assert!(
        peft < 2e-3,
        "peft's logits differ from fusechat's by {peft}"
    );
}
