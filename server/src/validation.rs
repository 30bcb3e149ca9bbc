//! Validation: from a parsed OpenAI request to a [`GenerateRequest`] the
//! generation layer can run without further checks. Every rejection here is a
//! 400 that names the offending parameter.

use serde::de::DeserializeOwned;

use crate::config::{Limits, SamplingDefaults};
use crate::engine::{Conversation, Prompt, Turn};
use crate::tools::ToolRequest;
use crate::error::ApiError;
use crate::protocol::{
    unsupported_field, ChatCompletionRequest, ChatMessage, CompletionRequest, MessageContent, Other, PromptInput,
    ResponseFormat, SamplingRequest, ToolCall,
};

/// A request that passed validation, for either endpoint.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub model: String,
    /// One or more (completions take a list); each gets `n` choices.
    pub prompts: Vec<Prompt>,
    pub n: usize,
    pub sampling: Sampling,
    /// As asked; `None` means "as much as the defaults and the context allow".
    pub max_tokens: Option<u64>,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    /// `Some(k)`: return log-probabilities with the top `k` alternatives.
    pub logprobs: Option<usize>,
    pub json_schema: Option<serde_json::Value>,
    /// Chat with `tools`: what is asked of them (the tools themselves are
    /// in the prompt, which renders them).
    pub tools: Option<ToolRequest>,
    /// Added to these tokens' logits (checked against the vocabulary when
    /// the model is known).
    pub logit_bias: std::collections::HashMap<u32, f32>,
    pub stream: bool,
    pub include_usage: bool,
    pub echo: bool,
}

/// Sampling knobs after validation; `None` means "model default".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampling {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
}

impl Sampling {
    /// Fills what the request left open from the model's defaults.
    pub fn with_defaults(&self, d: &SamplingDefaults) -> Sampling {
        Sampling {
            temperature: self.temperature.or(d.temperature),
            top_p: self.top_p.or(d.top_p),
            top_k: self.top_k.or(d.top_k),
            min_p: self.min_p.or(d.min_p),
            repetition_penalty: self.repetition_penalty.or(d.repetition_penalty),
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
        }
    }

    /// Greedy decoding: temperature 0 (the OpenAI convention) or top_k 1.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_some_and(|t| t == 0.0) || self.top_k == Some(1)
    }
}

/// Parses a JSON body, naming the field that is wrong.
/// The path and error of a bad sampling field, read on its own.
fn locate_in_sampling(body: &[u8]) -> Option<(String, serde_json::Error)> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let err = serde_path_to_error::deserialize::<_, crate::protocol::SamplingRequest>(value).err()?;
    let path = err.path().to_string();
    (path != ".").then(|| (path, err.into_inner()))
}

pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid_body(
            "The request body is empty; send a JSON object.",
            None,
        ));
    }
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let mut path = err.path().to_string();
        let mut inner = err.into_inner();
        if path == "." && inner.classify() == serde_json::error::Category::Data {
            // serde loses the path inside `#[serde(flatten)]` fields: find it by
            // reading the flattened sampling fields alone.
            if let Some(located) = locate_in_sampling(body) {
                (path, inner) = located;
            }
        }
        let param = (path != ".").then_some(path.clone());
        let message = match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                format!("The request body is not valid JSON: {inner}")
            }
            serde_json::error::Category::Io => format!("The request body could not be read: {inner}"),
            serde_json::error::Category::Data if path == "." => {
                format!("The request body does not match the schema: {inner}")
            }
            serde_json::error::Category::Data if inner.to_string().contains("untagged enum PromptInput") => {
                format!("`{path}` must be a string, a list of strings, a list of token ids, or a list of token-id lists.")
            }
            serde_json::error::Category::Data => format!("Invalid value for `{path}`: {inner}"),
        };
        ApiError::invalid_body(message, param)
    })
}

