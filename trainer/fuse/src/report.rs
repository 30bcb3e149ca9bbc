//! `RUN/report.md` and `RUN/report.json`: the evaluation table (every model
//! on every benchmark with n and its 95% interval), the base -> fused
//! comparison with an interval for the difference, what each training stage
//! bought (base -> SFT -> DPO), what the data stages produced, what
//! training did, and the time of each stage.

use std::path::Path;

use fusechat_data::pair::Report as PairReport;
use fusechat_eval::report::{Cell, Report as EvalReport};
use fusechat_train::settings::StageOptions;
use fusechat_train::trainer::RunSummary;
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::FuseConfig;
use crate::error::{io, Result};
use crate::StageTime;

/// The evaluation rows of the target, by stage.
pub const BASE: &str = "base target";
pub const SFT: &str = "SFT target";
pub const FUSED: &str = "fused target";

pub struct FusedModel {
    pub id: String,
    pub alias: String,
    pub path: String,
    pub sha256: String,
    /// The server's `system_fingerprint` of the fused weights.
    pub fingerprint: String,
}

pub struct Inputs<'a> {
    pub config: &'a FuseConfig,
    pub run_dir: &'a Path,
    pub fused: &'a FusedModel,
    pub pairs: &'a PairReport,
    pub sft: &'a RunSummary,
    pub dpo: Option<&'a RunSummary>,
    pub eval: &'a EvalReport,
    pub stages: &'a [StageTime],
    pub total_s: f64,
    /// What the stage times were measured on.
    pub machine: &'a fusechat_host::Machine,
}

/// 95% interval of the difference of two proportions, `b - a`, from their
/// Wilson intervals (Newcombe 1998, method 10). The two samples are treated
/// as independent, which is conservative for two models scored on the same
/// prompts.
pub fn difference_interval(a: &Cell, b: &Cell) -> Option<(f64, f64, f64)> {
    let (pa, pb) = (a.score?, b.score?);
    let d = pb - pa;
    let low = d - ((pb - b.ci_low).powi(2) + (a.ci_high - pa).powi(2)).sqrt();
    let high = d + ((b.ci_high - pb).powi(2) + (pa - a.ci_low).powi(2)).sqrt();
    Some((d, low, high))
}

/// One benchmark's base -> fused comparison.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    pub benchmark: String,
    pub base: Cell,
    pub fused: Cell,
    pub difference: Option<f64>,
    pub difference_ci: Option<(f64, f64)>,
    /// `better` / `worse` when the difference's interval excludes 0, else `no clear difference`.
    pub verdict: String,
}

pub fn compare(eval: &EvalReport, benchmark: &str) -> Option<Comparison> {
    compare_rows(eval, benchmark, BASE, FUSED)
}

/// `after - before` on one benchmark, both rows of the evaluation.
fn compare_rows(eval: &EvalReport, benchmark: &str, before: &str, after: &str) -> Option<Comparison> {
    let base = eval.cell(before, benchmark)?.clone();
    let fused = eval.cell(after, benchmark)?.clone();
    let diff = difference_interval(&base, &fused);
    let verdict = match diff {
        Some((_, low, _)) if low > 0.0 => "better",
        Some((_, _, high)) if high < 0.0 => "worse",
        Some(_) => "no clear difference",
        None => "not measured",
    };
    Some(Comparison {
        benchmark: benchmark.to_string(),
        difference: diff.map(|d| d.0),
        difference_ci: diff.map(|d| (d.1, d.2)),
        verdict: verdict.to_string(),
        base,
        fused,
    })
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn cell_text(c: &Cell) -> String {
    match c.score {
        Some(s) => format!("{} [{}, {}] (n={})", pct(s), pct(c.ci_low), pct(c.ci_high), c.n),
        None => format!("- (n=0 of {})", c.asked),
    }
}

fn difference_text(c: &Comparison) -> String {
    match (c.difference, c.difference_ci) {
        (Some(d), Some((l, h))) => format!("{:+.1} [{:+.1}, {:+.1}]", d * 100.0, l * 100.0, h * 100.0),
        _ => "-".into(),
    }
}

/// One benchmark through the stages: base -> SFT -> DPO (the fused model).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageGains {
    pub benchmark: String,
    pub sft: Comparison,
    pub dpo: Comparison,
    pub total: Comparison,
}

