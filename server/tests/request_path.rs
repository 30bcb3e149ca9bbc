//! The request path (validation, admission, generation, stop strings,
//! answers and streams) tested against a scripted engine: a task that
//! answers the mistralrs requests the server sends, with chunks from a
//! script, as text-generation-inference tests its router against a fake
//! backend. No weights; each test runs in milliseconds.

use std::sync::{Arc, Mutex};

use actix_web::{test, web, App};
use fusechat_server::config::{ModelConfig, ServerConfig};
use fusechat_server::engine::LoadedModel;
use fusechat_server::state::{AppState, ModelSlot};
use fusechat_server::tools::TemplateSupport;
use mistralrs::core::{
    ChatCompletionChunkResponse, ChunkChoice, CompletionChunkChoice, CompletionChunkResponse, Delta, RequestMessage,
};
use mistralrs::{NormalRequest, Request, Response, Usage};
use serde_json::{json, Value};
use tokio::sync::mpsc;

const MODEL: &str = "scripted";

/// What the scripted engine does with each generation request.
#[derive(Clone, Default)]
struct Script {
    /// The text pieces it streams, one chunk each.
    pieces: Vec<&'static str>,
    /// After this many pieces, an engine error instead of the rest.
    fail_after: Option<usize>,
}

/// What the engine saw, for the tests to check.
#[derive(Default)]
struct Seen {
    /// `max_len` of each generation request.
    max_lens: Vec<Option<usize>>,
    /// Whether each generation request carried stop strings.
    engine_stops: Vec<bool>,
    /// Sequences whose receiver was dropped before they ended (cancelled).
    cancelled: usize,
}

/// Starts the scripted engine; its request channel is the model's engine.
fn scripted_engine(script: Script, seen: Arc<Mutex<Seen>>) -> mpsc::Sender<Request> {
    let (tx, mut rx) = mpsc::channel::<Request>(64);
    tokio::spawn(async move {
        while let Some(request) = rx.recv().await {
            match request {
                // A token per word, and three per chat message (its role
                // and the template's markers).
                Request::Tokenize(t) => {
                    let count = match &t.text {
                        either::Either::Left(messages) => 3 * messages.len(),
                        either::Either::Right(text) => text.split_whitespace().count(),
                    };
                    let _ = t.response.send(Ok(vec![7; count.max(1)])).await;
                }
                Request::Detokenize(d) => {
                    let _ = d.response.send(Ok(format!("<{} tokens>", d.tokens.len()))).await;
                }
                Request::Normal(normal) => {
                    {
                        let mut seen = seen.lock().unwrap();
                        seen.max_lens.push(normal.sampling_params.max_len);
                        seen.engine_stops.push(normal.sampling_params.stop_toks.is_some());
                    }
                    tokio::spawn(generate(*normal, script.clone(), seen.clone()));
                }
                _ => {}
            }
        }
    });
    tx
}

