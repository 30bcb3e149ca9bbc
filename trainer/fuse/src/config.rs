//! The one config file of `fusechat fuse`: the run folder, the server, the
//! target, the two training stages, and inline the data config (`[data]`,
//! the schema of `fusechat sample`) and the eval config (`[eval]`, the
//! schema of `fusechat eval`) that the run writes out under
//! `RUN/config/` and hands to those stages.
//!
//! Relative paths resolve against the config file's folder.

use std::path::{Path, PathBuf};

use fusechat_admin_api::{Isq, LINEAR_LAYERS};
use serde::Deserialize;

use fusechat_train::settings::{Stage, StageOptions, StageSettings};

use crate::error::{FuseError, Result};

pub use fusechat_data::config_file::embedded_base;
use fusechat_data::config_file::{ConfigFile, Embedded};

/// The embedded default: `config/fuse-tiny.toml`.
pub const TINY: &str = include_str!("../../../config/fuse-tiny.toml");

const DEFAULT: Embedded = Embedded {
    name: "config/fuse-tiny.toml",
    text: TINY,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FuseConfig {
    pub run: RunSection,
    #[serde(default)]
    pub server: ServerSection,
    pub target: TargetSection,
    /// The settings of `fusechat sft`, under the same names and defaults.
    #[serde(default)]
    pub sft: StageSettings,
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
    /// When DPO runs, also load the SFT model and evaluate it (the "SFT
    /// target" row), so the report says what each stage bought. The server
    /// holds one more copy of the target while the run evaluates (unloaded
    /// after; a server that cannot load it costs the row, with a warning).
    #[serde(default = "yes")]
    pub evaluate_sft: bool,
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
    pub isq: Option<Isq>,
    #[serde(default)]
    pub float_layers: Vec<String>,
    pub max_seqs: Option<usize>,
}

/// `[dpo]`: whether DPO runs and its objective, beside the settings every
/// training stage shares (the flags of `fusechat dpo`, with the same names
/// and defaults). Read from one table: the objective's keys are taken out and
/// the rest must be a [`StageSettings`], so a misspelt key is still refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "toml::Table")]
pub struct DpoSection {
    /// Run DPO after SFT (the fused model is the SFT model when off, or
    /// when pairing found no pairs).
    pub enabled: bool,
    /// sigmoid, ln (length-normalised, FuseChat-3.0) or ipo.
    pub loss: String,
    pub beta: f64,
    pub label_smoothing: f64,
    pub train: StageSettings,
}

/// The keys of `[dpo]` that are its own, not the shared stage settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DpoObjective {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default = "default_loss")]
    loss: String,
    #[serde(default = "default_beta")]
    beta: f64,
    #[serde(default)]
    label_smoothing: f64,
}

impl TryFrom<toml::Table> for DpoSection {
    type Error = String;

    fn try_from(mut table: toml::Table) -> std::result::Result<Self, String> {
        let mut own = toml::Table::new();
        for key in ["enabled", "loss", "beta", "label_smoothing"] {
            if let Some(value) = table.remove(key) {
                own.insert(key.into(), value);
            }
        }
        let objective: DpoObjective = toml::Value::Table(own)
            .try_into()
            .map_err(|e: toml::de::Error| e.message().trim_end().to_string())?;
        let train: StageSettings =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    format!(
                        "{} (or enabled, loss, beta, label_smoothing)",
                        e.message().trim_end()
                    )
                })?;
        Ok(Self {
            enabled: objective.enabled,
            loss: objective.loss,
            beta: objective.beta,
            label_smoothing: objective.label_smoothing,
            train,
        })
    }
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
        toml::Table::new()
            .try_into()
            .expect("every DPO field has a default")
    }
}

