//! Prompt pools and the deterministic training/evaluation split.
//!
//! Every prompt's side depends only on its question text, normalised by
//! [`normalize_question`], and the split seed (rule [`SPLIT_RULE`]). So a
//! question that appears twice in a pool, or in two pools (MAWPS and ASDiv
//! share a few hundred), always lands on one side; its side does not move
//! when a pool grows or another pool is added; and the evaluation side
//! (issue: evaluation) can recompute it with [`side`] from
//! [`Prompt::split_key`]. [`load_all`] also keeps only the first copy of a
//! question across all pools.

use std::io::{BufRead, BufReader};
use std::path::Path;

use crate::error::{Context, DataError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::config::{Config, Domain, PoolConfig, PoolFormat};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Train,
    Eval,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Train => "train",
            Side::Eval => "eval",
        }
    }
}

/// A uniform number in [0, 1) from a seed and a key (sha256).
pub fn unit_hash(seed: u64, key: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(key.as_bytes());
    let d = h.finalize();
    let x = u64::from_le_bytes(d[..8].try_into().unwrap());
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// The rule [`side`] follows, recorded in the store: a store whose prompts
/// were split by another rule (before this one: by `<pool>/<row id>`) is
/// refused rather than mixed.
pub const SPLIT_RULE: &str = "normalised-question-text/v1";

/// The text a prompt's side is decided on: the question (without the
/// domain's suffix) lowercased, every character that is not a letter or a
/// digit read as a space (so trailing punctuation goes, and tokenised copies
/// such as `Sam ?` or `games .` match `Sam?` and `games.`), except a `.`
/// between digits (`3.5`) and a `,` between digits, which is dropped
/// (`1,000` = `1000`), and whitespace collapsed to single spaces.
pub fn normalize_question(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let digit_at = |i: Option<usize>| {
        i.and_then(|i| chars.get(i))
            .is_some_and(char::is_ascii_digit)
    };
    for (i, &c) in chars.iter().enumerate() {
        let between_digits = digit_at(i.checked_sub(1)) && digit_at(Some(i + 1));
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
        } else if between_digits && c == '.' {
            out.push('.');
        } else if between_digits && c == ',' {
            // 1,000 -> 1000
        } else if !out.ends_with(' ') {
            out.push(' ');
        }
    }
    out.trim().to_string()
}

/// The side of a prompt from its split key ([`Prompt::split_key`], that is
/// [`normalize_question`] of its question) and the split seed: evaluation
/// when the key's hash falls below `eval_fraction`. Copies of a question
/// have one key, hence one side; a smaller `eval_fraction` only moves
/// prompts from evaluation to training.
pub fn side(split_key: &str, seed: u64, eval_fraction: f64) -> Side {
    if unit_hash(seed, split_key) < eval_fraction {
        Side::Eval
    } else {
        Side::Train
    }
}

/// One prompt of a pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prompt {
    /// `<pool>/<row id>`.
    pub id: String,
    pub pool: String,
    pub domain: Domain,
    /// The user message sent to the sources (the pool's text plus the domain suffix).
    pub text: String,
    /// What the scorers check against: `{"answer": "18"}` for math, the
    /// MBPP+ task (`entry_point`, `canonical_solution`, `base_input`,
    /// `plus_input`, `atol`, `test`) for code, `{}` for instruction.
    pub gold: Value,
    pub side: Side,
    /// [`normalize_question`] of the question (before the suffix): what
    /// [`side`] hashes, and what [`load_all`] drops copies by.
    #[serde(default)]
    pub split_key: String,
}

/// A raw row before the suffix and the split.
#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) id: String,
    pub(crate) text: String,
    pub(crate) gold: Value,
}

fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn str_field<'a>(v: &'a Value, k: &str) -> Result<&'a str> {
    v.get(k)
        .and_then(Value::as_str)
        .ok_or_else(|| DataError::Input(format!("missing string field `{k}`")))
}

