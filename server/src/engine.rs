//! The engine side: loading one model into mistralrs and talking to it.
//!
//! Each served model is its own mistralrs engine (its own scheduler thread
//! doing continuous batching), so models never wait on each other and one can
//! later be replaced without touching the rest.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use either::Either;
use indexmap::IndexMap;
use mistralrs::core::{DetokenizationRequest, RequestMessage, TokenizationRequest};
use mistralrs::{
    Constraint, GgufModelBuilder, IsqType, Model, ModelDType, MultimodalModelBuilder, NormalRequest, Request,
    Response, SamplingParams, TextModelBuilder, TokenSource, Topology,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::config::{Isq, ModelConfig, ModelSource, SamplingDefaults, LINEAR_LAYERS};
use crate::error::ApiError;
use crate::holding::{self, Holding};
use crate::placement::Placement;
use crate::queue::Admission;

mod placed;
use placed::{place, with_placement, Placed};

/// What the engine is asked to continue.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// A conversation, rendered with the model's chat template.
    Chat(Conversation),
    /// Raw text (`/v1/completions`).
    Text(String),
    /// Token ids, used as they are: no special token added
    /// (`/v1/completions`, as lm-evaluation-harness sends them).
    Tokens(Vec<u32>),
}

/// The turns of a chat and the tools its template renders.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    pub turns: Vec<Turn>,
    pub tools: Vec<mistralrs::Tool>,
}

/// One turn as the chat template gets it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Turn {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls, `{id, type, function: {name, arguments}}`
    /// with the arguments as an object (what chat templates expect).
    pub tool_calls: Vec<serde_json::Map<String, serde_json::Value>>,
    /// A tool turn's call id.
    pub tool_call_id: Option<String>,
}

impl Turn {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Default::default()
        }
    }
}

impl Prompt {
    /// The request field that holds the prompt, for error messages.
    pub fn param(&self) -> &'static str {
        match self {
            Prompt::Chat(_) => "messages",
            Prompt::Text(_) | Prompt::Tokens(_) => "prompt",
        }
    }
}

/// Why a tokenizer request failed.
#[derive(Debug)]
pub enum TokenizerError {
    /// The tokenizer or chat template refused the input: the caller's 400.
    Refused(String),
    /// The engine could not be asked.
    Api(ApiError),
}

/// One sequence for the engine to generate: one choice of a request.
pub struct SequenceJob {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    /// Applied in order: `logit_bias`, then the seeded sampler.
    pub logits_processors: Vec<Arc<dyn mistralrs::CustomLogitsProcessor>>,
    pub logprobs: bool,
    pub constraint: Constraint,
    /// With tools in the conversation: whether the engine parses the answer
    /// for calls (`Auto`) or not (`None`).
    pub tool_choice: mistralrs::ToolChoice,
}

/// A model loaded into its own engine, ready for requests.
pub struct LoadedModel {
    pub id: String,
    /// Hash of the weights, sent back as `system_fingerprint`.
    pub fingerprint: String,
    /// Context length in tokens.
    pub max_seq_len: usize,
    pub defaults: SamplingDefaults,
    pub admission: Admission,
    /// How the weights are held (`GET /v1/models`); `None` where the files
    /// could not be read for it.
    pub holding: Option<Holding>,
    /// Rows of the embedding: token ids at or past it are refused before
    /// they reach the engine. `None` where the weights do not say.
    pub vocab_size: Option<usize>,
    /// tokenizer_config.json of the tokenizer the engine uses, with the
    /// served chat template (`GET /tokenizer_info`); `None` where mistralrs
    /// builds the tokenizer from a GGUF itself.
    pub tokenizer_config: Option<serde_json::Map<String, serde_json::Value>>,
    /// The tokenizer.json the engine loads, read here too: turning thousands
    /// of token ids into text one engine request each would stall decoding.
    /// `None` where mistralrs builds the tokenizer from a GGUF itself.
    pub tokenizer: Option<Arc<tokenizers::Tokenizer>>,
    /// What the chat template does with `tools`, read once at load.
    pub tool_support: crate::tools::TemplateSupport,
    engine: Box<dyn Engine>,
}

