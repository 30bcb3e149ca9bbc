//! How a served model holds its weights: which path loaded it (a GGUF file as
//! it is, float weights quantized at load, or float weights), the tensor
//! types it keeps and the bytes they take. `GET /v1/models` lists it and the
//! startup log says it, so that a user sees at once whether a model runs
//! from quantized weights.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use candle_core::quantized::{gguf_file, GgmlDType};
use serde::Serialize;
use utoipa::ToSchema;

use crate::config::Isq;

/// The load path of a model's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoadPath {
    /// A GGUF file served as it is: every tensor in the file's own type.
    Gguf,
    /// Float weights (a Hugging Face folder, or a GGUF imported into one)
    /// quantized when loaded (`isq`).
    QuantizedAtLoad,
    /// Float weights served as floats.
    Float,
}

/// Tensors of one type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct TypeShare {
    pub tensors: usize,
    pub bytes: u64,
}

/// How a model holds its weights (`GET /v1/models`, field `weights`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Holding {
    pub path: LoadPath,
    /// Per tensor type (`Q4K`, `Q8_0`, `F32`, ... as candle names them):
    /// tensors and bytes.
    pub types: BTreeMap<String, TypeShare>,
    /// Bytes of weights in memory, all types together.
    pub bytes: u64,
}

impl Holding {
    fn add(&mut self, ty: &str, bytes: u64) {
        let share = self.types.entry(ty.to_string()).or_default();
        share.tensors += 1;
        share.bytes += bytes;
        self.bytes += bytes;
    }

    /// One line for the startup log: `GGUF as it is: 246.6 MB (Q8_0 179.8 MB, ...)`.
    pub fn summary(&self) -> String {
        let mut types: Vec<_> = self.types.iter().collect();
        types.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes));
        let types: Vec<String> = types
            .iter()
            .map(|(ty, share)| format!("{ty} {:.1} MB", share.bytes as f64 / 1e6))
            .collect();
        let path = match self.path {
            LoadPath::Gguf => "GGUF as it is",
            LoadPath::QuantizedAtLoad => "float weights quantized at load",
            LoadPath::Float => "float weights",
        };
        format!("{path}: {:.1} MB ({})", self.bytes as f64 / 1e6, types.join(", "))
    }
}

/// A GGUF file served as it is, counted as the engine holds it: the llama
/// and qwen2 models keep an f32 copy of the token embedding table for
/// lookups, and its quantized table only where it is also the output layer
/// (no `output.weight`); gemma3 reads the quantized table where
/// fusechat-kernels know its type, and a tied output layer is a second
/// quantized copy. F16 and BF16 matrices are held as f32.
pub fn of_gguf(file: &Path) -> anyhow::Result<Holding> {
    let mut reader = std::fs::File::open(file)?;
    let content = gguf_file::Content::read(&mut reader)
        .with_context(|| format!("{} is not a GGUF file", file.display()))?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let tied = !content.tensor_infos.contains_key("output.weight");
    let mut holding = Holding { path: LoadPath::Gguf, types: BTreeMap::new(), bytes: 0 };
    for (name, info) in &content.tensor_infos {
        let elements = info.shape.elem_count() as u64;
        let dtype = info.ggml_dtype;
        let label = format!("{dtype:?}").to_uppercase();
        let held = |holding: &mut Holding| match dtype {
            GgmlDType::F16 | GgmlDType::BF16 if info.shape.rank() == 2 => holding.add("F32", elements * 4),
            _ => holding.add(&label, stored_bytes(dtype, elements)),
        };
        if name != "token_embd.weight" {
            held(&mut holding);
            continue;
        }
        if arch == "gemma3" {
            let dense = fusechat_kernels::BlockFormat::from_ggml(dtype).is_none();
            if dense {
                holding.add("F32", elements * 4);
            } else {
                held(&mut holding);
            }
            if tied {
                held(&mut holding);
            }
        } else {
            if dtype != GgmlDType::F32 {
                holding.add("F32", elements * 4);
            }
            if tied || dtype == GgmlDType::F32 {
                held(&mut holding);
            }
        }
    }
    Ok(holding)
}

