//! What can stop a fusion run, each with what to fix.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum FuseError {
    #[error("fuse config: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Server(String),
    /// The server answered a request with an error status.
    #[error("server: {what}: HTTP {status}: {message}")]
    Http {
        what: String,
        status: u16,
        message: String,
    },
    /// A stage failed; `stage` names it so the user knows where to look
    /// (the cause's whole chain is in the message).
    #[error("stage `{stage}`: {cause:#}")]
    Stage {
        stage: &'static str,
        cause: anyhow::Error,
    },
}

pub type Result<T> = std::result::Result<T, FuseError>;

/// Wraps a stage's error with the stage's name.
pub fn stage<E: Into<anyhow::Error>>(stage: &'static str) -> impl FnOnce(E) -> FuseError {
    move |e| FuseError::Stage {
        stage,
        cause: e.into(),
    }
}

pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FuseError {
    let what = what.into();
    move |source| FuseError::Io { what, source }
}