/// Where a model's requests go: the channel a mistralrs engine reads them
/// from. Every request of the server (generation, tokenizer, prompt
/// logits) is a mistralrs [`Request`] sent on it, so a task that answers
/// those requests from a script stands in for the engine in the tests of
/// the request path (`server/tests/request_path.rs`).
pub trait Engine: Send + Sync {
    /// The engine's request channel, or why there is none.
    fn requests(&self) -> Result<mpsc::Sender<Request>, String>;
}

impl Engine for Model {
    fn requests(&self) -> Result<mpsc::Sender<Request>, String> {
        self.inner().get_sender(None).map_err(|e| e.to_string())
    }
}

/// Requests sent to whatever answers on the other end.
impl Engine for mpsc::Sender<Request> {
    fn requests(&self) -> Result<mpsc::Sender<Request>, String> {
        Ok(self.clone())
    }
}

/// How a weights location is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsKind {
    /// A GGUF file served as it is, every tensor in the file's own type.
    Gguf {
        dir: PathBuf,
        file: String,
        /// fusechat's tokenizer files for it (`fusechat_models::import::import_tokenizer`),
        /// where the import knows the architecture; else mistralrs converts the GGUF's.
        tokenizer: Option<PathBuf>,
    },
    /// A Hugging Face folder, loaded through mistralrs's text loader or,
    /// for Gemma 3 (even text-only), its multimodal loader.
    Hf {
        dir: PathBuf,
        multimodal: bool,
        /// What `isq` means when the config leaves it unset.
        default_isq: Isq,
    },
}

/// GGUF architectures served straight from the GGUF file, each tensor in the
/// file's own type: on the CPU the quantized layers run fusechat-kernels
/// (kernels/: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K with f32 activations),
/// which answer as the float reference does where candle's kernels, which
/// round activations to 8 bits, did not (SmolLM2's `down_proj` inputs reach
/// 3058 where most are below 1: "L'Étoile" for "Paris"). gemma3 runs the
/// vendored engine's own GGUF model (`models/quantized_gemma3.rs`). Other
/// architectures are imported once into a Hugging Face folder and served
/// from float weights.
const GGUF_NATIVE: &[&str] = &["llama", "qwen2", "gemma3", "qwen3", "phi2", "phi3", "starcoder2"];

/// GGUF architectures whose tokenizer fusechat's import rebuilds (checked
/// against transformers); mistralrs's own conversion reads SentencePiece
/// vocabularies (Gemma's) as unigram models.
const OWN_TOKENIZER: &[&str] = &["llama", "qwen2", "gemma3"];

/// How the weights will be held, for the log and `/admin/models`. Reported,
/// not needed to serve: a file it cannot read is logged and gives `None`.
async fn holding_of(config: &ModelConfig, kind: &WeightsKind, weights: &Path) -> anyhow::Result<Option<Holding>> {
    let holding = {
        let (kind, isq, float_layers) = (kind.clone(), config.isq, config.float_layers.clone());
        tokio::task::spawn_blocking(move || match &kind {
            WeightsKind::Gguf { dir, file, .. } => holding::of_gguf(&dir.join(file)),
            WeightsKind::Hf { dir, default_isq, .. } => {
                holding::of_folder(dir, isq.unwrap_or(*default_isq), &float_layers)
            }
        })
        .await?
    };
    Ok(match holding {
        Ok(holding) => {
            tracing::info!(model = %config.id, weights = %weights.display(), "{}; {}", holding.summary(), why(kind, config.isq));
            Some(holding)
        }
        Err(e) => {
            tracing::warn!(model = %config.id, weights = %weights.display(), "cannot tell how the weights are held: {e:#}");
            None
        }
    })
}

