//! Gradient checks of the trainable models on tiny random configs of each architecture:
//! every parameter receives a finite, non-zero gradient; analytic gradients agree with
//! central finite differences (f64) on entries of every kind of tensor; attention is causal.
//! Each check runs with the fused CPU kernels (the default) and with the plain candle
//! composition (what other devices run), and the two must agree.

use candle_core::{DType, Device, Tensor, Var, D};
use fusechat_train::model::{
    token_logprobs, Architecture, CausalLm, LoraConfig, LoraTarget, ModelConfig,
};

const ARCHS: [Architecture; 3] = [
    Architecture::Llama,
    Architecture::Qwen2,
    Architecture::Gemma3,
];
const BATCH: usize = 2;
/// Longer than the tiny Gemma 3 sliding window (3), so the window matters.
const SEQ: usize = 7;

fn tokens(vocab: usize, seed: u32) -> Vec<u32> {
    // Small LCG: deterministic ids without depending on rand's stream.
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..BATCH * SEQ)
        .map(|_| {
            x = x.wrapping_mul(1103515245).wrapping_add(12345);
            (x >> 16) % vocab as u32
        })
        .collect()
}

/// Mean next-token cross-entropy of a batch (the SFT loss, without masking).
fn loss(model: &CausalLm, ids: &Tensor, targets: &Tensor) -> Tensor {
    let logits = model.forward(ids).unwrap();
    let vocab = logits.dim(D::Minus1).unwrap();
    let logits = logits.reshape(((), vocab)).unwrap();
    candle_nn::loss::cross_entropy(&logits, &targets.flatten_all().unwrap()).unwrap()
}

fn batch(model: &CausalLm, dev: &Device) -> (Tensor, Tensor) {
    let v = model.config().vocab_size;
    let ids = Tensor::from_vec(tokens(v, 1), (BATCH, SEQ), dev).unwrap();
    let targets = Tensor::from_vec(tokens(v, 2), (BATCH, SEQ), dev).unwrap();
    (ids, targets)
}

fn config(arch: Architecture) -> ModelConfig {
    let mut c = ModelConfig::tiny(arch);
    if arch == Architecture::Llama {
        // Exercise the optional llama biases too.
        c.attention_bias = Some(true);
        c.mlp_bias = Some(true);
    }
    c
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    let dev = Device::Cpu;
    for (arch, fused) in ARCHS.iter().flat_map(|&a| [(a, true), (a, false)]) {
        let mut model = CausalLm::random(config(arch), &dev, 7).unwrap();
        model.set_fused_kernels(fused);
        let (ids, targets) = batch(&model, &dev);
        let l = loss(&model, &ids, &targets);
        let grads = l.backward().unwrap();
        let names: Vec<&str> = model.parameters().iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"model.embed_tokens.weight"));
        if arch == Architecture::Qwen2 {
            assert!(names.contains(&"model.layers.0.self_attn.q_proj.bias"));
            assert!(
                names.contains(&"lm_head.weight"),
                "the tiny qwen2 is untied"
            );
        } else {
            assert!(
                !names.contains(&"lm_head.weight"),
                "tied: lm_head is the embedding"
            );
        }
        if arch == Architecture::Gemma3 {
            assert!(names.contains(&"model.layers.1.self_attn.q_norm.weight"));
            assert!(names.contains(&"model.layers.1.pre_feedforward_layernorm.weight"));
        }
        for (name, var) in model.parameters() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{arch:?}: no gradient for {name}"));
            assert_eq!(g.dims(), var.dims(), "{arch:?} {name}");
            let v: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{arch:?}: non-finite gradient for {name}"
            );
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!(norm > 0.0, "{arch:?}: zero gradient for {name}");
        }
        println!(
            "{arch:?} (fused {fused}): loss {:.4}, {} parameters all have gradients",
            l.to_scalar::<f32>().unwrap(),
            names.len()
        );
    }
}

