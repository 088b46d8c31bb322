//! What a run measured, the results of a side and of the benchmark, the
//! comparison of the answers, and the markdown report.

use super::*;

/// Which command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Side {
    Baseline,
    Faststart,
}

impl Side {
    /// The name in file names and JSON: `baseline`, `faststart`.
    pub(super) fn name(self) -> &'static str {
        match self {
            Side::Baseline => "baseline",
            Side::Faststart => "faststart",
        }
    }

    /// The name in sentences: `baseline`, `fast start`.
    pub(super) fn label(self) -> &'static str {
        match self {
            Side::Baseline => "baseline",
            Side::Faststart => "fast start",
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
    /// The model id the first completion asked for, and the model it names.
    #[serde(flatten)]
    pub(super) served: Served,
    /// Every id `/v1/models` listed.
    pub(super) listed: Vec<String>,
    /// The text of the first completion (temperature 0).
    pub(super) completion_text: String,
    pub(super) log: PathBuf,
}

#[derive(Debug, Serialize)]
pub(super) struct SideResults {
    /// The command, secrets masked.
    pub(super) command: String,
    /// The base URL it serves at.
    pub(super) url: String,
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
    /// The side serves another model than --model or than the other side.
    WrongModel,
    /// The server refused the benchmark's requests (HTTP 401 or 403): it
    /// wants an API key, or another one.
    Unauthorized,
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
            FailureKind::WrongModel => "different models",
            FailureKind::Unauthorized => "API key refused",
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

    /// The same with the secrets in its message and log lines masked.
    pub(super) fn masked(mut self, secrets: &Secrets) -> Self {
        self.message = secrets.mask(&self.message);
        for line in &mut self.log_tail {
            *line = secrets.mask(line);
        }
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
    /// Whether the commands started with the Hugging Face Hub switched off:
    /// yes, no, unknown (a container, or set where the benchmark does not
    /// read it) or mixed; `offline_sides` says why.
    pub(super) offline: Offline,
    pub(super) offline_sides: OfflineSides,
    pub(super) model: Option<String>,
    pub(super) revision: Option<String>,
    pub(super) storage_path: PathBuf,
    pub(super) server: Option<String>,
    pub(super) runs_requested: usize,
    /// The recorded variables as sllm-bench passes them (null: unset;
    /// secrets masked).
    pub(super) environment: BTreeMap<&'static str, Option<String>>,
    /// How the page cache (and the daemon's pool) were made cold.
    pub(super) caches: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) offline_checks: Vec<Check>,
    /// The doctor's findings that qualify the figures (with --model).
    pub(super) caveats: Vec<Caveat>,
    pub(super) log_dir: PathBuf,
    pub(super) baseline: SideResults,
    pub(super) faststart: SideResults,
    /// Median baseline ready time over median fast-start ready time.
    pub(super) speedup_ready: Option<f64>,
    /// The same for ready + first completion.
    pub(super) speedup_ready_plus_completion: Option<f64>,
    /// Whether both sides gave the same first completion.
    pub(super) answers: Answers,
    pub(super) failure: Option<Failure>,
}

/// The first completions of both sides compared.
#[derive(Debug, Serialize)]
pub(super) struct Answers {
    /// True when every first completion of both sides had the same text;
    /// null when a side has none.
    pub(super) same: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) warning: Option<String>,
}

/// The distinct texts of `runs`, in the order they first came.
fn distinct_texts(runs: &[RunFigures]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for r in runs {
        if !out.contains(&r.completion_text.as_str()) {
            out.push(&r.completion_text);
        }
    }
    out
}

/// `text` as a quoted string, cut to [`TEXT_QUOTE`] characters.
fn quote_text(text: &str) -> String {
    let cut: String = text.chars().take(TEXT_QUOTE).collect();
    if cut.len() < text.len() {
        format!("{cut:?}...")
    } else {
        format!("{cut:?}")
    }
}

/// Compares the sides' first completions (temperature 0, the same prompt:
/// the same weights answer the same).
pub(super) fn compare_answers(baseline: &[RunFigures], faststart: &[RunFigures]) -> Answers {
    let (b, f) = (distinct_texts(baseline), distinct_texts(faststart));
    if b.is_empty() || f.is_empty() {
        return Answers {
            same: None,
            warning: None,
        };
    }
    let list = |texts: &[&str]| {
        texts
            .iter()
            .map(|t| quote_text(t))
            .collect::<Vec<_>>()
            .join(" and ")
    };
    let warning = if b != f {
        Some(format!(
            "the first completions differ between the sides (temperature 0, the same prompt): \
             the baseline answered {} and the fast start {}. They may not serve the same \
             weights (another revision, a stale conversion, another dtype), and then their \
             times do not compare",
            list(&b),
            list(&f)
        ))
    } else if b.len() > 1 {
        Some(format!(
            "the first completions differ from run to run on both sides alike (temperature 0): \
             {}. Greedy decoding should repeat itself; check the engine before trusting the \
             comparison",
            list(&b)
        ))
    } else {
        None
    };
    Answers {
        same: Some(warning.is_none()),
        warning,
    }
}

