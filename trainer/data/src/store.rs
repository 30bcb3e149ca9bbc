//! The store: one SQLite file (WAL, synchronous=FULL), the only copy of the
//! samples and their scores. A sample row is written once, in one
//! transaction, when its response has arrived; a process killed at any moment
//! leaves every finished sample in place and no half-written one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use crate::error::{Context, DataError, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use crate::config::Domain;
use crate::prompts::{Prompt, Side, SPLIT_RULE};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prompts (
  id TEXT PRIMARY KEY,
  pool TEXT NOT NULL,
  domain TEXT NOT NULL,
  side TEXT NOT NULL,
  text TEXT NOT NULL,
  gold TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS samples (
  prompt_id TEXT NOT NULL,
  source TEXT NOT NULL,
  idx INTEGER NOT NULL,
  status TEXT NOT NULL,            -- 'ok' or 'error'
  request TEXT NOT NULL,           -- the JSON body sent
  text TEXT,
  finish_reason TEXT,
  truncated INTEGER NOT NULL DEFAULT 0,
  prompt_tokens INTEGER,
  completion_tokens INTEGER,
  latency_ms INTEGER,
  attempts INTEGER NOT NULL DEFAULT 1,
  error TEXT,
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
  PRIMARY KEY (prompt_id, source, idx)
);
CREATE TABLE IF NOT EXISTS scores (
  prompt_id TEXT NOT NULL,
  source TEXT NOT NULL,
  idx INTEGER NOT NULL,
  scorer TEXT NOT NULL,            -- 'math', 'code', 'reward', 'judge'
  score REAL,                      -- NULL: the scorer failed (see detail)
  passed INTEGER,                  -- math/code: 1 or 0
  detail TEXT,
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
  PRIMARY KEY (prompt_id, source, idx, scorer)
);
"#;

pub struct Store {
    conn: Mutex<Connection>,
}

/// The store's split rule: `Some(())` when it is [`SPLIT_RULE`], `None` when
/// none is recorded and no prompt either (a new store), else an error: its
/// prompts were split by another rule (a store from before the rule was
/// recorded split by `<pool>/<row id>`) and cannot be mixed with the
/// current split.
fn split_rule_of(conn: &Connection) -> Result<Option<()>> {
    let rule: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key='split_rule'", [], |r| {
            r.get(0)
        })
        .optional()?;
    let recorded: i64 = conn.query_row("SELECT COUNT(*) FROM prompts", [], |r| r.get(0))?;
    match rule.as_deref() {
        Some(r) if r == SPLIT_RULE => Ok(Some(())),
        None if recorded == 0 => Ok(None),
        old => return Err(DataError::Store(format!(
            "this store's training/evaluation split was recorded under another rule ({}) than the current one \
             ({SPLIT_RULE}: by normalised question text), so its {recorded} recorded prompts cannot be checked \
             against the new split and mixing them could put evaluation prompts into training: \
             start a new output folder (change `run.output`, or move the old folder away) and sample again",
            old.map(|o| format!("`{o}`"))
                .unwrap_or_else(|| "by `<pool>/<row id>`".into())
        ))),
    }
}

/// A sample's key in the store: (prompt id, source id, sample index).
pub type SampleKey = (String, String, u32);

/// One finished (or failed) request.
#[derive(Debug, Clone)]
pub struct SampleRecord {
    pub prompt_id: String,
    pub source: String,
    pub idx: u32,
    pub ok: bool,
    pub request: Value,
    pub text: Option<String>,
    pub finish_reason: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub latency_ms: u64,
    pub attempts: u32,
    pub error: Option<String>,
}

