//! HTTP handlers, one per route. Each reads and validates its input, hands
//! the work to `generate`, and lets `respond` write the answer.

use actix_web::{http::header, web, HttpRequest, HttpResponse};
use futures::StreamExt;

use crate::engine::{Conversation, LoadedModel, Prompt, TokenizerError};
use crate::error::{ApiError, ErrorBody};
use crate::generate;
use crate::protocol::{
    ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, DetokenizeRequest,
    DetokenizeResponse, HealthStatus, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
    TokenizerInfoQuery,
};
use crate::respond::{self, Header, Shape};
use crate::responses::{self, Assembly};
use crate::responses_protocol::{ResponseObject, ResponsesRequest};
use crate::state::{AppState, ModelSlot};
use crate::validation::{self, GenerateRequest};

/// Reads the body, refusing more than `limit` bytes with 413.
async fn read_body(req: &HttpRequest, mut payload: web::Payload, limit: usize) -> Result<Vec<u8>, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::payload_too_large(limit));
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid_body(format!("cannot read the request body: {e}"), None))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::payload_too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

async fn run(state: &AppState, shape: Shape, request: GenerateRequest) -> Result<HttpResponse, ApiError> {
    let model = state.model(&request.model)?;
    let echo = if request.echo { echoed_prompts(&model, &request.prompts).await? } else { Vec::new() };
    // The concrete model answers (as OpenAI names the snapshot behind an alias).
    let header = Header::new(shape, model.id.clone(), model.fingerprint.clone(), echo, request.n);
    let (n, stream, include_usage, want_logprobs) = (
        request.n * request.prompts.len(),
        request.stream,
        request.include_usage,
        request.logprobs.is_some(),
    );
    let generation = generate::start(model, request, &state.config.limits, state.metrics.clone()).await?;
    if stream {
        Ok(respond::stream(shape, header, n, generation, include_usage))
    } else {
        respond::collect(shape, header, n, generation, want_logprobs).await
    }
}

/// The text `echo` puts before each prompt's choices: the prompt itself, or
/// what its token ids decode to.
async fn echoed_prompts(model: &LoadedModel, prompts: &[Prompt]) -> Result<Vec<String>, ApiError> {
    let mut texts = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        texts.push(match prompt {
            Prompt::Text(text) => text.clone(),
            Prompt::Tokens(ids) => model
                .detokenize(ids.clone(), false)
                .await
                .map_err(|e| tokenizer_error(e, "prompt"))?,
            Prompt::Chat(_) => String::new(),
        });
    }
    Ok(texts)
}

/// A tokenizer's refusal is the caller's 400 on `param`.
fn tokenizer_error(e: TokenizerError, param: &str) -> ApiError {
    match e {
        TokenizerError::Refused(why) => ApiError::invalid_param(param, why),
        TokenizerError::Api(e) => e,
    }
}

/// Creates a chat completion.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion, or with `stream: true` server-sent events of `ChatCompletionChunk` ending in `data: [DONE]`", body = ChatCompletion),
        (status = 400, description = "Invalid parameter, or prompt over the context (`context_length_exceeded`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model (`model_not_found`)", body = ErrorBody),
        (status = 413, description = "Body over `limits.max_body_bytes`", body = ErrorBody),
        (status = 429, description = "The model's queue is full; see `Retry-After`", body = ErrorBody),
        (status = 503, description = "The model is still loading (`model_not_ready`), or the server is shutting down (`server_shutting_down`); see `Retry-After`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn chat_completions(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, payload, state.config.limits.max_body_bytes).await?;
    let parsed: ChatCompletionRequest = validation::parse_body(&body)?;
    let request = validation::validate_chat(parsed, &state.config.limits)?;
    run(&state, Shape::Chat, request).await
}

/// Creates a completion of raw text (legacy).
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "openai",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion, or server-sent events with `stream: true`", body = Completion),
        (status = 400, description = "Invalid parameter", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody),
        (status = 503, description = "The model is still loading, or the server is shutting down; see `Retry-After`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn completions(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, payload, state.config.limits.max_body_bytes).await?;
    let parsed: CompletionRequest = validation::parse_body(&body)?;
    let request = validation::validate_completion(parsed, &state.config.limits)?;
    run(&state, Shape::Completion, request).await
}

