//! The OpenAI wire format: request and response bodies exactly as OpenAI's
//! clients send and expect them. Nothing here knows about the engine; the
//! `validation` module turns these requests into engine work.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// Model id or alias, as listed by `GET /v1/models`.
    pub model: String,
    /// The conversation so far. At least one message.
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub sampling: SamplingRequest,
    /// Older name of `max_completion_tokens`.
    pub max_tokens: Option<u64>,
    /// Upper bound on generated tokens per choice.
    pub max_completion_tokens: Option<u64>,
    /// Return log-probabilities of the generated tokens.
    pub logprobs: Option<bool>,
    /// How many alternatives per position to return with `logprobs` (0-20).
    pub top_logprobs: Option<u32>,
    /// `{"type":"text"}`, `{"type":"json_object"}` or `{"type":"json_schema","json_schema":{...}}`.
    pub response_format: Option<ResponseFormat>,
    /// Stream the answer as server-sent events.
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Functions the model may call. Needs a model whose chat template
    /// renders tools (Qwen2.5 here); others answer 400 naming `tools`.
    pub tools: Option<Vec<ToolDefinition>>,
    /// `none`, `auto` (the default with tools), `required` (at least one
    /// call), or `{"type":"function","function":{"name":...}}` (that one).
    /// `required` and a named function constrain decoding to a valid call.
    pub tool_choice: Option<ToolChoiceInput>,
    /// With `required`: allow more than one call in the answer (default true).
    pub parallel_tool_calls: Option<bool>,
    /// Free-form end-user id; accepted and ignored.
    pub user: Option<String>,
    /// Every other field: refused (400 naming it) unless it is one of
    /// [`IGNORED_FIELDS`].
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: Other,
}

