//! The resumable per-sample log, `results.jsonl` in the output folder: one
//! JSON line per generation, sandbox run and judge call, keyed by a hash of
//! everything that determines it (endpoint, model id, prompt text,
//! max_tokens; the response and sandbox limits; the judge, the pair shown
//! and the order). A rerun with the same config finds every key and sends
//! no request; after kill -9 it redoes only what had not been written. A
//! line cut by a kill is skipped on reading, and the next record starts on
//! a fresh line.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{EvalError, Result};
use crate::judge::{Order, Verdict, VerdictProbs};

/// One line of `results.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A model's greedy response to a prompt (`ok: false`: the request failed).
    Gen {
        key: String,
        model: String,
        prompt: String,
        ok: bool,
        response: Option<String>,
        finish_reason: Option<String>,
        completion_tokens: Option<u64>,
        error: Option<String>,
    },
    /// A response's code run against MBPP+ `base` or `plus` tests.
    Code {
        key: String,
        model: String,
        prompt: String,
        tests: String,
        passed: bool,
        reason: String,
        detail: String,
    },
    /// One judge call: `verdict` about the outputs as shown in `order`, and
    /// the judge's probabilities at it when it returned logprobs; `error`
    /// when the request failed, `reply` without a verdict when the judge
    /// answered something unreadable.
    Judge {
        key: String,
        model: String,
        prompt: String,
        order: Order,
        verdict: Option<Verdict>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        probs: Option<VerdictProbs>,
        reply: Option<String>,
        error: Option<String>,
    },
}

impl Record {
    pub fn key(&self) -> &str {
        match self {
            Record::Gen { key, .. } | Record::Code { key, .. } | Record::Judge { key, .. } => key,
        }
    }
}

/// A stable key: sha256 of the canonical JSON of what determines a result.
pub fn key_of(kind: &str, parts: &Value) -> String {
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(parts.to_string().as_bytes());
    hex::encode(&h.finalize()[..16])
}

pub struct Store {
    path: PathBuf,
    file: Mutex<File>,
    records: Mutex<HashMap<String, Record>>,
    /// Lines that could not be read (a line cut by a kill).
    pub skipped_lines: usize,
}

impl Store {
    /// The record under `key` when `reuse` accepts it; else what `compute`
    /// makes, recorded when it says so (a result that is no verdict, such as
    /// a broken sandbox, is not kept and is made again next run).
    pub async fn reuse_or<F, Fut>(
        &self,
        key: &str,
        reuse: impl FnOnce(&Record) -> bool,
        compute: F,
    ) -> Result<Record>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(Record, bool)>>,
    {
        if let Some(r) = self.get(key) {
            if reuse(&r) {
                return Ok(r);
            }
        }
        let (r, keep) = compute().await?;
        if keep {
            self.put(r.clone())?;
        }
        Ok(r)
    }

    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| EvalError::io(format!("creating {}", dir.display()), e))?;
        }
        let mut records = HashMap::new();
        let mut skipped = 0;
        if path.exists() {
            let f = File::open(path)
                .map_err(|e| EvalError::io(format!("opening {}", path.display()), e))?;
            for line in BufReader::new(f).lines() {
                let line =
                    line.map_err(|e| EvalError::io(format!("reading {}", path.display()), e))?;
                if line.trim().is_empty() {
                    continue;
                }
                match serde_json::from_str::<Record>(&line) {
                    Ok(r) => {
                        records.insert(r.key().to_string(), r);
                    }
                    Err(_) => skipped += 1,
                }
            }
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .map_err(|e| EvalError::io(format!("opening {}", path.display()), e))?;
        // A kill in the middle of a line: start the next record on a new line.
        let len = file
            .metadata()
            .map_err(|e| EvalError::io(format!("reading {}", path.display()), e))?
            .len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))
                .and_then(|_| file.read_exact(&mut last))
                .map_err(|e| EvalError::io(format!("reading {}", path.display()), e))?;
            if last[0] != b'\n' {
                file.write_all(b"\n")
                    .map_err(|e| EvalError::io(format!("writing {}", path.display()), e))?;
            }
        }
        if skipped > 0 {
            tracing::warn!(
                "{}: skipped {skipped} unreadable line(s) (a run killed mid-write); their work is redone",
                path.display()
            );
        }
        Ok(Store {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            records: Mutex::new(records),
            skipped_lines: skipped,
        })
    }

    pub fn get(&self, key: &str) -> Option<Record> {
        self.records.lock().unwrap().get(key).cloned()
    }

    pub fn len(&self) -> usize {
        self.records.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append a record (one write of one whole line) and remember it.
    pub fn put(&self, r: Record) -> Result<()> {
        let mut line = serde_json::to_string(&r).expect("records serialize");
        line.push('\n');
        {
            let mut f = self.file.lock().unwrap();
            f.write_all(line.as_bytes())
                .and_then(|_| f.flush())
                .map_err(|e| EvalError::io(format!("writing {}", self.path.display()), e))?;
        }
        self.records.lock().unwrap().insert(r.key().to_string(), r);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(key: &str) -> Record {
        Record::Gen {
            key: key.into(),
            model: "m".into(),
            prompt: "p".into(),
            ok: true,
            response: Some("The answer is 3".into()),
            finish_reason: Some("stop".into()),
            completion_tokens: Some(4),
            error: None,
        }
    }

    #[test]
    fn reopen_keeps_records_and_survives_a_cut_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.jsonl");
        let s = Store::open(&path).unwrap();
        s.put(gen("k1")).unwrap();
        s.put(gen("k2")).unwrap();
        drop(s);
        // A kill in the middle of the third line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"kind":"gen","key":"k3","mod"#).unwrap();
        drop(f);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.skipped_lines, 1);
        assert_eq!(s.get("k1"), Some(gen("k1")));
        assert!(s.get("k3").is_none());
        s.put(gen("k3")).unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.len(), 3, "the record after the cut line is whole");
        assert_eq!(s.get("k3"), Some(gen("k3")));
    }

    #[test]
    fn keys_depend_on_every_part() {
        let a = key_of("gen", &serde_json::json!({"m": "x", "t": 1}));
        assert_eq!(a, key_of("gen", &serde_json::json!({"m": "x", "t": 1})));
        assert_ne!(a, key_of("gen", &serde_json::json!({"m": "x", "t": 2})));
        assert_ne!(a, key_of("code", &serde_json::json!({"m": "x", "t": 1})));
    }
}
