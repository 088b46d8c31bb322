//! `sllm-store doctor` on real directories (the root filesystem, tmpfs),
//! synthetic Hugging Face caches (complete, missing, incomplete; offline on
//! and off), a converted model (sound, corrupted, stale), a real daemon and
//! a stand-in for vLLM's `/v1/models`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::*;
use crate::hf_cache::{MAIN, OLD, add_snapshot, cache_with_two_snapshots};

/// `doctor --json` with a small pool; returns (exit code, checks by name).
fn doctor(home: &Path, storage: &Path, configure: impl FnOnce(&mut Command)) -> (i32, Value) {
    let mut cmd = sllm_store(home);
    cmd.args([
        "doctor",
        "--json",
        "--mem-pool-size",
        "64MiB",
        "--storage-path",
    ])
    .arg(storage);
    configure(&mut cmd);
    let (out, stdout, stderr) = run(&mut cmd);
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e}): {stdout}\n{stderr}"));
    (out.status.code().unwrap_or(-1), report)
}

/// The check named `name`: (status, summary, fix).
fn check(report: &Value, name: &str) -> (String, String, String) {
    let c = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report:#}"));
    let text = |k: &str| c[k].as_str().unwrap_or("").to_owned();
    (text("status"), text("summary"), text("fix"))
}

fn status(report: &Value, name: &str) -> String {
    check(report, name).0
}

/// A fresh directory on the same filesystem as `/`, if one of the usual
/// places is there.
fn dir_on_root_fs() -> Option<tempfile::TempDir> {
    let root = std::fs::metadata("/").ok()?.dev();
    [
        std::env::temp_dir(),
        PathBuf::from("/var/tmp"),
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
    ]
    .into_iter()
    .filter(|d| std::fs::metadata(d).is_ok_and(|m| m.dev() == root))
    .find_map(|d| tempfile::tempdir_in(d).ok())
}

/// A fresh directory on tmpfs, when /dev/shm is one.
fn dir_on_tmpfs() -> Option<tempfile::TempDir> {
    let fs = rustix::fs::statfs("/dev/shm").ok()?;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    (fs.f_type as i64 == TMPFS_MAGIC)
        .then(|| tempfile::tempdir_in("/dev/shm").ok())
        .flatten()
}

#[test]
fn a_storage_path_on_the_root_filesystem_is_a_stop() {
    let Some(dir) = dir_on_root_fs() else {
        eprintln!("skipped: no writable directory on the root filesystem");
        return;
    };
    let (code, report) = doctor(dir.path(), dir.path(), |_| {});
    let (st, summary, fix) = check(&report, "storage.device");
    assert_eq!(st, "STOP", "{summary}");
    assert!(
        summary.contains("OS disk") && summary.contains("mounted at"),
        "{summary}"
    );
    assert!(fix.contains("--storage-path"), "{fix}");
    assert_eq!(code, 1, "a STOP fails the doctor");
    assert_eq!(report["worst"], "STOP");
    // The rest still ran: one line per check.
    for name in [
        "storage.free",
        "storage.direct_io",
        "system.memory",
        "hf.settings",
        "daemon",
    ] {
        check(&report, name);
    }
    assert_eq!(status(&report, "storage.direct_io"), "PASS");
    let probes: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(probes.is_empty(), "the O_DIRECT probe file is removed");

    // The text form: one line per check, the fix under it, STOP not coloured
    // when stdout is not a terminal.
    let (out, stdout, _) = run(sllm_store(dir.path())
        .args(["doctor", "--mem-pool-size", "64MiB", "--storage-path"])
        .arg(dir.path()));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout.lines().any(|l| l.starts_with("STOP storage.device")),
        "{stdout}"
    );
    assert!(stdout.contains("fix: mount the NVMe drive"), "{stdout}");
    assert!(!stdout.contains('\x1b'), "{stdout}");
    assert!(
        stdout
            .trim_end()
            .ends_with("fix every STOP before starting"),
        "{stdout}"
    );
}

