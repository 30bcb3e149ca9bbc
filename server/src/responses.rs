//! `POST /v1/responses`: a Responses API request checked and turned into the
//! same [`GenerateRequest`] a chat completion runs, and the generation's
//! events assembled into the response object, whole or as the documented
//! stream of events.
//!
//! Stateless: `store` is accepted but nothing is kept, so
//! `previous_response_id` is a 400 and a conversation (with its function
//! calls and their outputs) travels in `input`, as the Agents SDK sends it.

use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::HttpResponse;
use bytes::Bytes;

use crate::config::Limits;
use crate::engine::Turn;
use crate::error::ApiError;
use crate::generate::{Event, Generation};
use crate::protocol::{
    FunctionDefinition, FunctionName, NamedToolChoice, SamplingRequest, ToolCall, ToolChoiceInput, ToolDefinition,
};
use crate::respond;
use crate::responses_protocol::{
    EventBody, IncompleteDetails, InputContent, InputItem, InputTokensDetails, OutputItem, OutputText,
    OutputTokensDetails, ResponseError, ResponseInput, ResponseObject, ResponseTool, ResponseToolChoice,
    ResponseUsage, ResponsesRequest, StreamEvent, TextConfig, TextFormat,
};
use crate::tools;
use crate::validation::{self, GenerateRequest};

/// What the response object repeats of its request.
#[derive(Debug, Clone)]
pub struct Echo {
    instructions: Option<String>,
    max_output_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    parallel_tool_calls: bool,
    text: TextConfig,
    tool_choice: ResponseToolChoice,
    tools: Vec<ResponseTool>,
    user: Option<String>,
    metadata: std::collections::BTreeMap<String, String>,
}

/// Checks a request and turns it into generation work plus what the answer
/// repeats of it.
pub fn validate(req: ResponsesRequest, limits: &Limits) -> Result<(GenerateRequest, Echo), ApiError> {
    validation::refuse_unsupported(&req.other)?;
    if let Some(id) = req.previous_response_id.as_deref().filter(|id| !id.is_empty()) {
        return Err(ApiError::invalid_param(
            "previous_response_id",
            format!("This server keeps no responses, so it cannot continue `{id}`; send the whole conversation in `input`."),
        ));
    }
    if let Some(mode) = req.truncation.as_deref().filter(|m| *m != "disabled") {
        return Err(ApiError::invalid_param(
            "truncation",
            format!("`truncation` `{mode}` is not supported; an input longer than the context is a 400, never cut (`disabled`)."),
        ));
    }
    let mut turns: Vec<Turn> = req.instructions.iter().map(|i| Turn::new("system", i)).collect();
    match req.input {
        ResponseInput::Text(text) => turns.push(Turn::new("user", &text)),
        ResponseInput::Items(items) => turns.extend(item_turns(items)?),
    }
    if turns.iter().all(|t| t.role == "system") {
        return Err(ApiError::invalid_param("input", "`input` has nothing to answer; send a message."));
    }
    let tools = tools::validate(
        chat_tools(req.tools.clone().unwrap_or_default())?,
        req.tool_choice.clone().map(chat_tool_choice).transpose()?,
        req.parallel_tool_calls,
        tools::ToolLayout::Responses,
    )?;
    let text = req.text.unwrap_or_default();
    let json_schema = match &text.format {
        None | Some(TextFormat::Text) => None,
        Some(TextFormat::JsonObject) => Some(serde_json::json!({"type": "object"})),
        Some(TextFormat::JsonSchema { schema, .. }) => Some(schema.clone().ok_or_else(|| {
            ApiError::invalid_param("text.format.schema", "`text.format.schema` is required with `json_schema`.")
        })?),
    };
    let sampling = SamplingRequest { temperature: req.temperature, top_p: req.top_p, ..Default::default() };
    let common = validation::validate_common(sampling, req.max_output_tokens, "max_output_tokens", limits)?;
    let echo = Echo {
        instructions: req.instructions,
        max_output_tokens: req.max_output_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
        text: TextConfig { format: Some(text.format.unwrap_or(TextFormat::Text)), verbosity: text.verbosity },
        tool_choice: req.tool_choice.unwrap_or_else(|| ResponseToolChoice::Mode("auto".into())),
        tools: req.tools.unwrap_or_default(),
        user: req.user,
        metadata: req.metadata.unwrap_or_default(),
    };
    let request = GenerateRequest {
        model: req.model,
        prompts: vec![validation::chat_prompt(turns, tools.as_ref())],
        tools,
        json_schema,
        stream: req.stream.unwrap_or(false),
        ..common
    };
    Ok((request, echo))
}

