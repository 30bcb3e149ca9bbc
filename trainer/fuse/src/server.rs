//! The server a run talks to: the one answering at `server.url`, or a
//! `fusechat serve` this run starts (loopback only, its admin routes rooted
//! at the run folder, a fresh admin key, stopped when the run ends or dies).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fusechat_admin_api::{AdminModels, ErrorBody, LoadModelRequest, LoadedModelInfo, UnloadedModel};
use serde::de::DeserializeOwned;

use crate::config::FuseConfig;
use crate::error::{io, FuseError, Result};

pub struct Server {
    pub url: String,
    admin_key: Option<String>,
    child: Option<Child>,
    http: reqwest::Client,
    /// Where a started server writes its log.
    pub log: Option<PathBuf>,
}

/// `(host, port)` of `http://HOST:PORT`.
fn host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    Some((host.to_string(), port.parse().ok()?))
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Server {
    fn client() -> Result<reqwest::Client> {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(1800))
            .build()
            .map_err(|e| FuseError::Server(format!("building the HTTP client: {e}")))
    }

    async fn get_ok(&self, path: &str) -> bool {
        matches!(
            self.http
                .get(format!("{}{path}", self.url))
                .timeout(Duration::from_secs(5))
                .send()
                .await,
            Ok(r) if r.status().is_success()
        )
    }

    /// Uses the server at `server.url`, or starts one there.
    pub async fn ensure(config: &FuseConfig, bin: &Path, run_dir: &Path) -> Result<Server> {
        let url = config.server_url();
        let mut server = Server {
            url: url.clone(),
            admin_key: None,
            child: None,
            http: Self::client()?,
            log: None,
        };
        if server.get_ok("/health").await {
            server.admin_key = std::env::var(&config.server.admin_key_env)
                .ok()
                .filter(|k| !k.is_empty());
            if server.admin_key.is_none() {
                eprintln!(
                    "fusechat fuse: warning: ${} is not set; the server's admin routes (needed for the hot-swap) take its admin key",
                    config.server.admin_key_env
                );
            }
            eprintln!("fusechat fuse: using the server already running at {url}");
        } else {
            if !config.server.start {
                return Err(FuseError::Server(format!(
                    "nothing answers at {url}/health and server.start is off: start `fusechat serve` there"
                )));
            }
            let Some((host, port)) = host_port(&url).filter(|(h, _)| is_loopback(h)) else {
                return Err(FuseError::Server(format!(
                    "nothing answers at {url}, and a server is only started on a loopback http://HOST:PORT"
                )));
            };
            let key = uuid::Uuid::new_v4().simple().to_string();
            let log_path = run_dir.join("server.log");
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(io(format!("opening {}", log_path.display())))?;
            let mut cmd = Command::new(bin);
            cmd.arg("serve");
            if let Some(c) = &config.server.config {
                cmd.arg("--config").arg(config.resolve(c));
            }
            cmd.args(["--host", &host, "--port", &port.to_string()])
                .arg("--model-root")
                .arg(run_dir)
                .env("FUSECHAT_ADMIN_KEY", &key)
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(io("the server log"))?)
                .stderr(log);
            #[cfg(target_os = "linux")]
            {
                use std::os::unix::process::CommandExt;
                let parent = std::process::id();
                // The server goes when this process goes, even on kill -9
                // (strictly: when the spawning thread ends; see `crate::run`).
                // SAFETY: prctl, getppid and _exit are async-signal-safe;
                // nothing else runs between fork and exec.
                unsafe {
                    cmd.pre_exec(move || {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                        // The parent died before prctl took effect.
                        if libc::getppid() as u32 != parent {
                            libc::_exit(1);
                        }
                        Ok(())
                    });
                }
            }
            let child = cmd
                .spawn()
                .map_err(io(format!("starting {} serve", bin.display())))?;
            eprintln!(
                "fusechat fuse: started `fusechat serve` on {url} (pid {}, log {})",
                child.id(),
                log_path.display()
            );
            server.child = Some(child);
            server.admin_key = Some(key);
            server.log = Some(log_path);
        }
        server
            .wait_ready(Duration::from_secs(config.server.ready_timeout_s))
            .await?;
        Ok(server)
    }

    async fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            if self.get_ok("/ready").await {
                return Ok(());
            }
            if let Some(child) = &mut self.child {
                if let Ok(Some(status)) = child.try_wait() {
                    let tail = self.log_tail();
                    return Err(FuseError::Server(format!(
                        "`fusechat serve` exited ({status}) before it was ready; its log ends:\n{tail}"
                    )));
                }
            }
            if started.elapsed() > limit {
                return Err(FuseError::Server(format!(
                    "{} not ready after {} s (models still loading?); raise server.ready_timeout_s{}",
                    self.url,
                    limit.as_secs(),
                    match &self.log {
                        Some(_) => format!(". Its log ends:\n{}", self.log_tail()),
                        None => String::new(),
                    }
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn log_tail(&self) -> String {
        let Some(p) = &self.log else { return String::new() };
        let text = std::fs::read_to_string(p).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn json<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder, what: &str) -> Result<T> {
        let req = match &self.admin_key {
            Some(k) => req.bearer_auth(k),
            None => req,
        };
        let resp = req
            .send()
            .await
            .map_err(|e| FuseError::Server(format!("{what}: {e}")))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| FuseError::Server(format!("{what}: reading the answer: {e}")))?;
        if !status.is_success() {
            return Err(FuseError::Http {
                what: what.to_string(),
                status: status.as_u16(),
                message: serde_json::from_slice::<ErrorBody>(&body)
                    .map(|b| b.error.message)
                    .unwrap_or_else(|_| "(no message)".to_string()),
            });
        }
        serde_json::from_slice(&body).map_err(|e| {
            FuseError::Server(format!("{what}: the answer is not what fusechat serve sends ({e}); is this a fusechat server of the same version?"))
        })
    }

    /// `GET /admin/models`: every model with its state, and every alias.
    pub async fn admin_models(&self) -> Result<AdminModels> {
        self.json(
            self.http.get(format!("{}/admin/models", self.url)),
            "listing the loaded models (GET /admin/models)",
        )
        .await
    }

    /// `POST /admin/models`.
    pub async fn load_model(&self, body: &LoadModelRequest) -> Result<LoadedModelInfo> {
        self.json(
            self.http.post(format!("{}/admin/models", self.url)).json(body),
            "loading a model (POST /admin/models)",
        )
        .await
    }

    /// `DELETE /admin/models/{id}`.
    pub async fn unload_model(&self, id: &str) -> Result<UnloadedModel> {
        self.json(
            self.http.delete(format!("{}/admin/models/{id}", self.url)),
            "unloading a model (DELETE /admin/models/{id})",
        )
        .await
    }

    /// Stops a server this run started (SIGTERM, then SIGKILL after 20 s).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn started_here(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port() {
        assert_eq!(host_port("http://127.0.0.1:8080"), Some(("127.0.0.1".into(), 8080)));
        assert_eq!(host_port("http://localhost:1/x"), Some(("localhost".into(), 1)));
        assert_eq!(host_port("https://h:1"), None);
        assert_eq!(host_port("http://h"), None);
        assert!(is_loopback("127.0.0.1") && is_loopback("localhost") && is_loopback("[::1]"));
        assert!(!is_loopback("0.0.0.0") && !is_loopback("10.0.0.1"));
    }
}
