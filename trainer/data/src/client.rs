//! OpenAI-compatible chat client: a concurrency limit per endpoint, retries
//! with exponential backoff on 429, 5xx and connection errors (a
//! `Retry-After` header wins), and a clear failure for anything else.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Semaphore;

use crate::config::EndpointConfig;

pub struct Endpoint {
    pub cfg: EndpointConfig,
    http: reqwest::Client,
    sem: Arc<Semaphore>,
    key: Option<String>,
    /// Set when every retry of a request failed to connect: until then,
    /// later requests fail at once instead of waiting out their own
    /// retries; after it, the next request probes the endpoint again.
    down_until: Mutex<Option<Instant>>,
    backoff: Duration,
}

/// How long an endpoint that could not be reached is taken as down before
/// requests try it again.
pub const DOWN_FOR: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct ChatResponse {
    pub text: String,
    pub finish_reason: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub attempts: u32,
    pub latency: Duration,
    pub raw: Value,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message} (after {attempts} attempt(s))")]
pub struct ChatFailure {
    pub message: String,
    pub attempts: u32,
}

enum Attempt {
    Done(ChatResponse),
    Retry(String, Option<Duration>, bool),
    Fail(String),
}

/// `Retry-After` in seconds (integer or decimal); HTTP dates fall back to backoff.
pub fn retry_after(h: Option<&reqwest::header::HeaderValue>) -> Option<Duration> {
    let s = h?.to_str().ok()?.trim();
    let secs: f64 = s.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(120.0)))
}

impl Endpoint {
    /// A client for `cfg`; an error naming the field where `cfg` is not
    /// usable (a negative or NaN `timeout_s` or `backoff_s`).
    pub fn new(cfg: &EndpointConfig) -> crate::error::Result<Arc<Self>> {
        cfg.validate()?;
        let timeout = Duration::from_secs_f64(cfg.timeout_s);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(cfg.concurrency)
            .build()
            .map_err(|e| crate::error::DataError::Endpoint(crate::error::chain(&e)))?;
        Ok(Arc::new(Endpoint {
            cfg: cfg.clone(),
            http,
            sem: Arc::new(Semaphore::new(cfg.concurrency)),
            key: cfg.key(),
            down_until: Mutex::new(None),
            backoff: Duration::from_secs_f64(cfg.backoff_s).min(Duration::from_secs(60)),
        }))
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "{}/{}",
            self.cfg.base_url.trim_end_matches('/'),
            path.trim_start_matches('/')
        )
    }

    /// `GET /models`: whether the endpoint answers at all.
    pub async fn check(&self) -> Result<(), String> {
        let mut req = self
            .http
            .get(self.url("models"))
            .timeout(Duration::from_secs(10));
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!(
                "GET {} answered {}",
                self.url("models"),
                r.status()
            )),
            Err(e) => Err(format!(
                "{} is unreachable: {}",
                self.cfg.base_url,
                error_chain(&e)
            )),
        }
    }

    /// POST `/chat/completions` with retries; the first choice's text.
    pub async fn chat(&self, body: &Value) -> Result<ChatResponse, ChatFailure> {
        let _permit = self.sem.acquire().await.expect("semaphore closed");
        let mut attempts = 0;
        let mut delay = self.backoff;
        loop {
            if self.is_down() {
                return Err(ChatFailure {
                    message: format!(
                        "{} is unreachable (a request failed to connect; it is tried again {}s after that failure)",
                        self.cfg.base_url,
                        DOWN_FOR.as_secs()
                    ),
                    attempts,
                });
            }
            attempts += 1;
            match self.attempt(body, attempts).await {
                Attempt::Done(r) => {
                    self.set_down(None);
                    return Ok(r);
                }
                Attempt::Fail(message) => return Err(ChatFailure { message, attempts }),
                Attempt::Retry(message, after, connect) => {
                    if attempts > self.cfg.max_retries {
                        if connect {
                            self.set_down(Some(Instant::now() + DOWN_FOR));
                        }
                        return Err(ChatFailure { message, attempts });
                    }
                    let wait = after.unwrap_or(delay);
                    tracing::debug!("{message}; retrying in {:.1}s", wait.as_secs_f64());
                    tokio::time::sleep(wait).await;
                    delay = delay.saturating_mul(2).min(Duration::from_secs(60));
                }
            }
        }
    }

    /// Whether the endpoint is taken as down now; once [`DOWN_FOR`] has
    /// passed, requests probe it again.
    pub fn is_down(&self) -> bool {
        let guard = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        guard.is_some_and(|until| Instant::now() < until)
    }

    fn set_down(&self, until: Option<Instant>) {
        *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) = until;
    }

    async fn attempt(&self, body: &Value, attempts: u32) -> Attempt {
        let start = Instant::now();
        let mut req = self.http.post(self.url("chat/completions")).json(body);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let connect = e.is_connect();
                return Attempt::Retry(
                    format!("POST {}: {}", self.url("chat/completions"), error_chain(&e)),
                    None,
                    connect,
                );
            }
        };
        let status = resp.status();
        let after = retry_after(resp.headers().get(reqwest::header::RETRY_AFTER));
        let text = match resp.text().await {
            Ok(t) => t,
            Err(e) => {
                return Attempt::Retry(
                    format!("reading the response: {}", error_chain(&e)),
                    None,
                    false,
                )
            }
        };
        if status.as_u16() == 429 || status.is_server_error() {
            return Attempt::Retry(format!("HTTP {status}: {}", clip(&text, 300)), after, false);
        }
        if !status.is_success() {
            return Attempt::Fail(format!("HTTP {status}: {}", clip(&text, 500)));
        }
        let latency = start.elapsed();
        match parse_chat(&text) {
            Ok((content, finish, pt, ct, raw)) => Attempt::Done(ChatResponse {
                text: content,
                finish_reason: finish,
                prompt_tokens: pt,
                completion_tokens: ct,
                attempts,
                latency,
                raw,
            }),
            Err(e) => Attempt::Fail(e),
        }
    }
}

