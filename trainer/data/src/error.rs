//! The errors of fusechat-data. Each kind says where to look: a config to
//! fix, an input file or row, the store, an endpoint; errors of the
//! libraries underneath keep their own type. [`Context`] puts what was being
//! done in front of an error, and the message reads as one line
//! ("pool `gsm8k`: data/gsm8k.jsonl:3: missing string field `question`").

/// Everything the data stages can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A config value that cannot be used; the message says which and why.
    #[error("{0}")]
    Config(String),
    /// A prompt file or one of its rows that cannot be read as a prompt.
    #[error("{0}")]
    Input(String),
    /// The store does not fit this run (damaged, older schema, another split).
    #[error("{0}")]
    Store(String),
    /// Nothing to work on, or a stage that cannot go on as asked.
    #[error("{0}")]
    Stage(String),
    /// An endpoint or scorer that cannot be set up.
    #[error("{0}")]
    Endpoint(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    #[error(transparent)]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
    /// What was being done, then the error and its causes (kept in the
    /// message, not as a source, so a chain printed by anyhow says it once).
    #[error("{what}: {}", chain(cause.as_ref()))]
    Context { what: String, cause: Box<DataError> },
}

/// An error's message followed by each of its causes, `": "` between them,
/// as anyhow prints a chain with `{:#}`.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// What was being done when an error happened, anyhow's way.
pub trait Context<T> {
    fn context(self, what: impl Into<String>) -> Result<T>;
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: Into<DataError>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|e| DataError::Context { what: what.into(), cause: Box::new(e.into()) })
    }

    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| DataError::Context { what: what().into(), cause: Box::new(e.into()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("unable to open database file")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_causes_of_a_wrapped_error_stay_in_the_message() {
        let io = std::io::Error::other("Error code 14");
        let e: Result<()> = Err(DataError::Io(std::io::Error::other(Outer(io))));
        let e = e.context("opening the store s.db").unwrap_err();
        assert_eq!(e.to_string(), "opening the store s.db: unable to open database file: Error code 14");
    }

    #[test]
    fn context_reads_as_one_line_and_once_through_anyhow() {
        let missing: Result<()> = Err(DataError::Input("missing string field `question`".into()));
        let e = missing.context("data/gsm8k.jsonl:3").context("pool `gsm8k`").unwrap_err();
        let line = "pool `gsm8k`: data/gsm8k.jsonl:3: missing string field `question`";
        assert_eq!(e.to_string(), line);
        let at_the_edge = anyhow::Error::from(e).context("loading the prompts");
        assert_eq!(format!("{at_the_edge:#}"), format!("loading the prompts: {line}"));
    }
}
