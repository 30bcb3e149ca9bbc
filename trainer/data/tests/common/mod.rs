//! Test helpers: a mock OpenAI server (actix-web in its own thread) that
//! records every request, and config writers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Value};

#[derive(Default)]
pub struct Log {
    /// (`user` field of the request, model, when) in arrival order.
    pub requests: Vec<(String, String, Instant)>,
    pub attempts: HashMap<String, u32>,
}

pub struct Mock {
    pub port: u16,
    pub log: Arc<Mutex<Log>>,
    pub delay: Duration,
}

impl Mock {
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
    pub fn users(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .requests
            .iter()
            .map(|r| r.0.clone())
            .collect()
    }
    pub fn count(&self) -> usize {
        self.log.lock().unwrap().requests.len()
    }
}

fn completion(content: &str, finish: &str) -> Value {
    json!({
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17},
    })
}

async fn chat(
    req: HttpRequest,
    body: web::Json<Value>,
    state: web::Data<(Arc<Mutex<Log>>, Duration)>,
) -> HttpResponse {
    let _ = req;
    let (log, delay) = (&state.0, state.1);
    let user = body["user"].as_str().unwrap_or("").to_string();
    let model = body["model"].as_str().unwrap_or("").to_string();
    let attempt = {
        let mut l = log.lock().unwrap();
        l.requests
            .push((user.clone(), model.clone(), Instant::now()));
        let a = l.attempts.entry(format!("{model}|{user}")).or_default();
        *a += 1;
        *a
    };
    if !delay.is_zero() {
        actix_web::rt::time::sleep(delay).await;
    }
    let question = body["messages"][0]["content"].as_str().unwrap_or("");
    match model.as_str() {
        "garbage" => HttpResponse::Ok()
            .content_type("application/json")
            .body("<html>surprise</html>"),
        "empty" => HttpResponse::Ok().json(completion("", "stop")),
        "cut" => HttpResponse::Ok().json(completion("The answer is", "length")),
        "flaky" if attempt == 1 => HttpResponse::ServiceUnavailable().body("warming up"),
        "limited" if attempt == 1 => HttpResponse::TooManyRequests()
            .insert_header(("Retry-After", "1"))
            .body("slow down"),
        "broken" => HttpResponse::BadRequest()
            .json(json!({"error": {"message": "bad model", "type": "invalid_request_error"}})),
        "judge" => {
            let answer = body["messages"][1]["content"].as_str().unwrap_or("");
            let reply = if answer.contains("Thinking") {
                "Rating: 8\nGood."
            } else {
                "**Rating:** 3/10, wrong."
            };
            HttpResponse::Ok().json(completion(reply, "stop"))
        }
        "judge-garbage" => HttpResponse::Ok().json(completion("I refuse to rate.", "stop")),
        _ => {
            // Echo the gold answer hidden in the question when there is one: "[[42]]".
            let ans = question
                .split("[[")
                .nth(1)
                .and_then(|r| r.split("]]").next())
                .unwrap_or("0");
            let text = if user.ends_with("/0") {
                format!("Thinking... The answer is {ans}.")
            } else {
                "The answer is 999999.".into()
            };
            HttpResponse::Ok().json(completion(&text, "stop"))
        }
    }
}

/// vLLM `/classify` shape: reward 0.55 for "Thinking" answers, 0.50 otherwise.
async fn classify(body: web::Json<Value>) -> HttpResponse {
    let data: Vec<Value> = body["input"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let r = if t.as_str().unwrap().contains("Thinking") {
                0.55
            } else {
                0.50
            };
            json!({"index": i, "label": "LABEL_0", "probs": [r], "num_classes": 1})
        })
        .collect();
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}

/// Plain shape: `{"scores": [...]}`, 0.9 for "Thinking" answers, 0.1 otherwise.
async fn scores(body: web::Json<Value>) -> HttpResponse {
    let s: Vec<f64> = body["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            if t.as_str().unwrap().contains("Thinking") {
                0.9
            } else {
                0.1
            }
        })
        .collect();
    HttpResponse::Ok().json(json!({"scores": s}))
}

async fn models() -> HttpResponse {
    HttpResponse::Ok().json(json!({"object": "list", "data": []}))
}

pub fn mock(delay: Duration) -> Mock {
    let log = Arc::new(Mutex::new(Log::default()));
    let (tx, rx) = std::sync::mpsc::channel();
    let l2 = log.clone();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let state = web::Data::new((l2, delay));
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(state.clone())
                    .route("/v1/chat/completions", web::post().to(chat))
                    .route("/v1/models", web::get().to(models))
                    .route("/classify", web::post().to(classify))
                    .route("/scores", web::post().to(scores))
            })
            .workers(2)
            .bind(("127.0.0.1", 0))
            .unwrap();
            let port = server.addrs()[0].port();
            tx.send(port).unwrap();
            server.run().await.unwrap();
        });
    });
    let port = rx.recv().unwrap();
    Mock { port, log, delay }
}

/// A generic JSONL math pool of `n` prompts whose gold answer is hidden in the text.
pub fn math_pool(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("pool.jsonl");
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&json!({"id": i, "prompt": format!("What is {i} + 1? [[{}]]", i + 1), "answer": (i + 1).to_string()}).to_string());
        s.push('\n');
    }
    std::fs::write(&path, s).unwrap();
    path
}

/// A data config whose one pool is [`math_pool`] in `dir` (all of it on the
/// training side) and whose one endpoint, `mock`, is `url` with
/// `concurrency`; `rest` adds the sources and `[sampling]`. Output: `dir/out`.
pub fn mock_math_config(dir: &Path, url: &str, concurrency: usize, rest: &str) -> String {
    format!(
        r#"
[run]
output = "{out}"

[prompts]
data_dir = "{data}"
eval_fraction = 0.0
math_suffix = ""

[[pools]]
name = "p"
domain = "math"
format = "jsonl"
file = "pool.jsonl"

[[endpoints]]
name = "mock"
base_url = "{url}"
concurrency = {concurrency}
{rest}"#,
        out = dir.join("out").display(),
        data = dir.display(),
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The fusechat binary: $FUSECHAT_BIN, else next to the test's target folder.
pub fn fusechat_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FUSECHAT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("fusechat")
}

pub fn require_bin() -> PathBuf {
    let bin = fusechat_bin();
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --release -p fusechat`",
        bin.display()
    );
    let help = std::process::Command::new(&bin)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("sample"),
        "{} has no `sample` subcommand: rebuild it with `cargo build --release -p fusechat`",
        bin.display()
    );
    bin
}
