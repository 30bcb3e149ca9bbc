//! Saving and loading: save -> load gives identical logits (f32) and bf16-rounded weights
//! (bf16); saved tensor names are the Hugging Face ones (checked against the real imported
//! SmolLM2 folder, which must survive load -> save(bf16) bit for bit); broken folders give
//! errors naming the file / tensor / field.
//!
//! The real folder is `$FUSECHAT_IMPORTED_DIR/smollm2-135m-instruct` (default
//! `$FUSECHAT_HOME/test-imported`, `FUSECHAT_HOME` defaulting to `~/.cache/fusechat`), written
//! by `scripts/test.sh` (the import test of fusechat-models).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fusechat_train::model::{Architecture, CausalLm, ModelConfig, ModelError};

fn imported_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("FUSECHAT_IMPORTED_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("FUSECHAT_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into()))
                        .join(".cache/fusechat")
                })
                .join("test-imported")
        });
    let dir = base.join(name);
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} has no imported model: run `scripts/test.sh` (or the import test: \
         FUSECHAT_IMPORTED_DIR={} cargo test --release -p fusechat-models --test import_roundtrip)",
        dir.display(),
        base.display()
    );
    dir
}

/// name -> (dtype, shape, raw bytes) of a safetensors file.
fn read_safetensors(path: &Path) -> BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn ids(vocab: usize) -> Tensor {
    let v: Vec<u32> = (0..12u32).map(|i| (i * 7 + 3) % vocab as u32).collect();
    Tensor::from_vec(v, (2, 6), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn save_load_roundtrip_gives_identical_logits() {
    let dev = Device::Cpu;
    for arch in [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Gemma3,
    ] {
        let model = CausalLm::random(ModelConfig::tiny(arch), &dev, 42).unwrap();
        let x = ids(model.config().vocab_size);
        let logits = model.forward(&x).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        model.save(tmp.path(), DType::F32).unwrap();
        let loaded = CausalLm::load(tmp.path(), &dev).unwrap();
        assert_eq!(loaded.config().architecture(), arch);
        let names = |m: &CausalLm| {
            m.parameters()
                .iter()
                .map(|(n, _)| n.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&model), names(&loaded));
        assert_eq!(
            max_diff(&logits, &loaded.forward(&x).unwrap()),
            0.0,
            "{arch:?}: f32 roundtrip changes logits"
        );

        // The file has exactly the parameters, no stray temporary files are left.
        let saved = read_safetensors(&tmp.path().join("model.safetensors"));
        assert_eq!(saved.keys().cloned().collect::<Vec<_>>(), {
            let mut n = names(&model);
            n.sort();
            n
        });
        let files: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files.len(), 2, "{files:?}");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["torch_dtype"], "float32");
        assert_eq!(config["architectures"][0], arch.hf_class());

        // bf16: the loaded weights are the bf16 roundings of the originals.
        model.save(tmp.path(), DType::BF16).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["torch_dtype"], "bfloat16");
        let loaded = CausalLm::load(tmp.path(), &dev).unwrap();
        for ((name, a), (_, b)) in model.parameters().iter().zip(loaded.parameters()) {
            let rounded = a
                .as_tensor()
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            assert_eq!(max_diff(&rounded, b.as_tensor()), 0.0, "{arch:?} {name}");
        }
        let d = max_diff(&logits, &loaded.forward(&x).unwrap());
        assert!(
            d > 0.0 && d < 0.05,
            "{arch:?}: bf16 roundtrip logit change {d}"
        );
    }
}

