//! What the fuzz tests of the format, the converter and the daemon share
//! (each includes this file: `#[path = ...] mod fuzz_support;`): a proptest
//! runner held to a case count *and* a wall-clock budget, a watchdog that
//! turns a hung case into a failure that names the input, and a count of
//! what one call allocates (`allocation-counter`), so that a parser which believes a
//! length its input does not back shows up as a failed case instead of an
//! allocation the machine happens to survive.
//!
//! Tiers: the smoke variant of each target runs a few cases in the fast tier;
//! the fuzz variant is `#[ignore]`d (the slow tier: `cargo test --
//! --include-ignored`) and runs until its case count or its time budget is
//! spent. Environment, for longer or reproducible runs:
//! - `SLLM_FUZZ_SEED`: the seed (each run prints the one it used);
//! - `SLLM_FUZZ_CASES`, `SLLM_FUZZ_SECONDS`: the slow tier's case count and
//!   time budget per target.

#![allow(dead_code, reason = "each fuzz file uses part of the harness")]

use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

/// A case that runs this long is a hang: the watchdog prints it and aborts
/// the test process (a hang cannot be unwound).
const HANG_LIMIT: Duration = Duration::from_secs(60);

/// A case slower than this fails (and shrinks): no input of these sizes
/// deserves seconds, even unoptimized.
pub const SLOW_CASE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Allocation counting.

/// What one call allocated on its thread.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// Most bytes held at once beyond what the thread held before the call
    /// (so also a bound on its largest single allocation).
    pub peak_bytes: usize,
}

/// Runs `f` and says what it allocated on this thread, by the counting
/// global allocator of the `allocation-counter` crate (which linking it
/// installs in the test binary).
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, Usage) {
    let mut out = None;
    let info = allocation_counter::measure(|| out = Some(f()));
    let usage = Usage {
        peak_bytes: usize::try_from(info.bytes_max).unwrap_or(usize::MAX),
    };
    (out.expect("measure ran the closure"), usage)
}

/// Bytes a parser may hold for an input of `input_bytes`: a generous
/// multiple of what it was given (a JSON list of small numbers becomes a
/// vector of 8-byte integers, through serde's buffering) plus a fixed
/// allowance, but never anything that grows with a length the input merely
/// *claims*.
pub fn allowance(input_bytes: usize) -> usize {
    input_bytes.saturating_mul(64) + (1 << 20)
}