/// What each stage bought, for every benchmark the SFT row was scored on;
/// empty when the run has no SFT row (no DPO, or `run.evaluate_sft` off).
pub fn stage_gains(eval: &EvalReport) -> Vec<StageGains> {
    eval.benchmarks
        .iter()
        .filter_map(|b| {
            Some(StageGains {
                benchmark: b.clone(),
                sft: compare_rows(eval, b, BASE, SFT)?,
                dpo: compare_rows(eval, b, SFT, FUSED)?,
                total: compare_rows(eval, b, BASE, FUSED)?,
            })
        })
        .collect()
}

/// The stage table of report.md.
fn stage_table(gains: &[StageGains]) -> String {
    if gains.is_empty() {
        return "No SFT row was evaluated (DPO did not run, or `run.evaluate_sft` is off): the fused model is the only trained one.\n\n".into();
    }
    let mut md = String::from("| benchmark | base | after SFT | after DPO (fused) | SFT - base | DPO - SFT | fused - base |\n| --- | --- | --- | --- | --- | --- | --- |\n");
    for g in gains {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} ({}) | {} ({}) | {} ({}) |\n",
            g.benchmark,
            cell_text(&g.sft.base),
            cell_text(&g.sft.fused),
            cell_text(&g.dpo.fused),
            difference_text(&g.sft),
            g.sft.verdict,
            difference_text(&g.dpo),
            g.dpo.verdict,
            difference_text(&g.total),
            g.total.verdict,
        ));
    }
    md.push_str("\nDifferences in points with their 95% interval (Newcombe).\n\n");
    md
}

fn comparison_line(c: &Comparison) -> String {
    let diff = match (c.difference, c.difference_ci) {
        (Some(d), Some((l, h))) => format!(
            "; difference {:+.1} points, 95% interval [{:+.1}, {:+.1}]",
            d * 100.0,
            l * 100.0,
            h * 100.0
        ),
        _ => String::new(),
    };
    format!(
        "{}: base {} -> fused {}{diff}: {}",
        c.benchmark,
        cell_text(&c.base),
        cell_text(&c.fused),
        c.verdict
    )
}

/// The settings the stages train with: `[sft]` and `[dpo]` over their
/// defaults, and DPO's objective.
#[derive(Serialize)]
struct Settings<'a> {
    sft: Option<StageOptions>,
    dpo: DpoSettings<'a>,
}

#[derive(Serialize)]
struct DpoSettings<'a> {
    enabled: bool,
    loss: &'a str,
    beta: f64,
    label_smoothing: f64,
    #[serde(flatten)]
    options: Option<StageOptions>,
}

impl<'a> Settings<'a> {
    fn of(config: &'a FuseConfig) -> Self {
        let d = &config.dpo;
        Self {
            sft: config.sft_options().ok(),
            dpo: DpoSettings {
                enabled: d.enabled,
                loss: &d.loss,
                beta: d.beta,
                label_smoothing: d.label_smoothing,
                options: config.dpo_options().ok(),
            },
        }
    }
}

fn training_json(s: &RunSummary) -> Value {
    json!({
        "out": s.out.display().to_string(),
        "steps": s.steps,
        "resumed_from": s.resumed_from,
        "last_loss": s.last_loss,
        "tokens_per_s": s.tokens_per_s,
    })
}

/// Writes both files; returns the one-line result.
pub fn write(x: &Inputs) -> Result<String> {
    let settings = Settings::of(x.config);
    let comparisons: Vec<Comparison> = x
        .eval
        .benchmarks
        .iter()
        .filter_map(|b| compare(x.eval, b))
        .collect();
    let math = comparisons.iter().find(|c| c.benchmark == fusechat_eval::MATH_ALL);
    let headline = match math {
        Some(c) => format!("math accuracy {}", comparison_line(c).trim_start_matches("math: ")),
        None => comparisons
            .first()
            .map(comparison_line)
            .unwrap_or_else(|| "no benchmark compared the base and fused targets".into()),
    };
    let gains = stage_gains(x.eval);
    let md = markdown(x, &headline, &comparisons, &gains, &settings);
    let report = json_report(x, &headline, &comparisons, &gains, &settings);
    let md_path = x.run_dir.join("report.md");
    let json_path = x.run_dir.join("report.json");
    crate::write_atomic(&md_path, md.as_bytes())?;
    let text = serde_json::to_vec_pretty(&report).map_err(|e| io("serialising report.json")(std::io::Error::other(e)))?;
    crate::write_atomic(&json_path, &text)?;
    Ok(headline)
}

