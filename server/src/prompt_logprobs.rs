//! The log-probabilities of a prompt's own tokens, for `/v1/completions` with
//! `echo` and `logprobs`: what lm-evaluation-harness and other harnesses score
//! multiple-choice answers with (`max_tokens` 0 or 1, summing the
//! continuation's entries). As vLLM gives them: one entry per prompt token,
//! the first `null` (nothing precedes it), each with the `logprobs` most
//! likely tokens at its position plus the token itself.
//!
//! The engine runs the prompt through one prefill that returns the logits of
//! every position instead of sampling (`LoadedModel::prompt_logits`); the
//! log-softmax and the top tokens are computed here.

use std::collections::{BTreeMap, HashMap};

use crate::engine::{LoadedModel, Prompt};
use crate::error::ApiError;
use crate::protocol::CompletionLogprobs;

/// The most a prompt's logits may take (positions x vocabulary x 4 bytes):
/// they are held whole while the log-probabilities are computed. 1 GiB is
/// about 5,400 positions of SmolLM2's vocabulary or 1,700 of Qwen2.5's.
pub const MAX_LOGITS_BYTES: u64 = 1 << 30;

/// Refuses a prompt whose logits would pass [`MAX_LOGITS_BYTES`].
pub fn check_size(prompt_tokens: u64, vocab: Option<usize>, param: &str) -> Result<(), ApiError> {
    let Some(vocab) = vocab else { return Ok(()) };
    let bytes = prompt_tokens * vocab as u64 * 4;
    if bytes > MAX_LOGITS_BYTES {
        let most = MAX_LOGITS_BYTES / (vocab as u64 * 4);
        return Err(ApiError::invalid_param(
            param,
            format!(
                "`echo` with `logprobs` scores at most {most} prompt tokens with this model's vocabulary of {vocab}; this {param} has {prompt_tokens}."
            ),
        ));
    }
    Ok(())
}

/// One position's numbers, before the token ids are turned into text.
#[derive(Debug, Clone, PartialEq)]
struct Scored {
    /// `ln p(token)`, `None` for the first token.
    logprob: Option<f32>,
    /// `(id, ln p)` of the `top` most likely tokens, most likely first.
    top: Vec<(u32, f32)>,
}

/// The prompt's entries, in the legacy completions layout, text offsets
/// counted in characters from 0.
pub async fn of_prompt(model: &LoadedModel, prompt: &Prompt, top: usize) -> Result<CompletionLogprobs, ApiError> {
    let (ids, logits) = model.prompt_logits(prompt).await?;
    let vocab = logits.dim(1).map_err(|e| ApiError::internal(format!("prompt logits: {e}")))?;
    let values: Vec<f32> = logits
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .map_err(|e| ApiError::internal(format!("prompt logits: {e}")))?;
    let scored = {
        let ids = ids.clone();
        tokio::task::spawn_blocking(move || score(&ids, &values, vocab, top))
            .await
            .map_err(|e| ApiError::internal(format!("scoring the prompt failed: {e}")))?
    };
    let texts = token_texts(model, &ids, &scored).await?;
    Ok(layout(&ids, &scored, &texts))
}

