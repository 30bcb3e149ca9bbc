//! Server configuration: a TOML file (see `config/serve.toml`), with the
//! embedded default serving the three fetched models.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The embedded default: the three real models fetched by `fusechat models fetch`.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/serve.toml");

pub use fusechat_admin_api::{Isq, LINEAR_LAYERS};
pub use crate::placement::{Device, LayerShare, PagedAttention};
use crate::placement::{Placement, PlacementConfig, CUDA_BUILT};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default)]
    pub listen: ListenConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// Names clients use that point at a model id (`target = "smollm2-135m-instruct"`);
    /// the admin routes repoint them atomically.
    #[serde(default)]
    pub aliases: std::collections::BTreeMap<String, String>,
}

/// Hot-swap: what the admin routes may load.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Only model folders (or GGUF files) under this folder may be loaded
    /// through `POST /admin/models`. Unset: loading at runtime is refused.
    /// Relative paths are taken from the config file's folder.
    pub model_root: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// HTTP worker threads; 0 means one per core.
    #[serde(default)]
    pub workers: usize,
    /// On SIGTERM, how long running requests and streams may take to finish
    /// before the server stops anyway (a pod's terminationGracePeriodSeconds
    /// should be a little longer).
    #[serde(default = "default_shutdown_grace_s")]
    pub shutdown_grace_s: u64,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            host: default_host(),
            port: default_port(),
            workers: 0,
            shutdown_grace_s: default_shutdown_grace_s(),
        }
    }
}

fn default_host() -> String {
    "127.0.0.1".to_string()
}

fn default_port() -> u16 {
    8080
}

fn default_shutdown_grace_s() -> u64 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted request body.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Largest `n`.
    #[serde(default = "default_max_n")]
    pub max_n: u32,
    /// Largest `max_tokens`; also the default when a request gives none
    /// (capped by what is left of the context).
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u64,
    /// Largest number of stop sequences.
    #[serde(default = "default_max_stop")]
    pub max_stop_sequences: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body_bytes(),
            max_n: default_max_n(),
            max_tokens: default_max_tokens(),
            max_stop_sequences: default_max_stop(),
        }
    }
}

fn default_max_body_bytes() -> usize {
    2 * 1024 * 1024
}
fn default_max_n() -> u32 {
    16
}
fn default_max_tokens() -> u64 {
    4096
}
fn default_max_stop() -> usize {
    4
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer keys accepted on `/v1`. Empty: no key needed.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Bearer key for the admin routes. None: admin routes are refused.
    pub admin_key: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients put in `model`.
    pub id: String,
    /// Where the weights are: a GGUF file or a Hugging Face folder.
    /// Relative paths are taken from the config file's folder.
    pub path: Option<PathBuf>,
    /// Instead of `path`: a model fetched by `fusechat models fetch`.
    pub fetched: Option<String>,
    /// A Jinja chat template file that replaces the model's own.
    pub chat_template: Option<PathBuf>,
    /// Sequences decoded together (continuous batching).
    #[serde(default = "default_max_seqs")]
    pub max_seqs: usize,
    /// Sequences that may wait for a slot; past that, 429.
    #[serde(default = "default_max_waiting")]
    pub max_waiting: usize,
    /// Prompt tokens prefilled per engine step (chunked prefill): a long
    /// prompt is processed this many tokens at a time, and the sequences
    /// being decoded take a step between two chunks instead of stalling for
    /// the whole prompt. 0 prefills a prompt in one step. On the CPU, the
    /// engines that decode sequences of different lengths together chunk:
    /// GGUF llama, qwen2 and gemma3 files and llama folders; others ignore it.
    #[serde(default = "default_prefill_chunk")]
    pub prefill_chunk: usize,
    /// Sampling used where a request gives none.
    #[serde(default)]
    pub defaults: SamplingDefaults,
    /// Quantize the float weights of a Hugging Face folder when loading it
    /// (mistralrs in-situ quantization). Unset: `none`. Check a model's greedy
    /// answers before turning it on, and see `float_layers`. A GGUF file is
    /// served from its own quantized tensors while this is unset; set, the
    /// file is imported into float weights first (`none`: served as f32, as
    /// `--model ID=PATH:f32` does). `GET /v1/models` lists how each model
    /// holds its weights.
    #[serde(default)]
    pub isq: Option<Isq>,
    /// With `isq`: the linear layers (by name: q_proj, k_proj, v_proj, o_proj,
    /// gate_proj, up_proj, down_proj, lm_head) that keep their float weights.
    /// On the CPU, q8_0 and q4_1 layers keep f32 inputs (fusechat-kernels);
    /// q4k layers run candle's kernel, which rounds its inputs to 8 bits per
    /// block of 32, and a layer with outlier inputs (SmolLM2's `down_proj`
    /// reaches 3058 where most values are below 1) may need to stay float.
    #[serde(default)]
    pub float_layers: Vec<String>,
    /// Where the model runs: `cpu`, `cuda` or `cuda:N`. Unset: the first GPU
    /// in a CUDA build, else the CPU.
    #[serde(default)]
    pub device: Option<Device>,
    /// Instead of `device`: the model's layers split across GPUs, in order
    /// (`layers = [{ device = "cuda:0", count = 16 }, { device = "cuda:1", count = 8 }]`).
    #[serde(default)]
    pub layers: Vec<LayerShare>,
    /// The paged KV cache of a model on a GPU (on by default there).
    #[serde(default)]
    pub paged_attention: Option<PagedAttention>,
}

