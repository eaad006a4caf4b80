//! Live displays on a terminal's stderr (indicatif): a status line per service while a
//! fan-out runs, and a progress bar for batches. Nothing is drawn when stderr is not a terminal.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::dispatch::{Observer, Progress};

/// One status line per service, or, when they would not fit on the terminal, one line
/// counting the services in each state.
pub struct StatusLines {
    multi: MultiProgress,
    lines: Lines,
}

enum Lines {
    PerService(HashMap<String, ProgressBar>),
    /// Each service's last progress; `None` while it waits.
    Counted { bar: ProgressBar, states: Mutex<HashMap<String, Option<Progress>>> },
}

impl StatusLines {
    /// Lines for `services`, or `None` when stderr is not a terminal.
    pub fn new(services: &[String]) -> Option<Arc<StatusLines>> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{spinner} {prefix:<14} {wide_msg}").unwrap_or_else(|_| ProgressStyle::default_spinner());
        // A line more than the terminal has would scroll away and tangle the display.
        let rows = console::Term::stderr().size_checked().map_or(usize::MAX, |(rows, _)| usize::from(rows));
        let lines = if services.len() < rows {
            let bars = services
                .iter()
                .map(|name| {
                    let bar = multi.add(ProgressBar::new_spinner().with_style(style.clone()).with_prefix(name.clone()));
                    bar.set_message("waiting");
                    bar.enable_steady_tick(Duration::from_millis(100));
                    (name.clone(), bar)
                })
                .collect();
            Lines::PerService(bars)
        } else {
            let bar = multi.add(ProgressBar::new_spinner().with_style(style).with_prefix(format!("{} services", services.len())));
            bar.set_message(format!("{} waiting", services.len()));
            bar.enable_steady_tick(Duration::from_millis(100));
            Lines::Counted { bar, states: Mutex::new(services.iter().map(|s| (s.clone(), None)).collect()) }
        };
        Some(Arc::new(StatusLines { multi, lines }))
    }

    /// An observer that updates the lines.
    pub fn observer(self: &Arc<Self>) -> Observer {
        let lines = self.clone();
        Arc::new(move |service: &str, progress: Progress| match &lines.lines {
            Lines::PerService(bars) => {
                if let Some(bar) = bars.get(service) {
                    show(bar, progress);
                }
            }
            Lines::Counted { bar, states } => {
                let mut states = states.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                states.insert(service.to_string(), Some(progress));
                bar.set_message(counts(states.values()));
            }
        })
    }

    /// Runs `print` with the lines hidden, so output does not tangle with them.
    pub fn suspend<R>(&self, print: impl FnOnce() -> R) -> R {
        self.multi.suspend(print)
    }

    /// Removes the lines.
    pub fn clear(&self) {
        match &self.lines {
            Lines::PerService(bars) => bars.values().for_each(ProgressBar::finish_and_clear),
            Lines::Counted { bar, .. } => bar.finish_and_clear(),
        }
        let _ = self.multi.clear();
    }
}

/// One service's line in its new state.
fn show(bar: &ProgressBar, progress: Progress) {
    match progress {
        Progress::Running => {
            bar.reset_elapsed();
            bar.set_style(ProgressStyle::with_template("{spinner} {prefix:<14} running {elapsed}").unwrap_or_else(|_| ProgressStyle::default_spinner()));
        }
        Progress::Retrying(wait) => {
            bar.set_style(ProgressStyle::with_template("{spinner} {prefix:<14} {wide_msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()));
            bar.set_message(format!("retrying in {:.1} s", wait.as_secs_f64()));
        }
        Progress::Finished(ok) => {
            bar.set_style(ProgressStyle::with_template("  {prefix:<14} {wide_msg}").unwrap_or_else(|_| ProgressStyle::default_spinner()));
            bar.finish_with_message(if ok { "done" } else { "failed" });
        }
    }
}

/// "3 waiting, 12 running, 1 retrying, 40 done, 2 failed", leaving out the states no
/// service is in.
fn counts<'a>(states: impl Iterator<Item = &'a Option<Progress>>) -> String {
    let mut n = [0usize; 5];
    for state in states {
        n[match state {
            None => 0,
            Some(Progress::Running) => 1,
            Some(Progress::Retrying(_)) => 2,
            Some(Progress::Finished(true)) => 3,
            Some(Progress::Finished(false)) => 4,
        }] += 1;
    }
    let words = ["waiting", "running", "retrying", "done", "failed"];
    let parts: Vec<String> = n.iter().zip(words).filter(|(n, _)| **n > 0).map(|(n, w)| format!("{n} {w}")).collect();
    parts.join(", ")
}

/// A batch's progress bar: done, failed and running counts and an ETA.
pub struct BatchBar {
    bar: ProgressBar,
}

impl BatchBar {
    /// A bar for `total` jobs (a spinner when unknown), or `None` when stderr is not a terminal.
    pub fn new(total: Option<u64>) -> Option<BatchBar> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = match total {
            Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()).with_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} done, {msg}, ETA {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
                .with_style(ProgressStyle::with_template("{spinner} {pos} done, {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner())),
        };
        bar.set_message("0 failed, 0 running");
        bar.enable_steady_tick(Duration::from_millis(200));
        Some(BatchBar { bar })
    }

    pub fn update(&self, done: u64, failed: u64, running: u64) {
        self.bar.set_position(done);
        self.bar.set_message(format!("{failed} failed, {running} running"));
    }

    pub fn clear(&self) {
        self.bar.finish_and_clear();
    }
}