fn parse_row(format: PoolFormat, v: &Value, lineno: usize) -> Result<Row> {
    let fallback_id = || lineno.to_string();
    let idx = || v.get("idx").and_then(id_of).unwrap_or_else(fallback_id);
    Ok(match format {
        PoolFormat::Gsm8k => {
            let q = str_field(v, "question")?;
            let a = str_field(v, "answer")?;
            let gold = a
                .rsplit("####")
                .next()
                .filter(|_| a.contains("####"))
                .ok_or_else(|| DataError::Input("answer has no `####`".into()))?
                .trim()
                .to_string();
            Row {
                id: idx(),
                text: q.trim().to_string(),
                gold: json!({ "answer": gold }),
            }
        }
        PoolFormat::Mawps => {
            let q = str_field(v, "input")?;
            let t = v.get("target").ok_or_else(|| DataError::Input("missing `target`".into()))?;
            let gold = match t {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.clone(),
                _ => return Err(DataError::Input("`target` is not a number".into())),
            };
            Row {
                id: idx(),
                text: q.trim().to_string(),
                gold: json!({ "answer": gold }),
            }
        }
        PoolFormat::Asdiv => {
            let body = str_field(v, "body")?;
            let q = str_field(v, "question")?;
            let a = str_field(v, "answer")?;
            // "9 (apples)" -> "9"; keep the unit out of the gold answer.
            let gold = a.split(" (").next().unwrap_or(a).trim().to_string();
            Row {
                id: idx(),
                text: format!("{} {}", body.trim(), q.trim()),
                gold: json!({ "answer": gold }),
            }
        }
        PoolFormat::MbppPlus => {
            let task = str_field(v, "task_id")?;
            let prompt = str_field(v, "prompt")?;
            let entry = str_field(v, "entry_point")?;
            let canonical = str_field(v, "canonical_solution")?;
            let base = v
                .get("base_input")
                .cloned()
                .ok_or_else(|| DataError::Input("missing `base_input`".into()))?;
            let plus = v.get("plus_input").cloned().unwrap_or(Value::Array(vec![]));
            let atol = v.get("atol").and_then(Value::as_f64).unwrap_or(0.0);
            // The docstring holds the task and one assert.
            let inner = prompt.trim().trim_matches('"').trim();
            let (task_text, test) = match inner.find("assert ") {
                Some(i) => (inner[..i].trim().to_string(), inner[i..].trim().to_string()),
                None => (inner.to_string(), String::new()),
            };
            let text = if test.is_empty() {
                task_text.clone()
            } else {
                format!("{task_text}\nYour code should pass this test:\n{test}")
            };
            Row {
                id: task.rsplit('/').next().unwrap_or(task).to_string(),
                text,
                gold: json!({
                    "entry_point": entry,
                    "canonical_solution": canonical,
                    "base_input": base,
                    "plus_input": plus,
                    "atol": atol,
                    "test": test,
                }),
            }
        }
        PoolFormat::AlpacaEval => {
            let q = str_field(v, "instruction")?;
            // The GPT-4 output: the reference `[scoring.reference]` compares with.
            let gold = match v.get("output").and_then(Value::as_str) {
                Some(r) => json!({ "reference": r }),
                None => json!({}),
            };
            Row {
                id: fallback_id(),
                text: q.trim().to_string(),
                gold,
            }
        }
        PoolFormat::ArenaHard => {
            let id = v
                .get("question_id")
                .and_then(id_of)
                .ok_or_else(|| DataError::Input("missing `question_id`".into()))?;
            let q = v
                .pointer("/turns/0/content")
                .and_then(Value::as_str)
                .ok_or_else(|| DataError::Input("missing `turns[0].content`".into()))?;
            Row {
                id,
                text: q.trim().to_string(),
                gold: json!({}),
            }
        }
        PoolFormat::Auto => unreachable!("`auto` pools are read by crate::hf"),
        PoolFormat::Jsonl => {
            let id = v.get("id").and_then(id_of).unwrap_or_else(fallback_id);
            let q = str_field(v, "prompt")?;
            let gold = match v.get("answer") {
                Some(a) => json!({ "answer": id_of(a).unwrap_or_else(|| a.to_string()) }),
                None => json!({}),
            };
            Row {
                id,
                text: q.to_string(),
                gold,
            }
        }
    })
}