fn stored_bytes(dtype: GgmlDType, elements: u64) -> u64 {
    elements / dtype.block_size() as u64 * dtype.type_size() as u64
}

/// Float weights in a Hugging Face folder, served with `isq` (none: floats)
/// on every linear layer but `float_layers`. Float tensors are held as f32
/// on the CPU. With `isq` this is an estimate: a layer whose width is not a
/// multiple of the quantized block falls back to another type, and a tied
/// output layer quantized from the embeddings is not counted.
pub fn of_folder(dir: &Path, isq: Isq, float_layers: &[String]) -> anyhow::Result<Holding> {
    let quantized = match isq {
        Isq::None => None,
        Isq::Q8_0 => Some(("Q8_0", GgmlDType::Q8_0)),
        Isq::Q4_1 => Some(("Q4_1", GgmlDType::Q4_1)),
        Isq::Q4k => Some(("Q4K", GgmlDType::Q4K)),
    };
    let mut holding = Holding {
        path: if quantized.is_some() { LoadPath::QuantizedAtLoad } else { LoadPath::Float },
        types: BTreeMap::new(),
        bytes: 0,
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "{} has no .safetensors files", dir.display());
    for file in files {
        for (name, shape) in safetensors_shapes(&file)? {
            let elements: u64 = shape.iter().product();
            match quantized {
                Some((label, dtype)) if is_quantized_layer(&name, shape.len(), float_layers) => {
                    holding.add(label, stored_bytes(dtype, elements))
                }
                _ => holding.add("F32", elements * 4),
            }
        }
    }
    Ok(holding)
}

/// The tensors named in a safetensors file's header, with their shapes; the
/// header alone is read (8 bytes of length, then JSON).
fn safetensors_shapes(file: &Path) -> anyhow::Result<Vec<(String, Vec<u64>)>> {
    use std::io::Read;
    #[derive(serde::Deserialize)]
    struct Entry {
        shape: Vec<u64>,
    }
    let mut reader = std::fs::File::open(file)?;
    let mut len = [0u8; 8];
    reader.read_exact(&mut len)?;
    let len = usize::try_from(u64::from_le_bytes(len))?;
    anyhow::ensure!(len <= 100 << 20, "{}: a safetensors header of {len} bytes", file.display());
    let mut header = vec![0u8; len];
    reader.read_exact(&mut header)?;
    let header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .with_context(|| format!("{} has no safetensors header", file.display()))?;
    header
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(name, entry)| {
            let entry: Entry = serde_json::from_value(entry)
                .with_context(|| format!("{}: tensor `{name}` has no shape", file.display()))?;
            Ok((name, entry.shape))
        })
        .collect()
}

/// A linear layer's weight that `isq` quantizes: named after one of the
/// layers (`...q_proj.weight`), not kept float, a matrix.
fn is_quantized_layer(name: &str, rank: usize, float_layers: &[String]) -> bool {
    let Some(layer) = name.strip_suffix(".weight").and_then(|n| n.rsplit('.').next()) else {
        return false;
    };
    rank == 2
        && crate::config::LINEAR_LAYERS.contains(&layer)
        && !float_layers.iter().any(|f| f == layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_layers_are_recognised_by_name_and_rank() {
        let none: Vec<String> = vec![];
        assert!(is_quantized_layer("model.layers.0.self_attn.q_proj.weight", 2, &none));
        assert!(!is_quantized_layer("model.layers.0.self_attn.q_proj.bias", 1, &none));
        assert!(!is_quantized_layer("model.layers.0.input_layernorm.weight", 1, &none));
        assert!(!is_quantized_layer("model.layers.0.mlp.down_proj.weight", 2, &["down_proj".into()]));
    }

    #[test]
    fn quantized_bytes_follow_the_block_layout() {
        // Q8_0: 34 bytes a block of 32; Q4_K: 144 bytes a block of 256.
        assert_eq!(stored_bytes(GgmlDType::Q8_0, 64), 68);
        assert_eq!(stored_bytes(GgmlDType::Q4K, 512), 288);
    }
}
