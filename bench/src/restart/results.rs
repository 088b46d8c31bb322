//! What a run measured, the results of a side and of the benchmark, and
//! their markdown table.

use super::*;

/// Which command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Side {
    Baseline,
    Faststart,
}

impl Side {
    pub(super) fn name(self) -> &'static str {
        match self {
            Side::Baseline => "baseline",
            Side::Faststart => "faststart",
        }
    }
}

/// One start of one side.
#[derive(Clone, Debug, Serialize)]
pub(super) struct RunFigures {
    pub(super) run: usize,
    /// 1 when this side started first in its run, 2 when second.
    pub(super) position: usize,
    /// Launch to `GET /v1/models` answering 200.
    pub(super) ready_s: f64,
    /// The first completion request, sent once ready, to its full answer.
    pub(super) first_completion_s: f64,
    pub(super) ready_plus_completion_s: f64,
    pub(super) model_id: String,
    pub(super) log: PathBuf,
}

#[derive(Debug, Serialize)]
pub(super) struct SideResults {
    pub(super) command: String,
    pub(super) runs: Vec<RunFigures>,
    pub(super) median_ready_s: Option<f64>,
    pub(super) median_first_completion_s: Option<f64>,
    pub(super) median_ready_plus_completion_s: Option<f64>,
}

/// Why the benchmark stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum FailureKind {
    /// Something already listened at the URL before a start.
    PortBusy,
    /// The daemon's pool could not be emptied.
    Pool,
    /// The command could not be started.
    Start,
    /// The command exited before it was ready.
    Crash,
    /// The command was not ready within --timeout.
    Timeout,
    /// The first completion failed.
    Completion,
}

#[derive(Debug, Serialize)]
pub(super) struct Failure {
    pub(super) side: Side,
    pub(super) run: usize,
    pub(super) kind: FailureKind,
    pub(super) message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) log: Option<PathBuf>,
    pub(super) log_tail: Vec<String>,
}

impl FailureKind {
    pub(super) fn label(self) -> &'static str {
        match self {
            FailureKind::PortBusy => "port busy",
            FailureKind::Pool => "pool not emptied",
            FailureKind::Start => "not started",
            FailureKind::Crash => "crash",
            FailureKind::Timeout => "timeout",
            FailureKind::Completion => "completion failed",
        }
    }
}

impl Failure {
    pub(super) fn new(side: Side, run: usize, kind: FailureKind, message: String) -> Self {
        Self {
            side,
            run,
            kind,
            message,
            log: None,
            log_tail: Vec::new(),
        }
    }

    /// Attaches the last lines of `log`.
    pub(super) fn with_log(mut self, log: &Path) -> Self {
        self.log_tail = pgroup::log_tail(log, TAIL_LINES);
        self.log = Some(log.to_owned());
        self
    }

    /// The message with the log's last lines, for the error.
    pub(super) fn report(&self) -> String {
        let mut out = format!("{} run {}: {}", self.side.name(), self.run, self.message);
        if let Some(log) = &self.log {
            if self.log_tail.is_empty() {
                out += &format!("\n(its log {} is empty)", log.display());
            } else {
                out += &format!("\nlast lines of {}:", log.display());
                for line in &self.log_tail {
                    out += &format!("\n  {line}");
                }
            }
        }
        out
    }
}

#[derive(Debug, Serialize)]
pub(super) struct Results {
    #[serde(flatten)]
    pub(super) header: Header,
    pub(super) url: String,
    pub(super) offline: bool,
    pub(super) model: Option<String>,
    pub(super) revision: Option<String>,
    pub(super) storage_path: PathBuf,
    pub(super) server: Option<String>,
    pub(super) runs_requested: usize,
    /// The recorded variables as the commands see them (null: unset).
    pub(super) environment: BTreeMap<&'static str, Option<String>>,
    /// How the page cache (and the daemon's pool) were made cold.
    pub(super) caches: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) offline_checks: Vec<Check>,
    pub(super) log_dir: PathBuf,
    pub(super) baseline: SideResults,
    pub(super) faststart: SideResults,
    /// Median baseline ready time over median fast-start ready time.
    pub(super) speedup_ready: Option<f64>,
    /// The same for ready + first completion.
    pub(super) speedup_ready_plus_completion: Option<f64>,
    pub(super) failure: Option<Failure>,
}

pub(super) fn ratio(num: Option<f64>, den: Option<f64>) -> Option<f64> {
    match (num, den) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    }
}

pub(super) fn summarize(command: &str, runs: Vec<RunFigures>) -> SideResults {
    SideResults {
        command: command.to_owned(),
        median_ready_s: median_f64(runs.iter().map(|r| r.ready_s)),
        median_first_completion_s: median_f64(runs.iter().map(|r| r.first_completion_s)),
        median_ready_plus_completion_s: median_f64(runs.iter().map(|r| r.ready_plus_completion_s)),
        runs,
    }
}

pub(super) fn seconds(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"))
}

pub(super) fn markdown(r: &Results) -> String {
    let mut out = format!(
        "# vLLM restart: the usual start against the fast start\n\n{}- url: {}\n",
        r.header.markdown(),
        r.url
    );
    if let Some(model) = &r.model {
        out += &format!(
            "- model: {model} (revision {})\n",
            r.revision.as_deref().unwrap_or("main")
        );
    }
    out += &format!(
        "- offline: {}\n- caches: {}\n- logs: {}\n",
        if r.offline {
            "yes (HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1)"
        } else {
            "no"
        },
        r.caches,
        r.log_dir.display()
    );
    let env: Vec<String> = r
        .environment
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or("(unset)")))
        .collect();
    out += &format!("- environment of the commands: {}\n", env.join(", "));
    if !r.offline_checks.is_empty() {
        out += "\n## Offline checks\n\n";
        for c in &r.offline_checks {
            out += &format!("- {} {}: {}\n", c.status.label(), c.name, c.summary);
        }
    }
    for (title, side) in [("Baseline", &r.baseline), ("Fast start", &r.faststart)] {
        out += &format!("\n## {title}\n\n`{}`\n\n", side.command);
        let mut table = Table::new(&[
            ">run",
            ">order",
            ">ready s",
            ">first completion s",
            ">ready + completion s",
        ]);
        for f in &side.runs {
            table.row([
                f.run.to_string(),
                f.position.to_string(),
                format!("{:.3}", f.ready_s),
                format!("{:.3}", f.first_completion_s),
                format!("{:.3}", f.ready_plus_completion_s),
            ]);
        }
        table.row([
            "median".to_string(),
            String::new(),
            seconds(side.median_ready_s),
            seconds(side.median_first_completion_s),
            seconds(side.median_ready_plus_completion_s),
        ]);
        out += table.finish();
    }
    let times = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}x"));
    out += &format!(
        "\n## Speedup\n\n\
         - ready: {} (median baseline ready / median fast-start ready)\n\
         - ready + first completion: {}\n",
        times(r.speedup_ready),
        times(r.speedup_ready_plus_completion)
    );
    if let Some(f) = &r.failure {
        out += &format!(
            "\n## Failure\n\n{} run {} ({}): {}\n",
            f.side.name(),
            f.run,
            f.kind.label(),
            f.message
        );
        if let Some(log) = &f.log {
            out += &format!("\nLast lines of {}:\n\n```\n", log.display());
            for line in &f.log_tail {
                out += line;
                out += "\n";
            }
            out += "```\n";
        }
    }
    out
}
