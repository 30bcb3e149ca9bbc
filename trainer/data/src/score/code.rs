//! The code sandbox, shared with evaluation: run a response's Python function
//! against the task's tests in a subprocess with a wall-clock limit, a memory
//! limit (RLIMIT_AS), no network (`unshare -n` where the kernel allows it,
//! and an audit hook refusing sockets everywhere), no new processes (audit
//! hook, RLIMIT_NPROC, its own pid namespace, and its process group killed
//! on timeout), no files outside its scratch directory and the Python
//! install, and a scratch directory removed afterwards.
//!
//! Limits of this design: it is a guard against mistakes and careless model
//! output, not against code written to escape a Python process.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::CodeScoring;

const HARNESS: &str = include_str!("harness.py");

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CodeVerdict {
    pub passed: bool,
    /// `pass`, `wrong_answer`, `error`, `timeout`, `memory`, `blocked`,
    /// `no_code`, `no_function`, `no_tests`, `crash`, `sandbox_error`.
    pub reason: String,
    pub detail: String,
}

impl CodeVerdict {
    fn fail(reason: &str, detail: impl Into<String>) -> Self {
        CodeVerdict {
            passed: false,
            reason: reason.into(),
            detail: detail.into(),
        }
    }
}

/// What the machine allows, probed once.
#[derive(Debug, Clone)]
struct Caps {
    python: String,
    unshare: bool,
    drop_privileges: bool,
}