/// The mistralrs engine over `kind`'s weights, with the model's placement,
/// batch size, chat template and quantization.
async fn build_engine(
    config: &ModelConfig,
    kind: &WeightsKind,
    placed: &Placed,
) -> anyhow::Result<mistralrs::Model> {
    let template = config
        .chat_template
        .as_ref()
        .map(|p| p.to_string_lossy().to_string());
    match kind {
        WeightsKind::Gguf { dir, file, tokenizer } => {
            let builder = GgufModelBuilder::new(dir.to_string_lossy(), vec![file.clone()])
                .with_token_source(TokenSource::None)
                .with_max_num_seqs(config.max_seqs);
            let mut builder = with_placement!(builder, placed);
            if let Some(tokenizer) = tokenizer {
                builder = builder.with_tok_model_id(tokenizer.to_string_lossy());
            }
            if let Some(t) = template {
                builder = builder.with_jinja_explicit(t);
            }
            builder.build().await
        }
        WeightsKind::Hf { dir, multimodal, default_isq } => {
            let isq = match config.isq.unwrap_or(*default_isq) {
                Isq::None => None,
                Isq::Q8_0 => Some(IsqType::Q8_0),
                Isq::Q4_1 => Some(IsqType::Q4_1),
                Isq::Q4k => Some(IsqType::Q4K),
            };
            // On CPU the activations stay f32: f16 overflows in Gemma 3 and
            // has no fast CPU kernels anyway.
            let dtype = if placed.placement == Placement::Cpu { ModelDType::F32 } else { ModelDType::Auto };
            let topology = match isq {
                Some(isq) if !config.float_layers.is_empty() => {
                    Some(isq_topology(isq, &config.float_layers)?)
                }
                _ => None,
            };
            // The two builders have the same methods but no common trait.
            macro_rules! build_hf {
                ($builder:expr) => {{
                    let builder = $builder
                        .with_token_source(TokenSource::None)
                        .with_dtype(dtype)
                        .with_max_num_seqs(config.max_seqs);
                    let mut builder = with_placement!(builder, placed);
                    if let Some(topology) = &topology {
                        builder = builder.with_topology(topology.clone());
                    } else if let Some(isq) = isq {
                        builder = builder.with_isq(isq);
                    }
                    if let Some(t) = template {
                        builder = builder.with_jinja_explicit(t);
                    }
                    builder.build().await
                }};
            }
            let dir = dir.to_string_lossy();
            if *multimodal {
                build_hf!(MultimodalModelBuilder::new(dir))
            } else {
                build_hf!(TextModelBuilder::new(dir))
            }
        }
    }
}

