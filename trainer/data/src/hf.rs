//! Hugging Face dataset files as prompt pools (`format = "auto"`): JSONL,
//! JSON (an array, an object holding one, or JSON lines, as `datasets`
//! writes them) and Parquet, in the common row layouts ([`Layout`]), or
//! through a field mapping ([`FieldMap`]) for anything else.
//!
//! A pool reads one prompt per row: the first user turn of a conversation
//! (a system turn and later turns are not part of the prompt), or the
//! prompt field, with Alpaca's `input` appended. Math pools need a gold
//! answer per row: an `answer` field (a number, a LaTeX answer, GSM8K's
//! `#### N`), else the `\boxed{}` (or `####`) of the solution or assistant
//! turn. Instruction pools keep a reference response (`output`, the chosen
//! response, the assistant turn) in `gold.reference` where the row has one.

use std::io::{BufRead, BufReader};
use std::path::Path;

use crate::error::{Context, DataError, Result};
use serde_json::{json, Map, Value};

use crate::config::{Domain, FieldMap, Layout, PoolConfig};
use crate::prompts::{relaxed_json, Row};

/// One record of a file and where it is, for error messages (`line 3`, `row 17`).
struct Record {
    at: String,
    value: Value,
}

/// Every row of `pool`'s file as a prompt row.
pub(crate) fn read(pool: &PoolConfig, path: &Path) -> Result<Vec<Row>> {
    let records = records(path)?;
    let Some(first) = records.first() else {
        return Ok(Vec::new());
    };
    let layout = pool.layout.or_else(|| detect(&first.value));
    let names = Names::of(layout, &pool.fields, &first.value).ok_or_else(|| {
        DataError::Input(format!(
            "{}: cannot tell the layout of its rows from their fields ({}); name it with `layout` \
             (messages, preference, instruction, question_answer, problem_solution) or map the fields \
             with `fields = {{ prompt = \"...\", answer = \"...\" }}` in pool `{}`",
            path.display(),
            keys(&first.value),
            pool.name
        ))
    })?;
    records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            row(pool.domain, &names, &r.value, i + 1).with_context(|| {
                format!(
                    "{}: {}: {} (pool `{}`; map another field with `fields`)",
                    path.display(),
                    r.at,
                    names.describe(),
                    pool.name
                )
            })
        })
        .collect()
}

/// The layout the first row's fields show, if any.
fn detect(first: &Value) -> Option<Layout> {
    let has = |k: &str| first.get(k).is_some();
    if has("chosen") {
        Some(Layout::Preference)
    } else if has("messages") || has("conversations") {
        Some(Layout::Messages)
    } else if has("instruction") {
        Some(Layout::Instruction)
    } else if has("problem") {
        Some(Layout::ProblemSolution)
    } else if has("question") {
        Some(Layout::QuestionAnswer)
    } else {
        None
    }
}

/// Which field holds what, for one file.
#[derive(Debug)]
struct Names {
    layout: Option<Layout>,
    prompt: String,
    input: Option<String>,
    /// A short gold answer.
    answer: Option<String>,
    /// A worked solution whose `\boxed{}` / `####` is the gold answer.
    solution: Option<String>,
    reference: Option<String>,
    id: Option<String>,
}

impl Names {
    fn of(layout: Option<Layout>, fields: &FieldMap, first: &Value) -> Option<Names> {
        let s = |x: &str| Some(x.to_string());
        let conversation =
            if first.get("conversations").is_some() && first.get("messages").is_none() {
                "conversations"
            } else {
                "messages"
            };
        let mut n = match layout {
            Some(Layout::Messages) => Names {
                layout,
                prompt: conversation.into(),
                input: None,
                answer: s("answer"),
                solution: s(conversation),
                reference: s(conversation),
                id: None,
            },
            Some(Layout::Preference) => Names {
                layout,
                prompt: "prompt".into(),
                input: None,
                answer: s("answer"),
                solution: None,
                reference: s("chosen"),
                id: None,
            },
            Some(Layout::Instruction) => Names {
                layout,
                prompt: "instruction".into(),
                input: s("input"),
                answer: s("answer"),
                solution: s("output"),
                reference: s("output"),
                id: None,
            },
            Some(Layout::QuestionAnswer) => Names {
                layout,
                prompt: "question".into(),
                input: None,
                answer: s("answer"),
                solution: None,
                reference: s("answer"),
                id: None,
            },
            Some(Layout::ProblemSolution) => Names {
                layout,
                prompt: "problem".into(),
                input: None,
                answer: s("answer"),
                solution: s("solution"),
                reference: s("solution"),
                id: None,
            },
            None => Names {
                layout,
                prompt: fields.prompt.clone()?,
                input: None,
                answer: None,
                solution: None,
                reference: None,
                id: None,
            },
        };
        if let Some(p) = &fields.prompt {
            n.prompt = p.clone();
        }
        if fields.input.is_some() {
            n.input = fields.input.clone();
        }
        if fields.answer.is_some() {
            n.answer = fields.answer.clone();
            n.solution = None;
        }
        if fields.reference.is_some() {
            n.reference = fields.reference.clone();
        }
        n.id = fields.id.clone().or_else(|| {
            ["id", "idx", "question_id", "unique_id"]
                .into_iter()
                .find(|k| {
                    first
                        .get(*k)
                        .is_some_and(|v| v.is_string() || v.is_number())
                })
                .map(String::from)
        });
        Some(n)
    }

