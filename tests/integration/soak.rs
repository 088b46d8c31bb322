//! The soak test (slow tier): for a bounded time (`SLLM_SOAK_SECONDS`,
//! default 45), a real daemon takes mixed loads, unloads and clears, models
//! re-saved under it, hostile requests, and `sllm-store load` clients killed
//! mid-load, all at once. Checked throughout and at the end:
//! - every load that succeeds holds, byte for byte, a version of the model
//!   that was on disk while it ran (one whole version, never a mix);
//! - the daemon answers its health check throughout;
//! - its RSS, open descriptors and threads stay flat;
//! - the killed clients' buffers in /dev/shm are gone once a new one is made.
//!
//! With `SLLM_SOAK_REPORT=<file>` the figures are written there as JSON (a
//! relative path is taken from the workspace's root).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sllm_client::StoreClient;
use sllm_client::plan::{DeviceMap, Layout, plan};
use sllm_client::proto::MemCopyChunk;
use sllm_format::TensorIndex;

use crate::common::*;

/// The models and their sizes; together they overflow the pool, so loads
/// evict each other.
const MODELS: [(&str, usize); 3] = [
    ("soak/a", 1 << 20),
    ("soak/b", 3 << 20),
    ("soak/c", 2 << 20),
];

/// A load of a few MiB takes milliseconds; one that takes this long hangs.
const LOAD_TIME_LIMIT: Duration = Duration::from_secs(30);

/// One version of a model, listed before its save starts: the save
/// publishes it on disk a little before `save` returns, and a load may read
/// it in that gap.
struct Version {
    tensors: Arc<Vec<Tensor>>,
    /// When its save began, and when `save` returned (`None` while it runs).
    began: Instant,
    published: Option<Instant>,
}

impl Version {
    /// Whether a load that ran from `t0` to `t1` may hold this version.
    /// `current` is the version published when it began.
    fn could_be_read(&self, is_current: bool, t0: Instant, t1: Instant) -> bool {
        is_current || (self.began < t1 && self.published.is_none_or(|p| p > t0))
    }

    /// Every tensor of this version is in `bytes`, byte for byte.
    fn holds(&self, bytes: &HashMap<String, Vec<u8>>) -> bool {
        self.tensors_matching(bytes) == self.tensors.len()
    }

    /// How many of `bytes`' tensors equal this version's.
    fn tensors_matching(&self, bytes: &HashMap<String, Vec<u8>>) -> usize {
        self.tensors
            .iter()
            .filter(|t| bytes.get(&t.name) == Some(&t.data))
            .count()
    }
}

/// What a load that matched no version held, for the failure message: for
/// each version, its tensors that match and its times relative to the load.
fn describe_mismatch(
    list: &[Version],
    bytes: &HashMap<String, Vec<u8>>,
    t0: Instant,
    t1: Instant,
) -> String {
    let ms = |t: Instant| {
        if t >= t0 {
            format!("+{:.1} ms", (t - t0).as_secs_f64() * 1e3)
        } else {
            format!("-{:.1} ms", (t0 - t).as_secs_f64() * 1e3)
        }
    };
    let rows: Vec<String> = list
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            let n = v.tensors_matching(bytes);
            (n > 0).then_some((i, v, n))
        })
        .map(|(i, v, n)| {
            format!(
                "v{i}: {n}/{} tensors, save began {}, returned {}",
                v.tensors.len(),
                ms(v.began),
                v.published.map_or("not yet".to_owned(), ms),
            )
        })
        .collect();
    format!(
        "the load ran for {:.1} ms; versions it partly holds: [{}]",
        (t1 - t0).as_secs_f64() * 1e3,
        rows.join("; ")
    )
}

#[derive(Default)]
struct Counts {
    loads_ok: AtomicU64,
    loads_changed: AtomicU64,
    loads_failed: AtomicU64,
    resaves: AtomicU64,
    unloads: AtomicU64,
    hostile: AtomicU64,
    kills: AtomicU64,
    health_checks: AtomicU64,
}

#[derive(Clone, Copy, Debug, serde::Serialize)]
struct Sample {
    t_s: f64,
    rss_bytes: u64,
    fds: usize,
    threads: usize,
}

fn sample(pid: u32, started: Instant) -> Sample {
    Sample {
        t_s: started.elapsed().as_secs_f64(),
        rss_bytes: rss_bytes(pid),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()),
        threads: proc_status_field(pid, "Threads:") as usize,
    }
}