/// JSON, plus Python's `NaN`, `Infinity` and `-Infinity` (MBPP+ inputs hold
/// them), which become `{"$float": "nan" | "inf" | "-inf"}`; the code
/// sandbox turns those back into floats.
pub fn relaxed_json(text: &str) -> serde_json::Result<Value> {
    match serde_json::from_str(text) {
        Ok(v) => Ok(v),
        Err(first) => {
            let mut out = String::with_capacity(text.len() + 64);
            let (mut in_str, mut esc) = (false, false);
            let mut rest = text;
            while let Some(ch) = rest.chars().next() {
                if in_str {
                    if esc {
                        esc = false;
                    } else if ch == '\\' {
                        esc = true;
                    } else if ch == '"' {
                        in_str = false;
                    }
                } else if ch == '"' {
                    in_str = true;
                } else {
                    let mut hit = false;
                    for (tok, val) in [("-Infinity", "-inf"), ("Infinity", "inf"), ("NaN", "nan")] {
                        if rest.starts_with(tok) {
                            out.push_str(&format!("{{\"$float\":\"{val}\"}}"));
                            rest = &rest[tok.len()..];
                            hit = true;
                            break;
                        }
                    }
                    if hit {
                        continue;
                    }
                }
                out.push(ch);
                rest = &rest[ch.len_utf8()..];
            }
            serde_json::from_str(&out).map_err(|_| first)
        }
    }
}