#[test]
fn real_smollm2_names_and_bytes_survive_load_and_save() {
    let dir = imported_dir("smollm2-135m-instruct");
    let model = CausalLm::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(model.config().architecture(), Architecture::Llama);
    assert_eq!(model.num_parameters(), 134_515_008);
    let tmp = tempfile::tempdir().unwrap();
    model.save(tmp.path(), DType::BF16).unwrap();
    let original = read_safetensors(&dir.join("model.safetensors"));
    let saved = read_safetensors(&tmp.path().join("model.safetensors"));
    assert_eq!(
        original.keys().collect::<Vec<_>>(),
        saved.keys().collect::<Vec<_>>(),
        "saved tensor names differ from the Hugging Face folder's"
    );
    for (name, (dtype, shape, bytes)) in &original {
        let (d, s, b) = &saved[name];
        assert_eq!((dtype, shape), (d, s), "{name}");
        assert!(bytes == b, "{name}: bf16 -> f32 -> bf16 is not lossless");
    }
    // config.json: the original, with torch_dtype set.
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let mut before = read(&dir.join("config.json"));
    before["torch_dtype"] = "bfloat16".into();
    assert_eq!(before, read(&tmp.path().join("config.json")));
}

#[test]
fn broken_folders_give_errors_that_name_the_problem() {
    let dev = Device::Cpu;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = CausalLm::random(ModelConfig::tiny(Architecture::Llama), &dev, 1).unwrap();
    model.save(dir, DType::F32).unwrap();
    let config_path = dir.join("config.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let with = |edit: &dyn Fn(&mut serde_json::Value)| -> String {
        let mut c = original.clone();
        edit(&mut c);
        std::fs::write(&config_path, serde_json::to_string(&c).unwrap()).unwrap();
        let err = CausalLm::load(dir, &dev).unwrap_err();
        err.to_string()
    };

    let e = with(&|c| c["num_hidden_layers"] = 3.into());
    assert!(
        e.contains("model.layers.2.self_attn.q_proj.weight") && e.contains("is missing"),
        "{e}"
    );
    let e = with(&|c| c["tie_word_embeddings"] = false.into());
    assert!(e.contains("lm_head.weight"), "{e}");
    let e = with(&|c| c["intermediate_size"] = 50.into());
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("[50, 32]")
            && e.contains("[48, 32]"),
        "{e}"
    );
    let e = with(&|c| c["architectures"] = serde_json::json!(["MambaForCausalLM"]));
    assert!(
        e.contains("config.json") && e.contains("MambaForCausalLM"),
        "{e}"
    );
    let e = with(&|c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    assert!(
        e.contains("config.json") && e.contains("hidden_size"),
        "{e}"
    );
    let e = with(&|c| c["num_key_value_heads"] = 3.into());
    assert!(e.contains("num_key_value_heads"), "{e}");
    let e = with(&|c| c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0}));
    assert!(e.contains("yarn"), "{e}");

    std::fs::write(&config_path, serde_json::to_string(&original).unwrap()).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = CausalLm::load(dir, &dev).unwrap_err();
    assert!(matches!(e, ModelError::NoWeights { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");

    let e = CausalLm::load(&dir.join("nowhere"), &dev)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nowhere") && e.contains("config.json"), "{e}");

    // Bad inputs.
    let e = model
        .forward(&Tensor::new(&[1u32, 2], &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("(batch, seq)"), "{e}");
    let e = model
        .forward(&Tensor::new(&[[1f32, 2.]], &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("u32"), "{e}");
    assert!(model.save(dir, DType::U8).is_err());
}

#[test]
fn real_configs_parse() {
    let cases = [
        ("smollm2-135m-instruct", Architecture::Llama, true, 1e5),
        (
            "qwen2.5-coder-0.5b-instruct",
            Architecture::Qwen2,
            false,
            1e6,
        ),
        ("gemma-3-270m", Architecture::Gemma3, true, 1e6),
    ];
    for (name, arch, tied, theta) in cases {
        let dir = imported_dir(name);
        let c = ModelConfig::from_dir(&dir).unwrap();
        assert_eq!(c.architecture(), arch, "{name}");
        assert_eq!(c.tied_embeddings(), tied, "{name}");
        assert_eq!(c.rope_global().unwrap().0, theta, "{name}");
    }
    let c = ModelConfig::from_dir(&imported_dir("gemma-3-270m")).unwrap();
    let sliding = c.sliding_layers();
    assert_eq!(sliding.iter().filter(|s| !**s).count(), 3);
    assert!(!sliding[5] && sliding[0]);
    assert_eq!(c.rope_local_theta(), 1e4);
    assert_eq!(c.attention_scale(), 1.0 / 16.0);
}
