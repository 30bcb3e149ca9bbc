//! `tokenizer.json` built from the GGUF tokenizer metadata (`tokenizer.ggml.*`).
//!
//! Two kinds of GGUF vocabulary are handled, by `tokenizer.ggml.model`:
//!
//! * `gpt2`: byte-level BPE. The vocabulary and the merges are in the file as they were in the
//!   original `tokenizer.json`; what the file only names is the pre-tokenizer
//!   (`tokenizer.ggml.pre`), which is rebuilt from a short table of the ones llama.cpp knows.
//! * `llama`: SentencePiece BPE with scores and no merges. It becomes an HF BPE model with byte
//!   fallback whose merges are derived from the vocabulary: every split of a normal piece into two
//!   pieces that are themselves in the vocabulary is a merge, ranked by the score of the piece it
//!   makes (highest first). SentencePiece's BPE, and llama.cpp's, merge the adjacent pair whose
//!   concatenation is the best-scoring piece, so ranking merges that way gives the same result.
//!
//! Tokens marked control, unknown or user-defined (`token_type` 3, 2, 4) become added tokens
//! matched in the raw text before the model runs, as llama.cpp matches them: control and
//! unknown ones as special tokens, user-defined ones (`<tool_call>`, Gemma's runs of spaces and
//! newlines) as plain ones. Unused (5) and byte (6) tokens stay in the vocabulary only.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::config::SpecialTokenIds;
use super::error::ImportError;
use super::gguf::GgufFile;

pub const TOKEN_NORMAL: i64 = 1;
pub const TOKEN_UNKNOWN: i64 = 2;
pub const TOKEN_CONTROL: i64 = 3;
pub const TOKEN_USER_DEFINED: i64 = 4;
pub const TOKEN_BYTE: i64 = 6;

/// SentencePiece's word-boundary marker.
const SPIECE_SPACE: &str = "\u{2581}";

/// The pre-tokenizers of byte-level vocabularies that the import can rebuild, by their
/// `tokenizer.ggml.pre` name.
pub const SUPPORTED_PRE_TOKENIZERS: &[&str] =
    &["smollm", "starcoder", "gpt-2", "qwen2", "llama-bpe", "llama3", "llama-v3"];

/// Qwen2's split pattern (its `tokenizer.json`, and llama.cpp's `qwen2` pre-tokenizer).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's split pattern: as Qwen2's, but numbers in groups of up to three digits.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer metadata of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: "gpt2" or "llama".
    pub model: String,
    /// `tokenizer.ggml.pre`, when present.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// One per token; all normal when the file has no `tokenizer.ggml.token_type`.
    pub token_types: Vec<i64>,
    pub scores: Option<Vec<f32>>,
    pub merges: Option<Vec<String>>,
    pub ids: SpecialTokenIds,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
}