/// A tied embedding gets the gradient of both its uses: the gradient with the input ids
/// restricted to token 0 still reaches other rows (through lm_head).
#[test]
fn tied_embedding_gets_the_lm_head_gradient() {
    let dev = Device::Cpu;
    let model = CausalLm::random(ModelConfig::tiny(Architecture::Llama), &dev, 3).unwrap();
    let ids = Tensor::zeros((1, 4), DType::U32, &dev).unwrap();
    let targets = Tensor::new(&[[5u32, 6, 7, 8]], &dev).unwrap();
    let grads = loss(&model, &ids, &targets).backward().unwrap();
    let (_, embed) = &model.parameters()[0];
    let g = grads.get(embed.as_tensor()).unwrap();
    // Row 5 is never looked up: its gradient comes from lm_head only.
    let row: Vec<f32> = g.get(5).unwrap().to_vec1().unwrap();
    assert!(row.iter().any(|x| *x != 0.0));
    // Row 0 has both.
    let row0: Vec<f32> = g.get(0).unwrap().to_vec1().unwrap();
    assert!(row0.iter().any(|x| *x != 0.0));
}

fn flat_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn set_entry(var: &Var, index: usize, value: f64) {
    let mut v = flat_f64(var.as_tensor());
    v[index] = value;
    let t = Tensor::from_vec(v, var.dims(), var.device()).unwrap();
    var.set(&t).unwrap();
}

/// The tensors whose entries are checked, per architecture.
fn checked(arch: Architecture) -> Vec<&'static str> {
    let mut names = vec![
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
    ];
    match arch {
        Architecture::Llama => names.extend([
            "model.layers.0.self_attn.o_proj.bias",
            "model.layers.1.mlp.down_proj.bias",
        ]),
        Architecture::Qwen2 => names.extend([
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.1.self_attn.k_proj.bias",
            "model.layers.0.self_attn.v_proj.bias",
            "lm_head.weight",
        ]),
        Architecture::Gemma3 => names.extend([
            "model.layers.0.self_attn.q_norm.weight",
            "model.layers.1.self_attn.k_norm.weight",
            "model.layers.0.pre_feedforward_layernorm.weight",
            "model.layers.0.post_feedforward_layernorm.weight",
        ]),
    }
    names
}

#[test]
fn gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let eps = 1e-5;
    for (arch, fused) in ARCHS.iter().flat_map(|&a| [(a, true), (a, false)]) {
        let mut cfg = config(arch);
        if arch == Architecture::Gemma3 {
            // Exercise both soft-caps as well.
            cfg.attn_logit_softcapping = Some(5.0);
            cfg.final_logit_softcapping = Some(3.0);
        }
        let mut model = CausalLm::random_with_dtype(cfg, &dev, 11, DType::F64).unwrap();
        model.set_fused_kernels(fused);
        let (ids, targets) = batch(&model, &dev);
        let l = loss(&model, &ids, &targets);
        let grads = l.backward().unwrap();
        let mut worst = 0.0f64;
        for name in checked(arch) {
            let var = &model
                .parameters()
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("{arch:?}: no parameter {name}"))
                .1;
            let g = flat_f64(grads.get(var.as_tensor()).unwrap());
            // The entry with the largest gradient, and one a third of the way in.
            let largest = (0..g.len())
                .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                .unwrap();
            for index in [largest, g.len() / 3] {
                let original = flat_f64(var.as_tensor())[index];
                set_entry(var, index, original + eps);
                let plus = loss(&model, &ids, &targets).to_scalar::<f64>().unwrap();
                set_entry(var, index, original - eps);
                let minus = loss(&model, &ids, &targets).to_scalar::<f64>().unwrap();
                set_entry(var, index, original);
                let numeric = (plus - minus) / (2.0 * eps);
                let analytic = g[index];
                let scale = analytic.abs().max(numeric.abs());
                // Entries with a tiny gradient only get an absolute check.
                let err = if scale > 1e-6 {
                    (analytic - numeric).abs() / scale
                } else {
                    0.0
                };
                assert!(
                    (analytic - numeric).abs() < 1e-8 || err < 1e-4,
                    "{arch:?} {name}[{index}]: analytic {analytic:e} vs numeric {numeric:e} (rel err {err:e})"
                );
                if index == largest {
                    assert!(
                        scale > 1e-6,
                        "{arch:?} {name}: largest gradient entry is {scale:e}"
                    );
                }
                worst = worst.max(err);
            }
        }
        println!(
            "{arch:?} (fused {fused}): worst relative error over {} entries of {} tensors: {worst:.2e}",
            2 * checked(arch).len(),
            checked(arch).len()
        );
    }
}

