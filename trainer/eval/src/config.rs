//! The TOML config of `fusechat eval`: which data config defines the
//! evaluation side, the models to compare (any OpenAI-compatible endpoints),
//! how many evaluation-side prompts per pool, generation settings, the
//! pairwise judge, the code sandbox and the output folder.
//!
//! Relative paths resolve against the config file's folder; the embedded
//! default (`config/eval-tiny.toml`) resolves against the repository's
//! `config` folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fusechat_data::config::{CodeScoring, EndpointConfig};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

pub use fusechat_data::config_file::embedded_base;
use fusechat_data::config_file::{ConfigFile, Embedded};

/// The embedded default: `config/eval-tiny.toml`.
pub const TINY: &str = include_str!("../../../config/eval-tiny.toml");

const DEFAULT: Embedded = Embedded {
    name: "config/eval-tiny.toml",
    text: TINY,
};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// The data config (`fusechat sample`'s) whose pools, split seed and
    /// evaluation fraction define the evaluation side.
    pub data_config: PathBuf,
    /// Output folder: results.jsonl (the resumable per-sample log),
    /// samples.jsonl, report.md, report.json, report.svg.
    pub output: PathBuf,
    /// Seed of the selection of evaluation-side prompts.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Generation length limit (greedy decoding, temperature 0).
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u64,
    /// Requests in flight at once per model endpoint (a model's own
    /// `concurrency` wins).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Per-request timeout in seconds.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Retries on 429, 5xx and connection errors.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// Retry requests recorded as failed on a rerun.
    #[serde(default = "default_true")]
    pub retry_failed: bool,
    /// Progress bars on stderr.
    #[serde(default = "default_true")]
    pub progress: bool,
    /// Prompts per pool (pool names of the data config), chosen from the
    /// evaluation side by a seeded hash. A pool left out is not evaluated.
    pub sizes: BTreeMap<String, usize>,
    #[serde(rename = "models")]
    pub models: Vec<ModelEntry>,
    /// Needed when an instruction pool is evaluated.
    #[serde(default)]
    pub judge: Option<JudgeEntry>,
    /// The code sandbox (timeout for all of a task's tests, memory).
    #[serde(default = "default_code")]
    pub code: CodeScoring,
    /// Sandboxes running at once.
    #[serde(default = "default_code_concurrency")]
    pub code_concurrency: usize,
    /// Characters of a sandbox's output kept in samples.jsonl.
    #[serde(default = "default_detail_chars")]
    pub detail_chars: usize,
    /// The folder relative paths resolve against (not part of the TOML).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// Loaded from the default compiled into the binary (not part of the TOML).
    #[serde(skip)]
    pub embedded: bool,
}

/// One model to evaluate.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Row name in the report (e.g. `base`, `fused`, a source's id).
    pub name: String,
    /// e.g. `http://127.0.0.1:8080/v1`.
    pub base_url: String,
    /// The model id sent in requests; default: `name`.
    #[serde(default)]
    pub model: Option<String>,
    /// Name of an environment variable holding the API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub concurrency: Option<usize>,
}

impl ModelEntry {
    pub fn model(&self) -> &str {
        self.model.as_deref().unwrap_or(&self.name)
    }
}

/// The pairwise judge for the instruction win rate.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeEntry {
    pub base_url: String,
    pub model: String,
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default = "default_judge_tokens")]
    pub max_tokens: u64,
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// `weighted` (default): the judge's probabilities of its verdict
    /// tokens, where it returns `logprobs`; `verdict`: win 1, tie 0.5,
    /// loss 0.
    #[serde(default)]
    pub scoring: crate::judge::Scoring,
}

fn default_seed() -> u64 {
    42
}
fn default_max_tokens() -> u64 {
    256
}
fn default_concurrency() -> usize {
    4
}
fn default_timeout() -> f64 {
    600.0
}
fn default_retries() -> u32 {
    3
}
fn default_true() -> bool {
    true
}
fn default_judge_tokens() -> u64 {
    32
}
fn default_detail_chars() -> usize {
    300
}
fn default_code_concurrency() -> usize {
    2
}
fn default_code() -> CodeScoring {
    CodeScoring {
        timeout_s: 20.0,
        ..CodeScoring::default()
    }
}

impl EvalConfig {
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self> {
        let mut c: EvalConfig =
            toml::from_str(text).map_err(|e| EvalError::Config(format!("parsing: {e}")))?;
        c.base_dir = base_dir.to_path_buf();
        c.validate()?;
        Ok(c)
    }

