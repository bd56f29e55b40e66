//! What a training run shows while it runs, where people look: the progress bar on a terminal;
//! a log line every N steps or seconds when stderr is a file, Airflow's task log or a cluster
//! job's (`--log-every`); validation lines; TensorBoard scalars (`--tensorboard DIR`). Both
//! trainers (the extractor's and the pairwise model's) report through one [`Monitor`].
use super::log;
use super::tensorboard::EventWriter;
use crate::error::Result;
use indicatif::ProgressBar;
use std::io::IsTerminal;
use std::path::Path;
use std::str::FromStr;
use std::time::Instant;

/// How often a log line is printed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LogEvery {
    Off,
    Steps(usize),
    Seconds(f64),
}

impl LogEvery {
    /// Without `--log-every`: no lines on a terminal (the bar shows the same), a line every
    /// 30 s otherwise.
    pub fn default_for_stderr() -> Self {
        if std::io::stderr().is_terminal() {
            LogEvery::Off
        } else {
            LogEvery::Seconds(30.0)
        }
    }
}

impl FromStr for LogEvery {
    type Err = String;
    /// `50` (steps), `30s`, `2m`, `0` or `off`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim();
        let bad = || {
            format!("'{s}': expected a number of steps (50), seconds (30s), minutes (2m) or off")
        };
        if t == "off" || t == "0" {
            return Ok(LogEvery::Off);
        }
        let (num, mult) = match t.strip_suffix('s') {
            Some(n) => (n, Some(1.0)),
            None => match t.strip_suffix('m') {
                Some(n) => (n, Some(60.0)),
                None => (t, None),
            },
        };
        match mult {
            None => match num.parse::<usize>() {
                Ok(0) => Ok(LogEvery::Off),
                Ok(n) => Ok(LogEvery::Steps(n)),
                Err(_) => Err(bad()),
            },
            Some(m) => match num.parse::<f64>() {
                Ok(x) if x.is_finite() && x > 0.0 => Ok(LogEvery::Seconds(x * m)),
                Ok(0.0) => Ok(LogEvery::Off),
                _ => Err(bad()),
            },
        }
    }
}

/// The live view of one run.
pub struct Monitor {
    pb: ProgressBar,
    every: LogEvery,
    tb: Option<EventWriter>,
    epochs: usize,
    total_steps: usize,
    started: Instant,
    start_step: usize,
    last_line: Instant,
    last_line_step: usize,
    /// Images and step seconds since the last line, and since the start (the bar's rate).
    window: (u64, f64),
    total: (u64, f64),
    /// What a sample is called in the rates (`img`, `texts`).
    unit: &'static str,
}

impl Monitor {
    /// Names the samples in the rates: `texts` for a text encoder (default `img`).
    pub fn counting(&mut self, unit: &'static str) {
        self.unit = unit;
    }

    /// A run of `total_steps` that starts at `start_step` (after a resume: the checkpoint's).
    pub fn new(
        every: Option<LogEvery>,
        tensorboard: Option<&Path>,
        epochs: usize,
        total_steps: usize,
        start_step: usize,
    ) -> Result<Self> {
        // Steps up to a resumed checkpoint were logged by the run that wrote it (and are
        // kept); what that run logged after it is dropped by TensorBoard from here on.
        let purge_from = if start_step == 0 { 0 } else { start_step + 1 };
        let tb = tensorboard
            .map(|d| EventWriter::create(d, purge_from as i64))
            .transpose()?;
        if let Some(w) = &tb {
            eprintln!("simile-train: TensorBoard events in {}", w.path().display());
        }
        let pb = crate::progress::bar(total_steps as u64, "train");
        pb.set_position(start_step as u64);
        let now = Instant::now();
        Ok(Monitor {
            pb,
            every: every.unwrap_or_else(LogEvery::default_for_stderr),
            tb,
            epochs,
            total_steps,
            started: now,
            start_step,
            last_line: now,
            last_line_step: start_step,
            window: (0, 0.0),
            total: (0, 0.0),
            unit: "img",
        })
    }

    /// No progress bar (a data-parallel job's ranks other than 0: rank 0 shows it).
    pub fn hide_bar(&mut self) {
        self.pb = indicatif::ProgressBar::hidden();
    }