impl LoadedModel {
    pub async fn load(config: &ModelConfig, weights: &Path, home: &Path) -> anyhow::Result<Self> {
        let kind = resolve_weights(weights, home, config.isq.is_some())
            .await
            .with_context(|| format!("model `{}`: cannot use {}", config.id, weights.display()))?;
        let fingerprint = {
            let kind = kind.clone();
            tokio::task::spawn_blocking(move || fingerprint(&kind)).await??
        };
        let holding = holding_of(config, &kind, weights).await?;
        let vocab_size = {
            let kind = kind.clone();
            match tokio::task::spawn_blocking(move || vocab_size(&kind)).await? {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!(model = %config.id, "token ids are passed to the engine unchecked: {e:#}");
                    None
                }
            }
        };
        let tokenizer_config = tokenizer_config(&kind, config.chat_template.as_deref());
        let tokenizer = tokenizer_dir(&kind).and_then(|dir| {
            let path = dir.join("tokenizer.json");
            tokenizers::Tokenizer::from_file(&path)
                .map_err(|e| tracing::warn!("{}: {e}; prompt tokens will be detokenized by the engine", path.display()))
                .ok()
                .map(Arc::new)
        });
        tracing::info!(model = %config.id, ?kind, "loading");
        let placed = place(config, &kind, holding.as_ref()).await?;
        let engine = build_engine(config, &kind, &placed)
            .await
            .with_context(|| format!("model `{}`: the engine could not load {}", config.id, weights.display()))?;
        engine
            .inner()
            .set_prefill_chunk_tokens(None, config.prefill_chunk)
            .map_err(|e| anyhow::anyhow!("model `{}`: cannot set prefill_chunk: {e}", config.id))?;
        let max_seq_len = engine
            .max_sequence_length()
            .ok()
            .flatten()
            .context("the engine does not report a context length")?;
        Ok(Self {
            fingerprint,
            holding,
            vocab_size,
            tool_support: crate::tools::TemplateSupport::of(chat_template(tokenizer_config.as_ref()).as_deref()),
            tokenizer_config,
            tokenizer,
            ..Self::over(config, Box::new(engine), max_seq_len)
        })
    }

    /// A model whose requests go to `engine`, with `config`'s batch, queue
    /// and sampling defaults and nothing known of its weights or tokenizer
    /// (no fingerprint, vocabulary, tokenizer files or tool support).
    pub fn over(config: &ModelConfig, engine: Box<dyn Engine>, max_seq_len: usize) -> Self {
        Self {
            id: config.id.clone(),
            fingerprint: String::new(),
            max_seq_len,
            defaults: config.defaults.clone(),
            admission: Admission::new(config.max_seqs, config.max_waiting),
            holding: None,
            vocab_size: None,
            tokenizer_config: None,
            tokenizer: None,
            tool_support: crate::tools::TemplateSupport::of(None),
            engine,
        }
    }

    /// Number of tokens the prompt takes once rendered (chat template and
    /// special tokens included).
    pub async fn count_prompt_tokens(&self, prompt: &Prompt) -> Result<usize, ApiError> {
        self.tokenize(prompt, true, true).await.map(|ids| ids.len()).map_err(|e| match e {
            TokenizerError::Refused(e) => ApiError::invalid_body(
                format!("the prompt cannot be rendered for this model: {e}"),
                Some(prompt.param().into()),
            ),
            TokenizerError::Api(e) => e,
        })
    }

    /// Token ids of a text, or of messages rendered with the chat template
    /// (`add_generation_prompt` opens the assistant's turn); token ids are
    /// their own answer.
    pub async fn tokenize(
        &self,
        prompt: &Prompt,
        add_generation_prompt: bool,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let (text, tools) = match prompt {
            Prompt::Chat(chat) => (Either::Left(engine_messages(&chat.turns)), engine_tools(&chat.tools)),
            Prompt::Text(text) => (Either::Right(text.clone()), None),
            Prompt::Tokens(ids) => return Ok(ids.clone()),
        };
        let (tx, rx) = mpsc::channel(1);
        let request = Request::Tokenize(TokenizationRequest {
            text,
            tools,
            add_generation_prompt,
            add_special_tokens,
            enable_thinking: None,
            reasoning_effort: None,
            response: tx,
        });
        self.ask(request, rx).await
    }

    /// The text of token ids. Ids outside the vocabulary are refused here:
    /// the tokenizer would skip them without a word.
    pub async fn detokenize(&self, tokens: Vec<u32>, skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.check_token_ids(&tokens, "tokens").map_err(TokenizerError::Api)?;
        let (tx, rx) = mpsc::channel(1);
        let request = Request::Detokenize(DetokenizationRequest { tokens, skip_special_tokens, response: tx });
        self.ask(request, rx).await
    }

    /// Sends a tokenizer request and waits for its answer in a task of its
    /// own: the engine treats a reply channel closed before it answers as a
    /// bug and panics, so the receiver must outlive a client that hangs up.
    async fn ask<T: Send + 'static>(
        &self,
        request: Request,
        mut rx: mpsc::Receiver<anyhow::Result<T>>,
    ) -> Result<T, TokenizerError> {
        let sender = self.sender().map_err(TokenizerError::Api)?;
        let id = self.id.clone();
        let answer = tokio::spawn(async move {
            if sender.send(request).await.is_err() {
                return Err(TokenizerError::Api(ApiError::internal(format!("engine of `{id}` has stopped"))));
            }
            match rx.recv().await {
                Some(Ok(value)) => Ok(value),
                Some(Err(e)) => Err(TokenizerError::Refused(e.to_string())),
                None => Err(TokenizerError::Api(ApiError::internal("the engine dropped a tokenizer request"))),
            }
        });
        answer
            .await
            .map_err(|e| TokenizerError::Api(ApiError::internal(format!("tokenizer task failed: {e}"))))?
    }

    /// Checks token ids against the vocabulary, where it is known.
    pub fn check_token_ids(&self, ids: &[u32], param: &str) -> Result<(), ApiError> {
        let vocab = self.vocab_size.filter(|&v| v > 0);
        match vocab.and_then(|v| ids.iter().find(|&&t| t as usize >= v).map(|t| (t, v))) {
            Some((bad, vocab)) => Err(ApiError::invalid_param(
                param,
                format!("Token id {bad} is outside the vocabulary of model `{}` (ids 0 to {}).", self.id, vocab - 1),
            )),
            None => Ok(()),
        }
    }

    /// The logits the model gives at every position of a prompt, in one
    /// prefill with no generation: `(prompt token ids, logits (ids, vocab))`,
    /// the row at position `i` being the distribution of token `i + 1`.
    pub async fn prompt_logits(&self, prompt: &Prompt) -> Result<(Vec<u32>, mistralrs::Tensor), ApiError> {
        let (tx, mut rx) = mpsc::channel(1);
        let messages = match prompt {
            Prompt::Text(text) => RequestMessage::Completion {
                text: text.clone(),
                echo_prompt: false,
                best_of: None,
            },
            Prompt::Tokens(ids) => RequestMessage::CompletionTokens(ids.clone()),
            Prompt::Chat(_) => {
                return Err(ApiError::internal("prompt log-probabilities are for completions prompts"))
            }
        };
        let request = Request::Normal(Box::new(NormalRequest {
            messages,
            sampling_params: SamplingParams::deterministic(),
            response: tx,
            return_logprobs: false,
            is_streaming: false,
            id: 0,
            constraint: Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: None,
            return_raw_logits: true,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        }));
        let sender = self.sender()?;
        let id = self.id.clone();
        // Waited for in a task of its own, as `ask` does: the receiver must
        // outlive a client that hangs up before the engine answers.
        let answer = tokio::spawn(async move {
            if sender.send(request).await.is_err() {
                return Err(ApiError::internal(format!("engine of `{id}` has stopped")));
            }
            match rx.recv().await {
                Some(Response::Raw { logits_chunks, tokens }) => {
                    let logits = mistralrs::Tensor::cat(&logits_chunks, 0)
                        .and_then(|l| l.narrow(0, 0, tokens.len()))
                        .and_then(|l| l.to_dtype(mistralrs::DType::F32))
                        .map_err(|e| ApiError::internal(format!("prompt logits: {e}")))?;
                    Ok((tokens, logits))
                }
                Some(Response::ValidationError(e)) => Err(ApiError::invalid_body(e.to_string(), None)),
                Some(Response::InternalError(e)) => Err(ApiError::internal(format!("engine error: {e}"))),
                Some(Response::ModelError(e, _)) | Some(Response::CompletionModelError(e, _)) => {
                    Err(ApiError::internal(format!("model error: {e}")))
                }
                Some(_) => Err(ApiError::internal("unexpected engine response to a prompt-logits request")),
                None => Err(ApiError::internal("the engine dropped a prompt-logits request")),
            }
        });
        answer
            .await
            .map_err(|e| ApiError::internal(format!("prompt-logits task failed: {e}")))?
    }

    /// Starts one sequence; its chunks arrive on the returned receiver.
    /// Dropping the receiver cancels the sequence.
    pub async fn start(&self, job: SequenceJob) -> Result<mpsc::Receiver<Response>, ApiError> {
        let (tx, rx) = mpsc::channel(64);
        let mut tools = None;
        let messages = match job.prompt {
            Prompt::Chat(chat) => {
                tools = engine_tools(&chat.tools);
                RequestMessage::Chat {
                    messages: engine_messages(&chat.turns),
                    enable_thinking: None,
                    reasoning_effort: None,
                }
            }
            Prompt::Text(text) => RequestMessage::Completion {
                text,
                echo_prompt: false,
                best_of: None,
            },
            Prompt::Tokens(ids) => RequestMessage::CompletionTokens(ids),
        };
        let request = Request::Normal(Box::new(NormalRequest {
            messages,
            sampling_params: job.sampling,
            response: tx,
            return_logprobs: job.logprobs,
            is_streaming: true,
            id: 0,
            constraint: job.constraint,
            suffix: None,
            tool_choice: tools.as_ref().map(|_| job.tool_choice.clone()),
            tools,
            logits_processors: (!job.logits_processors.is_empty()).then_some(job.logits_processors),
            return_raw_logits: false,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        }));
        self.send(request).await?;
        Ok(rx)
    }

    fn sender(&self) -> Result<tokio::sync::mpsc::Sender<Request>, ApiError> {
        self.engine
            .requests()
            .map_err(|e| ApiError::internal(format!("engine of `{}` unavailable: {e}", self.id)))
    }

    async fn send(&self, request: Request) -> Result<(), ApiError> {
        self.sender()?
            .send(request)
            .await
            .map_err(|_| ApiError::internal(format!("engine of `{}` has stopped", self.id)))
    }
}