pub(super) fn ratio(num: Option<f64>, den: Option<f64>) -> Option<f64> {
    match (num, den) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    }
}

pub(super) fn summarize(command: &str, url: &str, runs: Vec<RunFigures>) -> SideResults {
    SideResults {
        command: command.to_owned(),
        url: url.to_owned(),
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
        "# vLLM restart: the usual start against the fast start\n\n{}",
        r.header.markdown()
    );
    if r.baseline.url == r.faststart.url {
        out += &format!("- url: {}\n", r.baseline.url);
    } else {
        out += &format!(
            "- urls: baseline {}, fast start {}\n",
            r.baseline.url, r.faststart.url
        );
    }
    if let Some(model) = &r.model {
        out += &format!(
            "- model: {model} (revision {})\n",
            r.revision.as_deref().unwrap_or("main")
        );
    }
    out += &format!(
        "- offline: {}\n- caches: {}\n- logs: {}\n",
        r.offline_sides.describe(),
        r.caches,
        r.log_dir.display()
    );
    let env: Vec<String> = r
        .environment
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or("(unset)")))
        .collect();
    out += &format!(
        "- environment of the commands (as sllm-bench passes it): {}\n",
        env.join(", ")
    );
    if !r.offline_checks.is_empty() {
        out += "\n## Offline checks\n\n";
        for c in &r.offline_checks {
            out += &format!("- {} {}: {}\n", c.status.label(), c.name, c.summary);
        }
    }
    if r.model.is_some() {
        out += "\n## What was timed\n\n";
        if r.caveats.is_empty() {
            out += "The doctor found nothing that qualifies the figures (snapshot complete, \
                    storage drive, conversion up to date).\n";
        }
        for c in &r.caveats {
            out += &format!(
                "- **{}.** The doctor's `{}`: {}\n",
                c.meaning, c.check.name, c.check.summary
            );
        }
    }
    for (title, side) in [("Baseline", &r.baseline), ("Fast start", &r.faststart)] {
        out += &format!("\n## {title}\n\n`{}`\n\n", side.command);
        if let Some(first) = side.runs.first() {
            out += &format!("Serves {}.\n\n", first.served.describe());
        }
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
    out += "\n## Answers\n\n";
    match (&r.answers.same, &r.answers.warning) {
        (None, _) => out += "Not compared: a side has no completion.\n",
        (Some(_), Some(w)) => out += &format!("**Warning:** {w}.\n"),
        (Some(_), None) => {
            let text = r.baseline.runs.first().map(|f| f.completion_text.as_str());
            out += &format!(
                "Every first completion of both sides was the same (temperature 0): {}.\n",
                quote_text(text.unwrap_or_default())
            );
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str) -> RunFigures {
        RunFigures {
            run: 1,
            position: 1,
            ready_s: 1.0,
            first_completion_s: 0.1,
            ready_plus_completion_s: 1.1,
            served: Served {
                listed: "org/name".into(),
                model: "org/name".into(),
            },
            listed: vec!["org/name".into()],
            completion_text: text.into(),
            log: PathBuf::from("x.log"),
        }
    }

    #[test]
    fn answers_are_compared_across_and_within_the_sides() {
        let same = compare_answers(&[run(" Paris"), run(" Paris")], &[run(" Paris")]);
        assert_eq!((same.same, same.warning), (Some(true), None));
        let differ = compare_answers(&[run(" Paris")], &[run(" Lyon")]);
        assert_eq!(differ.same, Some(false));
        let w = differ.warning.unwrap();
        assert!(w.contains("\" Paris\"") && w.contains("\" Lyon\""), "{w}");
        let wobble = compare_answers(&[run("a"), run("b")], &[run("a"), run("b")]);
        assert_eq!(wobble.same, Some(false));
        assert!(wobble.warning.unwrap().contains("from run to run"));
        assert_eq!(compare_answers(&[], &[run("a")]).same, None);
    }

    #[test]
    fn long_answers_are_cut_in_the_warning() {
        let q = quote_text(&"x".repeat(TEXT_QUOTE + 50));
        assert!(q.ends_with("\"..."), "{q}");
        assert_eq!(q.len(), TEXT_QUOTE + 2 + 3);
    }
}
