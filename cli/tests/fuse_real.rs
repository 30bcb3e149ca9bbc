//! `fusechat fuse` end to end on the real models, shrunk to minutes: it
//! starts `fusechat serve` (SmolLM2-135M as target and source, Qwen2.5-Coder
//! 0.5B as the other source) on a free loopback port, samples four real
//! MAWPS prompts (seeded, so the outcome repeats), scores, pairs, trains two SFT steps (DPO has no
//! prompts here and is skipped), exports, hot-swaps the fused model under `target`,
//! evaluates and reports. The first run is killed with SIGKILL once SFT has
//! begun: its server must go with it. The rerun goes to a server that is
//! already running: it finishes without sampling anything twice, and that
//! server then serves the fused model under `target`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn answers(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(300),
    )
    .is_ok()
}

fn write_config(dir: &Path, port: u16) -> PathBuf {
    let data_dir = fusechat_data::Config::load(None).unwrap().data_dir();
    assert!(
        data_dir.join("math/mawps.jsonl").is_file(),
        "no prompt pools at {}: set FUSECHAT_DATA_DIR",
        data_dir.display()
    );
    let serve = dir.join("serve.toml");
    std::fs::write(
        &serve,
        r#"
[[models]]
id = "smollm2-135m-instruct"
fetched = "smollm2-135m-instruct"
max_seqs = 8
isq = "q8_0"
float_layers = ["q_proj", "down_proj"]

[[models]]
id = "qwen2.5-coder-0.5b-instruct"
fetched = "qwen2.5-coder-0.5b-instruct"
max_seqs = 8
"#,
    )
    .unwrap();
    let config = dir.join("fuse.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[run]
output = "run"
evaluate_sources = true

[server]
url = "http://127.0.0.1:{port}"
config = "serve.toml"

[target]
model = "smollm2-135m-instruct"
fetched = "smollm2-135m-instruct"
isq = "q8_0"
float_layers = ["q_proj", "down_proj"]

[sft]
max_steps = 2
batch = 2
grad_accum = 1
lr = 1e-5
max_len = 512

[dpo]
max_steps = 1
batch = 1
grad_accum = 1
max_len = 512

[data.prompts]
data_dir = "{data}"
split_seed = 7
eval_fraction = 0.5

[[data.pools]]
name = "mawps"
domain = "math"
format = "mawps"
file = "math/mawps.jsonl"
limit = 4

[[data.endpoints]]
name = "local"
base_url = "http://127.0.0.1:{port}/v1"
concurrency = 8

[[data.sources]]
id = "smollm2-135m-instruct"
endpoint = "local"
temperature = 0.8
top_p = 0.95

[[data.sources]]
id = "qwen2.5-coder-0.5b-instruct"
endpoint = "local"
temperature = 0.7
top_p = 0.8
repetition_penalty = 1.05

[data.sampling]
n = {{ math = 2 }}
max_tokens = 256
seeded = true
progress = false
retry_failed = false

# Every prompt on the SFT side: sampling under batching is not bit-for-bit
# repeatable, and with 4 prompts a 4:6 split can leave SFT empty. DPO then has
# no pairs and is skipped (DPO itself is tested in fusechat-train).
[data.pairing]
sft_fraction = 1.0
seed = 1

[eval]
max_tokens = 96
progress = false

[eval.sizes]
mawps = 2
"#,
            data = data_dir.display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn fuse_runs_end_to_end_and_resumes_after_kill() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port);
    let bin = env!("CARGO_BIN_EXE_fusechat");
    let run = dir.path().join("run");

    // 1. Killed with SIGKILL once training has begun.
    let mut child = Command::new(bin)
        .args(["fuse", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(1500);
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("] sft:") || Instant::now() > deadline {
            break;
        }
    }
    assert!(log.contains("] sft:"), "the first run never reached SFT:\n{log}");
    assert!(log.contains("started `fusechat serve`"), "{log}");
    std::thread::sleep(Duration::from_secs(3));
    child.kill().unwrap();
    child.wait().unwrap();
    // Its server goes with it (PR_SET_PDEATHSIG).
    let gone = Instant::now() + Duration::from_secs(30);
    while answers(port) && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!answers(port), "the server of a killed run is still listening on {port}");
    let first_samples = run.join("data/store.sqlite");
    assert!(first_samples.is_file());

    // 2. The rerun, this time against a server that is already running (as
    // a user would keep one), finishes and samples nothing again.
    let key = "test-admin-key";
    let log = std::fs::File::create(dir.path().join("own-server.log")).unwrap();
    let server = Command::new(bin)
        .args(["serve", "--config"])
        .arg(dir.path().join("serve.toml"))
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--model-root"])
        .arg(dir.path())
        .env("FUSECHAT_ADMIN_KEY", key)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut server = KillOnDrop(server);
    let ready = Instant::now() + Duration::from_secs(600);
    while !http_get(port, "/ready").starts_with("HTTP/1.1 200") {
        assert!(Instant::now() < ready, "our server never became ready");
        assert!(server.0.try_wait().unwrap().is_none(), "our server exited");
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = Command::new(bin)
        .args(["fuse", "--config"])
        .arg(&config)
        .env("FUSECHAT_ADMIN_KEY", key)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fuse failed:\n{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let printed: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        printed,
        vec![
            run.join("report.md").to_str().unwrap(),
            run.join("report.json").to_str().unwrap(),
            run.join("fused").to_str().unwrap()
        ],
        "{err}"
    );
    assert!(err.contains("math accuracy base"), "no one-line result:\n{err}");
    assert!(err.contains("using the server already running"), "{err}");

    let report: Value =
        serde_json::from_slice(&std::fs::read(run.join("report.json")).unwrap()).unwrap();
    let stages = report["stages"].as_array().unwrap();
    let note = |name: &str| {
        stages
            .iter()
            .find(|s| s["stage"] == name)
            .unwrap_or_else(|| panic!("no stage {name}: {report}"))["note"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(
        note("sample").starts_with("0 requested"),
        "the rerun sampled again: {}",
        note("sample")
    );
    // Base, fused and the other source were evaluated on the same prompts.
    for row in ["base target", "fused target", "qwen2.5-coder-0.5b-instruct"] {
        let cell = &report["results"][row]["math"];
        assert_eq!(cell["n"], 2, "{row}: {cell}");
        let (lo, hi) = (cell["ci_low"].as_f64().unwrap(), cell["ci_high"].as_f64().unwrap());
        assert!(0.0 <= lo && lo <= hi && hi <= 1.0, "{row}: {cell}");
    }
    assert!(report["results"].get("smollm2-135m-instruct").is_none(), "the base target is evaluated once");
    let fused = &report["fused_model"];
    let fused_id = fused["id"].as_str().unwrap();
    assert!(fused_id.starts_with("smollm2-135m-instruct-fused-"), "{fused}");
    assert_eq!(fused["alias"], "target");
    assert!(!fused["system_fingerprint"].as_str().unwrap().is_empty());
    // The fused folder is a checkpoint of the training run that ran last.
    assert_eq!(report["data"]["dpo_pairs"], 0);
    assert!(note("dpo").contains("no DPO pairs"), "{}", note("dpo"));
    assert_eq!(
        std::fs::read(run.join("fused/model.safetensors")).unwrap(),
        std::fs::read(run.join("sft/final/model.safetensors")).unwrap()
    );
    let sft_steps = report["training"]["sft"]["steps"].as_u64().unwrap();
    assert_eq!(sft_steps, 2);
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(run.join("fused").join(f).is_file(), "fused/{f} is missing");
    }
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(md.contains("| base target |") && md.contains("| fused target |"), "{md}");
    assert!(run.join("config/data.toml").is_file() && run.join("config/eval.toml").is_file());
    // The fused model stays in serving under its alias on the server we
    // kept, and answers as itself.
    let listed = http_get(port, "/v1/models");
    let body: Value = serde_json::from_str(listed.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let alias = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "target")
        .unwrap_or_else(|| panic!("no alias `target` in {body}"));
    assert_eq!(alias["alias_of"], fused_id);
    let answer = http_post(
        port,
        "/v1/chat/completions",
        r#"{"model":"target","messages":[{"role":"user","content":"What is 2 + 3?"}],"max_tokens":8,"temperature":0}"#,
    );
    let answer: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(answer["model"], fused_id, "{answer}");
    assert_eq!(answer["system_fingerprint"], fused["system_fingerprint"], "{answer}");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A minimal HTTP/1.1 exchange (the response with headers, as text).
fn http(port: u16, request: String) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn http_get(port: u16, path: &str) -> String {
    http(port, format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"))
}

fn http_post(port: u16, path: &str, body: &str) -> String {
    http(
        port,
        format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}