fn engine_messages(turns: &[Turn]) -> Vec<IndexMap<String, mistralrs::MessageContent>> {
    turns
        .iter()
        .map(|turn| {
            let mut m = IndexMap::new();
            m.insert("role".to_string(), Either::Left(turn.role.clone()));
            m.insert("content".to_string(), Either::Left(turn.content.clone()));
            if !turn.tool_calls.is_empty() {
                let calls = turn.tool_calls.iter().map(|c| c.clone().into_iter().collect()).collect();
                m.insert("tool_calls".to_string(), Either::Right(calls));
            }
            if let Some(id) = &turn.tool_call_id {
                m.insert("tool_call_id".to_string(), Either::Left(id.clone()));
            }
            m
        })
        .collect()
}

/// The tools a chat template renders; none is `None` (the template's own
/// branch without tools).
fn engine_tools(tools: &[mistralrs::Tool]) -> Option<Vec<mistralrs::Tool>> {
    (!tools.is_empty()).then(|| tools.to_vec())
}

/// Where the weights of a configured model are on disk, fetching the
/// embedded default models when needed.
pub fn weights_path(config: &ModelConfig, home: &Path) -> anyhow::Result<PathBuf> {
    match config.source() {
        ModelSource::Path(path) => Ok(path),
        ModelSource::Fetched(name) => {
            let spec = fusechat_models::fetch::find(&name).with_context(|| {
                format!(
                    "model `{}`: `{name}` is not a fetchable model; `fusechat models list` names them",
                    config.id
                )
            })?;
            fusechat_models::fetch::ensure(spec, home).map_err(anyhow::Error::from)
        }
    }
}

