//! Generation: runs a validated request on a loaded model and yields one
//! merged stream of events for all its choices.
//!
//! Steps, in order: count the prompt's tokens and check the context; wait for
//! seats in the model's batch (or 429); start one engine sequence per choice;
//! filter each choice's text for stop sequences; time it all for /metrics.
//! The HTTP layer turns the events into SSE chunks or one JSON body.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use mistralrs::{Constraint, Response, SamplingParams, StopTokens};
use tokio::sync::mpsc;

use crate::config::Limits;
use crate::engine::{LoadedModel, Prompt, SequenceJob};
use crate::error::ApiError;
use crate::logit_bias::LogitBias;
use crate::metrics::Metrics;
use crate::prompt_logprobs;
use crate::protocol::{CompletionLogprobs, TokenLogprob, ToolCall, TopLogprob, Usage};
use crate::tools;
use crate::queue::{Refused, Seats};
use crate::seeded::{SamplingKnobs, SeededSampler};
use crate::stop::StopFilter;
use crate::validation::GenerateRequest;

/// What the HTTP layer receives, in order per choice.
#[derive(Debug)]
pub enum Event {
    /// Text for choice `index` (may be empty when only a log-probability came).
    Piece {
        index: u32,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// Choice `index` called tools (its answer ends with `tool_calls`).
    ToolCalls { index: u32, calls: Vec<ToolCall> },
    /// Choice `index` ended.
    Finished {
        index: u32,
        reason: &'static str,
        usage: Usage,
    },
    /// Choice `index` failed; the request should end with this error.
    Failed { index: u32, error: ApiError },
}

/// A started generation: metadata known up front plus the event stream.
pub struct Generation {
    pub prompt_tokens: u64,
    /// With `echo` and `logprobs`: each prompt's own log-probabilities, in
    /// the order of the prompts; empty otherwise.
    pub prompt_logprobs: Vec<CompletionLogprobs>,
    pub events: mpsc::Receiver<Event>,
}

/// Shared by a request's choice tasks; when the last one ends, the seats go
/// back to the queue and the request's end-to-end time is recorded.
struct RequestTrace {
    model: Arc<LoadedModel>,
    metrics: Arc<Metrics>,
    accepted: Instant,
    first_token_seen: AtomicBool,
    _seats: Seats,
}

impl Drop for RequestTrace {
    fn drop(&mut self) {
        self.metrics
            .e2e_latency
            .with_label_values(&[&self.model.id])
            .observe(self.accepted.elapsed().as_secs_f64());
    }
}

pub async fn start(
    model: Arc<LoadedModel>,
    req: GenerateRequest,
    limits: &Limits,
    metrics: Arc<Metrics>,
) -> Result<Generation, ApiError> {
    let accepted = Instant::now();
    let biased: Vec<u32> = req.logit_bias.keys().copied().collect();
    model.check_token_ids(&biased, "logit_bias")?;
    if let Some(t) = &req.tools {
        model.tool_support.check(&model.id, &t.mode)?;
    }
    // Every prompt is checked before any seat is taken, and all the seats
    // are taken at once: a batch that started some prompts and then waited
    // for seats would hold seats its own unread output keeps from freeing.
    let planned = plan_prompts(&model, &req, limits).await?;
    let sequences = req.n * req.prompts.len();
    let seats = take_seats(&model, &req, sequences).await?;
    metrics
        .queue_time
        .with_label_values(&[&model.id])
        .observe(seats.queued_for.as_secs_f64());
    let prompt_tokens: u64 = planned.iter().map(|p| p.prompt_tokens).sum();
    metrics
        .prompt_tokens
        .with_label_values(&[&model.id])
        .inc_by(prompt_tokens);
    let trace = Arc::new(RequestTrace {
        model: model.clone(),
        metrics: metrics.clone(),
        accepted,
        first_token_seen: AtomicBool::new(false),
        _seats: seats,
    });
    let scored_prompts = score_prompts(&model, &req).await?;
    let (tx, rx) = mpsc::channel(64 * sequences);
    for (i, (prompt, plan)) in req.prompts.iter().zip(planned).enumerate() {
        let first_index = (i * req.n) as u32;
        if plan.max_tokens == 0 {
            finish_unstarted(&model, &metrics, &req, plan, first_index, &tx).await;
            continue;
        }
        start_choices(&model, &req, prompt, plan, first_index, &trace, &tx).await?;
    }
    Ok(Generation {
        prompt_tokens,
        prompt_logprobs: scored_prompts,
        events: rx,
    })
}

/// The plan of each prompt of the request, in order.
async fn plan_prompts(model: &LoadedModel, req: &GenerateRequest, limits: &Limits) -> Result<Vec<Plan>, ApiError> {
    let mut planned = Vec::with_capacity(req.prompts.len());
    for (i, prompt) in req.prompts.iter().enumerate() {
        let param = match req.prompts.len() {
            1 => prompt.param().to_string(),
            _ => format!("{}[{i}]", prompt.param()),
        };
        planned.push(plan(model, req, prompt, &param, limits).await?);
    }
    Ok(planned)
}

/// Waits for seats for all of the request's sequences at once; a refusal
/// names what the client should change.
async fn take_seats(model: &LoadedModel, req: &GenerateRequest, sequences: usize) -> Result<Seats, ApiError> {
    model.admission.admit(sequences).await.map_err(|refused| match refused {
        Refused::QueueFull => ApiError::overloaded(&model.id, 1),
        Refused::TooManySequences { max } if req.prompts.len() > 1 => ApiError::invalid_param(
            "prompt",
            format!(
                "{} prompts × `n` {} is {sequences} sequences, more than the {max} model `{}` runs at once; send fewer prompts per request.",
                req.prompts.len(),
                req.n,
                model.id
            ),
        ),
        Refused::TooManySequences { max } => ApiError::invalid_param(
            "n",
            format!("`n` is larger than the {max} sequences model `{}` runs at once.", model.id),
        ),
    })
}

/// The prompts' own logprobs where `echo` asks for them with `logprobs`.
/// One prompt at a time: each holds its logits (up to
/// `prompt_logprobs::MAX_LOGITS_BYTES`) while it is scored.
async fn score_prompts(model: &LoadedModel, req: &GenerateRequest) -> Result<Vec<CompletionLogprobs>, ApiError> {
    let mut scored = Vec::new();
    if let (true, Some(top)) = (req.echo, req.logprobs) {
        for prompt in &req.prompts {
            scored.push(prompt_logprobs::of_prompt(model, prompt, top).await?);
        }
    }
    Ok(scored)
}

/// `max_tokens: 0` (with `echo`): the prompt's choices end at once, having
/// generated nothing.
async fn finish_unstarted(
    model: &LoadedModel,
    metrics: &Metrics,
    req: &GenerateRequest,
    plan: Plan,
    first_index: u32,
    tx: &mpsc::Sender<Event>,
) {
    for index in 0..req.n as u32 {
        metrics
            .requests_finished
            .with_label_values(&[&model.id, "length"])
            .inc();
        let usage = Usage {
            prompt_tokens: plan.prompt_tokens,
            completion_tokens: 0,
            total_tokens: plan.prompt_tokens,
        };
        // The channel holds 64 events a sequence: this cannot wait.
        let _ = tx
            .send(Event::Finished { index: first_index + index, reason: "length", usage })
            .await;
    }
}

/// A prompt checked against the model: its length and the tokens its
/// choices may generate.
struct Plan {
    prompt_tokens: u64,
    max_tokens: u64,
}

/// Token ids against the vocabulary, the prompt's length against the context.
async fn plan(
    model: &LoadedModel,
    req: &GenerateRequest,
    prompt: &Prompt,
    param: &str,
    limits: &Limits,
) -> Result<Plan, ApiError> {
    if let Prompt::Tokens(ids) = prompt {
        model.check_token_ids(ids, param)?;
    }
    let prompt_tokens = model.count_prompt_tokens(prompt).await? as u64;
    if req.echo && req.logprobs.is_some() {
        prompt_logprobs::check_size(prompt_tokens, model.vocab_size, param)?;
    }
    let context = model.max_seq_len as u64;
    if prompt_tokens >= context {
        return Err(ApiError::context_length_exceeded(param, format!(
            "This model's maximum context length is {context} tokens. However, your {param} resulted in {prompt_tokens} tokens. Please reduce the length of the {param}."
        )));
    }
    let max_tokens = match req.max_tokens {
        Some(asked) if prompt_tokens + asked > context => {
            return Err(ApiError::context_length_exceeded(param, format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens ({prompt_tokens} in the {param}, {asked} in the completion). Please reduce the length of the {param} or completion.",
                prompt_tokens + asked
            )))
        }
        Some(asked) => asked,
        None => model
            .defaults
            .max_tokens
            .unwrap_or(limits.max_tokens)
            .min(context - prompt_tokens),
    };
    Ok(Plan { prompt_tokens, max_tokens })
}

