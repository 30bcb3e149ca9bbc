//! Errors in OpenAI's shape: `{"error":{"message","type","param","code"}}`.
//! Every failure a client can see goes through [`ApiError`], so the status,
//! the type and the code always agree.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, sent as `Retry-After` (429 and 503).
    pub retry_after: Option<u64>,
}

pub use fusechat_admin_api::{ErrorBody, ErrorDetail};

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 for a parameter that is present but wrong.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            code: Some("invalid_value"),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400 for a request field this server does not implement.
    pub fn unsupported_param(param: &str) -> Self {
        Self {
            param: Some(param.to_string()),
            code: Some("unsupported_parameter"),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("`{param}` is not supported by this server; leave it out (the README lists the parameters it implements and the ones it accepts and ignores)."),
            )
        }
    }

    /// 400 for a body that is not the JSON we expect.
    pub fn invalid_body(message: impl Into<String>, param: Option<String>) -> Self {
        Self {
            param,
            code: Some("invalid_request_body"),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// `param` is the field holding the prompt: `messages` or `prompt`.
    pub fn context_length_exceeded(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            code: Some("context_length_exceeded"),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model".to_string()),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{model}` does not exist. GET /v1/models lists the models served here."),
            )
        }
    }

    /// 404 for something the model does not have (e.g. a tokenizer config).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            code: Some("not_found"),
            ..Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
        }
    }

    pub fn model_not_ready(model: &str, state: &str) -> Self {
        Self {
            code: Some("model_not_ready"),
            retry_after: Some(5),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!("The model `{model}` is not ready ({state}). GET /ready says when every model is loaded."),
            )
        }
    }

    /// The server is shutting down (SIGTERM): a client retries, and the
    /// Service sends it to another replica.
    pub fn draining() -> Self {
        Self {
            code: Some("server_shutting_down"),
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "This server is shutting down and takes no new requests; retry (another replica will answer).",
            )
        }
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self {
            code: Some("payload_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("The request body is larger than the limit of {limit} bytes (limits.max_body_bytes)."),
            )
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
        }
    }

    pub fn overloaded(model: &str, retry_after: u64) -> Self {
        Self {
            code: Some("rate_limit_exceeded"),
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("The queue of model `{model}` is full. Retry after {retry_after} s."),
            )
        }
    }

    pub fn not_found_route(path: &str) -> Self {
        Self {
            code: Some("unknown_url"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("Unknown request URL: {path}."),
            )
        }
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self {
            code: Some("method_not_allowed"),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                format!("{method} is not allowed on {path}."),
            )
        }
    }

    /// 403: an admin load outside the configured model root.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self {
            code: Some("forbidden_path"),
            ..Self::new(StatusCode::FORBIDDEN, "permission_error", message)
        }
    }

    /// 409: the request clashes with the current state (a load already running,
    /// unloading a model an alias points at).
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            ..Self::new(StatusCode::CONFLICT, "invalid_request_error", message)
        }
    }

    /// 422: the weights could not be loaded; what was serving still serves.
    pub fn load_failed(message: impl Into<String>) -> Self {
        Self {
            code: Some("model_load_failed"),
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", message)
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: self.code.map(str::to_string),
            },
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(seconds) = self.retry_after {
            response.insert_header((header::RETRY_AFTER, seconds.to_string()));
        }
        response.json(self.body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_openai_shape() {
        let err = ApiError::model_not_found("nope");
        let value = serde_json::to_value(err.body()).unwrap();
        let detail = &value["error"];
        assert_eq!(detail["type"], "invalid_request_error");
        assert_eq!(detail["code"], "model_not_found");
        assert_eq!(detail["param"], "model");
        assert!(detail["message"].as_str().unwrap().contains("nope"));
        assert_eq!(value.as_object().unwrap().len(), 1);
    }

    #[test]
    fn internal_error_has_null_code_and_param() {
        let value = serde_json::to_value(ApiError::internal("boom").body()).unwrap();
        assert!(value["error"]["code"].is_null());
        assert!(value["error"]["param"].is_null());
    }

    #[test]
    fn overload_sets_retry_after() {
        let response = ApiError::overloaded("m", 3).error_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers().get(header::RETRY_AFTER).unwrap(), "3");
    }
}
