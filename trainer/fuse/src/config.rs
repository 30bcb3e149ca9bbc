//! The one config file of `fusechat fuse`: the run folder, the server, the
//! target, the two training stages, and inline the data config (`[data]`,
//! the schema of `fusechat sample`) and the eval config (`[eval]`, the
//! schema of `fusechat eval`) that the run writes out under
//! `RUN/config/` and hands to those stages.
//!
//! Relative paths resolve against the config file's folder.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{FuseError, Result};

/// The embedded default: `config/fuse-tiny.toml`.
pub const TINY: &str = include_str!("../../../config/fuse-tiny.toml");

/// Where relative paths of the embedded default resolve: the repository's
/// `config` folder at build time.
pub fn embedded_base() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config"))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FuseConfig {
    pub run: RunSection,
    #[serde(default)]
    pub server: ServerSection,
    pub target: TargetSection,
    #[serde(default)]
    pub sft: SftSection,
    #[serde(default)]
    pub dpo: DpoSection,
    /// A data config (`fusechat sample --config`), without `[run]`: the run
    /// sets its output to `RUN/data`.
    pub data: toml::Table,
    /// An eval config (`fusechat eval --config`), without `data_config`,
    /// `output` and the target rows, which the run fills in.
    pub eval: toml::Table,
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// Where the config came from (for the report).
    #[serde(skip)]
    pub origin: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// The run folder: config/, data/, models/, sft/, dpo/, fused/, eval/,
    /// report.md, report.json, server.log.
    pub output: PathBuf,
    /// Evaluate the sources too (rows next to the base and fused targets).
    #[serde(default = "yes")]
    pub evaluate_sources: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// The server the data and eval endpoints name. If it answers, it is
    /// used (it needs `admin.model_root` above the run folder and the admin
    /// key in `admin_key_env`); if not, `fusechat serve` is started there.
    #[serde(default = "default_url")]
    pub url: String,
    /// Server config to start with. Unset: the embedded config/serve.toml.
    pub config: Option<PathBuf>,
    /// Start a server when none answers at `url` (otherwise that is an error).
    #[serde(default = "yes")]
    pub start: bool,
    /// Environment variable holding the admin key of a running server. A
    /// server this run starts gets a fresh random key.
    #[serde(default = "default_admin_key_env")]
    pub admin_key_env: String,
    /// How long a started server may take to load its models.
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout_s: u64,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            url: default_url(),
            config: None,
            start: true,
            admin_key_env: default_admin_key_env(),
            ready_timeout_s: default_ready_timeout(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSection {
    /// The target's model id on the server: the "base target" row.
    pub model: String,
    /// Its weights, to train from: a name of `fusechat models list` (its GGUF
    /// is imported into `RUN/models/base` in f32) ...
    pub fetched: Option<String>,
    /// ... or a Hugging Face folder.
    pub path: Option<PathBuf>,
    /// The name clients use for the fused model; the run points it at the
    /// fused weights once they are loaded.
    #[serde(default = "default_alias")]
    pub alias: String,
    /// How the server loads the fused model: the same in-situ quantization
    /// and float layers as the base target's entry in the server config, so
    /// the two rows differ only in their weights.
    pub isq: Option<String>,
    #[serde(default)]
    pub float_layers: Vec<String>,
    pub max_seqs: Option<usize>,
}

/// Settings of `fusechat sft` (the same names and defaults as its flags).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftSection {
    #[serde(default = "three")]
    pub epochs: usize,
    pub max_steps: Option<usize>,
    #[serde(default = "four")]
    pub batch: usize,
    #[serde(default = "two")]
    pub grad_accum: usize,
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    #[serde(default = "default_sft_lr")]
    pub lr: f64,
    #[serde(default = "default_warmup")]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "one")]
    pub max_grad_norm: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

impl Default for SftSection {
    fn default() -> Self {
        toml::from_str("").expect("every SFT field has a default")
    }
}

/// Settings of `fusechat dpo`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoSection {
    /// Run DPO after SFT (the fused model is the SFT model when off, or
    /// when pairing found no pairs).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// sigmoid, ln (length-normalised, FuseChat-3.0) or ipo.
    #[serde(default = "default_loss")]
    pub loss: String,
    #[serde(default = "default_beta")]
    pub beta: f64,
    #[serde(default)]
    pub label_smoothing: f64,
    #[serde(default = "one_usize")]
    pub epochs: usize,
    pub max_steps: Option<usize>,
    #[serde(default = "two")]
    pub batch: usize,
    #[serde(default = "two")]
    pub grad_accum: usize,
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    #[serde(default = "default_dpo_lr")]
    pub lr: f64,
    #[serde(default = "default_warmup")]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "one")]
    pub max_grad_norm: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

impl DpoSection {
    /// The preference objective, checked by the trainer as `fusechat dpo` checks it.
    pub fn preference(&self) -> Result<fusechat_train::loss::Preference> {
        let loss = self
            .loss
            .parse()
            .map_err(|e: String| FuseError::Config(format!("[dpo] loss: {e}")))?;
        fusechat_train::loss::Preference::new(loss, self.beta, self.label_smoothing)
            .map_err(|e| FuseError::Config(format!("[dpo] {e}")))
    }
}

impl Default for DpoSection {
    fn default() -> Self {
        toml::from_str("").expect("every DPO field has a default")
    }
}

fn yes() -> bool {
    true
}
fn default_url() -> String {
    "http://127.0.0.1:8080".into()
}
fn default_admin_key_env() -> String {
    "FUSECHAT_ADMIN_KEY".into()
}
fn default_ready_timeout() -> u64 {
    1800
}
fn default_alias() -> String {
    "target".into()
}
fn one_usize() -> usize {
    1
}
fn two() -> usize {
    2
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn one() -> f64 {
    1.0
}
fn default_max_len() -> usize {
    1024
}
fn default_sft_lr() -> f64 {
    5e-6
}
fn default_dpo_lr() -> f64 {
    1e-6
}
fn default_warmup() -> f64 {
    0.1
}
fn default_seed() -> u64 {
    42
}
fn default_loss() -> String {
    "ln".into()
}
fn default_beta() -> f64 {
    10.0
}

impl FuseConfig {
    pub fn parse(text: &str, base_dir: &Path, origin: &str) -> Result<Self> {
        let mut c: FuseConfig =
            toml::from_str(text).map_err(|e| FuseError::Config(format!("{origin}: {e}")))?;
        c.base_dir = std::path::absolute(base_dir).unwrap_or_else(|_| base_dir.to_path_buf());
        c.origin = origin.to_string();
        c.validate()?;
        Ok(c)
    }

    /// A config file, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| FuseError::Io {
                    what: format!("reading the fuse config {}", p.display()),
                    source: e,
                })?;
                let base = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                Self::parse(&text, base, &p.display().to_string())
            }
            None => Self::parse(TINY, &embedded_base(), "<embedded config/fuse-tiny.toml>"),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(FuseError::Config(m));
        let url = self.server.url.trim_end_matches('/');
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return bad(format!(
                "server.url must be http(s)://HOST:PORT, got `{url}`"
            ));
        }
        if url.ends_with("/v1") {
            return bad(format!(
                "server.url is the server's root (`{}`), without /v1",
                url.trim_end_matches("/v1")
            ));
        }
        match (&self.target.fetched, &self.target.path) {
            (None, None) => {
                return bad(
                    "[target] needs `fetched` (a name of `fusechat models list`) or `path` (a Hugging Face folder)"
                        .into(),
                )
            }
            (Some(_), Some(_)) => return bad("[target] has both `fetched` and `path`; keep one".into()),
            _ => {}
        }
        if self.target.alias.trim().is_empty() || self.target.alias == self.target.model {
            return bad(
                "target.alias must be a name of its own (not empty, not the model id)".into(),
            );
        }
        const LINEAR: [&str; 8] = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "lm_head",
        ];
        if let Some(l) = self
            .target
            .float_layers
            .iter()
            .find(|l| !LINEAR.contains(&l.as_str()))
        {
            return bad(format!(
                "target.float_layers names `{l}`; the layers are {}",
                LINEAR.join(", ")
            ));
        }
        if let Some(isq) = &self.target.isq {
            if !["none", "q8_0", "q4_1", "q4k"].contains(&isq.as_str()) {
                return bad(format!(
                    "target.isq is none, q8_0, q4_1 or q4k, got `{isq}`"
                ));
            }
        }
        for (name, table) in [("data", &self.data), ("eval", &self.eval)] {
            for key in ["run", "output", "data_config"] {
                if table.contains_key(key) {
                    return bad(format!(
                        "[{name}] must not set `{key}`: the run sets it (under run.output)"
                    ));
                }
            }
        }
        for (stage, epochs, batch, accum, lr, warmup) in [
            (
                "sft",
                self.sft.epochs,
                self.sft.batch,
                self.sft.grad_accum,
                self.sft.lr,
                self.sft.warmup_ratio,
            ),
            (
                "dpo",
                self.dpo.epochs,
                self.dpo.batch,
                self.dpo.grad_accum,
                self.dpo.lr,
                self.dpo.warmup_ratio,
            ),
        ] {
            if epochs == 0 || batch == 0 || accum == 0 {
                return bad(format!(
                    "[{stage}] epochs, batch and grad_accum must be at least 1"
                ));
            }
            if !(lr.is_finite() && lr > 0.0) {
                return bad(format!("[{stage}] lr must be a positive number, got {lr}"));
            }
            if !(0.0..=1.0).contains(&warmup) {
                return bad(format!(
                    "[{stage}] warmup_ratio must lie in [0, 1], got {warmup}"
                ));
            }
        }
        self.dpo.preference()?;
        Ok(())
    }

    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The run folder, absolute.
    pub fn run_dir(&self) -> PathBuf {
        let p = self.resolve(&self.run.output);
        std::path::absolute(&p).unwrap_or(p)
    }

    pub fn server_url(&self) -> String {
        self.server.url.trim_end_matches('/').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses() {
        let c = FuseConfig::load(None).unwrap();
        assert_eq!(c.target.model, "smollm2-135m-instruct");
        assert!(c.data.contains_key("sources"));
        assert!(c.eval.contains_key("sizes"));
    }

    #[test]
    fn shipped_configs_give_valid_data_and_eval_configs() {
        let run = Path::new("/nonexistent/run");
        let shipped = |name: &str| {
            let path = format!("{}/../../config/{name}", env!("CARGO_MANIFEST_DIR"));
            FuseConfig::load(Some(Path::new(&path))).unwrap()
        };
        let sources = [
            "base target",
            "fused target",
            "qwen2.5-coder-0.5b-instruct",
            "gemma-3-270m",
        ];
        for (c, rows) in [
            (FuseConfig::load(None).unwrap(), &sources[..]),
            (shipped("fuse-gpu.toml"), &sources[..]),
            (shipped("fuse-math.toml"), &sources[..2]),
        ] {
            let data = crate::data_config(&c, run).unwrap();
            assert_eq!(data.output_dir(), run.join("data"));
            assert!(data.prompts.data_dir.is_absolute());
            // A fuse run redoes samples made under an older [data].
            assert_eq!(
                data.sampling.on_change,
                fusechat_data::config::OnChange::Resample
            );
            let eval = crate::eval_config(&c, run, &data, "t-fused-1").unwrap();
            let names: Vec<&str> = eval.models.iter().map(|m| m.name.as_str()).collect();
            assert_eq!(names, rows, "{}", c.origin);
            assert_eq!(eval.models[1].model(), "t-fused-1");
        }
    }

    #[test]
    fn refuses_what_the_run_sets_and_bad_values() {
        let ok = r#"
[run]
output = "out"
[target]
model = "m"
fetched = "m"
[data]
[eval]
"#;
        FuseConfig::parse(ok, Path::new("."), "t").unwrap();
        let cases = [
            (
                ok.replace("[data]", "[data]\nrun = { output = \"x\" }"),
                "must not set `run`",
            ),
            (
                ok.replace("[eval]", "[eval]\noutput = \"x\""),
                "must not set `output`",
            ),
            (ok.replace("fetched = \"m\"", ""), "needs `fetched`"),
            (
                ok.replace("[data]", "[sft]\nlr = 0.0\n[data]"),
                "lr must be a positive",
            ),
            (
                ok.replace("[data]", "[dpo]\nloss = \"kto\"\n[data]"),
                "[dpo] loss",
            ),
            (
                ok.replace(
                    "[data]",
                    "[dpo]\nloss = \"ipo\"\nlabel_smoothing = 0.1\n[data]",
                ),
                "not to ipo",
            ),
            (
                ok.replace("[data]", "[server]\nurl = \"http://h:1/v1\"\n[data]"),
                "without /v1",
            ),
            (ok.replace("[data]", "[target2]\n[data]"), "unknown field"),
            (
                ok.replace(
                    "fetched = \"m\"",
                    "fetched = \"m\"\nfloat_layers = [\"qproj\"]",
                ),
                "float_layers names `qproj`",
            ),
        ];
        for (text, want) in cases {
            let e = FuseConfig::parse(&text, Path::new("."), "t")
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
