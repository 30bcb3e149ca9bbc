//! Per-step metrics as JSONL (one object per optimizer step), and the curves
//! drawn from them as SVG at the end of a run.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::{io, Result, TrainError};

pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `path` for appending, first dropping the records after
    /// `keep_through_step` (steps a resumed run will redo).
    pub fn open(path: &Path, keep_through_step: usize) -> Result<Self> {
        let mut kept = String::new();
        if path.exists() {
            let file = File::open(path).map_err(io(path))?;
            for line in BufReader::new(file).lines() {
                let line = line.map_err(io(path))?;
                let step = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("step")?.as_u64());
                match step {
                    Some(s) if s as usize <= keep_through_step => {
                        kept.push_str(&line);
                        kept.push('\n');
                    }
                    _ => {}
                }
            }
        }
        // Rewritten beside and renamed: a kill here never loses the kept steps.
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, kept).map_err(io(&tmp))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, record: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{record}").map_err(io(&self.path))?;
        self.file.flush().map_err(io(&self.path))
    }
}

/// Reads a metrics file into its records.
pub fn read(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| TrainError::Line {
                path: path.into(),
                line: i + 1,
                message: e.to_string(),
            })
        })
        .collect()
}

/// One panel per series (e.g. `loss`, `rewards/margins`) against the step.
pub fn plot(metrics: &Path, svg: &Path, title: &str, series: &[&str]) -> Result<()> {
    let records = read(metrics)?;
    let panels: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|&name| {
            let points = records
                .iter()
                .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(name)?.as_f64()?)))
                .filter(|(_, y)| y.is_finite())
                .collect();
            (name, points)
        })
        .filter(|(_, p): &(&str, Vec<(f64, f64)>)| !p.is_empty())
        .collect();
    if panels.is_empty() {
        return Ok(());
    }
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(svg, (800, 260 * panels.len() as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        let areas = root.split_evenly((panels.len(), 1));
        for (i, ((name, points), area)) in panels.iter().zip(areas.iter()).enumerate() {
            let (x0, x1) = points
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
            let (y0, y1) = points
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
            let pad = ((y1 - y0) * 0.05).max(1e-9);
            let caption = if i == 0 {
                format!("{title}: {name}")
            } else {
                name.to_string()
            };
            let mut chart = ChartBuilder::on(area)
                .caption(caption, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))?;
            chart.configure_mesh().x_desc("step").draw()?;
            chart.draw_series(LineSeries::new(points.iter().copied(), &BLUE))?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| TrainError::File {
        path: svg.into(),
        message: format!("cannot draw the curves: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_drops_steps_after_the_checkpoint_and_plots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, 0).unwrap();
        for step in 1..=5 {
            log.write(&serde_json::json!({"step": step, "loss": 1.0 / step as f64}))
                .unwrap();
        }
        drop(log);
        let mut log = MetricsLog::open(&path, 3).unwrap();
        log.write(&serde_json::json!({"step": 4, "loss": 0.2}))
            .unwrap();
        let steps: Vec<u64> = read(&path)
            .unwrap()
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
        let svg = dir.path().join("curves.svg");
        plot(&path, &svg, "sft", &["loss", "absent"]).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("<svg") && text.contains("polyline"), "{text}");
    }
}