/// LoRA on every linear layer: a fresh adapter changes no logit, the adapters' gradients
/// match central finite differences (f64; B set non-zero so that A has a gradient), only
/// the adapters train, and the merged folder computes what the adapted model computes.
#[test]
fn lora_gradients_match_finite_differences_and_merge_exactly() {
    let dev = Device::Cpu;
    let eps = 1e-5;
    for (arch, fused) in ARCHS.iter().flat_map(|&a| [(a, true), (a, false)]) {
        let mut base = CausalLm::random_with_dtype(config(arch), &dev, 11, DType::F64).unwrap();
        base.set_fused_kernels(fused);
        let (ids, targets) = batch(&base, &dev);
        let before = flat_f64(&base.forward(&ids).unwrap());
        let lora = LoraConfig::new(2, 4.0, LoraTarget::ALL.to_vec()).unwrap();
        let model = base.with_lora(lora.clone(), 5).unwrap();
        assert_eq!(flat_f64(&model.forward(&ids).unwrap()), before, "{arch:?}");
        assert_eq!(
            model.num_trainable_parameters() as u64,
            lora.parameter_count(model.config())
        );
        for (name, var) in model.parameters() {
            assert!(
                name.contains(".lora_"),
                "{arch:?}: {name} trains under LoRA"
            );
            if name.contains("lora_B") {
                let values: Vec<f64> = (0..var.elem_count())
                    .map(|i| 0.05 * ((i * 7 + name.len()) as f64).sin())
                    .collect();
                let t = Tensor::from_vec(values, var.dims(), &dev).unwrap();
                var.set(&t).unwrap();
            }
        }
        let grads = loss(&model, &ids, &targets).backward().unwrap();
        let mut worst = 0.0f64;
        for (name, var) in model.parameters() {
            let g = flat_f64(grads.get(var.as_tensor()).unwrap());
            let largest = (0..g.len())
                .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                .unwrap();
            assert!(g[largest].abs() > 1e-8, "{arch:?} {name}: no gradient");
            let original = flat_f64(var.as_tensor())[largest];
            set_entry(var, largest, original + eps);
            let plus = loss(&model, &ids, &targets).to_scalar::<f64>().unwrap();
            set_entry(var, largest, original - eps);
            let minus = loss(&model, &ids, &targets).to_scalar::<f64>().unwrap();
            set_entry(var, largest, original);
            let numeric = (plus - minus) / (2.0 * eps);
            let err = (g[largest] - numeric).abs() / g[largest].abs().max(numeric.abs());
            assert!(
                err < 1e-4,
                "{arch:?} {name}[{largest}]: analytic {:e} vs numeric {numeric:e}",
                g[largest]
            );
            worst = worst.max(err);
        }
        let adapted = flat_f64(&model.forward(&ids).unwrap());
        let tmp = tempfile::tempdir().unwrap();
        model.save(tmp.path(), DType::F32).unwrap();
        let merged = CausalLm::load_with_dtype(tmp.path(), &dev, DType::F64).unwrap();
        let merged = flat_f64(&merged.forward(&ids).unwrap());
        let diff = adapted
            .iter()
            .zip(&merged)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        // The merged weights are saved in f32.
        assert!(diff < 1e-5, "{arch:?}: merged logits differ by {diff:e}");
        println!(
            "{arch:?} (fused {fused}): LoRA worst relative error {worst:.2e} over {} adapters; \
             merged logits within {diff:.1e}",
            model.parameters().len()
        );
    }
}