/// `tools[i]`: a function the model may call.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolDefinition {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDefinition,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionDefinition {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema of the arguments object.
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<serde_json::Value>,
    /// Accepted: `required` and named calls are always decoded to the schema.
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ToolChoiceInput {
    /// `none`, `auto` or `required`.
    Mode(String),
    Named(NamedToolChoice),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedToolChoice {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionName,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionName {
    pub name: String,
}

/// A call the model made, or (in an assistant message sent back) one it
/// made before.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema, PartialEq)]
pub struct ToolCall {
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON string.
    pub arguments: String,
}

/// A call in a streamed chunk: sent whole, in one delta.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCallDelta {
    /// Position of the call in the answer's `tool_calls`.
    pub index: u32,
    #[serde(flatten)]
    pub call: ToolCall,
}

/// Request fields that change nothing about an answer and are accepted and
/// ignored, as the README's parameter table lists them. Any other field the
/// server does not implement is a 400 naming it: a client must not believe
/// it asked for something it did not get.
pub const IGNORED_FIELDS: &[&str] = &["metadata", "store", "service_tier"];

/// The fields of a request body that its type does not name.
pub type Other = std::collections::BTreeMap<String, serde_json::Value>;

/// The first field of `other` that asks for something this server does not
/// do: not one of [`IGNORED_FIELDS`], and not empty (`null`, `{}` or `[]`
/// asks for nothing, as clients that send every field do).
pub fn unsupported_field(other: &Other) -> Option<&str> {
    other
        .iter()
        .find(|(k, v)| {
            let empty = match v {
                serde_json::Value::Null => true,
                serde_json::Value::Object(m) => m.is_empty(),
                serde_json::Value::Array(a) => a.is_empty(),
                _ => false,
            };
            !empty && !IGNORED_FIELDS.contains(&k.as_str())
        })
        .map(|(k, _)| k.as_str())
}

/// `POST /v1/completions` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub model: String,
    /// What to continue: a string, a list of strings, a list of token ids,
    /// or a list of token-id lists. Each prompt gets `n` choices, indexed
    /// `prompt_index * n + choice`.
    pub prompt: PromptInput,
    #[serde(flatten)]
    pub sampling: SamplingRequest,
    pub max_tokens: Option<u64>,
    /// Return log-probabilities; the number is how many alternatives per position (0-5).
    pub logprobs: Option<u32>,
    /// Prepend the prompt to the completion text.
    pub echo: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: Other,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct SamplingRequest {
    /// Number of choices to generate.
    pub n: Option<u32>,
    /// 0 means greedy decoding. 0 to 2.
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens; 0 or -1 disables.
    pub top_k: Option<i64>,
    /// Drop tokens whose probability is below `min_p` times the top one, in [0, 1].
    pub min_p: Option<f64>,
    /// Multiplicative penalty on tokens already present, > 0 (1 disables).
    pub repetition_penalty: Option<f32>,
    /// -2 to 2.
    pub presence_penalty: Option<f32>,
    /// -2 to 2.
    pub frequency_penalty: Option<f32>,
    /// Up to 4 sequences where generation stops; they are not part of the returned text.
    pub stop: Option<StopSequences>,
    /// Same seed, same parameters and same prompt: same output.
    pub seed: Option<i64>,
    /// Token id (as a string) to a number from -100 to 100 added to its logit
    /// before a token is chosen (-100 bans it, 100 all but forces it).
    #[schema(value_type = Option<Object>)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f32>>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopSequences {
    One(String),
    Many(Vec<String>),
}

impl StopSequences {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSequences::One(s) => vec![s],
            StopSequences::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` and no choices.
    #[serde(default)]
    pub include_usage: bool,
}

/// One turn. Fields other than these are refused, naming the message.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// A string, a list of `{"type":"text","text":...}` parts, or null (assistant turns only).
    pub content: Option<MessageContent>,
    pub name: Option<String>,
    /// Assistant turns: the calls the model made.
    pub tool_calls: Option<Vec<ToolCall>>,
    /// Tool turns: the call this is the result of.
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// A part of a message's content. Parts other than `text` (images, audio)
/// are refused by their `type`, whatever else they carry.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    /// Accepted; the model is not shown it.
    pub description: Option<String>,
    #[schema(value_type = Object)]
    pub schema: Option<serde_json::Value>,
    pub strict: Option<bool>,
}

/// `POST /tokenize` body, as vLLM takes it: a `prompt`, or `messages`
/// rendered with the model's chat template.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    /// The model whose tokenizer to use; may be left out when the server
    /// serves one model.
    pub model: Option<String>,
    /// Text to tokenize (give this or `messages`).
    pub prompt: Option<String>,
    /// A conversation to render and tokenize (give this or `prompt`).
    pub messages: Option<Vec<ChatMessage>>,
    /// `messages` only: open the assistant's turn at the end (default true).
    pub add_generation_prompt: Option<bool>,
    /// Add the tokenizer's special tokens (BOS): default true for `prompt`,
    /// false for `messages` (the template writes them).
    pub add_special_tokens: Option<bool>,
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: Other,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenizeResponse {
    pub count: usize,
    /// The model's context length in tokens.
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
}

/// `POST /detokenize` body, as vLLM takes it.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    /// As for `/tokenize`.
    pub model: Option<String>,
    pub tokens: Vec<u32>,
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: Other,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// `GET /tokenizer_info?model=ID`.
#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TokenizerInfoQuery {
    /// The model; may be left out when the server serves one.
    pub model: Option<String>,
}

// ---------------------------------------------------------------- responses

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    /// Always `chat.completion`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// Identifies the weights that produced the answer.
    pub system_fingerprint: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    /// `stop` or `length`.
    pub finish_reason: String,
    pub logprobs: Option<ChoiceLogprobs>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// The text; null when the answer is tool calls alone.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChunkChoice>,
    /// Only on the last chunk, and only with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: ChunkDelta,
    pub finish_reason: Option<String>,
    pub logprobs: Option<ChoiceLogprobs>,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChunkDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChoiceLogprobs {
    pub content: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, ToSchema, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    pub fn add(&mut self, other: Usage) {
        // The prompt is shared by every choice: count it once.
        self.prompt_tokens = self.prompt_tokens.max(other.prompt_tokens);
        self.completion_tokens += other.completion_tokens;
        self.total_tokens = self.prompt_tokens + self.completion_tokens;
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    /// Always `text_completion`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub finish_reason: Option<String>,
    pub logprobs: Option<CompletionLogprobs>,
}

/// The legacy completions log-probability layout. With `echo` the prompt's
/// tokens come first; the prompt's first token has `null` entries (nothing
/// precedes it).
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    #[schema(value_type = Vec<Object>)]
    pub top_logprobs: Vec<Option<std::collections::BTreeMap<String, f32>>>,
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// `self` followed by `more`, whose text offsets start at `offset`.
    pub fn extended(mut self, more: CompletionLogprobs, offset: usize) -> CompletionLogprobs {
        self.tokens.extend(more.tokens);
        self.token_logprobs.extend(more.token_logprobs);
        self.top_logprobs.extend(more.top_logprobs);
        self.text_offset.extend(more.text_offset.into_iter().map(|o| o + offset));
        self
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    pub created: u64,
    pub owned_by: String,
    /// `ready`, `loading` or `failed`.
    pub status: String,
    /// Context length in tokens, once loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<usize>,
    /// For an alias: the model id it points at now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias_of: Option<String>,
    /// Once loaded: how the weights are held (load path, tensor types, bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<crate::holding::Holding>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HealthStatus {
    pub status: String,
    /// Per model: `ready`, `loading` or `failed: <why>`.
    #[schema(value_type = Object)]
    pub models: std::collections::BTreeMap<String, String>,
}
