//! Gemma 3 text decoder (transformers' `modeling_gemma3.py`, `Gemma3ForCausalLM`):
//! embeddings scaled by sqrt(hidden), RMSNorm with `(1 + w)`, four norms per block
//! (input, post-attention, pre- and post-feed-forward), per-head q/k RMSNorm before RoPE,
//! attention scale `query_pre_attn_scalar^-0.5`, sliding-window local layers with their own
//! RoPE base (`rope_local_base_freq`) and global layers with `rope_theta` (+ `rope_scaling`),
//! GeLU-tanh gated MLP, optional attention / final logit soft-capping.

use candle_core::Tensor;

use super::config::{ModelConfig, RopeScaling};
use super::layers::{
    inv_freq, output_logits, Mlp, Result, RmsNorm, RopeTables, SelfAttention, Sequences,
};
use super::recompute::{self, Checkpointing};
use super::Weights;

#[derive(Clone)]
struct Block {
    input_norm: RmsNorm,
    attn: SelfAttention,
    post_attn_norm: RmsNorm,
    pre_ff_norm: RmsNorm,
    mlp: Mlp,
    post_ff_norm: RmsNorm,
    sliding: bool,
}

/// The RoPE tables a block uses (local or global) and its attention window.
#[derive(Clone)]
struct BlockRope {
    q: RopeTables,
    k: RopeTables,
    window: Option<usize>,
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        seqs: &Sequences,
        rope: &BlockRope,
        fused: bool,
    ) -> Result<Tensor> {
        let h = self.input_norm.forward(x, fused)?;
        let h = self
            .attn
            .forward(&h, seqs, &rope.q, &rope.k, rope.window, fused)?;
        let h = self.post_attn_norm.forward(&h, fused)?;
        let x = (x + h)?;
        let h = self.pre_ff_norm.forward(&x, fused)?;
        let h = self.mlp.forward(&h, fused)?;
        let h = self.post_ff_norm.forward(&h, fused)?;
        x + h
    }
}

#[derive(Clone)]
pub(crate) struct Gemma3 {
    embed: Tensor,
    embed_scale: f64,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    inv_freq_global: Vec<f32>,
    inv_freq_local: Vec<f32>,
    scale: f64,
    window: usize,
    final_softcap: Option<f64>,
}

impl Gemma3 {
    pub fn new(config: &ModelConfig, w: &Weights) -> super::Result<Self> {
        let eps = config.rms_norm_eps;
        let norm = |name: &str| -> super::Result<RmsNorm> {
            Ok(RmsNorm {
                weight: w.get(name)?,
                eps,
                plus_one: true,
            })
        };
        let bias = config.qkv_bias();
        let linear = |module: &str, bias: bool| w.linear(module, bias);
        let act = config.activation().map_err(|m| w.config_error(m))?;
        let sliding = config.sliding_layers();
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for (i, &sliding) in sliding.iter().enumerate() {
            let p = format!("model.layers.{i}");
            blocks.push(Block {
                input_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                attn: SelfAttention {
                    q: linear(&format!("{p}.self_attn.q_proj"), bias)?,
                    k: linear(&format!("{p}.self_attn.k_proj"), bias)?,
                    v: linear(&format!("{p}.self_attn.v_proj"), bias)?,
                    o: linear(&format!("{p}.self_attn.o_proj"), bias)?,
                    q_norm: Some(norm(&format!("{p}.self_attn.q_norm.weight"))?),
                    k_norm: Some(norm(&format!("{p}.self_attn.k_norm.weight"))?),
                    heads: config.num_attention_heads,
                    kv_heads: config.num_kv_heads(),
                    head_dim: config.head_dim(),
                    softcap: config.attn_logit_softcapping,
                },
                post_attn_norm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                pre_ff_norm: norm(&format!("{p}.pre_feedforward_layernorm.weight"))?,
                mlp: Mlp {
                    gate: linear(&format!("{p}.mlp.gate_proj"), false)?,
                    up: linear(&format!("{p}.mlp.up_proj"), false)?,
                    down: linear(&format!("{p}.mlp.down_proj"), false)?,
                    act,
                },
                post_ff_norm: norm(&format!("{p}.post_feedforward_layernorm.weight"))?,
                sliding,
            });
        }
        let embed = w.get("model.embed_tokens.weight")?;
        let lm_head = if config.tied_embeddings() {
            embed.clone()
        } else {
            w.get("lm_head.weight")?
        };
        let (theta, scaling) = config.rope_global().map_err(|m| w.config_error(m))?;
        let head_dim = config.head_dim();
        // transformers multiplies by `hidden_size**0.5` cast to the weight dtype.
        let root = (config.hidden_size as f64).sqrt();
        let embed_scale = match embed.dtype() {
            candle_core::DType::F64 => root,
            candle_core::DType::BF16 => half::bf16::from_f64(root).to_f64(),
            _ => root as f32 as f64,
        };
        Ok(Self {
            embed,
            embed_scale,
            blocks,
            norm: norm("model.norm.weight")?,
            lm_head,
            inv_freq_global: inv_freq(head_dim, theta, scaling),
            inv_freq_local: inv_freq(head_dim, config.rope_local_theta(), RopeScaling::None),
            scale: config.attention_scale(),
            window: config.sliding_window_len(),
            final_softcap: config.final_logit_softcapping,
        })
    }

    /// `ids` u32, laid out as `seqs` says -> logits `(b, s, vocab)`, or `(rows, vocab)`
    /// when `rows` picks positions of the flattened `(b * s)`; each block checkpointed
    /// when `checkpointing` is given.
    pub fn forward(
        &self,
        ids: &Tensor,
        seqs: &Sequences,
        fused: bool,
        rows: Option<&Tensor>,
        checkpointing: Option<&Checkpointing>,
    ) -> Result<Tensor> {
        let (b, s) = seqs.dims();
        let positions = seqs.positions();
        let (dtype, device) = (self.embed.dtype(), self.embed.device());
        let tables = |inv_freq: &[f32], window| -> Result<BlockRope> {
            Ok(BlockRope {
                q: RopeTables::new(inv_freq, &positions, self.scale, dtype, device)?,
                k: RopeTables::new(inv_freq, &positions, 1.0, dtype, device)?,
                window,
            })
        };
        let global = tables(&self.inv_freq_global, None)?;
        let local = tables(&self.inv_freq_local, Some(self.window))?;
        let mut x = (self.embed.index_select(&ids.flatten_all()?, 0)? * self.embed_scale)?;
        for block in &self.blocks {
            let rope = if block.sliding { &local } else { &global }.clone();
            let (block, seqs) = (block.clone(), seqs.clone());
            x = recompute::block(checkpointing, &x, move |x| {
                block.forward(x, &seqs, &rope, fused)
            })?;
        }
        let (norm, head, cap) = (&self.norm, &self.lm_head, self.final_softcap);
        output_logits(x, rows, (b, s), norm, head, cap, fused)
    }
}
