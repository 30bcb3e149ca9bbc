//! Conversations to training tokens: render with the model's own chat template
//! (tokenizer_config.json, Jinja via minijinja with Hugging Face's settings),
//! tokenize, and mark the tokens the model learns: every assistant turn, from
//! its first content token through its end-of-turn token.
//!
//! The assistant spans are found by rendering prefixes of the conversation:
//! the turn starts where `render(messages[..i], add_generation_prompt)` ends
//! and stops at the last non-space character of `render(messages[..=i])`
//! (so `<|im_end|>` or `<end_of_turn>` is learned, the newline after it is
//! not). A template whose renders are not prefixes of each other is refused.

use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{io, Result, TrainError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// Token ids of one rendered conversation, and which of them are learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub learn: Vec<bool>,
}

impl Encoded {
    /// Learned tokens that are targets (the first token predicts nothing before it).
    pub fn learned_count(&self) -> usize {
        self.learn.iter().skip(1).filter(|&&l| l).count()
    }
}

/// The tokenizer and chat template of a Hugging Face folder.
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    template: String,
    bos_token: String,
    eos_token: String,
}

#[derive(Deserialize)]
struct TokenizerConfig {
    chat_template: Option<serde_json::Value>,
    bos_token: Option<serde_json::Value>,
    eos_token: Option<serde_json::Value>,
}