    /// One finished training step: its log row (`epoch` 0-based, `step` counted from 1,
    /// `loss`, `lr`, ...), its batch size and the seconds it took.
    pub fn step(&mut self, row: &log::Row, images: usize, seconds: f64) -> Result<()> {
        let step = row.int("step").unwrap_or(0) as usize;
        let epoch = row.int("epoch").unwrap_or(0) as usize + 1;
        let loss = row.value("loss").unwrap_or(f64::NAN);
        self.window.0 += images as u64;
        self.window.1 += seconds;
        self.total.0 += images as u64;
        self.total.1 += seconds;
        self.pb.set_position(step as u64);
        self.pb.set_message(format!(
            "e{epoch}/{} loss {loss:.4} {:.0} {}/s",
            self.epochs,
            rate(self.total),
            self.unit
        ));
        let due = match self.every {
            LogEvery::Off => false,
            LogEvery::Steps(n) => step.is_multiple_of(n),
            LogEvery::Seconds(s) => self.last_line.elapsed().as_secs_f64() >= s,
        };
        if due || (self.every != LogEvery::Off && step == self.total_steps) {
            let lr = row.value("lr").unwrap_or(f64::NAN);
            let line = format!(
                "simile-train: epoch {epoch}/{} step {step}/{} loss {loss:.4} lr {lr:.3e} {:.1} {}/s ETA {}",
                self.epochs,
                self.total_steps,
                rate(self.window),
                self.unit,
                self.eta(step)
            );
            self.pb.suspend(|| eprintln!("{line}"));
            self.last_line = Instant::now();
            self.last_line_step = step;
            self.window = (0, 0.0);
        }
        if let Some(tb) = &mut self.tb {
            let values: Vec<(String, f64)> = row
                .values
                .iter()
                .filter_map(|(k, v)| v.map(|v| (format!("train/{k}"), v)))
                .collect();
            tb.scalars(step as i64, &values)?;
        }
        Ok(())
    }

    /// A validation: its row (metric keys as in `val_metrics.parquet`, written to TensorBoard
    /// under the same names, as OML's Lightning loggers name them) and the line to print.
    pub fn validation(&mut self, row: Option<&log::Row>, line: &str) -> Result<()> {
        self.pb.suspend(|| eprintln!("{line}"));
        if let (Some(tb), Some(row)) = (&mut self.tb, row) {
            let step = row.int("step").unwrap_or(0);
            let values: Vec<(String, f64)> = row
                .values
                .iter()
                .filter_map(|(k, v)| v.map(|v| (k.clone(), v)))
                .collect();
            tb.scalars(step, &values)?;
        }
        Ok(())
    }

    /// The bar's message (e.g. "validating").
    pub fn status(&self, msg: String) {
        self.pb.set_message(msg);
    }

    pub fn finish(&self) {
        self.pb.finish_and_clear();
    }

    /// Time left at the pace since this run started (validations included).
    fn eta(&self, step: usize) -> String {
        let done = step.saturating_sub(self.start_step);
        if done == 0 {
            return "-".into();
        }
        let per = self.started.elapsed().as_secs_f64() / done as f64;
        duration(per * self.total_steps.saturating_sub(step) as f64)
    }
}

fn rate((images, seconds): (u64, f64)) -> f64 {
    images as f64 / seconds.max(1e-9)
}

/// `45s`, `12m05s`, `3h20m`.
fn duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// `--log-every` as a clap value parser.
pub fn parse_log_every(s: &str) -> std::result::Result<LogEvery, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_every_parses_steps_seconds_minutes_and_off() {
        assert_eq!("50".parse::<LogEvery>(), Ok(LogEvery::Steps(50)));
        assert_eq!("30s".parse::<LogEvery>(), Ok(LogEvery::Seconds(30.0)));
        assert_eq!("1.5m".parse::<LogEvery>(), Ok(LogEvery::Seconds(90.0)));
        assert_eq!("off".parse::<LogEvery>(), Ok(LogEvery::Off));
        assert_eq!("0".parse::<LogEvery>(), Ok(LogEvery::Off));
        assert!("-3s".parse::<LogEvery>().is_err());
        assert!("ten".parse::<LogEvery>().is_err());
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(duration(44.6), "45s");
        assert_eq!(duration(725.0), "12m05s");
        assert_eq!(duration(12_000.0), "3h20m");
    }
}
