//! GGUF tensor names to Hugging Face names, and the undoing of what llama.cpp's converter did to
//! some weights on the way in (see `convert_hf_to_gguf.py`):
//!
//! * `LlamaModel.modify_tensors` permutes the rows of `q_proj` and `k_proj` (weights and biases)
//!   so that llama.cpp's interleaved RoPE sees HF's rotate-half pairs: per head, the rows
//!   `[0 .. d/2)` and `[d/2 .. d)` are interleaved. Qwen2 and Gemma 3 are converted without it
//!   (llama.cpp runs them with NeoX-style RoPE), so only llama is un-permuted.
//! * `Gemma3Model.modify_tensors` adds 1 to every tensor whose name ends in `norm.weight`,
//!   because HF's Gemma3RMSNorm computes `x * (1 + w)` while llama.cpp computes `x * w`. The
//!   import subtracts 1 again from each of them.

use candle_core::{Result as CandleResult, Tensor};

use super::config::{Architecture, ModelParams};
use super::error::ImportError;

/// What to do to a dequantized tensor before writing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    None,
    /// Undo llama.cpp's Q/K row permutation for this many heads.
    UnpermuteRope { heads: usize },
    /// Subtract the 1 llama.cpp added to a Gemma norm weight.
    GemmaNormShift,
}

/// One tensor to copy: where it comes from, where it goes, what to do on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan {
    pub gguf_name: String,
    pub hf_name: String,
    pub shape: Vec<usize>,
    pub transform: Transform,
}

/// Maps every tensor of the file, and checks that each layer has all the tensors its
/// architecture needs. Unknown tensors are an error rather than silently dropped.
pub fn plan(
    params: &ModelParams,
    gguf_tensors: &[(String, Vec<usize>)],
) -> Result<Vec<TensorPlan>, ImportError> {
    let arch_name = params.arch.gguf_name();
    let mut plans = Vec::with_capacity(gguf_tensors.len());
    for (name, shape) in gguf_tensors {
        let (hf_name, transform) =
            map_name(params, name).ok_or_else(|| ImportError::UnexpectedTensor {
                name: name.clone(),
                architecture: arch_name.into(),
            })?;
        check_shape(params, name, shape, transform)?;
        plans.push(TensorPlan {
            gguf_name: name.clone(),
            hf_name,
            shape: shape.clone(),
            transform,
        });
    }
    for required in required_tensors(params) {
        if !gguf_tensors.iter().any(|(n, _)| *n == required) {
            return Err(ImportError::MissingTensor {
                name: required,
                architecture: arch_name.into(),
            });
        }
    }
    plans.sort_by(|a, b| a.hf_name.cmp(&b.hf_name));
    Ok(plans)
}

