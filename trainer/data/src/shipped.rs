//! The prompt pools that ship with fusechat (the repository's `data/`, its
//! sources and licences in data/README.md), compiled into the binary so
//! that a binary copied anywhere (a container image, another machine) runs
//! the embedded default configs with nothing beside it. They are written
//! out once, checked against data/SHA256SUMS, to `$FUSECHAT_HOME/data`.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

macro_rules! pool {
    ($path:literal) => {
        ($path, include_bytes!(concat!("../../../data/", $path)) as &[u8])
    };
}

/// Every shipped pool file: its path under `data/` and its bytes.
const FILES: &[(&str, &[u8])] = &[
    pool!("math/mawps.jsonl"),
    pool!("math/asdiv.jsonl"),
    pool!("math/gsm8k_test.jsonl"),
    pool!("code/mbpp_plus.jsonl"),
    pool!("instruction/alpaca_eval_gpt4_baseline.json"),
    pool!("instruction/arena_hard_questions.jsonl"),
];

const SHA256SUMS: &str = include_str!("../../../data/SHA256SUMS");

#[derive(Debug, thiserror::Error)]
pub enum ShippedError {
    #[error("writing the shipped prompt pools to {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("the shipped pool {0} is not the file data/SHA256SUMS names (a build from a changed data/ folder)")]
    Checksum(String),
}

/// Whether `file` (relative to a data folder) is one of the shipped pools.
pub fn ships(file: &Path) -> bool {
    FILES.iter().any(|(name, _)| Path::new(name) == file)
}

/// The shipped pools as a folder: `home/data`, written (or rewritten where a
/// file differs) on first use.
pub fn unpack(home: &Path) -> Result<PathBuf, ShippedError> {
    let dir = home.join("data");
    for (name, bytes) in FILES {
        let digest = hex::encode(Sha256::digest(bytes));
        let listed = SHA256SUMS
            .lines()
            .filter_map(|l| l.split_once(char::is_whitespace))
            .any(|(sum, path)| sum == digest && path.trim_start_matches([' ', '*']) == *name);
        if !listed {
            return Err(ShippedError::Checksum(name.to_string()));
        }
        let path = dir.join(name);
        let current = std::fs::read(&path).ok();
        if current.as_deref() == Some(*bytes) {
            continue;
        }
        let write = |path: &Path| -> std::io::Result<()> {
            let parent = path.parent().expect("a pool file has a folder");
            std::fs::create_dir_all(parent)?;
            // Written beside, then renamed: a reader never sees half a file.
            let tmp = tempfile::NamedTempFile::new_in(parent)?;
            std::fs::write(tmp.path(), bytes)?;
            tmp.persist(path).map_err(|e| e.error)?;
            Ok(())
        };
        write(&path).map_err(|source| ShippedError::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(dir)
}

/// `$FUSECHAT_HOME`, or `~/.cache/fusechat` (as `fusechat models fetch`).
pub fn home() -> PathBuf {
    if let Some(home) = std::env::var_os("FUSECHAT_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    let user_home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    user_home.join(".cache").join("fusechat")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unpacked_pools_are_the_repository_files() {
        let home = tempfile::tempdir().unwrap();
        let dir = unpack(home.path()).unwrap();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data");
        for (name, _) in FILES {
            assert_eq!(
                std::fs::read(dir.join(name)).unwrap(),
                std::fs::read(repo.join(name)).unwrap(),
                "{name}"
            );
        }
        // Every file the checksum list names ships.
        for line in SHA256SUMS.lines().filter(|l| !l.trim().is_empty()) {
            let name = line.split_whitespace().nth(1).unwrap().trim_start_matches('*');
            assert!(ships(Path::new(name)), "{name} is listed but not shipped");
        }
        // A damaged copy is rewritten.
        std::fs::write(dir.join("math/mawps.jsonl"), "broken").unwrap();
        unpack(home.path()).unwrap();
        assert_eq!(
            std::fs::read(dir.join("math/mawps.jsonl")).unwrap(),
            std::fs::read(repo.join("math/mawps.jsonl")).unwrap()
        );
    }
}
