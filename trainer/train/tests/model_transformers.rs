//! The trainer's models against the reference implementation: tiny random models of each
//! architecture are saved, loaded by Hugging Face transformers (`AutoModelForCausalLM`,
//! eager attention, float64) and both sides' logits on the same ids must agree to 1e-6
//! (measured: 3e-8 to 1.1e-7 on logits up to 0.7: transformers computes RMSNorm, softmax and
//! RoPE tables in float32 even in a float64 model; any semantic slip gives > 1e-2).
//! This checks the semantics (RoPE convention, norms, GQA, biases, Gemma 3's scaled
//! embeddings / (1 + w) norms / q-k norms / sliding window / final soft-cap) on shapes the
//! real checkpoints do not cover.
//!
//! Needs `python3` with torch and transformers (`pip install -r tests/python/requirements.txt`,
//! which `scripts/test.sh` runs); `PYTHON` overrides the interpreter.

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use fusechat_train::model::{Architecture, CausalLm, ModelConfig};

const SCRIPT: &str = r#"
import json, sys, torch, transformers
folder, ids = sys.argv[1], json.loads(sys.argv[2])
model = transformers.AutoModelForCausalLM.from_pretrained(
    folder, dtype=torch.float64, attn_implementation="eager")
model.eval()
with torch.no_grad():
    logits = model(torch.tensor(ids)).logits
print(json.dumps(logits.tolist()))
"#;

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn transformers_logits(dir: &std::path::Path, ids: &[Vec<u32>]) -> Vec<Vec<Vec<f64>>> {
    let out = Command::new(python())
        .arg("-c")
        .arg(SCRIPT)
        .arg(dir)
        .arg(serde_json::to_string(ids).unwrap())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; install python3 with torch and transformers",
                python()
            )
        });
    assert!(
        out.status.success(),
        "transformers failed (install it with `pip install -r tests/python/requirements.txt`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check(arch: Architecture, edit: impl Fn(&mut ModelConfig), label: &str) {
    let dev = Device::Cpu;
    let mut config = ModelConfig::tiny(arch);
    edit(&mut config);
    let model = CausalLm::random(config, &dev, 21).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    model.save(tmp.path(), DType::F32).unwrap();
    // Both sides compute in f64 from the same (f32) weights.
    let model = CausalLm::load_with_dtype(tmp.path(), &dev, DType::F64).unwrap();
    let ids: Vec<Vec<u32>> = (0..2u32)
        .map(|r| (0..9u32).map(|i| (i * 13 + r * 5 + 1) % 64).collect())
        .collect();
    let x = Tensor::new(ids.clone(), &dev).unwrap();
    let ours: Vec<Vec<Vec<f64>>> = model.forward(&x).unwrap().to_vec3().unwrap();
    let theirs = transformers_logits(tmp.path(), &ids);
    let mut max = 0f64;
    let mut scale = 0f64;
    for (a, b) in ours
        .iter()
        .flatten()
        .flatten()
        .zip(theirs.iter().flatten().flatten())
    {
        max = max.max((a - b).abs());
        scale = scale.max(b.abs());
    }
    assert_eq!(
        ours.iter().flatten().flatten().count(),
        theirs.iter().flatten().flatten().count()
    );
    println!("{label}: max |logit diff| vs transformers (f64) {max:.2e} (logits up to {scale:.6})");
    assert!(scale > 0.01, "{label}: degenerate logits");
    assert!(
        max < 1e-6,
        "{label}: logits differ from transformers by {max:e}"
    );
}

#[test]
fn tiny_models_match_transformers() {
    check(Architecture::Llama, |_| {}, "llama");
    check(
        Architecture::Llama,
        |c| {
            c.attention_bias = Some(true);
            c.mlp_bias = Some(true);
            c.tie_word_embeddings = Some(false);
            c.num_key_value_heads = Some(1);
            c.rope_scaling = Some(serde_json::json!({
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 4
            }));
        },
        "llama (biases, untied, MQA, llama3 rope)",
    );
    check(Architecture::Qwen2, |_| {}, "qwen2");
    check(Architecture::Gemma3, |_| {}, "gemma3");
    check(
        Architecture::Gemma3,
        |c| {
            c.final_logit_softcapping = Some(2.0);
            c.layer_types = None;
            c.sliding_window_pattern = Some(2);
            c.rope_scaling = Some(serde_json::json!({"rope_type": "linear", "factor": 8.0}));
        },
        "gemma3 (final soft-cap, sliding_window_pattern, linear rope scaling)",
    );
}
