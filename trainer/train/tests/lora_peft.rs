//! LoRA adapters as peft reads them: tiny random models of each architecture get adapters on
//! every linear layer (with B set non-zero, so that the adapters change the logits), the base
//! folder and `save_adapter`'s folder are loaded by transformers + peft
//! (`PeftModel.from_pretrained`, float64, eager attention), and peft's logits must equal
//! fusechat's (f64) to 1e-6 (the adapters are saved in f32, as peft saves them; a wrong
//! scale, transposition or name gives > 1e-2). The merged folder (`save`) loaded by plain
//! transformers must give the same logits too.
//!
//! Needs `python3` with torch, transformers and peft (`pip install -r
//! tests/python/requirements.txt`, which `scripts/test.sh` runs); `PYTHON` overrides the
//! interpreter.

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use fusechat_train::model::{Architecture, CausalLm, LoraConfig, LoraTarget, ModelConfig};

const SCRIPT: &str = r#"
import json, sys, torch, transformers, peft
base, adapter, merged, ids = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
load = lambda folder: transformers.AutoModelForCausalLM.from_pretrained(
    folder, dtype=torch.float64, attn_implementation="eager").eval()
model = peft.PeftModel.from_pretrained(load(base), adapter).eval()
with torch.no_grad():
    adapted = model(torch.tensor(ids)).logits
    merged = load(merged)(torch.tensor(ids)).logits
print(json.dumps({"peft": adapted.tolist(), "merged": merged.tolist()}))
"#;

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

#[derive(serde::Deserialize)]
struct Logits {
    peft: Vec<Vec<Vec<f64>>>,
    merged: Vec<Vec<Vec<f64>>>,
}

fn peft_logits(base: &Path, adapter: &Path, merged: &Path, ids: &[Vec<u32>]) -> Logits {
    let out = Command::new(python())
        .arg("-c")
        .arg(SCRIPT)
        .args([base, adapter, merged])
        .arg(serde_json::to_string(ids).unwrap())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; install python3 with torch, transformers and peft",
                python()
            )
        });
    assert!(
        out.status.success(),
        "peft failed (install it with `pip install -r tests/python/requirements.txt`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn max_diff(ours: &[Vec<Vec<f64>>], theirs: &[Vec<Vec<f64>>]) -> f64 {
    ours.iter()
        .flatten()
        .flatten()
        .zip(theirs.iter().flatten().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

fn check(arch: Architecture) {
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let (base_dir, adapter_dir, merged_dir) = (
        tmp.path().join("base"),
        tmp.path().join("adapter"),
        tmp.path().join("merged"),
    );
    CausalLm::random(ModelConfig::tiny(arch), &dev, 21)
        .unwrap()
        .save(&base_dir, DType::F32)
        .unwrap();
    let lora = LoraConfig::new(2, 4.0, LoraTarget::ALL.to_vec()).unwrap();
    let model = CausalLm::load_with_dtype(&base_dir, &dev, DType::F64)
        .unwrap()
        .with_lora(lora, 3)
        .unwrap();
    for (name, var) in model.parameters() {
        // Values f32 holds exactly, so that the saved adapters are these.
        let values: Vec<f64> = (0..var.elem_count())
            .map(|i| (((i * 13 + name.len()) % 17) as f64 - 8.0) / 64.0)
            .collect();
        var.set(&Tensor::from_vec(values, var.dims(), &dev).unwrap())
            .unwrap();
    }
    model
        .save_adapter(&adapter_dir, Some(base_dir.display().to_string()))
        .unwrap();
    model.save(&merged_dir, DType::F32).unwrap();
    let ids: Vec<Vec<u32>> = (0..2u32)
        .map(|r| (0..9u32).map(|i| (i * 13 + r * 5 + 1) % 64).collect())
        .collect();
    let ours: Vec<Vec<Vec<f64>>> = model
        .forward(&Tensor::new(ids.clone(), &dev).unwrap())
        .unwrap()
        .to_vec3()
        .unwrap();
    let theirs = peft_logits(&base_dir, &adapter_dir, &merged_dir, &ids);
    let base = CausalLm::load_with_dtype(&base_dir, &dev, DType::F64).unwrap();
    let unadapted: Vec<Vec<Vec<f64>>> = base
        .forward(&Tensor::new(ids.clone(), &dev).unwrap())
        .unwrap()
        .to_vec3()
        .unwrap();
    let (peft, merged, moved) = (
        max_diff(&ours, &theirs.peft),
        max_diff(&ours, &theirs.merged),
        max_diff(&ours, &unadapted),
    );
    println!(
        "{arch:?}: peft {peft:.1e}, merged {merged:.1e}, adapters moved the logits by {moved:.2}"
    );
    assert!(
        moved > 1e-2,
        "{arch:?}: the adapters do not change the logits"
    );
    assert!(peft < 1e-6, "{arch:?}: peft's logits differ by {peft:e}");
    // The merged weights are rounded to f32.
    assert!(
        merged < 1e-5,
        "{arch:?}: the merged folder's logits differ by {merged:e}"
    );
}

#[test]
fn peft_loads_the_adapters_of_llama() {
    check(Architecture::Llama);
}

#[test]
fn peft_loads_the_adapters_of_qwen2() {
    check(Architecture::Qwen2);
}

#[test]
fn peft_loads_the_adapters_of_gemma3() {
    check(Architecture::Gemma3);
}
