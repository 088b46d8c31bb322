//! The daemon against connection floods and a low open-file limit (issue 12
//! item 4): health still answers, nothing spins, idle connections give way
//! to new ones, and accepting recovers once descriptors are back.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sllm_client::StoreClient;
use sllm_client::plan::Layout;

use crate::common::*;
use crate::daemon::load_and_check;

/// The client's opening bytes: HTTP/2's connection preface and an empty
/// SETTINGS frame, as a gRPC client sends before its first call.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Whether util-linux's `prlimit` is here (it is on any ordinary Linux).
fn have_prlimit() -> bool {
    Command::new("prlimit")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Makes room for a few hundred sockets in this test process (tests run in
/// parallel in one process): the soft open-file limit up to 4096 if allowed.
fn room_for_sockets() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let want = limit.maximum.map_or(4096, |max| max.min(4096));
    if limit.current.is_some_and(|cur| cur < want) {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(want),
                maximum: limit.maximum,
            },
        );
    }
}

/// `n` idle TCP connections to `addr`; every third one has sent the HTTP/2
/// preface, the others nothing.
fn idle_connections(addr: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(addr).expect("connect (the backlog holds it)");
            if i % 3 == 0 {
                s.write_all(PREFACE).unwrap();
            }
            s
        })
        .collect()
}

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name (in parentheses, maybe with spaces): state is
    // field 3 of the line, utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / rustix::param::clock_ticks_per_second() as f64
}

/// CPU seconds `pid` uses over `secs` of wall time.
fn cpu_over(pid: u32, secs: u64) -> f64 {
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(secs));
    cpu_seconds(pid) - before
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Runs `sllm-store health` against `addr`; returns its output and time.
fn health(home: &Path, addr: &str) -> (bool, String, Duration) {
    let started = Instant::now();
    let (out, stdout, stderr) = run(sllm_store(home).args(["health", "--server", addr]));
    (
        out.status.success(),
        format!("{stdout}{stderr}"),
        started.elapsed(),
    )
}

/// A model of about 1 MiB saved as `o/m` under `<tmp>/models`.
fn a_model(tmp: &Path, seed: u64) -> (std::path::PathBuf, Vec<Tensor>) {
    let storage = tmp.join("models");
    let tensors = tensors_of(1 << 20, seed);
    save_model(tmp, &storage, "o/m", &tensors, "512KiB");
    (storage, tensors)
}

