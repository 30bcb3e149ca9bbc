//! fusechat's server: the OpenAI API over mistralrs engines, one per model.
//!
//! Follow a request: `routes` (HTTP) -> `validation` (checks, defaults) ->
//! `generate` (context check, `queue` admission, engine sequences, `stop`
//! filtering, timing) -> `respond` (JSON body or server-sent events).
//! `/v1/responses` takes the same path, with `responses` (over the wire
//! types of `responses_protocol`) in place of `validation` and `respond`.
//! `engine` loads models; `state` holds them and their aliases; `admin`
//! hot-swaps them; `metrics` and `openapi` serve
//! `/metrics` and `/openapi.json`; `app` wires it together.

pub mod admin;
pub mod app;
pub mod config;
pub mod drain;
pub mod engine;
pub mod error;
pub mod generate;
pub mod holding;
pub mod logit_bias;
pub mod metrics;
pub mod openapi;
pub mod placement;
pub mod prompt_logprobs;
pub mod protocol;
pub mod queue;
pub mod respond;
pub mod responses;
pub mod responses_protocol;
pub mod routes;
pub mod seeded;
pub mod state;
pub mod stop;
pub mod tools;
pub mod validation;

pub use app::serve;
pub use config::ServerConfig;