/// Why a model takes its load path, for the startup log.
fn why(kind: &WeightsKind, isq: Option<Isq>) -> &'static str {
    match (kind, isq) {
        (WeightsKind::Gguf { .. }, _) => "fusechat serves this GGUF architecture from the file's own tensors",
        (WeightsKind::Hf { .. }, Some(Isq::None)) => "float asked for (`isq = \"none\"`, or `:f32` after --model's path)",
        (WeightsKind::Hf { .. }, Some(_)) => "`isq` asks for quantization at load",
        (WeightsKind::Hf { default_isq: Isq::None, .. }, None) => {
            "float weights with no `isq`, or a GGUF architecture fusechat does not serve as it is (imported into floats)"
        }
        (WeightsKind::Hf { .. }, None) => "the folder's default quantization at load",
    }
}

/// Decides how to load `path`. A GGUF file is served as it is when the GGUF
/// loader has its architecture and no in-situ quantization (`isq`) is asked
/// for; otherwise it is imported once into a Hugging Face folder under `home`
/// and served from its float weights (quantized by `isq` at load).
pub async fn resolve_weights(path: &Path, home: &Path, isq: bool) -> anyhow::Result<WeightsKind> {
    if path.is_dir() {
        return resolve_weights_folder(path, Isq::None);
    }
    if !path.is_file() {
        bail!("no such file or folder");
    }
    let arch = gguf_architecture(path)?;
    if GGUF_NATIVE.contains(&arch.as_str()) && !isq {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let file = path
            .file_name()
            .context("GGUF path has no file name")?
            .to_string_lossy()
            .to_string();
        let tokenizer = if OWN_TOKENIZER.contains(&arch.as_str()) {
            Some(imported_tokenizer(path, home).await?)
        } else {
            None
        };
        return Ok(WeightsKind::Gguf { dir, file, tokenizer });
    }
    let out = derived_path(path, home, "imported")?;
    if !out.join("config.json").exists() {
        tracing::info!(gguf = %path.display(), out = %out.display(), %arch, "importing GGUF into a Hugging Face folder (once)");
        let (src, dst) = (path.to_path_buf(), out.clone());
        tokio::task::spawn_blocking(move || fusechat_models::import::import_gguf(&src, &dst))
            .await?
            .with_context(|| format!("importing {} ({arch})", path.display()))?;
    }
    resolve_weights_folder(&out, Isq::None)
}