/// Streams the script's pieces as the engine streams a sequence: chat or
/// completion chunks, the last with its finish reason, up to `max_len`.
async fn generate(request: NormalRequest, script: Script, seen: Arc<Mutex<Seen>>) {
    let chat = matches!(request.messages, RequestMessage::Chat { .. });
    let max_len = request.sampling_params.max_len.unwrap_or(usize::MAX);
    let out = request.response;
    let n = script.pieces.len().min(max_len);
    for (i, piece) in script.pieces.iter().take(n).enumerate() {
        if script.fail_after == Some(i) {
            let _ = out.send(Response::InternalError("the scripted engine failed".into())).await;
            return;
        }
        let last = i + 1 == n;
        let finish = last.then(|| if n < script.pieces.len() { "length" } else { "stop" }.to_string());
        let response = if chat {
            Response::Chunk(ChatCompletionChunkResponse {
                id: "x".into(),
                choices: vec![ChunkChoice {
                    finish_reason: finish,
                    index: 0,
                    delta: Delta { content: Some(piece.to_string()), role: "assistant".into(), tool_calls: None, reasoning_content: None },
                    logprobs: None,
                }],
                created: 0,
                model: MODEL.into(),
                system_fingerprint: String::new(),
                object: "chat.completion.chunk".into(),
                usage: last.then(|| usage(5, n)),
            })
        } else {
            Response::CompletionChunk(CompletionChunkResponse {
                id: "x".into(),
                choices: vec![CompletionChunkChoice { text: piece.to_string(), index: 0, logprobs: None, finish_reason: finish }],
                created: 0,
                model: MODEL.into(),
                system_fingerprint: String::new(),
                object: "text_completion".into(),
            })
        };
        if out.send(response).await.is_err() {
            seen.lock().unwrap().cancelled += 1;
            return;
        }
        // A decode step's worth of time, so that the server reads each
        // piece before the next is made.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

fn usage(prompt: usize, completion: usize) -> Usage {
    Usage {
        completion_tokens: completion,
        prompt_tokens: prompt,
        total_tokens: prompt + completion,
        avg_tok_per_sec: 0.0,
        avg_prompt_tok_per_sec: 0.0,
        avg_compl_tok_per_sec: 0.0,
        total_time_sec: 0.0,
        total_prompt_time_sec: 0.0,
        total_completion_time_sec: 0.0,
    }
}

/// The server's state with one ready model over the scripted engine.
fn state(script: Script, max_seqs: usize, max_waiting: usize) -> (web::Data<AppState>, Arc<Mutex<Seen>>) {
    state_with(script, max_seqs, max_waiting, |_| {})
}

/// The same, with the model changed by `adjust` before it serves.
fn state_with(
    script: Script,
    max_seqs: usize,
    max_waiting: usize,
    adjust: impl FnOnce(&mut LoadedModel),
) -> (web::Data<AppState>, Arc<Mutex<Seen>>) {
    let config: ServerConfig = toml::from_str("").unwrap();
    let state = AppState::new(config, std::env::temp_dir());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut model = ModelConfig::from_path(MODEL, "unused".into());
    (model.max_seqs, model.max_waiting) = (max_seqs, max_waiting);
    let engine = scripted_engine(script, seen.clone());
    let mut model = LoadedModel::over(&model, Box::new(engine), 64);
    adjust(&mut model);
    state.set(MODEL, ModelSlot::Ready(Arc::new(model)));
    (web::Data::new(state), seen)
}

macro_rules! app {
    ($state:expr) => {
        test::init_service(App::new().app_data($state.clone()).configure(fusechat_server::app::configure)).await
    };
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

/// The `data:` payloads of a server-sent event stream, `[DONE]` excluded.
fn events(body: &[u8]) -> (Vec<Value>, bool) {
    let text = std::str::from_utf8(body).unwrap();
    let mut done = false;
    let mut values = Vec::new();
    for line in text.lines() {
        match line.strip_prefix("data: ") {
            Some("[DONE]") => done = true,
            Some(data) => values.push(serde_json::from_str(data).unwrap()),
            None => {}
        }
    }
    (values, done)
}

/// Each choice's streamed text, by index.
fn streamed_texts(chunks: &[Value], n: usize) -> Vec<String> {
    let mut texts = vec![String::new(); n];
    for chunk in chunks {
        for choice in chunk["choices"].as_array().unwrap() {
            let index = choice["index"].as_u64().unwrap() as usize;
            let piece = choice["delta"]["content"].as_str().or(choice["text"].as_str()).unwrap_or_default();
            texts[index].push_str(piece);
        }
    }
    texts
}

/// POSTs `body` as JSON: the status and the body.
macro_rules! post {
    ($app:expr, $path:expr, $body:expr) => {{
        let response = test::call_service(&$app, test::TestRequest::post().uri($path).set_json($body).to_request()).await;
        let status = response.status().as_u16();
        (status, test::read_body(response).await)
    }};
}

#[actix_web::test]
async fn a_chat_answer_whole_and_streamed() {
    let (state, _) = state(Script { pieces: vec!["Hello", ", ", "world", "."], ..Default::default() }, 4, 4);
    let app = app!(state);
    let (status, body) = post!(app, "/v1/chat/completions", chat(json!({})));
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "Hello, world.");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert_eq!(answer["usage"]["completion_tokens"], 4);

    let (status, body) = post!(app, "/v1/chat/completions", chat(json!({"stream": true, "stream_options": {"include_usage": true}})));
    assert_eq!(status, 200);
    let (chunks, done) = events(&body);
    assert!(done, "the stream ends with [DONE]");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(streamed_texts(&chunks, 1), vec!["Hello, world."]);
    let finish: Vec<_> = chunks.iter().filter_map(|c| c["choices"][0]["finish_reason"].as_str()).collect();
    assert_eq!(finish, vec!["stop"]);
    let last = chunks.last().unwrap();
    assert_eq!((last["choices"].as_array().unwrap().len(), last["usage"]["total_tokens"].as_u64()), (0, Some(9)));
}

#[actix_web::test]
async fn stop_strings_across_chunk_boundaries_cut_the_text() {
    // "o, w" spans three pieces; "wor" would start in the third.
    let pieces = vec!["Hell", "o", ", ", "wor", "ld"];
    let (state, _) = state(Script { pieces, ..Default::default() }, 4, 4);
    let app = app!(state);
    for stream in [false, true] {
        let (status, body) = post!(app, "/v1/chat/completions", chat(json!({"stop": ["o, w", "xyz"], "stream": stream})));
        assert_eq!(status, 200);
        let text = if stream {
            streamed_texts(&events(&body).0, 1).remove(0)
        } else {
            serde_json::from_slice::<Value>(&body).unwrap()["choices"][0]["message"]["content"].as_str().unwrap().to_string()
        };
        assert_eq!(text, "Hell", "stream: {stream}");
    }
    // A possible start of a stop string that turns out not to be one is released.
    let (_, body) = post!(app, "/v1/chat/completions", chat(json!({"stop": ["ld!"]})));
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["choices"][0]["message"]["content"], "Hello, world");
}

#[actix_web::test]
async fn n_choices_each_get_the_whole_answer_and_usage_adds_up() {
    let (state, seen) = state(Script { pieces: vec!["a", "b", "c"], ..Default::default() }, 4, 4);
    let app = app!(state);
    let (status, body) = post!(app, "/v1/completions", json!({"model": MODEL, "prompt": "one two", "n": 3, "max_tokens": 2}));
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    let choices = answer["choices"].as_array().unwrap();
    assert_eq!(choices.iter().map(|c| c["index"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert!(choices.iter().all(|c| c["text"] == "ab" && c["finish_reason"] == "length"), "{choices:?}");
    // Two prompt tokens (one per word, counted once), 2 generated per choice.
    assert_eq!(answer["usage"], json!({"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}));
    assert_eq!(seen.lock().unwrap().max_lens, vec![Some(2); 3]);

    let (_, body) = post!(app, "/v1/completions", json!({"model": MODEL, "prompt": "one two", "n": 2, "stream": true}));
    let (chunks, done) = events(&body);
    assert!(done);
    assert_eq!(streamed_texts(&chunks, 2), vec!["abc", "abc"]);
}

#[actix_web::test]
async fn an_engine_error_is_an_openai_error() {
    let (state, _) = state(Script { pieces: vec!["a", "b", "c"], fail_after: Some(1) }, 4, 4);
    let app = app!(state);
    let (status, body) = post!(app, "/v1/chat/completions", chat(json!({})));
    assert_eq!(status, 500);
    let error: Value = serde_json::from_slice(&body).unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("the scripted engine failed"), "{error}");
    // Streamed: the text so far, then the error as the last event.
    let (status, body) = post!(app, "/v1/chat/completions", chat(json!({"stream": true})));
    assert_eq!(status, 200);
    let (chunks, done) = events(&body);
    assert!(!done, "a failed stream does not claim [DONE]");
    assert_eq!(streamed_texts(&chunks[..chunks.len() - 1], 1), vec!["a"]);
    assert!(chunks.last().unwrap()["error"]["message"].as_str().unwrap().contains("scripted engine failed"));
}

#[actix_web::test]
async fn bad_requests_are_refused_before_the_engine() {
    let (state, seen) = state(Script { pieces: vec!["a"], ..Default::default() }, 2, 0);
    let app = app!(state);
    for (body, status, param) in [
        (chat(json!({"temperature": 3})), 400, Some("temperature")),
        (chat(json!({"n": 3})), 400, Some("n")),
        (chat(json!({"best_of": 2})), 400, Some("best_of")),
        (chat(json!({"max_tokens": 100})), 400, Some("messages")),
        (json!({"model": "nope", "messages": [{"role": "user", "content": "Hi"}]}), 404, Some("model")),
    ] {
        let (got, answer) = post!(app, "/v1/chat/completions", body.clone());
        let answer: Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(got, status, "{body}: {answer}");
        assert_eq!(answer["error"]["param"].as_str(), param, "{body}: {answer}");
    }
    assert!(seen.lock().unwrap().max_lens.is_empty(), "nothing reached the engine");
}

#[actix_web::test]
async fn with_tools_the_stop_strings_stay_out_of_the_engine() {
    // A template that renders tools and Qwen's <tool_call> blocks.
    let qwen = TemplateSupport::of(Some("{% if tools %}{{ tools }}<tool_call>{% endif %}"));
    let pieces = vec!["x", "yz", "a", "b", "c", "d", "e", "f"];
    let (state, seen) = state_with(Script { pieces, ..Default::default() }, 2, 2, |m| m.tool_support = qwen);
    let app = app!(state);
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let (_, plain) = post!(app, "/v1/chat/completions", chat(json!({"stop": ["y"]})));
    let (status, with_tools) = post!(app, "/v1/chat/completions", chat(json!({"stop": ["y"], "tools": tools})));
    assert_eq!(status, 200);
    // The engine got the stop strings only without tools ...
    assert_eq!(seen.lock().unwrap().engine_stops, vec![true, false]);
    // ... and the server's filter cut the text at them both times.
    let answers: Vec<Value> = [plain, with_tools].iter().map(|b| serde_json::from_slice(b).unwrap()).collect();
    for answer in &answers {
        assert_eq!(answer["choices"][0]["message"]["content"], "x");
        assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    }
    // Beside tools the choice ended at the stop string: two pieces read,
    // and the sequence cancelled before its end.
    assert_eq!(answers[1]["usage"]["completion_tokens"], 2);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(seen.lock().unwrap().cancelled, 1);
}

#[actix_web::test]
async fn the_responses_api_streams_its_events_in_order() {
    let (state, _) = state(Script { pieces: vec!["Hi", " there"], ..Default::default() }, 2, 2);
    let app = app!(state);
    let (status, body) = post!(app, "/v1/responses", json!({"model": MODEL, "input": "Hello", "stream": true}));
    assert_eq!(status, 200);
    let text = std::str::from_utf8(&body).unwrap();
    let names: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(names, vec![
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed",
    ]);
    let (events, _) = events(&body);
    let last = events.last().unwrap();
    assert_eq!(last["response"]["output"][0]["content"][0]["text"], "Hi there");
    assert_eq!(last["response"]["usage"]["output_tokens"], 2);
}