fn default_max_seqs() -> usize {
    16
}
fn default_max_waiting() -> usize {
    64
}
fn default_prefill_chunk() -> usize {
    256
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f32>,
    pub max_tokens: Option<u64>,
}

/// Where a model's weights come from, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Path(PathBuf),
    Fetched(String),
}

impl ModelConfig {
    /// A model given on the command line as `ID=PATH`, with default settings.
    pub fn from_path(id: &str, path: PathBuf) -> Self {
        Self {
            id: id.to_string(),
            path: Some(path),
            fetched: None,
            chat_template: None,
            max_seqs: default_max_seqs(),
            max_waiting: default_max_waiting(),
            prefill_chunk: default_prefill_chunk(),
            defaults: SamplingDefaults::default(),
            isq: None,
            float_layers: Vec::new(),
            device: None,
            layers: Vec::new(),
            paged_attention: None,
        }
    }

    /// Where the model runs, checked against this build.
    pub fn placement(&self) -> Result<Placement, ConfigError> {
        self.placement_config()
            .resolve(CUDA_BUILT)
            .map_err(|e| ConfigError::Invalid(format!("model `{}`: {e}", self.id)))
    }

    pub fn placement_config(&self) -> PlacementConfig<'_> {
        PlacementConfig {
            device: self.device,
            layers: &self.layers,
            paged_attention: self.paged_attention.as_ref(),
        }
    }

    pub fn source(&self) -> ModelSource {
        match (&self.path, &self.fetched) {
            (Some(path), _) => ModelSource::Path(path.clone()),
            (None, Some(name)) => ModelSource::Fetched(name.clone()),
            (None, None) => unreachable!("validated: every model has a path or a fetched name"),
        }
    }
}