/// `home/tokenizers/<stem>-<size>`: the tokenizer files of a GGUF, written once.
async fn imported_tokenizer(gguf: &Path, home: &Path) -> anyhow::Result<PathBuf> {
    let out = derived_path(gguf, home, "tokenizers")?;
    if !out.join("tokenizer_config.json").exists() {
        let (src, dst) = (gguf.to_path_buf(), out.clone());
        tokio::task::spawn_blocking(move || fusechat_models::import::import_tokenizer(&src, &dst))
            .await?
            .with_context(|| format!("reading the tokenizer of {}", gguf.display()))?;
    }
    Ok(out)
}

/// A mistralrs topology that quantizes every linear layer to `isq` except
/// those named in `float_layers`.
fn isq_topology(isq: IsqType, float_layers: &[String]) -> anyhow::Result<Topology> {
    let quantized: Vec<&str> = LINEAR_LAYERS
        .iter()
        .copied()
        .filter(|name| !float_layers.iter().any(|f| f == name))
        .collect();
    let name = match isq {
        IsqType::Q8_0 => "q8_0",
        IsqType::Q4_1 => "q4_1",
        IsqType::Q4K => "q4k",
        other => bail!("no topology for {other:?}"),
    };
    let yaml = format!("'/(^|\\.)({})\\.weight$/':\n  isq: {name}\n", quantized.join("|"));
    Topology::from_str(&yaml).with_context(|| format!("building the in-situ quantization topology:\n{yaml}"))
}

fn resolve_weights_folder(dir: &Path, default_isq: Isq) -> anyhow::Result<WeightsKind> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("{} is a folder without config.json", dir.display()))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let arch = config["architectures"][0].as_str().unwrap_or_default();
    Ok(WeightsKind::Hf {
        dir: dir.to_path_buf(),
        multimodal: arch.starts_with("Gemma3"),
        default_isq,
    })
}

/// `home/<kind>/<stem>-<size>`: one derived copy per distinct GGUF file.
fn derived_path(gguf: &Path, home: &Path, kind: &str) -> anyhow::Result<PathBuf> {
    let size = std::fs::metadata(gguf)?.len();
    let stem = gguf
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    Ok(home.join(kind).join(format!("{stem}-{size}")))
}

pub fn gguf_architecture(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)
        .with_context(|| format!("{} is not a GGUF file", path.display()))?;
    let arch = content
        .metadata
        .get("general.architecture")
        .context("the GGUF file has no general.architecture")?
        .to_string()
        .context("general.architecture is not a string")?;
    Ok(arch.clone())
}

