//! `fusechat import GGUF OUT_DIR`: turns a llama.cpp GGUF file into a Hugging Face checkpoint
//! folder that transformers and mistral.rs load like any downloaded model:
//!
//! * `config.json` for the architecture (llama, qwen2, gemma3), from the GGUF metadata;
//! * `model.safetensors`, every tensor dequantized (bf16 by default) under its HF name, with
//!   llama.cpp's conversion-time changes undone (see [`tensors`]);
//! * `tokenizer.json`, rebuilt from the GGUF vocabulary (see [`tokenizer`]);
//! * `tokenizer_config.json` with the chat template and special tokens, and
//!   `generation_config.json` with the stop tokens (see [`chat_template`]).
//!
//! Dequantizing does not bring back what quantization lost: the checkpoint computes what the
//! quantized GGUF computes, in a dtype every HF loader reads.

mod chat_template;
mod config;
mod error;
mod gguf;
mod safetensors_out;
mod tensors;
mod tokenizer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::DType;

pub use chat_template::{ChatTemplateSource, GEMMA_CHAT_TEMPLATE};
pub use config::Architecture;
pub use error::ImportError;

use config::ModelParams;
use gguf::GgufFile;
use safetensors_out::{SafetensorsWriter, StDtype};
use tokenizer::GgufVocab;

/// The element type of the weights written to `model.safetensors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputDType {
    /// bfloat16: half the size of f32, the dtype most HF checkpoints ship in.
    #[default]
    BF16,
    F32,
}

impl OutputDType {
    /// The `torch_dtype` value of config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            OutputDType::BF16 => "bfloat16",
            OutputDType::F32 => "float32",
        }
    }

    fn candle(self) -> DType {
        match self {
            OutputDType::BF16 => DType::BF16,
            OutputDType::F32 => DType::F32,
        }
    }

    fn safetensors(self) -> StDtype {
        match self {
            OutputDType::BF16 => StDtype::BF16,
            OutputDType::F32 => StDtype::F32,
        }
    }
}

impl fmt::Display for OutputDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutputDType::BF16 => "bf16",
            OutputDType::F32 => "f32",
        })
    }
}

impl std::str::FromStr for OutputDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Ok(OutputDType::BF16),
            "f32" | "float32" => Ok(OutputDType::F32),
            other => Err(format!("unknown dtype `{other}` (use bf16 or f32)")),
        }
    }
}

/// How to import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    pub dtype: OutputDType,
    /// Replace the files of an existing, non-empty output folder. Without it such a folder is
    /// an error.
    pub overwrite: bool,
}

/// What an import wrote; `Display` gives a short report for the CLI.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    /// The Hugging Face class written to config.json, e.g. `LlamaForCausalLM`.
    pub architecture: String,
    /// config.json's `model_type`, e.g. `gemma3_text`.
    pub model_type: String,
    /// `general.architecture` of the GGUF file.
    pub gguf_architecture: String,
    pub num_tensors: usize,
    pub num_parameters: usize,
    pub dtype: OutputDType,
    pub vocab_size: usize,
    pub chat_template: ChatTemplateSource,
    pub out_dir: PathBuf,
    pub elapsed: Duration,
}

impl fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "imported {} GGUF as {} (model_type {})",
            self.gguf_architecture, self.architecture, self.model_type
        )?;
        writeln!(
            f,
            "  {} tensors, {} parameters, written as {}",
            self.num_tensors,
            human_count(self.num_parameters),
            self.dtype
        )?;
        writeln!(f, "  vocabulary: {} tokens", self.vocab_size)?;
        writeln!(f, "  chat template: {}", self.chat_template)?;
        write!(
            f,
            "  folder: {} ({:.1} s)",
            self.out_dir.display(),
            self.elapsed.as_secs_f64()
        )
    }
}

fn human_count(n: usize) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2}B", n as f64 / 1e9)
    } else if n >= 1_000_000 {
        format!("{:.1}M", n as f64 / 1e6)
    } else {
        n.to_string()
    }
}

/// Imports `gguf` into the Hugging Face folder `out_dir` with the default options (bf16, refuse
/// to write into a non-empty folder).
pub fn import_gguf(gguf: &Path, out_dir: &Path) -> Result<ImportSummary, ImportError> {
    import_gguf_with(gguf, out_dir, &ImportOptions::default())
}

