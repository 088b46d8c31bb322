//! Access control on shared hosts: a token every storage call must carry
//! (`--auth-token-file`, sent by the clients from `SLLM_STORE_TOKEN` or
//! `SLLM_STORE_TOKEN_FILE`), the health service open without it, and a unix
//! socket private to its user by default.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::*;

/// A private token file holding `token`.
fn token_file(dir: &Path, token: &str) -> std::path::PathBuf {
    let path = dir.join("token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn load(home: &Path, storage: &Path, addr: &str) -> std::process::Command {
    let mut cmd = load_cmd(home, storage, addr, "o/m");
    cmd.env_remove("SLLM_STORE_TOKEN")
        .env_remove("SLLM_STORE_TOKEN_FILE")
        .arg("--verify");
    cmd
}

#[test]
fn a_token_is_required_on_every_storage_call_but_not_on_health() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    save_model(
        tmp.path(),
        &storage,
        "o/m",
        &tensors_of(300 << 10, 5),
        "1MiB",
    );
    let secret = "s3cret-0123456789abcdef";
    let file = token_file(tmp.path(), secret);
    let daemon = Daemon::start(
        tmp.path(),
        &storage,
        &[
            "--auth-token-file",
            file.to_str().unwrap(),
            "--mem-pool-size",
            "4MiB",
            "--chunk-size",
            "256KiB",
        ],
    );
    // No token: refused, with what to do.
    let err = run_err(&mut load(tmp.path(), &storage, &daemon.addr));
    assert!(
        err.contains("Unauthenticated") || err.contains("requires a token"),
        "{err}"
    );
    assert!(err.contains("SLLM_STORE_TOKEN"), "{err}");
    // A wrong one: refused, and the daemon says so in its log.
    let err = run_err(load(tmp.path(), &storage, &daemon.addr).env("SLLM_STORE_TOKEN", "wrong"));
    assert!(err.contains("does not match"), "{err}");
    assert!(!err.contains(secret), "the secret never appears: {err}");
    // The right one, from the environment or from a file.
    let out = run_ok(load(tmp.path(), &storage, &daemon.addr).env("SLLM_STORE_TOKEN", secret));
    assert!(out.contains("every tensor matches"), "{out}");
    let out = run_ok(load(tmp.path(), &storage, &daemon.addr).env("SLLM_STORE_TOKEN_FILE", &file));
    assert!(out.contains("every tensor matches"), "{out}");
    // Health probes need no token.
    run_ok(sllm_store(tmp.path()).env_remove("SLLM_STORE_TOKEN").args([
        "health",
        "--server",
        &daemon.addr,
    ]));
    let log = daemon.log_text();
    assert!(log.contains("refused a call"), "{log}");
    assert!(!log.contains(secret), "the secret never appears in the log");
}

#[test]
fn a_token_file_others_can_read_or_an_empty_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let file = token_file(tmp.path(), "abc");
    let start = || {
        run_err(
            sllm_store(tmp.path())
                .args(["start", "--port", "0", "--auth-token-file"])
                .arg(&file)
                .arg("--storage-path")
                .arg(tmp.path()),
        )
    };
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = start();
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::write(&file, "\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = start();
    assert!(err.contains("is empty"), "{err}");
}

#[test]
fn the_unix_socket_is_private_by_default_and_its_peers_are_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    save_model(
        tmp.path(),
        &storage,
        "o/m",
        &tensors_of(200 << 10, 6),
        "1MiB",
    );
    for (mode, extra) in [(0o600, None), (0o660, Some("660"))] {
        let sock = tmp.path().join(format!("store-{mode:o}.sock"));
        let listen = format!("unix:{}", sock.display());
        let mut args = vec![
            "--listen",
            listen.as_str(),
            "--mem-pool-size",
            "4MiB",
            "--chunk-size",
            "256KiB",
        ];
        if let Some(m) = extra {
            args.extend(["--socket-mode", m]);
        }
        let daemon = Daemon::start(tmp.path(), &storage, &args);
        let got = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(got, mode, "socket mode");
        let out = run_ok(&mut load(tmp.path(), &storage, &listen));
        assert!(out.contains("every tensor matches"), "{out}");
        let uid = rustix::process::getuid().as_raw();
        let log = daemon.log_text();
        assert!(
            log.contains("connection accepted") && log.contains(&format!("uid {uid}")),
            "{log}"
        );
    }
}