/// The chat template the engine renders with, as tokenizer_config.json
/// gives it (several named templates joined), where it is known.
fn chat_template(config: Option<&serde_json::Map<String, serde_json::Value>>) -> Option<String> {
    match config?.get("chat_template")? {
        serde_json::Value::String(t) => Some(t.clone()),
        serde_json::Value::Array(named) => Some(
            named
                .iter()
                .filter_map(|t| t.get("template").and_then(|t| t.as_str()))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        _ => None,
    }
}

/// The folder the engine reads its tokenizer from, where it is a folder.
fn tokenizer_dir(kind: &WeightsKind) -> Option<&Path> {
    match kind {
        WeightsKind::Gguf { tokenizer, .. } => tokenizer.as_deref(),
        WeightsKind::Hf { dir, .. } => Some(dir),
    }
}

/// tokenizer_config.json of the folder the engine reads its tokenizer from,
/// its `chat_template` replaced by the configured template file if any. A
/// file that cannot be read leaves the route without it, logged.
fn tokenizer_config(
    kind: &WeightsKind,
    template: Option<&Path>,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    let dir = tokenizer_dir(kind)?;
    let read = || -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
        let path = dir.join("tokenizer_config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut config: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).with_context(|| format!("{} is not a JSON object", path.display()))?;
        if let Some(template) = template {
            let text = std::fs::read_to_string(template)
                .with_context(|| format!("reading {}", template.display()))?;
            config.insert("chat_template".into(), text.into());
        }
        Ok(config)
    };
    read()
        .map_err(|e| tracing::warn!("GET /tokenizer_info will have no tokenizer config: {e:#}"))
        .ok()
}

/// sha256 over the weight files, shortened: it names the exact weights.
/// Rows of the token embedding, as the weights give them.
fn vocab_size(kind: &WeightsKind) -> anyhow::Result<usize> {
    match kind {
        WeightsKind::Gguf { dir, file, .. } => {
            let content = gguf_header(&dir.join(file))?;
            let embedding = content
                .tensor_infos
                .get("token_embd.weight")
                .context("the GGUF file has no token_embd.weight")?;
            Ok(embedding.shape.dims()[0])
        }
        WeightsKind::Hf { dir, .. } => config_number(dir, "vocab_size"),
    }
}

/// A GGUF file's metadata and tensor list (no tensor data is read).
fn gguf_header(path: &Path) -> anyhow::Result<candle_core::quantized::gguf_file::Content> {
    let mut reader = std::fs::File::open(path)?;
    candle_core::quantized::gguf_file::Content::read(&mut reader)
        .with_context(|| format!("{} is not a GGUF file", path.display()))
}

/// A number in a folder's config.json, or in its `text_config` (Gemma 3's
/// multimodal layout).
fn config_number(dir: &Path, key: &str) -> anyhow::Result<usize> {
    let text = std::fs::read_to_string(dir.join("config.json"))?;
    let config: serde_json::Value = serde_json::from_str(&text)?;
    config[key]
        .as_u64()
        .or_else(|| config["text_config"][key].as_u64())
        .map(|v| v as usize)
        .with_context(|| format!("config.json gives no {key}"))
}

fn fingerprint(kind: &WeightsKind) -> anyhow::Result<String> {
    let files: Vec<PathBuf> = match kind {
        WeightsKind::Gguf { dir, file, .. } => vec![dir.join(file)],
        WeightsKind::Hf { dir, .. } => {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            files.sort();
            files
        }
    };
    let mut hasher = Sha256::new();
    for file in files {
        let mut f = std::fs::File::open(&file)?;
        std::io::copy(&mut f, &mut hasher)?;
    }
    Ok(format!("fp_{}", &hex::encode(hasher.finalize())[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_quantizes_all_linear_layers_but_the_float_ones() {
        let t = isq_topology(IsqType::Q8_0, &["q_proj".to_string(), "down_proj".to_string()]).unwrap();
        let patterns = t.pattern_overrides();
        assert_eq!(patterns.len(), 1);
        let (re, layer) = &patterns[0];
        assert_eq!(layer.isq, Some(IsqType::Q8_0));
        assert!(re.is_match("model.layers.3.self_attn.k_proj.weight"));
        assert!(re.is_match("model.layers.3.mlp.up_proj.weight"));
        assert!(re.is_match("lm_head.weight"));
        assert!(!re.is_match("model.layers.3.self_attn.q_proj.weight"));
        assert!(!re.is_match("model.layers.3.mlp.down_proj.weight"));
    }
}
