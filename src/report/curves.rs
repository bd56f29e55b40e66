//! Learning curves from a `simile-train` output folder (`--train-dir`): the loss per step
//! (raw, faint, and its mean per epoch) from `train_log.parquet`, and the OVERALL validation
//! metrics per epoch from `val_metrics.parquet` (`schemas/train.md`), read through the
//! trainer's own table reader.
use super::charts::{lines, Series};
use crate::error::{Error, Result};
use crate::train::log;
use std::path::{Path, PathBuf};

pub use crate::train::log::{TRAIN_LOG, VAL_METRICS};

/// Most points of the raw loss line: longer runs are averaged over equal runs of steps.
const MAX_POINTS: usize = 1500;

/// The tables of a training folder, checked to exist before anything is computed.
pub struct TrainDir {
    pub train_log: PathBuf,
    /// Absent when the dataset had no validation split.
    pub val_metrics: Option<PathBuf>,
}

impl TrainDir {
    pub fn locate(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::input(format!(
                "--train-dir {}: not a folder (give a simile-train --out folder)",
                dir.display()
            )));
        }
        let train_log = dir.join(TRAIN_LOG);
        if !train_log.is_file() {
            return Err(Error::input(format!(
                "--train-dir {}: no {TRAIN_LOG} in it; is it a simile-train --out folder?",
                dir.display()
            )));
        }
        let v = dir.join(VAL_METRICS);
        Ok(TrainDir {
            train_log,
            val_metrics: v.is_file().then_some(v),
        })
    }

    /// The charts (inline SVG) and a note per missing part.
    pub fn render(&self) -> Result<String> {
        let mut s = String::new();
        let rows = log::read(&self.train_log, &["epoch", "step"])?;
        if rows.is_empty() {
            s.push_str(r#"<p class="note">The training log has no steps.</p>"#);
        } else {
            let mut raw = Vec::with_capacity(rows.len());
            for r in &rows {
                let step = r.int("step").ok_or_else(|| {
                    Error::format(&self.train_log, "no int64 column 'step'".to_string())
                })?;
                let loss = r.value("loss").unwrap_or(f64::NAN);
                raw.push((step as f64, loss, r.int("epoch").unwrap_or(0)));
            }
            let mut series = Vec::new();
            let chunk = raw.len().div_ceil(MAX_POINTS).max(1);
            let steps: Vec<(f64, f64)> = raw
                .chunks(chunk)
                .map(|c| {
                    let n = c.len() as f64;
                    (
                        c.iter().map(|p| p.0).sum::<f64>() / n,
                        c.iter().map(|p| p.1).sum::<f64>() / n,
                    )
                })
                .collect();
            series.push(Series {
                name: if chunk > 1 {
                    format!("loss (mean of {chunk} steps)")
                } else {
                    "loss per step".into()
                },
                points: steps,
                dots: false,
                faint: true,
            });
            // The mean loss of each epoch, drawn at the epoch's last step.
            let mut epochs: Vec<(f64, f64)> = Vec::new();
            let mut i = 0;
            while i < raw.len() {
                let e = raw[i].2;
                let j = i + raw[i..].iter().take_while(|p| p.2 == e).count();
                let finite: Vec<f64> = raw[i..j]
                    .iter()
                    .map(|p| p.1)
                    .filter(|v| v.is_finite())
                    .collect();
                // An epoch without a finite loss (the run stopped on NaN) gets no point.
                epochs.push((
                    raw[j - 1].0,
                    finite.iter().sum::<f64>() / finite.len() as f64,
                ));
                i = j;
            }
            series.push(Series {
                name: "mean per epoch".into(),
                points: epochs,
                dots: true,
                faint: false,
            });
            s.push_str(&lines("Training loss", "step", "loss", &series));
        }
        match &self.val_metrics {
            None => s.push_str(
                r#"<p class="note">No validation metrics: the training folder has no val_metrics.parquet (no validation split).</p>"#,
            ),
            Some(p) => {
                let rows = log::read(p, &["epoch", "step"])?;
                let keys: Vec<String> = rows
                    .first()
                    .map(|r| {
                        r.values
                            .iter()
                            .map(|(k, _)| k.clone())
                            .filter(|k| {
                                k.starts_with("OVERALL/")
                                    && !k.contains("/n_queries")
                                    && !k.ends_with("/ci_low")
                                    && !k.ends_with("/ci_high")
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                if keys.is_empty() {
                    s.push_str(r#"<p class="note">The validation table has no OVERALL metrics.</p>"#);
                } else {
                    let series: Vec<Series> = keys
                        .iter()
                        .map(|k| Series {
                            name: k.clone(),
                            points: rows
                                .iter()
                                .map(|r| {
                                    (
                                        r.int("epoch").unwrap_or(0) as f64,
                                        r.value(k).unwrap_or(f64::NAN),
                                    )
                                })
                                .collect(),
                            dots: true,
                            faint: false,
                        })
                        .collect();
                    s.push_str(&lines(
                        "Validation metrics",
                        "epochs completed",
                        "value",
                        &series,
                    ));
                }
            }
        }
        Ok(s)
    }
}
