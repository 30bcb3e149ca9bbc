//! Time of `prompt_attention` for one layer of a causal prompt, in the
//! shapes of the served models.
//!
//! Usage: cargo run --release -p fusechat-kernels --example attention_speed [-- PROMPT_TOKENS]

use std::time::Instant;

use fusechat_kernels::attention::{prompt_attention, Heads, PromptAttention};

fn main() {
    let tokens: usize = std::env::args().nth(1).map_or(1914, |s| s.parse().expect("a token count"));
    // (name, layers, heads, kv heads, head dim)
    for (name, layers, heads, kv_heads, d) in
        [("smollm2-135m", 30, 9, 3, 64), ("gemma-3-270m", 18, 4, 1, 256), ("qwen2.5-0.5b", 24, 14, 2, 64)]
    {
        let p = PromptAttention {
            batch: 1,
            queries: tokens,
            keys: tokens,
            heads,
            kv_heads,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            softcap: None,
        };
        let fill = |n: usize| (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect::<Vec<f32>>();
        let q = fill(tokens * heads * d);
        let k = fill(tokens * kv_heads * d);
        let v = fill(tokens * kv_heads * d);
        let mut mask = vec![0f32; tokens * tokens];
        for i in 0..tokens {
            mask[i * tokens + i + 1..(i + 1) * tokens].fill(f32::NEG_INFINITY);
        }
        let mut out = vec![0f32; heads * tokens * d];
        let run = |out: &mut [f32]| {
            prompt_attention(
                &p,
                Heads { data: &q, batch: 0, position: heads * d, head: d },
                Heads { data: &k, batch: 0, position: kv_heads * d, head: d },
                Heads { data: &v, batch: 0, position: kv_heads * d, head: d },
                |_, _, i| Some(&mask[i * tokens..(i + 1) * tokens]),
                out,
            )
        };
        run(&mut out);
        let t = Instant::now();
        let reps = 3;
        for _ in 0..reps {
            run(&mut out);
        }
        let layer = t.elapsed().as_secs_f64() / reps as f64;
        // Two products of head_dim per visible (query, key) pair, per head.
        let flops = 2.0 * 2.0 * (tokens * (tokens + 1) / 2) as f64 * (heads * d) as f64;
        println!(
            "{name}: {tokens} tokens, {:.1} ms a layer, {:.2} s for {layers} layers, {:.1} GFLOP/s",
            layer * 1e3,
            layer * layers as f64,
            flops / layer / 1e9
        );
    }
}
