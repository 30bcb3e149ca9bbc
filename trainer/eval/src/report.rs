//! The evaluation report: `report.md` (one table, a row per model, a column
//! per benchmark: score, 95% Wilson interval, n), `report.json` (the same
//! numbers: per model and benchmark score, n, ci_low, ci_high), `report.svg`
//! (grouped bars with the intervals as error bars) and `samples.jsonl` (every
//! model's result on every prompt).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use fusechat_data::config::Domain;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::EvalConfig;
use crate::error::{EvalError, Result};
use crate::stats;
use crate::SampleResult;

pub const INTERVAL: &str = "95% Wilson score interval (exact Wilson for the 0/1 scores of math and code; for the win rate, whose per-prompt scores lie in [0, 1], the same interval is conservative)";

/// One cell: a model on a benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Mean score in [0, 1]; `None` when nothing was counted.
    pub score: Option<f64>,
    /// Samples counted.
    pub n: usize,
    pub ci_low: f64,
    pub ci_high: f64,
    /// Prompts asked for.
    pub asked: usize,
    /// Prompts not counted: request failed, judge gave no verdict, sandbox broken.
    pub failed: usize,
}

impl Cell {
    pub fn from_scores(scores: &[Option<f64>]) -> Cell {
        let counted: Vec<f64> = scores.iter().flatten().copied().collect();
        let (score, ci_low, ci_high) = stats::summarize(&counted);
        Cell {
            score,
            n: counted.len(),
            ci_low,
            ci_high,
            asked: scores.len(),
            failed: scores.len() - counted.len(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub model: String,
    pub base_url: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub interval: String,
    /// Column order.
    pub benchmarks: Vec<String>,
    /// Row order.
    pub models: Vec<ModelInfo>,
    /// model name -> benchmark -> cell.
    pub results: BTreeMap<String, BTreeMap<String, Cell>>,
    pub data_config: String,
    pub seed: u64,
    pub max_tokens: u64,
    pub sizes: BTreeMap<String, usize>,
    /// `model at base_url`, when an instruction pool was judged.
    pub judge: Option<String>,
}

impl Report {
    pub fn build(config: &EvalConfig, benchmarks: &[String], samples: &[SampleResult]) -> Report {
        let mut results = BTreeMap::new();
        for m in &config.models {
            let mine: Vec<&SampleResult> = samples.iter().filter(|s| s.model == m.name).collect();
            let mut row = BTreeMap::new();
            for b in benchmarks {
                let scores: Vec<Option<f64>> = if b == crate::MATH_ALL {
                    mine.iter()
                        .filter(|s| s.domain == Domain::Math)
                        .map(|s| s.scores.get(&s.pool).copied().flatten())
                        .collect()
                } else {
                    mine.iter()
                        .filter(|s| s.scores.contains_key(b))
                        .map(|s| s.scores[b])
                        .collect()
                };
                row.insert(b.clone(), Cell::from_scores(&scores));
            }
            results.insert(m.name.clone(), row);
        }
        let judged = benchmarks.iter().any(|b| b.ends_with(".win_rate"));
        Report {
            interval: INTERVAL.into(),
            benchmarks: benchmarks.to_vec(),
            models: config
                .models
                .iter()
                .map(|m| ModelInfo {
                    name: m.name.clone(),
                    model: m.model().to_string(),
                    base_url: m.base_url.clone(),
                })
                .collect(),
            results,
            data_config: config.data_config_path().display().to_string(),
            seed: config.seed,
            max_tokens: config.max_tokens,
            sizes: config.sizes.clone(),
            judge: config
                .judge
                .as_ref()
                .filter(|_| judged)
                .map(|j| {
                    let scoring = match j.scoring {
                        crate::judge::Scoring::Weighted => "each order scored by the judge's probability of the model's letter at its verdict token (the verdict alone where the judge returns no logprobs)",
                        crate::judge::Scoring::Verdict => "each order scored by its verdict (win 1, tie 0.5, loss 0)",
                    };
                    format!("{} at {}; {scoring}", j.model, j.base_url)
                }),
        }
    }

    pub fn cell(&self, model: &str, bench: &str) -> Option<&Cell> {
        self.results.get(model)?.get(bench)
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}", x * 100.0)
}

/// What a column measures.
pub fn describe(bench: &str) -> String {
    if bench == crate::MATH_ALL {
        "math accuracy over all math pools".into()
    } else if let Some(p) = bench.strip_suffix(".base") {
        format!("{p}: pass@1 on the base tests (greedy)")
    } else if let Some(p) = bench.strip_suffix(".plus") {
        format!("{p}: pass@1 on the base and plus tests (greedy)")
    } else if let Some(p) = bench.strip_suffix(".win_rate") {
        format!(
            "{p}: win rate against the GPT-4 reference outputs, judged in both orders (how an order scores: see the judge below)"
        )
    } else if let Some(p) = bench.strip_suffix(".reference") {
        format!(
            "{p}: agreement with the GPT-4 reference outputs (mean of unigram and bigram F1 over words, no judge call; its interval is Wilson's on the mean, conservative)"
        )
    } else {
        format!("{bench}: math accuracy")
    }
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Evaluation report\n");
    let _ = writeln!(
        s,
        "Evaluation side of `{}` only (seed {}), greedy decoding (temperature 0), max_tokens {}.",
        r.data_config, r.seed, r.max_tokens
    );
    let _ = writeln!(
        s,
        "Each cell: score in % [{}] and n, the samples counted; \"k failed\" counts prompts not counted (request failed, no judge verdict, sandbox broken).\n",
        "95% Wilson interval"
    );
    let _ = write!(s, "| model |");
    for b in &r.benchmarks {
        let _ = write!(s, " {b} |");
    }
    let _ = write!(s, "\n| --- |");
    for _ in &r.benchmarks {
        let _ = write!(s, " ---: |");
    }
    let _ = writeln!(s);
    for m in &r.models {
        let _ = write!(s, "| {} |", m.name);
        for b in &r.benchmarks {
            let cell = r.cell(&m.name, b);
            let text = match cell {
                Some(c) => {
                    let mut t = match c.score {
                        Some(v) => format!(
                            "{} [{}, {}] n={}",
                            pct(v),
                            pct(c.ci_low),
                            pct(c.ci_high),
                            c.n
                        ),
                        None => "– n=0".to_string(),
                    };
                    if c.failed > 0 {
                        let _ = write!(t, " ({} failed)", c.failed);
                    }
                    t
                }
                None => "–".into(),
            };
            let _ = write!(s, " {text} |");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "\nColumns:\n");
    for b in &r.benchmarks {
        let _ = writeln!(s, "- `{b}`: {}", describe(b));
    }
    let _ = writeln!(s, "\nModels:\n");
    for m in &r.models {
        let _ = writeln!(s, "- {}: `{}` at {}", m.name, m.model, m.base_url);
    }
    if let Some(j) = &r.judge {
        let _ = writeln!(s, "\nJudge: {j}.");
    }
    let _ = writeln!(s, "\nInterval: {}.", r.interval);
    let _ = writeln!(
        s,
        "\nChart: report.svg. Per-sample results: samples.jsonl; the resumable log: results.jsonl."
    );
    s
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Grouped bars (a group per benchmark, a bar per model) with the 95%
/// intervals as error bars.
pub fn chart(path: &Path, r: &Report) -> Result<()> {
    let err = |e: String| EvalError::Report(format!("{}: {e}", path.display()));
    let nb = r.benchmarks.len().max(1);
    let nm = r.models.len().max(1);
    let width = (220 + nb * (40 + 28 * nm)).max(700) as u32;
    let root = SVGBackend::new(path, (width, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let benches = r.benchmarks.clone();
    let label = move |x: &f64| {
        let i = x.floor() as usize;
        if (*x - x.floor() - 0.5).abs() < 1e-6 {
            benches.get(i).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let mut c = ChartBuilder::on(&root)
        .caption(
            "score per benchmark (bars: 95% Wilson intervals)",
            ("sans-serif", 18),
        )
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(50)
        // Headroom above 100% for the legend, so it never hides a bar.
        .build_cartesian_2d(0f64..nb as f64, 0f64..125f64)
        .map_err(|e| err(e.to_string()))?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(nb * 2 + 1)
        .x_label_formatter(&label)
        .y_labels(6)
        .y_label_formatter(&|y| {
            if *y <= 100.0 + 1e-9 {
                format!("{y:.0}")
            } else {
                String::new()
            }
        })
        .y_desc("% (accuracy, pass@1, win rate)")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let bw = 0.8 / nm as f64;
    for (mi, m) in r.models.iter().enumerate() {
        let color = COLORS[mi % COLORS.len()];
        let cells: Vec<(usize, Cell)> = r
            .benchmarks
            .iter()
            .enumerate()
            .filter_map(|(bi, b)| r.cell(&m.name, b).map(|c| (bi, c.clone())))
            .collect();
        let x0 = |bi: usize| bi as f64 + 0.1 + mi as f64 * bw;
        c.draw_series(cells.iter().filter_map(|(bi, cell)| {
            cell.score.map(|v| {
                Rectangle::new(
                    [(x0(*bi) + 0.02 * bw, 0.0), (x0(*bi) + 0.98 * bw, v * 100.0)],
                    color.mix(0.8).filled(),
                )
            })
        }))
        .map_err(|e| err(e.to_string()))?
        .label(m.name.clone())
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        // Error bars with caps.
        for (bi, cell) in &cells {
            if cell.score.is_none() {
                continue;
            }
            let xm = x0(*bi) + bw / 2.0;
            let (lo, hi) = (cell.ci_low * 100.0, cell.ci_high * 100.0);
            let cap = bw * 0.25;
            for seg in [
                vec![(xm, lo), (xm, hi)],
                vec![(xm - cap, lo), (xm + cap, lo)],
                vec![(xm - cap, hi), (xm + cap, hi)],
            ] {
                c.draw_series(std::iter::once(PathElement::new(
                    seg,
                    BLACK.stroke_width(1),
                )))
                .map_err(|e| err(e.to_string()))?;
            }
        }
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| EvalError::io(format!("writing {}", path.display()), e))
}

/// Write report.md, report.json, report.svg and samples.jsonl into `out`.
pub fn write(out: &Path, r: &Report, samples: &[SampleResult]) -> Result<()> {
    std::fs::create_dir_all(out)
        .map_err(|e| EvalError::io(format!("creating {}", out.display()), e))?;
    write_atomic(&out.join("report.md"), markdown(r).as_bytes())?;
    let json = serde_json::to_string_pretty(r).map_err(|e| EvalError::Report(e.to_string()))?;
    write_atomic(&out.join("report.json"), json.as_bytes())?;
    chart(&out.join("report.svg"), r)?;
    let mut buf = Vec::new();
    for s in samples {
        let _ = writeln!(
            buf,
            "{}",
            serde_json::to_string(s).expect("samples serialize")
        );
    }
    write_atomic(&out.join("samples.jsonl"), &buf)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let mut results = BTreeMap::new();
        let mut a = BTreeMap::new();
        a.insert(
            "gsm8k".to_string(),
            Cell::from_scores(&[Some(1.0), Some(0.0), Some(1.0), Some(1.0), None]),
        );
        a.insert(
            "alpaca_eval.win_rate".to_string(),
            Cell::from_scores(&[Some(0.5), Some(0.75)]),
        );
        results.insert("base".to_string(), a);
        let mut b = BTreeMap::new();
        b.insert("gsm8k".to_string(), Cell::from_scores(&[None, None]));
        b.insert(
            "alpaca_eval.win_rate".to_string(),
            Cell::from_scores(&[Some(1.0), Some(1.0)]),
        );
        results.insert("fused".to_string(), b);
        Report {
            interval: INTERVAL.into(),
            benchmarks: vec!["gsm8k".into(), "alpaca_eval.win_rate".into()],
            models: ["base", "fused"]
                .iter()
                .map(|n| ModelInfo {
                    name: n.to_string(),
                    model: format!("{n}-id"),
                    base_url: "http://x/v1".into(),
                })
                .collect(),
            results,
            data_config: "data.toml".into(),
            seed: 42,
            max_tokens: 64,
            sizes: BTreeMap::new(),
            judge: Some("j at http://x/v1".into()),
        }
    }

    #[test]
    fn cells_count_failures_apart() {
        let c = Cell::from_scores(&[Some(1.0), Some(0.0), Some(1.0), Some(1.0), None]);
        assert_eq!((c.score, c.n, c.asked, c.failed), (Some(0.75), 4, 5, 1));
        let (lo, hi) = stats::wilson(0.75, 4, stats::Z95);
        assert_eq!((c.ci_low, c.ci_high), (lo, hi));
        let e = Cell::from_scores(&[None]);
        assert_eq!(
            (e.score, e.n, e.failed, e.ci_low, e.ci_high),
            (None, 0, 1, 0.0, 1.0)
        );
    }

    #[test]
    fn markdown_has_one_row_per_model_and_the_numbers() {
        let md = markdown(&report());
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(rows.len(), 4, "{md}"); // header, rule, two models
        assert_eq!(rows[0], "| model | gsm8k | alpaca_eval.win_rate |");
        // 3 of 4: Wilson 30.1 .. 95.4.
        assert!(
            rows[2].starts_with("| base | 75.0 [30.1, 95.4] n=4 (1 failed) | 62.5 ["),
            "{}",
            rows[2]
        );
        assert!(rows[3].contains("– n=0 (2 failed)"), "{}", rows[3]);
        assert!(rows[3].contains("100.0 [34.2, 100.0] n=2"), "{}", rows[3]);
        assert!(md.contains("Wilson"));
        assert!(md.contains("Judge: j at http://x/v1"));
    }

    #[test]
    fn files_are_written_and_json_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let r = report();
        write(dir.path(), &r, &[]).unwrap();
        let back: Report =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
                .unwrap();
        // Floats come back within serde_json's last-digit rounding.
        assert_eq!(markdown(&back), markdown(&r));
        assert_eq!(back.benchmarks, r.benchmarks);
        assert_eq!(back.models, r.models);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
                .unwrap();
        let c = &v["results"]["base"]["gsm8k"];
        assert_eq!(c["score"], 0.75);
        assert_eq!(c["n"], 4);
        assert!(c["ci_low"].as_f64().unwrap() < 0.75 && c["ci_high"].as_f64().unwrap() > 0.75);
        assert!(v["results"]["fused"]["gsm8k"]["score"].is_null());
        let svg = std::fs::read_to_string(dir.path().join("report.svg")).unwrap();
        assert!(
            svg.starts_with("<svg") || svg.contains("<svg"),
            "{}",
            &svg[..100]
        );
        assert!(svg.contains("base") && svg.contains("fused") && svg.contains("gsm8k"));
        // Three bars with a score (base: 2, fused: 1), each with an error bar.
        assert!(svg.matches("<rect").count() >= 3);
    }
}
