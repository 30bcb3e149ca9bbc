//! `fusechat sft` / `fusechat dpo` killed with SIGKILL mid-run (twice between
//! steps, once inside a checkpoint save), then rerun:
//! the run continues from its last checkpoint and ends with exactly the loss
//! curve and the weights of a run that was never interrupted.
//!
//! The model is a tiny random llama with SmolLM2's real tokenizer (a fixture
//! for the checkpoint mechanics, not a model anyone would use).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use fusechat_train::model::{Architecture, CausalLm, ModelConfig};

fn imported_smollm2() -> PathBuf {
    let base = std::env::var_os("FUSECHAT_IMPORTED_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/fusechat/test-imported")
        });
    let dir = base.join("smollm2-135m-instruct");
    assert!(
        dir.join("tokenizer.json").is_file(),
        "{} is missing: run scripts/test.sh",
        dir.display()
    );
    dir
}

fn tiny_model(dir: &Path) {
    let mut config = ModelConfig::tiny(Architecture::Llama);
    config.vocab_size = 49152;
    config.hidden_size = 64;
    config.num_hidden_layers = 3;
    let model = CausalLm::random(config, &Device::Cpu, 7).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    model.save(dir, DType::F32).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(imported_smollm2().join(f), dir.join(f)).unwrap();
    }
}

fn write_data(dir: &Path) -> (PathBuf, PathBuf) {
    let sft = dir.join("sft.jsonl");
    let dpo = dir.join("dpo.jsonl");
    let mut sft_lines = Vec::new();
    let mut dpo_lines = Vec::new();
    for i in 0..48 {
        let q = format!("What is {i} plus {}?", i % 7);
        let good = format!(
            "{i} + {} = {}. The answer is {}.",
            i % 7,
            i + i % 7,
            i + i % 7
        );
        let bad = format!("The answer is {}.", i * 3);
        sft_lines.push(serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": good}]}).to_string());
        dpo_lines
            .push(serde_json::json!({"prompt": q, "chosen": good, "rejected": bad}).to_string());
    }
    std::fs::write(&sft, sft_lines.join("\n")).unwrap();
    std::fs::write(&dpo, dpo_lines.join("\n")).unwrap();
    (sft, dpo)
}

/// LoRA flags of a run (none: full fine-tuning).
const LORA: &[&str] = &[
    "--lora-rank",
    "4",
    "--lora-targets",
    "all-linear",
    "--merge",
];

fn command(stage: &str, model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fusechat"));
    cmd.args([stage, "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args([
            "--epochs",
            "3",
            "--batch",
            "2",
            "--grad-accum",
            "2",
            "--lr",
            "1e-3",
            "--max-len",
            "128",
        ])
        .args([
            "--checkpoint-every",
            "3",
            "--keep-checkpoints",
            "2",
            "--cpu",
        ])
        .args(extra)
        .env("RUST_LOG", "warn");
    if stage == "dpo" {
        cmd.args(["--beta", "0.5", "--loss", "sigmoid"]);
    }
    cmd
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Waits until the run has logged `steps` steps, then SIGKILLs it.
fn kill_after(mut child: Child, metrics: &Path, steps: usize) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while lines(metrics) < steps {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before step {steps}: nothing was interrupted");
        }
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// Waits until a checkpoint is being written (its temporary folder exists)
/// after at least `steps` steps, then SIGKILLs the run inside the save.
fn kill_inside_a_save(mut child: Child, out: &Path, steps: usize) {
    let deadline = Instant::now() + Duration::from_secs(300);
    let saving = || {
        std::fs::read_dir(out.join("checkpoints"))
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            })
            .unwrap_or(false)
    };
    while lines(&out.join("metrics.jsonl")) < steps || !saving() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before a save after step {steps} was caught");
        }
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_micros(200));
    }
    child.kill().unwrap(); // SIGKILL, in the middle of writing a checkpoint
    child.wait().unwrap();
}

fn losses(out: &Path) -> Vec<(u64, String)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].to_string())
        })
        .collect()
}

fn run_interrupted_and_compare(stage: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    tiny_model(&model);
    let (sft, dpo) = write_data(dir.path());
    let data = if stage == "sft" { sft } else { dpo };

    let straight = dir.path().join("straight");
    let status = command(stage, &model, &data, &straight, extra)
        .status()
        .unwrap();
    assert!(status.success());
    let expected = losses(&straight);
    assert_eq!(
        expected.len(),
        36,
        "48 examples / (2 x 2) per step x 3 epochs"
    );

    let resumed = dir.path().join("resumed");
    let metrics = resumed.join("metrics.jsonl");
    kill_after(
        command(stage, &model, &data, &resumed, extra)
            .spawn()
            .unwrap(),
        &metrics,
        5,
    );
    assert!(!resumed.join("final").exists());
    kill_after(
        command(stage, &model, &data, &resumed, extra)
            .spawn()
            .unwrap(),
        &metrics,
        20,
    );
    kill_inside_a_save(
        command(stage, &model, &data, &resumed, extra)
            .spawn()
            .unwrap(),
        &resumed,
        24,
    );
    let status = command(stage, &model, &data, &resumed, extra)
        .status()
        .unwrap();
    assert!(status.success());

    assert_eq!(losses(&resumed), expected, "the resumed loss curve differs");
    let mut results = vec!["final/model.safetensors"];
    if extra.contains(&"--lora-rank") {
        results.push("adapter/adapter_model.safetensors");
    }
    for file in results {
        let a = std::fs::read(straight.join(file)).unwrap();
        let b = std::fs::read(resumed.join(file)).unwrap();
        assert!(a == b, "the resumed run ends with another {file}");
    }
}

#[test]
fn sft_killed_three_times_resumes_to_the_same_run() {
    run_interrupted_and_compare("sft", &[]);
}

#[test]
fn lora_sft_killed_three_times_resumes_to_the_same_run() {
    run_interrupted_and_compare("sft", LORA);
}

/// bf16 weights with f32 master weights: the masters live in the optimizer
/// state, so a resumed run continues from them and not from their rounding.
#[test]
fn bf16_sft_with_master_weights_killed_three_times_resumes_to_the_same_run() {
    run_interrupted_and_compare("sft", &["--dtype", "bf16", "--master-weights"]);
}

#[test]
fn dpo_killed_three_times_resumes_to_the_same_run() {
    run_interrupted_and_compare("dpo", &[]);
}

#[test]
fn bad_model_folder_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, _) = write_data(dir.path());
    let output = command("sft", dir.path(), &sft, &dir.path().join("out"), &[])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("fusechat import"), "{stderr}");
}
