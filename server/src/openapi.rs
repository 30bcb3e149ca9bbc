//! The OpenAPI document, generated from the handlers and types. The copy
//! checked in at `openapi/openapi.json` must equal it (a test checks);
//! `fusechat openapi > openapi/openapi.json` refreshes it.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::{ErrorBody, ErrorDetail};
use crate::protocol::*;
use crate::responses_protocol::*;
use crate::{admin, routes};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fusechat",
        description = "OpenAI-compatible serving of the source and fused models.",
        license(name = "Apache-2.0")
    ),
    paths(
        routes::chat_completions,
        routes::completions,
        routes::responses,
        routes::list_models,
        routes::get_model,
        routes::tokenize,
        routes::detokenize,
        routes::tokenizer_info,
        routes::health,
        routes::ready,
        routes::metrics,
        routes::openapi_json,
        admin::list,
        admin::load_model,
        admin::unload_model,
        admin::set_alias,
        admin::remove_alias,
    ),
    components(schemas(
        ChatCompletionRequest, CompletionRequest, SamplingRequest, StopSequences, PromptInput,
        StreamOptions, ChatMessage, MessageContent, ContentPart, ResponseFormat, JsonSchemaFormat,
        ChatCompletion, ChatChoice, AssistantMessage, ChatCompletionChunk, ChunkChoice, ChunkDelta,
        ChoiceLogprobs, TokenLogprob, TopLogprob, Usage, Completion, CompletionChoice,
        CompletionLogprobs, ModelList, ModelCard, HealthStatus, ErrorBody, ErrorDetail,
        TokenizeRequest, TokenizeResponse, DetokenizeRequest, DetokenizeResponse,
        ToolDefinition, FunctionDefinition, ToolChoiceInput, NamedToolChoice, FunctionName, ToolCall,
        FunctionCall, ToolCallDelta,
        ResponsesRequest, InputSchema, InputItem, InputMessage, InputContent, InputPart, FunctionCallItem,
        FunctionCallOutputItem, ResponseTool, ResponseToolChoice, NamedFunction, TextConfig, TextFormat,
        ResponseObject, ResponseError, IncompleteDetails, OutputItem, OutputText, ResponseUsage,
        InputTokensDetails, OutputTokensDetails,
        admin::LoadModelRequest, admin::LoadedModelInfo, admin::SetAliasRequest, admin::AliasInfo,
        admin::UnloadedModel, admin::RemovedAlias, admin::AdminModels, admin::ModelStatus, admin::Serving,
        fusechat_admin_api::Isq,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "openai", description = "The OpenAI API"),
        (name = "ops", description = "Health, readiness, metrics"),
        (name = "tokenizer", description = "vLLM's tokenizer routes"),
        (name = "admin", description = "Hot-swap: load, alias, unload (admin key)"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as served and as checked in (pretty JSON, trailing newline).
pub fn document() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn checked_in_document_is_current() {
        let checked_in = include_str!("../../openapi/openapi.json");
        assert!(
            checked_in == super::document(),
            "openapi/openapi.json is stale: run `fusechat openapi > openapi/openapi.json`"
        );
    }
}
