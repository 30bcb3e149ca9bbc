//! The one TOML config that `fusechat sample`, `score` and `pair` share.
//!
//! Paths are relative to the config file's folder (or absolute). The prompt
//! data folder, when the config's relative one does not exist, is taken from
//! `$FUSECHAT_DATA_DIR`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Context, DataError, Result};
use serde::{Deserialize, Serialize};

pub use crate::config_file::embedded_base;
use crate::config_file::{ConfigFile, Embedded};

/// The embedded default: `config/data-tiny.toml`.
pub const TINY: &str = include_str!("../../../config/data-tiny.toml");

/// The embedded default's path in the repository.
pub const DEFAULT_NAME: &str = "config/data-tiny.toml";

const DEFAULT: Embedded = Embedded {
    name: DEFAULT_NAME,
    text: TINY,
};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub run: RunConfig,
    pub prompts: PromptsConfig,
    #[serde(default, rename = "pools")]
    pub pools: Vec<PoolConfig>,
    #[serde(default, rename = "endpoints")]
    pub endpoints: Vec<EndpointConfig>,
    #[serde(default, rename = "sources")]
    pub sources: Vec<SourceConfig>,
    pub sampling: SamplingConfig,
    #[serde(default)]
    pub scoring: ScoringConfig,
    #[serde(default)]
    pub pairing: PairingConfig,
    /// The folder relative paths resolve against (not part of the TOML).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Output folder: the store, sft.jsonl, dpo.jsonl, report.*.
    pub output: PathBuf,
    /// The store; default `<output>/store.sqlite`.
    #[serde(default)]
    pub store: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PromptsConfig {
    /// Folder holding the pool files (see `Config::data_dir` for `$FUSECHAT_DATA_DIR`).
    pub data_dir: PathBuf,
    /// Seed of the training/evaluation split.
    #[serde(default = "default_seed")]
    pub split_seed: u64,
    /// Fraction of every pool that goes to the evaluation side.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// Appended to every math question.
    #[serde(default = "default_math_suffix")]
    pub math_suffix: String,
    /// Appended to every code task; `{entry_point}` is replaced.
    #[serde(default = "default_code_suffix")]
    pub code_suffix: String,
}

pub fn default_math_suffix() -> String {
    "\n\nSolve the problem step by step, then write the final answer as a number on the last line, in the form \"The answer is N\".".into()
}

pub fn default_code_suffix() -> String {
    "\n\nWrite the Python function `{entry_point}` that solves this task. Reply with the complete function in one ```python code block.".into()
}

fn default_seed() -> u64 {
    42
}
fn default_eval_fraction() -> f64 {
    0.5
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Domain {
    Instruction,
    Math,
    Code,
}

impl Domain {
    pub fn as_str(self) -> &'static str {
        match self {
            Domain::Instruction => "instruction",
            Domain::Math => "math",
            Domain::Code => "code",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "instruction" => Domain::Instruction,
            "math" => Domain::Math,
            "code" => Domain::Code,
            other => return Err(DataError::Config(format!("unknown domain `{other}`"))),
        })
    }
}

