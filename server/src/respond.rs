//! Turning a [`Generation`] into what the client asked for: one JSON body, or
//! server-sent events ending in `data: [DONE]`. Chat and legacy completions
//! differ only in the shape of their chunks, which [`Shape`] captures.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::HttpResponse;
use bytes::Bytes;

use crate::error::ApiError;
use crate::generate::{Event, Generation};
use crate::protocol::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChoiceLogprobs, ChunkChoice,
    ChunkDelta, Completion, CompletionChoice, CompletionLogprobs, TokenLogprob, ToolCall, ToolCallDelta, Usage,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Chat,
    Completion,
}

/// Identity of one response, repeated in every chunk.
pub struct Header {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub fingerprint: String,
    /// Completions with `echo`: per prompt, the text that goes before each
    /// of its choices (empty without `echo`).
    echo: Vec<String>,
    /// Choices per prompt: choice `i` belongs to prompt `i / n`.
    n: usize,
}

impl Header {
    pub fn new(shape: Shape, model: String, fingerprint: String, echo: Vec<String>, n: usize) -> Self {
        let prefix = match shape {
            Shape::Chat => "chatcmpl",
            Shape::Completion => "cmpl",
        };
        Self {
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            model,
            fingerprint,
            echo,
            n: n.max(1),
        }
    }

    /// The echoed prompt before choice `index`, if `echo` was asked.
    fn echo(&self, index: usize) -> Option<&str> {
        self.echo.get(index / self.n).map(String::as_str)
    }
}

#[derive(Default)]
struct ChoiceAcc {
    text: String,
    tool_calls: Vec<ToolCall>,
    logprobs: Vec<TokenLogprob>,
    finish: Option<&'static str>,
}

/// Waits for every choice and answers with one JSON body.
pub async fn collect(
    shape: Shape,
    header: Header,
    n: usize,
    mut generation: Generation,
    want_logprobs: bool,
) -> Result<HttpResponse, ApiError> {
    let mut choices: Vec<ChoiceAcc> = (0..n).map(|_| ChoiceAcc::default()).collect();
    let mut usage = Usage {
        prompt_tokens: generation.prompt_tokens,
        ..Default::default()
    };
    let mut finished = 0;
    while finished < n {
        match generation.events.recv().await {
            Some(Event::Piece { index, text, logprob }) => {
                let acc = &mut choices[index as usize];
                acc.text.push_str(&text);
                acc.logprobs.extend(logprob);
            }
            Some(Event::ToolCalls { index, calls }) => choices[index as usize].tool_calls.extend(calls),
            Some(Event::Finished { index, reason, usage: u }) => {
                choices[index as usize].finish = Some(reason);
                usage.add(u);
                finished += 1;
            }
            Some(Event::Failed { error, .. }) => return Err(error),
            None => return Err(ApiError::internal("generation ended before every choice finished")),
        }
    }
    let body = match shape {
        Shape::Chat => serde_json::to_value(ChatCompletion {
            id: header.id,
            object: "chat.completion",
            created: header.created,
            model: header.model,
            system_fingerprint: header.fingerprint,
            choices: choices
                .into_iter()
                .enumerate()
                .map(|(i, c)| ChatChoice {
                    index: i as u32,
                    message: AssistantMessage {
                        role: "assistant",
                        // OpenAI's null content beside tool calls.
                        content: (c.tool_calls.is_empty() || !c.text.is_empty()).then_some(c.text),
                        tool_calls: (!c.tool_calls.is_empty()).then_some(c.tool_calls),
                    },
                    finish_reason: c.finish.unwrap_or("stop").to_string(),
                    logprobs: want_logprobs.then(|| ChoiceLogprobs { content: c.logprobs }),
                })
                .collect(),
            usage,
        }),
        Shape::Completion => serde_json::to_value(Completion {
            id: header.id.clone(),
            object: "text_completion",
            created: header.created,
            model: header.model.clone(),
            system_fingerprint: header.fingerprint.clone(),
            choices: choices
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    let echo = header.echo(i).unwrap_or_default().to_string();
                    let prompt = generation.prompt_logprobs.get(i / header.n).cloned().unwrap_or_default();
                    CompletionChoice {
                        index: i as u32,
                        logprobs: want_logprobs.then(|| prompt.extended(legacy_logprobs(&c.logprobs), echo.chars().count())),
                        text: echo + &c.text,
                        finish_reason: Some(c.finish.unwrap_or("stop").to_string()),
                    }
                })
                .collect(),
            usage: Some(usage),
        }),
    }
    .map_err(|e| ApiError::internal(format!("cannot encode the response: {e}")))?;
    Ok(HttpResponse::Ok().json(body))
}