impl GgufVocab {
    pub fn read(gguf: &GgufFile) -> Result<Self, ImportError> {
        let model = gguf.str("tokenizer.ggml.model")?.to_string();
        let tokens = gguf.str_array("tokenizer.ggml.tokens")?;
        let token_types = match gguf.opt_i64_array("tokenizer.ggml.token_type")? {
            Some(t) if t.len() == tokens.len() => t,
            Some(t) => {
                return Err(ImportError::metadata(
                    "tokenizer.ggml.token_type",
                    format!("{} entries for {} tokens", t.len(), tokens.len()),
                ))
            }
            None => vec![TOKEN_NORMAL; tokens.len()],
        };
        let scores = gguf.opt_f32_array("tokenizer.ggml.scores")?;
        if let Some(s) = &scores {
            if s.len() != tokens.len() {
                return Err(ImportError::metadata(
                    "tokenizer.ggml.scores",
                    format!("{} entries for {} tokens", s.len(), tokens.len()),
                ));
            }
        }
        let ids = SpecialTokenIds::read(gguf)?;
        for (key, id) in [
            ("bos_token_id", ids.bos),
            ("eos_token_id", ids.eos),
            ("padding_token_id", ids.pad),
            ("unknown_token_id", ids.unk),
        ] {
            if let Some(id) = id {
                if id as usize >= tokens.len() {
                    return Err(ImportError::metadata(
                        &format!("tokenizer.ggml.{key}"),
                        format!("{id}, past the {} tokens", tokens.len()),
                    ));
                }
            }
        }
        // llama.cpp's defaults: SentencePiece vocabularies get a BOS and a leading space,
        // byte-level ones neither.
        let spm = model == "llama";
        Ok(GgufVocab {
            pre: gguf.opt_str("tokenizer.ggml.pre")?.map(str::to_string),
            tokens,
            token_types,
            scores,
            merges: gguf.opt_str_array("tokenizer.ggml.merges")?,
            ids,
            add_bos: gguf.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(spm),
            add_eos: gguf.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
            add_space_prefix: gguf
                .opt_bool("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(spm),
            model,
        })
    }

    pub fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i as usize)).map(String::as_str)
    }

    pub fn id_of(&self, token: &str) -> Option<u32> {
        self.tokens.iter().position(|t| t == token).map(|i| i as u32)
    }

    /// Builds the `tokenizer.json` document.
    pub fn tokenizer_json(&self) -> Result<Value, ImportError> {
        let vocab = self.vocab_map()?;
        let (normalizer, pre_tokenizer, decoder, model) = match self.model.as_str() {
            "gpt2" => self.byte_level_parts(&vocab)?,
            "llama" => self.sentencepiece_parts(&vocab)?,
            other => {
                return Err(ImportError::Tokenizer(format!(
                    "tokenizer model `{other}` (tokenizer.ggml.model) is not supported; \
                     supported: gpt2 (byte-level BPE), llama (SentencePiece BPE)"
                )))
            }
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": self.added_tokens(),
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": self.post_processor()?,
            "decoder": decoder,
            "model": model,
        }))
    }

    fn vocab_map(&self) -> Result<HashMap<&str, u32>, ImportError> {
        let mut vocab = HashMap::with_capacity(self.tokens.len());
        for (id, token) in self.tokens.iter().enumerate() {
            if let Some(first) = vocab.insert(token.as_str(), id as u32) {
                return Err(ImportError::Tokenizer(format!(
                    "token {token:?} appears twice (ids {first} and {id}); a Hugging Face \
                     vocabulary cannot hold both"
                )));
            }
        }
        Ok(vocab)
    }

    fn vocab_json(&self) -> Value {
        let map: serde_json::Map<String, Value> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), json!(id)))
            .collect();
        Value::Object(map)
    }

    /// Control, unknown and user-defined tokens, matched whole in the raw text.
    fn added_tokens(&self) -> Vec<Value> {
        self.tokens
            .iter()
            .zip(&self.token_types)
            .enumerate()
            .filter(|(_, (_, ty))| {
                matches!(**ty, TOKEN_CONTROL | TOKEN_UNKNOWN | TOKEN_USER_DEFINED)
            })
            .map(|(id, (content, ty))| {
                json!({
                    "id": id,
                    "content": content,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": *ty != TOKEN_USER_DEFINED,
                })
            })
            .collect()
    }

    fn byte_level_parts(
        &self,
        vocab: &HashMap<&str, u32>,
    ) -> Result<(Value, Value, Value, Value), ImportError> {
        let merges = self.merges.as_ref().ok_or_else(|| {
            ImportError::Tokenizer("a gpt2 vocabulary needs tokenizer.ggml.merges".into())
        })?;
        let merges: Vec<Value> = merges
            .iter()
            .map(|m| {
                let (a, b) = m.split_once(' ').ok_or_else(|| {
                    ImportError::Tokenizer(format!("merge {m:?} is not two tokens"))
                })?;
                if !vocab.contains_key(a) || !vocab.contains_key(b) {
                    return Err(ImportError::Tokenizer(format!(
                        "merge {m:?} uses a token not in the vocabulary"
                    )));
                }
                Ok(json!([a, b]))
            })
            .collect::<Result<_, _>>()?;

        let pre = self.pre.as_deref().unwrap_or("default");
        let byte_level = |use_regex: bool| {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
        };
        let split = |pattern: &str| {
            json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
        };
        let (normalizer, pre_tokenizer, ignore_merges) = match pre {
            // GPT-2's regex, with every digit split off first (llama.cpp: "\p{N}" then GPT-2).
            "smollm" | "starcoder" => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    byte_level(true),
                ]}),
                false,
            ),
            "gpt-2" => (Value::Null, byte_level(true), false),
            "qwen2" => (
                json!({"type": "NFC"}),
                json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
                false,
            ),
            "llama-bpe" | "llama3" | "llama-v3" => (
                Value::Null,
                json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
                true,
            ),
            other => {
                return Err(ImportError::Tokenizer(format!(
                    "byte-level pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported; \
                     supported: {}",
                    SUPPORTED_PRE_TOKENIZERS.join(", ")
                )))
            }
        };
        let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
        let model = json!({
            "type": "BPE",
            "dropout": null,
            "unk_token": self.token(self.ids.unk),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": ignore_merges,
            "vocab": self.vocab_json(),
            "merges": merges,
        });
        Ok((normalizer, pre_tokenizer, decoder, model))
    }

    fn sentencepiece_parts(
        &self,
        vocab: &HashMap<&str, u32>,
    ) -> Result<(Value, Value, Value, Value), ImportError> {
        let scores = self.scores.as_ref().ok_or_else(|| {
            ImportError::Tokenizer("a llama (SentencePiece) vocabulary needs tokenizer.ggml.scores".into())
        })?;
        let merges: Vec<Value> = derive_merges(&self.tokens, &self.token_types, scores, vocab)
            .into_iter()
            .map(|(a, b)| json!([a, b]))
            .collect();

        let replace_spaces = json!({"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_SPACE});
        let normalizer = if self.add_space_prefix {
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": SPIECE_SPACE},
                replace_spaces,
            ]})
        } else {
            replace_spaces
        };
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": SPIECE_SPACE}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if self.add_space_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let byte_fallback = self
            .token_types
            .iter()
            .any(|t| *t == TOKEN_BYTE);
        let model = json!({
            "type": "BPE",
            "dropout": null,
            "unk_token": self.token(self.ids.unk),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": byte_fallback,
            "ignore_merges": false,
            "vocab": self.vocab_json(),
            "merges": merges,
        });
        let decoder = json!({"type": "Sequence", "decoders": decoders});
        Ok((normalizer, Value::Null, decoder, model))
    }

    /// BOS/EOS added around every encoded text, as `add_bos_token` / `add_eos_token` say.
    fn post_processor(&self) -> Result<Value, ImportError> {
        let bos = if self.add_bos {
            Some(self.token(self.ids.bos).ok_or_else(|| {
                ImportError::Tokenizer("add_bos_token is set but there is no bos_token_id".into())
            })?)
        } else {
            None
        };
        let eos = if self.add_eos {
            Some(self.token(self.ids.eos).ok_or_else(|| {
                ImportError::Tokenizer("add_eos_token is set but there is no eos_token_id".into())
            })?)
        } else {
            None
        };
        if bos.is_none() && eos.is_none() {
            return Ok(if self.model == "gpt2" {
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false})
            } else {
                Value::Null
            });
        }
        let special = |tok: &str, type_id: u32| json!({"SpecialToken": {"id": tok, "type_id": type_id}});
        let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut special_tokens = serde_json::Map::new();
        for (tok, id) in [(bos, self.ids.bos), (eos, self.ids.eos)] {
            if let (Some(tok), Some(id)) = (tok, id) {
                special_tokens.insert(tok.into(), json!({"id": tok, "ids": [id], "tokens": [tok]}));
            }
        }
        for (part, type_id) in [("A", 0), ("B", 1)] {
            let target = if part == "A" { &mut single } else { &mut pair };
            if let Some(b) = bos {
                target.push(special(b, type_id));
            }
            target.push(seq(part, type_id));
            if let Some(e) = eos {
                target.push(special(e, type_id));
            }
        }
        let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
        Ok(json!({
            "type": "TemplateProcessing",
            "single": single,
            "pair": pair,
            "special_tokens": special_tokens,
        }))
    }
}