/// Logits at position t do not depend on later tokens; batch rows are independent.
#[test]
fn attention_is_causal_and_rows_are_independent() {
    let dev = Device::Cpu;
    for (arch, fused) in ARCHS.iter().flat_map(|&a| [(a, true), (a, false)]) {
        let mut model = CausalLm::random_with_dtype(config(arch), &dev, 5, DType::F64).unwrap();
        model.set_fused_kernels(fused);
        let (ids, _) = batch(&model, &dev);
        let base = model.forward(&ids).unwrap();
        let mut changed: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
        changed[SEQ - 1] = (changed[SEQ - 1] + 1) % model.config().vocab_size as u32; // row 0, last token
        let changed = Tensor::from_vec(changed, (BATCH, SEQ), &dev).unwrap();
        let out = model.forward(&changed).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f64 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!(
            diff(
                &base.narrow(1, 0, SEQ - 1).unwrap(),
                &out.narrow(1, 0, SEQ - 1).unwrap()
            ) < 1e-12,
            "{arch:?}: not causal"
        );
        assert!(
            diff(&base.get(1).unwrap(), &out.get(1).unwrap()) < 1e-12,
            "{arch:?}: rows interact"
        );
        assert!(
            diff(&base.get(0).unwrap(), &out.get(0).unwrap()) > 1e-9,
            "{arch:?}: last token ignored"
        );
        // One row alone gives the same logits as in the batch.
        let single = model.forward(&ids.narrow(0, 1, 1).unwrap()).unwrap();
        assert!(
            diff(&single.get(0).unwrap(), &base.get(1).unwrap()) < 1e-12,
            "{arch:?}: batch changes a row"
        );
    }
}

/// Gemma 3's local layers only see `sliding_window` tokens back: with both layers local, the
/// last position does not depend on the first token.
#[test]
fn gemma3_sliding_window_limits_the_context() {
    let dev = Device::Cpu;
    let mut cfg = ModelConfig::tiny(Architecture::Gemma3);
    cfg.layer_types = Some(vec!["sliding_attention".into(), "sliding_attention".into()]);
    // Two layers of window 3: position 6 sees back to 6 - 2*2 = 2.
    let mut model = CausalLm::random_with_dtype(cfg.clone(), &dev, 5, DType::F64).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5, 6, 7]], &dev).unwrap();
    let other = Tensor::new(&[[9u32, 9, 3, 4, 5, 6, 7]], &dev).unwrap();
    for fused in [true, false] {
        model.set_fused_kernels(fused);
        let a = model.forward(&ids).unwrap().get(0).unwrap().get(6).unwrap();
        let b = model
            .forward(&other)
            .unwrap()
            .get(0)
            .unwrap()
            .get(6)
            .unwrap();
        let d = (a - &b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12, "window leaks (fused {fused}): {d}");
    }
    // With a global layer the first tokens matter again.
    cfg.layer_types = Some(vec!["sliding_attention".into(), "full_attention".into()]);
    let model = CausalLm::random_with_dtype(cfg, &dev, 5, DType::F64).unwrap();
    let a = model.forward(&ids).unwrap().get(0).unwrap().get(6).unwrap();
    let c = model
        .forward(&other)
        .unwrap()
        .get(0)
        .unwrap()
        .get(6)
        .unwrap();
    let d = (a - c)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(d > 1e-9, "global layer does not see the start");
}