/// Creates a model response (the Responses API, stateless: nothing is
/// stored, so `previous_response_id` is refused and the conversation goes
/// whole in `input`).
#[utoipa::path(
    post,
    path = "/v1/responses",
    tag = "openai",
    request_body = ResponsesRequest,
    responses(
        (status = 200, description = "The response, or with `stream: true` server-sent events named by their `type`: `response.created`, `response.in_progress`, `response.output_item.added`, `response.content_part.added`, `response.output_text.delta`, `response.output_text.done`, `response.content_part.done`, `response.function_call_arguments.delta`, `response.function_call_arguments.done`, `response.output_item.done`, then `response.completed`, `response.incomplete` (at `max_output_tokens`) or `response.failed`", body = ResponseObject),
        (status = 400, description = "Invalid or unsupported parameter (`previous_response_id`, hosted tools, non-text input parts), or input over the context", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Queue full", body = ErrorBody),
        (status = 503, description = "The model is still loading, or the server is shutting down; see `Retry-After`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn responses(state: web::Data<AppState>, req: HttpRequest, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, payload, state.config.limits.max_body_bytes).await?;
    let parsed: ResponsesRequest = validation::parse_body(&body)?;
    let (request, echo) = responses::validate(parsed, &state.config.limits)?;
    let model = state.model(&request.model)?;
    let assembly = Assembly::new(model.id.clone(), echo);
    let stream = request.stream;
    let generation = generate::start(model, request, &state.config.limits, state.metrics.clone()).await?;
    if stream {
        Ok(responses::stream(assembly, generation))
    } else {
        responses::collect(assembly, generation).await
    }
}

/// Token ids of a prompt, or of messages rendered with the model's chat
/// template (vLLM's route and shape).
#[utoipa::path(
    post,
    path = "/tokenize",
    tag = "tokenizer",
    request_body = TokenizeRequest,
    responses(
        (status = 200, body = TokenizeResponse),
        (status = 400, description = "Neither or both of `prompt` and `messages`, an unsupported field, or no `model` while several are served", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 503, description = "The model is still loading, or the server is shutting down", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn tokenize(state: web::Data<AppState>, req: HttpRequest, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, payload, state.config.limits.max_body_bytes).await?;
    let parsed: TokenizeRequest = validation::parse_body(&body)?;
    validation::refuse_unsupported(&parsed.other)?;
    let (prompt, param, add_generation_prompt, add_special_tokens) = match (parsed.prompt, parsed.messages) {
        (Some(text), None) => {
            if parsed.add_generation_prompt.is_some() {
                return Err(ApiError::invalid_param("add_generation_prompt", "`add_generation_prompt` goes with `messages`."));
            }
            (Prompt::Text(text), "prompt", false, parsed.add_special_tokens.unwrap_or(true))
        }
        (None, Some(messages)) => (
            Prompt::Chat(Conversation { turns: validation::chat_messages(messages)?, tools: Vec::new() }),
            "messages",
            parsed.add_generation_prompt.unwrap_or(true),
            parsed.add_special_tokens.unwrap_or(false),
        ),
        _ => return Err(ApiError::invalid_param("prompt", "Give `prompt` or `messages`, one of them.")),
    };
    let model = state.model_or_only(parsed.model.as_deref())?;
    let tokens = model
        .tokenize(&prompt, add_generation_prompt, add_special_tokens)
        .await
        .map_err(|e| tokenizer_error(e, param))?;
    Ok(HttpResponse::Ok().json(TokenizeResponse { count: tokens.len(), max_model_len: model.max_seq_len, tokens }))
}

/// The text of token ids (vLLM's route and shape).
#[utoipa::path(
    post,
    path = "/detokenize",
    tag = "tokenizer",
    request_body = DetokenizeRequest,
    responses(
        (status = 200, body = DetokenizeResponse),
        (status = 400, description = "A token id outside the vocabulary, an unsupported field, or no `model` while several are served", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 503, description = "The model is still loading, or the server is shutting down", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn detokenize(state: web::Data<AppState>, req: HttpRequest, payload: web::Payload) -> Result<HttpResponse, ApiError> {
    let body = read_body(&req, payload, state.config.limits.max_body_bytes).await?;
    let parsed: DetokenizeRequest = validation::parse_body(&body)?;
    validation::refuse_unsupported(&parsed.other)?;
    let model = state.model_or_only(parsed.model.as_deref())?;
    let prompt = model
        .detokenize(parsed.tokens, false)
        .await
        .map_err(|e| tokenizer_error(e, "tokens"))?;
    Ok(HttpResponse::Ok().json(DetokenizeResponse { prompt }))
}

/// The model's tokenizer configuration (vLLM's route; lm-evaluation-harness
/// reads the special tokens and the chat template from it).
#[utoipa::path(
    get,
    path = "/tokenizer_info",
    tag = "tokenizer",
    params(TokenizerInfoQuery),
    responses(
        (status = 200, description = "tokenizer_config.json as the engine uses it: `tokenizer_class`, the special tokens as strings, `chat_template`, `model_max_length` (the served context)", body = Object),
        (status = 400, description = "No `model` while several are served", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "Unknown model, or a model whose tokenizer mistralrs builds from its GGUF (no tokenizer config to give)", body = ErrorBody),
        (status = 503, description = "The model is still loading, or the server is shutting down", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn tokenizer_info(
    state: web::Data<AppState>,
    query: web::Query<TokenizerInfoQuery>,
) -> Result<HttpResponse, ApiError> {
    let model = state.model_or_only(query.model.as_deref())?;
    let mut info = model.tokenizer_config.clone().ok_or_else(|| {
        ApiError::not_found(format!(
            "Model `{}` has no tokenizer config: its tokenizer is built by the engine from the GGUF file.",
            model.id
        ))
    })?;
    // Special tokens as strings (tokenizer_config.json may give objects).
    for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
        if let Some(content) = info.get(key).and_then(|v| v.get("content")).cloned() {
            info.insert(key.into(), content);
        }
    }
    info.entry("tokenizer_class").or_insert_with(|| "PreTrainedTokenizerFast".into());
    info.insert("model_max_length".into(), model.max_seq_len.into());
    Ok(HttpResponse::Ok().json(info))
}

/// Lists the models served here.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    responses((status = 200, body = ModelList), (status = 401, body = ErrorBody)),
    security(("api_key" = []))
)]
pub async fn list_models(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(ModelList { object: "list", data: model_cards(&state) })
}

/// One model or alias, as `GET /v1/models` lists it.
#[utoipa::path(
    get,
    path = "/v1/models/{model}",
    tag = "openai",
    params(("model" = String, Path, description = "Model id or alias")),
    responses((status = 200, body = ModelCard), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = []))
)]
pub async fn get_model(state: web::Data<AppState>, path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    model_cards(&state)
        .into_iter()
        .find(|card| card.id == id)
        .map(|card| HttpResponse::Ok().json(card))
        .ok_or_else(|| ApiError::model_not_found(&id))
}

/// Every configured model, then every alias.
fn model_cards(state: &AppState) -> Vec<ModelCard> {
    let data = state
        .slots()
        .into_iter()
        .map(|(id, slot)| ModelCard {
            object: "model",
            created: 0,
            owned_by: "fusechat".into(),
            status: match &slot {
                ModelSlot::Failed(_) => "failed".into(),
                other => other.describe(),
            },
            max_model_len: match &slot {
                ModelSlot::Ready(m) => Some(m.max_seq_len),
                _ => None,
            },
            weights: match &slot {
                ModelSlot::Ready(m) => m.holding.clone(),
                _ => None,
            },
            id,
            alias_of: None,
        })
        .collect::<Vec<_>>();
    let mut data = data;
    for (alias, target) in state.aliases() {
        let (status, max_model_len, weights) = match state.model(&alias) {
            Ok(m) => ("ready".to_string(), Some(m.max_seq_len), m.holding.clone()),
            Err(_) => ("unavailable".to_string(), None, None),
        };
        data.push(ModelCard {
            id: alias,
            object: "model",
            created: 0,
            owned_by: "fusechat".into(),
            status,
            max_model_len,
            alias_of: Some(target),
            weights,
        });
    }
    data
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "ops", responses((status = 200, body = HealthStatus)))]
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(status_body(&state, "ok"))
}

/// Readiness: 200 once every configured model is loaded, 503 before and
/// from the moment a shutdown begins.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "ops",
    responses((status = 200, body = HealthStatus), (status = 503, body = HealthStatus))
)]
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    if state.drain.is_draining() {
        HttpResponse::ServiceUnavailable().json(status_body(&state, "shutting down"))
    } else if state.all_ready() {
        HttpResponse::Ok().json(status_body(&state, "ready"))
    } else {
        HttpResponse::ServiceUnavailable().json(status_body(&state, "not ready"))
    }
}

fn status_body(state: &AppState, status: &str) -> HealthStatus {
    HealthStatus {
        status: status.into(),
        models: state
            .slots()
            .into_iter()
            .map(|(id, slot)| (id, slot.describe()))
            .collect(),
    }
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state.refresh_gauges();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "ops", responses((status = 200, content_type = "application/json", body = Object)))]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(crate::openapi::document())
}

pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found_route(req.path()))
}

pub async fn method_not_allowed(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::method_not_allowed(req.method().as_str(), req.path()))
}