/// Imports `gguf` into the Hugging Face folder `out_dir`.
///
/// Everything is checked before anything is written (architecture, metadata, tensor names and
/// shapes, tokenizer). The files are then written to a temporary folder beside `out_dir` and
/// moved into place at the end, so a failed or interrupted import leaves no half-written model.
pub fn import_gguf_with(
    gguf_path: &Path,
    out_dir: &Path,
    options: &ImportOptions,
) -> Result<ImportSummary, ImportError> {
    let started = Instant::now();
    let mut gguf = GgufFile::open(gguf_path)?;
    let params = ModelParams::read(&gguf)?;
    let vocab = GgufVocab::read(&gguf)?;
    if vocab.tokens.len() > params.vocab_size {
        return Err(ImportError::UnsupportedModel(format!(
            "the tokenizer has {} tokens but the embedding matrix only {} rows",
            vocab.tokens.len(),
            params.vocab_size
        )));
    }
    let plans = tensors::plan(&params, &gguf.tensor_shapes())?;
    let tokenizer = TokenizerFiles::read(&gguf, &params, &vocab)?;
    tracing::info!(
        "importing {} ({}) from {}",
        params.arch.hf_class(),
        params.describe(),
        gguf.path().display()
    );

    let staging = prepare_output(out_dir, options.overwrite)?;
    let dir = staging.path();

    write_json(&dir.join("config.json"), &params.config_json(&vocab.ids, options.dtype))?;
    tokenizer.write(dir)?;

    let num_parameters = write_weights(&mut gguf, &plans, &dir.join("model.safetensors"), options.dtype)?;

    finish_output(staging, out_dir)?;
    Ok(ImportSummary {
        architecture: params.arch.hf_class().to_string(),
        model_type: params.arch.hf_model_type().to_string(),
        gguf_architecture: params.arch.gguf_name().to_string(),
        num_tensors: plans.len(),
        num_parameters,
        dtype: options.dtype,
        vocab_size: params.vocab_size,
        chat_template: tokenizer.chat_template_source,
        out_dir: out_dir.to_path_buf(),
        elapsed: started.elapsed(),
    })
}

/// Writes only the tokenizer files of `gguf_path` into `out_dir` (created, or its files of the
/// same names replaced): `tokenizer.json`, `tokenizer_config.json` with the chat template and
/// `generation_config.json`, exactly as [`import_gguf`] writes them. A server that reads the
/// weights from the GGUF file itself then tokenizes and renders chats as the imported folder does.
pub fn import_tokenizer(gguf_path: &Path, out_dir: &Path) -> Result<ChatTemplateSource, ImportError> {
    let gguf = GgufFile::open(gguf_path)?;
    let params = ModelParams::read(&gguf)?;
    let vocab = GgufVocab::read(&gguf)?;
    let tokenizer = TokenizerFiles::read(&gguf, &params, &vocab)?;
    let staging = prepare_output(out_dir, true)?;
    tokenizer.write(staging.path())?;
    finish_output(staging, out_dir)?;
    Ok(tokenizer.chat_template_source)
}

/// The three tokenizer files of an import, built before anything is written.
struct TokenizerFiles {
    tokenizer: serde_json::Value,
    tokenizer_config: serde_json::Value,
    generation_config: serde_json::Value,
    chat_template_source: ChatTemplateSource,
}

impl TokenizerFiles {
    fn read(gguf: &GgufFile, params: &ModelParams, vocab: &GgufVocab) -> Result<Self, ImportError> {
        let (chat_template, chat_template_source) =
            chat_template::chat_template(params.arch, gguf.opt_str("tokenizer.chat_template")?);
        let eot = gguf.opt_u32("tokenizer.ggml.eot_token_id")?;
        let stop_ids = chat_template::stop_token_ids(vocab, eot);
        Ok(Self {
            tokenizer: vocab.tokenizer_json()?,
            tokenizer_config: chat_template::tokenizer_config_json(
                vocab,
                chat_template.as_deref(),
                params.context_length,
            ),
            generation_config: chat_template::generation_config_json(vocab, &stop_ids),
            chat_template_source,
        })
    }

