//! HTTP handlers, one per route. Each reads and validates its input, hands
//! the work to `generate`, and lets `respond` write the answer.

use actix_web::{http::header, web, HttpRequest, HttpResponse};
use futures::StreamExt;

use crate::error::{ApiError, ErrorBody};
use crate::generate;
use crate::protocol::{
    ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, HealthStatus, ModelCard,
    ModelList,
};
use crate::respond::{self, Header, Shape};
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
    let echo = match (&request.prompt, request.echo) {
        (crate::engine::Prompt::Text(p), true) => Some(p.clone()),
        _ => None,
    };
    // The concrete model answers (as OpenAI names the snapshot behind an alias).
    let header = Header::new(shape, model.id.clone(), model.fingerprint.clone(), echo);
    let (n, stream, include_usage, want_logprobs) =
        (request.n, request.stream, request.include_usage, request.logprobs.is_some());
    let generation = generate::start(model, request, &state.config.limits, state.metrics.clone()).await?;
    if stream {
        Ok(respond::stream(shape, header, n, generation, include_usage))
    } else {
        respond::collect(shape, header, n, generation, want_logprobs).await
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

/// Lists the models served here.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    responses((status = 200, body = ModelList), (status = 401, body = ErrorBody)),
    security(("api_key" = []))
)]
pub async fn list_models(state: web::Data<AppState>) -> HttpResponse {
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
    HttpResponse::Ok().json(ModelList { object: "list", data })
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
