#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

//! fusechat: Gemma 3 (text) served straight from a GGUF file, every tensor in
//! the file's own quantized type.
//!
//! Follows llama.cpp's `gemma3` graph, which is what a GGUF file is made
//! for: the file's norm weights already include Gemma's `1 +` (so a norm is
//! `x * w`), the embeddings are scaled by `sqrt(hidden)`, queries and keys
//! get their own RMS norm per head, attention and MLP outputs are normed
//! again before each residual add, the MLP is GELU (tanh) gated, and every
//! `sliding_window_pattern`-th layer is global (RoPE base `rope.freq_base`)
//! while the others attend to the last `sliding_window` positions only (RoPE
//! base `rope.freq_base_swa`, 10000 when absent). Queries are scaled by
//! `1/sqrt(head_dim)`, except for the 62-layer model (`1/sqrt(hidden / heads)`).
//!
//! Every layer keeps a full KV cache; a sliding layer narrows it to its
//! window when decoding (and masks it when prefilling). With full caches the
//! engine may decode sequences of different lengths in one step
//! (`supports_ragged_decode`): the decode attention skips each sequence's
//! left padding, and a sliding layer shifts that padding by what it cuts.

use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Result, Tensor};
use mistralrs_quant::{GgufMatMul, QuantMethod, QuantMethodConfig};

use crate::attention::SdpaParams;
use crate::device_map::{DeviceMappedMask, DeviceMapper};
use crate::gguf::Content;
use crate::layers::{Activation, CausalMasker, Gemma3RotaryEmbedding, MatMul, QRmsNorm, RotaryEmbedding, Sdpa};
use crate::layers_masker::PastKvLenCache;
use crate::paged_attention::AttentionImplementation;
use crate::pipeline::text_models_inputs_processor::PagedAttentionInputMetadata;
use crate::kv_cache::KvPadding;
use crate::pipeline::{extract_logits, EitherCache, KvCache, NormalCache};
use crate::utils::gguf_metadata::ContentMetadata;
use crate::utils::model_config as ModelConfig;
use crate::utils::progress::{new_multi_progress, NiceProgressBar};
use crate::vision_models::gemma3::config::Gemma3TextConfig;

const DEFAULT_MAX_SEQ_LEN: usize = 4096;

fn qlinear(w: QTensor) -> Result<Arc<dyn QuantMethod>> {
    Ok(Arc::new(GgufMatMul::new(QuantMethodConfig::Gguf {
        q_weight: Arc::new(w),
        b: None,
    })?))
}

/// The token embeddings, kept in their quantized type where fusechat's
/// kernels read it (rows are dequantized as they are looked up), else
/// dequantized once.
struct Embeddings {
    table: Arc<QTensor>,
    dense: Option<Tensor>,
    hidden: usize,
    scale: f64,
}

impl Embeddings {
    fn new(table: QTensor, hidden: usize) -> Result<Self> {
        let table = Arc::new(table);
        let quantized_lookup = table.device().is_cpu()
            && fusechat_kernels::BlockFormat::from_ggml(table.dtype()).is_some();
        let dense = if quantized_lookup {
            None
        } else {
            Some(table.dequantize(&table.device())?)
        };
        Ok(Self {
            table,
            dense,
            hidden,
            // Gemma scales the embeddings by sqrt(hidden), computed in double
            // precision and rounded once (as transformers and llama.cpp do).
            scale: (hidden as f64).sqrt(),
        })
    }

    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let rows = match &self.dense {
            Some(dense) => dense.index_select(&flat, 0)?,
            None => {
                let ids: Vec<u32> = flat.to_vec1()?;
                fusechat_kernels::embedding(&self.table, &ids)?
                    .expect("checked at load: a CPU table in a format the kernels read")
            }
        };
        rows.reshape((b, s, self.hidden))? * self.scale
    }
}

struct Mlp {
    gate: Arc<dyn QuantMethod>,
    up: Arc<dyn QuantMethod>,
    down: Arc<dyn QuantMethod>,
}

impl Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = MatMul.qmethod_matmul(xs, &*self.gate)?;
        let up = MatMul.qmethod_matmul(xs, &*self.up)?;
        let y = crate::ops::mul_and_act(&gate, &up, Activation::GeluPytorchTanh)?;
        MatMul.qmethod_matmul(&y, &*self.down)
    }
}

/// A layer's rotary embedding: the local one (plain) or the global one
/// (possibly with linear position scaling).
enum Rope {
    Local(Arc<RotaryEmbedding>),
    Global(Arc<Gemma3RotaryEmbedding>),
}

impl Rope {
    fn forward(&self, q: &Tensor, k: &Tensor, offsets: &[usize]) -> Result<(Tensor, Tensor)> {
        match self {
            Rope::Local(rope) => rope.forward(q, k, offsets),
            Rope::Global(rope) => rope.forward(q, k, offsets),
        }
    }
}