    fn write(&self, dir: &Path) -> Result<(), ImportError> {
        write_json(&dir.join("generation_config.json"), &self.generation_config)?;
        write_json(&dir.join("tokenizer.json"), &self.tokenizer)?;
        write_json(&dir.join("tokenizer_config.json"), &self.tokenizer_config)
    }
}

/// Dequantizes, transforms and writes every planned tensor; returns the parameter count.
fn write_weights(
    gguf: &mut GgufFile,
    plans: &[tensors::TensorPlan],
    path: &Path,
    dtype: OutputDType,
) -> Result<usize, ImportError> {
    let st_dtype = dtype.safetensors();
    let header: Vec<(String, StDtype, Vec<usize>)> = plans
        .iter()
        .map(|p| (p.hf_name.clone(), st_dtype, p.shape.clone()))
        .collect();
    let mut writer =
        SafetensorsWriter::create(path, &header).map_err(|e| ImportError::write(path, e))?;
    let mut num_parameters = 0;
    for plan in plans {
        let tensor_err = |source| ImportError::Tensor {
            name: plan.gguf_name.clone(),
            source,
        };
        let t = gguf.dequantize(&plan.gguf_name)?;
        let t = tensors::apply(&t, plan.transform).map_err(tensor_err)?;
        let bytes = tensor_bytes(&t, dtype).map_err(tensor_err)?;
        num_parameters += t.elem_count();
        writer
            .write_next(&plan.hf_name, &bytes)
            .map_err(|e| ImportError::write(path, e))?;
    }
    writer.finish().map_err(|e| ImportError::write(path, e))?;
    Ok(num_parameters)
}

/// The little-endian bytes of a tensor in the output dtype.
fn tensor_bytes(t: &candle_core::Tensor, dtype: OutputDType) -> candle_core::Result<Vec<u8>> {
    let flat = t.to_dtype(dtype.candle())?.flatten_all()?;
    Ok(match dtype {
        OutputDType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        OutputDType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), ImportError> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    std::fs::write(path, text + "\n").map_err(|e| ImportError::write(path, e))
}

/// A temporary folder beside `out_dir` to write into.
fn prepare_output(out_dir: &Path, overwrite: bool) -> Result<tempfile::TempDir, ImportError> {
    if !overwrite && out_dir.exists() {
        let non_empty = std::fs::read_dir(out_dir)
            .map_err(|e| ImportError::write(out_dir, e))?
            .next()
            .is_some();
        if non_empty {
            return Err(ImportError::OutputExists {
                path: out_dir.to_path_buf(),
            });
        }
    }
    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| ImportError::write(&parent, e))?;
    tempfile::Builder::new()
        .prefix(".fusechat-import-")
        .tempdir_in(&parent)
        .map_err(|e| ImportError::write(&parent, e))
}

/// Moves the finished files into `out_dir` (created if needed; same-named files replaced).
fn finish_output(staging: tempfile::TempDir, out_dir: &Path) -> Result<(), ImportError> {
    if !out_dir.exists() {
        let staged = staging.keep();
        return std::fs::rename(&staged, out_dir).map_err(|e| ImportError::write(out_dir, e));
    }
    let entries = std::fs::read_dir(staging.path()).map_err(|e| ImportError::write(staging.path(), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ImportError::write(staging.path(), e))?;
        let target = out_dir.join(entry.file_name());
        std::fs::rename(entry.path(), &target).map_err(|e| ImportError::write(&target, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_names_the_path() {
        let err = import_gguf(Path::new("/nonexistent/model.gguf"), Path::new("/tmp/x")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
    }

    #[test]
    fn not_a_gguf_file_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let bogus = dir.path().join("model.gguf");
        std::fs::write(&bogus, b"<html>not found</html>").unwrap();
        let err = import_gguf(&bogus, &dir.path().join("out")).unwrap_err();
        assert!(matches!(err, ImportError::NotGguf { .. }), "{err}");
        assert!(!dir.path().join("out").exists());
    }

    #[test]
    fn dtype_parses() {
        assert_eq!("bf16".parse::<OutputDType>().unwrap(), OutputDType::BF16);
        assert_eq!("F32".parse::<OutputDType>().unwrap(), OutputDType::F32);
        assert!("q4".parse::<OutputDType>().is_err());
    }
}