/// Starts a prompt's `n` choices, numbered from `first_index`.
async fn start_choices(
    model: &Arc<LoadedModel>,
    req: &GenerateRequest,
    prompt: &Prompt,
    plan: Plan,
    first_index: u32,
    trace: &Arc<RequestTrace>,
    tx: &mpsc::Sender<Event>,
) -> Result<(), ApiError> {
    let Plan { prompt_tokens, max_tokens } = plan;
    let sampling = req.sampling.with_defaults(&model.defaults);
    // OpenAI's default temperature is 1; a model's configured default comes first.
    let temperature = sampling.temperature.unwrap_or(1.0);
    let greedy = sampling.is_greedy();
    // An answer read for tool calls keeps its stop strings out of the
    // engine, which would cut a call whose JSON holds one: the server's
    // filter applies them to the answer's text alone and ends the choice.
    let stops_in_engine = !req.tools.as_ref().is_some_and(|t| t.mode != tools::ToolMode::None);
    let bias = (!req.logit_bias.is_empty()).then(|| {
        Arc::new(LogitBias::new(req.logit_bias.clone())) as Arc<dyn mistralrs::CustomLogitsProcessor>
    });
    for index in 0..req.n {
        let seeded = req.seed.filter(|_| !greedy).map(|seed| {
            let knobs = SamplingKnobs {
                temperature,
                top_k: sampling.top_k,
                top_p: sampling.top_p,
                min_p: sampling.min_p,
            };
            // Each choice of a prompt gets its own stream, derived from the
            // seed; the same prompt and seed answer alike wherever it sits
            // in a list.
            Arc::new(SeededSampler::new(seed.wrapping_add(index as u64), knobs))
                as Arc<dyn mistralrs::CustomLogitsProcessor>
        });
        let params = SamplingParams {
            // Greedy, and seeded sampling (where the processor has already chosen), is
            // the engine's top_k = 1: mistralrs 0.8.1 samples at temperature 1 when given
            // neither a temperature nor top_k. The temperature still sets the
            // distribution the reported logprobs come from (1 for greedy).
            temperature: if greedy { None } else { Some(temperature) },
            top_k: if greedy || seeded.is_some() { Some(1) } else { sampling.top_k },
            top_p: if seeded.is_some() { None } else { sampling.top_p },
            min_p: if seeded.is_some() { None } else { sampling.min_p },
            top_n_logprobs: req.logprobs.unwrap_or(0),
            frequency_penalty: sampling.frequency_penalty,
            presence_penalty: sampling.presence_penalty,
            repetition_penalty: sampling.repetition_penalty,
            stop_toks: (stops_in_engine && !req.stop.is_empty()).then(|| StopTokens::Seqs(req.stop.clone())),
            max_len: Some(max_tokens as usize),
            logits_bias: None,
            n_choices: 1,
            dry_params: None,
        };
        let job = SequenceJob {
            prompt: prompt.clone(),
            sampling: params,
            logits_processors: bias.iter().cloned().chain(seeded).collect(),
            logprobs: req.logprobs.is_some(),
            constraint: match (req.tools.as_ref().and_then(tools::constraint), &req.json_schema) {
                (Some(calls), _) => calls,
                (None, Some(schema)) => Constraint::JsonSchema(schema.clone()),
                (None, None) => Constraint::None,
            },
            tool_choice: req.tools.as_ref().map_or(mistralrs::ToolChoice::Auto, |t| tools::engine_choice(&t.mode)),
        };
        let engine_rx = model.start(job).await?;
        let choice = ChoiceTask {
            index: first_index + index as u32,
            client_logprobs: req.logprobs.is_some(),
            trace: trace.clone(),
            stop: StopFilter::new(req.stop.clone()),
            stops_in_engine,
            prompt_tokens,
            out: tx.clone(),
        };
        tokio::spawn(choice.run(engine_rx));
    }
    Ok(())
}

