//! What the daemon serves is what is on disk, now, undamaged, or a clear
//! error: re-saved models are read again, a load racing a re-save gets one
//! version whole, damaged bytes and tampered indexes are refused, and no
//! request can queue unbounded work or an error too long to deliver.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sllm_client::StoreClient;
use sllm_client::plan::{DeviceMap, Layout, plan};
use sllm_client::proto::MemCopyChunk;
use sllm_client::shm::ShmBuffer;
use sllm_daemon::daemon::{DaemonConfig, Listen, spawn};
use sllm_daemon::registry::Limits;
use sllm_format::TensorIndex;
use tonic::Code;

use crate::common::*;
use crate::daemon::{mc, one};

const SHM: &str = "/dev/shm";

/// `save --force` of `tensors` as `model`, from a source directory of its own.
fn resave(home: &Path, storage: &Path, model: &str, tensors: &[Tensor], tag: &str) {
    save_model_from(home, storage, model, tensors, "512KiB", tag, &["--force"]);
}

/// A temporary directory with `tensors` saved as `model`, and a daemon
/// (4 MiB pool of 64 KiB chunks, `extra` flags) serving it.
fn one_model(
    model: &str,
    tensors: &[Tensor],
    extra: &[&str],
) -> (tempfile::TempDir, PathBuf, Daemon) {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    save_model(tmp.path(), &storage, model, tensors, "512KiB");
    let mut args = vec!["--mem-pool-size", "4MiB", "--chunk-size", "64KiB"];
    args.extend_from_slice(extra);
    let daemon = Daemon::start(tmp.path(), &storage, &args);
    (tmp, storage, daemon)
}

/// One load of `model` into a fresh mirrored buffer (laid out like the
/// files): the buffer's bytes, or the failing call's error.
async fn load_mirrored(
    client: &mut StoreClient,
    storage: &Path,
    model: &str,
) -> Result<Vec<u8>, sllm_client::ClientError> {
    let dev = client.server_config().await?.device_uuids[0].clone();
    let index = TensorIndex::read(&storage.join(model)).unwrap();
    let plan = plan(&index, &DeviceMap::single(&dev), Layout::Mirrored).unwrap();
    let buf = ShmBuffer::create(Path::new(SHM), plan.buffers[0].size_bytes).unwrap();
    let replica = uuid::Uuid::new_v4().to_string();
    client.load_to_host(model).await?;
    client
        .load_to_devices(
            model,
            &replica,
            plan.copies_by_device(),
            HashMap::from([(dev, vec![buf.handle()])]),
        )
        .await?;
    client.confirm(model, &replica).await?;
    let mut bytes = vec![0u8; buf.size() as usize];
    buf.read_at(&mut bytes, 0).unwrap();
    Ok(bytes)
}

/// Asserts `got` (a mirrored buffer) holds `want`'s bytes, saying where it
/// does not rather than printing both.
fn assert_holds(got: &[u8], want: &[u8], what: &str) {
    let n = want.len().min(got.len());
    if let Some(at) = (0..n).find(|&i| got[i] != want[i]) {
        panic!("{what}: first difference at byte {at} of {n}");
    }
    assert_eq!(got.len(), want.len(), "{what}: buffer size");
}