#[test]
fn a_storage_path_on_tmpfs_warns_and_a_missing_one_is_named() {
    let Some(dir) = dir_on_tmpfs() else {
        eprintln!("skipped: /dev/shm is not tmpfs here");
        return;
    };
    let (code, report) = doctor(dir.path(), dir.path(), |_| {});
    let (st, summary, _) = check(&report, "storage.device");
    assert_eq!(st, "WARN", "{summary}");
    assert!(
        summary.contains("tmpfs") && summary.contains("memory"),
        "{summary}"
    );
    assert_eq!(code, 0, "warnings alone do not fail: {report:#}");

    let missing = dir.path().join("not/yet");
    let (_, report) = doctor(dir.path(), &missing, |_| {});
    let (st, summary, fix) = check(&report, "storage.path");
    assert_eq!(st, "WARN");
    assert!(
        summary.contains("does not exist") && fix.contains("mkdir -p"),
        "{summary} {fix}"
    );
    assert_eq!(
        status(&report, "storage.device"),
        "WARN",
        "judged by the nearest parent"
    );

    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let (code, report) = doctor(dir.path(), &file, |_| {});
    assert_eq!((code, status(&report, "storage.path")), (1, "STOP".into()));
}

#[test]
fn a_cached_snapshot_is_offline_ready_and_its_hash_is_given_to_pin() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, _, _) = cache_with_two_snapshots(tmp.path());
    let snap = hub.join("models--org--model/snapshots").join(MAIN);
    std::fs::write(snap.join("tokenizer.json"), "{}").unwrap();
    let storage = tmp.path().join("models");
    let (_, report) = doctor(tmp.path(), &storage, |c| {
        c.args(["--model", "org/model"])
            .env("HF_HUB_CACHE", &hub)
            .env("HF_HUB_OFFLINE", "1");
    });
    let (st, summary, _) = check(&report, "hf.settings");
    assert_eq!(st, "PASS");
    assert!(
        summary.contains("HF_HUB_OFFLINE=1") && summary.contains("offline mode ON"),
        "{summary}"
    );
    let (st, summary, _) = check(&report, "hf.snapshot");
    assert_eq!(st, "PASS");
    assert!(
        summary.contains(&format!("org/model@main -> {MAIN}")),
        "{summary}"
    );
    assert_eq!(status(&report, "hf.files"), "PASS");
    let (st, _, fix) = check(&report, "hf.pinned");
    assert_eq!(st, "WARN", "main is a moving ref");
    assert!(
        fix.contains(&format!("vllm serve org/model --revision {MAIN}")),
        "{fix}"
    );
    let (st, summary, fix) = check(&report, "model.converted");
    assert_eq!(st, "WARN", "{summary}");
    assert!(
        fix.contains(&format!(
            "sllm-store save --model org/model --revision {MAIN}"
        )),
        "{fix}"
    );

    // Without a tokenizer file vLLM needs --tokenizer or --skip-tokenizer-init: a WARN.
    std::fs::remove_file(snap.join("tokenizer.json")).unwrap();
    let (_, report) = doctor(tmp.path(), &storage, |c| {
        c.args(["--model", "org/model", "--revision", MAIN])
            .env("HF_HUB_CACHE", &hub);
    });
    assert_eq!(status(&report, "hf.pinned"), "PASS");
    let (st, _, fix) = check(&report, "hf.files");
    assert_eq!(st, "WARN");
    assert!(fix.contains("tokenizer"), "{fix}");
}

#[test]
fn a_missing_snapshot_stops_offline_and_warns_online() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("empty-hub");
    std::fs::create_dir_all(&hub).unwrap();
    let storage = tmp.path().join("models");
    for (var, value) in [("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "yes")] {
        let (code, report) = doctor(tmp.path(), &storage, |c| {
            c.args(["--model", "org/absent"])
                .env("HF_HUB_CACHE", &hub)
                .env(var, value);
        });
        let (st, summary, fix) = check(&report, "hf.snapshot");
        assert_eq!(st, "STOP", "{var}={value}: {summary}");
        assert!(summary.contains("exits at start"), "{summary}");
        assert!(
            fix.contains("hf download org/absent --revision main"),
            "{fix}"
        );
        assert_eq!(code, 1);
    }
    let (_, report) = doctor(tmp.path(), &storage, |c| {
        c.args(["--model", "org/absent"])
            .env("HF_HUB_CACHE", &hub)
            .env("HF_HUB_OFFLINE", "0");
    });
    let (st, summary, _) = check(&report, "hf.snapshot");
    assert_eq!(st, "WARN", "online, vLLM would download it: {summary}");
    assert!(summary.contains("download"), "{summary}");
}

