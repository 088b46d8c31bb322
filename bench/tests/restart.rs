//! `sllm-bench restart` end to end against tests/fake_vllm.py, a stand-in
//! for vLLM's server: the figures and result files of a good run, and that a
//! crash, a hang or a failed offline check ends the benchmark quickly with
//! a clear message and leaves no process behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

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

/// Runs `sllm-bench restart` with `args`; returns its output and how long it took.
fn bench(args: &[String], env: &[(&str, &Path)]) -> (Output, Duration) {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_sllm-bench"))
        .arg("restart")
        .args(args)
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
    assert_eq!(r["offline"], false);

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

#[test]
fn offline_runs_both_sides_with_the_hub_switched_off_once_both_can_start() {
    use sllm_convert::import::hf_cache::HfCache;
    use sllm_convert::save::{SaveRequest, Source, save};
    use sllm_convert::synth::{SynthSpec, write_synthetic};
    use sllm_format::{ModelId, WriterOptions};

    const HASH: &str = "3333333333333333333333333333333333333333";
    let dir = tempfile::tempdir().unwrap();
    // A complete snapshot in a Hugging Face cache, and its converted copy.
    let hub = dir.path().join("hub");
    let repo = hub.join("models--org--name");
    let snapshot = repo.join("snapshots").join(HASH);
    write_synthetic(
        &snapshot,
        &SynthSpec {
            target_bytes: 1 << 20,
            shards: 1,
            seed: 7,
        },
    )
    .unwrap();
    std::fs::write(snapshot.join("tokenizer.json"), "{}").unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), HASH).unwrap();
    let storage = dir.path().join("models");
    save(
        &SaveRequest {
            model: ModelId::parse("org/name").unwrap(),
            source: Source::HfCache {
                cache: HfCache {
                    root: hub.clone(),
                    chosen_by: "the test".into(),
                },
                revision: HASH.into(),
            },
            storage_root: storage.clone(),
            force: false,
            writer: WriterOptions::default(),
        },
        &(),
    )
    .unwrap();

    // Each side refuses to start unless both offline variables are set.
    let port = free_port();
    let offline_only = |delay: &str| {
        format!(
            "test \"$HF_HUB_OFFLINE\" = 1 && test \"$TRANSFORMERS_OFFLINE\" = 1 && exec {}",
            fake(port, "ready", &format!("--delay {delay}"))
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
    assert_eq!(r["offline"], true, "{r}");
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
