//! `sllm-bench restart`: the vLLM restart benchmark of the runbook as one
//! command. Two shell commands start the same model: the usual way (the
//! baseline) and loading through sllm-store (the fast start), behind one
//! URL or one each. Every run starts each side in turn, the order
//! alternating run by run, and times launch to `GET /v1/models` answering
//! 200 ("ready") and the first completion after it (temperature 0); then it
//! stops the command with all its children before the next start.
//!
//! What it guards against, besides crashes and hangs: two sides that serve
//! different models (refused: see [`served`]), answers that differ (a
//! warning), a baseline that may have timed a download or a fast start
//! that read from the OS disk or a stale conversion (caveats from the
//! doctor, in the report; under `--offline` a stale conversion refuses the
//! run), an offline mode claimed where it cannot be known (see [`timed`]),
//! and secrets written into the results (see [`mask`]).
//!
//! A crash, a timeout, a failed completion or a wrong model ends the
//! benchmark: what was measured is still reported and written, with the
//! failure and the last lines of the command's log, and the command exits
//! non-zero.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use serde::Serialize;
use sllm_convert::import::hf_cache::HfCache;
use sllm_doctor::services::local_agent;
use sllm_doctor::{self as doctor, Check, HfEnv, Status};

use crate::cache::{drop_caches, files_under};
use crate::machine::Machine;
use crate::pgroup::{self, ProcessGroup};
use crate::report::{Header, OutputArgs, Table, median_f64};

/// How often `/v1/models` is polled.
const POLL: Duration = Duration::from_millis(50);
/// The limit of one poll: connect and answer.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);
/// Lines of a command's log quoted in a failure.
const TAIL_LINES: usize = 20;
/// Bytes of a bad answer quoted in a failure.
const BODY_QUOTE: usize = 500;
/// Characters of a completion's text quoted in a warning.
const TEXT_QUOTE: usize = 200;

/// The environment variables recorded as the commands see them (a secret's
/// value is masked).
const RECORDED_ENV: [&str; 7] = [
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN",
    "CUDA_VISIBLE_DEVICES",
    "STORAGE_PATH",
];
/// What `--offline` sets in the commands' environment.
const OFFLINE_ENV: [(&str, &str); 2] = [("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")];

#[derive(Args, Debug)]
pub struct RestartArgs {
    /// Shell command that starts vLLM the usual way (run with `sh -c`, in
    /// the foreground: no `&`, no `docker run -d`).
    #[arg(long)]
    baseline: String,
    /// Shell command that starts vLLM loading through sllm-store.
    #[arg(long)]
    faststart: String,
    /// The base URL both commands serve at, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    url: Option<String>,
    /// The base URL the baseline serves at, when it has its own port
    /// [default: --url].
    #[arg(long)]
    baseline_url: Option<String>,
    /// The base URL the fast start serves at, when it has its own port
    /// [default: --url].
    #[arg(long)]
    faststart_url: Option<String>,
    /// Runs per side; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Drop the page cache before every start: all of it as root, else the
    /// files of --model (its Hugging Face snapshot and converted copy).
    #[arg(long)]
    drop_caches: bool,
    /// Start both commands with HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1,
    /// after checking that both can start offline (needs --model).
    #[arg(long)]
    offline: bool,
    /// The Hugging Face model both commands serve, e.g. org/name: each side
    /// must serve it, and the doctor's findings about it are reported.
    #[arg(long)]
    model: Option<String>,
    /// The model's revision (a ref such as `main`, or a commit hash).
    #[arg(long, default_value = "main")]
    revision: String,
    /// sllm-store's storage path [default: $STORAGE_PATH, else ~/models].
    #[arg(long)]
    storage_path: Option<PathBuf>,
    /// The sllm-store daemon (host:port or unix:<path>): its pool is emptied
    /// before every fast start, so that each one starts cold.
    #[arg(long)]
    server: Option<String>,
    /// Seconds a start may take to get ready, and the first completion to answer.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Seconds between the progress lines (on stderr) while a start waits
    /// to be ready.
    #[arg(long, default_value_t = 20)]
    progress_every: u64,
    /// The prompt of the first completion.
    #[arg(long, default_value = "The capital of France is")]
    prompt: String,
    /// `max_tokens` of the first completion.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// The API key the servers want (what the commands pass to vLLM's
    /// --api-key), sent as `Authorization: Bearer`; kept out of the results.
    #[arg(long, env = "VLLM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Where the commands' logs go, as <side>-run<k>.log [default: a new
    /// directory under the system temp dir].
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Directory the results go into under their default names [default:
    /// the current directory].
    #[arg(long)]
    out: Option<PathBuf>,
    /// JSON output [default: restart-<host>-<date and time>.json in --out;
    /// never overwritten].
    #[arg(long)]
    json: Option<PathBuf>,
    /// Markdown output [default: beside the JSON, .md].
    #[arg(long)]
    markdown: Option<PathBuf>,
}

mod mask;
mod probe;
mod results;
mod served;
mod setup;
mod timed;

use mask::{MASKED, Secrets, is_secret_var};
use probe::*;
use results::*;
use served::*;
use setup::*;
use timed::*;

/// The base URL of each side.
struct Urls {
    baseline: String,
    faststart: String,
}

impl Urls {
    fn of(&self, side: Side) -> &str {
        match side {
            Side::Baseline => &self.baseline,
            Side::Faststart => &self.faststart,
        }
    }

