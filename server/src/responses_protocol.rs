//! The wire format of OpenAI's Responses API (`POST /v1/responses`), as the
//! official SDKs and the Agents SDK send and read it. Stateless: nothing is
//! kept between requests, so a conversation travels whole in `input`.

use std::collections::BTreeMap;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::protocol::Other;

/// `POST /v1/responses` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ResponsesRequest {
    /// Model id or alias, as listed by `GET /v1/models`.
    pub model: String,
    /// A user message as a string, or a list of items: messages (`role`,
    /// `content`), earlier `function_call` items and their
    /// `function_call_output`s.
    #[schema(value_type = InputSchema)]
    pub input: ResponseInput,
    /// A system message put before `input`.
    pub instructions: Option<String>,
    /// Functions the model may call (`{"type":"function","name",...}`).
    pub tools: Option<Vec<ResponseTool>>,
    /// `none`, `auto`, `required`, or `{"type":"function","name":...}`.
    pub tool_choice: Option<ResponseToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", ...}}`.
    pub text: Option<TextConfig>,
    pub max_output_tokens: Option<u64>,
    /// 0 means greedy decoding. 0 to 2.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Stream the response as server-sent events (`response.created`,
    /// `response.output_text.delta`, ..., `response.completed`).
    pub stream: Option<bool>,
    /// Accepted; responses are never kept, so the answer says `store: false`.
    pub store: Option<bool>,
    /// Echoed in the response.
    pub metadata: Option<BTreeMap<String, String>>,
    /// Accepted and ignored.
    pub user: Option<String>,
    /// Only `disabled`: an input over the context is a 400, never cut.
    pub truncation: Option<String>,
    /// Refused: this server keeps no responses to continue from.
    pub previous_response_id: Option<String>,
    /// Every other field: refused (400 naming it) unless empty or ignorable.
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: Other,
}

/// `input`: a string (one user message) or a list of items.
#[derive(Debug, Clone)]
pub enum ResponseInput {
    Text(String),
    Items(Vec<InputItem>),
}

/// A user message as a string, or a list of input items.
// The schema only: requests are read through `ResponseInput`, whose errors
// name the item at fault.
#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
#[schema(as = ResponseInput)]
pub enum InputSchema {
    Text(String),
    Items(Vec<InputItem>),
}

impl<'de> Deserialize<'de> for ResponseInput {
    // By hand, not untagged: an untagged enum would hide which item is wrong
    // behind "did not match any variant".
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct InputVisitor;
        impl<'de> Visitor<'de> for InputVisitor {
            type Value = ResponseInput;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of input items")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ResponseInput::Text(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(LooseItem(item)) = seq.next_element()? {
                    items.push(item);
                }
                Ok(ResponseInput::Items(items))
            }
        }
        deserializer.deserialize_any(InputVisitor)
    }
}

/// One input item. A message may leave out `type` (the SDKs' "easy" form).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InputItem {
    Message(InputMessage),
    FunctionCall(FunctionCallItem),
    FunctionCallOutput(FunctionCallOutputItem),
}

impl InputItem {
    /// Reads an item, taking one without `type` as a message.
    fn from_value(mut value: serde_json::Value) -> Result<Self, serde_json::Error> {
        if let serde_json::Value::Object(map) = &mut value {
            map.entry("type").or_insert_with(|| "message".into());
        }
        serde_json::from_value(value)
    }
}

/// An item as `input` reads it: through [`InputItem::from_value`].
struct LooseItem(InputItem);

impl<'de> Deserialize<'de> for LooseItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        InputItem::from_value(value).map(LooseItem).map_err(de::Error::custom)
    }
}

/// A message item: `role` and `content` (a string or a list of parts).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InputMessage {
    /// `user`, `system`, `developer` or `assistant`.
    pub role: String,
    pub content: InputContent,
    /// Set on items a client sends back from an earlier response.
    pub id: Option<String>,
    pub status: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum InputContent {
    Text(String),
    Parts(Vec<InputPart>),
}

/// `input_text`, or `output_text` in an assistant message sent back; other
/// parts (images, files) are refused by their `type`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct InputPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    /// `annotations`, `logprobs` of an `output_text` sent back: only empty.
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: Other,
}