impl ServerConfig {
    pub fn embedded_default() -> Self {
        Self::parse(DEFAULT_CONFIG, Path::new("<embedded config/serve.toml>"), None)
            .expect("the embedded default config is valid")
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path, path.parent())
    }

    fn parse(text: &str, path: &Path, base: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config: ServerConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        if let Some(base) = base {
            if let Some(root) = &mut config.admin.model_root {
                if root.is_relative() {
                    *root = base.join(&*root);
                }
            }
            for model in &mut config.models {
                for p in [&mut model.path, &mut model.chat_template].into_iter().flatten() {
                    if p.is_relative() {
                        *p = base.join(&*p);
                    }
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Adds a model, or replaces the one with the same id.
    pub fn upsert_model(&mut self, model: ModelConfig) {
        match self.models.iter_mut().find(|m| m.id == model.id) {
            Some(existing) => *existing = model,
            None => self.models.push(model),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for model in &self.models {
            if model.id.trim().is_empty() {
                return Err(ConfigError::Invalid("a model has an empty id".into()));
            }
            if !seen.insert(model.id.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "model id `{}` is used twice",
                    model.id
                )));
            }
            if let Some(unknown) = model.float_layers.iter().find(|l| !LINEAR_LAYERS.contains(&l.as_str())) {
                return Err(ConfigError::Invalid(format!(
                    "model `{}`: `float_layers` names `{unknown}`; the layers are {}",
                    model.id,
                    LINEAR_LAYERS.join(", ")
                )));
            }
            match (&model.path, &model.fetched) {
                (None, None) => {
                    return Err(ConfigError::Invalid(format!(
                        "model `{}` needs `path` (GGUF file or Hugging Face folder) or `fetched` (a name from `fusechat models list`)",
                        model.id
                    )))
                }
                (Some(_), Some(_)) => {
                    return Err(ConfigError::Invalid(format!(
                        "model `{}` has both `path` and `fetched`; keep one",
                        model.id
                    )))
                }
                _ => {}
            }
            model.placement()?;
            if model.max_seqs == 0 {
                return Err(ConfigError::Invalid(format!(
                    "model `{}`: max_seqs must be at least 1",
                    model.id
                )));
            }
        }
        for (alias, target) in &self.aliases {
            if seen.contains(alias.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "alias `{alias}` is also a model id; an alias needs a name of its own"
                )));
            }
            if !seen.contains(target.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "alias `{alias}` points at `{target}`, which is not a configured model"
                )));
            }
        }
        if self.limits.max_n == 0 || self.limits.max_tokens == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_n and limits.max_tokens must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gpu_config_serves_the_same_three_models() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../config/serve-gpu.toml"));
        let gpu = ServerConfig::load(path).unwrap();
        let ids = |c: &ServerConfig| c.models.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&gpu), ids(&ServerConfig::embedded_default()));
        assert_eq!(gpu.listen.host, "127.0.0.1");
        for model in &gpu.models {
            let paged = model.placement().unwrap().paged().cloned();
            assert_eq!(paged.is_some(), CUDA_BUILT, "{}", model.id);
        }
    }

    #[test]
    fn placement_is_checked_with_the_model() {
        let text = "[[models]]\nid = \"a\"\npath = \"/x/a.gguf\"\ndevice = \"cuda:1\"\n";
        let parsed = ServerConfig::parse(text, Path::new("x.toml"), None);
        if CUDA_BUILT {
            assert_eq!(parsed.unwrap().models[0].placement().unwrap().to_string(), "cuda:1, paged KV cache (32 tokens a block)");
        } else {
            let err = parsed.unwrap_err().to_string();
            assert!(err.contains("model `a`: this binary has no CUDA"), "{err}");
        }
        let text = "[[models]]\nid = \"a\"\npath = \"/x/a.gguf\"\ndevice = \"tpu\"\n";
        let err = ServerConfig::parse(text, Path::new("x.toml"), None).unwrap_err().to_string();
        assert!(err.contains("`cpu`, `cuda` or `cuda:N`"), "{err}");
    }

    #[test]
    fn embedded_default_serves_the_three_models() {
        let config = ServerConfig::embedded_default();
        let ids: Vec<_> = config.models.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(
            ids,
            ["smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct"]
        );
        assert_eq!(config.listen.host, "127.0.0.1");
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let dir = std::env::temp_dir().join(format!("fusechat-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("serve.toml");
        std::fs::write(&file, "[[models]]\nid = \"a\"\npath = \"weights/a.gguf\"\n").unwrap();
        let config = ServerConfig::load(&file).unwrap();
        assert_eq!(config.models[0].source(), ModelSource::Path(dir.join("weights/a.gguf")));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_model_without_weights_is_refused() {
        let err = ServerConfig::parse("[[models]]\nid = \"a\"\n", Path::new("x.toml"), None)
            .unwrap_err();
        assert!(err.to_string().contains("needs `path`"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = ServerConfig::parse("[listen]\nhots = \"x\"\n", Path::new("x.toml"), None)
            .unwrap_err();
        assert!(err.to_string().contains("hots"), "{err}");
    }

    #[test]
    fn aliases_must_point_at_models_and_not_shadow_them() {
        let base = "[[models]]\nid = \"a\"\npath = \"/x/a.gguf\"\n";
        let ok = ServerConfig::parse(&format!("{base}[aliases]\ntarget = \"a\"\n"), Path::new("x.toml"), None).unwrap();
        assert_eq!(ok.aliases["target"], "a");
        let err = ServerConfig::parse(&format!("{base}[aliases]\ntarget = \"b\"\n"), Path::new("x.toml"), None).unwrap_err();
        assert!(err.to_string().contains("not a configured model"), "{err}");
        let err = ServerConfig::parse(&format!("{base}[aliases]\na = \"a\"\n"), Path::new("x.toml"), None).unwrap_err();
        assert!(err.to_string().contains("also a model id"), "{err}");
    }

    #[test]
    fn upsert_replaces_same_id() {
        let mut config = ServerConfig::embedded_default();
        config.upsert_model(ModelConfig::from_path("gemma-3-270m", "/x/g.gguf".into()));
        config.upsert_model(ModelConfig::from_path("new", "/x/n.gguf".into()));
        assert_eq!(config.models.len(), 4);
        assert_eq!(config.models[1].source(), ModelSource::Path("/x/g.gguf".into()));
    }
}