/// A sample as read back for scoring and pairing.
#[derive(Debug, Clone)]
pub struct Sample {
    pub prompt_id: String,
    pub source: String,
    pub idx: u32,
    pub ok: bool,
    pub text: String,
    pub finish_reason: Option<String>,
    pub truncated: bool,
    pub completion_tokens: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ScoreRecord {
    pub scorer: String,
    pub score: Option<f64>,
    pub passed: Option<bool>,
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct StoredPrompt {
    pub id: String,
    pub pool: String,
    pub domain: Domain,
    pub side: Side,
    pub text: String,
    pub gold: Value,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("opening the store {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if mode.to_lowercase() != "wal" {
            return Err(DataError::Store(format!("{}: could not switch to WAL (got {mode})", path.display())));
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
        conn.execute_batch(SCHEMA)
            .context("creating the store's tables")?;
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(DataError::Store(format!("{}: the store is damaged ({check})", path.display())));
        }
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM meta WHERE key=?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO meta(key,value) VALUES(?1,?2) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Record every prompt with its side. A prompt already recorded on the
    /// other side is an error: the split must never move under a run. So is
    /// a store whose split was recorded under another rule than
    /// [`SPLIT_RULE`] (a store from before that rule holds prompts but no
    /// rule): its sides cannot be compared with the current ones.
    pub fn record_prompts(&self, prompts: &[Prompt]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            if split_rule_of(&tx)?.is_none() {
                tx.execute(
                    "INSERT INTO meta(key,value) VALUES('split_rule',?1)",
                    [SPLIT_RULE],
                )?;
            }
            let mut get = tx.prepare("SELECT side FROM prompts WHERE id=?1")?;
            let mut put = tx.prepare(
                "INSERT INTO prompts(id,pool,domain,side,text,gold) VALUES(?1,?2,?3,?4,?5,?6)
                 ON CONFLICT(id) DO UPDATE SET text=excluded.text, gold=excluded.gold",
            )?;
            for p in prompts {
                let old: Option<String> = get.query_row([&p.id], |r| r.get(0)).optional()?;
                if let Some(old) = old {
                    if old != p.side.as_str() {
                        return Err(DataError::Store(format!(
                            "prompt `{}` is recorded on the {old} side of this store's split but now falls on the {} side; \
                             the split seed or evaluation fraction changed: use a new output folder",
                            p.id,
                            p.side.as_str()
                        )));
                    }
                }
                put.execute(params![
                    p.id,
                    p.pool,
                    p.domain.as_str(),
                    p.side.as_str(),
                    p.text,
                    p.gold.to_string()
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// An error, saying to start a new output folder, when this store's
    /// prompts were split under another rule than [`SPLIT_RULE`]: `score`
    /// and `pair` refuse such a store as `sample` does.
    pub fn check_split_rule(&self) -> Result<()> {
        split_rule_of(&self.conn()).map(|_| ())
    }

    pub fn prompts(&self, side: Option<Side>) -> Result<Vec<StoredPrompt>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT id,pool,domain,side,text,gold FROM prompts ORDER BY rowid")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, pool, domain, s, text, gold) = row?;
            let s = if s == "eval" { Side::Eval } else { Side::Train };
            if side.is_some_and(|want| want != s) {
                continue;
            }
            out.push(StoredPrompt {
                id,
                pool,
                domain: Domain::parse(&domain)?,
                side: s,
                text,
                gold: serde_json::from_str(&gold).unwrap_or(Value::Null),
            });
        }
        Ok(out)
    }

    /// The request each sample already in the store was made with, by key
    /// (prompt, source, index): the samples a rerun does not request again.
    /// With `retry_failed`, failed samples are left out (they are retried).
    pub fn done_requests(&self, retry_failed: bool) -> Result<HashMap<SampleKey, Value>> {
        let conn = self.conn();
        let sql = if retry_failed {
            "SELECT prompt_id,source,idx,request FROM samples WHERE status='ok'"
        } else {
            "SELECT prompt_id,source,idx,request FROM samples"
        };
        let mut stmt = conn.prepare(sql)?;
        let rows = stmt.query_map([], |r| {
            Ok((
                (r.get(0)?, r.get(1)?, r.get::<_, u32>(2)?),
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = HashMap::new();
        for row in rows {
            let (key, request) = row?;
            let request: Value = serde_json::from_str(&request)
                .with_context(|| format!("the stored request of sample {key:?} is not JSON"))?;
            out.insert(key, request);
        }
        Ok(out)
    }

    /// Remove samples and their scores (one transaction), so that they are
    /// requested again.
    pub fn delete_samples(&self, keys: &[SampleKey]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for (prompt_id, source, idx) in keys {
            for table in ["scores", "samples"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE prompt_id=?1 AND source=?2 AND idx=?3"),
                    params![prompt_id, source, idx],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Write one sample. A successful sample is never overwritten; a failed
    /// one is replaced by a later attempt.
    pub fn put_sample(&self, s: &SampleRecord) -> Result<()> {
        let truncated = s.finish_reason.as_deref() == Some("length");
        self.conn().execute(
            "INSERT INTO samples(prompt_id,source,idx,status,request,text,finish_reason,truncated,
                                 prompt_tokens,completion_tokens,latency_ms,attempts,error)
             VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13)
             ON CONFLICT(prompt_id,source,idx) DO UPDATE SET
               status=excluded.status, request=excluded.request, text=excluded.text,
               finish_reason=excluded.finish_reason, truncated=excluded.truncated,
               prompt_tokens=excluded.prompt_tokens, completion_tokens=excluded.completion_tokens,
               latency_ms=excluded.latency_ms, attempts=samples.attempts+excluded.attempts,
               error=excluded.error, created_at=strftime('%Y-%m-%dT%H:%M:%fZ','now')
             WHERE samples.status != 'ok'",
            params![
                s.prompt_id,
                s.source,
                s.idx,
                if s.ok { "ok" } else { "error" },
                s.request.to_string(),
                s.text,
                s.finish_reason,
                truncated as i64,
                s.prompt_tokens.map(|x| x as i64),
                s.completion_tokens.map(|x| x as i64),
                s.latency_ms as i64,
                s.attempts,
                s.error,
            ],
        )?;
        Ok(())
    }

    pub fn samples(&self) -> Result<Vec<Sample>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT prompt_id,source,idx,status,text,finish_reason,truncated,completion_tokens,error
             FROM samples ORDER BY prompt_id,source,idx",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Sample {
                prompt_id: r.get(0)?,
                source: r.get(1)?,
                idx: r.get(2)?,
                ok: r.get::<_, String>(3)? == "ok",
                text: r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                finish_reason: r.get(5)?,
                truncated: r.get::<_, i64>(6)? != 0,
                completion_tokens: r.get::<_, Option<i64>>(7)?.map(|x| x as u64),
                error: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// (count of rows, count of distinct keys): equal when nothing is doubled.
    pub fn sample_counts(&self) -> Result<(u64, u64)> {
        let conn = self.conn();
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM samples", [], |r| r.get(0))?;
        let d: i64 = conn.query_row(
            "SELECT COUNT(*) FROM (SELECT DISTINCT prompt_id,source,idx FROM samples)",
            [],
            |r| r.get(0),
        )?;
        Ok((n as u64, d as u64))
    }

    pub fn put_score(
        &self,
        prompt_id: &str,
        source: &str,
        idx: u32,
        s: &ScoreRecord,
    ) -> Result<()> {
        self.conn().execute(
            "INSERT INTO scores(prompt_id,source,idx,scorer,score,passed,detail) VALUES(?1,?2,?3,?4,?5,?6,?7)
             ON CONFLICT(prompt_id,source,idx,scorer) DO UPDATE SET score=excluded.score,
               passed=excluded.passed, detail=excluded.detail, created_at=strftime('%Y-%m-%dT%H:%M:%fZ','now')",
            params![prompt_id, source, idx, s.scorer, s.score, s.passed.map(|b| b as i64), s.detail],
        )?;
        Ok(())
    }

    /// Every score, keyed by (prompt, source, index).
    pub fn scores(&self) -> Result<HashMap<SampleKey, Vec<ScoreRecord>>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT prompt_id,source,idx,scorer,score,passed,detail FROM scores")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                (
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u32>(2)?,
                ),
                ScoreRecord {
                    scorer: r.get(3)?,
                    score: r.get(4)?,
                    passed: r.get::<_, Option<i64>>(5)?.map(|x| x != 0),
                    detail: r.get::<_, Option<String>>(6)?.unwrap_or_default(),
                },
            ))
        })?;
        let mut out: std::collections::HashMap<_, Vec<ScoreRecord>> = Default::default();
        for row in rows {
            let (k, v) = row?;
            out.entry(k).or_default().push(v);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(ok: bool, text: &str) -> SampleRecord {
        SampleRecord {
            prompt_id: "p/1".into(),
            source: "s".into(),
            idx: 0,
            ok,
            request: json!({}),
            text: Some(text.into()),
            finish_reason: Some("stop".into()),
            prompt_tokens: Some(3),
            completion_tokens: Some(2),
            latency_ms: 5,
            attempts: 1,
            error: (!ok).then(|| "boom".into()),
        }
    }

    #[test]
    fn ok_samples_are_never_overwritten_and_failures_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.sqlite")).unwrap();
        store.put_sample(&rec(false, "")).unwrap();
        assert!(store.done_requests(true).unwrap().is_empty());
        assert_eq!(store.done_requests(false).unwrap().len(), 1);
        store.put_sample(&rec(true, "first")).unwrap();
        store.put_sample(&rec(true, "second")).unwrap();
        let s = store.samples().unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].text, "first");
        assert!(s[0].ok);
        assert_eq!(store.sample_counts().unwrap(), (1, 1));
        // Reopening keeps everything.
        drop(store);
        let store = Store::open(&dir.path().join("s.sqlite")).unwrap();
        assert_eq!(store.samples().unwrap()[0].text, "first");
    }

    #[test]
    fn a_moved_split_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.sqlite")).unwrap();
        let mut p = Prompt {
            id: "x/1".into(),
            pool: "x".into(),
            domain: Domain::Math,
            text: "q".into(),
            gold: json!({"answer":"1"}),
            side: Side::Train,
            split_key: "q".into(),
        };
        store.record_prompts(std::slice::from_ref(&p)).unwrap();
        store.record_prompts(std::slice::from_ref(&p)).unwrap();
        p.side = Side::Eval;
        let err = store.record_prompts(&[p]).unwrap_err().to_string();
        assert!(err.contains("split"), "{err}");
    }

    #[test]
    fn a_store_split_by_the_old_rule_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let store = Store::open(&path).unwrap();
        let p = Prompt {
            id: "x/1".into(),
            pool: "x".into(),
            domain: Domain::Math,
            text: "q".into(),
            gold: json!({"answer":"1"}),
            side: Side::Train,
            split_key: "q".into(),
        };
        store.record_prompts(std::slice::from_ref(&p)).unwrap();
        store.record_prompts(std::slice::from_ref(&p)).unwrap();
        // A store written before the split followed the question text: its
        // prompts carry no split rule. Even where a prompt's side agrees by
        // chance, the store is refused with what to do.
        store
            .conn()
            .execute("DELETE FROM meta WHERE key='split_rule'", [])
            .unwrap();
        let err = format!(
            "{:#}",
            store.record_prompts(std::slice::from_ref(&p)).unwrap_err()
        );
        assert!(
            err.contains("split") && err.contains("new output folder"),
            "{err}"
        );
        let err = format!("{:#}", store.check_split_rule().unwrap_err());
        assert!(err.contains("new output folder"), "{err}");
        // Nothing was changed by the refusal.
        assert_eq!(store.prompts(None).unwrap().len(), 1);
        assert_eq!(store.meta("split_rule").unwrap(), None);
        // Another recorded rule is refused too.
        store.set_meta("split_rule", "some-other-rule").unwrap();
        assert!(store.record_prompts(std::slice::from_ref(&p)).is_err());
        // A fresh store records the rule with its first prompts.
        let fresh = Store::open(&dir.path().join("t.sqlite")).unwrap();
        fresh.check_split_rule().unwrap();
        fresh.record_prompts(&[p]).unwrap();
        assert_eq!(
            fresh.meta("split_rule").unwrap().as_deref(),
            Some(SPLIT_RULE)
        );
        fresh.check_split_rule().unwrap();
    }
}