const POOL: [&str; 4] = ["--mem-pool-size", "4MiB", "--chunk-size", "256KiB"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_hundred_idle_connections_under_200_descriptors() {
    if !have_prlimit() {
        eprintln!(
            "skipping: util-linux's prlimit is not installed, so the daemon cannot be started under a low open-file limit"
        );
        return;
    }
    room_for_sockets();
    let tmp = tempfile::tempdir().unwrap();
    let (storage, tensors) = a_model(tmp.path(), 51);
    let daemon = Daemon::start_via(
        tmp.path(),
        &storage,
        &POOL,
        &["prlimit", "--nofile=200:200", "--"],
    );
    let log = daemon.log_text();
    assert!(
        log.contains("at most 136 connections at once, not 1024")
            && log.contains("open-file limit is 200"),
        "the limit is lowered to leave a reserve, and says so: {log}"
    );
    let pid = daemon.child.id();
    let base = open_descriptors(pid);
    let idle = idle_connections(&daemon.addr, 400);

    // (1) Health gets in: idle connections give way at the limit.
    let (ok, out, took) = health(tmp.path(), &daemon.addr);
    assert!(
        ok,
        "health failed after {took:?}: {out}\n{}",
        daemon.log_text()
    );
    assert!(took < Duration::from_secs(10), "health took {took:?}");

    // (2) Nothing spins while the connections stay open.
    let used = cpu_over(pid, 2);
    assert!(
        used < 0.5,
        "the daemon used {used:.2} s of CPU in 2 s with 400 idle connections"
    );
    // The cap holds: its 136 connections, one waiting for room, health's.
    let open = open_descriptors(pid);
    assert!(
        open <= base + 138,
        "{open} descriptors open, {base} before the connections"
    );

    // (3) Once they are gone, a real load works.
    drop(idle);
    let mut client =
        tokio::time::timeout(Duration::from_secs(20), StoreClient::connect(&daemon.addr))
            .await
            .expect("connects in time")
            .unwrap();
    tokio::time::timeout(
        Duration::from_secs(60),
        load_and_check(&mut client, &storage, "o/m", &tensors, Layout::Mirrored),
    )
    .await
    .expect("the load finishes");
    assert!(
        !daemon.log_text().contains("out of file descriptors"),
        "the limit kept accept from running out: {}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_accept_backs_off_and_recovers() {
    if !have_prlimit() {
        eprintln!(
            "skipping: util-linux's prlimit is not installed, so the daemon's open-file limit cannot be lowered"
        );
        return;
    }
    room_for_sockets();
    let tmp = tempfile::tempdir().unwrap();
    let (storage, tensors) = a_model(tmp.path(), 52);
    let daemon = Daemon::start(tmp.path(), &storage, &POOL);
    let pid = daemon.child.id();
    let base = open_descriptors(pid);

    // 60 idle connections, all admitted (the limit is 1024)...
    let idle = idle_connections(&daemon.addr, 60);
    let deadline = Instant::now() + Duration::from_secs(20);
    while open_descriptors(pid) < base + 60 {
        assert!(Instant::now() < deadline, "the daemon did not accept them");
        std::thread::sleep(Duration::from_millis(20));
    }
    // ...then the open-file limit drops below what is open: the
    // reproduction of the spin, where every accept fails with EMFILE.
    let limit = format!("--nofile={0}:{0}", base + 30);
    run_ok(Command::new("prlimit").args(["--pid", &pid.to_string(), &limit]));
    let waiting = idle_connections(&daemon.addr, 10);
    std::thread::sleep(Duration::from_millis(300));
    let used = cpu_over(pid, 2);
    assert!(
        used < 0.5,
        "the daemon used {used:.2} s of CPU in 2 s out of descriptors: {}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    assert_eq!(
        log.matches("out of file descriptors").count(),
        1,
        "one warning per streak: {log}"
    );

    // Connections close: descriptors come back, and so does accepting.
    drop(idle);
    let (ok, out, took) = health(tmp.path(), &daemon.addr);
    assert!(
        ok,
        "health failed after {took:?}: {out}\n{}",
        daemon.log_text()
    );
    assert!(
        daemon.log_text().contains("accepting connections again"),
        "{}",
        daemon.log_text()
    );
    drop(waiting);
    let mut client = daemon.client().await;
    load_and_check(&mut client, &storage, "o/m", &tensors, Layout::Packed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_allowed_and_five_idle_ones_still_serve_a_client() {
    room_for_sockets();
    let tmp = tempfile::tempdir().unwrap();
    let (storage, tensors) = a_model(tmp.path(), 53);
    let mut extra = POOL.to_vec();
    extra.extend(["--max-connections", "2"]);
    let daemon = Daemon::start(tmp.path(), &storage, &extra);
    assert!(
        daemon.log_text().contains("at most 2 connections at once"),
        "{}",
        daemon.log_text()
    );
    let pid = daemon.child.id();
    let base = open_descriptors(pid);
    let idle = idle_connections(&daemon.addr, 5);
    let mut client = daemon.client().await;
    tokio::time::timeout(
        Duration::from_secs(60),
        load_and_check(&mut client, &storage, "o/m", &tensors, Layout::Mirrored),
    )
    .await
    .expect("served despite the idle connections");
    assert!(
        daemon.log_text().contains("closing the one idle longest"),
        "{}",
        daemon.log_text()
    );

    // Idle for a while, the client's own connection is closed for
    // newcomers; its next call reconnects.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let more = idle_connections(&daemon.addr, 4);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Two connections, and one accepted socket waiting for room.
    let open = open_descriptors(pid);
    assert!(
        open <= base + 3,
        "{open} descriptors open, {base} before the connections"
    );
    tokio::time::timeout(
        Duration::from_secs(60),
        load_and_check(&mut client, &storage, "o/m", &tensors, Layout::Packed),
    )
    .await
    .expect("served after reconnecting");
    drop((idle, more));
}
