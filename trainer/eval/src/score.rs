//! Scoring one response: math by the data builder's answer checker, code in
//! its sandbox (the base tests, then base and plus), instruction following by
//! the judge in both orders against the reference output, and by the
//! response's agreement with that reference (`score::reference`). Sandbox runs and
//! judge calls go to the store and are reused on a rerun.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fusechat_data::client::Endpoint;
use fusechat_data::config::Domain;
use fusechat_data::prompts::Prompt;
use fusechat_data::score::code::Sandbox;
use fusechat_data::score::{math, reference};
use serde_json::{json, Value};

use crate::config::EvalConfig;
use crate::error::{EvalError, Result};
use crate::judge::{self, Order, Verdict};
use crate::store::{key_of, Record, Store};

/// Instruction prompt id -> (instruction, reference output).
pub type References = HashMap<String, (String, String)>;

/// A response's scores per benchmark, what they rest on, and why a score is
/// missing.
pub struct Scored {
    pub scores: BTreeMap<String, Option<f64>>,
    pub detail: Value,
    pub note: Option<String>,
}

/// What scoring needs across responses: the sandboxes and their slots, the
/// judge, the references, and counts of the work done in this run.
pub struct Scorer<'a> {
    config: &'a EvalConfig,
    store: &'a Store,
    refs: &'a References,
    /// Base tests only, and base plus plus tests.
    sandboxes: [(&'static str, Sandbox); 2],
    sandbox_slots: tokio::sync::Semaphore,
    judge: Option<Arc<Endpoint>>,
    judge_up: tokio::sync::OnceCell<std::result::Result<(), String>>,
    judged: AtomicUsize,
    sandboxed: AtomicUsize,
}

impl<'a> Scorer<'a> {
    pub fn new(config: &'a EvalConfig, store: &'a Store, refs: &'a References) -> Result<Self> {
        let sandbox = |plus_inputs| {
            let mut s = Sandbox::new(&config.code);
            s.plus_inputs = plus_inputs;
            s
        };
        let judge = match &config.judge {
            Some(j) if !refs.is_empty() => Some(
                Endpoint::new(&config.judge_endpoint(j))
                    .map_err(|e| EvalError::data("the judge's HTTP client", e))?,
            ),
            _ => None,
        };
        Ok(Self {
            config,
            store,
            refs,
            sandboxes: [("base", sandbox(0)), ("plus", sandbox(usize::MAX))],
            sandbox_slots: tokio::sync::Semaphore::new(config.code_concurrency),
            judge,
            judge_up: tokio::sync::OnceCell::new(),
            judged: AtomicUsize::new(0),
            sandboxed: AtomicUsize::new(0),
        })
    }

    /// Responses of `domain` scored at once: as many as its sandbox slots or
    /// judge requests (math is scored in place).
    pub fn width(&self, domain: Domain) -> usize {
        let width = match (domain, &self.config.judge) {
            (Domain::Math, _) => 1,
            (Domain::Code, _) => self.config.code_concurrency,
            (Domain::Instruction, Some(j)) => self.config.judge_endpoint(j).concurrency,
            (Domain::Instruction, None) => 1,
        };
        width.max(1)
    }

    /// Whether to show progress bars.
    pub fn progress(&self) -> bool {
        self.config.progress
    }

    /// Judge requests and sandbox runs made in this run (reused ones not counted).
    pub fn counts(&self) -> (usize, usize) {
        (
            self.judged.load(Ordering::Relaxed),
            self.sandboxed.load(Ordering::Relaxed),
        )
    }

    /// Scores `model`'s `response` to `p` on each of the prompt's benchmarks.
    pub async fn score(&self, model: &str, p: &Prompt, response: &str) -> Result<Scored> {
        match p.domain {
            Domain::Math => Ok(self.math(p, response)),
            Domain::Code => self.code(model, p, response).await,
            Domain::Instruction => self.instruction(model, p, response).await,
        }
    }

    fn math(&self, p: &Prompt, response: &str) -> Scored {
        let gold = p.gold.get("answer").and_then(Value::as_str).unwrap_or("");
        let v = math::check(response, gold);
        Scored {
            scores: BTreeMap::from([(p.pool.clone(), Some(if v.correct { 1.0 } else { 0.0 }))]),
            detail: json!({"gold": gold, "extracted": v.extracted, "rule": v.rule, "correct": v.correct}),
            note: None,
        }
    }

    async fn code(&self, model: &str, p: &Prompt, response: &str) -> Result<Scored> {
        let mut scores = BTreeMap::new();
        let mut verdicts = serde_json::Map::new();
        let mut note = None;
        let mut base_passed = None;
        for (tests, sandbox) in &self.sandboxes {
            let bench = format!("{}.{tests}", p.pool);
            // Plus tests include the base tests: a base failure fails plus.
            if *tests == "plus" && base_passed == Some(false) {
                scores.insert(bench, Some(0.0));
                verdicts.insert(
                    (*tests).into(),
                    json!({"passed": false, "reason": "base_failed"}),
                );
                continue;
            }
            let key = key_of(
                "code",
                &json!({
                    "response": response, "prompt": p.id, "tests": tests,
                    "timeout_s": self.config.code.timeout_s, "memory_mb": self.config.code.memory_mb,
                }),
            );
            let reuse = |r: &Record| matches!(r, Record::Code { .. });
            let record = self
                .store
                .reuse_or(&key, reuse, || async {
                    let _slot = self.sandbox_slots.acquire().await.expect("open semaphore");
                    let v = sandbox.check_response(response, &p.gold).await;
                    self.sandboxed.fetch_add(1, Ordering::Relaxed);
                    // A broken sandbox is no verdict: not kept, redone next run.
                    let keep = v.reason != "sandbox_error";
                    let r = Record::Code {
                        key: key.clone(),
                        model: model.into(),
                        prompt: p.id.clone(),
                        tests: (*tests).into(),
                        passed: v.passed,
                        reason: v.reason,
                        detail: v.detail,
                    };
                    Ok((r, keep))
                })
                .await?;
            let Record::Code {
                passed,
                reason,
                detail,
                ..
            } = record
            else {
                unreachable!("reused only as a code record")
            };
            if reason == "sandbox_error" {
                note = Some(format!("sandbox error: {detail}"));
                scores.insert(bench, None);
            } else {
                scores.insert(bench, Some(if passed { 1.0 } else { 0.0 }));
            }
            if *tests == "base" {
                base_passed = (reason != "sandbox_error").then_some(passed);
            }
            let clipped: String = detail.chars().take(self.config.detail_chars).collect();
            verdicts.insert(
                (*tests).into(),
                json!({"passed": passed, "reason": reason, "detail": clipped}),
            );
        }
        Ok(Scored {
            scores,
            detail: Value::Object(verdicts),
            note,
        })
    }

    async fn instruction(&self, model: &str, p: &Prompt, response: &str) -> Result<Scored> {
        let (instruction, reference) = self.refs.get(&p.id).expect("checked before scoring");
        let mut judged = [judge::Judged::default(); 2];
        let mut shown = serde_json::Map::new();
        let mut note = None;
        for (oi, order) in Order::BOTH.into_iter().enumerate() {
            if response.trim().is_empty() {
                // An empty output loses without asking the judge.
                let loss = match order {
                    Order::ModelFirst => Verdict::B,
                    Order::ReferenceFirst => Verdict::A,
                };
                judged[oi] = judge::Judged {
                    verdict: Some(loss),
                    probs: None,
                };
                shown.insert(
                    order.as_str().into(),
                    json!({"verdict": loss, "reply": "empty output: a loss"}),
                );
                continue;
            }
            let record = self
                .judge_once(model, p, instruction, response, reference, order)
                .await?;
            let Record::Judge {
                verdict,
                probs,
                reply,
                error,
                ..
            } = record
            else {
                unreachable!("reused only as a judge record")
            };
            judged[oi] = judge::Judged { verdict, probs };
            if verdict.is_none() {
                note = Some(match &error {
                    Some(e) => format!("judge request failed ({}): {e}", order.as_str()),
                    None => format!("no verdict in the judge's reply ({})", order.as_str()),
                });
            }
            shown.insert(
                order.as_str().into(),
                json!({"verdict": verdict, "probs": probs, "reply": reply, "error": error}),
            );
        }
        Ok(Scored {
            scores: BTreeMap::from([
                (
                    format!("{}.win_rate", p.pool),
                    judge::prompt_score(judged[0], judged[1]),
                ),
                // From the response alone: the wording it shares with the reference.
                (
                    format!("{}.reference", p.pool),
                    Some(reference::agreement(response, reference)),
                ),
            ]),
            detail: Value::Object(shown),
            note,
        })
    }

    /// The judge's verdict on one order of one comparison: reused, or asked.
    async fn judge_once(
        &self,
        model: &str,
        p: &Prompt,
        instruction: &str,
        response: &str,
        reference: &str,
        order: Order,
    ) -> Result<Record> {
        let jc = self.config.judge.as_ref().expect("checked before scoring");
        let ep = self.judge.as_ref().expect("made with the references");
        let body = judge::request(
            &jc.model,
            jc.max_tokens,
            jc.scoring,
            instruction,
            response,
            reference,
            order,
        );
        let key = key_of(
            "judge",
            &json!({"base_url": jc.base_url.trim_end_matches('/'), "body": body}),
        );
        let retry_failed = self.config.retry_failed;
        let reuse = |r: &Record| match r {
            Record::Judge { error, .. } => !(error.is_some() && retry_failed),
            _ => false,
        };
        self.store
            .reuse_or(&key, reuse, || async {
                let up = self
                    .judge_up
                    .get_or_init(|| async { ep.check().await })
                    .await
                    .clone();
                if let Err(e) = up {
                    return Err(EvalError::Config(format!(
                        "the judge ({} at {}): {e}",
                        jc.model, jc.base_url
                    )));
                }
                self.judged.fetch_add(1, Ordering::Relaxed);
                let (model, prompt) = (model.to_string(), p.id.clone());
                let r = match ep.chat(&body).await {
                    Ok(r) => {
                        let read = judge::parse_verdict_at(&r.text);
                        let verdict = read.map(|(v, _)| v);
                        let probs =
                            read.and_then(|(v, at)| judge::verdict_probs(&r.raw, &r.text, v, at));
                        Record::Judge {
                            key: key.clone(),
                            model,
                            prompt,
                            order,
                            verdict,
                            probs,
                            reply: Some(r.text),
                            error: None,
                        }
                    }
                    Err(e) => Record::Judge {
                        key: key.clone(),
                        model,
                        prompt,
                        order,
                        verdict: None,
                        probs: None,
                        reply: None,
                        error: Some(e.to_string()),
                    },
                };
                Ok((r, true))
            })
            .await
    }
}
