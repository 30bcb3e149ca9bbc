//! What can go wrong while importing, worded so that the user knows what to fix.

use std::path::PathBuf;

/// An import that could not be finished. Nothing is left in the output folder when this is
/// returned: the files are written to a temporary folder next to it and only moved into place
/// once all of them are complete.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read `{}`: {source}", path.display())]
    ReadInput {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "`{}` is not a readable GGUF file ({reason}); check that the download is complete and \
         that the file really is a .gguf model",
        path.display()
    )]
    NotGguf { path: PathBuf, reason: String },

    #[error(
        "the GGUF metadata key `{key}` is {problem}; the file was probably not written by \
         llama.cpp's converter, or is for an architecture this import does not handle"
    )]
    Metadata { key: String, problem: String },

    #[error(
        "GGUF architecture `{found}` is not supported by `fusechat import` (supported: {supported})"
    )]
    UnsupportedArchitecture { found: String, supported: String },

    #[error("the model cannot be imported: {0}")]
    UnsupportedModel(String),

    #[error("the GGUF tokenizer cannot be converted: {0}")]
    Tokenizer(String),

    #[error(
        "the GGUF file lacks tensor `{name}`, which a {architecture} model needs; the file is \
         incomplete or not a plain {architecture} checkpoint"
    )]
    MissingTensor { name: String, architecture: String },

    #[error(
        "the GGUF file has tensor `{name}`, which has no Hugging Face counterpart for a \
         {architecture} model; refusing to write a checkpoint that silently drops weights"
    )]
    UnexpectedTensor { name: String, architecture: String },

    #[error("tensor `{name}` has shape {found:?}, expected {expected}")]
    TensorShape {
        name: String,
        found: Vec<usize>,
        expected: String,
    },

    #[error("cannot dequantize tensor `{name}`: {source}")]
    Tensor {
        name: String,
        #[source]
        source: candle_core::Error,
    },

    #[error(
        "the output folder `{}` already exists and is not empty; pick a new folder or remove it \
         first",
        path.display()
    )]
    OutputExists { path: PathBuf },

    #[error("cannot write `{}`: {source}", path.display())]
    WriteOutput {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ImportError {
    pub(crate) fn metadata(key: &str, problem: impl Into<String>) -> Self {
        ImportError::Metadata {
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    pub(crate) fn write(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ImportError::WriteOutput {
            path: path.into(),
            source,
        }
    }
}
