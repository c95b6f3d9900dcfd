//! Progress shown while training: a bar on a terminal, plain lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use kiln_core::ProgressMode;

/// Lines mode prints at most this often (plus at every epoch end).
const LINE_INTERVAL: Duration = Duration::from_secs(5);

pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
    last_line: Instant,
    total_steps: u64,
}

impl Progress {
    pub fn new(mode: ProgressMode, total_steps: u64) -> Self {
        let mode = match mode {
            ProgressMode::Auto => {
                let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
                if std::io::stderr().is_terminal() && !ci {
                    ProgressMode::Bar
                } else {
                    ProgressMode::Lines
                }
            }
            // burn-train's dashboard draws the progress itself.
            ProgressMode::Tui => ProgressMode::Off,
            m => m,
        };
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar = ProgressBar::new(total_steps);
            let style = ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} steps ({eta}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Self {
            bar,
            lines: mode == ProgressMode::Lines,
            last_line: Instant::now(),
            total_steps,
        }
    }

    pub fn epoch(&self, epoch: usize, n_epochs: usize) {
        if let Some(bar) = &self.bar {
            bar.set_prefix(format!("epoch {}/{n_epochs}", epoch + 1));
        }
    }

    pub fn step(&mut self, step: u64, epoch: usize, loss: f64, lr: f64, items_per_s: f64) {
        let msg = format!("loss {loss:.4} lr {lr:.2e} {items_per_s:.0}/s");
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.set_message(msg);
        } else if self.lines && (self.last_line.elapsed() >= LINE_INTERVAL || step == 1) {
            self.last_line = Instant::now();
            eprintln!(
                "kiln: epoch {} step {step}/{} {msg}",
                epoch + 1,
                self.total_steps
            );
        }
    }

    pub fn validation(&mut self, epoch: usize, metrics: &[(&'static str, f64)]) {
        let text: Vec<String> = metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
        let line = format!("kiln: epoch {} validation: {}", epoch + 1, text.join(", "));
        if let Some(bar) = &self.bar {
            bar.println(line);
        } else if self.lines {
            self.last_line = Instant::now();
            eprintln!("{line}");
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