type Parsed = (String, Option<String>, Option<u64>, Option<u64>, Value);

/// The first choice of a chat completion; anything else is a clear error.
pub fn parse_chat(text: &str) -> Result<Parsed, String> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| format!("garbage response (not JSON: {e}): {}", clip(text, 200)))?;
    let choice = v
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or_else(|| format!("garbage response (no choices): {}", clip(text, 200)))?;
    let content = match choice.pointer("/message/content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => {
            // Some servers put the text of a completion in `text`.
            match choice.get("text").and_then(Value::as_str) {
                Some(s) => s.to_string(),
                None => {
                    return Err(format!(
                        "garbage response (no message content): {}",
                        clip(text, 200)
                    ))
                }
            }
        }
        Some(other) => {
            return Err(format!(
                "garbage response (content is not text: {})",
                clip(&other.to_string(), 100)
            ))
        }
    };
    let finish = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .map(str::to_string);
    let pt = v.pointer("/usage/prompt_tokens").and_then(Value::as_u64);
    let ct = v
        .pointer("/usage/completion_tokens")
        .and_then(Value::as_u64);
    Ok((content, finish, pt, ct, v))
}

pub fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(n).collect();
        out.push('…');
        out
    }
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_real_shapes_and_rejects_garbage() {
        let ok = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"length"}],
                     "usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
        let (t, f, p, c, _) = parse_chat(ok).unwrap();
        assert_eq!(
            (t.as_str(), f.as_deref(), p, c),
            ("hi", Some("length"), Some(5), Some(1))
        );
        let empty =
            r#"{"choices":[{"message":{"role":"assistant","content":""},"finish_reason":"stop"}]}"#;
        assert_eq!(parse_chat(empty).unwrap().0, "");
        assert!(parse_chat("<html>oops</html>")
            .unwrap_err()
            .contains("not JSON"));
        assert!(parse_chat(r#"{"choices":[]}"#)
            .unwrap_err()
            .contains("no choices"));
        assert!(parse_chat(r#"{"choices":[{"message":{"content":5}}]}"#).is_err());
        assert!(parse_chat("").is_err());
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        use reqwest::header::HeaderValue;
        assert_eq!(
            retry_after(Some(&HeaderValue::from_static("2"))),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(Some(&HeaderValue::from_static("0.5"))),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            retry_after(Some(&HeaderValue::from_static(
                "Wed, 21 Oct 2015 07:28:00 GMT"
            ))),
            None
        );
        assert_eq!(retry_after(None), None);
    }

    /// A one-thread HTTP server on `port` answering every request with a
    /// chat completion saying "hi".
    fn serve_on(port: u16) -> std::thread::JoinHandle<()> {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().take(8) {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let _ = reader.read_exact(&mut body);
                let reply = r#"{"choices":[{"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                    reply.len()
                );
            }
        })
    }

    #[test]
    fn an_endpoint_that_was_unreachable_recovers() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg: EndpointConfig = toml::from_str(&format!(
            "name = \"e\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\nmax_retries = 1\nbackoff_s = 0.01\ntimeout_s = 5"
        ))
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ep = Endpoint::new(&cfg).unwrap();
        let body = serde_json::json!({"model": "m", "messages": []});
        // Nothing listens: the request fails after its retries, and the
        // next one fails at once.
        let f = rt.block_on(ep.chat(&body)).unwrap_err();
        assert_eq!(f.attempts, 2, "{f}");
        let f = rt.block_on(ep.chat(&body)).unwrap_err();
        assert_eq!(f.attempts, 0, "{f}");
        assert!(f.message.contains("unreachable"), "{f}");
        // The endpoint comes up: within a few seconds requests go through again.
        let _server = serve_on(port);
        let start = Instant::now();
        let ok = loop {
            match rt.block_on(ep.chat(&body)) {
                Ok(r) => break r,
                Err(f) if start.elapsed() < Duration::from_secs(15) => {
                    let _ = f;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(f) => panic!("still failing after {:?}: {f}", start.elapsed()),
            }
        };
        assert_eq!(ok.text, "hi");
    }
}