struct LayerWeights {
    wq: Arc<dyn QuantMethod>,
    wk: Arc<dyn QuantMethod>,
    wv: Arc<dyn QuantMethod>,
    wo: Arc<dyn QuantMethod>,
    attn_norm: QRmsNorm,
    q_norm: QRmsNorm,
    k_norm: QRmsNorm,
    post_attn_norm: QRmsNorm,
    ffn_norm: QRmsNorm,
    post_ffn_norm: QRmsNorm,
    mlp: Mlp,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// `Some(window)` for a sliding-window (local) layer.
    sliding_window: Option<usize>,
    rope: Rope,
    sdpa_params: SdpaParams,
}

impl LayerWeights {
    fn attention(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        offsets: &[usize],
        cache: &mut KvCache,
        kv_pads: &KvPadding,
    ) -> Result<Tensor> {
        let (b, seq_len, _) = x.dims3()?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((b, seq_len, n, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = heads(MatMul.qmethod_matmul(x, &*self.wq)?, self.n_head)?;
        let k = heads(MatMul.qmethod_matmul(x, &*self.wk)?, self.n_kv_head)?;
        let v = heads(MatMul.qmethod_matmul(x, &*self.wv)?, self.n_kv_head)?;
        let q = self.q_norm.forward(&q)?;
        let k = self.k_norm.forward(&k)?;
        let (q, k) = self.rope.forward(&q, &k, offsets)?;
        let (k, v) = cache.append(&k, &v)?;
        let cached = k.dim(2)?;
        let y = match self.sliding_window {
            // Decoding past the window: attend to its last positions only.
            // Batched sequences are right-aligned in the cache, so cutting
            // `start` positions off the front shortens each one's left
            // padding by as much.
            Some(window) if seq_len == 1 && cached > window => {
                let start = cached - window;
                let k = k.narrow(2, start, window)?;
                let v = v.narrow(2, start, window)?;
                let pads = kv_pads.after_cut(start);
                Sdpa.run_attention_padded(&q, &k, &v, None, None, &self.sdpa_params, pads.as_slice())?
            }
            _ => Sdpa.run_attention_padded(&q, &k, &v, mask, None, &self.sdpa_params, kv_pads.as_slice())?,
        };
        let y = y.transpose(1, 2)?.reshape((b, seq_len, ()))?;
        MatMul.qmethod_matmul(&y, &*self.wo)
    }
}

pub struct ModelWeights {
    embeddings: Embeddings,
    layers: Vec<LayerWeights>,
    norm: QRmsNorm,
    output: Arc<dyn QuantMethod>,
    final_logit_softcapping: Option<f64>,
    pub device: Device,
    pub cache: EitherCache,
    pub max_seq_len: usize,
    mapper: Option<Box<dyn DeviceMapper + Send + Sync>>,
}

/// The `gemma3.*` metadata this model reads.
struct Props {
    head_count: usize,
    head_count_kv: usize,
    block_count: usize,
    embedding_length: usize,
    rms_norm_eps: f32,
    max_seq_len: usize,
    rope_freq_base: f64,
    rope_freq_base_swa: f64,
    rope_linear_factor: Option<f64>,
    head_dim: usize,
    sliding_window: usize,
    sliding: Vec<bool>,
    final_logit_softcapping: Option<f64>,
}

impl TryFrom<ContentMetadata<'_>> for Props {
    type Error = anyhow::Error;

    fn try_from(c: ContentMetadata) -> std::result::Result<Self, Self::Error> {
        c.has_required_keys(&[
            "attention.head_count",
            "attention.head_count_kv",
            "block_count",
            "embedding_length",
            "attention.layer_norm_rms_epsilon",
            "attention.sliding_window",
        ])?;
        let block_count = c.get_value::<u32>("block_count")? as usize;
        let embedding_length = c.get_value::<u32>("embedding_length")? as usize;
        let head_count = c.get_value::<u32>("attention.head_count")? as usize;
        let head_dim = c
            .get_option_value::<u32>("attention.key_length")?
            .map(|d| d as usize)
            .unwrap_or(embedding_length / head_count);
        let value_length = c
            .get_option_value::<u32>("attention.value_length")?
            .map(|d| d as usize)
            .unwrap_or(head_dim);
        if value_length != head_dim {
            anyhow::bail!("gemma3: key_length {head_dim} and value_length {value_length} differ");
        }
        // Newer files state which layers slide; llama.cpp runs the others with
        // every sixth layer global.
        let sliding = match c.get_option_value::<Vec<bool>>("attention.sliding_window_pattern") {
            Ok(Some(layers)) if layers.len() == block_count => layers,
            Ok(Some(layers)) => anyhow::bail!(
                "gemma3.attention.sliding_window_pattern has {} entries for {block_count} layers",
                layers.len()
            ),
            _ => {
                let period = c
                    .get_option_value::<u32>("attention.sliding_window_pattern")
                    .ok()
                    .flatten()
                    .unwrap_or(6) as usize;
                (0..block_count).map(|i| (i + 1) % period.max(1) != 0).collect()
            }
        };
        let rope_linear_factor = match c.get_option_value::<String>("rope.scaling.type")?.as_deref() {
            None | Some("none") => None,
            Some("linear") => Some(c.get_value::<f32>("rope.scaling.factor")? as f64),
            Some(other) => anyhow::bail!("gemma3: RoPE scaling `{other}` is not supported (linear is)"),
        };
        Ok(Self {
            head_count,
            head_count_kv: c.get_value::<u32>("attention.head_count_kv")? as usize,
            block_count,
            embedding_length,
            rms_norm_eps: c.get_value("attention.layer_norm_rms_epsilon")?,
            max_seq_len: c
                .get_option_value::<u32>("context_length")?
                .map(|n| n as usize)
                .unwrap_or(DEFAULT_MAX_SEQ_LEN),
            rope_freq_base: c.get_option_value::<f32>("rope.freq_base")?.unwrap_or(1_000_000.0) as f64,
            rope_freq_base_swa: c.get_option_value::<f32>("rope.freq_base_swa")?.unwrap_or(10_000.0) as f64,
            rope_linear_factor,
            head_dim,
            sliding_window: c.get_value::<u32>("attention.sliding_window")? as usize,
            sliding,
            final_logit_softcapping: c.get_option_value::<f32>("final_logit_softcapping")?.map(f64::from),
        })
    }
}

impl ModelConfig::FromGGUF for ModelWeights {
    fn from_gguf<R: std::io::Seek + std::io::Read>(
        mut ct: Content<'_, R>,
        device: &Device,
        mapper: Box<dyn DeviceMapper + Send + Sync>,
        attention_mechanism: AttentionImplementation,
        dtype: DType,
    ) -> Result<Self> {
        if !matches!(attention_mechanism, AttentionImplementation::Eager) {
            candle_core::bail!("gemma3 from GGUF runs with eager attention only (no PagedAttention)");
        }
        let meta = ct.get_metadata();
        let metadata = ContentMetadata {
            path_prefix: "gemma3",
            metadata: meta,
        };
        let p = Props::try_from(metadata).or_else(|err| candle_core::bail!("{err}"))?;
        // llama.cpp scales queries by 1/sqrt(head_dim), except in the
        // 62-layer (27B) model: 1/sqrt(hidden / heads).
        let query_pre_attn_scalar = if p.block_count == 62 {
            p.embedding_length / p.head_count
        } else {
            p.head_dim
        };

        let embeddings = Embeddings::new(ct.tensor("token_embd.weight", device)?, p.embedding_length)?;
        let output = if ct.has_tensor("output.weight") {
            ct.tensor("output.weight", device)?
        } else {
            ct.tensor("token_embd.weight", device)?
        };
        let norm = QRmsNorm::new(ct.tensor("output_norm.weight", device)?, p.rms_norm_eps)?;

        // The global layers' RoPE, through the same type the Hugging Face
        // Gemma 3 model uses (linear position scaling for the larger models).
        let rope_config: Gemma3TextConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": p.embedding_length,
            "intermediate_size": 0,
            "num_hidden_layers": p.block_count,
            "head_dim": p.head_dim,
            "rope_theta": p.rope_freq_base,
            "sliding_window": p.sliding_window,
            "attn_logit_softcapping": null,
            "final_logit_softcapping": null,
            "max_position_embeddings": p.max_seq_len,
            "quantization_config": null,
            "rope_scaling": p.rope_linear_factor.map(|f| serde_json::json!({"factor": f, "rope_type": "linear"})),
        }))
        .map_err(candle_core::Error::msg)?;

        let mut layers = Vec::with_capacity(p.block_count);
        for i in NiceProgressBar::<_, 'b'>(0..p.block_count, "Loading repeating layers", &new_multi_progress()) {
            let prefix = format!("blk.{i}");
            let device = mapper.device_for(i, false).unwrap_or(device);
            let mut tensor = |name: &str| ct.tensor(&format!("{prefix}.{name}.weight"), device);
            let norm = |t: QTensor| QRmsNorm::new(t, p.rms_norm_eps);
            let sliding_window = p.sliding[i].then_some(p.sliding_window);
            let rope = if sliding_window.is_some() {
                Rope::Local(Arc::new(RotaryEmbedding::new(
                    p.rope_freq_base_swa as f32,
                    p.head_dim,
                    p.max_seq_len,
                    device,
                    true,
                    DType::F32,
                )?))
            } else {
                Rope::Global(Arc::new(Gemma3RotaryEmbedding::new(true, DType::F32, &rope_config, device)?))
            };
            layers.push(LayerWeights {
                wq: qlinear(tensor("attn_q")?)?,
                wk: qlinear(tensor("attn_k")?)?,
                wv: qlinear(tensor("attn_v")?)?,
                wo: qlinear(tensor("attn_output")?)?,
                attn_norm: norm(tensor("attn_norm")?)?,
                q_norm: norm(tensor("attn_q_norm")?)?,
                k_norm: norm(tensor("attn_k_norm")?)?,
                post_attn_norm: norm(tensor("post_attention_norm")?)?,
                ffn_norm: norm(tensor("ffn_norm")?)?,
                post_ffn_norm: norm(tensor("post_ffw_norm")?)?,
                mlp: Mlp {
                    gate: qlinear(tensor("ffn_gate")?)?,
                    up: qlinear(tensor("ffn_up")?)?,
                    down: qlinear(tensor("ffn_down")?)?,
                },
                n_head: p.head_count,
                n_kv_head: p.head_count_kv,
                head_dim: p.head_dim,
                sliding_window,
                rope,
                sdpa_params: SdpaParams {
                    n_kv_groups: p.head_count / p.head_count_kv,
                    softcap: None,
                    softmax_scale: 1.0 / (query_pre_attn_scalar as f32).sqrt(),
                    sliding_window,
                    sinks: None,
                },
            });
        }
        let _ = dtype; // activations stay f32 on the CPU; GGUF weights keep their types
        Ok(Self {
            embeddings,
            layers,
            norm,
            output: qlinear(output)?,
            final_logit_softcapping: p.final_logit_softcapping,
            device: device.clone(),
            cache: EitherCache::Normal(NormalCache::new(p.block_count, p.max_seq_len)),
            max_seq_len: p.max_seq_len,
            mapper: Some(mapper),
        })
    }
}