/// The bytes of `tensors` laid out as `index` (of the same tensors) says,
/// up to the end of the last tensor (as a mirrored buffer is sized).
fn mirrored(index: &TensorIndex, tensors: &[Tensor]) -> Vec<u8> {
    let len = index
        .iter()
        .map(|(_, e)| e.offset + e.size)
        .max()
        .unwrap_or(0);
    let mut out = vec![0u8; len as usize];
    for t in tensors {
        let e = index.get(&t.name).unwrap();
        out[e.offset as usize..][..t.data.len()].copy_from_slice(&t.data);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resaved_model_is_served_from_its_new_files() {
    let v1 = tensors_of(600 << 10, 21);
    let (tmp, storage, daemon) = one_model("org/c1", &v1, &[]);
    let mut client = daemon.client().await;
    let size1 = client.register("org/c1").await.unwrap();
    let index = TensorIndex::read(&storage.join("org/c1")).unwrap();
    assert_holds(
        &load_mirrored(&mut client, &storage, "org/c1")
            .await
            .unwrap(),
        &mirrored(&index, &v1),
        "first version",
    );

    // Same names and shapes, other bytes, while the old copy is resident.
    let v2 = tensors_of(600 << 10, 22);
    resave(tmp.path(), &storage, "org/c1", &v2, "v2");
    assert_eq!(client.register("org/c1").await.unwrap(), size1);
    assert_holds(
        &load_mirrored(&mut client, &storage, "org/c1")
            .await
            .unwrap(),
        &mirrored(&index, &v2),
        "the second load serves the re-saved bytes",
    );

    // Another size: RegisterModel reports the new one.
    let v3 = tensors_of(900 << 10, 23);
    resave(tmp.path(), &storage, "org/c1", &v3, "v3");
    let size3 = client.register("org/c1").await.unwrap();
    assert!(size3 > size1);
    let index3 = TensorIndex::read(&storage.join("org/c1")).unwrap();
    assert_holds(
        &load_mirrored(&mut client, &storage, "org/c1")
            .await
            .unwrap(),
        &mirrored(&index3, &v3),
        "third version",
    );
    let out = run_ok(
        load_cmd(tmp.path(), &storage, &daemon.addr, "org/c1")
            .args(["--verify", "--json", "--layout", "packed"]),
    );
    assert!(out.contains(r#""verified":true"#), "{out}");
    assert!(daemon.log_text().contains("changed on disk"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_racing_a_resave_gets_one_version_whole_or_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    // Two versions with the same index (names, shapes, offsets), other bytes.
    let versions = [tensors_of(2 << 20, 31), tensors_of(2 << 20, 32)];
    save_model(tmp.path(), &storage, "org/race", &versions[0], "512KiB");
    let daemon = Daemon::start(
        tmp.path(),
        &storage,
        &["--mem-pool-size", "8MiB", "--chunk-size", "64KiB"],
    );
    let index = TensorIndex::read(&storage.join("org/race")).unwrap();
    let expected: Vec<Vec<u8>> = versions.iter().map(|v| mirrored(&index, v)).collect();

    let saver = {
        let (home, storage) = (tmp.path().to_owned(), storage.clone());
        let versions = versions.clone();
        std::thread::spawn(move || {
            for round in 1..=8 {
                let v = &versions[round % 2];
                resave(&home, &storage, "org/race", v, &format!("r{round}"));
            }
        })
    };
    let mut client = daemon.client().await;
    let (mut whole, mut refused) = (0, 0);
    while !saver.is_finished() || whole == 0 {
        match load_mirrored(&mut client, &storage, "org/race").await {
            Ok(got) => {
                assert!(
                    expected.contains(&got),
                    "a load mixed two versions of the model"
                );
                whole += 1;
            }
            Err(e) => {
                // The model changed under the request: said plainly.
                let text = e.to_string();
                assert!(
                    matches!(e.code(), Some(Code::Aborted | Code::Internal))
                        && text.contains("changed"),
                    "{e}"
                );
                refused += 1;
            }
        }
    }
    saver.join().unwrap();
    eprintln!("{whole} whole loads, {refused} refused while re-saving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_bytes_and_tampered_indexes_are_never_served() {
    let tensors = tensors_of(1200 << 10, 41);
    let (tmp, storage, daemon) = one_model("o/m", &tensors, &[]);
    let model_dir = storage.join("o/m");
    let part1 = model_dir.join("tensor.data_1");
    let part0_len = std::fs::metadata(model_dir.join("tensor.data_0"))
        .unwrap()
        .len();
    let part1_len = std::fs::metadata(&part1).unwrap().len();
    // One flipped byte in the middle of the second partition.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&part1)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, 100_000).unwrap();
    file.write_all_at(&[byte[0] ^ 0x10], 100_000).unwrap();

    let mut client = daemon.client().await;
    let dev = client.server_config().await.unwrap().device_uuids[0].clone();
    let size = client.register("o/m").await.unwrap();
    let buf = ShmBuffer::create(Path::new(SHM), size).unwrap();
    std::fs::write(buf.path(), vec![0xABu8; size as usize]).unwrap();
    client.load_to_host("o/m").await.unwrap();
    client
        .load_to_devices(
            "o/m",
            "r1",
            one(&dev, mc(0, size, 0, 0)),
            HashMap::from([(dev.clone(), vec![buf.handle()])]),
        )
        .await
        .unwrap();
    let e = client.confirm("o/m", "r1").await.unwrap_err();
    // Damaged bytes are data loss, not an internal error.
    assert_eq!(e.code(), Some(Code::DataLoss), "{e}");
    let e = e.to_string();
    for needle in ["o/m", "tensor.data_1 is damaged: block 0", "save --force"] {
        assert!(e.contains(needle), "{needle:?} in {e}");
    }
    let status = client.model_status("o/m").await.unwrap();
    assert!(
        status.error.contains("tensor.data_1 is damaged"),
        "{status:?}"
    );
    // Nothing of the damaged block (all of partition 1) reached the buffer.
    let mut landed = vec![0u8; part1_len as usize];
    buf.read_at(&mut landed, part0_len).unwrap();
    assert!(
        landed.iter().all(|&b| b == 0xAB),
        "bytes of a damaged block were copied"
    );

    let load_cli = |addr: &str| {
        let mut cmd = load_cmd(tmp.path(), &storage, addr, "o/m");
        cmd.args(["--verify", "--json"]);
        cmd
    };
    let err = run_err(&mut load_cli(&daemon.addr));
    assert!(err.contains("is damaged"), "{err}");

    // Checks off: the daemon serves the files as they are, and `load
    // --verify` no longer calls them verified.
    let unchecked = Daemon::start(
        tmp.path(),
        &storage,
        &[
            "--mem-pool-size",
            "4MiB",
            "--chunk-size",
            "64KiB",
            "--skip-checksums",
        ],
    );
    let (out, stdout, stderr) = run(&mut load_cli(&unchecked.addr));
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains(r#""verified":false"#), "{stdout}");
    assert!(stderr.contains("differ from the manifest"), "{stderr}");
    drop(unchecked);

    // Repaired bytes, tampered index: refused as data loss at registration.
    file.write_all_at(&byte, 100_000).unwrap();
    let index_path = model_dir.join("tensor_index.json");
    let index_text = std::fs::read_to_string(&index_path).unwrap();
    std::fs::write(&index_path, index_text.replacen("t1", "t9", 1)).unwrap();
    let e = client.register("o/m").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::DataLoss), "{e}");
    assert!(
        e.to_string()
            .contains("tensor_index.json changed since it was written"),
        "{e}"
    );

    // A model without a manifest (the reference tools write none) loads as
    // before, with a warning.
    std::fs::write(&index_path, index_text).unwrap();
    std::fs::remove_file(model_dir.join("sllm_manifest.json")).unwrap();
    let index = TensorIndex::read(&model_dir).unwrap();
    assert_holds(
        &load_mirrored(&mut client, &storage, "o/m").await.unwrap(),
        &mirrored(&index, &tensors),
        "model without a manifest",
    );
    assert!(daemon.log_text().contains("no sllm_manifest.json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_copies_of_the_model_are_refused_before_any_work() {
    let (_tmp, _storage, daemon) = one_model("o/m", &tensors_of(300 << 10, 51), &[]);
    let mut client = daemon.client().await;
    let dev = client.server_config().await.unwrap().device_uuids[0].clone();
    let size = client.register("o/m").await.unwrap();
    let buf = ShmBuffer::create(Path::new(SHM), size).unwrap();
    let whole = mc(0, size, 0, 0);
    let e = client
        .load_to_devices(
            "o/m",
            "greedy",
            HashMap::from([(dev.clone(), vec![whole; 1 << 20])]),
            HashMap::from([(dev.clone(), vec![buf.handle()])]),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    assert!(e.to_string().contains("2x the model"), "{e}");
    assert_eq!(
        client.model_status("o/m").await.unwrap().replicas_copying,
        0
    );
    // Twice the model (tensors sharing storage copied twice) is allowed.
    let twice = ShmBuffer::create(Path::new(SHM), 2 * size).unwrap();
    let second = mc(0, size, size, 0);
    client.load_to_host("o/m").await.unwrap();
    client
        .load_to_devices(
            "o/m",
            "twice",
            HashMap::from([(dev.clone(), vec![whole, second])]),
            HashMap::from([(dev.clone(), vec![twice.handle()])]),
        )
        .await
        .unwrap();
    client.confirm("o/m", "twice").await.unwrap();
}

/// A daemon in this process (host backend, loopback) with `limits`; stops
/// when the returned sender is dropped.
async fn daemon_with_limits(
    storage: &Path,
    host_devices: usize,
    limits: Limits,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let cfg = DaemonConfig {
        host_devices,
        limits,
        ..DaemonConfig::host(
            storage.to_owned(),
            Listen::Tcp("127.0.0.1:0".parse().unwrap()),
            PathBuf::from(SHM),
            4 << 20,
            64 << 10,
        )
    };
    let daemon = spawn(cfg);
    match daemon.ready.await {
        Ok(listen) => (listen.to_string(), daemon.stop),
        Err(_) => panic!("the daemon did not start: {:?}", daemon.task.await),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_work_of_all_replicas_is_bounded_and_none_copies_past_its_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    save_model(
        tmp.path(),
        &storage,
        "o/m",
        &tensors_of(300 << 10, 61),
        "1MiB",
    );
    let size = std::fs::metadata(storage.join("o/m/tensor.data_0"))
        .unwrap()
        .len();

    // The model on two devices is more than the daemon takes at once.
    let limits = Limits {
        max_active_copy_bytes: size * 3 / 2,
        ..Limits::default()
    };
    let (addr, _stop) = daemon_with_limits(&storage, 2, limits).await;
    let mut client = StoreClient::connect(&addr).await.unwrap();
    let devs = client.server_config().await.unwrap().device_uuids;
    let bufs: Vec<ShmBuffer> = (0..2)
        .map(|_| ShmBuffer::create(Path::new(SHM), size).unwrap())
        .collect();
    let whole = mc(0, size, 0, 0);
    let copies: HashMap<String, Vec<MemCopyChunk>> =
        devs.iter().map(|d| (d.clone(), vec![whole])).collect();
    let handles: HashMap<String, Vec<Vec<u8>>> = devs
        .iter()
        .zip(&bufs)
        .map(|(d, b)| (d.clone(), vec![b.handle()]))
        .collect();
    let e = client
        .load_to_devices("o/m", "both", copies.clone(), handles.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
    assert!(e.to_string().contains("past the limit"), "{e}");
    // One device's worth fits.
    let one: HashMap<_, _> = copies
        .iter()
        .take(1)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let one_handle: HashMap<_, _> = one
        .keys()
        .map(|k| (k.clone(), handles[k].clone()))
        .collect();
    client
        .load_to_devices("o/m", "one", one.clone(), one_handle.clone())
        .await
        .unwrap();
    client.confirm("o/m", "one").await.unwrap();

    // A replica may not copy past its deadline, confirmed or not.
    let limits = Limits {
        confirm_timeout: Duration::ZERO,
        ..Limits::default()
    };
    let (addr, _stop) = daemon_with_limits(&storage, 1, limits).await;
    let mut client = StoreClient::connect(&addr).await.unwrap();
    let dev = client.server_config().await.unwrap().device_uuids[0].clone();
    client
        .load_to_devices(
            "o/m",
            "late",
            HashMap::from([(dev.clone(), vec![whole])]),
            HashMap::from([(dev.clone(), vec![bufs[0].handle()])]),
        )
        .await
        .unwrap();
    let mut stopped = false;
    for _ in 0..200 {
        if client.model_status("o/m").await.unwrap().replicas_copying == 0 {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(stopped, "the replica stopped by itself at its deadline");
    let e = client.confirm("o/m", "late").await.unwrap_err();
    assert!(
        e.to_string()
            .contains("still copying at the replica's deadline"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_fields_get_short_errors_not_transport_failures() {
    let tmp = tempfile::tempdir().unwrap();
    let (_storage, daemon) = Daemon::over_empty_store(
        tmp.path(),
        &["--mem-pool-size", "1MiB", "--chunk-size", "64KiB"],
    );
    let mut client = daemon.client().await;
    let long = "o/".to_owned() + &"x".repeat(20_000);
    let long_utf8 = "é".repeat(10_000);
    for model in [long.as_str(), long_utf8.as_str()] {
        let errors = [
            client.register(model).await.unwrap_err(),
            client.load_to_host(model).await.unwrap_err(),
            client.unload(model).await.unwrap_err(),
            client.model_status(model).await.map(|_| ()).unwrap_err(),
            client.confirm(model, model).await.unwrap_err(),
            client
                .load_to_devices(model, model, HashMap::new(), HashMap::new())
                .await
                .unwrap_err(),
        ];
        for e in errors {
            assert!(
                matches!(e.code(), Some(Code::InvalidArgument | Code::NotFound)),
                "{e}"
            );
            assert!(e.to_string().len() < 5000, "{} bytes", e.to_string().len());
        }
    }
    assert!(client.serving().await.unwrap());
}