fn probe(python: &str) -> Caps {
    // The real interpreter, not a shim script (pyenv) that would fork.
    let exe = std::process::Command::new(python)
        .args(["-I", "-c", "import sys; print(sys.executable)"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| python.to_string());
    let unshare = std::process::Command::new("unshare")
        .args(["-n", "-p", "-f", "--kill-child", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    // Dropping root to nobody only works where nobody can read the install.
    let drop_privileges = unsafe { libc::geteuid() } == 0
        && std::process::Command::new(&exe)
            .args([
                "-I",
                "-c",
                "import os; os.setgroups([]); os.setgid(65534); os.setuid(65534); import json, re, collections, email",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    tracing::debug!("sandbox: python {exe}, unshare {unshare}, drop root {drop_privileges}");
    Caps {
        python: exe,
        unshare,
        drop_privileges,
    }
}

fn caps(python: &str) -> &'static Caps {
    static CAPS: OnceLock<Caps> = OnceLock::new();
    CAPS.get_or_init(|| probe(python))
}

/// Whether the sandbox runs without network through a network namespace.
pub fn has_network_namespace(python: &str) -> bool {
    caps(python).unshare
}

fn code_re(cell: &'static OnceLock<regex::Regex>, pat: &str) -> &'static regex::Regex {
    cell.get_or_init(|| regex::Regex::new(pat).expect("valid regex"))
}

/// A line that starts Python code in prose: `def f(`, `class C`,
/// `import x`, `from x import y`.
fn starts_code(line: &str) -> bool {
    static R: OnceLock<regex::Regex> = OnceLock::new();
    code_re(
        &R,
        r"^(?:def\s+\w+\s*\(|class\s+\w+\s*[(:]|from\s+\.*[\w.]+\s+import\s|import\s+[\w.]+(?:\s+as\s+\w+)?(?:\s*,\s*[\w.]+(?:\s+as\s+\w+)?)*\s*(?:#.*)?$)",
    )
    .is_match(line)
}

/// An unindented line that reads as Python rather than prose.
fn looks_like_code(line: &str) -> bool {
    static R: OnceLock<regex::Regex> = OnceLock::new();
    let statement = code_re(
        &R,
        r#"^(?:(?:def|class|import|from|return|if|elif|else|for|while|try|except|finally|with|assert|raise|pass|async|global|nonlocal|del|yield|break|continue)\b|[@#)\]}'"]|print\s*\(|[A-Za-z_][\w.]*(?:\s*,\s*[A-Za-z_][\w.]*)*\s*(?:[-+*/%&|^]|//|\*\*|>>|<<)?=[^=]|[A-Za-z_][\w.]*\s*[(\[]|[A-Za-z_]\w*\s*:\s*[\w\[\].,\s]+=)"#,
    );
    starts_code(line) || statement.is_match(line)
}

/// Top-level statements only define things: functions, classes, imports,
/// decorators, UPPER_CASE constants (and comments, blank and indented
/// lines). Such a block is a helper; one that calls or prints is usage.
fn only_definitions(block: &str) -> bool {
    static R: OnceLock<regex::Regex> = OnceLock::new();
    let constant = code_re(&R, r"^[A-Z_][A-Z0-9_]*\s*(?::[^=]+)?=[^=]");
    let mut any = false;
    for line in block.lines() {
        if line.trim().is_empty() || line.starts_with([' ', '\t', '#', ')', ']', '}']) {
            continue;
        }
        if starts_code(line) || line.starts_with('@') || constant.is_match(line) {
            any = true;
            continue;
        }
        return false;
    }
    any
}

/// Code in a response without fences: from its first `def`/`class`/
/// `import`/`from` line, up to the first unindented line of prose after
/// it (outside triple-quoted strings).
fn unfenced_code(response: &str) -> Option<String> {
    let lines: Vec<&str> = response.lines().collect();
    let start = lines.iter().position(|l| starts_code(l))?;
    let mut end = lines.len();
    let mut in_string = false;
    for (i, line) in lines.iter().enumerate().skip(start) {
        let quotes = line.matches("\"\"\"").count() + line.matches("'''").count();
        let was_in_string = in_string;
        if quotes % 2 == 1 {
            in_string = !in_string;
        }
        if was_in_string
            || line.trim().is_empty()
            || line.starts_with([' ', '\t'])
            || looks_like_code(line)
        {
            continue;
        }
        end = i;
        break;
    }
    let mut code = lines[start..end].join("\n");
    code.push('\n');
    Some(code)
}

/// The Python code of a response. Fenced (```python or unlabelled) blocks:
/// every block that defines `entry_point`, joined in order with the blocks
/// that only define things (imports and helpers in their own blocks),
/// leaving out usage blocks; where no block defines `entry_point`, the
/// first non-empty block. No fences: the text from its first
/// `def`/`class`/`import`/`from` line (not the prose before it) up to the
/// prose after it, when it defines the function.
pub fn extract_code(response: &str, entry_point: Option<&str>) -> Option<String> {
    let mut blocks = Vec::new();
    let mut rest = response;
    while let Some(start) = rest.find("```") {
        let after = &rest[start + 3..];
        let body_start = after.find('\n').map(|i| i + 1).unwrap_or(after.len());
        let lang = after[..body_start].trim().to_lowercase();
        let body = &after[body_start..];
        let (code, next) = match body.find("```") {
            Some(end) => (&body[..end], &body[end + 3..]),
            None => (body, ""), // cut by the length limit: keep what is there
        };
        if lang.is_empty() || lang.starts_with("python") || lang == "py" || lang == "python3" {
            blocks.push(code.to_string());
        }
        rest = next;
        if next.is_empty() {
            break;
        }
    }
    let defines = |c: &str| {
        entry_point
            .is_some_and(|e| c.contains(&format!("def {e}(")) || c.contains(&format!("def {e} (")))
    };
    if blocks.iter().any(|b| defines(b)) {
        let parts: Vec<&str> = blocks
            .iter()
            .filter(|b| defines(b) || only_definitions(b))
            .map(|b| b.as_str())
            .collect();
        if let [one] = parts[..] {
            return Some(one.to_string());
        }
        let mut code = String::new();
        for p in parts {
            code.push_str(p);
            if !code.ends_with('\n') {
                code.push('\n');
            }
            code.push('\n');
        }
        return Some(code);
    }
    if let Some(b) = blocks.into_iter().find(|b| !b.trim().is_empty()) {
        return Some(b);
    }
    if defines(response) || (entry_point.is_none() && response.contains("def ")) {
        return unfenced_code(response).or_else(|| Some(response.to_string()));
    }
    None
}

/// Everything `r` yields until its end, keeping only the last `cap` bytes:
/// the pipe is drained, never closed early, so a writer is neither blocked
/// nor cut off (EPIPE) however much it writes.
async fn read_tail<R: tokio::io::AsyncRead + Unpin>(mut r: R, cap: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 2 * cap {
                    buf.drain(..buf.len() - cap);
                }
            }
        }
    }
    if buf.len() > cap {
        buf.drain(..buf.len() - cap);
    }
    buf
}

#[derive(Debug, Clone)]
pub struct Sandbox {
    pub python: String,
    pub timeout: Duration,
    pub memory_mb: u64,
    /// Where scratch directories are made (default: the system temp dir).
    pub scratch_parent: Option<PathBuf>,
    /// How many MBPP+ `plus_input`s to run besides `base_input`.
    pub plus_inputs: usize,
}

impl Sandbox {
    /// A sandbox for `c`. A `timeout_s` that is not a positive number of
    /// seconds (which [`CodeScoring::validate`] refuses) falls back to the
    /// default 10 s instead of panicking.
    pub fn new(c: &CodeScoring) -> Self {
        let timeout = crate::config::seconds("scoring.code.timeout_s", c.timeout_s, false)
            .unwrap_or_else(|e| {
                tracing::warn!("{e:#}; using {}s", CodeScoring::default().timeout_s);
                Duration::from_secs_f64(CodeScoring::default().timeout_s)
            });
        Sandbox {
            python: c.python.clone(),
            timeout,
            memory_mb: c.memory_mb,
            scratch_parent: None,
            plus_inputs: c.plus_inputs,
        }
    }

    /// Score a response against a task (`entry_point`, `canonical_solution`,
    /// `base_input`, `plus_input`, `atol`, `test`, all optional).
    pub async fn check_response(&self, response: &str, task: &Value) -> CodeVerdict {
        let entry = task.get("entry_point").and_then(Value::as_str);
        match extract_code(response, entry) {
            Some(code) => self.run(&code, task).await,
            None => CodeVerdict::fail("no_code", "no Python code block in the response"),
        }
    }

    /// Run `code` against `task` in a fresh sandbox.
    pub async fn run(&self, code: &str, task: &Value) -> CodeVerdict {
        match self.run_inner(code, task).await {
            Ok(v) => v,
            Err(e) => CodeVerdict::fail("sandbox_error", format!("{e:#}")),
        }
    }

    async fn run_inner(&self, code: &str, task: &Value) -> crate::error::Result<CodeVerdict> {
        let caps = caps(&self.python).clone();
        let parent = self
            .scratch_parent
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        let scratch = tempfile::Builder::new()
            .prefix("fusechat-sbx-")
            .tempdir_in(&parent)?;
        let dir = scratch.path().to_path_buf();
        if caps.drop_privileges {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
        }
        let mut inputs: Vec<Value> = task
            .get("base_input")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let Some(plus) = task.get("plus_input").and_then(Value::as_array) {
            inputs.extend(plus.iter().take(self.plus_inputs).cloned());
        }
        let spec = json!({
            "code": code,
            "entry_point": task.get("entry_point"),
            "canonical_solution": task.get("canonical_solution"),
            "inputs": inputs,
            "atol": task.get("atol"),
            "test": task.get("test"),
            "memory_bytes": self.memory_mb * 1024 * 1024,
            "cpu_s": self.timeout.as_secs_f64().ceil() as u64 + 1,
            "drop_privileges": caps.drop_privileges,
        });
        std::fs::write(dir.join("task.json"), spec.to_string())?;
        std::fs::write(dir.join("harness.py"), HARNESS)?;

        let mut cmd = harness_command(&caps, &dir);
        let mut child = cmd
            .spawn()
            .map_err(|e| crate::error::DataError::Stage(format!("starting {}: {e}", caps.python)))?;
        let pid = child.id().map(|p| p as i32);
        let nonce = format!("@@fusechat-{}@@", hex::encode(rand::random::<[u8; 12]>()));
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(format!("{nonce}\n").as_bytes()).await;
        }
        // Both pipes are drained to their end; the result line is the last
        // of stdout, the error the end of stderr.
        let read_out = read_tail(child.stdout.take().unwrap(), 1 << 20);
        let read_err = read_tail(child.stderr.take().unwrap(), 1 << 16);
        let run = async { tokio::join!(read_out, read_err, child.wait()) };
        let result = tokio::time::timeout(self.timeout, run).await;
        let kill_group = || {
            if let Some(pid) = pid {
                unsafe {
                    libc::killpg(pid, libc::SIGKILL);
                }
            }
        };
        let verdict = match result {
            Err(_) => {
                kill_group();
                CodeVerdict::fail(
                    "timeout",
                    format!("killed after {:.1}s", self.timeout.as_secs_f64()),
                )
            }
            Ok((out, err, status)) => {
                kill_group(); // anything the code left behind in its group
                verdict_of(&out, &err, status, &nonce)
            }
        };
        let _ = child.kill().await;
        drop(child);
        // Remove the scratch directory; report when that fails.
        if let Err(e) = scratch.close() {
            tracing::warn!("sandbox: removing {}: {e}", dir.display());
        }
        Ok(verdict)
    }
}

/// The harness's process: isolated Python in the scratch folder, in a
/// process group of its own, without network or other processes where
/// `unshare` works.
fn harness_command(caps: &Caps, dir: &Path) -> tokio::process::Command {
    let mut cmd = if caps.unshare {
        let mut c = tokio::process::Command::new("unshare");
        c.args(["-n", "-p", "-f", "--kill-child", "--"])
            .arg(&caps.python);
        c
    } else {
        tokio::process::Command::new(&caps.python)
    };
    cmd.args(["-I", "-B", "harness.py"])
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", dir)
        .env("TMPDIR", dir)
        .env("LANG", "C.UTF-8")
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("OMP_NUM_THREADS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd.as_std_mut().process_group(0);
    cmd
}

/// The harness's result line (the last stdout line after the nonce), or
/// why the process ended without one.
fn verdict_of(out: &[u8], err: &[u8], status: std::io::Result<std::process::ExitStatus>, nonce: &str) -> CodeVerdict {
    let out = String::from_utf8_lossy(out);
    let line = out.lines().rev().find_map(|l| l.strip_prefix(nonce));
    if let Some(v) = line.and_then(|l| serde_json::from_str::<Value>(l).ok()) {
        return CodeVerdict {
            passed: v["passed"].as_bool().unwrap_or(false),
            reason: v["reason"].as_str().unwrap_or("crash").to_string(),
            detail: v["detail"].as_str().unwrap_or("").to_string(),
        };
    }
    let err = String::from_utf8_lossy(err);
    let tail: String = err
        .lines()
        .rev()
        .take(5)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    let tail = match tail.char_indices().rev().nth(2000) {
        Some((i, _)) => format!("…{}", &tail[i..]),
        None => tail,
    };
    let status = match status {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    };
    let reason = if tail.contains("MemoryError") {
        "memory"
    } else {
        "crash"
    };
    CodeVerdict::fail(
        reason,
        format!("the process ended without a result ({status}): {tail}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(parent: &std::path::Path, timeout_s: f64) -> Sandbox {
        Sandbox {
            python: "python3".into(),
            timeout: Duration::from_secs_f64(timeout_s),
            memory_mb: 256,
            scratch_parent: Some(parent.to_path_buf()),
            plus_inputs: 0,
        }
    }

    fn add_task() -> Value {
        json!({
            "entry_point": "add",
            "canonical_solution": "def add(a, b):\n    return a + b\n",
            "base_input": [[1, 2], [3, 4], [-1, 1]],
            "test": "assert add(2, 2) == 4",
        })
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn empty(dir: &std::path::Path) -> bool {
        std::fs::read_dir(dir).unwrap().next().is_none()
    }

    #[test]
    fn extraction() {
        let r = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nUsage:\n```python\nprint(add(1,2))\n```";
        assert_eq!(
            extract_code(r, Some("add")).unwrap(),
            "def add(a, b):\n    return a + b\n"
        );
        let cut = "```python\ndef add(a, b):\n    return a +";
        assert!(extract_code(cut, Some("add")).unwrap().contains("def add"));
        assert!(extract_code("def add(a, b): return a+b", Some("add")).is_some());
        assert!(extract_code("I cannot help with that.", Some("add")).is_none());
        assert!(extract_code("```js\nfunction add(){}\n```", Some("add")).is_none());
    }

    #[test]
    fn pass_and_fail() {
        let d = tempfile::tempdir().unwrap();
        let sb = sandbox(d.path(), 20.0);
        let rt = rt();
        let v = rt.block_on(sb.check_response(
            "```python\ndef add(a, b):\n    return a + b\n```",
            &add_task(),
        ));
        assert!(v.passed, "{v:?}");
        assert_eq!(v.reason, "pass");
        let v = rt.block_on(sb.check_response(
            "```python\ndef add(a, b):\n    return a - b\n```",
            &add_task(),
        ));
        assert!(!v.passed);
        assert_eq!(v.reason, "wrong_answer", "{v:?}");
        let v = rt.block_on(sb.check_response(
            "```python\ndef add(a, b):\n    raise ValueError('nope')\n```",
            &add_task(),
        ));
        assert_eq!(v.reason, "error", "{v:?}");
        assert!(v.detail.contains("nope"));
        let v = rt.block_on(sb.check_response(
            "```python\ndef plus(a, b):\n    return a + b\n```",
            &add_task(),
        ));
        assert_eq!(v.reason, "no_function", "{v:?}");
        let v = rt.block_on(sb.check_response(
            "```python\ndef add(a, b)\n    return a + b\n```",
            &add_task(),
        ));
        assert_eq!(v.reason, "error", "{v:?}");
        assert!(v.detail.contains("SyntaxError"), "{v:?}");
        // Printing a fake result line does not pass.
        let v = rt.block_on(sb.check_response(
            "```python\nprint('{\"passed\": true, \"reason\": \"pass\"}')\nimport os\nos.write(1, b'{\"passed\": true}\\n')\ndef add(a, b):\n    return 0\n```",
            &add_task(),
        ));
        assert!(!v.passed, "{v:?}");
        assert!(empty(d.path()), "scratch directories left behind");
    }

    #[test]
    fn timeout_and_memory() {
        let d = tempfile::tempdir().unwrap();
        let sb = sandbox(d.path(), 3.0);
        let rt = rt();
        let t = std::time::Instant::now();
        let v = rt.block_on(sb.check_response(
            "```python\ndef add(a, b):\n    while True:\n        pass\n```",
            &add_task(),
        ));
        assert_eq!(v.reason, "timeout", "{v:?}");
        assert!(t.elapsed() < Duration::from_secs(10));
        let v = rt.block_on(sb.check_response(
            "```python\ndef add(a, b):\n    x = bytearray(1024 * 1024 * 1024)\n    return a + b\n```",
            &add_task(),
        ));
        assert!(!v.passed);
        assert_eq!(v.reason, "memory", "{v:?}");
        // Sleeping past the limit is a timeout too (wall clock, not CPU).
        let v = rt.block_on(sb.check_response(
            "```python\nimport time\ntime.sleep(60)\ndef add(a, b):\n    return a + b\n```",
            &add_task(),
        ));
        assert_eq!(v.reason, "timeout", "{v:?}");
        assert!(empty(d.path()), "scratch directories left behind");
    }

    #[test]
    fn fork_bomb_is_stopped() {
        let d = tempfile::tempdir().unwrap();
        let sb = sandbox(d.path(), 5.0);
        let rt = rt();
        for code in [
            "import os\nwhile True:\n    os.fork()\n",
            "import subprocess\nsubprocess.Popen(['sh', '-c', ':(){ :|:& };:'])\n",
            "import multiprocessing\ndef f():\n    while True: pass\nfor _ in range(100):\n    multiprocessing.Process(target=f).start()\n",
            "import os\nos.system('sleep 100 &')\n",
        ] {
            let t = std::time::Instant::now();
            let v = rt.block_on(sb.check_response(&format!("```python\n{code}\ndef add(a, b):\n    return a + b\n```"), &add_task()));
            assert!(!v.passed, "{code}: {v:?}");
            assert!(t.elapsed() < Duration::from_secs(15), "{code}");
        }
        // Nothing of it survives: no process named after the bomb's sleep.
        let ps = std::process::Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .unwrap();
        assert!(!String::from_utf8_lossy(&ps.stdout)
            .lines()
            .any(|l| l.trim() == "sleep 100"));
        assert!(empty(d.path()));
    }

    #[test]
    fn files_outside_the_scratch_directory_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let secret_dir = tempfile::tempdir().unwrap();
        let secret = secret_dir.path().join("secret.txt");
        std::fs::write(&secret, "hunter2").unwrap();
        let sb = sandbox(d.path(), 10.0);
        let rt = rt();
        let read = format!(
            "```python\ndef add(a, b):\n    return len(open({:?}).read()) * 0 + a + b\n```",
            secret.to_str().unwrap()
        );
        let v = rt.block_on(sb.check_response(&read, &add_task()));
        assert!(!v.passed, "{v:?}");
        assert_eq!(v.reason, "blocked", "{v:?}");
        for path in ["/etc/passwd", "/etc/hostname"] {
            let code =
                format!("```python\nopen({path:?}).read()\ndef add(a, b):\n    return a + b\n```");
            let v = rt.block_on(sb.check_response(&code, &add_task()));
            assert_eq!(v.reason, "blocked", "{path}: {v:?}");
        }
        let write = format!(
            "```python\nopen({:?}, 'w').write('x')\ndef add(a, b):\n    return a + b\n```",
            secret_dir.path().join("new.txt").to_str().unwrap()
        );
        let v = rt.block_on(sb.check_response(&write, &add_task()));
        assert_eq!(v.reason, "blocked", "{v:?}");
        assert!(!secret_dir.path().join("new.txt").exists());
        // Its own scratch directory is usable.
        let v = rt.block_on(sb.check_response(
            "```python\nopen('note.txt', 'w').write('ok')\nassert open('note.txt').read() == 'ok'\ndef add(a, b):\n    return a + b\n```",
            &add_task(),
        ));
        assert!(v.passed, "{v:?}");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "hunter2");
        assert!(empty(d.path()));
    }

    #[test]
    fn sockets_are_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let d = tempfile::tempdir().unwrap();
        let sb = sandbox(d.path(), 10.0);
        let rt = rt();
        let code = format!(
            "```python\nimport socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.send(b'hi')\ndef add(a, b):\n    return a + b\n```"
        );
        let v = rt.block_on(sb.check_response(&code, &add_task()));
        assert!(!v.passed, "{v:?}");
        assert_eq!(v.reason, "blocked", "{v:?}");
        let code = format!(
            "```python\nimport urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/')\ndef add(a, b):\n    return a + b\n```"
        );
        let v = rt.block_on(sb.check_response(&code, &add_task()));
        assert!(!v.passed, "{v:?}");
        assert!(
            listener.accept().is_err(),
            "the sandbox reached the listener"
        );
    }

    #[test]
    fn mbpp_plus_task_from_the_real_data() {
        let path = crate::config::Config::load(None)
            .unwrap()
            .data_dir()
            .join("code/mbpp_plus.jsonl");
        let line = std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .to_string();
        let row: Value = serde_json::from_str(&line).unwrap();
        let task = json!({
            "entry_point": row["entry_point"],
            "canonical_solution": row["canonical_solution"],
            "base_input": row["base_input"],
            "plus_input": row["plus_input"],
            "atol": row["atol"],
            "test": "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
        });
        let d = tempfile::tempdir().unwrap();
        let mut sb = sandbox(d.path(), 20.0);
        sb.plus_inputs = 10;
        let rt = rt();
        let good = "```python\ndef similar_elements(a, b):\n    return tuple(set(a) & set(b))\n```";
        let v = rt.block_on(sb.check_response(good, &task));
        assert!(v.passed, "{v:?}");
        let bad = "```python\ndef similar_elements(a, b):\n    return list(set(a) & set(b))\n```";
        let v = rt.block_on(sb.check_response(bad, &task));
        assert!(!v.passed, "{v:?}");
    }

    #[test]
    fn extraction_without_fences_and_across_blocks() {
        // No fence: the code starts at its first def/import/from line, not at the prose.
        let r = "Sure! Here is the function you asked for.\nimport math\n\ndef add(a, b):\n    return a + b\n";
        assert_eq!(
            extract_code(r, Some("add")).unwrap(),
            "import math\n\ndef add(a, b):\n    return a + b\n"
        );
        let r = "The function below adds: it returns the sum.\nfrom operator import add as plus\ndef add(a, b):\n    return plus(a, b)";
        assert!(extract_code(r, Some("add"))
            .unwrap()
            .starts_with("from operator"));
        let r = "Here it is:\ndef add(a, b):\n    return a + b\n\nThis function returns the sum of a and b.";
        assert_eq!(
            extract_code(r, Some("add")).unwrap().trim_end(),
            "def add(a, b):\n    return a + b"
        );
        // Imports and helpers in their own blocks are joined with the function.
        let r = "First the import:\n```python\nimport math\n```\nA helper:\n```python\ndef half(x):\n    return x / 2\n```\nThen:\n```python\ndef f(x):\n    return math.floor(half(x))\n```\nUsage:\n```python\nprint(f(3))\n```";
        let code = extract_code(r, Some("f")).unwrap();
        assert!(
            code.contains("import math") && code.contains("def half") && code.contains("def f"),
            "{code}"
        );
        assert!(!code.contains("print(f(3))"), "{code}");
        assert!(code.find("import math") < code.find("def f"));
    }

    #[test]
    fn helpers_in_other_blocks_and_prose_around_unfenced_code_run() {
        let d = tempfile::tempdir().unwrap();
        let sb = sandbox(d.path(), 20.0);
        let rt = rt();
        let v = rt.block_on(sb.check_response(
            "```python\nimport operator\n```\n\n```python\ndef add(a, b):\n    return operator.add(a, b)\n```",
            &add_task(),
        ));
        assert!(v.passed, "{v:?}");
        let v = rt.block_on(sb.check_response(
            "Here is my solution, it simply adds the two numbers.\ndef add(a, b):\n    return a + b\n",
            &add_task(),
        ));
        assert!(v.passed, "{v:?}");
        assert!(empty(d.path()));
    }

    #[test]
    fn a_flood_on_stderr_is_drained() {
        let d = tempfile::tempdir().unwrap();
        let sb = sandbox(d.path(), 20.0);
        let rt = rt();
        // More than the 64 KiB kept and more than a pipe's buffer: the
        // writer must not be cut off (BrokenPipeError) or blocked.
        let v = rt.block_on(sb.check_response(
            "```python\nimport sys\nfor _ in range(40):\n    sys.stderr.write('x' * 10000 + '\\n')\nsys.stderr.flush()\ndef add(a, b):\n    return a + b\n```",
            &add_task(),
        ));
        assert!(v.passed, "{v:?}");
        // A crash after a flood still reports the end of stderr.
        let v = rt.block_on(sb.run(
            "import os\nos.write(2, b'y' * 300000 + b'\\nTHE-LAST-LINE\\n')\nos._exit(7)\n",
            &add_task(),
        ));
        assert_eq!(v.reason, "crash", "{v:?}");
        assert!(v.detail.contains("THE-LAST-LINE"), "{v:?}");
        assert!(empty(d.path()));
    }
}