fn read_rows(pool: &PoolConfig, path: &Path) -> Result<Vec<Row>> {
    let format = pool.format;
    if format == PoolFormat::Auto {
        return crate::hf::read(pool, path);
    }
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut rows = Vec::new();
    if format == PoolFormat::AlpacaEval {
        let all: Value = serde_json::from_reader(BufReader::new(file))
            .with_context(|| format!("{}: not a JSON array", path.display()))?;
        let arr = all
            .as_array()
            .ok_or_else(|| DataError::Input(format!("{}: not a JSON array", path.display())))?;
        for (i, v) in arr.iter().enumerate() {
            rows.push(
                parse_row(format, v, i)
                    .with_context(|| format!("{}: element {i}", path.display()))?,
            );
        }
        return Ok(rows);
    }
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let lineno = i + 1;
        let line = line.with_context(|| format!("{}:{lineno}: unreadable line", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = relaxed_json(&line)
            .with_context(|| format!("{}:{lineno}: not valid JSON", path.display()))?;
        rows.push(
            parse_row(format, &v, lineno)
                .with_context(|| format!("{}:{lineno}", path.display()))?,
        );
    }
    Ok(rows)
}

/// Every prompt of one pool, both sides, in file order. `limit` is not applied.
pub fn load_pool(pool: &PoolConfig, path: &Path, config: &Config) -> Result<Vec<Prompt>> {
    let rows = read_rows(pool, path)?;
    let suffix = match pool.domain {
        Domain::Math => config.prompts.math_suffix.clone(),
        Domain::Code => config.prompts.code_suffix.clone(),
        Domain::Instruction => String::new(),
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let id = format!("{}/{}", pool.name, r.id);
        if !seen.insert(id.clone()) {
            return Err(DataError::Input(format!("{}: duplicate id `{id}`", path.display())));
        }
        let mut text = r.text.clone();
        if !suffix.is_empty() {
            let entry = r
                .gold
                .get("entry_point")
                .and_then(Value::as_str)
                .unwrap_or("");
            text.push_str(&suffix.replace("{entry_point}", entry));
        }
        let split_key = normalize_question(&r.text);
        let side = side(
            &split_key,
            config.prompts.split_seed,
            config.prompts.eval_fraction,
        );
        out.push(Prompt {
            id,
            pool: pool.name.clone(),
            domain: pool.domain,
            text,
            gold: r.gold,
            side,
            split_key,
        });
    }
    Ok(out)
}

/// All pools of the config: every prompt with its side (for recording the
/// split), and the training prompts to sample (after each pool's `limit`).
/// A question already seen (same [`Prompt::split_key`]), earlier in its
/// pool or in an earlier pool, is dropped: the first copy is kept.
pub fn load_all(config: &Config) -> Result<(Vec<Prompt>, Vec<Prompt>)> {
    let mut all = Vec::new();
    let mut train = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for pool in &config.pools {
        let mut prompts = load_pool(pool, &config.pool_path(pool), config)
            .with_context(|| format!("pool `{}`", pool.name))?;
        let before = prompts.len();
        prompts.retain(|p| seen.insert(p.split_key.clone()));
        if prompts.len() < before {
            tracing::info!(
                "pool `{}`: {} question(s) already seen earlier dropped",
                pool.name,
                before - prompts.len()
            );
        }
        let limit = pool.limit.unwrap_or(usize::MAX);
        train.extend(
            prompts
                .iter()
                .filter(|p| p.side == Side::Train)
                .take(limit)
                .cloned(),
        );
        all.extend(prompts);
    }
    Ok((all, train))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Config {
        Config::load(None).unwrap()
    }

    #[test]
    fn split_is_deterministic_disjoint_and_near_the_fraction() {
        let ids: Vec<String> = (0..4000).map(|i| format!("gsm8k/{i}")).collect();
        let a: Vec<Side> = ids.iter().map(|i| side(i, 42, 0.5)).collect();
        let b: Vec<Side> = ids.iter().map(|i| side(i, 42, 0.5)).collect();
        assert_eq!(a, b);
        let eval = a.iter().filter(|s| **s == Side::Eval).count();
        assert!((1800..2200).contains(&eval), "{eval}");
        // Another seed gives another split.
        let c: Vec<Side> = ids.iter().map(|i| side(i, 7, 0.5)).collect();
        assert_ne!(a, c);
        // A smaller evaluation fraction only moves prompts from eval to train.
        for id in &ids {
            if side(id, 42, 0.2) == Side::Eval {
                assert_eq!(side(id, 42, 0.5), Side::Eval);
            }
        }
    }

    #[test]
    fn real_pools_load_and_training_never_holds_an_eval_prompt() {
        let c = tiny();
        if !c.data_dir().exists() {
            panic!("prompt data missing at {}", c.data_dir().display());
        }
        let (all, train) = load_all(&c).unwrap();
        assert!(all.len() > 5000);
        let eval: std::collections::HashSet<&str> = all
            .iter()
            .filter(|p| p.side == Side::Eval)
            .map(|p| p.id.as_str())
            .collect();
        assert!(!train.is_empty());
        for p in &train {
            assert_eq!(p.side, Side::Train);
            assert!(!eval.contains(p.id.as_str()));
        }
        // Determinism across loads.
        let (_, train2) = load_all(&c).unwrap();
        let a: Vec<&str> = train.iter().map(|p| p.id.as_str()).collect();
        let b: Vec<&str> = train2.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(a, b);
        // Gold answers came through.
        let g = all.iter().find(|p| p.id == "gsm8k/0").unwrap();
        assert_eq!(g.gold["answer"], "18");
        assert!(g.text.contains("The answer is"));
        let a = all.iter().find(|p| p.id == "asdiv/0").unwrap();
        assert_eq!(a.gold["answer"], "9");
        let m = all.iter().find(|p| p.id == "mbpp_plus/2").unwrap();
        assert_eq!(m.gold["entry_point"], "similar_elements");
        assert!(m.gold["test"].as_str().unwrap().starts_with("assert "));
        assert!(m.text.contains("similar_elements"));
    }

    /// The review's measure of "the same question": lowercase, every
    /// non-alphanumeric character a space, whitespace collapsed.
    fn loose(s: &str) -> String {
        s.to_lowercase()
            .chars()
            .map(|c| if c.is_alphanumeric() { c } else { ' ' })
            .collect::<String>()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The brief's measure: lowercase, whitespace collapsed, trailing punctuation gone.
    fn strict(s: &str) -> String {
        let s = s
            .to_lowercase()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        s.trim_end_matches(|c: char| c.is_ascii_punctuation() || c.is_whitespace())
            .to_string()
    }

    /// (train, eval) per normalised question; how many sit on both sides.
    fn on_both_sides(prompts: &[Prompt], norm: fn(&str) -> String) -> Vec<String> {
        let mut sides: std::collections::HashMap<String, (bool, bool)> = Default::default();
        for p in prompts {
            let e = sides.entry(norm(&p.text)).or_default();
            match p.side {
                Side::Train => e.0 = true,
                Side::Eval => e.1 = true,
            }
        }
        sides
            .into_iter()
            .filter(|(_, (t, e))| *t && *e)
            .map(|(k, _)| k)
            .collect()
    }

    #[test]
    fn real_math_pools_never_put_one_question_on_both_sides() {
        let mut c = tiny();
        c.prompts.math_suffix = String::new();
        c.pools
            .retain(|p| matches!(p.name.as_str(), "gsm8k" | "mawps" | "asdiv"));
        assert_eq!(c.pools.len(), 3);
        for p in &mut c.pools {
            p.limit = None;
        }
        // Each pool alone: a question twice in one pool (MAWPS holds ~200)
        // sits on one side.
        for pool in &c.pools {
            let prompts = load_pool(pool, &c.pool_path(pool), &c).unwrap();
            for norm in [loose as fn(&str) -> String, strict] {
                let both = on_both_sides(&prompts, norm);
                assert!(
                    both.is_empty(),
                    "{}: {} on both sides, e.g. {:?}",
                    pool.name,
                    both.len(),
                    both.first()
                );
            }
        }
        // All pools: a question in two pools (~240 in MAWPS and ASDiv) is
        // kept once, from the first pool, and never on both sides.
        let (all, train) = load_all(&c).unwrap();
        for norm in [loose as fn(&str) -> String, strict] {
            let both = on_both_sides(&all, norm);
            assert!(
                both.is_empty(),
                "{} on both sides, e.g. {:?}",
                both.len(),
                both.first()
            );
        }
        let keys: std::collections::HashSet<String> = all.iter().map(|p| loose(&p.text)).collect();
        assert_eq!(keys.len(), all.len(), "a duplicate question was kept");
        let mawps = load_pool(&c.pools[1], &c.pool_path(&c.pools[1]), &c).unwrap();
        let asdiv = load_pool(&c.pools[2], &c.pool_path(&c.pools[2]), &c).unwrap();
        let in_mawps: std::collections::HashSet<String> =
            mawps.iter().map(|p| loose(&p.text)).collect();
        let shared = asdiv
            .iter()
            .filter(|p| in_mawps.contains(&loose(&p.text)))
            .count();
        assert!(shared > 100, "{shared}");
        assert!(all.len() <= 1319 + 2065 + 2215 - shared);
        assert!(all
            .iter()
            .all(|p| p.pool != "asdiv" || !in_mawps.contains(&loose(&p.text))));
        assert!(train.iter().all(|p| p.side == Side::Train));
        let train_keys: std::collections::HashSet<String> =
            train.iter().map(|p| loose(&p.text)).collect();
        assert!(all
            .iter()
            .filter(|p| p.side == Side::Eval)
            .all(|p| !train_keys.contains(&loose(&p.text))));
    }

    #[test]
    fn tokenised_copies_of_a_question_share_a_side() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.jsonl");
        let b = dir.path().join("b.jsonl");
        let mut sa = String::new();
        let mut sb = String::new();
        for i in 0..200 {
            sa.push_str(&json!({"id": i, "prompt": format!("Sam has {i} apples, Tom has 2. How many apples do they have?")}).to_string());
            sa.push('\n');
            sa.push_str(&json!({"id": 1000 + i, "prompt": format!("sam has {i} apples , tom has 2 . how many apples   do they have ?")}).to_string());
            sa.push('\n');
            sb.push_str(&json!({"id": i, "prompt": format!("SAM HAS {i} APPLES, TOM HAS 2. HOW MANY APPLES DO THEY HAVE")}).to_string());
            sb.push('\n');
        }
        std::fs::write(&a, sa).unwrap();
        std::fs::write(&b, sb).unwrap();
        let mut c = tiny();
        let pool = |name: &str, file: &std::path::Path| PoolConfig {
            name: name.into(),
            domain: Domain::Instruction,
            format: PoolFormat::Jsonl,
            file: file.to_path_buf(),
            limit: None,
            layout: None,
            fields: Default::default(),
        };
        c.pools = vec![pool("a", &a), pool("b", &b)];
        let pa = load_pool(&c.pools[0], &a, &c).unwrap();
        let pb = load_pool(&c.pools[1], &b, &c).unwrap();
        for i in 0..200 {
            assert_eq!(pa[2 * i].side, pa[2 * i + 1].side, "{}", pa[2 * i].id);
            assert_eq!(pa[2 * i].side, pb[i].side, "{}", pb[i].id);
        }
        let (all, _) = load_all(&c).unwrap();
        assert_eq!(all.len(), 200, "copies are dropped, the first kept");
        assert!(all
            .iter()
            .all(|p| p.pool == "a" && p.text.starts_with("Sam has")));
    }

    #[test]
    fn python_floats_in_json() {
        let v = relaxed_json(r#"{"a": [-Infinity, Infinity, NaN, "NaN Infinity"]}"#).unwrap();
        assert_eq!(v["a"][0]["$float"], "-inf");
        assert_eq!(v["a"][1]["$float"], "inf");
        assert_eq!(v["a"][2]["$float"], "nan");
        assert_eq!(v["a"][3], "NaN Infinity");
        assert!(relaxed_json("{nope").is_err());
    }

    #[test]
    fn malformed_lines_are_errors_with_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.jsonl");
        std::fs::write(&path, "{\"id\":1,\"prompt\":\"ok\"}\n\n{not json\n").unwrap();
        let c = tiny();
        let pool = PoolConfig {
            name: "bad".into(),
            domain: Domain::Instruction,
            format: PoolFormat::Jsonl,
            file: path.clone(),
            limit: None,
            layout: None,
            fields: Default::default(),
        };
        let err = format!("{:#}", load_pool(&pool, &path, &c).unwrap_err());
        assert!(err.contains("bad.jsonl:3"), "{err}");
        std::fs::write(&path, "{\"id\":1,\"prompt\":\"ok\"}\n{\"id\":2}\n").unwrap();
        let err = format!("{:#}", load_pool(&pool, &path, &c).unwrap_err());
        assert!(
            err.contains("bad.jsonl:2") && err.contains("prompt"),
            "{err}"
        );
        let gsm = PoolConfig {
            format: PoolFormat::Gsm8k,
            ..pool
        };
        std::fs::write(&path, "{\"question\":\"q\",\"answer\":\"no marker\"}\n").unwrap();
        let err = format!("{:#}", load_pool(&gsm, &path, &c).unwrap_err());
        assert!(err.contains("bad.jsonl:1") && err.contains("####"), "{err}");
    }
}
