//! `sllm-bench restart`: the vLLM restart benchmark of the runbook as one
//! command. Two shell commands start the same model behind the same URL:
//! the usual way (the baseline) and loading through sllm-store (the fast
//! start). Every run starts each side in turn, the order alternating run by
//! run, and times launch to `GET /v1/models` answering 200 ("ready") and
//! the first completion after it; then it stops the command with all its
//! children before the next start.
//!
//! A crash, a timeout or a failed completion ends the benchmark: what was
//! measured is still reported and written, with the failure and the last
//! lines of the command's log, and the command exits non-zero.

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
use crate::report::{Header, OutputArgs, median_f64};

/// How often `/v1/models` is polled.
const POLL: Duration = Duration::from_millis(50);
/// The limit of one poll: connect and answer.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);
/// Lines of a command's log quoted in a failure.
const TAIL_LINES: usize = 20;
/// Bytes of a bad answer quoted in a failure.
const BODY_QUOTE: usize = 500;

/// The environment variables recorded as the commands see them.
const RECORDED_ENV: [&str; 6] = [
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "CUDA_VISIBLE_DEVICES",
    "STORAGE_PATH",
];
/// What `--offline` sets in the commands' environment.
const OFFLINE_ENV: [(&str, &str); 2] = [("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")];

#[derive(Args, Debug)]
pub struct RestartArgs {
    /// Shell command that starts vLLM the usual way (run with `sh -c`, in
    /// the foreground).
    #[arg(long)]
    baseline: String,
    /// Shell command that starts vLLM loading through sllm-store.
    #[arg(long)]
    faststart: String,
    /// The base URL both commands serve at, e.g. http://127.0.0.1:8000.
    #[arg(long)]
    url: String,
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
    /// The Hugging Face model both commands serve, e.g. org/name.
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
    /// The prompt of the first completion.
    #[arg(long, default_value = "The capital of France is")]
    prompt: String,
    /// `max_tokens` of the first completion.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Where the commands' logs go, as <side>-run<k>.log [default: a new
    /// directory under the system temp dir].
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// JSON output [default: bench/results/restart-<host>-<date>.json].
    #[arg(long)]
    json: Option<PathBuf>,
    /// Markdown output [default: beside the JSON, .md].
    #[arg(long)]
    markdown: Option<PathBuf>,
}

/// Which command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Side {
    Baseline,
    Faststart,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Baseline => "baseline",
            Side::Faststart => "faststart",
        }
    }
}

/// One start of one side.
#[derive(Clone, Debug, Serialize)]
struct RunFigures {
    run: usize,
    /// 1 when this side started first in its run, 2 when second.
    position: usize,
    /// Launch to `GET /v1/models` answering 200.
    ready_s: f64,
    /// The first completion request, sent once ready, to its full answer.
    first_completion_s: f64,
    ready_plus_completion_s: f64,
    model_id: String,
    log: PathBuf,
}

#[derive(Debug, Serialize)]
struct SideResults {
    command: String,
    runs: Vec<RunFigures>,
    median_ready_s: Option<f64>,
    median_first_completion_s: Option<f64>,
    median_ready_plus_completion_s: Option<f64>,
}

/// Why the benchmark stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum FailureKind {
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
struct Failure {
    side: Side,
    run: usize,
    kind: FailureKind,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    log: Option<PathBuf>,
    log_tail: Vec<String>,
}

