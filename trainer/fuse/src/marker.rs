//! What a folder of the run was made from, written beside its weights so a
//! rerun reuses the folder only when it would make the same one again.

use std::path::Path;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{io, Result};

/// `models/base/fusechat_base.json`: the GGUF the base target was imported from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseOrigin {
    /// The name in `fusechat models list`.
    pub fetched: String,
    pub gguf_sha256: String,
    /// What the import converted the weights to.
    pub dtype: String,
}

impl BaseOrigin {
    pub const FILE: &'static str = "fusechat_base.json";
}

/// `fused/fusechat_fuse.json`: the training folder the fused model was copied from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FusedOrigin {
    pub from: String,
    /// sha256 of its `model.safetensors`.
    pub sha256: String,
}

impl FusedOrigin {
    pub const FILE: &'static str = "fusechat_fuse.json";
}

/// The marker in `path`, or `None` when there is none or it cannot be read
/// (a folder without a readable marker is made again).
pub fn read<T: DeserializeOwned>(path: &Path) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn write<T: Serialize>(path: &Path, marker: &T) -> Result<()> {
    let text = serde_json::to_vec_pretty(marker).expect("a marker is plain data");
    std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_read_the_files_earlier_runs_wrote() {
        let dir = std::env::temp_dir().join(format!("fusechat-marker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = BaseOrigin {
            fetched: "smollm2-135m-instruct".into(),
            gguf_sha256: "ab12".into(),
            dtype: "f32".into(),
        };
        let path = dir.join(BaseOrigin::FILE);
        write(&path, &base).unwrap();
        assert_eq!(read::<BaseOrigin>(&path), Some(base.clone()));

        // Earlier runs wrote the base marker on one line with sorted keys.
        std::fs::write(
            &path,
            r#"{"dtype":"f32","fetched":"smollm2-135m-instruct","gguf_sha256":"ab12"}"#,
        )
        .unwrap();
        assert_eq!(read::<BaseOrigin>(&path), Some(base));

        let fused = dir.join(FusedOrigin::FILE);
        std::fs::write(&fused, "{\n  \"from\": \"/r/dpo/final\",\n  \"sha256\": \"cd34\"\n}").unwrap();
        assert_eq!(read::<FusedOrigin>(&fused).map(|m| m.sha256), Some("cd34".into()));

        std::fs::write(&fused, "not json").unwrap();
        assert_eq!(read::<FusedOrigin>(&fused), None);
        assert_eq!(read::<FusedOrigin>(&dir.join("missing.json")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