/// Merges for an HF BPE model equivalent to a SentencePiece BPE vocabulary: every split of a
/// normal piece into two vocabulary pieces, best-scoring result first (ties: lower id first).
pub fn derive_merges(
    tokens: &[String],
    token_types: &[i64],
    scores: &[f32],
    vocab: &HashMap<&str, u32>,
) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if token_types[id] != TOKEN_NORMAL {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                ranked.push((scores[id], id as u32, l, r));
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    ranked
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;
    use tokenizers::Tokenizer;

    fn spm_vocab() -> GgufVocab {
        // A tiny SentencePiece BPE vocabulary, ids in the order of decreasing score.
        let pieces: Vec<(&str, i64, f32)> = vec![
            ("<pad>", TOKEN_CONTROL, -1000.0),
            ("<eos>", TOKEN_CONTROL, -1000.0),
            ("<bos>", TOKEN_CONTROL, -1000.0),
            ("<unk>", TOKEN_UNKNOWN, -1000.0),
            ("\n", TOKEN_USER_DEFINED, -1000.0),
            ("  ", TOKEN_USER_DEFINED, -1000.0),
            ("<0x21>", TOKEN_BYTE, 0.0),
            ("<0xC3>", TOKEN_BYTE, 0.0),
            ("<0xA9>", TOKEN_BYTE, 0.0),
            ("▁t", TOKEN_NORMAL, 0.0),
            ("he", TOKEN_NORMAL, -1.0),
            ("▁the", TOKEN_NORMAL, -2.0),
            ("er", TOKEN_NORMAL, -3.0),
            ("▁", TOKEN_NORMAL, -4.0),
            ("t", TOKEN_NORMAL, -5.0),
            ("h", TOKEN_NORMAL, -6.0),
            ("e", TOKEN_NORMAL, -7.0),
            ("r", TOKEN_NORMAL, -8.0),
            ("▁th", TOKEN_NORMAL, -9.0),
        ];
        GgufVocab {
            model: "llama".into(),
            pre: Some("default".into()),
            tokens: pieces.iter().map(|p| p.0.to_string()).collect(),
            token_types: pieces.iter().map(|p| p.1).collect(),
            scores: Some(pieces.iter().map(|p| p.2).collect()),
            merges: None,
            ids: SpecialTokenIds {
                bos: Some(2),
                eos: Some(1),
                pad: Some(0),
                unk: Some(3),
            },
            add_bos: true,
            add_eos: false,
            add_space_prefix: false,
        }
    }

    fn load(v: &GgufVocab) -> Tokenizer {
        let json = serde_json::to_string(&v.tokenizer_json().unwrap()).unwrap();
        Tokenizer::from_str(&json).unwrap()
    }

    fn ids(t: &Tokenizer, text: &str) -> Vec<u32> {
        t.encode(text, true).unwrap().get_ids().to_vec()
    }

    #[test]
    fn merges_rank_by_score_of_the_merged_piece() {
        let v = spm_vocab();
        let vocab = v.vocab_map().unwrap();
        let merges = derive_merges(&v.tokens, &v.token_types, v.scores.as_ref().unwrap(), &vocab);
        let pos = |a: &str, b: &str| merges.iter().position(|m| m.0 == a && m.1 == b);
        // "▁t" (score 0) outranks "he" (-1), which outranks "▁the" (-2).
        assert!(pos("▁", "t") < pos("h", "e"));
        assert!(pos("h", "e") < pos("▁t", "he"));
        // Both splits of "▁the" that exist in the vocabulary are merges.
        assert!(pos("▁th", "e").is_some());
        // Control, user-defined and byte pieces are never merge results.
        assert!(merges.iter().all(|(a, b)| format!("{a}{b}") != "  "));
    }

    #[test]
    fn sentencepiece_vocabulary_encodes_like_sentencepiece_bpe() {
        let t = load(&spm_vocab());
        // BOS added; spaces become ▁; "▁the" built through "▁t" + "he" (best scores first).
        assert_eq!(ids(&t, " the"), vec![2, 11]);
        // "ther": ▁ is not there (no prefix space); t,h,e,r -> "he" first, then "er" is blocked.
        assert_eq!(ids(&t, "ther"), vec![2, 14, 10, 17]);
        // User-defined runs of spaces and newlines are matched whole in the raw text.
        assert_eq!(ids(&t, "  the\n"), vec![2, 5, 14, 10, 4]);
        // Characters outside the vocabulary fall back to bytes: "é" is C3 A9.
        assert_eq!(ids(&t, "é!"), vec![2, 7, 8, 6]);
        // Control tokens in the text are special tokens.
        assert_eq!(ids(&t, "<eos>"), vec![2, 1]);
        assert_eq!(t.decode(&[11, 7, 8, 6], false).unwrap(), " theé!");
    }

    #[test]
    fn byte_level_vocabulary_uses_its_pre_tokenizer() {
        // "Ġ" is the byte-level spelling of a space.
        let tokens: Vec<String> = ["<|endoftext|>", "a", "b", "1", "2", "Ġ", "Ġa", "ab", "12"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let n = tokens.len();
        let mut token_types = vec![TOKEN_NORMAL; n];
        token_types[0] = TOKEN_CONTROL;
        let vocab = GgufVocab {
            model: "gpt2".into(),
            pre: Some("smollm".into()),
            tokens,
            token_types,
            scores: None,
            merges: Some(vec!["Ġ a".into(), "a b".into(), "1 2".into()]),
            ids: SpecialTokenIds {
                bos: Some(0),
                eos: Some(0),
                pad: None,
                unk: Some(0),
            },
            add_bos: false,
            add_eos: false,
            add_space_prefix: false,
        };
        let t = load(&vocab);
        // smollm splits every digit: "12" never merges.
        assert_eq!(ids(&t, "ab a12<|endoftext|>"), vec![7, 6, 3, 4, 0]);
        assert_eq!(t.decode(&[7, 6, 3, 4], false).unwrap(), "ab a12");

        let qwen = GgufVocab {
            pre: Some("qwen2".into()),
            ..vocab.clone()
        };
        // qwen2 also takes digits one at a time.
        assert_eq!(ids(&load(&qwen), "12"), vec![3, 4]);

        let unknown = GgufVocab {
            pre: Some("mystery".into()),
            ..vocab
        };
        let err = unknown.tokenizer_json().unwrap_err().to_string();
        assert!(err.contains("mystery") && err.contains("qwen2"), "{err}");
    }
}
