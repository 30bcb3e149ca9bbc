//! Reading a config the way every `fusechat` command does: a file, whose
//! relative paths resolve against its own folder, or, with no file, a default
//! compiled into the binary, whose relative paths resolve as if it were
//! `config/` in the current folder (see [`embedded_base`]). `fusechat
//! sample|score|pair`, `eval` and `fuse` all load through [`ConfigFile::read`].

use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// A default config compiled into the binary.
#[derive(Debug, Clone, Copy)]
pub struct Embedded {
    /// Its path in the repository, for messages (`config/eval-tiny.toml`).
    pub name: &'static str,
    pub text: &'static str,
}

/// A config's text, where it came from, and where its relative paths resolve.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub text: Cow<'static, str>,
    pub base_dir: PathBuf,
    /// The file's path, or `<embedded NAME>`.
    pub origin: String,
}

impl ConfigFile {
    /// `path`'s text, or `default`'s when `path` is `None`.
    pub fn read(path: Option<&Path>, default: &Embedded) -> std::io::Result<Self> {
        let Some(path) = path else {
            return Ok(Self {
                text: Cow::Borrowed(default.text),
                base_dir: embedded_base(),
                origin: format!("<embedded {}>", default.name),
            });
        };
        let text = std::fs::read_to_string(path)?;
        let base_dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok(Self {
            text: Cow::Owned(text),
            base_dir,
            origin: path.display().to_string(),
        })
    }
}

/// Where relative paths of an embedded default resolve: `config/` in the
/// current folder, never the build machine's source tree, so the binary runs
/// from anywhere. Run from a checkout's root, the defaults read its `data/`
/// and write `runs/` there; run elsewhere, outputs land in the current
/// folder and the prompt pools come from `$FUSECHAT_DATA_DIR` or the copy
/// compiled into the binary (`Config::data_dir`).
pub fn embedded_base() -> PathBuf {
    std::env::current_dir()
        .unwrap_or_else(|_| PathBuf::from("."))
        .join("config")
}

/// `p` against a config's folder (`p` itself when absolute), with `..`
/// taken away lexically: the embedded defaults' folder (`config/` in the
/// current folder) need not exist for `../runs` to name `./runs`.
pub fn resolve(base_dir: &Path, p: &Path) -> PathBuf {
    use std::path::Component;
    if p.is_absolute() {
        return p.to_path_buf();
    }
    let mut out = PathBuf::new();
    for part in base_dir.join(p).components() {
        match part {
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The repository's `config/` folder, for tests that read every config in it.
pub fn repository_configs() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_resolve_without_the_folder_existing() {
        let base = Path::new("/nowhere/work/config");
        assert_eq!(resolve(base, Path::new("../runs/x")), Path::new("/nowhere/work/runs/x"));
        assert_eq!(resolve(base, Path::new("./a/../b")), Path::new("/nowhere/work/config/b"));
        assert_eq!(resolve(base, Path::new("/abs/../p")), Path::new("/abs/../p"));
        assert_eq!(resolve(Path::new("."), Path::new("../up")), Path::new("../up"));
        assert_eq!(resolve(Path::new("rel"), Path::new("../../up")), Path::new("../up"));
    }

    const DEFAULT: Embedded = Embedded {
        name: "config/x.toml",
        text: "a = 1",
    };

    #[test]
    fn a_file_resolves_against_its_folder_and_no_file_is_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "b = 2").unwrap();
        let file = ConfigFile::read(Some(&path), &DEFAULT).unwrap();
        assert_eq!(
            (file.text.as_ref(), file.base_dir.as_path()),
            ("b = 2", dir.path())
        );
        let bare = ConfigFile::read(Some(Path::new("c.toml")), &DEFAULT);
        assert!(bare.is_err() || bare.unwrap().base_dir == Path::new("."));
        let default = ConfigFile::read(None, &DEFAULT).unwrap();
        assert_eq!(default.text, "a = 1");
        assert_eq!(default.origin, "<embedded config/x.toml>");
        assert_eq!(default.base_dir, std::env::current_dir().unwrap().join("config"));
        assert!(ConfigFile::read(Some(&dir.path().join("missing.toml")), &DEFAULT).is_err());
    }
}