#[test]
fn an_incomplete_snapshot_stops_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    add_snapshot(&hub, MAIN, 1);
    let repo = hub.join("models--org--model");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), MAIN).unwrap();
    let snap = repo.join("snapshots").join(MAIN);
    // A sharded checkpoint whose second shard never finished downloading.
    std::fs::write(
        snap.join("model.safetensors.index.json"),
        r#"{"weight_map": {"w": "model.safetensors", "v": "model-00002.safetensors"}}"#,
    )
    .unwrap();
    std::os::unix::fs::symlink("../../blobs/never", snap.join("model-00002.safetensors")).unwrap();
    std::fs::write(repo.join("blobs/never.incomplete"), b"partial").unwrap();
    std::fs::create_dir_all(tmp.path().join("models")).unwrap();
    let (code, report) = doctor(tmp.path(), &tmp.path().join("models"), |c| {
        c.args(["--model", "org/model"])
            .env("HF_HUB_CACHE", &hub)
            .env("HF_HUB_OFFLINE", "1");
    });
    let (st, summary, fix) = check(&report, "hf.files");
    assert_eq!(st, "STOP", "{summary}");
    assert!(
        summary.contains("model-00002.safetensors") && summary.contains("1 interrupted"),
        "{summary}"
    );
    assert!(fix.contains(&format!("--revision {MAIN}")), "{fix}");
    // What a conversion would need is unknown until the snapshot is whole,
    // and the save it suggests waits for the download.
    let (st, summary, _) = check(&report, "storage.free");
    assert!(
        summary.contains("free on") && !summary.contains("needs"),
        "{st} {summary}"
    );
    let (_, _, fix) = check(&report, "model.converted");
    assert!(
        fix.starts_with("download the snapshot's missing files first"),
        "{fix}"
    );
    assert_eq!(code, 1);
}

/// Converts snapshot MAIN of org/model from the cache `hub` into `storage`.
fn save_main(home: &Path, hub: &Path, storage: &Path) {
    run_ok(
        sllm_store(home)
            .args(["save", "--model", "org/model", "--revision", MAIN])
            .arg("--storage-path")
            .arg(storage)
            .env("HF_HUB_CACHE", hub),
    );
}

#[test]
fn the_converted_model_is_verified_and_a_stale_one_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, _, _) = cache_with_two_snapshots(tmp.path());
    let storage = tmp.path().join("models");
    save_main(tmp.path(), &hub, &storage);
    let ask = |extra: &[&str]| {
        doctor(tmp.path(), &storage, |c| {
            c.args(["--model", "org/model", "--revision", MAIN])
                .args(extra)
                .env("HF_HUB_CACHE", &hub);
        })
        .1
    };
    let report = ask(&[]);
    let (st, summary, _) = check(&report, "model.verify");
    assert_eq!(st, "PASS", "{summary}");
    assert!(summary.contains("every checksum matches"), "{summary}");
    assert_eq!(status(&report, "model.source"), "PASS");
    // On the storage path's filesystem: judged once, by storage.device.
    let (st, summary, _) = check(&report, "model.device");
    assert_eq!(st, "PASS", "{summary}");
    assert!(
        summary.contains("tensor.data_0 is on the storage path's filesystem"),
        "{summary}"
    );
    // A short hash pins as a whole one does.
    let report = doctor(tmp.path(), &storage, |c| {
        c.args(["--model", "org/model", "--revision", &MAIN[..8]])
            .env("HF_HUB_CACHE", &hub);
    })
    .1;
    let (st, summary, _) = check(&report, "hf.pinned");
    assert_eq!(st, "PASS", "{summary}");
    let (st, summary, _) = check(&report, "model.source");
    assert_eq!(st, "PASS", "{summary}");
    assert!(summary.contains("resolves to"), "{summary}");
    let (st, summary, _) = check(&report, "hf.device");
    assert_eq!(st, "PASS", "cache and storage in one directory: {summary}");

    // One flipped byte: the full check catches it, the quick one does not read it.
    let part = storage.join("org/model/tensor.data_0");
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&part, &bytes).unwrap();
    let report = ask(&[]);
    let (st, summary, fix) = check(&report, "model.verify");
    assert_eq!(st, "STOP", "{summary}");
    assert!(summary.contains("differ from the manifest"), "{summary}");
    assert!(fix.contains("sllm-store verify org/model"), "{fix}");
    assert_eq!(status(&ask(&["--quick"]), "model.verify"), "PASS");

    // Without a manifest (the reference tools write none) nothing can say
    // the bytes are right: a warning, not "every checksum matches".
    std::fs::write(&part, {
        bytes[10] ^= 0xff;
        &bytes
    })
    .unwrap();
    let manifest = storage.join("org/model/sllm_manifest.json");
    let kept = std::fs::read(&manifest).unwrap();
    std::fs::remove_file(&manifest).unwrap();
    let (st, summary, fix) = check(&ask(&[]), "model.verify");
    assert_eq!(st, "WARN", "{summary}");
    assert!(summary.contains("has no sllm_manifest.json"), "{summary}");
    assert!(fix.contains("--force"), "{fix}");
    std::fs::write(&manifest, kept).unwrap();

    // `main` moves on: the stored copy is now stale.
    std::fs::write(hub.join("models--org--model/refs/main"), OLD).unwrap();
    let (_, report) = doctor(tmp.path(), &storage, |c| {
        c.args(["--model", "org/model", "--quick"])
            .env("HF_HUB_CACHE", &hub);
    });
    let (st, summary, fix) = check(&report, "model.source");
    assert_eq!(st, "WARN", "{summary}");
    assert!(summary.contains(MAIN) && summary.contains(OLD), "{summary}");
    assert!(
        fix.contains(&format!("--force --model org/model --revision {OLD}")),
        "{fix}"
    );
}