/// How the rows of a pool file look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolFormat {
    /// `question`, `answer` ending in `#### N`, `idx`.
    Gsm8k,
    /// `input`, `target`, `idx`.
    Mawps,
    /// `body`, `question`, `answer` like `9 (apples)`, `idx`.
    Asdiv,
    /// MBPP+ from EvalPlus: `task_id`, `prompt`, `entry_point`, `canonical_solution`, `base_input`, `plus_input`, `atol`.
    MbppPlus,
    /// AlpacaEval: one JSON array of `{instruction, output, ...}`.
    AlpacaEval,
    /// Arena-Hard: `question_id`, `turns[0].content`.
    ArenaHard,
    /// Generic JSONL: `id`, `prompt`, optional `answer`.
    Jsonl,
    /// A Hugging Face dataset file, `.jsonl`, `.json` or `.parquet`, in one
    /// of the common layouts (`layout`, else told from the first row's
    /// fields) or read through `fields`.
    Auto,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Short name; prompt ids are `<name>/<row id>`.
    pub name: String,
    pub domain: Domain,
    pub format: PoolFormat,
    /// Relative to `prompts.data_dir` (or absolute).
    pub file: PathBuf,
    /// Take at most this many training-side prompts (in file order).
    #[serde(default)]
    pub limit: Option<usize>,
    /// `format = "auto"`: the row layout, when it is not to be told from the
    /// first row's fields (see `crate::hf`).
    #[serde(default)]
    pub layout: Option<Layout>,
    /// `format = "auto"`: the fields to read instead of the layout's own
    /// names, for datasets in no common layout.
    #[serde(default)]
    pub fields: FieldMap,
}

/// The common row layouts of Hugging Face datasets (`format = "auto"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Chat `messages` (or ShareGPT `conversations` with `from`/`value`):
    /// the first user turn is the prompt, the assistant turn after it the reference.
    Messages,
    /// `prompt` / `chosen` / `rejected` (a string or a list of messages):
    /// the prompt, and the chosen response as the reference.
    Preference,
    /// Alpaca: `instruction`, optional `input` (appended), `output` as the reference.
    Instruction,
    /// `question` / `answer` (GSM8K's `#### N`, a `\boxed{}` or a plain answer).
    QuestionAnswer,
    /// `problem` / `solution` (MATH, NuminaMath): `answer` when the row has
    /// one, else the solution's last `\boxed{}`.
    ProblemSolution,
}

/// Field names for `format = "auto"`, each overriding the layout's own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMap {
    /// The prompt: a string, or a list of chat messages (the first user turn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Text appended to the prompt after a blank line (Alpaca's `input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// The gold answer (math pools need one): a number, a LaTeX answer, a
    /// solution ending in `#### N` or holding a `\boxed{}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// A reference response (instruction pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The row id (default: `id`, `idx`, `question_id` or `unique_id` when
    /// present, else the row number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub name: String,
    /// e.g. `http://127.0.0.1:8080/v1`.
    pub base_url: String,
    #[serde(default)]
    pub api_key: Option<String>,
    /// Name of an environment variable holding the key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Requests in flight at once to this endpoint.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Per-request timeout.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Attempts after the first on 429, 5xx and connection errors.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// First backoff; doubles each retry (a `Retry-After` header wins).
    #[serde(default = "default_backoff")]
    pub backoff_s: f64,
}

fn default_concurrency() -> usize {
    4
}
fn default_timeout() -> f64 {
    600.0
}
fn default_retries() -> u32 {
    5
}
fn default_backoff() -> f64 {
    1.0
}

/// The longest duration a config field may name (about 31 years): a
/// bound that keeps every `Duration` made from it, and doubled, in range.
pub const MAX_SECONDS: f64 = 1e9;

