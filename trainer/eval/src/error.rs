//! The errors of fusechat-eval, each saying what it was doing.

/// Everything that can stop an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("eval config: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// An error from fusechat-data, with what the evaluation was doing.
    #[error("{what}: {}", fusechat_data::error::chain(err))]
    Data { what: String, err: fusechat_data::DataError },
    /// A prompt of the training side reached the evaluation: a bug, refused.
    #[error("prompt `{0}` is on the training side; evaluation uses only the evaluation side")]
    TrainingPrompt(String),
    #[error("pool `{0}` named in [sizes] is not a pool of the data config")]
    UnknownPool(String),
    #[error("pool `{pool}`: {msg}")]
    Pool { pool: String, msg: String },
    #[error("an instruction pool is evaluated but the config has no [judge]")]
    NoJudge,
    #[error("writing the report: {0}")]
    Report(String),
}

impl EvalError {
    pub fn data(what: impl Into<String>, err: fusechat_data::DataError) -> Self {
        EvalError::Data {
            what: what.into(),
            err,
        }
    }
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        EvalError::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;