    /// Each URL once.
    fn distinct(&self) -> Vec<&str> {
        let mut v = vec![self.baseline.as_str()];
        if self.faststart != self.baseline {
            v.push(&self.faststart);
        }
        v
    }
}

/// What every start needs.
struct Bench<'a> {
    args: &'a RestartArgs,
    urls: Urls,
    storage_path: PathBuf,
    env: Vec<(&'static str, &'static str)>,
    log_dir: PathBuf,
    /// Masks the commands as their logs quote them.
    secrets: &'a Secrets,
    cache_files: Vec<PathBuf>,
    /// What `drop_caches` reported, once it ran.
    drop_method: Option<&'static str>,
    /// The first model a side served, which the other side must serve too.
    reference: Option<(Side, Served)>,
}

/// What one start measured and answered.
struct Measured {
    ready_s: f64,
    first_completion_s: f64,
    listed: Vec<String>,
    served: Served,
    completion_text: String,
}

pub fn run(args: RestartArgs) -> anyhow::Result<()> {
    let urls = validate(&args)?;
    let storage_path = sllm_format::config::resolve_storage_path(args.storage_path.as_deref());
    let secrets = Secrets::new(&[&args.baseline, &args.faststart], args.api_key.as_deref());

    let offline_checks = match (&args.model, args.offline) {
        (Some(model), true) => offline_checks(&storage_path, model, &args.revision)?,
        _ => Vec::new(),
    };
    let offline = OfflineSides {
        baseline: side_offline(Side::Baseline, &args.baseline, args.offline, |n| {
            std::env::var_os(n)
        }),
        faststart: side_offline(Side::Faststart, &args.faststart, args.offline, |n| {
            std::env::var_os(n)
        }),
    };
    let caveats = match &args.model {
        Some(model) => {
            let hf = if args.offline {
                HfEnv::from_env().offline()
            } else {
                HfEnv::from_env()
            };
            caveats(&hf, &storage_path, model, &args.revision, &offline_checks)
        }
        None => Vec::new(),
    };
    for c in &caveats {
        tracing::warn!(
            "what is timed: {} (the doctor's {}: {})",
            c.meaning,
            c.check.name,
            c.check.summary
        );
    }
    if let Some(addr) = &args.server {
        clear_pool(addr).with_context(|| {
            format!("emptying the pool of the sllm-store daemon at {addr} (--server)")
        })?;
    }
    for url in urls.distinct() {
        if let Some(what) = port_taken(url) {
            bail!(
                "something already answers at {url} ({what}) before the first start: stop it \
                 (a vLLM left from an earlier run?) or pass the URL your commands serve at \
                 (--url, or --baseline-url and --faststart-url)"
            );
        }
    }
    if args.drop_caches && args.model.is_none() && !rustix::process::geteuid().is_root() {
        tracing::warn!(
            "--drop-caches without root and without --model drops nothing: only root can drop \
             the whole page cache, and without --model no files are known to evict; starts \
             will be warm"
        );
    }
    let cache_files = match (&args.model, args.drop_caches) {
        (Some(model), true) => model_files(&storage_path, model, &args.revision),
        _ => Vec::new(),
    };
    let log_dir = match &args.log_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the log directory {}", dir.display()))?;
            dir.clone()
        }
        None => pgroup::new_log_dir("sllm-bench-restart-")?,
    };
    tracing::info!("logs of the commands go to {}", log_dir.display());
    pgroup::stop_groups_on_signals()?;

    let mut bench = Bench {
        args: &args,
        urls,
        storage_path: storage_path.clone(),
        env: if args.offline {
            OFFLINE_ENV.to_vec()
        } else {
            Vec::new()
        },
        log_dir: log_dir.clone(),
        secrets: &secrets,
        cache_files,
        drop_method: None,
        reference: None,
    };
    let mut measured: Vec<(Side, RunFigures)> = Vec::new();
    let mut failure = None;
    'runs: for run in 1..=args.runs {
        // Alternate the order so that neither side always follows the other.
        let order = if run % 2 == 1 {
            [Side::Baseline, Side::Faststart]
        } else {
            [Side::Faststart, Side::Baseline]
        };
        for (i, side) in order.into_iter().enumerate() {
            match bench.start(side, run, i + 1) {
                Ok(figures) => measured.push((side, figures)),
                Err(f) => {
                    let f = f.masked(&secrets);
                    tracing::error!("{} run {run} failed: {}", side.name(), f.message);
                    failure = Some(f);
                    break 'runs;
                }
            }
        }
    }

    let machine_dir = if storage_path.is_dir() {
        storage_path.clone()
    } else {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
    };
    let side_results = |side: Side, command: &str| {
        summarize(
            &secrets.mask(command),
            bench.urls.of(side),
            measured
                .iter()
                .filter(|(s, _)| *s == side)
                .map(|(_, f)| f.clone())
                .collect(),
        )
    };
    let baseline = side_results(Side::Baseline, &args.baseline);
    let faststart = side_results(Side::Faststart, &args.faststart);
    let answers = compare_answers(&baseline.runs, &faststart.runs);
    if let Some(warning) = &answers.warning {
        tracing::warn!("{warning}");
    }
    // Figures of two different models are no speed-up.
    let comparable = failure
        .as_ref()
        .is_none_or(|f: &Failure| f.kind != FailureKind::WrongModel);
    let speedup = |b: Option<f64>, f: Option<f64>| if comparable { ratio(b, f) } else { None };
    let mut header = Header::new("restart", Machine::probe(&machine_dir));
    header.command = secrets.mask(&header.command);
    let results = Results {
        header,
        offline: offline.mode(),
        offline_sides: offline,
        model: args.model.clone(),
        revision: args.model.as_ref().map(|_| args.revision.clone()),
        storage_path,
        server: args.server.clone(),
        runs_requested: args.runs,
        environment: command_env(args.offline),
        caches: describe_caches(&bench),
        offline_checks,
        caveats,
        log_dir,
        speedup_ready: speedup(baseline.median_ready_s, faststart.median_ready_s),
        speedup_ready_plus_completion: speedup(
            baseline.median_ready_plus_completion_s,
            faststart.median_ready_plus_completion_s,
        ),
        answers,
        baseline,
        faststart,
        failure,
    };
    let out = OutputArgs {
        out: args.out.clone(),
        json: args.json.clone(),
        markdown: args.markdown.clone(),
        sllm_store: None,
    };
    out.save(&results.header, &results, &markdown(&results))?;
    if let Some(f) = &results.failure {
        bail!(
            "the restart benchmark stopped: {}\n(what was measured before is in the results above)",
            f.report()
        );
    }
    Ok(())
}