    fn describe(&self) -> String {
        let layout = match self.layout {
            Some(Layout::Messages) => "messages layout",
            Some(Layout::Preference) => "prompt/chosen/rejected layout",
            Some(Layout::Instruction) => "instruction/input/output layout",
            Some(Layout::QuestionAnswer) => "question/answer layout",
            Some(Layout::ProblemSolution) => "problem/solution layout",
            None => "mapped fields",
        };
        format!("read as the {layout}")
    }
}

fn keys(v: &Value) -> String {
    match v.as_object() {
        Some(o) if !o.is_empty() => o
            .keys()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "none: the row is not a JSON object".into(),
    }
}

fn field<'a>(v: &'a Value, name: &str) -> Result<&'a Value> {
    v.get(name)
        .filter(|x| !x.is_null())
        .ok_or_else(|| DataError::Input(format!("no field `{name}`; the row has {}", keys(v))))
}

/// A message's text: a string, or OpenAI-style content parts.
fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            (!texts.is_empty()).then(|| texts.join("\n"))
        }
        _ => None,
    }
}

fn role(m: &Value) -> &str {
    m.get("role")
        .or_else(|| m.get("from"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn message_text(m: &Value) -> Option<String> {
    content_text(m.get("content").or_else(|| m.get("value"))?)
}

/// The prompt a field holds: its text, or the first user turn of a list of messages.
fn prompt_of(v: &Value, name: &str) -> Result<String> {
    let text = match field(v, name)? {
        Value::Array(messages) => messages
            .iter()
            .find(|m| matches!(role(m), "user" | "human"))
            .and_then(message_text)
            .ok_or_else(|| DataError::Input(format!("`{name}` has no user turn")))?,
        other => content_text(other)
            .ok_or_else(|| DataError::Input(format!("`{name}` is neither text nor a list of messages")))?,
    };
    if text.trim().is_empty() {
        return Err(DataError::Input(format!("`{name}` is empty")));
    }
    Ok(text.trim().to_string())
}

/// The response a field holds: its text, or the assistant turn of a list of
/// messages (the one after the first user turn).
fn response_of(v: &Value, name: &str) -> Option<String> {
    match v.get(name)? {
        Value::Array(messages) => {
            let user = messages
                .iter()
                .position(|m| matches!(role(m), "user" | "human"));
            messages
                .iter()
                .skip(user.map_or(0, |u| u + 1))
                .find(|m| matches!(role(m), "assistant" | "gpt"))
                .and_then(message_text)
        }
        Value::Number(n) => Some(n.to_string()),
        other => content_text(other),
    }
}

/// The gold answer a solution states: after `####`, else its last `\boxed{}`.
fn stated_answer(solution: &str) -> Option<String> {
    if let Some(i) = solution.rfind("####") {
        let a = solution[i + 4..].lines().next().unwrap_or("").trim();
        if !a.is_empty() {
            return Some(a.to_string());
        }
    }
    crate::score::math::last_boxed(solution).map(|b| b.trim().to_string())
}

fn math_gold(names: &Names, v: &Value) -> Result<String> {
    if let Some(a) = names.answer.as_deref().and_then(|a| response_of(v, a)) {
        let gold = stated_answer(&a).unwrap_or_else(|| a.trim().to_string());
        if gold.is_empty() {
            return Err(DataError::Input(format!(
                "`{}` is empty: a math row needs a gold answer",
                names.answer.as_deref().unwrap_or("answer")
            )));
        }
        return Ok(gold);
    }
    if let Some(sol) = names.solution.as_deref() {
        let text = response_of(v, sol)
            .ok_or_else(|| DataError::Input(format!("no field `{sol}` (or `answer`); the row has {}", keys(v))))?;
        // A solution that is only the answer (Alpaca's `output`: "42").
        let bare = crate::score::latex::value(&text).map(|_| text.trim().to_string());
        return stated_answer(&text).or(bare).ok_or_else(|| DataError::Input(format!("`{sol}` states no answer (no `\\boxed{{}}` and no `####`) and the row has no `answer`")));
    }
    match &names.answer {
        Some(a) => Err(DataError::Input(format!(
            "no field `{a}` for the math answer; the row has {}",
            keys(v)
        ))),
        None => Err(DataError::Input(format!(
            "a math pool needs a gold answer: map it with `fields.answer`"
        ))),
    }
}

fn row(domain: Domain, names: &Names, v: &Value, n: usize) -> Result<Row> {
    let mut text = prompt_of(v, &names.prompt)?;
    if let Some(input) = names
        .input
        .as_deref()
        .and_then(|k| v.get(k))
        .and_then(Value::as_str)
    {
        if !input.trim().is_empty() {
            text = format!("{text}\n\n{}", input.trim());
        }
    }
    let gold = match domain {
        Domain::Math => json!({ "answer": math_gold(names, v)? }),
        _ => match names.reference.as_deref().and_then(|r| response_of(v, r)) {
            Some(r) => json!({ "reference": r }),
            None => json!({}),
        },
    };
    let id = names
        .id
        .as_deref()
        .and_then(|k| v.get(k))
        .and_then(|x| match x {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| n.to_string());
    Ok(Row { id, text, gold })
}

/// The records of a file, by its extension.
fn records(path: &Path) -> Result<Vec<Record>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "parquet" => parquet_records(path),
        "json" => json_records(path),
        _ => jsonl_records(path),
    }
}

fn jsonl_records(path: &Path) -> Result<Vec<Record>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line =
            line.with_context(|| format!("{}: line {}: unreadable", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let value = relaxed_json(&line)
            .with_context(|| format!("{}: line {}: not valid JSON", path.display(), i + 1))?;
        out.push(Record {
            at: format!("line {}", i + 1),
            value,
        });
    }
    Ok(out)
}

/// A JSON array, an object with one array of rows (`{"data": [...]}`), or
/// JSON lines under a `.json` name (what `datasets`' `to_json` writes).
fn json_records(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let rows = match relaxed_json(&text) {
        Ok(Value::Array(rows)) => rows,
        Ok(Value::Object(o)) => match array_member(&o) {
            Some(rows) => rows,
            None => {
                return Ok(vec![Record {
                    at: "element 1".into(),
                    value: Value::Object(o),
                }])
            }
        },
        Ok(_) => return Err(DataError::Input(format!("{}: neither an array of rows nor an object", path.display()))),
        Err(_) => return jsonl_records(path),
    };
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(i, value)| Record {
            at: format!("element {}", i + 1),
            value,
        })
        .collect())
}