#[test]
fn the_daemon_is_asked_for_health_and_config() {
    let tmp = tempfile::tempdir().unwrap();
    let (storage, daemon) = Daemon::over_empty_store(
        tmp.path(),
        &[
            "--mem-pool-size",
            "8MiB",
            "--chunk-size",
            "1MiB",
            "--device",
            "host",
        ],
    );
    let (_, report) = doctor(tmp.path(), &storage, |c| {
        c.args(["--server", &daemon.addr]);
    });
    let (st, summary, fix) = check(&report, "daemon");
    assert_eq!(st, "WARN", "the host backend is for tests: {summary}");
    assert!(
        summary.contains("serving") && summary.contains("host backend"),
        "{summary}"
    );
    assert!(summary.contains("8.00 MiB"), "{summary}");
    assert!(fix.contains("--device cuda"), "{fix}");
    // The probe command: the same check, one line, exit 0 while serving.
    let probe = run_ok(sllm_store(tmp.path()).args(["health", "--server", &daemon.addr]));
    assert!(
        probe.starts_with("WARN daemon") && probe.contains("serving"),
        "{probe}"
    );
    let addr = daemon.addr.clone();
    drop(daemon);
    let down = run_err(
        sllm_store(tmp.path())
            .env("SLLM_STORE_ADDR", &addr)
            .arg("health"),
    );
    assert!(
        down.contains(&format!("no daemon answers at {addr}")),
        "{down}"
    );

    // A daemon the user named but that is not there is a STOP.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, report) = doctor(tmp.path(), &storage, |c| {
        c.args(["--server", &closed.to_string()]);
    });
    let (st, summary, _) = check(&report, "daemon");
    assert_eq!(st, "STOP", "{summary}");
    assert!(summary.contains(&closed.to_string()), "{summary}");
    assert_eq!(code, 1);
}

/// Answers every connection with `status` and `body`, like vLLM's
/// `/v1/models` would; returns its base URL.
fn http_stand_in(status: &'static str, body: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut conn in listener.incoming().map_while(Result::ok) {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

#[test]
fn vllm_is_asked_for_its_models() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    let url = http_stand_in("200 OK", r#"{"object":"list","data":[{"id":"org/model"}]}"#);
    // A proxy meant for the internet must not reroute the local check, and
    // a URL without a scheme or with a trailing slash is understood.
    let bare = format!("{}/", url.trim_start_matches("http://"));
    let (_, report) = doctor(tmp.path(), &storage, |c| {
        c.args(["--vllm-url", &bare])
            .env("HTTP_PROXY", "http://127.0.0.1:1")
            .env("http_proxy", "http://127.0.0.1:1");
    });
    let (st, summary, _) = check(&report, "vllm");
    assert_eq!(st, "PASS", "{summary}");
    assert!(summary.contains("serves org/model"), "{summary}");

    let (_, report) = doctor(tmp.path(), &storage, |c| {
        c.args(["--vllm-url", &url, "--model", "org/other"]);
    });
    assert_eq!(status(&report, "vllm"), "WARN", "serves another model");

    let loading = http_stand_in("503 Service Unavailable", "{}");
    let (code, report) = doctor(tmp.path(), &storage, |c| {
        c.args(["--vllm-url", &loading]);
    });
    let (st, summary, _) = check(&report, "vllm");
    assert_eq!((st.as_str(), code), ("STOP", 1), "{summary}");
    assert!(summary.contains("HTTP 503"), "{summary}");

    // A server that is not HTTP/1.1 (gRPC's first bytes: an HTTP/2
    // SETTINGS frame), as at the store daemon's port.
    let grpc = TcpListener::bind("127.0.0.1:0").unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::Write;
        if let Ok((mut conn, _)) = grpc.accept() {
            let _ = conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        }
    });
    let (_, report) = doctor(tmp.path(), &storage, |c| {
        c.args(["--vllm-url", &format!("http://{grpc_addr}/v1")]);
    });
    let (st, summary, fix) = check(&report, "vllm");
    assert_eq!(st, "STOP");
    assert!(summary.contains("not as an HTTP server"), "{summary}");
    assert!(fix.contains("vLLM's port"), "{fix}");

    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_, report) = doctor(tmp.path(), &storage, |c| {
        c.args(["--vllm-url", &format!("http://{closed}")]);
    });
    let (st, summary, _) = check(&report, "vllm");
    assert_eq!(st, "STOP");
    assert!(summary.contains("nothing answers"), "{summary}");
}