pub fn validate_chat(req: ChatCompletionRequest, limits: &Limits) -> Result<GenerateRequest, ApiError> {
    refuse_unsupported(&req.other)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` is empty; send at least one message.",
        ));
    }
    let turns = chat_messages(req.messages)?;
    let tools = crate::tools::validate(req.tools, req.tool_choice, req.parallel_tool_calls, crate::tools::ToolLayout::Chat)?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`.",
            ))
        }
        (true, Some(k)) if k > 20 => {
            return Err(ApiError::invalid_param("top_logprobs", "`top_logprobs` must be 0 to 20."))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, None) => None,
    };
    if req.max_tokens.is_some() && req.max_completion_tokens.is_some() {
        return Err(ApiError::invalid_param(
            "max_tokens",
            "Give `max_completion_tokens` or `max_tokens`, not both.",
        ));
    }
    let json_schema = match req.response_format {
        None | Some(ResponseFormat::Text) => None,
        Some(ResponseFormat::JsonObject) => Some(serde_json::json!({"type": "object"})),
        Some(ResponseFormat::JsonSchema { json_schema }) => Some(json_schema.schema.ok_or_else(|| {
            ApiError::invalid_param(
                "response_format.json_schema.schema",
                "`json_schema.schema` is required.",
            )
        })?),
    };
    let stream = req.stream.unwrap_or(false);
    let include_usage = stream_usage(stream, req.stream_options.map(|o| o.include_usage))?;
    let common = validate_common(
        req.sampling,
        req.max_completion_tokens.or(req.max_tokens),
        if req.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" },
        limits,
    )?;
    Ok(GenerateRequest {
        model: req.model,
        prompts: vec![chat_prompt(turns, tools.as_ref())],
        tools,
        logprobs,
        json_schema,
        stream,
        include_usage,
        echo: false,
        ..common
    })
}

/// A conversation as the chat template gets it, with the request's tools.
pub(crate) fn chat_prompt(turns: Vec<Turn>, tools: Option<&ToolRequest>) -> Prompt {
    Prompt::Chat(Conversation { turns, tools: tools.map(|t| t.tools.clone()).unwrap_or_default() })
}

/// The turns of a conversation, `developer` read as `system`; a 400 naming
/// the message that cannot be.
pub fn chat_messages(input: Vec<ChatMessage>) -> Result<Vec<Turn>, ApiError> {
    let mut messages = Vec::with_capacity(input.len());
    for (i, m) in input.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "user" | "assistant" | "tool" => m.role,
            "developer" => "system".to_string(),
            other => {
                return Err(ApiError::invalid_param(
                    &format!("messages[{i}].role"),
                    format!("`{other}` is not a role; use system, developer, user, assistant or tool."),
                ))
            }
        };
        let content = match m.content {
            Some(MessageContent::Text(text)) => text,
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.into_iter().enumerate() {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::invalid_param(
                                &format!("messages[{i}].content[{j}]"),
                                format!("content parts of type `{kind}` are not supported by these text models; send `text` parts."),
                            ))
                        }
                    }
                }
                text
            }
            None if role == "assistant" => String::new(),
            None => {
                return Err(ApiError::invalid_param(
                    &format!("messages[{i}].content"),
                    "`content` is required for this role.",
                ))
            }
        };
        let tool_calls = turn_tool_calls(i, &role, m.tool_calls.unwrap_or_default())?;
        if m.tool_call_id.is_some() && role != "tool" {
            return Err(ApiError::invalid_param(
                &format!("messages[{i}].tool_call_id"),
                "`tool_call_id` belongs to `tool` messages.",
            ));
        }
        messages.push(Turn {
            role,
            content,
            tool_calls,
            tool_call_id: m.tool_call_id,
        });
    }
    Ok(messages)
}