/// The Hugging Face name of a GGUF tensor and the transform it needs.
fn map_name(params: &ModelParams, gguf_name: &str) -> Option<(String, Transform)> {
    let arch = params.arch;
    let norm = if arch == Architecture::Gemma3 {
        Transform::GemmaNormShift
    } else {
        Transform::None
    };
    match gguf_name {
        "token_embd.weight" => return Some(("model.embed_tokens.weight".into(), Transform::None)),
        "output_norm.weight" => return Some(("model.norm.weight".into(), norm)),
        "output.weight" => return Some(("lm_head.weight".into(), Transform::None)),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer >= params.num_layers {
        return None;
    }
    let (base, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let permute = |heads| {
        if arch == Architecture::Llama {
            Transform::UnpermuteRope { heads }
        } else {
            Transform::None
        }
    };
    let (hf, transform) = match (arch, base) {
        (_, "attn_q") => ("self_attn.q_proj", permute(params.num_heads)),
        (_, "attn_k") => ("self_attn.k_proj", permute(params.num_kv_heads)),
        (_, "attn_v") => ("self_attn.v_proj", Transform::None),
        (_, "attn_output") => ("self_attn.o_proj", Transform::None),
        (_, "ffn_gate") => ("mlp.gate_proj", Transform::None),
        (_, "ffn_up") => ("mlp.up_proj", Transform::None),
        (_, "ffn_down") => ("mlp.down_proj", Transform::None),
        (_, "attn_norm") => ("input_layernorm", norm),
        (Architecture::Llama | Architecture::Qwen2, "ffn_norm") => {
            ("post_attention_layernorm", Transform::None)
        }
        (Architecture::Gemma3, "post_attention_norm") => ("post_attention_layernorm", norm),
        (Architecture::Gemma3, "ffn_norm") => ("pre_feedforward_layernorm", norm),
        (Architecture::Gemma3, "post_ffw_norm") => ("post_feedforward_layernorm", norm),
        (Architecture::Gemma3, "attn_q_norm") => ("self_attn.q_norm", norm),
        (Architecture::Gemma3, "attn_k_norm") => ("self_attn.k_norm", norm),
        _ => return None,
    };
    // Norms have weights only; a bias on one would be a tensor HF has no slot for.
    if suffix == "bias" && (transform == Transform::GemmaNormShift || hf.ends_with("layernorm")) {
        return None;
    }
    Some((format!("model.layers.{layer}.{hf}.{suffix}"), transform))
}

/// GGUF names every model of the architecture must have.
fn required_tensors(params: &ModelParams) -> Vec<String> {
    let mut names = vec!["token_embd.weight".to_string(), "output_norm.weight".to_string()];
    let mut per_layer = vec![
        "attn_norm.weight",
        "attn_q.weight",
        "attn_k.weight",
        "attn_v.weight",
        "attn_output.weight",
        "ffn_gate.weight",
        "ffn_up.weight",
        "ffn_down.weight",
        "ffn_norm.weight",
    ];
    match params.arch {
        Architecture::Llama => {}
        Architecture::Qwen2 => per_layer.extend(["attn_q.bias", "attn_k.bias", "attn_v.bias"]),
        Architecture::Gemma3 => per_layer.extend([
            "post_attention_norm.weight",
            "post_ffw_norm.weight",
            "attn_q_norm.weight",
            "attn_k_norm.weight",
        ]),
    }
    if params.attention_bias && params.arch == Architecture::Llama {
        per_layer.extend(["attn_q.bias", "attn_k.bias", "attn_v.bias"]);
    }
    for layer in 0..params.num_layers {
        for t in &per_layer {
            names.push(format!("blk.{layer}.{t}"));
        }
    }
    names
}

/// Checks the shapes the transforms and the config depend on.
fn check_shape(
    params: &ModelParams,
    name: &str,
    shape: &[usize],
    transform: Transform,
) -> Result<(), ImportError> {
    let bad = |expected: String| ImportError::TensorShape {
        name: name.to_string(),
        found: shape.to_vec(),
        expected,
    };
    let h = params.hidden_size;
    let q_rows = params.num_heads * params.head_dim;
    let kv_rows = params.num_kv_heads * params.head_dim;
    let expected: Option<Vec<usize>> = if name.ends_with("attn_q.weight") {
        Some(vec![q_rows, h])
    } else if name.ends_with("attn_k.weight") || name.ends_with("attn_v.weight") {
        Some(vec![kv_rows, h])
    } else if name.ends_with("attn_q.bias") {
        Some(vec![q_rows])
    } else if name.ends_with("attn_k.bias") || name.ends_with("attn_v.bias") {
        Some(vec![kv_rows])
    } else if name.ends_with("attn_output.weight") {
        Some(vec![h, q_rows])
    } else if name.ends_with("ffn_gate.weight") || name.ends_with("ffn_up.weight") {
        Some(vec![params.intermediate_size, h])
    } else if name.ends_with("ffn_down.weight") {
        Some(vec![h, params.intermediate_size])
    } else if name.ends_with("attn_q_norm.weight") || name.ends_with("attn_k_norm.weight") {
        Some(vec![params.head_dim])
    } else if name.ends_with("norm.weight") {
        Some(vec![h])
    } else if name == "output.weight" || name == "token_embd.weight" {
        Some(vec![params.vocab_size, h])
    } else {
        None
    };
    if let Some(expected) = expected {
        if shape != expected.as_slice() {
            return Err(bad(format!("{expected:?}")));
        }
    }
    if let Transform::UnpermuteRope { heads } = transform {
        if shape[0] % (2 * heads) != 0 {
            return Err(bad(format!("rows divisible by 2 x {heads} heads")));
        }
    }
    Ok(())
}

/// Applies a transform to a dequantized f32 tensor.
pub fn apply(t: &Tensor, transform: Transform) -> CandleResult<Tensor> {
    match transform {
        Transform::None => Ok(t.clone()),
        Transform::UnpermuteRope { heads } => unpermute_rope(t, heads),
        Transform::GemmaNormShift => t.affine(1.0, -1.0),
    }
}

/// Inverse of llama.cpp's `LlamaModel.permute`. That permute views the rows of one head as
/// `(2, d/2)` (HF's two rotate-half halves) and transposes them to `(d/2, 2)`, interleaving the
/// halves. Here the rows of each head are viewed as `(d/2, 2)` and transposed back to `(2, d/2)`.
/// Works for weights `[rows, cols]` and biases `[rows]`.
pub fn unpermute_rope(t: &Tensor, heads: usize) -> CandleResult<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let half = rows / heads / 2;
    let mut grouped = vec![heads, half, 2];
    grouped.extend_from_slice(&dims[1..]);
    t.reshape(grouped)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// llama.cpp's forward permutation, written out index by index from its definition
    /// (`reshape(n_head, 2, rows / n_head / 2, ...).swapaxes(1, 2)`): output row
    /// `h*d + 2*j + p` is input row `h*d + p*(d/2) + j`.
    fn llama_cpp_permute(rows: &[Vec<f32>], heads: usize) -> Vec<Vec<f32>> {
        let d = rows.len() / heads;
        let mut out = vec![Vec::new(); rows.len()];
        for h in 0..heads {
            for j in 0..d / 2 {
                for p in 0..2 {
                    out[h * d + 2 * j + p] = rows[h * d + p * (d / 2) + j].clone();
                }
            }
        }
        out
    }

    fn matrix(rows: usize, cols: usize) -> Vec<Vec<f32>> {
        (0..rows)
            .map(|r| (0..cols).map(|c| (r * 100 + c) as f32).collect())
            .collect()
    }

    fn to_tensor(m: &[Vec<f32>]) -> Tensor {
        Tensor::new(m.to_vec(), &Device::Cpu).unwrap()
    }

    #[test]
    fn unpermute_one_head_by_hand() {
        // One head of 4 rows: HF pairs rows (0,2) and (1,3); llama.cpp stores them as 0,2,1,3.
        let gguf_rows = vec![vec![0.0f32], vec![2.0], vec![1.0], vec![3.0]];
        let back = unpermute_rope(&to_tensor(&gguf_rows), 1).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), vec![vec![0.0], vec![1.0], vec![2.0], vec![3.0]]);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute_for_weights() {
        for (heads, head_dim, cols) in [(1, 4, 3), (3, 8, 5), (2, 64, 2)] {
            let hf = matrix(heads * head_dim, cols);
            let gguf = llama_cpp_permute(&hf, heads);
            assert_ne!(gguf, hf, "the permutation must move rows");
            let back = unpermute_rope(&to_tensor(&gguf), heads).unwrap();
            assert_eq!(back.to_vec2::<f32>().unwrap(), hf);
        }
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute_for_biases() {
        let heads = 3;
        let hf: Vec<Vec<f32>> = (0..heads * 6).map(|r| vec![r as f32]).collect();
        let gguf: Vec<f32> = llama_cpp_permute(&hf, heads).into_iter().map(|r| r[0]).collect();
        let back = unpermute_rope(&Tensor::new(gguf, &Device::Cpu).unwrap(), heads).unwrap();
        let expected: Vec<f32> = hf.into_iter().map(|r| r[0]).collect();
        assert_eq!(back.to_vec1::<f32>().unwrap(), expected);
    }

    #[test]
    fn gemma_norm_shift_subtracts_the_one_llama_cpp_added() {
        let hf = vec![-0.5f32, 0.0, 0.25, 2.0];
        let gguf: Vec<f32> = hf.iter().map(|w| w + 1.0).collect();
        let t = Tensor::new(gguf, &Device::Cpu).unwrap();
        let back = apply(&t, Transform::GemmaNormShift).unwrap();
        assert_eq!(back.to_vec1::<f32>().unwrap(), hf);
    }

    fn params(arch: Architecture) -> ModelParams {
        ModelParams {
            arch,
            hidden_size: 8,
            intermediate_size: 16,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            context_length: 32,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: None,
            vocab_size: 10,
            tie_word_embeddings: true,
            attention_bias: arch == Architecture::Qwen2,
            gemma3: None,
        }
    }

    #[test]
    fn gemma3_names_and_norm_shift() {
        let p = params(Architecture::Gemma3);
        let cases = [
            ("output_norm.weight", "model.norm.weight"),
            ("blk.1.attn_norm.weight", "model.layers.1.input_layernorm.weight"),
            ("blk.1.post_attention_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
            ("blk.1.ffn_norm.weight", "model.layers.1.pre_feedforward_layernorm.weight"),
            ("blk.1.post_ffw_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"),
            ("blk.1.attn_q_norm.weight", "model.layers.1.self_attn.q_norm.weight"),
            ("blk.1.attn_k_norm.weight", "model.layers.1.self_attn.k_norm.weight"),
        ];
        for (gguf, hf) in cases {
            assert_eq!(map_name(&p, gguf), Some((hf.to_string(), Transform::GemmaNormShift)), "{gguf}");
        }
        assert_eq!(
            map_name(&p, "blk.0.attn_q.weight"),
            Some(("model.layers.0.self_attn.q_proj.weight".into(), Transform::None))
        );
        assert_eq!(map_name(&p, "blk.2.attn_q.weight"), None, "layer beyond block_count");
    }

    #[test]
    fn llama_permutes_q_and_k_only_and_qwen2_nothing() {
        let llama = params(Architecture::Llama);
        assert_eq!(
            map_name(&llama, "blk.0.attn_q.weight").unwrap().1,
            Transform::UnpermuteRope { heads: 2 }
        );
        assert_eq!(
            map_name(&llama, "blk.0.attn_k.weight").unwrap().1,
            Transform::UnpermuteRope { heads: 1 }
        );
        assert_eq!(map_name(&llama, "blk.0.attn_v.weight").unwrap().1, Transform::None);
        assert_eq!(
            map_name(&llama, "blk.0.ffn_norm.weight").unwrap().0,
            "model.layers.0.post_attention_layernorm.weight"
        );
        let qwen = params(Architecture::Qwen2);
        for n in ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_q.bias", "blk.0.attn_k.bias"] {
            assert_eq!(map_name(&qwen, n).unwrap().1, Transform::None, "{n}");
        }
        assert_eq!(
            map_name(&qwen, "blk.0.attn_k.bias").unwrap().0,
            "model.layers.0.self_attn.k_proj.bias"
        );
    }

    #[test]
    fn unknown_and_missing_tensors_are_errors() {
        let p = params(Architecture::Llama);
        let mut tensors: Vec<(String, Vec<usize>)> = vec![
            ("token_embd.weight".into(), vec![10, 8]),
            ("output_norm.weight".into(), vec![8]),
            ("rope_freqs.weight".into(), vec![2]),
        ];
        let err = plan(&p, &tensors).unwrap_err();
        assert!(matches!(err, ImportError::UnexpectedTensor { ref name, .. } if name == "rope_freqs.weight"));
        tensors.pop();
        let err = plan(&p, &tensors).unwrap_err();
        assert!(matches!(err, ImportError::MissingTensor { .. }), "{err}");
    }
}