/// `url` checked as a base URL vLLM serves at, without a trailing slash.
fn base_url(flag: &str, url: &str) -> anyhow::Result<String> {
    let host_part = url.strip_prefix("http://").unwrap_or("");
    ensure!(
        !host_part.trim_end_matches('/').contains('/'),
        "{flag} {url:?}: give the base URL without a path (http://host:port, not .../v1): the \
         benchmark asks <url>/v1/models and <url>/v1/completions"
    );
    ensure!(
        url.starts_with("http://") && url.len() > "http://".len(),
        "{flag} {url:?}: give the base URL vLLM serves at as http://host:port (https is not \
         supported)"
    );
    Ok(url.trim_end_matches('/').to_owned())
}

fn validate(args: &RestartArgs) -> anyhow::Result<Urls> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    ensure!(args.timeout > 0, "--timeout must be at least 1 (seconds)");
    ensure!(
        args.progress_every > 0,
        "--progress-every must be at least 1 (seconds)"
    );
    ensure!(args.max_tokens > 0, "--max-tokens must be at least 1");
    ensure!(
        !args.baseline.trim().is_empty() && !args.faststart.trim().is_empty(),
        "--baseline and --faststart must be shell commands that start vLLM"
    );
    let side_url = |side: Side, flag: &str, own: &Option<String>| match (own, &args.url) {
        (Some(url), _) => base_url(flag, url),
        (None, Some(url)) => base_url("--url", url),
        (None, None) => bail!(
            "no URL for the {}: give --url <http://host:port> when both commands serve at one \
             URL, or --baseline-url and --faststart-url when each has its own port",
            side.label()
        ),
    };
    let urls = Urls {
        baseline: side_url(Side::Baseline, "--baseline-url", &args.baseline_url)?,
        faststart: side_url(Side::Faststart, "--faststart-url", &args.faststart_url)?,
    };
    ensure!(
        !args.offline || args.model.is_some(),
        "--offline needs --model <org/name>: the check that both commands can start offline \
         looks for that model's snapshot in the Hugging Face cache and its converted copy in the \
         storage path"
    );
    Ok(urls)
}

