//! Content hashes that key caches and checkpoints: a model folder's weights
//! and config, a run's settings.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{io, Result};

/// sha256 over config.json, the tokenizer files and every *.safetensors file
/// of a model folder (sorted by name): what decides the model's outputs on a
/// rendered conversation.
pub fn model_folder(dir: &Path) -> Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                n == "config.json" || n == "tokenizer.json" || n == "tokenizer_config.json"
            }) || p.extension().is_some_and(|e| e == "safetensors")
        })
        .collect();
    files.sort();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for path in files {
        hasher.update(path.file_name().unwrap().as_encoded_bytes());
        let mut file = std::fs::File::open(&path).map_err(io(&path))?;
        loop {
            let n = file.read(&mut buf).map_err(io(&path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// sha256 of a JSON value's canonical text (serde_json keeps struct field order).
pub fn json(value: &serde_json::Value) -> String {
    hex::encode(Sha256::digest(value.to_string().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_hash_follows_weights_config_and_tokenizer_only() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("config.json", "{}");
        write("model.safetensors", "w1");
        write("tokenizer.json", "t1");
        let a = model_folder(dir.path()).unwrap();
        write("README.md", "ignored");
        assert_eq!(a, model_folder(dir.path()).unwrap());
        write("tokenizer.json", "t2");
        let b = model_folder(dir.path()).unwrap();
        assert_ne!(a, b);
        write("model.safetensors", "w2");
        assert_ne!(b, model_folder(dir.path()).unwrap());
    }
}
