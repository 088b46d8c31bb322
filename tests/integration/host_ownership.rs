//! The host backend writes only into files its client could write itself
//! (issue 12 item 6d): a daemon running as root, a client running as
//! `nobody` (65534) over loopback TCP and over a unix socket, and files of
//! other users in the daemon's shared-memory directory.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sllm_client::StoreClient;
use tonic::Code;

use crate::common::*;
use crate::daemon::{mc, one};

const NOBODY: u32 = 65534;
const OTHER: u32 = 65533;
/// What the test writes into each file before the daemon may touch it.
const FILL: u8 = 0xa5;

/// One file in the shared-memory directory and whether the client may have
/// the daemon write into it, over TCP (uid only) and over a unix socket
/// (uid and gid).
struct Case {
    name: &'static str,
    uid: u32,
    gid: u32,
    mode: u32,
    hard_link: bool,
    over_tcp: bool,
    over_unix: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "others-0400",
        uid: OTHER,
        gid: OTHER,
        mode: 0o400,
        hard_link: false,
        over_tcp: false,
        over_unix: false,
    },
    Case {
        name: "roots-0600",
        uid: 0,
        gid: 0,
        mode: 0o600,
        hard_link: false,
        over_tcp: false,
        over_unix: false,
    },
    Case {
        name: "nobodys-0600",
        uid: NOBODY,
        gid: NOBODY,
        mode: 0o600,
        hard_link: false,
        over_tcp: true,
        over_unix: true,
    },
    // Writable by nobody's group: the daemon learns the group only from
    // SO_PEERCRED.
    Case {
        name: "group-0620",
        uid: OTHER,
        gid: NOBODY,
        mode: 0o620,
        hard_link: false,
        over_tcp: false,
        over_unix: true,
    },
    // Anyone may write it, but another name for it may be anywhere.
    Case {
        name: "linked-0666",
        uid: OTHER,
        gid: OTHER,
        mode: 0o666,
        hard_link: true,
        over_tcp: false,
        over_unix: false,
    },
];

/// Runs `work` on a thread whose credentials are nobody's. Only that thread
/// changes (raw per-thread syscalls, not libc's process-wide setuid): the
/// sockets it makes are owned by nobody and SO_PEERCRED reports nobody,
/// exactly as for a process running as nobody, without needing the test
/// binary to be executable by nobody.
fn as_nobody<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    use rustix::process::{Gid, Uid};
    std::thread::spawn(move || {
        let (uid, gid) = (Uid::from_raw(NOBODY), Gid::from_raw(NOBODY));
        rustix::thread::set_thread_groups(&[]).expect("drop supplementary groups");
        rustix::thread::set_thread_res_gid(gid, gid, gid).expect("become group nobody");
        rustix::thread::set_thread_res_uid(uid, uid, uid).expect("become nobody");
        assert_eq!(rustix::process::geteuid().as_raw(), NOBODY);
        work()
    })
    .join()
    .expect("the client thread")
}

/// As nobody: loads `o/m` to the host, then asks for a copy of its first
/// `size` bytes into each of `files`; the outcome of each (confirmed, or
/// the refusal's code and message).
fn load_into_each_as_nobody(
    addr: String,
    files: Vec<PathBuf>,
    size: u64,
) -> Vec<Result<(), (Option<Code>, String)>> {
    as_nobody(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut client = StoreClient::connect(&addr).await.unwrap();
            let dev = client.server_config().await.unwrap().device_uuids[0].clone();
            client.load_to_host("o/m").await.unwrap();
            let mut outcomes = Vec::new();
            for (i, file) in files.iter().enumerate() {
                let replica = format!("r{i}");
                let copies = one(&dev, mc(0, size, 0, 0));
                let handles = HashMap::from([(
                    dev.clone(),
                    vec![file.to_str().unwrap().as_bytes().to_vec()],
                )]);
                let outcome = match client
                    .load_to_devices("o/m", &replica, copies, handles)
                    .await
                {
                    Ok(()) => client.confirm("o/m", &replica).await,
                    Err(e) => Err(e),
                };
                outcomes.push(outcome.map_err(|e| (e.code(), e.to_string())));
            }
            outcomes
        })
    })
}

/// Makes the case files in `dir`, each `size` bytes of [`FILL`].
fn make_files(dir: &Path, prefix: &str, size: usize) -> Vec<PathBuf> {
    CASES
        .iter()
        .map(|c| {
            let path = dir.join(format!("{prefix}-{}", c.name));
            std::fs::write(&path, vec![FILL; size]).unwrap();
            std::os::unix::fs::chown(&path, Some(c.uid), Some(c.gid)).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(c.mode)).unwrap();
            if c.hard_link {
                std::fs::hard_link(&path, dir.join(format!("{prefix}-{}-link", c.name))).unwrap();
            }
            path
        })
        .collect()
}

#[test]
fn a_root_daemon_writes_only_into_files_its_client_could_write() {
    if !rustix::process::geteuid().is_root() {
        eprintln!(
            "skipping: this test needs root (as CI has) to run the daemon as root, make files \
             owned by other users and act as uid {NOBODY}; the unit tests of device::host cover \
             the rules without it"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    let tensors = tensors_of(64 << 10, 61);
    save_model(tmp.path(), &storage, "o/m", &tensors, "1MiB");
    let model = Stored::read(&storage.join("o/m")).bytes;
    // Like /dev/shm itself: anyone may make files in it.
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    std::fs::set_permissions(shm.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    // The unix socket where nobody can reach it.
    let sockets = tempfile::tempdir().unwrap();
    std::fs::set_permissions(sockets.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = sockets.path().join("store.sock");
    let shm_dir = shm.path().to_str().unwrap();
    let pool = [
        "--device",
        "host",
        "--host-shm-dir",
        shm_dir,
        "--mem-pool-size",
        "1MiB",
        "--chunk-size",
        "64KiB",
    ];

    for unix in [false, true] {
        let transport = if unix { "unix" } else { "tcp" };
        let files = make_files(shm.path(), transport, model.len());
        let listen = format!("unix:{}", sock.display());
        let mut extra = pool.to_vec();
        if unix {
            extra.extend(["--listen", &listen]);
        }
        let mut daemon = Daemon::start(tmp.path(), &storage, &extra);
        if unix {
            daemon.addr = listen.clone();
            std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let outcomes =
            load_into_each_as_nobody(daemon.addr.clone(), files.clone(), model.len() as u64);
        for ((case, file), outcome) in CASES.iter().zip(&files).zip(outcomes) {
            let allowed = if unix { case.over_unix } else { case.over_tcp };
            let bytes = std::fs::read(file).unwrap();
            let what = format!("{} over {transport}", case.name);
            if allowed {
                assert_eq!(outcome, Ok(()), "{what}");
                assert!(bytes == model, "{what}: the model's bytes were written");
                continue;
            }
            let (code, message) = outcome.expect_err(&what);
            assert_eq!(code, Some(Code::InvalidArgument), "{what}: {message}");
            assert!(
                message.contains(file.to_str().unwrap())
                    && message.contains(&format!("owner uid {}", case.uid))
                    && message.contains(&format!("mode {:04o}", case.mode))
                    && message.contains(&format!("uid {NOBODY}")),
                "{what}: names the file, its owner and mode, and the client: {message}"
            );
            assert!(
                message.contains("create the buffer") || message.contains("buffer of your own"),
                "{what}: says what to do: {message}"
            );
            assert!(
                bytes.iter().all(|&b| b == FILL),
                "{what}: the file was left alone"
            );
        }
        drop(daemon);
    }
}