/// The one member of an object that is an array of objects.
fn array_member(o: &Map<String, Value>) -> Option<Vec<Value>> {
    let mut arrays = o.values().filter(|v| {
        v.as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_object))
    });
    let first = arrays.next()?.as_array()?.clone();
    arrays.next().is_none().then_some(first)
}

fn parquet_records(path: &Path) -> Result<Vec<Record>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{}: not a Parquet file", path.display()))?;
    let mut out = Vec::new();
    for (i, row) in reader
        .get_row_iter(None)
        .with_context(|| format!("{}: reading its rows", path.display()))?
        .enumerate()
    {
        let row = row.with_context(|| format!("{}: row {}: unreadable", path.display(), i + 1))?;
        out.push(Record {
            at: format!("row {}", i + 1),
            value: row.to_json_value(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(first: &Value) -> Names {
        Names::of(detect(first), &FieldMap::default(), first).unwrap()
    }

    #[test]
    fn layouts_are_told_from_the_fields() {
        let cases = [
            (json!({"messages": []}), Some(Layout::Messages)),
            (json!({"conversations": []}), Some(Layout::Messages)),
            (
                json!({"prompt": "p", "chosen": "c", "rejected": "r", "messages": []}),
                Some(Layout::Preference),
            ),
            (
                json!({"instruction": "i", "input": "", "output": "o"}),
                Some(Layout::Instruction),
            ),
            (
                json!({"question": "q", "answer": "a"}),
                Some(Layout::QuestionAnswer),
            ),
            (
                json!({"problem": "p", "solution": "s"}),
                Some(Layout::ProblemSolution),
            ),
            (json!({"text": "t"}), None),
        ];
        for (v, want) in cases {
            assert_eq!(detect(&v), want, "{v}");
        }
    }

    #[test]
    fn rows_of_each_layout() {
        let v = json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is \\boxed{4}."}]});
        let r = row(Domain::Math, &names(&v), &v, 1).unwrap();
        assert_eq!(
            (r.text.as_str(), r.gold["answer"].as_str()),
            ("What is 2+2?", Some("4"))
        );
        let r = row(Domain::Instruction, &names(&v), &v, 1).unwrap();
        assert_eq!(r.gold["reference"], "It is \\boxed{4}.");

        let v = json!({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]});
        let r = row(Domain::Instruction, &names(&v), &v, 3).unwrap();
        assert_eq!((r.text.as_str(), r.id.as_str()), ("Hi", "3"));
        assert_eq!(r.gold["reference"], "Hello");

        let v = json!({"instruction": "Add.", "input": "2 and 3", "output": "5", "id": 7});
        let r = row(Domain::Math, &names(&v), &v, 1).unwrap();
        assert_eq!(
            (r.text.as_str(), r.gold["answer"].as_str(), r.id.as_str()),
            ("Add.\n\n2 and 3", Some("5"), "7")
        );

        let v = json!({"question": "q", "answer": "2 + 2 = 4\n#### 4"});
        assert_eq!(
            row(Domain::Math, &names(&v), &v, 1).unwrap().gold["answer"],
            "4"
        );

        let v = json!({"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$", "unique_id": "test/algebra/1.json"});
        let r = row(Domain::Math, &names(&v), &v, 1).unwrap();
        assert_eq!(
            (r.gold["answer"].as_str(), r.id.as_str()),
            (Some("\\frac{1}{2}"), "test/algebra/1.json")
        );
        let v = json!({"problem": "p", "solution": "long", "answer": "0.5"});
        assert_eq!(
            row(Domain::Math, &names(&v), &v, 1).unwrap().gold["answer"],
            "0.5"
        );

        let v = json!({"prompt": [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}],
                       "chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
                       "rejected": "No."});
        let r = row(Domain::Instruction, &names(&v), &v, 1).unwrap();
        assert_eq!(
            (r.text.as_str(), r.gold["reference"].as_str()),
            ("Name a colour.", Some("Blue."))
        );
    }

    #[test]
    fn missing_fields_are_named() {
        let v = json!({"question": "q", "answer": " "});
        let err = format!("{:#}", row(Domain::Math, &names(&v), &v, 1).unwrap_err());
        assert!(err.contains("`answer` is empty"), "{err}");
        let v = json!({"problem": "p", "solution": "no box here"});
        let err = format!("{:#}", row(Domain::Math, &names(&v), &v, 1).unwrap_err());
        assert!(err.contains("solution") && err.contains("boxed"), "{err}");
        let first = json!({"question": "q", "answer": "1"});
        let v = json!({"answer": "1"});
        let err = format!(
            "{:#}",
            row(Domain::Math, &names(&first), &v, 1).unwrap_err()
        );
        assert!(
            err.contains("`question`") && err.contains("`answer`"),
            "{err}"
        );
        // A preference row has no math answer unless one is mapped.
        let v = json!({"prompt": "2+2?", "chosen": "4", "rejected": "5"});
        let err = format!("{:#}", row(Domain::Math, &names(&v), &v, 1).unwrap_err());
        assert!(err.contains("`answer`"), "{err}");
        let mapped = FieldMap {
            answer: Some("chosen".into()),
            ..Default::default()
        };
        let n = Names::of(detect(&v), &mapped, &v).unwrap();
        assert_eq!(row(Domain::Math, &n, &v, 1).unwrap().gold["answer"], "4");
        // No layout and no mapping: nothing to read.
        assert!(Names::of(None, &FieldMap::default(), &json!({"text": "t"})).is_none());
        let custom = FieldMap {
            prompt: Some("query".into()),
            answer: Some("target".into()),
            ..Default::default()
        };
        let v = json!({"query": "3*3?", "target": 9});
        let n = Names::of(None, &custom, &v).unwrap();
        let r = row(Domain::Math, &n, &v, 1).unwrap();
        assert_eq!(
            (r.text.as_str(), r.gold["answer"].as_str()),
            ("3*3?", Some("9"))
        );
    }
}