impl ModelWeights {
    /// Decode steps may batch sequences of different lengths: full KV caches
    /// and `Sdpa` on the CPU (see `Pipeline::supports_ragged_decode`).
    pub fn supports_ragged_decode(&self) -> bool {
        self.device.is_cpu()
    }

    pub fn forward(
        &self,
        x: &Tensor,
        start_offsets: &[usize],
        context_lens: Vec<(usize, usize)>,
        metadata: Option<(Vec<(Tensor, Tensor)>, &PagedAttentionInputMetadata)>,
    ) -> Result<Tensor> {
        if metadata.is_some() {
            candle_core::bail!("gemma3 from GGUF runs with eager attention only (no PagedAttention)");
        }
        let mut xs = self.embeddings.forward(x)?;
        let mut normal = self.cache.normal();
        let kv_pads = normal.1.clone();
        let cache = &mut normal.0;
        let past: &dyn PastKvLenCache = cache;
        let global_mask = CausalMasker.make_causal_mask_matrix(x, past, DType::F32, self.layers[0].n_head)?;
        let window = self.layers.iter().find_map(|l| l.sliding_window);
        let sliding_mask = CausalMasker.make_sliding_window_causal_mask_matrix(
            x,
            past,
            window,
            DType::F32,
            self.layers[0].n_head,
        )?;
        let masks = match &self.mapper {
            Some(mapper) => (
                DeviceMappedMask::new(global_mask, &**mapper)?,
                DeviceMappedMask::new(sliding_mask, &**mapper)?,
            ),
            None => (DeviceMappedMask::from_single(global_mask), DeviceMappedMask::from_single(sliding_mask)),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(mapper) = &self.mapper {
                xs = mapper.map(xs, i)?;
            }
            let mask = if layer.sliding_window.is_some() { &masks.1 } else { &masks.0 };
            let residual = &xs;
            let h = layer.attn_norm.forward(&xs)?;
            let h = layer.attention(&h, mask.as_ref().map(|m| m.get(xs.device())), start_offsets, &mut cache[i], &kv_pads)?;
            let h = layer.post_attn_norm.forward(&h)?;
            let xs_attn = (h + residual)?;
            let h = layer.ffn_norm.forward(&xs_attn)?;
            let h = layer.mlp.forward(&h)?;
            let h = layer.post_ffn_norm.forward(&h)?;
            xs = (h + xs_attn)?;
        }
        let xs = self.norm.forward(&xs)?;
        let xs = extract_logits(&xs, context_lens)?;
        let logits = MatMul.qmethod_matmul(&xs.contiguous()?, &*self.output)?;
        match self.final_logit_softcapping {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }
}
