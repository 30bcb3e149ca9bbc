//! End to end on the real models: `fusechat serve` with SmolLM2-135M and
//! Qwen2.5-Coder-0.5B, then `fusechat sample`, `score` and `pair` on a
//! handful of real math (MAWPS, GSM8K) and code (MBPP+) prompts, two samples
//! each, and the SFT and DPO files checked line by line.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fusechat_data::store::Store;
use serde_json::Value;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn models_dir() -> PathBuf {
    let home = std::env::var_os("FUSECHAT_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/fusechat"));
    home.join("models")
}

fn start_server(bin: &std::path::Path, dir: &std::path::Path) -> (Server, u16) {
    let models = models_dir();
    let smol = models.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let qwen = models.join("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
    for m in [&smol, &qwen] {
        assert!(
            m.exists(),
            "{} is missing: run `fusechat models fetch`",
            m.display()
        );
    }
    // Batched (the embedded config/serve.toml batches 8; mistralrs's batched
    // decode is patched: vendor/README.md).
    let cfg = dir.join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[[models]]
id = "smollm2-135m-instruct"
path = "{}"
max_seqs = 4
isq = "q8_0"
float_layers = ["q_proj", "down_proj"]

[[models]]
id = "qwen2.5-coder-0.5b-instruct"
path = "{}"
max_seqs = 4
"#,
            smol.display(),
            qwen.display()
        ),
    )
    .unwrap();
    let port = common::free_port();
    let log = dir.join("server.log");
    let child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::from(
            std::fs::File::options().append(true).open(&log).unwrap(),
        ))
        .spawn()
        .unwrap();
    let mut server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!(
                "server exited with {status}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if http_get_status(port, "/ready") == Some(200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server not ready:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = &mut server;
    (server, port)
}

fn http_get_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace().nth(1)?.parse().ok()
}

fn fusechat(bin: &std::path::Path, cmd: &str, cfg: &std::path::Path) {
    let out = Command::new(bin)
        .args([cmd, "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("fusechat {cmd}:\n{err}");
    assert!(out.status.success(), "fusechat {cmd} failed:\n{err}");
}

#[test]
fn real_models_sampled_scored_and_paired() {
    let bin = common::require_bin();
    let dir = tempfile::tempdir().unwrap();
    let (_server, port) = start_server(&bin, dir.path());
    let data_dir = fusechat_data::Config::load(None).unwrap().data_dir();
    let cfg = dir.path().join("data.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[run]
output = "out"
[prompts]
data_dir = "{data}"
[[pools]]
name = "mawps"
domain = "math"
format = "mawps"
file = "math/mawps.jsonl"
limit = 3
[[pools]]
name = "gsm8k"
domain = "math"
format = "gsm8k"
file = "math/gsm8k_test.jsonl"
limit = 2
[[pools]]
name = "mbpp_plus"
domain = "code"
format = "mbpp_plus"
file = "code/mbpp_plus.jsonl"
limit = 2
[[endpoints]]
name = "local"
base_url = "http://127.0.0.1:{port}/v1"
concurrency = 8
[[sources]]
id = "smollm2-135m-instruct"
endpoint = "local"
temperature = 0.8
top_p = 0.95
[[sources]]
id = "qwen2.5-coder-0.5b-instruct"
endpoint = "local"
temperature = 0.7
top_p = 0.8
repetition_penalty = 1.05
[sampling]
n = {{ math = 2, code = 2 }}
max_tokens = 160
seeded = true
progress = false
[pairing]
sft_fraction = 0.5
"#,
            data = data_dir.display()
        ),
    )
    .unwrap();
    fusechat(&bin, "sample", &cfg);
    fusechat(&bin, "score", &cfg);
    fusechat(&bin, "pair", &cfg);

    let out = dir.path().join("out");
    let store = Store::open(&out.join("store.sqlite")).unwrap();
    let samples = store.samples().unwrap();
    assert_eq!(samples.len(), 7 * 2 * 2);
    assert!(
        samples.iter().all(|s| s.ok),
        "{:?}",
        samples.iter().find(|s| !s.ok)
    );
    assert!(samples.iter().filter(|s| !s.text.trim().is_empty()).count() >= 24);
    let scores = store.scores().unwrap();
    for s in &samples {
        let recs = &scores[&(s.prompt_id.clone(), s.source.clone(), s.idx)];
        let want = if s.prompt_id.starts_with("mbpp") {
            "code"
        } else {
            "math"
        };
        assert!(
            recs.iter().any(|r| r.scorer == want && r.passed.is_some()),
            "{} not scored",
            s.prompt_id
        );
    }
    let passed = scores
        .values()
        .flatten()
        .filter(|r| r.passed == Some(true))
        .count();
    eprintln!("{passed} of {} responses correct", samples.len());

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let sft = std::fs::read_to_string(out.join("sft.jsonl")).unwrap();
    let dpo = std::fs::read_to_string(out.join("dpo.jsonl")).unwrap();
    let sources = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"];
    for line in sft.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let m = v["messages"].as_array().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0]["role"].as_str(), m[1]["role"].as_str()),
            (Some("user"), Some("assistant"))
        );
        assert!(!m[1]["content"].as_str().unwrap().trim().is_empty());
        assert_eq!(
            v["metadata"]["scores"]["passed"], true,
            "SFT rows are correct responses"
        );
        assert!(sources.contains(&v["metadata"]["source"].as_str().unwrap()));
    }
    for line in dpo.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["prompt"][0]["role"], "user");
        assert_eq!(v["chosen"][0]["role"], "assistant");
        assert_eq!(v["rejected"][0]["role"], "assistant");
        assert_ne!(v["chosen"][0]["content"], v["rejected"][0]["content"]);
        assert_eq!(v["metadata"]["scores"]["chosen"]["passed"], true);
        assert_eq!(v["metadata"]["scores"]["rejected"]["passed"], false);
        assert!(sources.contains(&v["metadata"]["source"].as_str().unwrap()));
    }
    let rows = sft.lines().count() + dpo.lines().count();
    eprintln!("report: {report:#}");
    assert_eq!(
        report["sft_rows"].as_u64().unwrap() as usize,
        sft.lines().count()
    );
    assert_eq!(
        report["dpo_pairs"].as_u64().unwrap() as usize,
        dpo.lines().count()
    );
    assert!(
        rows >= 1,
        "no SFT row and no DPO pair from {passed} correct responses:\n{report:#}"
    );
    assert!(out.join("report.svg").exists() && out.join("report.md").exists());
}
