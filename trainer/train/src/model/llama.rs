//! Llama and Qwen2 decoders (transformers' `modeling_llama.py` / `modeling_qwen2.py`):
//! RMSNorm pre-norm blocks, grouped-query attention with rotate-half RoPE, SiLU-gated MLP.
//! Qwen2 is llama with biases on q/k/v (and its own RoPE base, read from the config).

use candle_core::Tensor;

use super::config::ModelConfig;
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
    mlp: Mlp,
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        seqs: &Sequences,
        rope_q: &RopeTables,
        rope_k: &RopeTables,
        fused: bool,
    ) -> Result<Tensor> {
        let h = self.input_norm.forward(x, fused)?;
        let h = self.attn.forward(&h, seqs, rope_q, rope_k, None, fused)?;
        let x = (x + h)?;
        let h = self.post_attn_norm.forward(&x, fused)?;
        &x + self.mlp.forward(&h, fused)?
    }
}

/// A llama-family causal LM whose weights are (clones of) the trainable variables.
#[derive(Clone)]
pub(crate) struct Llama {
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Tensor,
    inv_freq: Vec<f32>,
    scale: f64,
}

impl Llama {
    pub fn new(config: &ModelConfig, w: &Weights) -> super::Result<Self> {
        let eps = config.rms_norm_eps;
        let norm = |name: &str| -> super::Result<RmsNorm> {
            Ok(RmsNorm {
                weight: w.get(name)?,
                eps,
                plus_one: false,
            })
        };
        let linear = |module: &str, bias: bool| w.linear(module, bias);
        let act = config.activation().map_err(|m| w.config_error(m))?;
        let (qkv_bias, o_bias, mlp_bias) = (config.qkv_bias(), config.o_bias(), config.mlp_bias());
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            blocks.push(Block {
                input_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                attn: SelfAttention {
                    q: linear(&format!("{p}.self_attn.q_proj"), qkv_bias)?,
                    k: linear(&format!("{p}.self_attn.k_proj"), qkv_bias)?,
                    v: linear(&format!("{p}.self_attn.v_proj"), qkv_bias)?,
                    o: linear(&format!("{p}.self_attn.o_proj"), o_bias)?,
                    q_norm: None,
                    k_norm: None,
                    heads: config.num_attention_heads,
                    kv_heads: config.num_kv_heads(),
                    head_dim: config.head_dim(),
                    softcap: None,
                },
                post_attn_norm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate: linear(&format!("{p}.mlp.gate_proj"), mlp_bias)?,
                    up: linear(&format!("{p}.mlp.up_proj"), mlp_bias)?,
                    down: linear(&format!("{p}.mlp.down_proj"), mlp_bias)?,
                    act,
                },
            });
        }
        let embed = w.get("model.embed_tokens.weight")?;
        let lm_head = if config.tied_embeddings() {
            embed.clone()
        } else {
            w.get("lm_head.weight")?
        };
        let (theta, scaling) = config.rope_global().map_err(|m| w.config_error(m))?;
        Ok(Self {
            embed,
            blocks,
            norm: norm("model.norm.weight")?,
            lm_head,
            inv_freq: inv_freq(config.head_dim(), theta, scaling),
            scale: config.attention_scale(),
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
        let rope_q = RopeTables::new(&self.inv_freq, &positions, self.scale, dtype, device)?;
        let rope_k = RopeTables::new(&self.inv_freq, &positions, 1.0, dtype, device)?;
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?; // (b*s, hidden)
        for block in &self.blocks {
            let (block, seqs) = (block.clone(), seqs.clone());
            let (rope_q, rope_k) = (rope_q.clone(), rope_k.clone());
            x = recompute::block(checkpointing, &x, move |x| {
                block.forward(x, &seqs, &rope_q, &rope_k, fused)
            })?;
        }
        output_logits(x, rows, (b, s), &self.norm, &self.lm_head, None, fused)
    }
}