/// An assistant turn's calls as chat templates read them: the arguments
/// string parsed into an object.
fn turn_tool_calls(
    i: usize,
    role: &str,
    calls: Vec<ToolCall>,
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, ApiError> {
    if !calls.is_empty() && role != "assistant" {
        return Err(ApiError::invalid_param(
            &format!("messages[{i}].tool_calls"),
            "`tool_calls` belong to `assistant` messages.",
        ));
    }
    calls
        .into_iter()
        .enumerate()
        .map(|(j, call)| {
            let param = format!("messages[{i}].tool_calls[{j}].function.arguments");
            template_tool_call(call.id, call.function.name, &call.function.arguments, &param)
        })
        .collect()
}

/// A call as chat templates read it: `{id, type, function: {name,
/// arguments}}` with the arguments string (the client's `param`) parsed into
/// an object, as transformers and vLLM hand them over.
pub(crate) fn template_tool_call(
    id: String,
    name: String,
    arguments: &str,
    param: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let arguments: serde_json::Value = serde_json::from_str(arguments).map_err(|e| {
        ApiError::invalid_param(param, format!("`arguments` must be a JSON string of an object: {e}"))
    })?;
    let mut function = serde_json::Map::new();
    function.insert("name".into(), name.into());
    function.insert("arguments".into(), arguments);
    let mut call = serde_json::Map::new();
    call.insert("id".into(), id.into());
    call.insert("type".into(), "function".into());
    call.insert("function".into(), function.into());
    Ok(call)
}

pub fn validate_completion(req: CompletionRequest, limits: &Limits) -> Result<GenerateRequest, ApiError> {
    refuse_unsupported(&req.other)?;
    let prompts: Vec<Prompt> = match req.prompt {
        PromptInput::Text(text) => vec![Prompt::Text(text)],
        PromptInput::Texts(list) => list.into_iter().map(Prompt::Text).collect(),
        PromptInput::Tokens(ids) => vec![Prompt::Tokens(ids)],
        PromptInput::TokenLists(lists) => lists.into_iter().map(Prompt::Tokens).collect(),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid_param("prompt", "`prompt` is an empty list."));
    }
    let empty = prompts.iter().position(|p| match p {
        Prompt::Text(t) => t.is_empty(),
        Prompt::Tokens(ids) => ids.is_empty(),
        Prompt::Chat(_) => false,
    });
    if let Some(i) = empty {
        let param = if prompts.len() == 1 { "prompt".to_string() } else { format!("prompt[{i}]") };
        return Err(ApiError::invalid_param(&param, format!("`{param}` is empty.")));
    }
    let logprobs = match req.logprobs {
        Some(k) if k > 5 => {
            return Err(ApiError::invalid_param("logprobs", "`logprobs` must be 0 to 5."))
        }
        other => other.map(|k| k as usize),
    };
    let echo = req.echo.unwrap_or(false);
    let stream = req.stream.unwrap_or(false);
    let include_usage = stream_usage(stream, req.stream_options.map(|o| o.include_usage))?;
    // `max_tokens: 0` asks for the echoed prompt alone (its log-probabilities
    // are what a harness scores), as vLLM allows it.
    let scoring_only = echo && req.max_tokens == Some(0);
    let max_tokens = if scoring_only { None } else { req.max_tokens };
    let mut common = validate_common(req.sampling, max_tokens, "max_tokens", limits)?;
    if scoring_only {
        common.max_tokens = Some(0);
    }
    Ok(GenerateRequest {
        model: req.model,
        prompts,
        logprobs,
        json_schema: None,
        stream,
        include_usage,
        echo,
        ..common
    })
}

/// A 400 naming the first field that asks for what this server does not do.
pub fn refuse_unsupported(other: &Other) -> Result<(), ApiError> {
    match unsupported_field(other) {
        Some(field) => Err(ApiError::unsupported_param(field)),
        None => Ok(()),
    }
}

fn stream_usage(stream: bool, include_usage: Option<bool>) -> Result<bool, ApiError> {
    match (stream, include_usage) {
        (false, Some(_)) => Err(ApiError::invalid_param(
            "stream_options",
            "`stream_options` is only allowed with `stream: true`.",
        )),
        (_, include) => Ok(include.unwrap_or(false)),
    }
}