#[test]
fn a_model_linked_from_outside_the_storage_path_is_a_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, _, _) = cache_with_two_snapshots(tmp.path());
    let elsewhere = tmp.path().join("elsewhere");
    save_main(tmp.path(), &hub, &elsewhere);
    let storage = tmp.path().join("models");
    std::fs::create_dir_all(&storage).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("org"), storage.join("org")).unwrap();
    let (code, report) = doctor(tmp.path(), &storage, |c| {
        c.args(["--model", "org/model", "--revision", MAIN, "--quick"])
            .env("HF_HUB_CACHE", &hub);
    });
    let (st, summary, fix) = check(&report, "model.device");
    assert_eq!(st, "STOP", "{summary}");
    assert!(
        summary.contains("the daemon refuses to load it"),
        "{summary}"
    );
    assert!(fix.contains("instead of linking"), "{fix}");
    assert_eq!(code, 1);
}

#[test]
fn a_cache_on_another_drive_than_the_storage_path_is_named() {
    let Some(shm) = dir_on_tmpfs() else {
        eprintln!("skipped: /dev/shm is not tmpfs here");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let same_fs = std::fs::metadata(tmp.path()).unwrap().dev()
        == std::fs::metadata(shm.path()).unwrap().dev();
    if same_fs {
        eprintln!("skipped: the temp dir is on /dev/shm's filesystem");
        return;
    }
    let (hub, _, _) = cache_with_two_snapshots(shm.path());
    let (_, report) = doctor(tmp.path(), tmp.path(), |c| {
        c.args(["--model", "org/model"]).env("HF_HUB_CACHE", &hub);
    });
    let (st, summary, fix) = check(&report, "hf.device");
    assert_eq!(st, "WARN", "{summary}");
    assert!(
        summary.contains("tmpfs") && summary.contains("compare the two drives"),
        "{summary}"
    );
    assert!(fix.contains("HF_HUB_CACHE"), "{fix}");
}

#[test]
fn a_model_only_in_the_cache_hf_hub_cache_does_not_choose_says_unset_it() {
    let tmp = tempfile::tempdir().unwrap();
    // The model is in $HF_HOME/hub; HF_HUB_CACHE points at an empty cache.
    let (hub, _, _) = cache_with_two_snapshots(tmp.path());
    let empty = tmp.path().join("empty-hub");
    std::fs::create_dir_all(&empty).unwrap();
    let storage = tmp.path().join("models");
    for offline in [false, true] {
        let (_, report) = doctor(tmp.path(), &storage, |c| {
            c.args(["--model", "org/model"])
                .env("HF_HOME", tmp.path())
                .env("HF_HUB_CACHE", &empty);
            if offline {
                c.env("HF_HUB_OFFLINE", "1");
            }
        });
        let (st, summary, fix) = check(&report, "hf.snapshot");
        assert_eq!(st, if offline { "STOP" } else { "WARN" }, "{summary}");
        assert!(summary.contains(&hub.display().to_string()), "{summary}");
        assert!(
            fix.contains("unset HF_HUB_CACHE") && !fix.contains("HF_HUB_OFFLINE"),
            "{fix}"
        );
    }
}

#[test]
fn a_snapshot_path_and_a_local_folder_are_checked_as_vllm_would_start_from_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, main, _) = cache_with_two_snapshots(tmp.path());
    let storage = tmp.path().join("models");
    // The runbook's production form: vLLM started from the snapshot folder.
    let snapshot = hub.join("models--org--model/snapshots").join(MAIN);
    let (_, report) = doctor(tmp.path(), &storage, |c| {
        c.arg("--model").arg(&snapshot);
    });
    assert_eq!(report["model"], "org/model", "{report:#}");
    assert_eq!(report["revision"], MAIN, "{report:#}");
    let (st, summary, _) = check(&report, "hf.snapshot");
    assert_eq!(st, "PASS", "{summary}");
    let (_, summary, fix) = check(&report, "model.converted");
    assert!(summary.contains("not converted"), "{summary}");
    assert!(fix.contains(&format!("--revision {MAIN}")), "{fix}");
    // A folder that is not a snapshot says what to pass instead.
    let (out, stdout, stderr) = run(sllm_store(tmp.path())
        .args(["doctor", "--model"])
        .arg(tmp.path())
        .arg("--storage-path")
        .arg(&storage));
    assert!(!out.status.success(), "{stdout}");
    assert!(stderr.contains("--local-model-path"), "{stderr}");

    // A --local-dir download: weights and config, no tokenizer.
    let local = tmp.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    write_safetensors(&local.join("model.safetensors"), &main);
    std::fs::write(local.join("config.json"), "{}").unwrap();
    let (_, report) = doctor(tmp.path(), &storage, |c| {
        c.args(["--model", "org/local", "--local-model-path"])
            .arg(&local);
    });
    let (st, summary, _) = check(&report, "source.folder");
    assert_eq!(st, "WARN", "{summary}");
    assert!(
        summary.contains("1 safetensors file(s)") && summary.contains("no tokenizer"),
        "{summary}"
    );
    let (st, summary, fix) = check(&report, "model.converted");
    assert_eq!(st, "WARN", "{summary}");
    assert!(fix.contains("sllm-store save --model org/local"), "{fix}");
    // An empty folder stops.
    let empty = tmp.path().join("nothing");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, report) = doctor(tmp.path(), &storage, |c| {
        c.arg("--local-model-path").arg(&empty);
    });
    assert_eq!(status(&report, "source.folder"), "STOP");
    assert_eq!(code, 1);
}