/// A call the model made in an earlier response, sent back.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionCallItem {
    pub call_id: String,
    pub name: String,
    /// The arguments as a JSON string.
    pub arguments: String,
    pub id: Option<String>,
    pub status: Option<String>,
}

/// The result of a call: `output` is a string (or text parts).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionCallOutputItem {
    pub call_id: String,
    pub output: InputContent,
    pub id: Option<String>,
    pub status: Option<String>,
}

/// `tools[i]`. Only `function` tools run here; hosted tools (`web_search`,
/// `file_search`, ...) are refused by their `type`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ResponseTool {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON schema of the arguments object.
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<serde_json::Value>,
    /// Accepted: `required` and named calls are always decoded to the schema.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum ResponseToolChoice {
    /// `none`, `auto` or `required`.
    Mode(String),
    Function(NamedFunction),
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedFunction {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    pub format: Option<TextFormat>,
    /// Accepted: `low`, `medium` or `high` change nothing for these models.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verbosity: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TextFormat {
    Text,
    JsonObject,
    /// The answer is JSON valid against `schema` (decoded under it).
    JsonSchema {
        name: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        #[schema(value_type = Object)]
        schema: Option<serde_json::Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        strict: Option<bool>,
    },
}

/// The response object, whole (the body without `stream`, and the
/// `response` of `response.created` / `.completed` / `.incomplete` / `.failed`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseObject {
    pub id: String,
    /// Always `response`.
    pub object: &'static str,
    pub created_at: u64,
    /// `in_progress`, `completed`, `incomplete` or `failed`.
    pub status: &'static str,
    pub error: Option<ResponseError>,
    pub incomplete_details: Option<IncompleteDetails>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u64>,
    pub model: String,
    pub output: Vec<OutputItem>,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    pub store: bool,
    pub temperature: Option<f64>,
    pub text: TextConfig,
    pub tool_choice: ResponseToolChoice,
    pub tools: Vec<ResponseTool>,
    pub top_p: Option<f64>,
    pub truncation: &'static str,
    pub usage: Option<ResponseUsage>,
    pub user: Option<String>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IncompleteDetails {
    /// `max_output_tokens`.
    pub reason: &'static str,
}

/// What the model produced: a message, or a call of a function.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem {
    Message {
        id: String,
        /// `in_progress`, `completed` or `incomplete`.
        status: &'static str,
        /// Always `assistant`.
        role: &'static str,
        content: Vec<OutputText>,
    },
    FunctionCall {
        id: String,
        call_id: String,
        name: String,
        /// The arguments as a JSON string.
        arguments: String,
        status: &'static str,
    },
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OutputText {
    /// Always `output_text`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub text: String,
    #[schema(value_type = Vec<Object>)]
    pub annotations: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, ToSchema, PartialEq, Eq)]
pub struct ResponseUsage {
    pub input_tokens: u64,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: u64,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, ToSchema, PartialEq, Eq)]
pub struct InputTokensDetails {
    pub cached_tokens: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, ToSchema, PartialEq, Eq)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: u64,
}

/// One server-sent event: `event: <type>` and this as its data.
#[derive(Debug, Clone, Serialize)]
pub struct StreamEvent {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub sequence_number: u64,
    #[serde(flatten)]
    pub body: EventBody,
}

/// The fields each event type carries besides `type` and `sequence_number`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum EventBody {
    /// `response.created`, `.in_progress`, `.completed`, `.incomplete`, `.failed`.
    Response { response: ResponseObject },
    /// `response.output_item.added` / `.done`.
    Item { output_index: usize, item: OutputItem },
    /// `response.content_part.added` / `.done`.
    Part { item_id: String, output_index: usize, content_index: usize, part: OutputText },
    /// `response.output_text.delta`.
    TextDelta {
        item_id: String,
        output_index: usize,
        content_index: usize,
        delta: String,
        logprobs: Vec<serde_json::Value>,
    },
    /// `response.output_text.done`.
    TextDone {
        item_id: String,
        output_index: usize,
        content_index: usize,
        text: String,
        logprobs: Vec<serde_json::Value>,
    },
    /// `response.function_call_arguments.delta`.
    ArgumentsDelta { item_id: String, output_index: usize, delta: String },
    /// `response.function_call_arguments.done`.
    ArgumentsDone { item_id: String, output_index: usize, name: String, arguments: String },
}
