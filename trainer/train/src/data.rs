//! Training files in, tokenized examples out.
//!
//! SFT: JSONL, one `{"messages":[{"role","content"},...]}` per line (TRL's
//! conversational format). DPO: JSONL `{"prompt", "chosen", "rejected"}` where
//! each is a list of messages or a plain string (TRL's preference format).
//! Every bad line (not JSON, no assistant turn, chosen equal to rejected,
//! longer than the limit) is reported with its line number and either
//! skipped (counted) or refused, as `OnBadInput` says.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::chat::{ChatTokenizer, Encoded, Message};
use crate::error::{io, Result, TrainError};

/// What to do with a bad line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnBadInput {
    /// Report it, count it, go on.
    #[default]
    Skip,
    /// Stop before training starts.
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub line: usize,
    pub reason: String,
}

/// The usable examples of a file, what was skipped, and the file's hash.
#[derive(Debug)]
pub struct Dataset<T> {
    pub path: PathBuf,
    pub sha256: String,
    pub examples: Vec<T>,
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Clone)]
pub struct SftExample {
    pub line: usize,
    pub tokens: Encoded,
}

#[derive(Debug, Clone)]
pub struct DpoExample {
    pub line: usize,
    pub chosen: Encoded,
    pub rejected: Encoded,
}

#[derive(Deserialize)]
struct SftLine {
    messages: Vec<Message>,
}

/// A list of messages, or a bare string standing for one message of `role`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Turns {
    Text(String),
    Messages(Vec<Message>),
}

impl Turns {
    fn into_messages(self, role: &str) -> Vec<Message> {
        match self {
            Turns::Text(text) => vec![Message::new(role, &text)],
            Turns::Messages(messages) => messages,
        }
    }
}

#[derive(Deserialize)]
struct DpoLine {
    prompt: Turns,
    chosen: Turns,
    rejected: Turns,
}

/// Reads `path` line by line, turning each non-blank line into an example or a skip.
fn read_lines<T>(
    path: &Path,
    on_bad: OnBadInput,
    mut parse: impl FnMut(usize, &str) -> std::result::Result<T, String>,
) -> Result<Dataset<T>> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let text = String::from_utf8(bytes).map_err(|e| TrainError::File {
        path: path.into(),
        message: format!("not UTF-8: {e}"),
    })?;
    let mut examples = Vec::new();
    let mut skipped = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        match parse(number, line) {
            Ok(example) => examples.push(example),
            Err(reason) => {
                if on_bad == OnBadInput::Fail {
                    return Err(TrainError::Line {
                        path: path.into(),
                        line: number,
                        message: format!("{reason} (pass --on-bad-input skip to skip such lines)"),
                    });
                }
                tracing::warn!("{} line {number}: {reason}; skipped", path.display());
                skipped.push(Skipped {
                    line: number,
                    reason,
                });
            }
        }
    }
    if examples.is_empty() {
        let why = if skipped.is_empty() {
            "holds no examples".to_string()
        } else {
            format!(
                "holds no usable example ({} lines skipped; first: line {}: {})",
                skipped.len(),
                skipped[0].line,
                skipped[0].reason
            )
        };
        return Err(TrainError::File {
            path: path.into(),
            message: why,
        });
    }
    Ok(Dataset {
        path: path.into(),
        sha256,
        examples,
        skipped,
    })
}

fn check_length(tokens: &Encoded, max_len: usize, what: &str) -> std::result::Result<(), String> {
    if tokens.ids.len() > max_len {
        Err(format!(
            "{what} is {} tokens, longer than the limit {max_len} (raise --max-len or shorten it)",
            tokens.ids.len()
        ))
    } else {
        Ok(())
    }
}

/// Loads an SFT file.
pub fn load_sft(
    path: &Path,
    chat: &ChatTokenizer,
    max_len: usize,
    on_bad: OnBadInput,
) -> Result<Dataset<SftExample>> {
    read_lines(path, on_bad, |line, text| {
        let row: SftLine = serde_json::from_str(text)
            .map_err(|e| format!("not a {{\"messages\": [...]}} JSON object: {e}"))?;
        if !row.messages.iter().any(|m| m.role == "assistant") {
            return Err("the conversation has no assistant turn to learn".into());
        }
        let tokens = chat.encode(&row.messages).map_err(|e| e.to_string())?;
        if tokens.learned_count() == 0 {
            return Err("the assistant turns are empty".into());
        }
        check_length(&tokens, max_len, "the conversation")?;
        Ok(SftExample { line, tokens })
    })
}

