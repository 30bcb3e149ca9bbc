//! The pairing report: `report.md` (tables per domain and source),
//! `report.json` (the same numbers) and `report.svg` (pass rate and what
//! each source contributed).

use std::fmt::Write as _;
use std::path::Path;

use crate::error::{DataError, Result};
use plotters::prelude::*;

use crate::pair::Report;

fn pct(x: Option<f64>) -> String {
    x.map(|v| format!("{:.1}%", v * 100.0))
        .unwrap_or_else(|| "-".into())
}

fn num(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into())
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Fusion data report\n");
    let _ = writeln!(s, "{} SFT rows, {} DPO pairs.\n", r.sft_rows, r.dpo_pairs);
    for (domain, d) in &r.domains {
        let _ = writeln!(
            s,
            "## {domain}\n\n{} prompts sampled: {} on the SFT side, {} on the DPO side; {} SFT rows, {} DPO pairs.\n",
            d.prompts, d.sft_prompts, d.dpo_prompts, d.sft_rows, d.dpo_pairs
        );
        let _ = writeln!(
            s,
            "| source | samples | failed requests | cut by length | pass rate | mean reward | mean judge | SFT rows | DPO pairs |"
        );
        let _ = writeln!(
            s,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for (src, x) in &d.sources {
            let _ = writeln!(
                s,
                "| {src} | {} | {} | {} | {} | {} | {} | {} | {} |",
                x.samples,
                x.failed_requests,
                x.truncated,
                pct(x.pass_rate),
                num(x.mean_reward),
                num(x.mean_judge),
                x.sft_rows,
                x.dpo_pairs
            );
        }
        if d.dropped.is_empty() {
            let _ = writeln!(s, "\nNothing dropped.\n");
        } else {
            let _ = writeln!(s, "\n| dropped | prompts |\n| --- | ---: |");
            for (why, n) in &d.dropped {
                let _ = writeln!(s, "| {why} | {n} |");
            }
            let _ = writeln!(s);
        }
    }
    let _ = writeln!(s, "Chart: report.svg. Pairing settings: `{}`.", r.config);
    s
}

pub fn chart(path: &Path, r: &Report) -> Result<()> {
    draw(path, r).map_err(|e| DataError::Stage(format!("drawing {}: {e}", path.display())))
}

fn draw(path: &Path, r: &Report) -> std::result::Result<(), Box<dyn std::error::Error>> {
    // One bar group per (domain, source).
    let mut bars: Vec<(String, Option<f64>, usize, usize)> = Vec::new();
    for (domain, d) in &r.domains {
        for (src, x) in &d.sources {
            let short: String = src.chars().take(14).collect();
            bars.push((
                format!("{domain}/{short}"),
                x.pass_rate,
                x.sft_rows,
                x.dpo_pairs,
            ));
        }
    }
    let n = bars.len().max(1);
    let root = SVGBackend::new(path, ((260 + 90 * n as u32).max(700), 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(380);
    let label = |bars: &Vec<(String, Option<f64>, usize, usize)>, x: &f64| {
        let i = x.floor() as usize;
        if (*x - x.floor() - 0.5).abs() < 1e-6 {
            bars.get(i).map(|b| b.0.clone()).unwrap_or_default()
        } else {
            String::new()
        }
    };
    {
        let mut c = ChartBuilder::on(&top)
            .caption("pass rate per source (math, code)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..n as f64, 0f64..100f64)?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| label(&bars, x))
            .y_desc("% correct")
            .draw()?;
        c.draw_series(bars.iter().enumerate().filter_map(|(i, b)| {
            b.1.map(|p| {
                Rectangle::new(
                    [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, p * 100.0)],
                    BLUE.mix(0.7).filled(),
                )
            })
        }))?;
    }
    {
        let max = bars.iter().map(|b| b.2.max(b.3)).max().unwrap_or(1).max(1) as f64;
        let mut c = ChartBuilder::on(&bottom)
            .caption(
                "SFT rows (green) and DPO pairs (red) each source contributed",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..n as f64, 0f64..max * 1.1)?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| label(&bars, x))
            .y_desc("rows")
            .draw()?;
        c.draw_series(bars.iter().enumerate().map(|(i, b)| {
            Rectangle::new(
                [(i as f64 + 0.1, 0.0), (i as f64 + 0.48, b.2 as f64)],
                GREEN.mix(0.7).filled(),
            )
        }))?;
        c.draw_series(bars.iter().enumerate().map(|(i, b)| {
            Rectangle::new(
                [(i as f64 + 0.52, 0.0), (i as f64 + 0.9, b.3 as f64)],
                RED.mix(0.7).filled(),
            )
        }))?;
    }
    root.present()?;
    Ok(())
}

pub fn write(out: &Path, r: &Report) -> Result<()> {
    std::fs::write(out.join("report.md"), markdown(r))?;
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(r)?)?;
    chart(&out.join("report.svg"), r)?;
    Ok(())
}