/// The turns of `input`'s items: function calls join the assistant turn
/// before them (or start one), outputs are `tool` turns.
fn item_turns(items: Vec<InputItem>) -> Result<Vec<Turn>, ApiError> {
    let mut turns: Vec<Turn> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        match item {
            InputItem::Message(m) => {
                let role = match m.role.as_str() {
                    "user" | "system" | "assistant" => m.role.as_str(),
                    "developer" => "system",
                    other => {
                        return Err(ApiError::invalid_param(
                            &format!("input[{i}].role"),
                            format!("`{other}` is not a role; use user, system, developer or assistant."),
                        ))
                    }
                };
                turns.push(Turn::new(role, &content_text(m.content, &format!("input[{i}].content"))?));
            }
            InputItem::FunctionCall(call) => {
                let param = format!("input[{i}].arguments");
                let call = validation::template_tool_call(call.call_id, call.name, &call.arguments, &param)?;
                match turns.last_mut() {
                    Some(turn) if turn.role == "assistant" => turn.tool_calls.push(call),
                    _ => turns.push(Turn { tool_calls: vec![call], ..Turn::new("assistant", "") }),
                }
            }
            InputItem::FunctionCallOutput(output) => turns.push(Turn {
                tool_call_id: Some(output.call_id),
                ..Turn::new("tool", &content_text(output.output, &format!("input[{i}].output"))?)
            }),
        }
    }
    Ok(turns)
}

/// A content string, or its text parts joined.
fn content_text(content: InputContent, param: &str) -> Result<String, ApiError> {
    let parts = match content {
        InputContent::Text(text) => return Ok(text),
        InputContent::Parts(parts) => parts,
    };
    let mut text = String::new();
    for (j, part) in parts.into_iter().enumerate() {
        match (part.kind.as_str(), part.text) {
            ("input_text" | "output_text", Some(t)) => {
                validation::refuse_unsupported(&part.other).map_err(|mut e| {
                    e.param = e.param.map(|field| format!("{param}[{j}].{field}"));
                    e
                })?;
                text.push_str(&t)
            }
            (kind, _) => {
                return Err(ApiError::invalid_param(
                    &format!("{param}[{j}]"),
                    format!("content parts of type `{kind}` are not supported by these text models; send `input_text` parts."),
                ))
            }
        }
    }
    Ok(text)
}

/// The Responses API's flat function tools in chat's shape; hosted tools
/// are refused.
fn chat_tools(tools: Vec<ResponseTool>) -> Result<Option<Vec<ToolDefinition>>, ApiError> {
    let mut out = Vec::with_capacity(tools.len());
    for (i, tool) in tools.into_iter().enumerate() {
        if tool.kind != "function" {
            return Err(ApiError::invalid_param(
                &format!("tools[{i}].type"),
                format!("Only `function` tools run here; `{}` is a tool OpenAI hosts.", tool.kind),
            ));
        }
        let name = tool
            .name
            .ok_or_else(|| ApiError::invalid_param(&format!("tools[{i}].name"), "A function tool needs a `name`."))?;
        out.push(ToolDefinition {
            kind: tool.kind,
            function: FunctionDefinition {
                name,
                description: tool.description,
                parameters: tool.parameters,
                strict: tool.strict,
            },
        });
    }
    Ok(Some(out))
}

fn chat_tool_choice(choice: ResponseToolChoice) -> Result<ToolChoiceInput, ApiError> {
    match choice {
        ResponseToolChoice::Mode(mode) => Ok(ToolChoiceInput::Mode(mode)),
        ResponseToolChoice::Function(f) if f.kind == "function" => Ok(ToolChoiceInput::Named(NamedToolChoice {
            kind: f.kind,
            function: FunctionName { name: f.name },
        })),
        ResponseToolChoice::Function(f) => Err(ApiError::invalid_param(
            "tool_choice",
            format!("`tool_choice` of type `{}` is not supported; name a `function`.", f.kind),
        )),
    }
}

/// The response under construction, fed the generation's events in order.
pub struct Assembly {
    response: ResponseObject,
    /// Index in `output` of the message text is going into.
    open_message: Option<usize>,
    sequence: u64,
}