/// report.md: the result, base against fused, each stage's gain, every
/// model, the fusion data, training and the stage times.
fn markdown(x: &Inputs, headline: &str, comparisons: &[Comparison], gains: &[StageGains], settings: &Settings) -> String {
    let mut md = String::new();
    md.push_str(&format!("# fusechat fuse: {}\n\n", x.config.origin));
    md.push_str(&format!("**Result:** {headline}\n\n"));
    md.push_str(&format!(
        "Fused model: `{}` (alias `{}`), folder `{}`, model.safetensors sha256 `{}`, served with system_fingerprint `{}`.\n\n",
        x.fused.id, x.fused.alias, x.fused.path, x.fused.sha256, x.fused.fingerprint
    ));
    md.push_str("## Base target -> fused target\n\n| benchmark | base | fused | difference (points) | 95% interval of the difference | verdict |\n| --- | --- | --- | ---: | --- | --- |\n");
    for c in comparisons {
        let (d, ci) = match (c.difference, c.difference_ci) {
            (Some(d), Some((l, h))) => (format!("{:+.1}", d * 100.0), format!("[{:+.1}, {:+.1}]", l * 100.0, h * 100.0)),
            _ => ("-".into(), "-".into()),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {d} | {ci} | {} |\n",
            c.benchmark,
            cell_text(&c.base),
            cell_text(&c.fused),
            c.verdict
        ));
    }
    md.push_str("\nThe difference's interval is Newcombe's (from the two Wilson intervals, samples taken as independent: conservative for two models on the same prompts).\n\n");
    md.push_str("## What each stage bought (base -> SFT -> DPO)\n\n");
    md.push_str(&stage_table(gains));
    md.push_str("## Every model (evaluation side, greedy)\n\n");
    md.push_str(&fusechat_eval::report::markdown(x.eval));
    md.push_str(&format!(
        "\nPer-sample outputs, chart and the resumable log: `{}`.\n\n",
        x.run_dir.join("eval").display()
    ));
    md.push_str(&data_section(x));
    md.push_str(&training_section(x, settings));
    md.push_str("## Stages (this invocation)\n\n| stage | seconds | note |\n| --- | ---: | --- |\n");
    for s in x.stages {
        md.push_str(&format!("| {} | {:.0} | {} |\n", s.stage, s.seconds, s.note.replace('|', "/")));
    }
    md.push_str(&format!(
        "\nTotal: {:.0} s on {}. A stage that found its work done took seconds.\n",
        x.total_s, x.machine
    ));
    md
}

/// The fusion data: rows and pairs per domain and per source.
fn data_section(x: &Inputs) -> String {
    let mut md = String::new();
    md.push_str(&format!(
        "## Fusion data\n\n{} SFT rows and {} DPO pairs from the training side (details: `{}`).\n\n| domain | prompts | SFT rows | DPO pairs | dropped |\n| --- | ---: | ---: | ---: | --- |\n",
        x.pairs.sft_rows,
        x.pairs.dpo_pairs,
        x.run_dir.join("data").join("report.md").display()
    ));
    for (d, r) in &x.pairs.domains {
        let dropped: Vec<String> = r.dropped.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        md.push_str(&format!("| {d} | {} | {} | {} | {} |\n", r.prompts, r.sft_rows, r.dpo_pairs, dropped.join("; ")));
    }
    md.push_str("\n| domain | source | samples | pass rate | SFT rows | DPO pairs |\n| --- | --- | ---: | ---: | ---: | ---: |\n");
    for (d, r) in &x.pairs.domains {
        for (s, sr) in &r.sources {
            md.push_str(&format!(
                "| {d} | {s} | {} | {} | {} | {} |\n",
                sr.samples,
                sr.pass_rate.map(pct).unwrap_or("-".into()),
                sr.sft_rows,
                sr.dpo_pairs
            ));
        }
    }
    md
}

/// The training runs and their settings.
fn training_section(x: &Inputs, settings: &Settings) -> String {
    let mut md = String::new();
    md.push_str("\n## Training\n\n| stage | steps | last loss | tokens/s | folder |\n| --- | ---: | ---: | ---: | --- |\n");
    for (name, s) in [("SFT", Some(x.sft)), ("DPO", x.dpo)] {
        match s {
            Some(s) => md.push_str(&format!(
                "| {name} | {} | {} | {} | `{}` |\n",
                s.steps,
                s.last_loss.map(|l| format!("{l:.4}")).unwrap_or("(done earlier)".into()),
                if s.tokens_per_s > 0.0 { format!("{:.0}", s.tokens_per_s) } else { "-".into() },
                s.out.display()
            )),
            None => md.push_str(&format!("| {name} | skipped | | | |\n")),
        }
    }
    md.push_str(&format!(
        "\nSFT settings `{}`; DPO settings `{}`. Loss curves: `sft/curves.svg`, `dpo/curves.svg`.\n\n",
        serde_json::to_string(&settings.sft).unwrap_or_default(),
        serde_json::to_string(&settings.dpo).unwrap_or_default()
    ));
    md
}

