//! On the real server: `fusechat serve` with SmolLM2-135M-Instruct alone,
//! then `fusechat eval` on 5 evaluation-side math prompts (GSM8K, MAWPS),
//! greedy, short answers: the report files exist, the numbers are in range
//! and consistent, and a second run sends no request.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin() -> PathBuf {
    let bin = std::env::var_os("FUSECHAT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            exe.parent().unwrap().parent().unwrap().join("fusechat")
        });
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --release -p fusechat`",
        bin.display()
    );
    let help = Command::new(&bin).arg("--help").output().unwrap();
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("eval"),
        "{} has no `eval` subcommand: rebuild it with `cargo build --release -p fusechat`",
        bin.display()
    );
    bin
}

fn smollm2() -> PathBuf {
    let home = std::env::var_os("FUSECHAT_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/fusechat"));
    let p = home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run `fusechat models fetch`",
        p.display()
    );
    p
}

fn status(port: u16, path: &str) -> Option<u16> {
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
    String::from_utf8_lossy(&buf[..n])
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn serve(bin: &Path, dir: &Path) -> (Server, u16) {
    let cfg = dir.join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[models]]\nid = \"smollm2-135m-instruct\"\npath = \"{}\"\nmax_seqs = 8\nisq = \"q8_0\"\nfloat_layers = [\"q_proj\", \"down_proj\"]\n",
            smollm2().display()
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
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
        if let Some(st) = server.0.try_wait().unwrap() {
            panic!(
                "server exited with {st}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if status(port, "/ready") == Some(200) {
            return (server, port);
        }
        assert!(
            Instant::now() < deadline,
            "server not ready:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn eval_on_the_real_server_with_smollm2() {
    let bin = bin();
    let dir = tempfile::tempdir().unwrap();
    let (_server, port) = serve(&bin, dir.path());
    let data = fusechat_data::config_file::repository_configs().join("data-tiny.toml");
    let out = dir.path().join("eval");
    let cfg = dir.path().join("eval.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
data_config = "{}"
output = "{}"
max_tokens = 160
concurrency = 4
progress = false

[sizes]
gsm8k = 2
mawps = 3

[[models]]
name = "smollm2"
base_url = "http://127.0.0.1:{port}/v1"
model = "smollm2-135m-instruct"
"#,
            data.display(),
            out.display()
        ),
    )
    .unwrap();
    let t = Instant::now();
    let run = || {
        let o = Command::new(&bin)
            .args(["eval", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "fusechat eval failed:\n{err}");
        (String::from_utf8_lossy(&o.stdout).to_string(), err)
    };
    let (stdout, stderr) = run();
    eprintln!("first run: {:.1}s\n{stderr}", t.elapsed().as_secs_f64());
    assert!(
        stdout.contains("report.md") && stdout.contains("report.json"),
        "{stdout}"
    );
    assert!(stderr.contains("5 generation(s)"), "{stderr}");
    for f in [
        "report.md",
        "report.json",
        "report.svg",
        "samples.jsonl",
        "results.jsonl",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        v["benchmarks"],
        serde_json::json!(["gsm8k", "mawps", "math"])
    );
    for (b, n) in [("gsm8k", 2), ("mawps", 3), ("math", 5)] {
        let c = &v["results"]["smollm2"][b];
        assert_eq!(c["n"], n, "{b}: {c}");
        assert_eq!(c["failed"], 0, "{b}: {c}");
        let s = c["score"].as_f64().unwrap();
        let (lo, hi) = (
            c["ci_low"].as_f64().unwrap(),
            c["ci_high"].as_f64().unwrap(),
        );
        assert!((0.0..=1.0).contains(&s), "{b}: {c}");
        assert!(lo <= s && s <= hi && lo >= 0.0 && hi <= 1.0, "{b}: {c}");
        // Scores are k/n.
        assert!(
            ((s * n as f64) - (s * n as f64).round()).abs() < 1e-9,
            "{b}: {c}"
        );
    }
    // Every sample has a real response.
    let samples = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 5);
    for l in samples.lines() {
        let s: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(
            !s["response"].as_str().unwrap_or("").trim().is_empty(),
            "{s}"
        );
        assert!(
            s["prompt"].as_str().unwrap().starts_with("gsm8k/")
                || s["prompt"].as_str().unwrap().starts_with("mawps/")
        );
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| smollm2 |"), "{md}");
    // Again: nothing new is asked, the report is the same.
    let json1 = std::fs::read_to_string(out.join("report.json")).unwrap();
    let (_, stderr) = run();
    assert!(stderr.contains("0 generation(s)"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(out.join("report.json")).unwrap(),
        json1
    );
}