/// Per position `i`, the log-probability of `ids[i]` under row `i - 1` of
/// `logits` (row-major, `vocab` wide) and the `top` best tokens of that row.
fn score(ids: &[u32], logits: &[f32], vocab: usize, top: usize) -> Vec<Scored> {
    let mut out = Vec::with_capacity(ids.len());
    out.push(Scored { logprob: None, top: Vec::new() });
    for (i, &id) in ids.iter().enumerate().skip(1) {
        let row = &logits[(i - 1) * vocab..i * vocab];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let lse = max as f64 + sum.ln();
        let ln_p = |t: usize| (row[t] as f64 - lse) as f32;
        let mut best: Vec<usize> = (0..vocab).collect();
        if top > 0 && top < vocab {
            best.select_nth_unstable_by(top - 1, |&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        }
        best.truncate(top.min(vocab));
        best.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        out.push(Scored {
            logprob: Some(ln_p(id as usize)),
            top: best.into_iter().map(|t| (t as u32, ln_p(t))).collect(),
        });
    }
    out
}

/// The text of every token id that appears, each decoded on its own: with
/// the model's tokenizer where the server holds it, else by the engine.
async fn token_texts(model: &LoadedModel, ids: &[u32], scored: &[Scored]) -> Result<HashMap<u32, String>, ApiError> {
    let mut wanted: Vec<u32> = ids.iter().copied().chain(scored.iter().flat_map(|s| s.top.iter().map(|&(t, _)| t))).collect();
    wanted.sort_unstable();
    wanted.dedup();
    if let Some(tokenizer) = model.tokenizer.clone() {
        return tokio::task::spawn_blocking(move || {
            wanted
                .into_iter()
                .map(|id| {
                    tokenizer
                        .decode(&[id], false)
                        .map(|text| (id, text))
                        .map_err(|e| ApiError::internal(format!("token {id}: {e}")))
                })
                .collect()
        })
        .await
        .map_err(|e| ApiError::internal(format!("decoding the prompt's tokens failed: {e}")))?;
    }
    let texts = futures::future::try_join_all(wanted.iter().map(|&id| async move {
        model.detokenize(vec![id], false).await.map_err(|e| match e {
            crate::engine::TokenizerError::Refused(why) => ApiError::internal(format!("token {id}: {why}")),
            crate::engine::TokenizerError::Api(e) => e,
        })
    }))
    .await?;
    Ok(wanted.into_iter().zip(texts).collect())
}

fn layout(ids: &[u32], scored: &[Scored], texts: &HashMap<u32, String>) -> CompletionLogprobs {
    let text = |id: &u32| texts.get(id).cloned().unwrap_or_default();
    let mut out = CompletionLogprobs::default();
    let mut at = 0;
    for (id, s) in ids.iter().zip(scored) {
        let token = text(id);
        out.text_offset.push(at);
        at += token.chars().count();
        out.token_logprobs.push(s.logprob);
        out.top_logprobs.push(s.logprob.map(|logprob| {
            let mut top: BTreeMap<String, f32> = BTreeMap::new();
            for (t, l) in s.top.iter().map(|(t, l)| (text(t), *l)).chain([(token.clone(), logprob)]) {
                // Two ids with the same text keep the likelier.
                let slot = top.entry(t).or_insert(l);
                *slot = slot.max(l);
            }
            top
        }));
        out.tokens.push(token);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_log_softmax_of_the_previous_row() {
        // Vocabulary of 3; row 0 predicts token 1, row 1 token 2.
        let logits = [0.0f32, 1.0, 2.0, 3.0, 0.0, 0.0, 9.0, 9.0, 9.0];
        let s = score(&[0, 1, 2], &logits, 3, 2);
        assert_eq!(s[0], Scored { logprob: None, top: vec![] });
        let lse0 = (1f64 + 1f64.exp() + 2f64.exp()).ln();
        assert!((s[1].logprob.unwrap() as f64 - (1.0 - lse0)).abs() < 1e-6);
        assert_eq!(s[1].top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
        let lse1 = (3f64.exp() + 2.0).ln();
        assert!((s[2].logprob.unwrap() as f64 - (0.0 - lse1)).abs() < 1e-6);
        assert_eq!(s[2].top[0].0, 0);
        // Probabilities of one row sum to 1.
        let total: f64 = (0..3).map(|t| ((logits[t] as f64) - lse0).exp()).sum();
        assert!((total - 1.0).abs() < 1e-9);
    }

    #[test]
    fn top_zero_keeps_only_the_token_itself() {
        let s = score(&[0, 1], &[0.0, 5.0, 0.0, 0.0], 2, 0);
        assert!(s[1].top.is_empty());
        let texts = HashMap::from([(0, "a".to_string()), (1, " b".to_string())]);
        let l = layout(&[0, 1], &s, &texts);
        assert_eq!(l.tokens, vec!["a", " b"]);
        assert_eq!(l.text_offset, vec![0, 1]);
        assert_eq!(l.token_logprobs[0], None);
        assert!(l.top_logprobs[0].is_none());
        let top = l.top_logprobs[1].as_ref().unwrap();
        assert_eq!(top.keys().collect::<Vec<_>>(), vec![" b"]);
    }

    #[test]
    fn oversized_prompts_are_refused_naming_the_param() {
        check_size(100, Some(49_152), "prompt").unwrap();
        let err = check_size(10_000, Some(151_936), "prompt[2]").unwrap_err();
        assert_eq!(err.body().error.param.as_deref(), Some("prompt[2]"));
        check_size(1_000_000, None, "prompt").unwrap();
    }
}