/// report.json: what report.md says, as data.
fn json_report(x: &Inputs, headline: &str, comparisons: &[Comparison], gains: &[StageGains], settings: &Settings) -> Value {
    let results: serde_json::Map<String, Value> = x
        .eval
        .results
        .iter()
        .map(|(m, row)| {
            let row: serde_json::Map<String, Value> = row
                .iter()
                .map(|(b, c)| (b.clone(), json!({"score": c.score, "n": c.n, "ci_low": c.ci_low, "ci_high": c.ci_high, "asked": c.asked, "failed": c.failed})))
                .collect();
            (m.clone(), Value::Object(row))
        })
        .collect();
    json!({
        "config": x.config.origin,
        "run_dir": x.run_dir.display().to_string(),
        "headline": headline,
        "fused_model": {"id": x.fused.id, "alias": x.fused.alias, "path": x.fused.path, "sha256": x.fused.sha256, "system_fingerprint": x.fused.fingerprint},
        "models": x.eval.models,
        "interval": x.eval.interval,
        "results": results,
        "comparisons": comparisons,
        "stage_gains": gains,
        "data": {"sft_rows": x.pairs.sft_rows, "dpo_pairs": x.pairs.dpo_pairs, "domains": x.pairs.domains},
        "training": {"sft": training_json(x.sft), "dpo": x.dpo.map(training_json), "sft_settings": settings.sft, "dpo_settings": settings.dpo},
        "stages": x.stages,
        "total_seconds": x.total_s,
        "machine": x.machine,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(k: usize, n: usize) -> Cell {
        let scores: Vec<Option<f64>> = (0..n).map(|i| Some(if i < k { 1.0 } else { 0.0 })).collect();
        Cell::from_scores(&scores)
    }

    #[test]
    fn difference_interval_matches_newcombe() {
        // Newcombe (1998), table II example (e): 56/70 vs 48/80 -> difference
        // 0.2, interval [0.0524, 0.3339] (method 10).
        let (d, low, high) = difference_interval(&cell(48, 80), &cell(56, 70)).unwrap();
        assert!((d - 0.2).abs() < 1e-12);
        assert!((low - 0.0524).abs() < 5e-4, "{low}");
        assert!((high - 0.3339).abs() < 5e-4, "{high}");
    }

    #[test]
    fn verdicts() {
        let a = cell(2, 60);
        let b = cell(20, 60);
        let (_, low, _) = difference_interval(&a, &b).unwrap();
        assert!(low > 0.0);
        let (_, low, high) = difference_interval(&a, &cell(4, 60)).unwrap();
        assert!(low < 0.0 && high > 0.0);
        assert!(difference_interval(&a, &Cell::from_scores(&[None])).is_none());
    }

    #[test]
    fn stage_gains_split_the_total_into_sft_and_dpo() {
        let rows = [(BASE, cell(1, 150)), (SFT, cell(12, 150)), (FUSED, cell(15, 150))];
        let mut eval = EvalReport {
            interval: String::new(),
            benchmarks: vec!["math".into()],
            models: Vec::new(),
            results: rows
                .iter()
                .map(|(m, c)| (m.to_string(), [("math".to_string(), c.clone())].into()))
                .collect(),
            data_config: String::new(),
            seed: 0,
            max_tokens: 0,
            sizes: Default::default(),
            judge: None,
        };
        let gains = stage_gains(&eval);
        assert_eq!(gains.len(), 1);
        let g = &gains[0];
        assert!((g.sft.difference.unwrap() - 11.0 / 150.0).abs() < 1e-12);
        assert!((g.dpo.difference.unwrap() - 3.0 / 150.0).abs() < 1e-12);
        assert!((g.total.difference.unwrap() - 14.0 / 150.0).abs() < 1e-12);
        assert_eq!((g.sft.verdict.as_str(), g.dpo.verdict.as_str()), ("better", "no clear difference"));
        assert!(stage_table(&gains).contains("| math | 0.7% ["));
        // No SFT row: no stage table, and the report says why.
        eval.results.remove(SFT);
        assert!(stage_gains(&eval).is_empty());
        assert!(stage_table(&[]).contains("evaluate_sft"));
    }
}
