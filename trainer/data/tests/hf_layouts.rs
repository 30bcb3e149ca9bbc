//! Hugging Face dataset files as pools: the same rows as JSONL, Parquet
//! (written by pyarrow, fixtures/layouts/make.py) and JSON load into the
//! same prompts, in every supported layout, with the layout told from the
//! fields.

use std::path::{Path, PathBuf};

use fusechat_data::config::{Config, Domain};
use fusechat_data::prompts::{load_pool, Prompt};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/layouts")
}

fn config(pools: &[(&str, &str, &str)]) -> Config {
    let mut text = format!(
        "[run]\noutput = \"out\"\n[prompts]\ndata_dir = \"{}\"\n",
        fixtures().display()
    );
    for (name, domain, file) in pools {
        text.push_str(&format!(
            "[[pools]]\nname = \"{name}\"\ndomain = \"{domain}\"\nformat = \"auto\"\nfile = \"{file}\"\n"
        ));
    }
    text.push_str("[[endpoints]]\nname = \"e\"\nbase_url = \"http://127.0.0.1:9/v1\"\n[[sources]]\nid = \"s\"\nendpoint = \"e\"\n[sampling]\nn = { math = 1, instruction = 1 }\n");
    Config::parse(&text, Path::new(".")).unwrap()
}

fn load(domain: &str, file: &str) -> Vec<Prompt> {
    let c = config(&[("p", domain, file)]);
    load_pool(&c.pools[0], &c.pool_path(&c.pools[0]), &c)
        .unwrap_or_else(|e| panic!("{file}: {e:#}"))
}

fn same(a: &[Prompt], b: &[Prompt]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (&x.id, &x.text, &x.gold, x.side) == (&y.id, &y.text, &y.gold, y.side))
}

#[test]
fn jsonl_and_parquet_load_into_the_same_prompts_in_every_layout() {
    let answers = [
        ("messages", vec!["7", "\\frac{9}{2}"]),
        ("preference", vec!["60", "30"]),
        ("instruction", vec!["42", "180"]),
        ("question_answer", vec!["140", "48"]),
        ("problem_solution", vec!["2\\sqrt{3}", "4"]),
    ];
    for (layout, gold) in answers {
        let jsonl = load("math", &format!("{layout}.jsonl"));
        let parquet = load("math", &format!("{layout}.parquet"));
        assert!(same(&jsonl, &parquet), "{layout}: {jsonl:#?}\n{parquet:#?}");
        let got: Vec<&str> = jsonl
            .iter()
            .map(|p| p.gold["answer"].as_str().unwrap())
            .collect();
        assert_eq!(got, gold, "{layout}");
        assert!(jsonl.iter().all(|p| p.domain == Domain::Math));
    }
    // The prompt is the user turn, the system turn left out; Alpaca's input appended.
    let m = load("math", "messages.jsonl");
    assert!(
        m[0].text.starts_with("Tom has 3 apples") && !m[0].text.contains("tutor"),
        "{}",
        m[0].text
    );
    let i = load("math", "instruction.parquet");
    assert!(
        i[0].text.starts_with("Add the two numbers.\n\n17 and 25"),
        "{}",
        i[0].text
    );
    // Ids from the row where it has one.
    let p = load("math", "problem_solution.parquet");
    assert_eq!(p[0].id, "p/test/algebra/1.json");
    // A JSON array reads as its JSON lines do.
    assert!(same(
        &load("math", "question_answer.json"),
        &load("math", "question_answer.jsonl")
    ));
    // Instruction pools keep the reference response.
    let pref = load("instruction", "preference.parquet");
    assert_eq!(pref[0].gold["reference"], "12 * 5 = 60. The answer is 60.");
    assert!(same(&pref, &load("instruction", "preference.jsonl")));
}

#[test]
fn a_row_without_the_layouts_field_is_an_error_naming_file_row_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    std::fs::write(
        &path,
        "{\"question\": \"1+1?\", \"answer\": \"2\"}\n{\"answer\": \"3\"}\n",
    )
    .unwrap();
    let c = config(&[("bad", "math", path.to_str().unwrap())]);
    let err = format!("{:#}", load_pool(&c.pools[0], &path, &c).unwrap_err());
    assert!(
        err.contains("bad.jsonl") && err.contains("line 2") && err.contains("`question`"),
        "{err}"
    );
    // Unknown fields and no mapping: the error lists the fields and the way out.
    std::fs::write(&path, "{\"q\": \"1+1?\", \"a\": 2}\n").unwrap();
    let err = format!("{:#}", load_pool(&c.pools[0], &path, &c).unwrap_err());
    assert!(err.contains("`q`") && err.contains("fields"), "{err}");
}