/// Checks shared by both endpoints; the prompt-related fields are placeholders
/// the callers fill in.
pub(crate) fn validate_common(
    s: SamplingRequest,
    max_tokens: Option<u64>,
    max_tokens_name: &str,
    limits: &Limits,
) -> Result<GenerateRequest, ApiError> {
    let n = s.n.unwrap_or(1);
    if n == 0 || n > limits.max_n {
        return Err(ApiError::invalid_param(
            "n",
            format!("`n` must be 1 to {} (limits.max_n).", limits.max_n),
        ));
    }
    if let Some(t) = s.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::invalid_param("temperature", "`temperature` must be 0 to 2."));
        }
    }
    if let Some(p) = s.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid_param("top_p", "`top_p` must be in (0, 1]."));
        }
    }
    let top_k = match s.top_k {
        None | Some(0) | Some(-1) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(_) => {
            return Err(ApiError::invalid_param(
                "top_k",
                "`top_k` must be a positive number, or 0 or -1 to disable it.",
            ))
        }
    };
    if let Some(p) = s.min_p {
        if !(0.0..=1.0).contains(&p) {
            return Err(ApiError::invalid_param("min_p", "`min_p` must be 0 to 1."));
        }
    }
    if let Some(r) = s.repetition_penalty {
        if !(r > 0.0 && r <= 10.0) {
            return Err(ApiError::invalid_param(
                "repetition_penalty",
                "`repetition_penalty` must be in (0, 10]; 1 disables it.",
            ));
        }
    }
    for (name, value) in [
        ("presence_penalty", s.presence_penalty),
        ("frequency_penalty", s.frequency_penalty),
    ] {
        if let Some(v) = value {
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::invalid_param(name, format!("`{name}` must be -2 to 2.")));
            }
        }
    }
    if let Some(m) = max_tokens {
        if m == 0 || m > limits.max_tokens {
            return Err(ApiError::invalid_param(
                max_tokens_name,
                format!("`{max_tokens_name}` must be 1 to {} (limits.max_tokens).", limits.max_tokens),
            ));
        }
    }
    let mut logit_bias = std::collections::HashMap::new();
    for (key, &value) in s.logit_bias.iter().flatten() {
        let id: u32 = key.parse().map_err(|_| {
            ApiError::invalid_param("logit_bias", format!("`logit_bias` keys are token ids; `{key}` is not one."))
        })?;
        if !(-100.0..=100.0).contains(&value) {
            return Err(ApiError::invalid_param(
                "logit_bias",
                format!("`logit_bias` values must be -100 to 100; token {id} has {value}."),
            ));
        }
        logit_bias.insert(id, value);
    }
    let stop = s.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > limits.max_stop_sequences {
        return Err(ApiError::invalid_param(
            "stop",
            format!("At most {} stop sequences.", limits.max_stop_sequences),
        ));
    }
    if stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid_param("stop", "Stop sequences cannot be empty strings."));
    }
    Ok(GenerateRequest {
        model: String::new(),
        prompts: Vec::new(),
        n: n as usize,
        sampling: Sampling {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
        },
        max_tokens,
        stop,
        // Negative seeds are valid in OpenAI's API; keep their bits.
        seed: s.seed.map(|s| s as u64),
        logprobs: None,
        json_schema: None,
        tools: None,
        logit_bias,
        stream: false,
        include_usage: false,
        echo: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: serde_json::Value) -> Result<GenerateRequest, ApiError> {
        let req: ChatCompletionRequest = parse_body(body.to_string().as_bytes())?;
        validate_chat(req, &Limits::default())
    }

    fn base() -> serde_json::Value {
        serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    }

    fn with(field: &str, value: serde_json::Value) -> serde_json::Value {
        let mut b = base();
        b[field] = value;
        b
    }

    #[test]
    fn a_plain_request_passes() {
        let r = chat(base()).unwrap();
        assert_eq!(r.n, 1);
        assert!(!r.stream);
        assert!(matches!(&r.prompts[..], [Prompt::Chat(c)] if c.turns == [Turn::new("user", "hi")]));
    }

    #[test]
    fn each_bad_parameter_is_named() {
        let cases = [
            ("n", serde_json::json!(0), "n"),
            ("n", serde_json::json!(1000), "n"),
            ("temperature", serde_json::json!(3.5), "temperature"),
            ("top_p", serde_json::json!(0), "top_p"),
            ("top_k", serde_json::json!(-5), "top_k"),
            ("max_tokens", serde_json::json!(0), "max_tokens"),
            ("max_tokens", serde_json::json!(10_000_000), "max_tokens"),
            ("stop", serde_json::json!(["a", "b", "c", "d", "e"]), "stop"),
            ("top_logprobs", serde_json::json!(3), "top_logprobs"),
            ("presence_penalty", serde_json::json!(9), "presence_penalty"),
            ("stream_options", serde_json::json!({"include_usage": true}), "stream_options"),
        ];
        for (field, value, param) in cases {
            let err = chat(with(field, value.clone())).unwrap_err();
            assert_eq!(err.status.as_u16(), 400, "{field}={value}");
            assert_eq!(err.param.as_deref(), Some(param), "{field}={value}: {}", err.message);
        }
    }

    #[test]
    fn wrong_types_and_broken_json_are_400_with_a_path() {
        let err = chat(with("temperature", serde_json::json!("hot"))).unwrap_err();
        assert_eq!(err.status.as_u16(), 400);
        assert!(err.message.contains("temperature"), "{}", err.message);
        let err = parse_body::<ChatCompletionRequest>(b"{\"model\": ").unwrap_err();
        assert!(err.message.contains("not valid JSON"), "{}", err.message);
        let err = parse_body::<ChatCompletionRequest>(b"{\"model\":\"\xff\xfe\",\"messages\":[]}").unwrap_err();
        assert_eq!(err.status.as_u16(), 400);
        let err = parse_body::<ChatCompletionRequest>(b"").unwrap_err();
        assert!(err.message.contains("empty"));
    }

    #[test]
    fn empty_messages_and_unknown_roles_are_refused() {
        let err = chat(with("messages", serde_json::json!([]))).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages"));
        let err = chat(with("messages", serde_json::json!([{"role": "wizard", "content": "x"}]))).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn text_parts_are_joined_and_stop_accepts_a_string() {
        let mut b = with(
            "messages",
            serde_json::json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]),
        );
        b["stop"] = serde_json::json!("END");
        let r = chat(b).unwrap();
        assert!(matches!(&r.prompts[..], [Prompt::Chat(c)] if c.turns[0].content == "ab"));
        assert_eq!(r.stop, vec!["END".to_string()]);
    }

    #[test]
    fn defaults_fill_only_what_is_missing() {
        let s = Sampling { temperature: Some(0.0), ..Default::default() };
        let d = SamplingDefaults { temperature: Some(0.7), top_p: Some(0.8), ..Default::default() };
        let merged = s.with_defaults(&d);
        assert_eq!(merged.temperature, Some(0.0));
        assert_eq!(merged.top_p, Some(0.8));
        assert!(merged.is_greedy());
    }

    fn completion(body: serde_json::Value) -> Result<GenerateRequest, ApiError> {
        let req: CompletionRequest = parse_body(body.to_string().as_bytes())?;
        validate_completion(req, &Limits::default())
    }

    #[test]
    fn a_field_the_server_does_not_implement_is_named_not_dropped() {
        for (field, value) in [
            ("functions", serde_json::json!([{"name": "f"}])),
            ("made_up", serde_json::json!(1)),
        ] {
            let err = chat(with(field, value)).unwrap_err();
            assert_eq!((err.status.as_u16(), err.param.as_deref(), err.code), (400, Some(field), Some("unsupported_parameter")));
        }
        // Harmless fields, and fields that ask for nothing, pass.
        for (field, value) in [
            ("metadata", serde_json::json!({"run": "a"})),
            ("store", serde_json::json!(false)),
            ("user", serde_json::json!("u1")),
            ("tools", serde_json::json!([])),
            ("logit_bias", serde_json::json!(null)),
            ("logit_bias", serde_json::json!({"42": -100, "7": 2.5})),
        ] {
            assert!(chat(with(field, value.clone())).is_ok(), "{field}={value}");
        }
        let err = chat(with("messages", serde_json::json!([{"role": "assistant", "content": null, "audio": {}}]))).unwrap_err();
        assert_eq!(err.status.as_u16(), 400);
        assert!(err.message.contains("audio"), "{}", err.message);
        let err = completion(serde_json::json!({"model": "m", "prompt": "x", "best_of": 3})).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("best_of"));
    }

    #[test]
    fn tool_turns_reach_the_template_with_their_arguments_as_objects() {
        let body = serde_json::json!({"model": "m", "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        ], "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]});
        let req = chat(body.clone()).unwrap();
        let [Prompt::Chat(c)] = &req.prompts[..] else { panic!("one chat prompt") };
        assert_eq!(c.tools.len(), 1);
        assert_eq!(c.turns[1].tool_calls[0]["function"]["arguments"], serde_json::json!({"city": "Paris"}));
        assert_eq!(c.turns[2].tool_call_id.as_deref(), Some("call_1"));
        let mut bad = body;
        bad["messages"][1]["tool_calls"][0]["function"]["arguments"] = "not json".into();
        assert_eq!(chat(bad).unwrap_err().param.as_deref(), Some("messages[1].tool_calls[0].function.arguments"));
    }

    #[test]
    fn logit_bias_takes_token_ids_and_bounded_numbers() {
        let req = chat(with("logit_bias", serde_json::json!({"42": -100, "7": 2.5}))).unwrap();
        assert_eq!(req.logit_bias, std::collections::HashMap::from([(42, -100.0), (7, 2.5)]));
        for bad in [serde_json::json!({"x": 1}), serde_json::json!({"-1": 1}), serde_json::json!({" 7": 1}), serde_json::json!({"3": 101})] {
            let err = chat(with("logit_bias", bad.clone())).unwrap_err();
            assert_eq!(err.param.as_deref(), Some("logit_bias"), "{bad}");
        }
    }

    #[test]
    fn echo_with_logprobs_and_max_tokens_zero_score_the_prompt() {
        let req = completion(serde_json::json!({"model": "m", "prompt": "x", "echo": true, "logprobs": 1, "max_tokens": 0})).unwrap();
        assert_eq!((req.echo, req.logprobs, req.max_tokens), (true, Some(1), Some(0)));
        let err = completion(serde_json::json!({"model": "m", "prompt": "x", "max_tokens": 0})).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn completions_take_text_token_ids_and_lists_of_either() {
        let prompts = |prompt: serde_json::Value| completion(serde_json::json!({"model": "m", "prompt": prompt})).map(|r| r.prompts);
        assert!(matches!(&prompts(serde_json::json!("a")).unwrap()[..], [Prompt::Text(t)] if t == "a"));
        assert!(matches!(&prompts(serde_json::json!(["a", "b"])).unwrap()[..], [Prompt::Text(a), Prompt::Text(b)] if a == "a" && b == "b"));
        assert!(matches!(&prompts(serde_json::json!([1, 2, 3])).unwrap()[..], [Prompt::Tokens(t)] if t == &[1, 2, 3]));
        assert!(matches!(&prompts(serde_json::json!([[1], [2, 3]])).unwrap()[..], [Prompt::Tokens(a), Prompt::Tokens(b)] if a == &[1] && b == &[2, 3]));
        for (bad, param) in [
            (serde_json::json!([]), "prompt"),
            (serde_json::json!(""), "prompt"),
            (serde_json::json!(["a", ""]), "prompt[1]"),
            (serde_json::json!([[1], []]), "prompt[1]"),
        ] {
            let err = prompts(bad.clone()).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{bad}: {}", err.message);
        }
        assert_eq!(prompts(serde_json::json!([-1])).unwrap_err().status.as_u16(), 400);
    }
}
