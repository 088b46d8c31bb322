//! A progress bar with bytes/s on stderr, drawn only when stderr is a terminal.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use sllm_format::progress::Progress;

/// Draws the library's progress reports as a bar.
pub struct TermProgress {
    bar: ProgressBar,
    /// A warning said when the work first begins: after the checks that
    /// could refuse it, so that it never stands before an unrelated error.
    notice: std::sync::Mutex<Option<String>>,
}

impl TermProgress {
    pub fn new() -> Self {
        let bar = if std::io::stderr().is_terminal() {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>10} [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        Self {
            bar,
            notice: std::sync::Mutex::new(None),
        }
    }

    /// The same, saying `warning` (as `warning: ...` on stderr) once, when
    /// the work begins.
    pub fn warning_at_start(warning: Option<String>) -> Self {
        let progress = Self::new();
        *progress
            .notice
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = warning;
        progress
    }
}

impl Progress for TermProgress {
    fn begin(&self, what: &str, total_bytes: u64) {
        let notice = self
            .notice
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(warning) = notice {
            self.bar.suspend(|| eprintln!("warning: {warning}"));
        }
        self.bar.reset();
        self.bar.set_length(total_bytes);
        self.bar.set_message(what.to_owned());
    }

    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