/// What one generation event did to the response.
pub enum Step {
    /// Events to stream; more will come.
    Going(Vec<StreamEvent>),
    /// The last events; the response is complete (or incomplete).
    Ended(Vec<StreamEvent>),
    /// The generation failed: the error, and `response.failed`.
    Failed(ApiError, StreamEvent),
}

impl Assembly {
    pub fn new(model: String, echo: Echo) -> Self {
        let response = ResponseObject {
            id: format!("resp_{}", uuid::Uuid::new_v4().simple()),
            object: "response",
            created_at: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            status: "in_progress",
            error: None,
            incomplete_details: None,
            instructions: echo.instructions,
            max_output_tokens: echo.max_output_tokens,
            model,
            output: Vec::new(),
            parallel_tool_calls: echo.parallel_tool_calls,
            previous_response_id: None,
            store: false,
            temperature: echo.temperature,
            text: echo.text,
            tool_choice: echo.tool_choice,
            tools: echo.tools,
            top_p: echo.top_p,
            truncation: "disabled",
            usage: None,
            user: echo.user,
            metadata: echo.metadata,
        };
        Self { response, open_message: None, sequence: 0 }
    }

    fn event(&mut self, kind: &'static str, body: EventBody) -> StreamEvent {
        let event = StreamEvent { kind, sequence_number: self.sequence, body };
        self.sequence += 1;
        event
    }

    fn snapshot(&mut self, kind: &'static str) -> StreamEvent {
        let response = self.response.clone();
        self.event(kind, EventBody::Response { response })
    }

    /// `response.created` and `response.in_progress`.
    pub fn start(&mut self) -> Vec<StreamEvent> {
        vec![self.snapshot("response.created"), self.snapshot("response.in_progress")]
    }

    pub fn apply(&mut self, event: Event) -> Step {
        match event {
            Event::Piece { text, .. } if text.is_empty() => Step::Going(Vec::new()),
            Event::Piece { text, .. } => Step::Going(self.text(text)),
            Event::ToolCalls { calls, .. } => {
                let mut events = self.close_message("completed");
                for call in calls {
                    events.extend(self.function_call(call));
                }
                Step::Going(events)
            }
            Event::Finished { reason, usage, .. } => {
                let incomplete = reason == "length";
                let mut events = self.close_message(if incomplete { "incomplete" } else { "completed" });
                self.response.status = if incomplete { "incomplete" } else { "completed" };
                self.response.incomplete_details = incomplete.then_some(IncompleteDetails { reason: "max_output_tokens" });
                self.response.usage = Some(ResponseUsage {
                    input_tokens: usage.prompt_tokens,
                    input_tokens_details: InputTokensDetails::default(),
                    output_tokens: usage.completion_tokens,
                    output_tokens_details: OutputTokensDetails::default(),
                    total_tokens: usage.total_tokens,
                });
                events.push(self.snapshot(if incomplete { "response.incomplete" } else { "response.completed" }));
                Step::Ended(events)
            }
            Event::Failed { error, .. } => self.fail(error),
        }
    }

    fn fail(&mut self, error: ApiError) -> Step {
        self.response.status = "failed";
        self.response.error = Some(ResponseError {
            code: error.code.unwrap_or("server_error").to_string(),
            message: error.message.clone(),
        });
        let event = self.snapshot("response.failed");
        Step::Failed(error, event)
    }

    /// Text goes into the open message, opening one first if need be.
    fn text(&mut self, delta: String) -> Vec<StreamEvent> {
        let mut events = Vec::new();
        let output_index = match self.open_message {
            Some(i) => i,
            None => {
                let i = self.response.output.len();
                let item_id = format!("msg_{}", uuid::Uuid::new_v4().simple());
                let opened = OutputItem::Message { id: item_id.clone(), status: "in_progress", role: "assistant", content: Vec::new() };
                events.push(self.event("response.output_item.added", EventBody::Item { output_index: i, item: opened }));
                events.push(self.event(
                    "response.content_part.added",
                    EventBody::Part { item_id: item_id.clone(), output_index: i, content_index: 0, part: output_text(String::new()) },
                ));
                self.response.output.push(OutputItem::Message {
                    id: item_id,
                    status: "in_progress",
                    role: "assistant",
                    content: vec![output_text(String::new())],
                });
                self.open_message = Some(i);
                i
            }
        };
        let OutputItem::Message { id, content, .. } = &mut self.response.output[output_index] else {
            unreachable!("open_message points at a message")
        };
        content[0].text.push_str(&delta);
        let item_id = id.clone();
        events.push(self.event(
            "response.output_text.delta",
            EventBody::TextDelta { item_id, output_index, content_index: 0, delta, logprobs: Vec::new() },
        ));
        events
    }