impl FailureKind {
    fn label(self) -> &'static str {
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
    fn new(side: Side, run: usize, kind: FailureKind, message: String) -> Self {
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
    fn with_log(mut self, log: &Path) -> Self {
        self.log_tail = pgroup::log_tail(log, TAIL_LINES);
        self.log = Some(log.to_owned());
        self
    }

    /// The message with the log's last lines, for the error.
    fn report(&self) -> String {
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
struct Results {
    #[serde(flatten)]
    header: Header,
    url: String,
    offline: bool,
    model: Option<String>,
    revision: Option<String>,
    storage_path: PathBuf,
    server: Option<String>,
    runs_requested: usize,
    /// The recorded variables as the commands see them (null: unset).
    environment: BTreeMap<&'static str, Option<String>>,
    /// How the page cache (and the daemon's pool) were made cold.
    caches: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    offline_checks: Vec<Check>,
    log_dir: PathBuf,
    baseline: SideResults,
    faststart: SideResults,
    /// Median baseline ready time over median fast-start ready time.
    speedup_ready: Option<f64>,
    /// The same for ready + first completion.
    speedup_ready_plus_completion: Option<f64>,
    failure: Option<Failure>,
}

/// What every start needs.
struct Bench<'a> {
    args: &'a RestartArgs,
    url: String,
    env: Vec<(&'static str, &'static str)>,
    log_dir: PathBuf,
    cache_files: Vec<PathBuf>,
    /// What `drop_caches` reported, once it ran.
    drop_method: Option<&'static str>,
}

pub fn run(args: RestartArgs) -> anyhow::Result<()> {
    validate(&args)?;
    let url = args.url.trim_end_matches('/').to_owned();
    let storage_path = sllm_format::config::resolve_storage_path(args.storage_path.as_deref());

    let offline_checks = match (&args.model, args.offline) {
        (Some(model), true) => offline_checks(&storage_path, model, &args.revision)?,
        _ => Vec::new(),
    };
    if let Some(addr) = &args.server {
        clear_pool(addr).with_context(|| {
            format!("emptying the pool of the sllm-store daemon at {addr} (--server)")
        })?;
    }
    if let Some(what) = port_taken(&url) {
        bail!(
            "something already answers at {url} ({what}) before the first start: stop it (a vLLM \
             left from an earlier run?) or pass the --url your commands serve at"
        );
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
        url: url.clone(),
        env: if args.offline {
            OFFLINE_ENV.to_vec()
        } else {
            Vec::new()
        },
        log_dir: log_dir.clone(),
        cache_files,
        drop_method: None,
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
            command,
            measured
                .iter()
                .filter(|(s, _)| *s == side)
                .map(|(_, f)| f.clone())
                .collect(),
        )
    };
    let baseline = side_results(Side::Baseline, &args.baseline);
    let faststart = side_results(Side::Faststart, &args.faststart);
    let results = Results {
        header: Header::new("restart", Machine::probe(&machine_dir)),
        url,
        offline: args.offline,
        model: args.model.clone(),
        revision: args.model.as_ref().map(|_| args.revision.clone()),
        storage_path,
        server: args.server.clone(),
        runs_requested: args.runs,
        environment: command_env(args.offline),
        caches: describe_caches(&bench),
        offline_checks,
        log_dir,
        speedup_ready: ratio(baseline.median_ready_s, faststart.median_ready_s),
        speedup_ready_plus_completion: ratio(
            baseline.median_ready_plus_completion_s,
            faststart.median_ready_plus_completion_s,
        ),
        baseline,
        faststart,
        failure,
    };
    let out = OutputArgs {
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

fn validate(args: &RestartArgs) -> anyhow::Result<()> {
    ensure!(args.runs > 0, "--runs must be at least 1");
    ensure!(args.timeout > 0, "--timeout must be at least 1 (seconds)");
    ensure!(args.max_tokens > 0, "--max-tokens must be at least 1");
    ensure!(
        !args.baseline.trim().is_empty() && !args.faststart.trim().is_empty(),
        "--baseline and --faststart must be shell commands that start vLLM"
    );
    let host_part = args.url.strip_prefix("http://").unwrap_or("");
    ensure!(
        !host_part.trim_end_matches('/').contains('/'),
        "--url {:?}: give the base URL without a path (http://host:port, not .../v1): the \
         benchmark asks <url>/v1/models and <url>/v1/completions",
        args.url
    );
    ensure!(
        args.url.starts_with("http://") && args.url.len() > "http://".len(),
        "--url {:?}: give the base URL vLLM serves at as http://host:port (https is not supported)",
        args.url
    );
    ensure!(
        !args.offline || args.model.is_some(),
        "--offline needs --model <org/name>: the check that both commands can start offline \
         looks for that model's snapshot in the Hugging Face cache and its converted copy in the \
         storage path"
    );
    Ok(())
}

/// Runs the doctor's offline checks and prints them; refuses on any STOP.
fn offline_checks(storage_path: &Path, model: &str, revision: &str) -> anyhow::Result<Vec<Check>> {
    let checks = doctor::offline_readiness(&HfEnv::from_env(), storage_path, model, revision);
    for c in &checks {
        eprintln!("{} {}: {}", c.status.label(), c.name, c.summary);
        if let Some(fix) = &c.fix {
            eprintln!("  fix: {fix}");
        }
    }
    let stops = checks.iter().filter(|c| c.status == Status::Stop).count();
    ensure!(
        stops == 0,
        "{stops} offline check(s) of {model} say STOP (above): with HF_HUB_OFFLINE=1 a command \
         would fail to start, or load something else than measured. Fix them, or run without \
         --offline"
    );
    Ok(checks)
}

/// Empties the daemon's pool, so that the next fast start is cold.
fn clear_pool(addr: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for the daemon client")?;
    // Bounded: a stopped or wedged daemon must not hang the benchmark.
    let limit = Duration::from_secs(30);
    runtime
        .block_on(async {
            // Created inside the runtime: a timer needs its context.
            tokio::time::timeout(limit, async {
                let mut client = sllm_client::StoreClient::connect(addr).await?;
                client.clear().await
            })
            .await
        })
        .map_err(|_| {
            anyhow::anyhow!(
                "the daemon at {addr} did not empty its pool within {} s: check that it runs \
                 (not stopped, not wedged), or leave --server out",
                limit.as_secs()
            )
        })??;
    Ok(())
}

/// The files of `model` that a start reads: its Hugging Face snapshot and
/// its converted copy under the storage path.
fn model_files(storage_path: &Path, model: &str, revision: &str) -> Vec<PathBuf> {
    let mut files = match HfCache::from_env().resolve(model, revision) {
        Ok(snapshot) => files_under(&snapshot.dir),
        Err(e) => {
            tracing::warn!(
                "--drop-caches: the Hugging Face snapshot of {model} was not found, so without \
                 root only its converted copy is dropped from the page cache ({e})"
            );
            Vec::new()
        }
    };
    files.extend(files_under(&storage_path.join(model)));
    files
}

/// The recorded variables as the commands see them.
fn command_env(offline: bool) -> BTreeMap<&'static str, Option<String>> {
    RECORDED_ENV
        .iter()
        .map(|&name| {
            let set = OFFLINE_ENV
                .iter()
                .find(|(n, _)| offline && *n == name)
                .map(|(_, v)| (*v).to_owned());
            (name, set.or_else(|| std::env::var(name).ok()))
        })
        .collect()
}

fn describe_caches(bench: &Bench) -> String {
    let model = bench.args.model.as_deref();
    let mut out = match (bench.drop_method, model) {
        (None, _) if !bench.args.drop_caches => {
            "page cache not dropped (pass --drop-caches for cold starts)".to_owned()
        }
        (None, _) => "page cache: nothing started, nothing dropped".to_owned(),
        (Some("drop_caches"), _) => {
            "the whole page cache dropped before every start (/proc/sys/vm/drop_caches, as root)"
                .to_owned()
        }
        (Some(_), None) => "page cache NOT dropped: only root can drop the whole cache, and \
                            without --model no files are known to drop with fadvise(DONTNEED)"
            .to_owned(),
        (Some(_), Some(model)) if bench.cache_files.is_empty() => format!(
            "page cache NOT dropped: only root can drop the whole cache, and no files of {model} \
             were found in the Hugging Face cache or the storage path"
        ),
        (Some(method), Some(model)) => format!(
            "{method} on the {} files of {model} (Hugging Face snapshot and converted copy) \
             before every start; other files (Python, libraries, compile caches) stay cached, \
             as only root can drop the whole cache",
            bench.cache_files.len()
        ),
    };
    if let Some(addr) = &bench.args.server {
        out += &format!("; the pool of the daemon at {addr} emptied before every fast start");
    }
    out
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
        if let Some(what) = port_taken(&self.url) {
            return Err(fail(
                FailureKind::PortBusy,
                format!(
                    "something already answers at {} ({what}) before the start: the previous \
                     command left a process behind, or another server uses the port",
                    self.url
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
        let mut group = ProcessGroup::spawn(command, &self.env, &log)
            .map_err(|e| fail(FailureKind::Start, format!("{e:#}")))?;
        let label = format!("{} run {run}", side.name());
        let outcome = self.measure(&label, &mut group, started);
        let stopped = group.stop();
        tracing::info!("{} run {run}: stopped ({stopped:?})", side.name());
        match outcome {
            Ok((ready_s, first_completion_s, model_id)) => Ok(RunFigures {
                run,
                position,
                ready_s,
                first_completion_s,
                ready_plus_completion_s: ready_s + first_completion_s,
                model_id,
                log,
            }),
            Err((kind, message)) => Err(fail(kind, message).with_log(&log)),
        }
    }

    /// Ready time, first-completion time and model id of a started group.
    fn measure(
        &self,
        label: &str,
        group: &mut ProcessGroup,
        started: Instant,
    ) -> Result<(f64, f64, String), (FailureKind, String)> {
        let timeout = Duration::from_secs(self.args.timeout);
        let poller = local_agent(POLL_TIMEOUT);
        let mut last: String;
        let (ready_s, listed) = loop {
            let tick = Instant::now();
            if let Some(status) = group.try_exit() {
                return Err(crash(status, started));
            }
            match probe_models(&poller, &self.url) {
                Ok(listed) => break (started.elapsed().as_secs_f64(), listed),
                Err(why) => last = why,
            }
            if let Some(status) = group.try_exit() {
                return Err(crash(status, started));
            }
            if started.elapsed() >= timeout {
                return Err((
                    FailureKind::Timeout,
                    format!(
                        "not ready after {} s: GET {}/v1/models never answered 200 (last \
                         attempt: {last}); raise --timeout if it is just slow",
                        self.args.timeout, self.url
                    ),
                ));
            }
            std::thread::sleep(POLL.saturating_sub(tick.elapsed()));
        };
        tracing::info!("{label}: ready after {ready_s:.2} s (pid {})", group.pid());
        let model = listed.or_else(|| self.args.model.clone()).ok_or_else(|| {
            (
                FailureKind::Completion,
                format!(
                    "ready after {ready_s:.1} s, but {}/v1/models lists no model id; pass \
                     --model <id> to name the model to complete with",
                    self.url
                ),
            )
        })?;
        let completion = first_completion(
            &local_agent(timeout),
            &self.url,
            &model,
            &self.args.prompt,
            self.args.max_tokens,
        );
        match completion {
            Ok(seconds) => {
                tracing::info!("{label}: first completion in {seconds:.3} s");
                Ok((ready_s, seconds, model))
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

fn crash(status: ExitStatus, started: Instant) -> (FailureKind, String) {
    let hint = if status.success() {
        ": the command must keep the server in the foreground (no `&`, no daemon mode)"
    } else {
        ""
    };
    (
        FailureKind::Crash,
        format!(
            "the command exited ({status}) {:.1} s after its start, before it was ready{hint}",
            started.elapsed().as_secs_f64()
        ),
    )
}

/// `Ok` with the first model id when `GET /v1/models` answers 200, else
/// why not.
fn probe_models(agent: &ureq::Agent, url: &str) -> Result<Option<String>, String> {
    match agent.get(format!("{url}/v1/models")).call() {
        Ok(mut response) if response.status() == 200 => Ok(response
            .body_mut()
            .read_json::<serde_json::Value>()
            .ok()
            .and_then(|v| first_model_id(&v))),
        Ok(response) => Err(format!("HTTP {}", response.status().as_u16())),
        Err(ureq::Error::Timeout(_)) => {
            Err(format!("no answer within {} s", POLL_TIMEOUT.as_secs()))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// `data[0].id` of a `/v1/models` answer.
fn first_model_id(models: &serde_json::Value) -> Option<String> {
    models["data"]
        .as_array()?
        .first()?
        .get("id")?
        .as_str()
        .map(str::to_owned)
}

/// When a server already answers at `url`, what it said.
fn port_taken(url: &str) -> Option<String> {
    match local_agent(POLL_TIMEOUT)
        .get(format!("{url}/v1/models"))
        .call()
    {
        Ok(response) => Some(format!(
            "GET /v1/models: HTTP {}",
            response.status().as_u16()
        )),
        Err(ureq::Error::Timeout(_)) => Some("it accepts connections but does not answer".into()),
        Err(_) => None,
    }
}

/// Seconds a completion took from request to full answer.
fn first_completion(
    agent: &ureq::Agent,
    url: &str,
    model: &str,
    prompt: &str,
    max_tokens: u32,
) -> Result<f64, String> {
    let endpoint = format!("{url}/v1/completions");
    let start = Instant::now();
    let mut response = agent
        .post(&endpoint)
        .send_json(serde_json::json!({
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
        }))
        .map_err(|e| format!("POST {endpoint}: {e}"))?;
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("POST {endpoint}: reading the answer: {e}"))?;
    let seconds = start.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    check_completion(status, &body).map_err(|e| format!("POST {endpoint} (model {model}): {e}"))?;
    Ok(seconds)
}

/// A completion must be HTTP 200 with a non-empty `choices` array.
fn check_completion(status: u16, body: &str) -> Result<(), String> {
    if status != 200 {
        return Err(format!("HTTP {status}: {}", quote(body)));
    }
    let parsed: serde_json::Value = serde_json::from_str(body)
        .map_err(|e| format!("answer is not JSON ({e}): {}", quote(body)))?;
    match parsed["choices"].as_array() {
        Some(choices) if !choices.is_empty() => Ok(()),
        _ => Err(format!("answer has no choices: {}", quote(body))),
    }
}

/// `body` cut to [`BODY_QUOTE`] bytes (on a character boundary).
fn quote(body: &str) -> String {
    if body.len() <= BODY_QUOTE {
        return body.to_owned();
    }
    let mut end = BODY_QUOTE;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &body[..end], body.len())
}

fn ratio(num: Option<f64>, den: Option<f64>) -> Option<f64> {
    match (num, den) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    }
}

fn summarize(command: &str, runs: Vec<RunFigures>) -> SideResults {
    SideResults {
        command: command.to_owned(),
        median_ready_s: median_f64(runs.iter().map(|r| r.ready_s)),
        median_first_completion_s: median_f64(runs.iter().map(|r| r.first_completion_s)),
        median_ready_plus_completion_s: median_f64(runs.iter().map(|r| r.ready_plus_completion_s)),
        runs,
    }
}

fn seconds(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"))
}

fn markdown(r: &Results) -> String {
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
        out += &format!(
            "\n## {title}\n\n`{}`\n\n\
             | run | order | ready s | first completion s | ready + completion s |\n\
             |---:|---:|---:|---:|---:|\n",
            side.command
        );
        for f in &side.runs {
            out += &format!(
                "| {} | {} | {:.3} | {:.3} | {:.3} |\n",
                f.run, f.position, f.ready_s, f.first_completion_s, f.ready_plus_completion_s
            );
        }
        out += &format!(
            "| median | | {} | {} | {} |\n",
            seconds(side.median_ready_s),
            seconds(side.median_first_completion_s),
            seconds(side.median_ready_plus_completion_s)
        );
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
    fn the_first_model_id_is_read_from_v1_models() {
        let v = serde_json::json!({"object": "list", "data": [{"id": "a/b"}, {"id": "c/d"}]});
        assert_eq!(first_model_id(&v).as_deref(), Some("a/b"));
        assert_eq!(first_model_id(&serde_json::json!({"data": []})), None);
        assert_eq!(first_model_id(&serde_json::json!({"detail": "x"})), None);
    }

    #[test]
    fn a_completion_needs_200_and_choices() {
        assert!(check_completion(200, r#"{"choices":[{"text":"x"}]}"#).is_ok());
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