fn stage_options(settings: &StageSettings, stage: Stage, table: &str) -> Result<StageOptions> {
    settings
        .resolve(stage)
        .map_err(|e| FuseError::Config(format!("[{table}] {e}")))
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
        let file = ConfigFile::read(path, &DEFAULT).map_err(|e| FuseError::Io {
            what: format!(
                "reading the fuse config {}",
                path.unwrap_or(Path::new("")).display()
            ),
            source: e,
        })?;
        Self::parse(&file.text, &file.base_dir, &file.origin)
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
        if let Some(l) = self
            .target
            .float_layers
            .iter()
            .find(|l| !LINEAR_LAYERS.contains(&l.as_str()))
        {
            return bad(format!(
                "target.float_layers names `{l}`; the layers are {}",
                LINEAR_LAYERS.join(", ")
            ));
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
        self.sft_options()?;
        self.dpo_options()?;
        self.dpo.preference()?;
        Ok(())
    }

    /// What `[sft]` trains with, checked as `fusechat sft` checks its flags.
    pub fn sft_options(&self) -> Result<StageOptions> {
        stage_options(&self.sft, Stage::Sft, "sft")
    }

    /// What `[dpo]` trains with, checked as `fusechat dpo` checks its flags.
    pub fn dpo_options(&self) -> Result<StageOptions> {
        stage_options(&self.dpo.train, Stage::Dpo, "dpo")
    }

    pub fn resolve(&self, p: &Path) -> PathBuf {
        fusechat_data::config_file::resolve(&self.base_dir, p)
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
        let default_rows = ["base target", "SFT target", "fused target"];
        for (c, sft, rows) in [
            (
                FuseConfig::load(None).unwrap(),
                Some("t-sft-1"),
                &default_rows[..],
            ),
            (shipped("fuse-gpu.toml"), None, &sources[..]),
            (shipped("fuse-math.toml"), None, &sources[..2]),
        ] {
            let data = crate::data_config(&c, run).unwrap();
            assert_eq!(data.output_dir(), run.join("data"));
            assert!(data.prompts.data_dir.is_absolute());
            // A fuse run redoes samples made under an older [data].
            assert_eq!(
                data.sampling.on_change,
                fusechat_data::config::OnChange::Resample
            );
            let eval = crate::eval_config(&c, run, &data, "t-fused-1", sft).unwrap();
            let names: Vec<&str> = eval.models.iter().map(|m| m.name.as_str()).collect();
            assert_eq!(names, rows, "{}", c.origin);
            let fused = eval
                .models
                .iter()
                .find(|m| m.name == "fused target")
                .unwrap();
            assert_eq!(fused.model(), "t-fused-1");
        }
    }

    /// `[sft]` and `[dpo]` are one settings type (the flags of `fusechat sft|dpo`), with
    /// the stage's defaults for what they leave out; `[dpo]` adds its objective.
    #[test]
    fn both_stages_take_the_shared_settings() {
        let text = r#"
[run]
output = "out"
[target]
model = "m"
fetched = "m"
[sft]
lora_rank = 16
lora_targets = "all-linear"
gradient_checkpointing = true
[dpo]
loss = "sigmoid"
beta = 0.1
batch = 3
[data]
[eval]
"#;
        let c = FuseConfig::parse(text, Path::new("."), "t").unwrap();
        let sft = c.sft_options().unwrap();
        assert_eq!(
            (sft.train.epochs, sft.train.micro_batch, sft.max_len),
            (3, 4, 1024)
        );
        assert_eq!(sft.train.lora.as_ref().map(|l| l.rank()), Some(16));
        assert!(sft.train.gradient_checkpointing);
        let dpo = c.dpo_options().unwrap();
        assert_eq!(
            (dpo.train.epochs, dpo.train.micro_batch, dpo.train.lr),
            (1, 3, 1e-6)
        );
        assert!(dpo.train.lora.is_none() && c.dpo.enabled);
        assert_eq!((c.dpo.loss.as_str(), c.dpo.beta), ("sigmoid", 0.1));
        let run = crate::run_options(sft);
        assert!(
            run.train.merge,
            "a LoRA stage of the run writes a merged model"
        );
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
                ok.replace("[data]", "[dpo]\nbacth = 2\n[data]"),
                "unknown field `bacth`",
            ),
            (
                ok.replace("[data]", "[sft]\nlora_targets = \"qkv\"\n[data]"),
                "[sft] lora_targets is invalid",
            ),
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