    /// Ends the open message, if any, with `status`.
    fn close_message(&mut self, status: &'static str) -> Vec<StreamEvent> {
        let Some(output_index) = self.open_message.take() else {
            return Vec::new();
        };
        let OutputItem::Message { id, status: item_status, content, .. } = &mut self.response.output[output_index] else {
            unreachable!("open_message points at a message")
        };
        *item_status = status;
        let (item_id, part) = (id.clone(), content[0].clone());
        let item = self.response.output[output_index].clone();
        vec![
            self.event(
                "response.output_text.done",
                EventBody::TextDone {
                    item_id: item_id.clone(),
                    output_index,
                    content_index: 0,
                    text: part.text.clone(),
                    logprobs: Vec::new(),
                },
            ),
            self.event("response.content_part.done", EventBody::Part { item_id, output_index, content_index: 0, part }),
            self.event("response.output_item.done", EventBody::Item { output_index, item }),
        ]
    }

    /// A call, whole: its item, its arguments in one delta, done.
    fn function_call(&mut self, call: ToolCall) -> Vec<StreamEvent> {
        let output_index = self.response.output.len();
        let item_id = format!("fc_{}", uuid::Uuid::new_v4().simple());
        let item = |arguments: String, status| OutputItem::FunctionCall {
            id: item_id.clone(),
            call_id: call.id.clone(),
            name: call.function.name.clone(),
            arguments,
            status,
        };
        let (opened, done) = (item(String::new(), "in_progress"), item(call.function.arguments.clone(), "completed"));
        self.response.output.push(done.clone());
        vec![
            self.event("response.output_item.added", EventBody::Item { output_index, item: opened }),
            self.event(
                "response.function_call_arguments.delta",
                EventBody::ArgumentsDelta { item_id: item_id.clone(), output_index, delta: call.function.arguments.clone() },
            ),
            self.event(
                "response.function_call_arguments.done",
                EventBody::ArgumentsDone {
                    item_id: item_id.clone(),
                    output_index,
                    name: call.function.name.clone(),
                    arguments: call.function.arguments.clone(),
                },
            ),
            self.event("response.output_item.done", EventBody::Item { output_index, item: done }),
        ]
    }
}

fn output_text(text: String) -> OutputText {
    OutputText { kind: "output_text", text, annotations: Vec::new() }
}

/// Waits for the generation and answers with the response object.
pub async fn collect(mut assembly: Assembly, mut generation: Generation) -> Result<HttpResponse, ApiError> {
    loop {
        let Some(event) = generation.events.recv().await else {
            return Err(ApiError::internal("generation ended before the response finished"));
        };
        match assembly.apply(event) {
            Step::Going(_) => {}
            Step::Ended(_) => return Ok(HttpResponse::Ok().json(&assembly.response)),
            Step::Failed(error, _) => return Err(error),
        }
    }
}

/// Streams the response as server-sent events, each named by its type.
pub fn stream(mut assembly: Assembly, mut generation: Generation) -> HttpResponse {
    let events = async_stream::stream! {
        for event in assembly.start() {
            yield Ok::<Bytes, actix_web::Error>(sse(&event));
        }
        loop {
            let step = match generation.events.recv().await {
                Some(event) => assembly.apply(event),
                None => assembly.fail(ApiError::internal("generation ended before the response finished")),
            };
            match step {
                Step::Going(events) => for event in events { yield Ok(sse(&event)); },
                Step::Ended(events) => {
                    for event in events { yield Ok(sse(&event)); }
                    return;
                }
                Step::Failed(_, event) => {
                    yield Ok(sse(&event));
                    return;
                }
            }
        }
    };
    respond::event_stream(events)
}