/// Streams the choices as server-sent events.
pub fn stream(
    shape: Shape,
    header: Header,
    n: usize,
    mut generation: Generation,
    include_usage: bool,
) -> HttpResponse {
    let events = async_stream::stream! {
        let mut usage = Usage { prompt_tokens: generation.prompt_tokens, ..Default::default() };
        // Chat opens every choice with the assistant role; echo opens completions.
        for index in 0..n as u32 {
            let opening = match shape {
                Shape::Chat => Some(chat_chunk(&header, index, ChunkDelta { role: Some("assistant"), content: Some(String::new()), tool_calls: None }, None, None)),
                Shape::Completion => header.echo(index as usize).map(|p| {
                    let prompt = generation.prompt_logprobs.get(index as usize / header.n).cloned();
                    completion_chunk(&header, index, p.to_string(), None, prompt)
                }),
            };
            if let Some(chunk) = opening {
                yield Ok::<Bytes, actix_web::Error>(sse(&chunk));
            }
        }
        let mut finished = 0;
        let mut calls_sent = vec![0u32; n];
        while finished < n {
            let chunk = match generation.events.recv().await {
                Some(Event::Piece { index, text, logprob }) => match shape {
                    Shape::Chat => chat_chunk(&header, index, ChunkDelta { role: None, content: Some(text), tool_calls: None }, None, logprob.map(|l| ChoiceLogprobs { content: vec![l] })),
                    Shape::Completion => {
                        let logprobs = logprob.map(|l| legacy_logprobs(&[l]));
                        completion_chunk(&header, index, text, None, logprobs)
                    }
                },
                Some(Event::ToolCalls { index, calls }) => {
                    // Each call whole in one delta (OpenAI's incremental shape
                    // with the arguments in a single piece).
                    let first = calls_sent[index as usize];
                    calls_sent[index as usize] += calls.len() as u32;
                    let deltas = calls
                        .into_iter()
                        .enumerate()
                        .map(|(i, call)| ToolCallDelta { index: first + i as u32, call })
                        .collect();
                    chat_chunk(&header, index, ChunkDelta { role: None, content: None, tool_calls: Some(deltas) }, None, None)
                }
                Some(Event::Finished { index, reason, usage: u }) => {
                    usage.add(u);
                    finished += 1;
                    match shape {
                        Shape::Chat => chat_chunk(&header, index, ChunkDelta::default(), Some(reason), None),
                        Shape::Completion => completion_chunk(&header, index, String::new(), Some(reason), None),
                    }
                }
                Some(Event::Failed { error, .. }) => {
                    yield Ok(sse(&serde_json::to_value(error.body()).unwrap_or_default()));
                    return;
                }
                None => {
                    let error = ApiError::internal("generation ended before every choice finished");
                    yield Ok(sse(&serde_json::to_value(error.body()).unwrap_or_default()));
                    return;
                }
            };
            yield Ok(sse(&chunk));
        }
        if include_usage {
            let last = match shape {
                Shape::Chat => serde_json::to_value(ChatCompletionChunk {
                    id: header.id.clone(),
                    object: "chat.completion.chunk",
                    created: header.created,
                    model: header.model.clone(),
                    system_fingerprint: header.fingerprint.clone(),
                    choices: vec![],
                    usage: Some(usage),
                }),
                Shape::Completion => serde_json::to_value(Completion {
                    id: header.id.clone(),
                    object: "text_completion",
                    created: header.created,
                    model: header.model.clone(),
                    system_fingerprint: header.fingerprint.clone(),
                    choices: vec![],
                    usage: Some(usage),
                }),
            };
            yield Ok(sse(&last.unwrap_or_default()));
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
    };
    event_stream(events)
}

/// A 200 of server-sent events, unbuffered by proxies.
pub(crate) fn event_stream(
    events: impl futures::Stream<Item = Result<Bytes, actix_web::Error>> + 'static,
) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(events)
}

fn sse(value: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn chat_chunk(
    header: &Header,
    index: u32,
    delta: ChunkDelta,
    finish: Option<&str>,
    logprobs: Option<ChoiceLogprobs>,
) -> serde_json::Value {
    serde_json::to_value(ChatCompletionChunk {
        id: header.id.clone(),
        object: "chat.completion.chunk",
        created: header.created,
        model: header.model.clone(),
        system_fingerprint: header.fingerprint.clone(),
        choices: vec![ChunkChoice {
            index,
            delta,
            finish_reason: finish.map(str::to_string),
            logprobs,
        }],
        usage: None,
    })
    .unwrap_or_default()
}

fn completion_chunk(
    header: &Header,
    index: u32,
    text: String,
    finish: Option<&str>,
    logprobs: Option<CompletionLogprobs>,
) -> serde_json::Value {
    serde_json::to_value(Completion {
        id: header.id.clone(),
        object: "text_completion",
        created: header.created,
        model: header.model.clone(),
        system_fingerprint: header.fingerprint.clone(),
        choices: vec![CompletionChoice {
            index,
            text,
            finish_reason: finish.map(str::to_string),
            logprobs,
        }],
        usage: None,
    })
    .unwrap_or_default()
}

/// The legacy completions layout of generated tokens' log-probabilities,
/// text offsets in characters (as OpenAI counts them) from 0.
fn legacy_logprobs(tokens: &[TokenLogprob]) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut at = 0;
    for t in tokens {
        out.text_offset.push(at);
        at += t.token.chars().count();
        out.tokens.push(t.token.clone());
        out.token_logprobs.push(Some(t.logprob));
        out.top_logprobs.push(Some(
            t.top_logprobs
                .iter()
                .map(|a| (a.token.clone(), a.logprob))
                .collect::<BTreeMap<_, _>>(),
        ));
    }
    out
}