    /// Load a file, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let file = ConfigFile::read(path, &DEFAULT).map_err(|e| EvalError::Io {
            what: format!(
                "reading the eval config {}",
                path.unwrap_or(Path::new("")).display()
            ),
            source: e,
        })?;
        let mut config = Self::parse(&file.text, &file.base_dir).map_err(|e| match (e, path) {
            (EvalError::Config(m), Some(_)) => EvalError::Config(format!("{}: {m}", file.origin)),
            (other, _) => other,
        })?;
        config.embedded = path.is_none();
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EvalError::Config(m));
        if self.models.is_empty() {
            return bad("no [[models]] to evaluate".into());
        }
        let mut seen = std::collections::HashSet::new();
        for m in &self.models {
            if m.name.is_empty() || !seen.insert(&m.name) {
                return bad(format!(
                    "model names must be unique and non-empty (`{}`)",
                    m.name
                ));
            }
            if !m.base_url.starts_with("http://") && !m.base_url.starts_with("https://") {
                return bad(format!("model `{}`: base_url must be http(s)://", m.name));
            }
        }
        if self.sizes.is_empty() {
            return bad("[sizes] names no pool to evaluate".into());
        }
        if self.concurrency == 0 || self.code_concurrency == 0 {
            return bad("concurrency must be at least 1".into());
        }
        if self.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        Ok(())
    }

    pub fn resolve(&self, p: &Path) -> PathBuf {
        fusechat_data::config_file::resolve(&self.base_dir, p)
    }

    pub fn output_dir(&self) -> PathBuf {
        self.resolve(&self.output)
    }

    pub fn data_config_path(&self) -> PathBuf {
        self.resolve(&self.data_config)
    }

    /// The data config this evaluation takes its pools and split from.
    pub fn load_data_config(&self) -> Result<fusechat_data::Config> {
        let p = self.data_config_path();
        // The embedded eval default names the embedded data default; outside
        // a checkout there is no file of that name, and the binary has it.
        let embedded_data = fusechat_data::config::DEFAULT_NAME;
        if self.embedded && !p.exists() && embedded_data.ends_with(&*self.data_config.to_string_lossy()) {
            return fusechat_data::Config::load(None)
                .map_err(|e| EvalError::data("loading the embedded data config".to_string(), e));
        }
        fusechat_data::Config::load(Some(&p))
            .map_err(|e| EvalError::data(format!("loading the data config {}", p.display()), e))
    }

    /// The endpoint settings of a model (the data crate's client takes them).
    pub fn endpoint_for(&self, m: &ModelEntry) -> EndpointConfig {
        EndpointConfig {
            name: m.name.clone(),
            base_url: m.base_url.clone(),
            api_key: None,
            api_key_env: m.api_key_env.clone(),
            concurrency: m.concurrency.unwrap_or(self.concurrency).max(1),
            timeout_s: self.timeout_s,
            max_retries: self.max_retries,
            backoff_s: 1.0,
        }
    }

    pub fn judge_endpoint(&self, j: &JudgeEntry) -> EndpointConfig {
        EndpointConfig {
            name: "judge".into(),
            base_url: j.base_url.clone(),
            api_key: None,
            api_key_env: j.api_key_env.clone(),
            concurrency: j.concurrency.unwrap_or(self.concurrency).max(1),
            timeout_s: self.timeout_s,
            max_retries: self.max_retries,
            backoff_s: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses_and_its_data_config_loads() {
        let c = EvalConfig::load(None).unwrap();
        assert!(c.models.len() >= 3, "{:?}", c.models);
        assert!(c.judge.is_some());
        let d = c.load_data_config().unwrap();
        for pool in c.sizes.keys() {
            assert!(d.pools.iter().any(|p| &p.name == pool), "{pool}");
        }
    }

    #[test]
    fn every_eval_config_in_the_repo_parses() {
        let mut n = 0;
        for e in std::fs::read_dir(fusechat_data::config_file::repository_configs()).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("eval-") && name.ends_with(".toml") {
                let c = EvalConfig::load(Some(&p)).unwrap_or_else(|e| panic!("{name}: {e}"));
                c.load_data_config()
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                n += 1;
            }
        }
        assert!(n >= 1);
    }

    #[test]
    fn bad_configs_are_errors() {
        let base = Path::new(".");
        let mut t = TINY.to_string();
        t.push_str("\nbogus = 1\n");
        assert!(EvalConfig::parse(&t, base).is_err());
        let t = TINY.replace("base_url = \"http://", "base_url = \"ftp://");
        assert!(EvalConfig::parse(&t, base)
            .unwrap_err()
            .to_string()
            .contains("http"));
    }
}
