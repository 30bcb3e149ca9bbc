//! Data construction the FuseChat-3.0 way (issue #4): sample every source
//! model through its OpenAI-compatible endpoint, score the responses, and
//! pair them into the SFT and DPO files the trainer reads.
//!
//! - [`config`]: the one TOML config of `fusechat sample`, `score` and `pair`.
//! - [`prompts`]: prompt pools and the deterministic training/evaluation split;
//!   `hf` reads Hugging Face dataset files (JSONL, JSON, Parquet) in the common layouts.
//! - [`client`]: the OpenAI chat client (concurrency limit, retries, `Retry-After`).
//! - [`store`]: the SQLite store, the only copy, resumable after kill -9.
//! - [`sample`], [`score`], [`pair`], [`report`]: the three stages and the report.
//!
//! Errors are [`DataError`]s, each saying what to fix.
//!
//! [`score::math`] (the answer checker) and [`score::code`] (the sandbox)
//! are public for evaluation to reuse.

pub mod client;
pub mod config;
pub mod config_file;
pub mod error;
mod hf;
pub mod pair;
pub mod prompts;
pub mod report;
pub mod sample;
pub mod score;
pub mod shipped;
pub mod store;

pub use config::Config;
pub use error::{DataError, Result};