/// `"<s>"` or `{"content": "<s>", ...}` (both appear in tokenizer_config.json files).
fn token_string(value: &Option<serde_json::Value>) -> Option<String> {
    match value {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(map)) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl ChatTokenizer {
    /// Reads tokenizer.json and tokenizer_config.json (or chat_template.jinja) from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| TrainError::File {
            path: tokenizer_path.clone(),
            message: format!("cannot load the tokenizer: {e}"),
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
        let config: TokenizerConfig =
            serde_json::from_str(&text).map_err(|e| TrainError::File {
                path: config_path.clone(),
                message: format!("not a tokenizer config: {e}"),
            })?;
        let template = match &config.chat_template {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let template = match template {
            Some(t) => t,
            None => {
                let jinja = dir.join("chat_template.jinja");
                std::fs::read_to_string(&jinja).map_err(|_| TrainError::File {
                    path: config_path.clone(),
                    message: "no chat_template (and no chat_template.jinja next to it): \
                              add the model's chat template"
                        .into(),
                })?
            }
        };
        let eos_token = token_string(&config.eos_token).ok_or_else(|| TrainError::File {
            path: config_path.clone(),
            message: "no eos_token".into(),
        })?;
        let bos_token = token_string(&config.bos_token).unwrap_or_default();
        let chat = Self {
            tokenizer,
            template,
            bos_token,
            eos_token,
        };
        // Fail now, not on the first row, if the template does not compile.
        chat.render(&[Message::new("user", "hi")], true)?;
        Ok(chat)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Renders `messages` with the chat template, as transformers'
    /// `apply_chat_template(..., tokenize=False)` does.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template("chat", &self.template)
            .map_err(|e| TrainError::Template(format!("does not compile: {e:#}")))?;
        let template = env.get_template("chat").expect("added above");
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| TrainError::Template(format!("{e:#}")))
    }

    /// Byte ranges of the rendered conversation that are learned: each
    /// assistant turn's content and end-of-turn marker.
    pub fn assistant_spans(&self, messages: &[Message]) -> Result<(String, Vec<Range<usize>>)> {
        self.assistant_spans_from(messages, 0)
    }

    /// As `assistant_spans`, for the assistant turns at index `first` or later only.
    fn assistant_spans_from(
        &self,
        messages: &[Message],
        first: usize,
    ) -> Result<(String, Vec<Range<usize>>)> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, message) in messages.iter().enumerate().skip(first) {
            if message.role != "assistant" {
                continue;
            }
            let prefix = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&prefix) || !full.starts_with(&through) {
                return Err(TrainError::Template(format!(
                    "renders of the conversation up to message {i} are not prefixes of the whole \
                     render, so the assistant turn cannot be located; use a template that renders \
                     turns in order"
                )));
            }
            let end = through.trim_end().len();
            if end > prefix.len() {
                spans.push(prefix.len()..end);
            }
        }
        Ok((full, spans))
    }

    /// Tokens of a conversation and which are learned (see the module doc).
    pub fn encode(&self, messages: &[Message]) -> Result<Encoded> {
        self.encode_from(messages, 0)
    }

    /// Tokens of a conversation where only the assistant turns at index
    /// `first` or later are learned: a preference pair's response after a
    /// (possibly multi-turn) prompt whose own assistant turns are context.
    pub fn encode_from(&self, messages: &[Message], first: usize) -> Result<Encoded> {
        let (text, spans) = self.assistant_spans_from(messages, first)?;
        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
        let ids = encoding.get_ids().to_vec();
        let learn = encoding
            .get_offsets()
            .iter()
            .map(|&(start, _)| spans.iter().any(|s| s.contains(&start)))
            .collect();
        Ok(Encoded { ids, learn })
    }

    /// The text of the learned tokens, turn by turn (for checks and debugging).
    pub fn learned_text(&self, encoded: &Encoded) -> Result<Vec<String>> {
        let mut turns = Vec::new();
        let mut current: Vec<u32> = Vec::new();
        for (&id, &learn) in encoded.ids.iter().zip(&encoded.learn) {
            if learn {
                current.push(id);
            } else if !current.is_empty() {
                turns.push(std::mem::take(&mut current));
            }
        }
        if !current.is_empty() {
            turns.push(current);
        }
        turns
            .iter()
            .map(|ids| {
                self.tokenizer
                    .decode(ids, false)
                    .map_err(|e| TrainError::Tokenizer(e.to_string()))
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The imported real models (written by the import test / scripts/test.sh).
    pub(crate) fn imported(name: &str) -> PathBuf {
        let base = std::env::var_os("FUSECHAT_IMPORTED_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/fusechat/test-imported")
            });
        let dir = base.join(name);
        assert!(
            dir.join("tokenizer.json").is_file(),
            "{} is missing: run scripts/test.sh (its import test writes it)",
            dir.display()
        );
        dir
    }

    fn conversation() -> Vec<Message> {
        vec![
            Message::new("system", "Answer briefly."),
            Message::new("user", "What is 2+3?"),
            Message::new("assistant", "2 + 3 = 5. The answer is 5."),
            Message::new("user", "And 4*4?"),
            Message::new("assistant", "The answer is 16."),
        ]
    }

    #[test]
    fn smollm2_learns_exactly_the_assistant_turns_and_their_end_token() {
        let chat = ChatTokenizer::load(&imported("smollm2-135m-instruct")).unwrap();
        let encoded = chat.encode(&conversation()).unwrap();
        assert_eq!(
            chat.learned_text(&encoded).unwrap(),
            vec![
                "2 + 3 = 5. The answer is 5.<|im_end|>".to_string(),
                "The answer is 16.<|im_end|>".to_string()
            ]
        );
        let im_end = chat.tokenizer().token_to_id("<|im_end|>").unwrap();
        let learned_ends = encoded
            .ids
            .iter()
            .zip(&encoded.learn)
            .filter(|(&id, &l)| l && id == im_end)
            .count();
        assert_eq!(
            learned_ends, 2,
            "each assistant turn's <|im_end|> is learned"
        );
        // The ids are those of the plain render (what the server sees at inference).
        let text = chat.render(&conversation(), false).unwrap();
        let plain = chat.tokenizer().encode(text.as_str(), false).unwrap();
        assert_eq!(plain.get_ids(), encoded.ids.as_slice());
    }

    #[test]
    fn gemma_template_trims_content_and_learns_end_of_turn() {
        let chat = ChatTokenizer::load(&imported("gemma-3-270m")).unwrap();
        let messages = vec![
            Message::new("user", "Hi there"),
            Message::new("assistant", "  Hello! How can I help?\n"),
        ];
        let encoded = chat.encode(&messages).unwrap();
        assert_eq!(
            chat.learned_text(&encoded).unwrap(),
            vec!["Hello! How can I help?<end_of_turn>".to_string()]
        );
        assert_eq!(
            encoded.ids[0],
            chat.tokenizer().token_to_id("<bos>").unwrap()
        );
        assert!(!encoded.learn[0]);
    }

    #[test]
    fn qwen_learns_assistant_turns() {
        let chat = ChatTokenizer::load(&imported("qwen2.5-coder-0.5b-instruct")).unwrap();
        let encoded = chat.encode(&conversation()[1..3]).unwrap();
        assert_eq!(
            chat.learned_text(&encoded).unwrap(),
            vec!["2 + 3 = 5. The answer is 5.<|im_end|>".to_string()]
        );
    }

    #[test]
    fn a_multi_turn_prompt_is_context_only() {
        let chat = ChatTokenizer::load(&imported("smollm2-135m-instruct")).unwrap();
        let encoded = chat.encode_from(&conversation(), 3).unwrap();
        assert_eq!(
            chat.learned_text(&encoded).unwrap(),
            vec!["The answer is 16.<|im_end|>".to_string()]
        );
    }

    #[test]
    fn conversation_without_assistant_learns_nothing() {
        let chat = ChatTokenizer::load(&imported("smollm2-135m-instruct")).unwrap();
        let encoded = chat.encode(&[Message::new("user", "hello")]).unwrap();
        assert_eq!(encoded.learned_count(), 0);
    }
}