/// A duration field in seconds as a `Duration`, or an error naming `field`
/// when it is not a finite number in [0, [`MAX_SECONDS`]] (or is zero where
/// `zero_ok` is false). Negative and NaN values would panic in
/// `Duration::from_secs_f64`.
pub fn seconds(field: &str, secs: f64, zero_ok: bool) -> Result<std::time::Duration> {
    let low_ok = if zero_ok { secs >= 0.0 } else { secs > 0.0 };
    if !(secs.is_finite() && low_ok && secs <= MAX_SECONDS) {
        return Err(DataError::Config(format!(
            "{field} must be a number of seconds {} {MAX_SECONDS} (got {secs})",
            if zero_ok {
                "from 0 to"
            } else {
                "above 0 and at most"
            }
        )));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

impl EndpointConfig {
    /// The fields a client needs to be usable: positive `timeout_s`,
    /// non-negative `backoff_s`, at least one request at once.
    pub fn validate(&self) -> Result<()> {
        let field = |f: &str| format!("endpoint `{}`: {f}", self.name);
        seconds(&field("timeout_s"), self.timeout_s, false)?;
        seconds(&field("backoff_s"), self.backoff_s, true)?;
        if self.concurrency == 0 {
            return Err(DataError::Config(format!("{} must be at least 1", field("concurrency"))));
        }
        Ok(())
    }

    pub fn key(&self) -> Option<String> {
        if let Some(k) = &self.api_key {
            return Some(k.clone());
        }
        self.api_key_env
            .as_ref()
            .and_then(|v| std::env::var(v).ok())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Name in the store and the outputs.
    pub id: String,
    /// `[[endpoints]]` name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    /// Several `[[endpoints]]` serving this model (replicas behind several
    /// base URLs, or several servers), instead of `endpoint`: each request
    /// goes to the least busy one that answers, and each keeps its own
    /// `concurrency`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// Model id sent to the endpoint; default: `id`.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    /// Overrides `sampling.max_tokens`.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Only these domains (default: all).
    #[serde(default)]
    pub domains: Option<Vec<Domain>>,
    /// Responses per prompt for this source, per domain, where it differs
    /// from `sampling.n` (e.g. several from the source whose answers are
    /// right often enough to give same-source pairs, one from the others).
    #[serde(default)]
    pub n: BTreeMap<Domain, u32>,
}

impl SourceConfig {
    pub fn model(&self) -> &str {
        self.model.as_deref().unwrap_or(&self.id)
    }
    pub fn serves(&self, d: Domain) -> bool {
        self.domains.as_ref().is_none_or(|ds| ds.contains(&d))
    }
    /// The `[[endpoints]]` this source is sampled through: `endpoint`, or `endpoints`.
    pub fn endpoint_names(&self) -> Vec<&str> {
        match self.endpoint.is_empty() {
            true => self.endpoints.iter().map(String::as_str).collect(),
            false => vec![self.endpoint.as_str()],
        }
    }
    /// Responses per prompt of domain `d`: this source's `n`, else `sampling.n`.
    pub fn n_for(&self, d: Domain, sampling: &SamplingConfig) -> u32 {
        self.n.get(&d).copied().unwrap_or_else(|| sampling.n_for(d))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    /// Responses per prompt and source, per domain (paper: 5 instruction, 8 code).
    pub n: BTreeMap<Domain, u32>,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u64,
    /// Send a per-sample seed derived from (prompt, source, index).
    #[serde(default)]
    pub seeded: bool,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Retry samples recorded as failed on a rerun.
    #[serde(default = "default_true")]
    pub retry_failed: bool,
    /// Progress bar on stderr.
    #[serde(default = "default_true")]
    pub progress: bool,
    /// The order requests go out in (see `SampleOrder`).
    #[serde(default)]
    pub order: SampleOrder,
    /// What a rerun does with stored samples whose request differs from the
    /// one this config sends (see `OnChange`).
    #[serde(default)]
    pub on_change: OnChange,
}

/// A sample already in the store was made with another request than the
/// config asks for now (other sampling parameters, max_tokens, model or
/// prompt text): what `fusechat sample` does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnChange {
    /// Stop before sending anything and say which samples and fields
    /// changed: the store is the only copy of its samples.
    #[default]
    Refuse,
    /// Delete those samples and their scores and request them again (what
    /// `fusechat fuse` does in its own run folder).
    Resample,
}

/// The order sampling requests are sent in; with a concurrency limit this
/// decides which models are busy together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleOrder {
    /// One source after another: every request in flight goes to the same
    /// model, which then decodes them as one batch. The right order when the
    /// sources share a machine (one CPU, one GPU): measured here, three
    /// models decoding at once on 2 cores gave 11.5 tokens/s together, less
    /// than SmolLM2 alone.
    #[default]
    Source,
    /// Prompt by prompt, every source at once: for sources on separate
    /// machines or hosted APIs.
    Prompt,
}

fn default_max_tokens() -> u64 {
    512
}
fn default_true() -> bool {
    true
}

impl SamplingConfig {
    pub fn n_for(&self, d: Domain) -> u32 {
        self.n.get(&d).copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScoringConfig {
    #[serde(default)]
    pub code: CodeScoring,
    #[serde(default)]
    pub reward: Option<RewardConfig>,
    #[serde(default)]
    pub judge: Option<JudgeConfig>,
    /// Agreement with the prompt's reference response (`score::reference`):
    /// the instruction signal where no reward model or working judge exists.
    #[serde(default)]
    pub reference: Option<ReferenceScoring>,
    /// Scoring tasks at once (code sandboxes, reward and judge requests).
    #[serde(default = "default_score_concurrency")]
    pub concurrency: usize,
}

/// `[scoring.reference]`: score responses by their agreement with the
/// prompt's reference response, in these domains (prompts with a reference only).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceScoring {
    #[serde(default = "default_reference_domains")]
    pub domains: Vec<Domain>,
}

fn default_reference_domains() -> Vec<Domain> {
    vec![Domain::Instruction]
}

fn default_score_concurrency() -> usize {
    2
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CodeScoring {
    #[serde(default = "default_code_timeout")]
    pub timeout_s: f64,
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// How many of MBPP+'s extra inputs to run besides the base ones.
    #[serde(default)]
    pub plus_inputs: usize,
    #[serde(default = "default_python")]
    pub python: String,
}

impl CodeScoring {
    pub fn validate(&self) -> Result<()> {
        seconds("scoring.code.timeout_s", self.timeout_s, false)?;
        if self.memory_mb == 0 {
            return Err(DataError::Config("scoring.code.memory_mb must be at least 1".into()));
        }
        Ok(())
    }
}

impl Default for CodeScoring {
    fn default() -> Self {
        CodeScoring {
            timeout_s: default_code_timeout(),
            memory_mb: default_memory_mb(),
            plus_inputs: 0,
            python: default_python(),
        }
    }
}

fn default_code_timeout() -> f64 {
    10.0
}
fn default_memory_mb() -> u64 {
    512
}
fn default_python() -> String {
    "python3".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RewardApi {
    /// vLLM's `/classify`: `{"model","input":[text,...]}` -> `{"data":[{"probs":[x]},...]}`.
    Classify,
    /// `{"model","conversations":[[messages],...]}` -> `{"scores":[x,...]}`.
    Scores,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// Full URL of the scoring endpoint.
    pub url: String,
    #[serde(default)]
    pub model: Option<String>,
    pub api: RewardApi,
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Domains to score (default all).
    #[serde(default)]
    pub domains: Option<Vec<Domain>>,
}

impl RewardConfig {
    pub fn validate(&self) -> Result<()> {
        seconds("scoring.reward.timeout_s", self.timeout_s, false)?;
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    /// `[[endpoints]]` name.
    pub endpoint: String,
    pub model: String,
    #[serde(default = "default_judge_tokens")]
    pub max_tokens: u64,
    /// Domains to judge (default: instruction).
    #[serde(default = "default_judge_domains")]
    pub domains: Vec<Domain>,
}

fn default_judge_tokens() -> u64 {
    48
}
fn default_judge_domains() -> Vec<Domain> {
    vec![Domain::Instruction]
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PairingConfig {
    /// Fraction of the training prompts that feed SFT; the rest feed DPO (paper 4:6).
    #[serde(default = "default_sft_fraction")]
    pub sft_fraction: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Reward gap window [low, high] for DPO pairs (paper 0.01-0.1); only
    /// applied where a reward model scored the responses.
    #[serde(default = "default_window")]
    pub window: [f64; 2],
    /// Whether a response cut by the length limit may be chosen / used for SFT.
    #[serde(default)]
    pub allow_truncated_chosen: bool,
    /// Which training prompts DPO pairs come from (see `DpoPrompts`).
    #[serde(default)]
    pub dpo_prompts: DpoPrompts,
}

/// Which training prompts give DPO pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoPrompts {
    /// Those that do not feed SFT (`1 - sft_fraction` of them): the
    /// paper's split, each prompt used by one stage.
    #[default]
    Rest,
    /// Every training prompt: SFT's part gives pairs too. For small runs,
    /// where the split would leave too few of either.
    All,
}

impl Default for PairingConfig {
    fn default() -> Self {
        PairingConfig {
            sft_fraction: default_sft_fraction(),
            seed: default_seed(),
            window: default_window(),
            allow_truncated_chosen: false,
            dpo_prompts: DpoPrompts::Rest,
        }
    }
}

fn default_sft_fraction() -> f64 {
    0.4
}
fn default_window() -> [f64; 2] {
    [0.01, 0.1]
}

impl Config {
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self> {
        let mut c: Config = toml::from_str(text).context("parsing the data config")?;
        c.base_dir = base_dir.to_path_buf();
        c.validate()?;
        Ok(c)
    }

    /// Load a file, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let file = ConfigFile::read(path, &DEFAULT)
            .with_context(|| format!("reading {}", path.unwrap_or(Path::new("")).display()))?;
        match path {
            Some(_) => Self::parse(&file.text, &file.base_dir)
                .with_context(|| format!("in {}", file.origin)),
            None => Self::parse(&file.text, &file.base_dir),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.prompts.eval_fraction) {
            return Err(DataError::Config("prompts.eval_fraction must be in [0, 1)".into()));
        }
        if !(0.0..=1.0).contains(&self.pairing.sft_fraction) {
            return Err(DataError::Config("pairing.sft_fraction must be in [0, 1]".into()));
        }
        if self.pairing.window[0] > self.pairing.window[1] {
            return Err(DataError::Config("pairing.window must be [low, high] with low <= high".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.pools {
            if !seen.insert(&p.name) {
                return Err(DataError::Config(format!("two pools named `{}`", p.name)));
            }
            let auto_only = p.layout.is_some() || p.fields != FieldMap::default();
            if auto_only && p.format != PoolFormat::Auto {
                return Err(DataError::Config(format!(
                    "pool `{}`: `layout` and `fields` are read with format = \"auto\" only",
                    p.name
                )));
            }
            if p.format == PoolFormat::Auto && p.domain == Domain::Code {
                return Err(DataError::Config(format!(
                    "pool `{}`: format = \"auto\" reads math and instruction pools; a code pool needs its tests (format = \"mbpp_plus\")",
                    p.name
                )));
            }
            if !self.sampling.n.contains_key(&p.domain) {
                return Err(DataError::Config(format!(
                    "pool `{}` is a {d} pool, but sampling.n has no `{d}` entry, so none of its prompts would be sampled: \
                     add one to sampling.n (e.g. `{d} = 2`), or `{d} = 0` to skip the domain on purpose",
                    p.name,
                    d = p.domain.as_str()
                )));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.sources {
            if !seen.insert(&s.id) {
                return Err(DataError::Config(format!("two sources with id `{}`", s.id)));
            }
            if s.endpoint.is_empty() == s.endpoints.is_empty() {
                return Err(DataError::Config(format!(
                    "source `{}` needs `endpoint = \"NAME\"` or `endpoints = [\"NAME\", ...]` (one of the two)",
                    s.id
                )));
            }
            let names = s.endpoint_names();
            if names
                .iter()
                .enumerate()
                .any(|(i, n)| names[..i].contains(n))
            {
                return Err(DataError::Config(format!("source `{}` names an endpoint twice in `endpoints`", s.id)));
            }
            for name in names {
                if self.endpoint(name).is_none() {
                    return Err(DataError::Config(format!(
                        "source `{}` names endpoint `{name}`, which no [[endpoints]] defines",
                        s.id
                    )));
                }
            }
        }
        for e in &self.endpoints {
            e.validate()?;
        }
        self.scoring.code.validate()?;
        if let Some(r) = &self.scoring.reward {
            r.validate()?;
        }
        if let Some(j) = &self.scoring.judge {
            if self.endpoint(&j.endpoint).is_none() {
                return Err(DataError::Config(format!(
                    "scoring.judge names endpoint `{}`, which no [[endpoints]] defines",
                    j.endpoint
                )));
            }
        }
        Ok(())
    }

    pub fn endpoint(&self, name: &str) -> Option<&EndpointConfig> {
        self.endpoints.iter().find(|e| e.name == name)
    }

    pub fn resolve(&self, p: &Path) -> PathBuf {
        crate::config_file::resolve(&self.base_dir, p)
    }

    /// The pool folder: `prompts.data_dir` from the config's folder. When that
    /// is a relative folder that does not exist (a config copied away from
    /// the repository, or an embedded default run outside a checkout):
    /// `$FUSECHAT_DATA_DIR` if set, else, when every pool the config reads
    /// ships with fusechat, the copy compiled into the binary, written out
    /// to `$FUSECHAT_HOME/data`.
    pub fn data_dir(&self) -> PathBuf {
        let configured = self.resolve(&self.prompts.data_dir);
        if !self.prompts.data_dir.is_relative() || configured.is_dir() {
            return configured;
        }
        if let Some(d) = std::env::var_os("FUSECHAT_DATA_DIR").filter(|d| !d.is_empty()) {
            tracing::info!(
                "{} does not exist; using $FUSECHAT_DATA_DIR={}",
                configured.display(),
                PathBuf::from(&d).display()
            );
            return PathBuf::from(d);
        }
        if self.pools.iter().all(|p| crate::shipped::ships(&p.file)) {
            static UNPACKED: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
            let unpacked = UNPACKED.get_or_init(|| match crate::shipped::unpack(&crate::shipped::home()) {
                Ok(dir) => Some(dir),
                Err(e) => {
                    tracing::warn!("{e}");
                    None
                }
            });
            if let Some(dir) = unpacked {
                tracing::info!(
                    "{} does not exist; using the prompt pools shipped in the binary ({})",
                    configured.display(),
                    dir.display()
                );
                return dir.clone();
            }
        }
        configured
    }

    pub fn output_dir(&self) -> PathBuf {
        self.resolve(&self.run.output)
    }

    pub fn store_path(&self) -> PathBuf {
        match &self.run.store {
            Some(p) => self.resolve(p),
            None => self.output_dir().join("store.sqlite"),
        }
    }

    pub fn pool_path(&self, pool: &PoolConfig) -> PathBuf {
        if pool.file.is_absolute() {
            pool.file.clone()
        } else {
            self.data_dir().join(&pool.file)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses_and_finds_the_data() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.sources.len(), 3);
        let qwen = c.sources.iter().find(|s| s.id.starts_with("qwen")).unwrap();
        assert_eq!(qwen.temperature, Some(0.7));
        assert_eq!(qwen.top_p, Some(0.8));
        assert_eq!(qwen.repetition_penalty, Some(1.05));
        if std::env::var_os("FUSECHAT_DATA_DIR").is_none() {
            for p in &c.pools {
                assert!(c.pool_path(p).exists(), "{}", c.pool_path(p).display());
            }
        }
    }

    #[test]
    fn every_data_config_in_the_repo_parses() {
        let dir = crate::config_file::repository_configs();
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("data-") && name.ends_with(".toml") {
                Config::load(Some(&p)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
                n += 1;
            }
        }
        assert!(n >= 1);
    }

    #[test]
    fn a_source_may_sample_more_or_fewer_than_sampling_n() {
        let base = Path::new(".");
        let text = TINY.replacen(
            "endpoint = \"local\"",
            "endpoint = \"local\"\nn = { math = 5, code = 0 }",
            1,
        );
        let c = Config::parse(&text, base).unwrap();
        let (first, second) = (&c.sources[0], &c.sources[1]);
        assert_eq!(first.n_for(Domain::Math, &c.sampling), 5);
        assert_eq!(first.n_for(Domain::Code, &c.sampling), 0);
        assert_eq!(first.n_for(Domain::Instruction, &c.sampling), 2);
        assert_eq!(second.n_for(Domain::Math, &c.sampling), 2);
    }

    #[test]
    fn unknown_fields_and_bad_references_are_errors() {
        let base = Path::new(".");
        let mut text = TINY.to_string();
        text.push_str("\n[bogus]\nx = 1\n");
        assert!(Config::parse(&text, base).is_err());
        let text = TINY.replace("endpoint = \"local\"", "endpoint = \"nowhere\"");
        let err = format!("{:#}", Config::parse(&text, base).unwrap_err());
        assert!(err.contains("nowhere"), "{err}");
    }

    #[test]
    fn bad_durations_and_missing_counts_are_errors_naming_the_field() {
        let base = Path::new(".");
        let err_of = |text: String| match Config::parse(&text, base) {
            Ok(_) => panic!("accepted"),
            Err(e) => format!("{e:#}"),
        };
        for bad in ["-1", "nan", "inf", "-0.5"] {
            let err = err_of(TINY.replace("timeout_s = 600", &format!("timeout_s = {bad}")));
            assert!(
                err.contains("timeout_s") && err.contains("local"),
                "{bad}: {err}"
            );
            let err = err_of(TINY.replace("backoff_s = 1.0", &format!("backoff_s = {bad}")));
            assert!(
                err.contains("backoff_s") && err.contains("local"),
                "{bad}: {err}"
            );
            let err = err_of(TINY.replace("timeout_s = 10", &format!("timeout_s = {bad}")));
            assert!(err.contains("scoring.code.timeout_s"), "{bad}: {err}");
            let reward = format!(
                "{TINY}\n[scoring.reward]\nurl = \"http://127.0.0.1:9/classify\"\napi = \"classify\"\ntimeout_s = {bad}\n"
            );
            let err = err_of(reward);
            assert!(err.contains("scoring.reward.timeout_s"), "{bad}: {err}");
        }
        // Zero backoff is fine; a zero timeout is not.
        Config::parse(&TINY.replace("backoff_s = 1.0", "backoff_s = 0"), base).unwrap();
        let err = err_of(TINY.replace("timeout_s = 600", "timeout_s = 0"));
        assert!(err.contains("timeout_s"), "{err}");
        // The client refuses them too instead of panicking (configs built in code).
        let mut c = Config::load(None).unwrap();
        c.endpoints[0].timeout_s = -1.0;
        let err = format!(
            "{:#}",
            crate::client::Endpoint::new(&c.endpoints[0]).err().unwrap()
        );
        assert!(err.contains("timeout_s"), "{err}");
        c.endpoints[0].timeout_s = 1.0;
        c.endpoints[0].backoff_s = f64::NAN;
        let err = format!(
            "{:#}",
            crate::client::Endpoint::new(&c.endpoints[0]).err().unwrap()
        );
        assert!(err.contains("backoff_s"), "{err}");
        let mut code = CodeScoring::default();
        code.timeout_s = f64::NAN;
        let _ = crate::score::code::Sandbox::new(&code); // no panic
                                                         // A pool whose domain has no `sampling.n` entry.
        let err = err_of(TINY.replace(
            "n = { instruction = 2, math = 2, code = 2 }",
            "n = { instruction = 2, math = 2 }",
        ));
        assert!(
            err.contains("sampling.n") && err.contains("code") && err.contains("mbpp_plus"),
            "{err}"
        );
    }
}