struct ChoiceTask {
    index: u32,
    /// Whether the client asked for log-probabilities.
    client_logprobs: bool,
    trace: Arc<RequestTrace>,
    stop: StopFilter,
    /// Whether the engine stops at the stop strings too; if not, the choice
    /// ends when the filter finds one (dropping the engine's receiver
    /// cancels the sequence).
    stops_in_engine: bool,
    prompt_tokens: u64,
    out: mpsc::Sender<Event>,
}

/// One engine chunk, whichever endpoint it came from.
struct EngineChunk {
    text: String,
    tool_calls: Vec<mistralrs::ToolCallResponse>,
    logprob: Option<mistralrs::core::ResponseLogprob>,
    finish_reason: Option<String>,
    usage: Option<mistralrs::Usage>,
}

/// How a choice's engine stream ended.
type Outcome = Result<(&'static str, Option<mistralrs::Usage>), ApiError>;

impl ChoiceTask {
    /// Reads the engine's chunks, passes the choice's events on, and ends
    /// with `Finished` or `Failed`; returns early when the client is gone
    /// (dropping the engine receiver cancels the sequence).
    async fn run(mut self, mut engine: mpsc::Receiver<Response>) {
        let mut last_piece: Option<Instant> = None;
        let mut pieces: u64 = 0;
        let mut called = false;
        let outcome: Outcome = loop {
            let Some(response) = engine.recv().await else {
                // The engine ended the sequence without a final chunk.
                break Ok(("stop", None));
            };
            let mut chunk = match into_chunk(response) {
                Ok(chunk) => chunk,
                Err(error) => break Err(error),
            };
            last_piece = Some(self.time_piece(last_piece));
            pieces += 1;
            called |= !chunk.tool_calls.is_empty();
            let (finish_reason, usage) = (chunk.finish_reason.take(), chunk.usage.take());
            if !self.pass_on(chunk).await {
                self.count_finished("cancelled");
                return;
            }
            if !self.stops_in_engine && self.stop.is_stopped() {
                break Ok((if called { "tool_calls" } else { "stop" }, usage));
            }
            if let Some(reason) = finish_reason {
                let reason = match reason.as_str() {
                    "tool_calls" => "tool_calls",
                    "length" if !self.stop.is_stopped() => "length",
                    _ => "stop",
                };
                break Ok((reason, usage));
            }
        };
        let event = self.finish(outcome, pieces).await;
        let _ = self.out.send(event).await;
    }

    /// Records time to first token (once per request) or the time since
    /// the last piece; returns now.
    fn time_piece(&self, last_piece: Option<Instant>) -> Instant {
        let (now, metrics, model) = (Instant::now(), &self.trace.metrics, &self.trace.model.id);
        match last_piece {
            None if !self.trace.first_token_seen.swap(true, Ordering::AcqRel) => metrics
                .time_to_first_token
                .with_label_values(&[model])
                .observe((now - self.trace.accepted).as_secs_f64()),
            None => {}
            Some(prev) => metrics
                .inter_token_latency
                .with_label_values(&[model])
                .observe((now - prev).as_secs_f64()),
        }
        now
    }

    /// Sends a chunk's calls and its text (after the stop filter) on;
    /// false when the client is gone.
    async fn pass_on(&mut self, chunk: EngineChunk) -> bool {
        let mut events = Vec::with_capacity(2);
        if !chunk.tool_calls.is_empty() {
            events.push(Event::ToolCalls { index: self.index, calls: tools::calls(chunk.tool_calls) });
        }
        let logprob = chunk.logprob.filter(|_| self.client_logprobs);
        let was_stopped = self.stop.is_stopped();
        let filtered = self.stop.push(&chunk.text);
        if !was_stopped && (!filtered.text.is_empty() || logprob.is_some()) {
            let logprob = logprob.filter(|_| !filtered.stopped).map(convert_logprob);
            events.push(Event::Piece { index: self.index, text: filtered.text, logprob });
        }
        for event in events {
            if self.out.send(event).await.is_err() {
                return false;
            }
        }
        true
    }

    /// The choice's last event: what the stop filter still held, then
    /// `Finished` with its usage (counted from the pieces where the engine
    /// gave none), or `Failed`.
    async fn finish(&mut self, outcome: Outcome, pieces: u64) -> Event {
        let (reason, usage) = match outcome {
            Ok(ended) => ended,
            Err(error) => {
                self.count_finished("error");
                return Event::Failed { index: self.index, error };
            }
        };
        let tail = self.stop.finish();
        if !tail.is_empty() {
            let _ = self.out.send(Event::Piece { index: self.index, text: tail, logprob: None }).await;
        }
        let usage = match usage {
            Some(u) => Usage {
                prompt_tokens: u.prompt_tokens as u64,
                completion_tokens: u.completion_tokens as u64,
                total_tokens: (u.prompt_tokens + u.completion_tokens) as u64,
            },
            // Completions chunks carry no usage: one chunk per token.
            None => Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: pieces,
                total_tokens: self.prompt_tokens + pieces,
            },
        };
        self.trace
            .metrics
            .generation_tokens
            .with_label_values(&[&self.trace.model.id])
            .inc_by(usage.completion_tokens);
        self.count_finished(reason);
        Event::Finished { index: self.index, reason, usage }
    }

    fn count_finished(&self, reason: &str) {
        self.trace
            .metrics
            .requests_finished
            .with_label_values(&[&self.trace.model.id, reason])
            .inc();
    }
}