fn sse(event: &StreamEvent) -> Bytes {
    let data = serde_json::to_string(event).unwrap_or_default();
    Bytes::from(format!("event: {}\ndata: {data}\n\n", event.kind))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Prompt;
    use crate::protocol::{FunctionCall, Usage};

    fn request(body: serde_json::Value) -> Result<(GenerateRequest, Echo), ApiError> {
        let parsed: ResponsesRequest = validation::parse_body(body.to_string().as_bytes())?;
        validate(parsed, &Limits::default())
    }

    fn turns(body: serde_json::Value) -> Vec<Turn> {
        let (req, _) = request(body).unwrap();
        match req.prompts.into_iter().next() {
            Some(Prompt::Chat(c)) => c.turns,
            other => panic!("not a conversation: {other:?}"),
        }
    }

    fn param(body: serde_json::Value) -> Option<String> {
        request(body).err().expect("refused").param
    }

    #[test]
    fn a_string_input_is_one_user_turn_after_the_instructions() {
        let t = turns(serde_json::json!({"model": "m", "input": "Hi", "instructions": "Be brief."}));
        assert_eq!(t, vec![Turn::new("system", "Be brief."), Turn::new("user", "Hi")]);
    }

    #[test]
    fn items_sent_back_by_an_agent_become_the_template_turns() {
        // What the Agents SDK sends on its second turn: the user message,
        // the model's call (with the ids it got), and the tool's output.
        let t = turns(serde_json::json!({"model": "m", "input": [
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
             "arguments": "{\"city\":\"Paris\"}", "status": "completed"},
            {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "rain"}]},
        ]}));
        assert_eq!(t.len(), 4);
        assert_eq!((t[1].role.as_str(), t[1].content.as_str()), ("assistant", "Let me look."));
        let names: Vec<_> = t[1].tool_calls.iter().map(|c| c["function"]["arguments"]["city"].clone()).collect();
        assert_eq!(names, vec![serde_json::json!("Paris"), serde_json::json!("Lyon")]);
        assert_eq!(t[1].tool_calls[0]["id"], "call_1");
        assert_eq!((t[2].role.as_str(), t[2].content.as_str(), t[2].tool_call_id.as_deref()), ("tool", "sunny", Some("call_1")));
        assert_eq!((t[3].content.as_str(), t[3].tool_call_id.as_deref()), ("rain", Some("call_2")));
    }

    #[test]
    fn a_call_with_no_assistant_message_before_it_starts_one() {
        let t = turns(serde_json::json!({"model": "m", "input": [
            {"role": "user", "content": "Weather?"},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        ]}));
        assert_eq!((t[1].role.as_str(), t[1].content.as_str(), t[1].tool_calls.len()), ("assistant", "", 1));
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let base = |extra: serde_json::Value| {
            let mut body = serde_json::json!({"model": "m", "input": "Hi"});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            body
        };
        assert_eq!(param(base(serde_json::json!({"previous_response_id": "resp_1"}))).as_deref(), Some("previous_response_id"));
        assert_eq!(param(base(serde_json::json!({"truncation": "auto"}))).as_deref(), Some("truncation"));
        assert_eq!(param(base(serde_json::json!({"reasoning": {"effort": "high"}}))).as_deref(), Some("reasoning"));
        assert_eq!(param(base(serde_json::json!({"include": ["message.output_text.logprobs"]}))).as_deref(), Some("include"));
        assert_eq!(param(base(serde_json::json!({"tools": [{"type": "web_search"}]}))).as_deref(), Some("tools[0].type"));
        assert_eq!(
            param(base(serde_json::json!({"tools": [{"type": "function", "name": "bad name"}]}))).as_deref(),
            Some("tools[0].name")
        );
        assert_eq!(
            param(serde_json::json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]})).as_deref(),
            Some("input[0].content[0]")
        );
        assert_eq!(
            param(serde_json::json!({"model": "m", "input": [{"role": "assistant", "content": [{"type": "output_text", "text": "x", "logprobs": [{"token": "x"}]}]}]})).as_deref(),
            Some("input[0].content[0].logprobs")
        );
        assert_eq!(param(serde_json::json!({"model": "m", "input": [{"role": "critic", "content": "x"}]})).as_deref(), Some("input[0].role"));
        assert_eq!(param(serde_json::json!({"model": "m", "input": [], "instructions": "x"})).as_deref(), Some("input"));
        assert_eq!(
            param(serde_json::json!({"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f"}]})).as_deref(),
            Some("input[0]")
        );
        assert_eq!(param(base(serde_json::json!({"max_output_tokens": 0}))).as_deref(), Some("max_output_tokens"));
        // Empty and harmless fields pass.
        assert!(request(base(serde_json::json!({"include": [], "store": true, "truncation": "disabled", "metadata": {"k": "v"}}))).is_ok());
    }

    #[test]
    fn text_format_and_tools_reach_the_generation() {
        let (req, echo) = request(serde_json::json!({"model": "m", "input": "Hi",
            "text": {"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}, "strict": true}},
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": true}],
            "tool_choice": {"type": "function", "name": "f"}}))
        .unwrap();
        assert_eq!(req.json_schema, Some(serde_json::json!({"type": "object"})));
        assert_eq!(req.tools.unwrap().mode, tools::ToolMode::Named("f".into()));
        assert!(echo.parallel_tool_calls);
        assert_eq!(param(serde_json::json!({"model": "m", "input": "Hi", "tools": [{"type": "function", "name": "f"}],
            "tool_choice": {"type": "function", "name": "g"}})).as_deref(), Some("tool_choice"));
    }

    fn echo() -> Echo {
        request(serde_json::json!({"model": "m", "input": "Hi"})).unwrap().1
    }

    fn kinds(events: &[StreamEvent]) -> Vec<&'static str> {
        events.iter().map(|e| e.kind).collect()
    }

    fn piece(text: &str) -> Event {
        Event::Piece { index: 0, text: text.into(), logprob: None }
    }

    fn finished(reason: &'static str) -> Event {
        Event::Finished { index: 0, reason, usage: Usage { prompt_tokens: 5, completion_tokens: 2, total_tokens: 7 } }
    }

    fn events(step: Step) -> Vec<StreamEvent> {
        match step {
            Step::Going(e) | Step::Ended(e) => e,
            Step::Failed(_, e) => vec![e],
        }
    }

    #[test]
    fn text_streams_as_one_message_with_numbered_events() {
        let mut a = Assembly::new("m".into(), echo());
        let mut all = a.start();
        all.extend(events(a.apply(piece("Hel"))));
        all.extend(events(a.apply(piece("lo"))));
        all.extend(events(a.apply(finished("stop"))));
        assert_eq!(kinds(&all), vec![
            "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
            "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
            "response.content_part.done", "response.output_item.done", "response.completed",
        ]);
        assert!(all.iter().enumerate().all(|(i, e)| e.sequence_number == i as u64));
        let body = serde_json::to_value(&a.response).unwrap();
        assert_eq!(body["status"], "completed");
        assert_eq!(body["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(body["output"][0]["status"], "completed");
        assert_eq!(body["usage"]["input_tokens"], 5);
        assert_eq!(body["usage"]["total_tokens"], 7);
        assert_eq!(body["store"], false);
    }

    #[test]
    fn calls_close_the_message_and_arrive_as_items() {
        let mut a = Assembly::new("m".into(), echo());
        a.apply(piece("Checking."));
        let call = ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: FunctionCall { name: "get_weather".into(), arguments: "{\"city\":\"Paris\"}".into() },
        };
        let e = events(a.apply(Event::ToolCalls { index: 0, calls: vec![call] }));
        assert_eq!(kinds(&e), vec![
            "response.output_text.done", "response.content_part.done", "response.output_item.done",
            "response.output_item.added", "response.function_call_arguments.delta",
            "response.function_call_arguments.done", "response.output_item.done",
        ]);
        a.apply(finished("tool_calls"));
        let body = serde_json::to_value(&a.response).unwrap();
        assert_eq!(body["output"][1]["type"], "function_call");
        assert_eq!(body["output"][1]["call_id"], "call_1");
        assert_eq!(body["output"][1]["arguments"], "{\"city\":\"Paris\"}");
        assert_eq!(body["status"], "completed");
    }

    #[test]
    fn max_output_tokens_makes_it_incomplete_and_an_error_fails_it() {
        let mut a = Assembly::new("m".into(), echo());
        a.apply(piece("x"));
        assert_eq!(kinds(&events(a.apply(finished("length")))).last(), Some(&"response.incomplete"));
        assert_eq!(a.response.incomplete_details.as_ref().map(|d| d.reason), Some("max_output_tokens"));
        assert_eq!(a.response.output.len(), 1);
        let mut b = Assembly::new("m".into(), echo());
        let Step::Failed(_, event) = b.apply(Event::Failed { index: 0, error: ApiError::internal("boom") }) else {
            panic!("not failed")
        };
        assert_eq!(event.kind, "response.failed");
        assert_eq!(b.response.error.as_ref().map(|e| e.message.as_str()), Some("boom"));
    }
}