/// The fused CPU kernels and the plain candle composition give the same logits and
/// gradients (f64, so differences are rounding, not approximation).
#[test]
fn fused_kernels_match_the_composition() {
    let dev = Device::Cpu;
    for arch in ARCHS {
        let mut cfg = config(arch);
        if arch == Architecture::Gemma3 {
            cfg.attn_logit_softcapping = Some(5.0);
        }
        let mut model = CausalLm::random_with_dtype(cfg, &dev, 13, DType::F64).unwrap();
        let (ids, targets) = batch(&model, &dev);
        let mut runs = Vec::new();
        for fused in [true, false] {
            model.set_fused_kernels(fused);
            let logits = model.forward(&ids).unwrap();
            let grads = loss(&model, &ids, &targets).backward().unwrap();
            let g: Vec<Vec<f64>> = model
                .parameters()
                .iter()
                .map(|(_, v)| flat_f64(grads.get(v.as_tensor()).unwrap()))
                .collect();
            runs.push((flat_f64(&logits), g));
        }
        let (a, b) = (&runs[0], &runs[1]);
        let dl =
            a.0.iter()
                .zip(&b.0)
                .map(|(x, y)| (x - y).abs())
                .fold(0f64, f64::max);
        assert!(dl < 1e-12, "{arch:?}: logits differ by {dl:e}");
        for (((name, _), ga), gb) in model.parameters().iter().zip(&a.1).zip(&b.1) {
            let scale = gb.iter().map(|x| x.abs()).fold(0f64, f64::max);
            let d = ga
                .iter()
                .zip(gb)
                .map(|(x, y)| (x - y).abs())
                .fold(0f64, f64::max);
            // 1e-6 relative: candle's GeLU backward uses 6-digit constants (0.797885...), the
            // fused one the exact derivative; any real mismatch is O(1).
            assert!(
                d <= 1e-6 * scale.max(1e-3),
                "{arch:?} {name}: gradients differ by {d:e} (scale {scale:e})"
            );
        }
    }
}