#[test]
fn save_and_start_warn_when_the_storage_path_is_on_the_os_disk() {
    let Some(dir) = dir_on_root_fs() else {
        eprintln!("skipped: no writable directory on the root filesystem");
        return;
    };
    let storage = dir.path().join("models");
    let tensors = tensors_of(64 << 10, 3);
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    write_safetensors(&src.join("model.safetensors"), &tensors);
    let (out, _, stderr) = run(sllm_store(dir.path())
        .args(["save", "--model", "o/m", "--local-model-path"])
        .arg(&src)
        .arg("--storage-path")
        .arg(&storage));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("same filesystem as /").count(),
        1,
        "warned once: {stderr}"
    );
    assert!(stderr.contains("--storage-path /nvme/models"), "{stderr}");
    // A save refused by its checks says why, and only that.
    let stderr = run_err(
        sllm_store(dir.path())
            .args(["save", "--model", "o/n", "--local-model-path"])
            .arg(dir.path().join("absent"))
            .arg("--storage-path")
            .arg(&storage),
    );
    assert!(!stderr.contains("same filesystem as /"), "{stderr}");
    let daemon = Daemon::start(
        dir.path(),
        &storage,
        &["--mem-pool-size", "1MiB", "--chunk-size", "64KiB"],
    );
    let log = daemon.log_text();
    assert!(log.contains("same filesystem as /"), "{log}");
    // One-shot commands print their summary and warnings, not INFO logs,
    // unless RUST_LOG asks for them.
    let (out, stdout, stderr) = run(sllm_store(dir.path()).env_remove("RUST_LOG").args([
        "load",
        "--model",
        "o/m",
        "--device",
        "cuda",
        "--server",
        &daemon.addr,
    ]));
    assert!(!out.status.success(), "{stdout}");
    assert!(!stderr.contains("INFO"), "{stderr}");
    assert!(
        stderr.contains("serves host devices, but --device cuda was asked for")
            && stderr.contains("--device host"),
        "{stderr}"
    );
}