/// Loads a DPO file.
pub fn load_dpo(
    path: &Path,
    chat: &ChatTokenizer,
    max_len: usize,
    on_bad: OnBadInput,
) -> Result<Dataset<DpoExample>> {
    read_lines(path, on_bad, |line, text| {
        let row: DpoLine = serde_json::from_str(text).map_err(|e| {
            format!("not a {{\"prompt\", \"chosen\", \"rejected\"}} JSON object: {e}")
        })?;
        let prompt = row.prompt.into_messages("user");
        let chosen = row.chosen.into_messages("assistant");
        let rejected = row.rejected.into_messages("assistant");
        if prompt.is_empty() {
            return Err("empty prompt".into());
        }
        for (name, turns) in [("chosen", &chosen), ("rejected", &rejected)] {
            if turns.last().map(|m| m.role.as_str()) != Some("assistant") {
                return Err(format!("{name} does not end with an assistant message"));
            }
        }
        if chosen == rejected {
            return Err("chosen equals rejected: the pair teaches nothing".into());
        }
        let encode = |response: Vec<Message>, name: &str| {
            let mut messages = prompt.clone();
            messages.extend(response);
            // Assistant turns inside the prompt are context, not learned.
            let tokens = chat
                .encode_from(&messages, prompt.len())
                .map_err(|e| e.to_string())?;
            if tokens.learned_count() == 0 {
                return Err(format!("{name} is empty"));
            }
            check_length(&tokens, max_len, name)?;
            Ok(tokens)
        };
        let chosen = encode(chosen, "prompt + chosen")?;
        let rejected = encode(rejected, "prompt + rejected")?;
        if chosen.ids == rejected.ids {
            return Err(
                "chosen and rejected render to the same tokens: the pair teaches nothing".into(),
            );
        }
        Ok(DpoExample {
            line,
            chosen,
            rejected,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::tests::imported;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    fn chat() -> ChatTokenizer {
        ChatTokenizer::load(&imported("smollm2-135m-instruct")).unwrap()
    }

    #[test]
    fn sft_bad_lines_are_reported_with_their_numbers_and_skipped() {
        let file = write(concat!(
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#,
            "\n",
            "this is not json\n",
            "\n",
            r#"{"messages":[{"role":"user","content":"no answer"}]}"#,
            "\n",
            r#"{"messages":[{"role":"user","content":"long"},{"role":"assistant","content":"word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word word"}]}"#,
            "\n",
        ));
        let data = load_sft(file.path(), &chat(), 64, OnBadInput::Skip).unwrap();
        assert_eq!(data.examples.len(), 1);
        assert_eq!(data.examples[0].line, 1);
        let lines: Vec<usize> = data.skipped.iter().map(|s| s.line).collect();
        assert_eq!(lines, vec![2, 4, 5]);
        assert!(
            data.skipped[0].reason.contains("JSON"),
            "{:?}",
            data.skipped
        );
        assert!(data.skipped[1].reason.contains("no assistant turn"));
        assert!(data.skipped[2].reason.contains("longer than the limit 64"));

        let err = load_sft(file.path(), &chat(), 64, OnBadInput::Fail).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn empty_file_is_an_error() {
        let file = write("\n\n");
        let err = load_sft(file.path(), &chat(), 512, OnBadInput::Skip).unwrap_err();
        assert!(err.to_string().contains("holds no examples"), "{err}");
    }

    #[test]
    fn dpo_accepts_strings_and_lists_and_refuses_equal_pairs() {
        let file = write(concat!(
            r#"{"prompt":"2+2?","chosen":"4","rejected":"5"}"#,
            "\n",
            r#"{"prompt":[{"role":"user","content":"2+2?"}],"chosen":[{"role":"assistant","content":"4"}],"rejected":[{"role":"assistant","content":"4"}]}"#,
            "\n",
            r#"{"prompt":[{"role":"user","content":"2+2?"}],"chosen":[{"role":"assistant","content":"Four."}],"rejected":[{"role":"assistant","content":"Five."}],"metadata":{"source":"x"}}"#,
            "\n",
        ));
        let chat = chat();
        let data = load_dpo(file.path(), &chat, 256, OnBadInput::Skip).unwrap();
        assert_eq!(data.examples.len(), 2);
        assert_eq!(data.skipped.len(), 1);
        assert_eq!(data.skipped[0].line, 2);
        assert!(data.skipped[0].reason.contains("chosen equals rejected"));
        let pair = &data.examples[1];
        // A multi-turn prompt: only the response is learned.
        let multi = write(concat!(
            r#"{"prompt":[{"role":"user","content":"1+1?"},{"role":"assistant","content":"2"},{"role":"user","content":"2+2?"}],"chosen":"4","rejected":"5"}"#,
            "\n",
        ));
        let data_multi = load_dpo(multi.path(), &chat, 256, OnBadInput::Fail).unwrap();
        assert_eq!(
            chat.learned_text(&data_multi.examples[0].chosen).unwrap(),
            vec!["4<|im_end|>"]
        );
        assert_eq!(
            chat.learned_text(&pair.chosen).unwrap(),
            vec!["Four.<|im_end|>"]
        );
        assert_eq!(
            chat.learned_text(&pair.rejected).unwrap(),
            vec!["Five.<|im_end|>"]
        );
    }
}