/// `token_logprobs` (fused on the CPU) equals log_softmax + gather, forward and backward,
/// and its gradient matches finite differences.
#[test]
fn token_logprobs_matches_log_softmax_and_finite_differences() {
    let dev = Device::Cpu;
    let logits = Tensor::randn(0f64, 3.0, (2, 3, 11), &dev).unwrap();
    let targets = Tensor::new(&[[0u32, 5, 10], [3, 3, 7]], &dev).unwrap();
    let weights = Tensor::randn(0f64, 1.0, (2, 3), &dev).unwrap();
    let var = Var::from_tensor(&logits).unwrap();
    let fused = token_logprobs(var.as_tensor(), &targets).unwrap();
    assert_eq!(fused.dims(), &[2, 3]);
    let reference = candle_nn::ops::log_softmax(var.as_tensor(), D::Minus1)
        .unwrap()
        .gather(&targets.unsqueeze(2).unwrap(), 2)
        .unwrap()
        .squeeze(2)
        .unwrap();
    let d = (&fused - &reference)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(d < 1e-12, "forward differs by {d:e}");
    let g1 = (fused * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g2 = (reference * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (g1, g2) = (
        flat_f64(g1.get(var.as_tensor()).unwrap()),
        flat_f64(g2.get(var.as_tensor()).unwrap()),
    );
    let d = g1
        .iter()
        .zip(&g2)
        .map(|(a, b)| (a - b).abs())
        .fold(0f64, f64::max);
    assert!(d < 1e-12, "gradient differs by {d:e}");
    let f = |t: &Tensor| -> f64 {
        (token_logprobs(t, &targets).unwrap() * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    for index in [0, 5, 17, 40, 65] {
        let eps = 1e-6;
        let mut v = flat_f64(&logits);
        v[index] += eps;
        let plus = f(&Tensor::from_vec(v.clone(), (2, 3, 11), &dev).unwrap());
        v[index] -= 2.0 * eps;
        let minus = f(&Tensor::from_vec(v, (2, 3, 11), &dev).unwrap());
        let numeric = (plus - minus) / (2.0 * eps);
        assert!(
            (numeric - g1[index]).abs() < 1e-7,
            "[{index}] {numeric} vs {}",
            g1[index]
        );
    }
    // f32 and an out-of-range target.
    let l32 = logits.to_dtype(DType::F32).unwrap();
    let d = (token_logprobs(&l32, &targets)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        - &reference_f64(&logits, &targets))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(d < 1e-5, "f32 differs by {d}");
    let bad = Tensor::new(&[[0u32, 5, 11], [3, 3, 7]], &dev).unwrap();
    assert!(token_logprobs(&logits, &bad).is_err());
}

fn reference_f64(logits: &Tensor, targets: &Tensor) -> Tensor {
    candle_nn::ops::log_softmax(logits, D::Minus1)
        .unwrap()
        .gather(&targets.unsqueeze(2).unwrap(), 2)
        .unwrap()
        .squeeze(2)
        .unwrap()
}

/// Gradient checkpointing changes how the gradients are computed, not what they are: on
/// each architecture, full and LoRA, fused and composed, packed and padded, every
/// trainable parameter's gradient under checkpointing equals the one without, in f32 (what
/// training runs in). The tolerance is 1e-6 of the largest entry, for sums whose order
/// could change; the blocks run the same arithmetic again and the gradients have come out
/// bit-equal (worst difference 0 on every case).
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let dev = Device::Cpu;
    let lens = [5usize, SEQ, 2];
    for (arch, fused) in ARCHS.iter().flat_map(|&a| [(a, true), (a, false)]) {
        for lora in [false, true] {
            let mut model = CausalLm::random(config(arch), &dev, 17).unwrap();
            if lora {
                let targets = LoraConfig::new(2, 4.0, LoraTarget::ALL.to_vec()).unwrap();
                model = model.with_lora(targets, 3).unwrap();
                for (name, var) in model.parameters() {
                    if name.contains("lora_B") {
                        let values: Vec<f32> = (0..var.elem_count())
                            .map(|i| 0.05 * ((i * 7 + name.len()) as f32).sin())
                            .collect();
                        var.set(&Tensor::from_vec(values, var.dims(), &dev).unwrap())
                            .unwrap();
                    }
                }
            }
            model.set_fused_kernels(fused);
            let (ids, targets) = batch(&model, &dev);
            let v = model.config().vocab_size as u32;
            let total: usize = lens.iter().sum();
            let packed_ids = Tensor::from_vec(
                (0..total as u32)
                    .map(|i| (i * 13 + 5) % v)
                    .collect::<Vec<_>>(),
                total,
                &dev,
            )
            .unwrap();
            let rows =
                Tensor::from_vec((0..total as u32).collect::<Vec<_>>(), total, &dev).unwrap();
            let packed_targets = Tensor::from_vec(
                (0..total as u32)
                    .map(|i| (i * 7 + 1) % v)
                    .collect::<Vec<_>>(),
                total,
                &dev,
            )
            .unwrap();
            let mut runs = Vec::new();
            for on in [false, true] {
                model.set_gradient_checkpointing(on);
                assert_eq!(model.kept().block_activations, !on);
                let padded = model.backward(&loss(&model, &ids, &targets)).unwrap();
                let logits = model.forward_packed(&packed_ids, &lens, &rows).unwrap();
                let packed_loss = token_logprobs(&logits, &packed_targets)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .neg()
                    .unwrap();
                let packed = model.backward(&packed_loss).unwrap();
                let grads: Vec<(Vec<f64>, Vec<f64>)> = model
                    .parameters()
                    .iter()
                    .map(|(name, var)| {
                        let get = |store: &candle_core::backprop::GradStore| {
                            let g = store.get(var.as_tensor()).unwrap_or_else(|| {
                                panic!("{arch:?} checkpointing {on}: no gradient for {name}")
                            });
                            flat_f64(&g.to_dtype(DType::F64).unwrap())
                        };
                        (get(&padded), get(&packed))
                    })
                    .collect();
                runs.push(grads);
            }
            let mut worst = 0f64;
            for (((name, _), plain), checkpointed) in
                model.parameters().iter().zip(&runs[0]).zip(&runs[1])
            {
                for (a, b) in [(&plain.0, &checkpointed.0), (&plain.1, &checkpointed.1)] {
                    let scale = a.iter().map(|x| x.abs()).fold(0f64, f64::max);
                    assert!(scale > 0.0, "{arch:?} {name}: no gradient");
                    let d = a
                        .iter()
                        .zip(b)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f64, f64::max);
                    assert!(
                        d <= 1e-6 * scale,
                        "{arch:?} lora {lora} fused {fused} {name}: checkpointed gradient \
                         differs by {d:e} (scale {scale:e})"
                    );
                    worst = worst.max(d / scale);
                }
            }
            println!(
                "{arch:?} (lora {lora}, fused {fused}): checkpointed gradients within {worst:.1e} \
                 (relative) over {} parameters",
                model.parameters().len()
            );
        }
    }
}