/// Fails the case when `usage` exceeds the allowance for `input_bytes`.
pub fn check_allocation(usage: Usage, input_bytes: usize) -> Result<(), TestCaseError> {
    let allowed = allowance(input_bytes);
    if usage.peak_bytes > allowed {
        return Err(TestCaseError::fail(format!(
            "allocated {} bytes at peak for {input_bytes} bytes of input; the allowance is \
             {allowed}",
            usage.peak_bytes
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Models.

/// Appends `bytes` to `w` as a one-dimensional `torch.uint8` tensor named
/// `name`: how the fuzz targets build the real models they mutate.
pub fn add_u8_tensor(w: &mut sllm_format::StoreWriter, name: String, bytes: &[u8]) {
    let len = bytes.len() as u64;
    let offset = w.begin_record(len).unwrap();
    w.write(bytes).unwrap();
    w.end_record().unwrap();
    w.add_entry(
        name,
        sllm_format::TensorEntry {
            offset,
            size: len,
            shape: vec![len],
            stride: vec![1],
            dtype: "torch.uint8".into(),
        },
    );
}

/// Creates a FIFO (named pipe) at `path`: a file that must fail at once
/// wherever a model file is expected, never block the reader.
pub fn mkfifo(path: &std::path::Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

// ---------------------------------------------------------------------------
// The runner.

/// How long and how hard a target runs.
#[derive(Clone, Copy, Debug)]
pub struct Tier {
    pub cases: u32,
    pub budget: Duration,
}

impl Tier {
    /// The fast tier: `cases` cases, a budget that only a hang would reach.
    pub fn smoke(cases: u32) -> Self {
        Self {
            cases,
            budget: Duration::from_secs(30),
        }
    }

    /// The slow tier: up to `cases` cases within `seconds`, unless the
    /// environment says otherwise.
    pub fn slow(cases: u32, seconds: u64) -> Self {
        let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        Self {
            cases: env("SLLM_FUZZ_CASES").map_or(cases, |c| c.min(u64::from(u32::MAX)) as u32),
            budget: Duration::from_secs(env("SLLM_FUZZ_SECONDS").unwrap_or(seconds)),
        }
    }
}

/// What one run did.
#[derive(Clone, Debug)]
pub struct Summary {
    pub target: String,
    pub cases: u64,
    pub seconds: f64,
    pub seed: u64,
    pub out_of_time: bool,
}

/// The seed of this run: `SLLM_FUZZ_SEED`, or one from the clock.
fn seed() -> u64 {
    std::env::var("SLLM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        })
}

/// Aborts the process when a case runs past [`HANG_LIMIT`], printing it.
struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the watchdog sees: when the current case began (ms since the
/// run's start, `u64::MAX` when none runs) and the case itself.
struct Current {
    began_ms: AtomicU64,
    input: Mutex<Option<String>>,
}

impl Watchdog {
    fn start(target: String, seed: u64, current: Arc<Current>, origin: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(format!("fuzz-watchdog-{target}"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                        let began = current.began_ms.load(Ordering::Relaxed);
                        let now = origin.elapsed().as_millis() as u64;
                        if began != u64::MAX
                            && now.saturating_sub(began) > HANG_LIMIT.as_millis() as u64
                        {
                            let input = current
                                .input
                                .lock()
                                .map(|i| i.clone().unwrap_or_default())
                                .unwrap_or_default();
                            eprintln!(
                                "fuzz {target}: a case ran {} s and is taken as hung \
                                 (SLLM_FUZZ_SEED={seed}); input:\n{input}",
                                HANG_LIMIT.as_secs()
                            );
                            std::process::abort();
                        }
                    }
                })
                .expect("the watchdog thread starts")
        };
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `text` cut to `max` bytes at a character boundary.
pub fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Runs `test` on inputs from `strategy` until `tier`'s case count or time
/// budget is spent; fails (with the minimal input found and the seed) on the
/// first case that fails, panics, or runs slower than [`SLOW_CASE`]; prints
/// one summary line.
pub fn run<S>(
    target: &str,
    tier: Tier,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> Summary
where
    S: Strategy,
    S::Value: Debug,
{
    let seed = seed();
    let origin = Instant::now();
    let deadline = origin + tier.budget;
    let current = Arc::new(Current {
        began_ms: AtomicU64::new(u64::MAX),
        input: Mutex::new(None),
    });
    let watchdog = Watchdog::start(target.to_owned(), seed, Arc::clone(&current), origin);
    let cases = AtomicU64::new(0);
    let out_of_time = AtomicBool::new(false);
    // Once a case has failed, shrinking runs the test again and again: then
    // the budget no longer skips cases, or a skipped case would pass for a
    // smaller failing one.
    let failed = AtomicBool::new(false);
    let mut runner = TestRunner::new(Config {
        cases: tier.cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        fork: false,
        timeout: 0,
        max_shrink_time: 30_000,
        max_shrink_iters: 2_000,
        // The only rejection is the time budget's (no strategy filters).
        max_global_rejects: 0,
        max_local_rejects: 0,
        ..Config::default()
    });
    let result = runner.run(&strategy, |input| {
        if !failed.load(Ordering::Relaxed) && Instant::now() >= deadline {
            // Rejected, with no rejection allowed: the runner stops at once
            // (instead of generating the rest of the cases to skip them).
            out_of_time.store(true, Ordering::Relaxed);
            return Err(TestCaseError::reject("out of time"));
        }
        cases.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut slot) = current.input.lock() {
            *slot = Some(cut(&format!("{input:?}"), 16 << 10).to_owned());
        }
        let began = Instant::now();
        current
            .began_ms
            .store(origin.elapsed().as_millis() as u64, Ordering::Relaxed);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(input)))
            .unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                Err(TestCaseError::fail(format!("panicked: {message}")))
            });
        current.began_ms.store(u64::MAX, Ordering::Relaxed);
        let took = began.elapsed();
        let outcome = outcome.and_then(|()| {
            if took > SLOW_CASE {
                return Err(TestCaseError::fail(format!(
                    "the case took {:.1} s (more than {} s)",
                    took.as_secs_f64(),
                    SLOW_CASE.as_secs()
                )));
            }
            Ok(())
        });
        if outcome.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        outcome
    });
    drop(watchdog);
    let summary = Summary {
        target: target.to_owned(),
        cases: cases.load(Ordering::Relaxed),
        seconds: origin.elapsed().as_secs_f64(),
        seed,
        out_of_time: out_of_time.load(Ordering::Relaxed),
    };
    match result {
        // The budget's rejection stops the runner: that is a pass too.
        Ok(()) | Err(TestError::Abort(_)) if summary.out_of_time || result.is_ok() => {
            println!(
                "fuzz {}: {} cases in {:.1} s, no failure (seed {}{})",
                summary.target,
                summary.cases,
                summary.seconds,
                summary.seed,
                if summary.out_of_time {
                    ", stopped by its time budget"
                } else {
                    ""
                }
            );
            summary
        }
        Err(TestError::Fail(reason, input)) => panic!(
            "fuzz {target}: {reason}\nminimal input: {}\n(reproduce with SLLM_FUZZ_SEED={seed})",
            cut(&format!("{input:?}"), 16 << 10)
        ),
        Ok(()) | Err(TestError::Abort(_)) => {
            panic!("fuzz {target}: aborted: {result:?} (SLLM_FUZZ_SEED={seed})")
        }
    }
}

/// Counts of outcomes by label (accepted, refused, ...), printed after a
/// run to show what the inputs reached.
#[derive(Default)]
pub struct Tally(Mutex<std::collections::BTreeMap<String, u64>>);

impl Tally {
    pub fn note(&self, label: &str) {
        if let Ok(mut counts) = self.0.lock() {
            *counts.entry(label.to_owned()).or_default() += 1;
        }
    }

    /// Prints `fuzz <target> outcomes: label n, ...`.
    pub fn print(&self, target: &str) {
        let counts = self.0.lock().map(|c| c.clone()).unwrap_or_default();
        let line: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("fuzz {target} outcomes: {}", line.join(", "));
    }
}