fn into_chunk(response: Response) -> Result<EngineChunk, ApiError> {
    match response {
        Response::Chunk(mut chunk) => {
            let choice = chunk.choices.pop();
            Ok(EngineChunk {
                text: choice.as_ref().and_then(|c| c.delta.content.clone()).unwrap_or_default(),
                tool_calls: choice.as_ref().and_then(|c| c.delta.tool_calls.clone()).unwrap_or_default(),
                finish_reason: choice.as_ref().and_then(|c| c.finish_reason.clone()),
                logprob: choice.and_then(|c| c.logprobs),
                usage: chunk.usage,
            })
        }
        Response::CompletionChunk(mut chunk) => {
            let choice = chunk.choices.pop();
            Ok(EngineChunk {
                text: choice.as_ref().map(|c| c.text.clone()).unwrap_or_default(),
                tool_calls: Vec::new(),
                finish_reason: choice.as_ref().and_then(|c| c.finish_reason.clone()),
                logprob: choice.and_then(|c| c.logprobs),
                usage: None,
            })
        }
        Response::ValidationError(e) => Err(ApiError::invalid_body(e.to_string(), None)),
        Response::InternalError(e) => Err(ApiError::internal(format!("engine error: {e}"))),
        Response::ModelError(e, _) | Response::CompletionModelError(e, _) => {
            Err(ApiError::internal(format!("model error: {e}")))
        }
        other => Err(ApiError::internal(format!(
            "unexpected engine response: {}",
            match other {
                Response::Done(_) | Response::CompletionDone(_) => "done without streaming",
                _ => "not a text response",
            }
        ))),
    }
}

/// mistralrs reports base-10 logarithms; OpenAI's logprobs are natural ones.
fn natural_log(log10: f32) -> f32 {
    log10 * std::f32::consts::LN_10
}

/// What OpenAI reports for a token with no probability at all: -inf is not a
/// JSON number.
const NO_PROBABILITY: f32 = -9999.0;

fn convert_logprob(l: mistralrs::core::ResponseLogprob) -> TokenLogprob {
    let logprob = natural_log(l.logprob);
    TokenLogprob {
        token: l.token,
        logprob: if logprob.is_finite() { logprob } else { NO_PROBABILITY },
        bytes: l.bytes,
        // Alternatives with no probability (a grammar's mask, when it forced the
        // engine to sample again) come as -inf: they carry no information.
        top_logprobs: l
            .top_logprobs
            .into_iter()
            .filter(|t| t.logprob.is_finite())
            .map(|t| {
                let text = t.bytes.unwrap_or_default();
                TopLogprob {
                    logprob: natural_log(t.logprob),
                    bytes: Some(text.clone().into_bytes()),
                    token: text,
                }
            })
            .collect(),
    }
}