/// One source's endpoints (its replicas): each request goes to the one with
/// the fewest requests per slot among those not taken as down, and waits
/// there for one of its `concurrency` slots. A request whose endpoint turns
/// out to be down is tried on another one that is not.
pub struct Replicas {
    endpoints: Vec<Arc<Endpoint>>,
    /// Requests given to each endpoint and not yet answered.
    load: Mutex<Vec<usize>>,
}

/// Gives a request's place back when it is answered (or dropped).
struct Assigned<'a> {
    replicas: &'a Replicas,
    index: usize,
}

impl Drop for Assigned<'_> {
    fn drop(&mut self) {
        let mut load = self.replicas.load.lock().unwrap_or_else(|e| e.into_inner());
        load[self.index] -= 1;
    }
}

impl Replicas {
    pub fn new(endpoints: Vec<Arc<Endpoint>>) -> Self {
        assert!(!endpoints.is_empty(), "a source has at least one endpoint");
        let load = Mutex::new(vec![0; endpoints.len()]);
        Self { endpoints, load }
    }

    /// Requests in flight at once over every replica.
    pub fn concurrency(&self) -> usize {
        self.endpoints
            .iter()
            .map(|e| e.cfg.concurrency.max(1))
            .sum()
    }

    /// The least busy endpoint not taken as down (any, when all are), not in `tried`.
    fn assign(&self, tried: &[usize]) -> Option<Assigned<'_>> {
        let mut load = self.load.lock().unwrap_or_else(|e| e.into_inner());
        let busy = |i: usize| load[i] as f64 / self.endpoints[i].cfg.concurrency.max(1) as f64;
        let open: Vec<usize> = (0..self.endpoints.len())
            .filter(|i| !tried.contains(i))
            .collect();
        let up: Vec<usize> = open
            .iter()
            .copied()
            .filter(|&i| !self.endpoints[i].is_down())
            .collect();
        let pool = if up.is_empty() { &open } else { &up };
        let index = pool
            .iter()
            .copied()
            .min_by(|&a, &b| busy(a).total_cmp(&busy(b)))?;
        load[index] += 1;
        Some(Assigned {
            replicas: self,
            index,
        })
    }

    /// [`Endpoint::chat`] on the least busy replica; on another one when
    /// that one could not be reached.
    pub async fn chat(&self, body: &Value) -> Result<ChatResponse, ChatFailure> {
        let mut tried = Vec::new();
        loop {
            let assigned = self.assign(&tried).expect("an endpoint not tried yet");
            let endpoint = &self.endpoints[assigned.index];
            let result = endpoint.chat(body).await;
            tried.push(assigned.index);
            drop(assigned);
            match result {
                Err(failure) if endpoint.is_down() && tried.len() < self.endpoints.len() => {
                    tracing::debug!("{}: {failure}; trying another replica", endpoint.cfg.name);
                }
                other => return other,
            }
        }
    }
}