/// The median of `f` over `samples`.
fn median(samples: &[Sample], f: impl Fn(&Sample) -> u64) -> u64 {
    let mut v: Vec<u64> = samples.iter().map(f).collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn save_version(home: &Path, storage: &Path, model: &str, tensors: &[Tensor], tag: &str) {
    save_model_from(home, storage, model, tensors, "1MiB", tag, &["--force"]);
}

/// One load through the client into fresh shared-memory buffers: the bytes
/// of each tensor, or `None` when the model changed on disk during the load
/// (which the client is told to treat as "load again"), or the error.
async fn load_once(
    client: &mut StoreClient,
    storage: &Path,
    model: &str,
    device: &str,
) -> Result<Option<HashMap<String, Vec<u8>>>, String> {
    let index_path = storage.join(model).join("tensor_index.json");
    let stamp = || {
        std::fs::metadata(&index_path)
            .ok()
            .map(|m| sllm_format::partitions::FileStamp::of(&m))
    };
    let before = stamp();
    let index = match TensorIndex::read(&storage.join(model)) {
        Ok(index) => index,
        Err(_) => return Ok(None), // mid re-save
    };
    let plan =
        plan(&index, &DeviceMap::single(device), Layout::Mirrored).map_err(|e| e.to_string())?;
    let buffers = copy_into_shm(client, model, &plan).await?;
    if stamp() != before {
        return Ok(None);
    }
    let mut out = HashMap::new();
    for name in plan.tensors.keys() {
        let size = index.get(name).map_or(0, |e| e.size);
        let (bytes, _) = read_back(&plan, &buffers, name, size as usize)?;
        out.insert(name.clone(), bytes);
    }
    Ok(Some(out))
}

#[test]
#[ignore = "slow tier (soak, SLLM_SOAK_SECONDS, default 45 s): cargo test -- --include-ignored"]
fn soak_mixed_work_keeps_bytes_right_and_the_daemon_flat() {
    let seconds: u64 = std::env::var("SLLM_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().to_owned();
    let storage = tmp.path().join("models");
    let versions: Arc<Mutex<HashMap<&'static str, Vec<Version>>>> = Arc::default();
    for (i, (model, bytes)) in MODELS.iter().enumerate() {
        let tensors = Arc::new(tensors_of(*bytes, 100 + i as u64));
        let began = Instant::now();
        save_version(&home, &storage, model, &tensors, "-v0");
        versions.lock().unwrap().insert(
            model,
            vec![Version {
                tensors,
                began,
                published: Some(Instant::now()),
            }],
        );
    }
    let daemon = Daemon::start(
        &home,
        &storage,
        &["--mem-pool-size", "4MiB", "--chunk-size", "256KiB"],
    );
    let pid = daemon.child.id();
    let addr = daemon.addr.clone();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    // Pids of the `sllm-store load` clients killed mid-load.
    let killed: Arc<Mutex<Vec<u32>>> = Arc::default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    runtime.block_on(async {
        let mut tasks = Vec::new();
        // Loaders: each load is checked against the versions on disk while it ran.
        for worker in 0..2u64 {
            let (addr, storage, versions, counts, failures, stop) = (
                addr.clone(),
                storage.clone(),
                Arc::clone(&versions),
                Arc::clone(&counts),
                Arc::clone(&failures),
                Arc::clone(&stop),
            );
            tasks.push(tokio::spawn(async move {
                let mut client = StoreClient::connect(&addr).await.unwrap();
                let device = client.server_config().await.unwrap().device_uuids[0].clone();
                let mut n = worker;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let model = MODELS[(n as usize) % MODELS.len()].0;
                    let t0 = Instant::now();
                    let got = tokio::time::timeout(
                        LOAD_TIME_LIMIT,
                        load_once(&mut client, &storage, model, &device),
                    )
                    .await;
                    let t1 = Instant::now();
                    let Ok(got) = got else {
                        failures.lock().unwrap().push(format!(
                            "{model}: a load took over {} s",
                            LOAD_TIME_LIMIT.as_secs()
                        ));
                        client = StoreClient::connect(&addr).await.unwrap();
                        continue;
                    };
                    match got {
                        Ok(Some(bytes)) => {
                            let versions = versions.lock().unwrap();
                            let list = &versions[model];
                            let current = list
                                .iter()
                                .rposition(|v| v.published.is_some_and(|p| p <= t0))
                                .unwrap_or(0);
                            let matched = list.iter().enumerate().any(|(i, v)| {
                                v.could_be_read(i == current, t0, t1) && v.holds(&bytes)
                            });
                            if matched {
                                counts.loads_ok.fetch_add(1, Ordering::Relaxed);
                            } else {
                                failures.lock().unwrap().push(format!(
                                    "{model}: a load matched no version on disk while it ran: {}",
                                    describe_mismatch(list, &bytes, t0, t1)
                                ));
                            }
                        }
                        Ok(None) => {
                            counts.loads_changed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.contains("cannot reach") || e.contains("transport") => {
                            failures.lock().unwrap().push(format!("{model}: {e}"));
                        }
                        Err(_) => {
                            // Changed under the load, evicted, pool busy: refused
                            // with a status, which is allowed.
                            counts.loads_failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        // Unloads and clears.
        {
            let (addr, counts, stop) = (addr.clone(), Arc::clone(&counts), Arc::clone(&stop));
            tasks.push(tokio::spawn(async move {
                let mut client = StoreClient::connect(&addr).await.unwrap();
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let _ = if n.is_multiple_of(7) {
                        client.clear().await
                    } else {
                        client.unload(MODELS[n % MODELS.len()].0).await
                    };
                    counts.unloads.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            }));
        }
        // Hostile requests: each must get a status, never a broken connection.
        {
            let (addr, counts, failures, stop) = (
                addr.clone(),
                Arc::clone(&counts),
                Arc::clone(&failures),
                Arc::clone(&stop),
            );
            tasks.push(tokio::spawn(async move {
                let mut client = StoreClient::connect(&addr).await.unwrap();
                let device = client.server_config().await.unwrap().device_uuids[0].clone();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let copy = MemCopyChunk {
                        src_offset: u64::MAX - 10,
                        size: 100,
                        dst_offset: 0,
                        handle_idx: 0,
                    };
                    let outcome = match n % 5 {
                        0 => client.register("../../etc").await.map(|_| ()),
                        1 => client.load_to_host("soak/absent").await,
                        2 => client.confirm("soak/a", "no-such-replica").await,
                        3 => {
                            client
                                .load_to_devices(
                                    "soak/a",
                                    &format!("h{n}"),
                                    HashMap::from([(device.clone(), vec![copy])]),
                                    HashMap::from([(
                                        device.clone(),
                                        vec![b"/etc/passwd".to_vec()],
                                    )]),
                                )
                                .await
                        }
                        _ => {
                            client
                                .load_to_devices(
                                    "soak/b",
                                    &format!("h{n}"),
                                    HashMap::from([("not-a-device".to_owned(), vec![copy])]),
                                    HashMap::from([("not-a-device".to_owned(), vec![vec![0; 64]])]),
                                )
                                .await
                        }
                    };
                    match outcome {
                        Err(e) if e.code().is_some() => {}
                        other => failures
                            .lock()
                            .unwrap()
                            .push(format!("hostile request {n}: {other:?}")),
                    }
                    counts.hostile.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            }));
        }
        // Health, and the daemon's resources, every half second.
        {
            let (addr, counts, failures, samples, stop) = (
                addr.clone(),
                Arc::clone(&counts),
                Arc::clone(&failures),
                Arc::clone(&samples),
                Arc::clone(&stop),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let serving = match StoreClient::connect(&addr).await {
                        Ok(c) => c.serving().await.unwrap_or(false),
                        Err(_) => false,
                    };
                    if !serving {
                        failures.lock().unwrap().push(format!(
                            "health check failed at {:.1} s",
                            started.elapsed().as_secs_f64()
                        ));
                    }
                    counts.health_checks.fetch_add(1, Ordering::Relaxed);
                    samples.lock().unwrap().push(sample(pid, started));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }));
        }
        // Re-saves and killed clients, on blocking threads.
        {
            let (home, storage, versions, counts, stop) = (
                home.clone(),
                storage.clone(),
                Arc::clone(&versions),
                Arc::clone(&counts),
                Arc::clone(&stop),
            );
            tasks.push(tokio::task::spawn_blocking(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let (model, bytes) = MODELS[(n as usize) % MODELS.len()];
                    let tensors = Arc::new(tensors_of(bytes, 1000 + n));
                    // Listed before the save starts: it is on disk before
                    // `save` returns.
                    let slot = {
                        let mut versions = versions.lock().unwrap();
                        let list = versions.get_mut(model).unwrap();
                        list.push(Version {
                            tensors: Arc::clone(&tensors),
                            began: Instant::now(),
                            published: None,
                        });
                        list.len() - 1
                    };
                    save_version(&home, &storage, model, &tensors, &format!("-v{n}"));
                    versions.lock().unwrap().get_mut(model).unwrap()[slot].published =
                        Some(Instant::now());
                    counts.resaves.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(700));
                }
            }));
        }
        {
            let (home, storage, addr, counts, killed, stop) = (
                home.clone(),
                storage.clone(),
                addr.clone(),
                Arc::clone(&counts),
                Arc::clone(&killed),
                Arc::clone(&stop),
            );
            tasks.push(tokio::task::spawn_blocking(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let model = MODELS[(n as usize) % MODELS.len()].0;
                    let mut child = load_cmd(&home, &storage, &addr, model)
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .unwrap();
                    std::thread::sleep(Duration::from_millis(5 + (n * 7) % 60));
                    let _ = child.kill();
                    let _ = child.wait();
                    killed.lock().unwrap().push(child.id());
                    counts.kills.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }));
        }
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
    });
    // Let killed clients' connections and copies wind down, then a last look.
    std::thread::sleep(Duration::from_secs(2));
    samples.lock().unwrap().push(sample(pid, started));

    let samples = samples.lock().unwrap().clone();
    let fifth = (samples.len() / 5).max(1);
    let (early, late) = (&samples[..fifth], &samples[samples.len() - fifth..]);
    let drift = |f: &dyn Fn(&Sample) -> u64| median(late, f) as i64 - median(early, f) as i64;
    let rss_drift = drift(&|s| s.rss_bytes);
    let fd_drift = drift(&|s| s.fds as u64);
    let thread_drift = drift(&|s| s.threads as u64);
    let c = &counts;
    let report = serde_json::json!({
        "seconds": seconds,
        "loads_ok": c.loads_ok.load(Ordering::Relaxed),
        "loads_changed_during_the_load": c.loads_changed.load(Ordering::Relaxed),
        "loads_refused": c.loads_failed.load(Ordering::Relaxed),
        "resaves": c.resaves.load(Ordering::Relaxed),
        "unloads_and_clears": c.unloads.load(Ordering::Relaxed),
        "hostile_requests": c.hostile.load(Ordering::Relaxed),
        "clients_killed": c.kills.load(Ordering::Relaxed),
        "health_checks": c.health_checks.load(Ordering::Relaxed),
        "rss_bytes": {"early": median(early, |s| s.rss_bytes), "late": median(late, |s| s.rss_bytes), "drift": rss_drift},
        "fds": {"early": median(early, |s| s.fds as u64), "late": median(late, |s| s.fds as u64), "drift": fd_drift},
        "threads": {"early": median(early, |s| s.threads as u64), "late": median(late, |s| s.threads as u64), "drift": thread_drift},
        "samples": samples,
    });
    println!("soak: {}", serde_json::to_string(&report).unwrap());
    if let Some(path) = std::env::var_os("SLLM_SOAK_REPORT") {
        // Cargo runs the test in the package's folder (`store/`): a
        // relative path means one under the workspace, where it was typed.
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(PathBuf::from(path));
        std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap())
            .unwrap_or_else(|e| panic!("SLLM_SOAK_REPORT: cannot write {}: {e}", path.display()));
        println!("soak: figures written to {}", path.display());
    }
    // A killed client cannot remove its buffer (a tmpfs file, memory until
    // removed); the next buffer made removes those of dead processes.
    drop(sllm_client::shm::ShmBuffer::create(Path::new("/dev/shm"), 0).unwrap());
    let killed = killed.lock().unwrap();
    let left: Vec<String> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| {
            killed
                .iter()
                .any(|pid| name.starts_with(&format!("sllm-buffer-{pid}-")))
        })
        .collect();
    let mut failures = failures.lock().unwrap();
    if !left.is_empty() {
        failures.push(format!(
            "{} buffers of killed clients left in /dev/shm: {:?}",
            left.len(),
            &left[..left.len().min(5)]
        ));
    }
    if !failures.is_empty() {
        let log = daemon.log.lock().unwrap();
        println!(
            "the daemon's last log lines:\n{}",
            log[log.len().saturating_sub(60)..].join("\n")
        );
    }
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(c.loads_ok.load(Ordering::Relaxed) >= 10, "{report}");
    assert!(c.resaves.load(Ordering::Relaxed) >= 3, "{report}");
    assert!(c.kills.load(Ordering::Relaxed) >= 5, "{report}");
    assert!(
        rss_drift < 32 << 20,
        "RSS grew by {rss_drift} bytes: {report}"
    );
    assert!(fd_drift <= 16, "descriptors grew by {fd_drift}: {report}");
    assert!(
        thread_drift <= 8,
        "threads grew by {thread_drift}: {report}"
    );
}
