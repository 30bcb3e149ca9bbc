//! `tokenizer_config.json` (chat template, special tokens) and `generation_config.json`.
//!
//! The chat template is the GGUF's `tokenizer.chat_template` when it has one. A Gemma file
//! without one (the base Gemma 3 checkpoints) gets Gemma's turn format, so that the imported
//! model can still be served through a chat API.

use serde_json::{json, Value};

use super::config::Architecture;
use super::tokenizer::{GgufVocab, TOKEN_CONTROL};

/// Gemma's turn format: `<start_of_turn>user\n...<end_of_turn>\n`, the assistant's role called
/// `model`, a system message folded into the first user turn, and `<start_of_turn>model\n` to
/// prompt a reply. Message contents are trimmed, as in Gemma's own template. Content given as a
/// list of parts contributes its text parts.
pub const GEMMA_CHAT_TEMPLATE: &str = concat!(
    "{{ bos_token }}",
    "{%- set ns = namespace(prefix='') -%}",
    "{%- for message in messages -%}",
    "{%- set content = message['content'] if message['content'] is string else ",
    "(message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) -%}",
    "{%- if message['role'] == 'system' -%}",
    "{%- set ns.prefix = ns.prefix + (content | trim) + '\\n\\n' -%}",
    "{%- else -%}",
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}",
    "{{ '<start_of_turn>' + role + '\\n' + ns.prefix + (content | trim) + '<end_of_turn>\\n' }}",
    "{%- set ns.prefix = '' -%}",
    "{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}",
);

/// Where the chat template of the import came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatTemplateSource {
    /// `tokenizer.chat_template` of the GGUF file.
    Gguf,
    /// The file has none; Gemma's turn format was written.
    GemmaDefault,
    /// The file has none and the architecture has no known default: the folder has no template.
    None,
}

impl std::fmt::Display for ChatTemplateSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChatTemplateSource::Gguf => "from the GGUF file",
            ChatTemplateSource::GemmaDefault => "Gemma turn format (the GGUF file has none)",
            ChatTemplateSource::None => "none (the GGUF file has none)",
        })
    }
}

/// Picks the chat template for the import.
pub fn chat_template(
    arch: Architecture,
    from_gguf: Option<&str>,
) -> (Option<String>, ChatTemplateSource) {
    match (from_gguf, arch) {
        (Some(t), _) if !t.trim().is_empty() => (Some(t.to_string()), ChatTemplateSource::Gguf),
        (_, Architecture::Gemma3) => (
            Some(GEMMA_CHAT_TEMPLATE.to_string()),
            ChatTemplateSource::GemmaDefault,
        ),
        _ => (None, ChatTemplateSource::None),
    }
}

/// Markers that end a turn in the chat formats of the supported families.
const END_OF_TURN_MARKERS: &[&str] = &["<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"];

/// The ids generation should stop at: the file's EOS, its EOT when it names one, and the
/// control tokens among the known end-of-turn markers.
pub fn stop_token_ids(vocab: &GgufVocab, eot: Option<u32>) -> Vec<u32> {
    let mut ids: Vec<u32> = vocab.ids.eos.into_iter().chain(eot).collect();
    for marker in END_OF_TURN_MARKERS {
        if let Some(id) = vocab.id_of(marker) {
            if vocab.token_types[id as usize] == TOKEN_CONTROL && !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    ids.dedup();
    ids
}

/// `tokenizer_config.json`. The tokenizer class is the generic fast tokenizer so that
/// transformers uses `tokenizer.json` exactly as written.
pub fn tokenizer_config_json(
    vocab: &GgufVocab,
    chat_template: Option<&str>,
    model_max_length: usize,
) -> Value {
    let mut c = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": vocab.add_bos,
        "add_eos_token": vocab.add_eos,
        "bos_token": vocab.token(vocab.ids.bos),
        "eos_token": vocab.token(vocab.ids.eos),
        "pad_token": vocab.token(vocab.ids.pad),
        "unk_token": vocab.token(vocab.ids.unk),
        "clean_up_tokenization_spaces": false,
        "model_max_length": model_max_length,
    });
    if let Some(t) = chat_template {
        c["chat_template"] = json!(t);
    }
    c
}

/// `generation_config.json`: the token ids only, no sampling defaults.
pub fn generation_config_json(vocab: &GgufVocab, stop_ids: &[u32]) -> Value {
    let eos = match stop_ids {
        [one] => json!(one),
        many => json!(many),
    };
    json!({
        "bos_token_id": vocab.ids.bos,
        "eos_token_id": eos,
        "pad_token_id": vocab.ids.pad,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, messages: Value, add_generation_prompt: bool) -> String {
        let mut env = minijinja::Environment::new();
        env.add_template("t", template).unwrap();
        env.get_template("t")
            .unwrap()
            .render(minijinja::context! {
                messages => messages,
                bos_token => "<bos>",
                add_generation_prompt => add_generation_prompt,
            })
            .unwrap()
    }

    #[test]
    fn gemma_template_renders_turns() {
        let out = render(
            GEMMA_CHAT_TEMPLATE,
            json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there "},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]},
            ]),
            true,
        );
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n\
             <start_of_turn>model\nHello!<end_of_turn>\n\
             <start_of_turn>user\nCapital of France?<end_of_turn>\n\
             <start_of_turn>model\n"
        );
    }

    #[test]
    fn gemma_template_without_system_or_prompt() {
        let out = render(
            GEMMA_CHAT_TEMPLATE,
            json!([{"role": "user", "content": "Hi"}]),
            false,
        );
        assert_eq!(out, "<bos><start_of_turn>user\nHi<end_of_turn>\n");
    }

    #[test]
    fn template_choice() {
        assert_eq!(chat_template(Architecture::Llama, Some("{{x}}")).1, ChatTemplateSource::Gguf);
        assert_eq!(chat_template(Architecture::Gemma3, None).1, ChatTemplateSource::GemmaDefault);
        assert_eq!(chat_template(Architecture::Qwen2, None), (None, ChatTemplateSource::None));
    }
}