impl Bench<'_> {
    /// Makes the run cold, starts `side`, times it to ready and through the
    /// first completion, and stops it.
    fn start(&mut self, side: Side, run: usize, position: usize) -> Result<RunFigures, Failure> {
        let fail = |kind, message| Failure::new(side, run, kind, message);
        if self.args.drop_caches {
            self.drop_method = Some(drop_caches(&self.cache_files));
        }
        if side == Side::Faststart
            && let Some(addr) = &self.args.server
        {
            clear_pool(addr).map_err(|e| {
                fail(
                    FailureKind::Pool,
                    format!("emptying the pool of the daemon at {addr}: {e:#}"),
                )
            })?;
        }
        let url = self.urls.of(side).to_owned();
        if let Some(what) = port_taken(&url) {
            return Err(fail(
                FailureKind::PortBusy,
                format!(
                    "something already answers at {url} ({what}) before the start: the previous \
                     command left a process behind, or another server uses the port"
                ),
            ));
        }
        let command = match side {
            Side::Baseline => &self.args.baseline,
            Side::Faststart => &self.args.faststart,
        };
        let log = self.log_dir.join(format!("{}-run{run}.log", side.name()));
        tracing::info!(
            "{} run {run}: starting (log {})",
            side.name(),
            log.display()
        );
        let started = Instant::now();
        let shown = self.secrets.mask(command);
        let mut group = ProcessGroup::spawn(command, &shown, &self.env, &log)
            .map_err(|e| fail(FailureKind::Start, format!("{e:#}")))?;
        let label = format!("{} run {run}", side.name());
        let outcome = self.measure(side, &label, &url, &log, &mut group, started);
        let stopped = group.stop();
        tracing::info!("{} run {run}: stopped: {stopped}", side.name());
        match outcome {
            Ok(m) => Ok(RunFigures {
                run,
                position,
                ready_s: m.ready_s,
                first_completion_s: m.first_completion_s,
                ready_plus_completion_s: m.ready_s + m.first_completion_s,
                served: m.served,
                listed: m.listed,
                completion_text: m.completion_text,
                log,
            }),
            Err((kind, message)) => Err(fail(kind, message).with_log(&log)),
        }
    }

    /// Ready time, what it serves and the first completion of a started
    /// group serving at `url`.
    fn measure(
        &mut self,
        side: Side,
        label: &str,
        url: &str,
        log: &Path,
        group: &mut ProcessGroup,
        started: Instant,
    ) -> Result<Measured, (FailureKind, String)> {
        let timeout = Duration::from_secs(self.args.timeout);
        let progress_every = Duration::from_secs(self.args.progress_every);
        let poller = local_agent(POLL_TIMEOUT);
        let key = self.args.api_key.as_deref();
        let mut last: String;
        let mut progress_at = started + progress_every;
        let (ready_s, listed) = loop {
            let tick = Instant::now();
            if let Some(status) = group.try_exit() {
                return Err(crash(status, started));
            }
            match probe_models(&poller, url, key) {
                Ok(listed) => break (started.elapsed().as_secs_f64(), listed),
                Err(NotReady::Unauthorized(status)) => {
                    return Err((FailureKind::Unauthorized, unauthorized(url, status, key)));
                }
                Err(NotReady::Other(why)) => last = why,
            }
            if let Some(status) = group.try_exit() {
                return Err(crash(status, started));
            }
            if started.elapsed() >= timeout {
                return Err((
                    FailureKind::Timeout,
                    format!(
                        "not ready after {} s: GET {url}/v1/models never answered 200 (last \
                         attempt: {last}); raise --timeout if it is just slow",
                        self.args.timeout
                    ),
                ));
            }
            if Instant::now() >= progress_at {
                tracing::info!(
                    "{label}: still waiting to be ready, {:.0} s since the start (GET \
                     {url}/v1/models: {last}; log {})",
                    started.elapsed().as_secs_f64(),
                    log.display()
                );
                progress_at += progress_every;
            }
            std::thread::sleep(POLL.saturating_sub(tick.elapsed()));
        };
        tracing::info!("{label}: ready after {ready_s:.2} s (pid {})", group.pid());
        let served = check_served(
            side,
            &listed,
            &self.storage_path,
            self.args.model.as_deref(),
            self.reference.as_ref(),
        )
        .map_err(|e| (FailureKind::WrongModel, e))?;
        self.reference.get_or_insert_with(|| (side, served.clone()));
        let completion = first_completion(
            &local_agent(timeout),
            url,
            &served.listed,
            &self.args.prompt,
            self.args.max_tokens,
            key,
        );
        match completion {
            Ok((seconds, text)) => {
                tracing::info!("{label}: first completion in {seconds:.3} s: {text:?}");
                Ok(Measured {
                    ready_s,
                    first_completion_s: seconds,
                    listed,
                    served,
                    completion_text: text,
                })
            }
            Err(e) => {
                let exited = group
                    .try_exit()
                    .map(|s| format!(" (the command has exited: {s})"))
                    .unwrap_or_default();
                Err((
                    FailureKind::Completion,
                    format!(
                        "ready after {ready_s:.1} s, but the first completion failed: {e}{exited}"
                    ),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_upper_middle() {
        assert_eq!(median_f64([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median_f64([4.0, 1.0]), Some(4.0));
        assert_eq!(median_f64([]), None);
    }

    #[test]
    fn speedup_needs_both_sides() {
        assert_eq!(ratio(Some(6.0), Some(2.0)), Some(3.0));
        assert_eq!(ratio(Some(6.0), None), None);
        assert_eq!(ratio(Some(6.0), Some(0.0)), None);
    }

    #[test]
    fn a_completion_needs_200_and_choices() {
        assert_eq!(
            check_completion(200, r#"{"choices":[{"text":" x"}]}"#).as_deref(),
            Ok(" x")
        );
        let e = check_completion(200, r#"{"choices":[]}"#).unwrap_err();
        assert!(e.contains("no choices"), "{e}");
        let e = check_completion(500, "boom").unwrap_err();
        assert!(e.contains("HTTP 500") && e.contains("boom"), "{e}");
        let e = check_completion(200, "not json").unwrap_err();
        assert!(e.contains("not JSON"), "{e}");
    }

    #[test]
    fn long_bodies_are_cut_on_a_character_boundary() {
        let body = "é".repeat(400);
        let q = quote(&body);
        assert!(q.ends_with("(800 bytes in all)"), "{q}");
        assert!(q.len() < 600);
    }

    #[test]
    fn offline_mode_shows_in_the_recorded_environment() {
        let env = command_env(true);
        assert_eq!(env["HF_HUB_OFFLINE"].as_deref(), Some("1"));
        assert_eq!(env["TRANSFORMERS_OFFLINE"].as_deref(), Some("1"));
        assert_eq!(env.len(), RECORDED_ENV.len());
    }
}
