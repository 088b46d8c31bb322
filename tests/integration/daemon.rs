//! The daemon end to end on loopback with the host backend: real models made
//! by `save`, real shared-memory "device" buffers, the real binary.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use sllm_client::StoreClient;
use sllm_client::plan::{DeviceMap, Layout, plan};
use sllm_client::proto::MemCopyChunk;
use sllm_client::shm::ShmBuffer;
use sllm_format::TensorIndex;
use tonic::Code;

use crate::common::*;

const SHM: &str = "/dev/shm";

/// Loads `model` through `client` onto the daemon's first device into
/// fresh buffers and checks every tensor against `tensors`.
pub(crate) async fn load_and_check(
    client: &mut StoreClient,
    storage: &Path,
    model: &str,
    tensors: &[Tensor],
    layout: Layout,
) {
    let first = client.server_config().await.unwrap().device_uuids[0].clone();
    load_and_check_map(
        client,
        storage,
        model,
        tensors,
        DeviceMap::single(&first),
        layout,
    )
    .await;
}

/// Like `load_and_check`, with tensors placed by `map` (one buffer per device).
async fn load_and_check_map(
    client: &mut StoreClient,
    storage: &Path,
    model: &str,
    tensors: &[Tensor],
    map: DeviceMap,
    layout: Layout,
) {
    let index = TensorIndex::read(&storage.join(model)).unwrap();
    let plan = plan(&index, &map, layout).unwrap();
    let buffers = copy_into_shm(client, model, &plan).await.unwrap();
    for t in tensors {
        let (got, device) = read_back(&plan, &buffers, &t.name, t.data.len()).unwrap();
        assert!(
            got == t.data,
            "tensor {} of {model} differs on {device}",
            t.name,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_verify_in_both_layouts_through_the_cli_and_the_client() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    let tensors = tensors_of(3 << 20, 1);
    save_model(tmp.path(), &storage, "org/m", &tensors, "1MiB");
    let daemon = Daemon::start(
        tmp.path(),
        &storage,
        &["--mem-pool-size", "8MiB", "--chunk-size", "256KiB"],
    );

    let out =
        run_ok(load_cmd(tmp.path(), &storage, &daemon.addr, "org/m").args(["--verify", "--json"]));
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["verified"], true, "{out}");
    for key in [
        "bytes",
        "register_s",
        "alloc_s",
        "host_load_s",
        "device_copy_s",
        "total_s",
        "gib_per_s",
    ] {
        assert!(report[key].is_number(), "{key} in {out}");
    }
    assert_eq!(report["from_pool"], false, "{out}");
    // Again: the model is in the pool now, and the report says so rather
    // than repeating the first load's time.
    let out = run_ok(&mut load_cmd(tmp.path(), &storage, &daemon.addr, "org/m"));
    assert!(out.contains("host load    from the pool"), "{out}");
    let out = run_ok(load_cmd(tmp.path(), &storage, &daemon.addr, "org/m").arg("--json"));
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report["from_pool"], true, "{out}");
    assert_eq!(report["host_load_s"], 0.0, "{out}");
    // On the daemon's host, the storage path need not be given: the daemon
    // says where it keeps its models.
    let out = run_ok(sllm_store(tmp.path()).env_remove("STORAGE_PATH").args([
        "load",
        "--model",
        "org/m",
        "--verify",
        "--server",
        &daemon.addr,
    ]));
    assert!(out.contains("every tensor matches"), "{out}");
    let cfg = daemon.client().await.server_config().await.unwrap();
    assert_eq!(
        std::path::Path::new(&cfg.storage_path),
        storage.canonicalize().unwrap()
    );
    let mut client = daemon.client().await;
    load_and_check(&mut client, &storage, "org/m", &tensors, Layout::Packed).await;
    load_and_check(&mut client, &storage, "org/m", &tensors, Layout::Mirrored).await;
    let cfg = client.server_config().await.unwrap();
    assert_eq!(
        (
            cfg.device_backend.as_str(),
            cfg.mem_pool_size,
            cfg.chunk_size
        ),
        ("host", 8 << 20, 256 << 10)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_models_and_replicas_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    let models: Vec<(String, Vec<Tensor>)> = (0..3)
        .map(|i| {
            (
                format!("org/m{i}"),
                tensors_of((1 << 20) + i * 12345, i as u64 + 10),
            )
        })
        .collect();
    for (name, tensors) in &models {
        save_model(tmp.path(), &storage, name, tensors, "512KiB");
    }
    let daemon = Daemon::start(
        tmp.path(),
        &storage,
        &[
            "--mem-pool-size",
            "8MiB",
            "--chunk-size",
            "128KiB",
            "--host-devices",
            "2",
        ],
    );
    let mut tasks = Vec::new();
    for round in 0..3 {
        for (name, tensors) in models.clone() {
            let (addr, storage) = (daemon.addr.clone(), storage.clone());
            let layout = if round % 2 == 0 {
                Layout::Mirrored
            } else {
                Layout::Packed
            };
            tasks.push(tokio::spawn(async move {
                let mut client = StoreClient::connect(&addr).await.unwrap();
                load_and_check(&mut client, &storage, &name, &tensors, layout).await;
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_models_are_evicted_least_recently_used_first() {
    use sllm_client::proto::HostState;
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    for name in ["o/a", "o/b", "o/c"] {
        save_model(
            tmp.path(),
            &storage,
            name,
            &tensors_of(900 << 10, 3),
            "4MiB",
        );
    }
    // Room for two of the three models.
    let daemon = Daemon::start(
        tmp.path(),
        &storage,
        &["--mem-pool-size", "2MiB", "--chunk-size", "64KiB"],
    );
    let mut client = daemon.client().await;
    let watcher = client.clone();
    let wait_loaded = |name: &'static str| {
        let mut client = watcher.clone();
        async move {
            for _ in 0..500 {
                let st = client.model_status(name).await.unwrap();
                if st.host_state == HostState::Loaded as i32 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{name} never loaded");
        }
    };
    client.load_to_host("o/a").await.unwrap();
    wait_loaded("o/a").await;
    client.load_to_host("o/b").await.unwrap();
    wait_loaded("o/b").await;
    client.load_to_host("o/a").await.unwrap(); // a is now more recent than b
    client.load_to_host("o/c").await.unwrap();
    wait_loaded("o/c").await;
    let state = |st: sllm_client::proto::GetModelStatusResponse| st.host_state;
    assert_eq!(
        state(client.model_status("o/b").await.unwrap()),
        HostState::NotLoaded as i32,
        "b was least recently used"
    );
    assert_eq!(
        state(client.model_status("o/a").await.unwrap()),
        HostState::Loaded as i32
    );
    assert!(
        daemon.log_text().contains("evicting from the pool"),
        "{}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pread_and_io_uring_read_the_same_bytes_from_disk_and_tmpfs() {
    let tmp = tempfile::tempdir().unwrap();
    let shm = tempfile::tempdir_in(SHM).unwrap();
    let tensors = tensors_of(2 << 20, 5);
    for storage in [tmp.path().join("models"), shm.path().join("models")] {
        // An odd partition size: chunks restart at every partition and the
        // partitions end unaligned to the chunk size.
        save_model(tmp.path(), &storage, "o/m", &tensors, "700KiB");
        for engine in ["pread", "io_uring"] {
            let daemon = Daemon::start(
                tmp.path(),
                &storage,
                &[
                    "--io-engine",
                    engine,
                    "--mem-pool-size",
                    "4MiB",
                    "--chunk-size",
                    "64KiB",
                ],
            );
            let mut client = daemon.client().await;
            assert_eq!(client.server_config().await.unwrap().io_engine, engine);
            load_and_check(&mut client, &storage, "o/m", &tensors, Layout::Mirrored).await;
        }
    }
}

/// Sends one LoadModelAsync(GPU) and returns its error code.
async fn gpu_code(
    client: &mut StoreClient,
    model: &str,
    replica: &str,
    copies: HashMap<String, Vec<MemCopyChunk>>,
    handles: HashMap<String, Vec<Vec<u8>>>,
) -> (Code, String) {
    match client
        .load_to_devices(model, replica, copies, handles)
        .await
    {
        Ok(()) => (Code::Ok, String::new()),
        Err(e) => (e.code().unwrap(), e.to_string()),
    }
}

/// Copies and handles of one GPU request, the code and message it must get.
type Case = (
    HashMap<String, Vec<MemCopyChunk>>,
    HashMap<String, Vec<Vec<u8>>>,
    Code,
    &'static str,
);

/// One copy for device `uuid`, as a request's copy map.
pub(crate) fn one(uuid: &str, c: MemCopyChunk) -> HashMap<String, Vec<MemCopyChunk>> {
    HashMap::from([(uuid.to_owned(), vec![c])])
}

/// A copy of `size` bytes from model offset `src` to `dst` in buffer `h`.
pub(crate) fn mc(src: u64, size: u64, dst: u64, h: u64) -> MemCopyChunk {
    MemCopyChunk {
        src_offset: src,
        size,
        dst_offset: dst,
        handle_idx: h,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_its_status_and_the_daemon_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    let tensors = tensors_of(300 << 10, 7);
    save_model(tmp.path(), &storage, "o/m", &tensors, "1MiB");
    save_model(
        tmp.path(),
        &storage,
        "o/big",
        &tensors_of(3 << 20, 8),
        "1MiB",
    );
    let outside = tmp.path().join("outside");
    save_model(tmp.path(), &outside, "x/y", &tensors, "1MiB");
    std::os::unix::fs::symlink(outside.join("x/y"), storage.join("o/escape")).unwrap();
    let daemon = Daemon::start(
        tmp.path(),
        &storage,
        &["--mem-pool-size", "1MiB", "--chunk-size", "64KiB"],
    );
    let mut client = daemon.client().await;
    let dev = client.server_config().await.unwrap().device_uuids[0].clone();
    let buf = ShmBuffer::create(Path::new(SHM), 400 << 10).unwrap();
    let h = || HashMap::from([(dev.clone(), vec![buf.handle()])]);
    let code = |r: Result<(), sllm_client::ClientError>| {
        r.err().and_then(|e| e.code()).unwrap_or(Code::Ok)
    };

    // Model paths.
    for bad in ["", "../etc", "/etc", "o/../../x", "o//m"] {
        assert_eq!(
            code(client.load_to_host(bad).await),
            Code::InvalidArgument,
            "{bad:?}"
        );
    }
    let e = client.register("o/escape").await.unwrap_err().to_string();
    assert!(e.contains("leads outside the storage path"), "{e}");
    // A partition that is a symlink to a file elsewhere is refused too.
    let evil = storage.join("o/evil");
    std::fs::create_dir_all(&evil).unwrap();
    let secret = tmp.path().join("secret");
    std::fs::write(&secret, "not for clients").unwrap();
    std::os::unix::fs::symlink(&secret, evil.join("tensor.data_0")).unwrap();
    let e = client.register("o/evil").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    assert!(
        e.to_string().contains("leads outside the storage path"),
        "{e}"
    );
    assert_eq!(
        client.register("o/absent").await.unwrap_err().code(),
        Some(Code::NotFound)
    );
    // Pool too small for the model.
    let e = client.load_to_host("o/big").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted));
    assert!(e.to_string().contains("--mem-pool-size"), "{e}");

    // GPU requests.
    let size = client.register("o/m").await.unwrap();
    let cases: Vec<Case> = vec![
        (
            one("00000000-0000-0000-0000-000000000000", mc(0, 10, 0, 0)),
            HashMap::from([(
                "00000000-0000-0000-0000-000000000000".into(),
                vec![buf.handle()],
            )]),
            Code::NotFound,
            "unknown device",
        ),
        (
            one(&dev, mc(0, 10, 0, 0)),
            HashMap::from([(dev.clone(), vec![vec![7u8; 64]])]),
            Code::InvalidArgument,
            "CUDA IPC handle",
        ),
        (
            one(&dev, mc(0, 10, 0, 0)),
            HashMap::from([(dev.clone(), vec![b"/etc/passwd".to_vec()])]),
            Code::InvalidArgument,
            "not a file inside",
        ),
        (
            one(&dev, mc(size - 5, 10, 0, 0)),
            h(),
            Code::InvalidArgument,
            "outside the model",
        ),
        (
            one(&dev, mc(0, 10, (400 << 10) - 5, 0)),
            h(),
            Code::InvalidArgument,
            "outside buffer 0",
        ),
        (
            one(&dev, mc(0, 10, 0, 1)),
            h(),
            Code::InvalidArgument,
            "handle_idx 1",
        ),
        (
            HashMap::new(),
            h(),
            Code::InvalidArgument,
            "lists no copies",
        ),
        (
            one(&dev, mc(0, 10, 0, 0)),
            HashMap::new(),
            Code::InvalidArgument,
            "no handles",
        ),
    ];
    for (copies, handles, want, needle) in cases {
        let (got, msg) = gpu_code(&mut client, "o/m", "r-bad", copies, handles).await;
        assert_eq!(got, want, "{needle}: {msg}");
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
    // A FIFO as a handle fails at once instead of blocking the request.
    let fifo = Path::new(SHM).join(format!("sllm-test-fifo-{}", std::process::id()));
    mkfifo(&fifo);
    let fifo_handle = HashMap::from([(
        dev.clone(),
        vec![fifo.to_str().unwrap().as_bytes().to_vec()],
    )]);
    let started = std::time::Instant::now();
    let (got, msg) = gpu_code(
        &mut client,
        "o/m",
        "r-fifo",
        one(&dev, mc(0, 10, 0, 0)),
        fifo_handle,
    )
    .await;
    std::fs::remove_file(&fifo).unwrap();
    assert_eq!(got, Code::InvalidArgument, "{msg}");
    assert!(
        msg.contains("FIFO") && started.elapsed() < Duration::from_secs(5),
        "{msg}"
    );

    // Replica reuse while it is known, and confirming one never requested.
    let copies = one(&dev, mc(0, size, 0, 0));
    assert_eq!(
        gpu_code(&mut client, "o/m", "r1", copies.clone(), h())
            .await
            .0,
        Code::Ok
    );
    assert_eq!(
        gpu_code(&mut client, "o/m", "r1", copies.clone(), h())
            .await
            .0,
        Code::FailedPrecondition
    );
    client.confirm("o/m", "r1").await.unwrap();
    let started = std::time::Instant::now();
    assert_eq!(
        client.confirm("o/m", "never").await.unwrap_err().code(),
        Some(Code::NotFound)
    );
    assert!(started.elapsed() < Duration::from_secs(5), "a bounded wait");

    // And a good load still works.
    load_and_check(&mut client, &storage, "o/m", &tensors, Layout::Mirrored).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_partition_fails_that_load_only() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    let good = tensors_of(1 << 20, 11);
    save_model(tmp.path(), &storage, "o/good", &good, "512KiB");
    save_model(
        tmp.path(),
        &storage,
        "o/bad",
        &tensors_of(1 << 20, 12),
        "512KiB",
    );
    let daemon = Daemon::start(
        tmp.path(),
        &storage,
        &["--mem-pool-size", "2MiB", "--chunk-size", "64KiB"],
    );
    let mut client = daemon.client().await;
    let size = client.register("o/bad").await.unwrap();
    // Truncated after registration: the daemon sees the file changed, reads
    // the model again and finds it no longer agrees with its manifest.
    let part = storage.join("o/bad/tensor.data_1");
    let len = std::fs::metadata(&part).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&part)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let dev = client.server_config().await.unwrap().device_uuids[0].clone();
    let buf = ShmBuffer::create(Path::new(SHM), size).unwrap();
    let e = client.load_to_host("o/bad").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::DataLoss), "{e}");
    assert!(
        e.to_string().contains("tensor.data_1") && e.to_string().contains("manifest says"),
        "{e}"
    );
    let (code, message) = gpu_code(
        &mut client,
        "o/bad",
        "r",
        one(&dev, mc(0, size, 0, 0)),
        HashMap::from([(dev.clone(), vec![buf.handle()])]),
    )
    .await;
    assert_eq!(code, Code::DataLoss, "{message}");
    let e = client.model_status("o/bad").await.unwrap_err();
    assert!(e.to_string().contains("tensor.data_1"), "{e}");
    // Unloading a model mid-load gives its chunks back at once: a reload
    // (of the whole pool's worth) is not refused.
    client.clear().await.unwrap();
    for _ in 0..3 {
        client.load_to_host("o/good").await.unwrap();
        client.unload("o/good").await.unwrap();
    }
    // Its chunks came back: the good model needs half the pool, twice over.
    load_and_check(&mut client, &storage, "o/good", &good, Layout::Mirrored).await;
    client.unload("o/good").await.unwrap();
    load_and_check(&mut client, &storage, "o/good", &good, Layout::Packed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_required_and_unix_socket_and_health() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    let tensors = tensors_of(200 << 10, 13);
    save_model(tmp.path(), &storage, "o/m", &tensors, "1MiB");
    let sock = tmp.path().join("store.sock");
    let listen = format!("unix:{}", sock.display());
    let mut daemon = Daemon::start(
        tmp.path(),
        &storage,
        &[
            "--listen",
            &listen,
            "--registration-required",
            "--mem-pool-size",
            "1MiB",
            "--chunk-size",
            "64KiB",
        ],
    );
    daemon.addr = listen;
    let mut client = daemon.client().await;
    assert_eq!(
        client.load_to_host("o/m").await.unwrap_err().code(),
        Some(Code::FailedPrecondition)
    );
    client.register("o/m").await.unwrap();
    load_and_check(&mut client, &storage, "o/m", &tensors, Layout::Mirrored).await;

    let channel = tonic::transport::Endpoint::try_from("http://[::]:1")
        .unwrap()
        .connect_with_connector(tower::service_fn({
            let sock = sock.clone();
            move |_| {
                let sock = sock.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(sock).await?,
                    ))
                }
            }
        }))
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "storage.Storage".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert_eq!(daemon.terminate(20).map(|s| s.code()), Some(Some(0)));
    assert!(!sock.exists(), "the socket file is removed on exit");
}

#[test]
fn sigterm_during_a_load_and_a_client_killed_mid_load() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    save_model(
        tmp.path(),
        &storage,
        "o/big",
        &tensors_of(48 << 20, 21),
        "8MiB",
    );
    let small = tensors_of(256 << 10, 22);
    save_model(tmp.path(), &storage, "o/small", &small, "8MiB");
    // The killed client cannot remove its buffer: keep it where the test's
    // cleanup removes it.
    let shm = tempfile::tempdir_in(SHM).unwrap();
    let mut daemon = Daemon::start(
        tmp.path(),
        &storage,
        &[
            "--mem-pool-size",
            "64MiB",
            "--chunk-size",
            "1MiB",
            "--io-engine",
            "pread",
            "--num-thread",
            "1",
            "--host-shm-dir",
            shm.path().to_str().unwrap(),
        ],
    );

    // A client process killed while its load runs: nothing leaks, the
    // daemon keeps serving and the pool is whole again.
    let mut load = load_cmd(tmp.path(), &storage, &daemon.addr, "o/big")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    load.kill().unwrap();
    load.wait().unwrap();
    let out = run_ok(load_cmd(tmp.path(), &storage, &daemon.addr, "o/small").arg("--verify"));
    assert!(out.contains("every tensor matches"), "{out}");

    // SIGTERM while a load is in flight: a prompt, clean exit.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // This client's connection stays open (its runtime is not driven any
    // more): a hung client must not hold the daemon up past its grace.
    rt.block_on(async {
        let mut client = daemon.client().await;
        client.clear().await.unwrap();
        client.load_to_host("o/big").await.unwrap();
        std::mem::forget(client);
    });
    let started = std::time::Instant::now();
    let status = daemon.terminate(20).expect("the daemon exits");
    assert_eq!(status.code(), Some(0), "{}", daemon.log_text());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        daemon.log_text().contains("stopped"),
        "{}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_loads_and_json_logs_parse() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    let tensors = tensors_of(500 << 10, 31);
    save_model(tmp.path(), &storage, "o/m", &tensors, "1MiB");
    // A free port for the metrics endpoint (released just before use).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let daemon = Daemon::start(
        tmp.path(),
        &storage,
        &[
            "--metrics-port",
            &port,
            "--log-format",
            "json",
            "--mem-pool-size",
            "2MiB",
            "--chunk-size",
            "64KiB",
        ],
    );
    let mut client = daemon.client().await;
    load_and_check(&mut client, &storage, "o/m", &tensors, Layout::Mirrored).await;
    let _ = client.register("o/absent").await;
    // A damaged model, loaded to host: a checksum error.
    save_model(tmp.path(), &storage, "o/bad", &tensors, "1MiB");
    let part = std::fs::OpenOptions::new()
        .write(true)
        .open(storage.join("o/bad/tensor.data_0"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&part, b"!", 10).unwrap();
    client.load_to_host("o/bad").await.unwrap();

    let mut body = String::new();
    for _ in 0..100 {
        let mut stream = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
            .await
            .unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        body.clear();
        stream.read_to_string(&mut body).await.unwrap();
        if body.contains("sllm_bytes_loaded_total")
            && body.contains("target=\"device\"")
            && body.contains("kind=\"checksum\"")
            && body.contains("sllm_model_resident_bytes{model=\"o/m\"}")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for needle in [
        "sllm_bytes_loaded_total{target=\"host\"}",
        "sllm_bytes_loaded_total{target=\"device\"}",
        "sllm_load_seconds",
        "sllm_pool_bytes 2097152",
        "sllm_errors_total{kind=\"request\"}",
        "sllm_errors_total{kind=\"checksum\"} 1",
        "sllm_model_resident_bytes{model=\"o/m\"}",
    ] {
        assert!(body.contains(needle), "{needle} in {body}");
    }
    let log = daemon.log_text();
    let ready = log.lines().find(|l| l.contains("listening on")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(ready).expect("a JSON log line");
    assert_eq!(parsed["level"], "INFO");
    // The address as a field, for log collectors.
    assert_eq!(parsed["fields"]["address"], daemon.addr.as_str(), "{ready}");
    assert!(parsed["fields"]["storage"].is_string(), "{ready}");
    assert!(
        !log.contains('\x1b'),
        "no colour when stderr is not a terminal: {log}"
    );
}

#[test]
fn load_without_a_daemon_is_one_line_and_a_failure() {
    let tmp = tempfile::tempdir().unwrap();
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = run_err(&mut load_cmd(
        tmp.path(),
        tmp.path(),
        &format!("127.0.0.1:{port}"),
        "o/m",
    ));
    assert!(
        err.contains("cannot reach the store daemon") && err.contains("sllm-store start"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert_no_repeated_causes(&err);
    // The same with a backtrace asked for: still one line.
    let (_, stdout, stderr) = run(sllm_store(tmp.path())
        .env("RUST_BACKTRACE", "1")
        .args(["save", "--model", "o/m", "--local-model-path"])
        .arg(tmp.path().join("absent"))
        .arg("--storage-path")
        .arg(tmp.path()));
    assert_no_repeated_causes(&format!("{stdout}{stderr}"));
    assert!(stderr.contains("error: source directory"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_across_two_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    let tensors = tensors_of(2 << 20, 41);
    save_model(tmp.path(), &storage, "o/m", &tensors, "1MiB");
    let daemon = Daemon::start(
        tmp.path(),
        &storage,
        &[
            "--host-devices",
            "2",
            "--mem-pool-size",
            "4MiB",
            "--chunk-size",
            "128KiB",
        ],
    );
    let mut client = daemon.client().await;
    let devices = client.server_config().await.unwrap().device_uuids;
    assert_eq!(devices.len(), 2);
    // The first half of the tensors on device 0, the rest on device 1.
    let half = tensors.len() / 2;
    let mut map = vec![(String::new(), devices[0].clone())];
    map.extend(
        tensors[half..]
            .iter()
            .map(|t| (t.name.clone(), devices[1].clone())),
    );
    for layout in [Layout::Mirrored, Layout::Packed] {
        let index = TensorIndex::read(&storage.join("o/m")).unwrap();
        assert_eq!(
            plan(&index, &DeviceMap(map.clone()), layout)
                .unwrap()
                .buffers
                .len(),
            2
        );
        load_and_check_map(
            &mut client,
            &storage,
            "o/m",
            &tensors,
            DeviceMap(map.clone()),
            layout,
        )
        .await;
    }
}

#[test]
fn start_refuses_what_it_cannot_serve_from_or_listen_on_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("config.json");
    std::fs::write(&file, "{}").unwrap();
    let start = |storage: &Path, listen: &[&str]| {
        let err = run_err(
            sllm_store(tmp.path())
                .args(["start", "--mem-pool-size", "1MiB", "--chunk-size", "64KiB"])
                .args(listen)
                .arg("--storage-path")
                .arg(storage),
        );
        assert_no_repeated_causes(&err);
        err
    };
    let tcp = ["--port", "0"];
    for (storage, needles) in [
        (
            file.clone(),
            &["is a regular file, not a folder", "--storage-path"][..],
        ),
        (
            tmp.path().join("absent"),
            &["create it", "--storage-path"][..],
        ),
    ] {
        let err = start(&storage, &tcp);
        for needle in needles {
            assert!(err.contains(needle), "{needle:?} in {err}");
        }
    }
    let in_missing = format!("unix:{}", tmp.path().join("no/such/x.sock").display());
    let err = start(tmp.path(), &["--listen", &in_missing]);
    assert!(err.contains("does not exist; create it"), "{err}");
    assert!(!err.contains("another daemon"), "{err}");
    let on_a_file = format!("unix:{}", file.display());
    let err = start(tmp.path(), &["--listen", &on_a_file]);
    assert!(err.contains("not a socket, and is left alone"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "{}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let err = start(tmp.path(), &["--port", &port]);
    assert!(err.contains("another daemon"), "{err}");
}

#[test]
fn a_load_that_reads_its_index_from_another_store_is_warned() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    let other = tmp.path().join("other");
    let tensors = tensors_of(1 << 20, 51);
    save_model(tmp.path(), &storage, "o/m", &tensors, "1MiB");
    save_model(tmp.path(), &other, "o/m", &tensors, "1MiB");
    let daemon = Daemon::start(
        tmp.path(),
        &storage,
        &["--mem-pool-size", "4MiB", "--chunk-size", "256KiB"],
    );
    let (out, _, stderr) = run(&mut load_cmd(tmp.path(), &other, &daemon.addr, "o/m"));
    assert!(out.status.success(), "{stderr}");
    for needle in ["the daemon serves models from", "--storage-path"] {
        assert!(stderr.contains(needle), "{needle:?} in {stderr}");
    }
    // The daemon's own store: no warning.
    let (out, _, stderr) = run(&mut load_cmd(tmp.path(), &storage, &daemon.addr, "o/m"));
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
}

#[test]
fn a_failure_asked_for_in_json_is_answered_in_json() {
    let tmp = tempfile::tempdir().unwrap();
    let (storage, daemon) = Daemon::over_empty_store(
        tmp.path(),
        &["--mem-pool-size", "1MiB", "--chunk-size", "64KiB"],
    );
    let failed_json = |cmd: &mut std::process::Command| {
        let (out, stdout, stderr) = run(cmd);
        assert!(!out.status.success(), "{stdout}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{e}: stdout {stdout:?}, stderr {stderr}"));
        assert_eq!(v["ok"], false, "{v}");
        assert!(v["error"].as_str().unwrap().contains("o/absent"), "{v}");
    };
    failed_json(load_cmd(tmp.path(), &storage, &daemon.addr, "o/absent").arg("--json"));
    failed_json(
        sllm_store(tmp.path())
            .args(["verify", "--model", "o/absent", "--json", "--storage-path"])
            .arg(&storage),
    );
    // A daemon that cannot start, logging JSON: its last word is JSON too.
    let port = daemon.addr.rsplit(':').next().unwrap().to_owned();
    let (out, _, stderr) = run(sllm_store(tmp.path())
        .args([
            "--log-format",
            "json",
            "start",
            "--port",
            &port,
            "--mem-pool-size",
            "1MiB",
            "--chunk-size",
            "64KiB",
            "--storage-path",
        ])
        .arg(&storage));
    assert!(!out.status.success());
    let last = stderr.trim().lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(v["level"], "ERROR", "{v}");
    assert!(last.contains("cannot listen"), "{last}");
}
