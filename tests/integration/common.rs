//! Helpers shared by the integration tests: running the binary with a clean
//! environment, writing safetensors checkpoints with the `safetensors` crate,
//! and reading a stored model back independently of the store's own code.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::{Rng, SeedableRng};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

/// The `sllm-store` binary with an environment that points nowhere real:
/// HOME is `home`, no HF or storage variables, quiet logs.
pub fn sllm_store(home: &Path) -> Command {
    sllm_store_via(home, &[])
}

/// Like [`sllm_store`], run through `wrapper` (a program and its arguments
/// that exec the binary, e.g. `prlimit --nofile=200:200 --`).
pub fn sllm_store_via(home: &Path, wrapper: &[&str]) -> Command {
    let bin = env!("CARGO_BIN_EXE_sllm-store");
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(bin);
            cmd
        }
        None => Command::new(bin),
    };
    for var in [
        "HF_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "STORAGE_PATH",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "SLLM_STORE_ADDR",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HOME", home)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1");
    cmd
}

/// Runs `cmd` and returns its output, with stdout and stderr as text.
pub fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("the binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// Runs `cmd` like [`run`], but kills it and fails the test when it runs
/// longer than `secs`: a regression that hangs fails instead of hanging the
/// suite.
pub fn run_bounded(cmd: &mut Command, secs: u64) -> (std::process::ExitStatus, String, String) {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let pid = rustix::process::Pid::from_child(&child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(out) => {
            let out = out.expect("the binary is waited for");
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            (out.status, stdout, stderr)
        }
        Err(_) => {
            // The waiting thread reaps it.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            panic!("still running after {secs} s, killed: {cmd:?}");
        }
    }
}

/// `sllm-store load --model <model> --server <addr> --storage-path
/// <storage>` run from `home`; callers add the flags they need.
pub fn load_cmd(home: &Path, storage: &Path, addr: &str, model: &str) -> Command {
    let mut cmd = sllm_store(home);
    cmd.args(["load", "--model", model, "--server", addr, "--storage-path"])
        .arg(storage);
    cmd
}

/// Copies `model` through `client` into new shared-memory buffers laid out
/// by `plan` (LoadModelAsync to the pool, then to the buffers, then
/// ConfirmModel); the buffers, in the plan's order.
pub async fn copy_into_shm(
    client: &mut sllm_client::StoreClient,
    model: &str,
    plan: &sllm_client::plan::LoadPlan,
) -> Result<Vec<sllm_client::shm::ShmBuffer>, String> {
    let buffers: Vec<sllm_client::shm::ShmBuffer> = plan
        .buffers
        .iter()
        .map(|b| sllm_client::shm::ShmBuffer::create(Path::new("/dev/shm"), b.size_bytes))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let handles = plan
        .buffers
        .iter()
        .zip(&buffers)
        .map(|(b, s)| (b.uuid.clone(), vec![s.handle()]))
        .collect();
    let replica = uuid::Uuid::new_v4().to_string();
    client
        .load_to_host(model)
        .await
        .map_err(|e| e.to_string())?;
    client
        .load_to_devices(model, &replica, plan.copies_by_device(), handles)
        .await
        .map_err(|e| e.to_string())?;
    client
        .confirm(model, &replica)
        .await
        .map_err(|e| e.to_string())?;
    Ok(buffers)
}

/// The `size` bytes of tensor `name` as `buffers` (laid out by `plan`) hold
/// them, and the device they are on.
pub fn read_back(
    plan: &sllm_client::plan::LoadPlan,
    buffers: &[sllm_client::shm::ShmBuffer],
    name: &str,
    size: usize,
) -> Result<(Vec<u8>, String), String> {
    let place = &plan.tensors[name];
    let i = plan
        .buffers
        .iter()
        .position(|b| b.uuid == place.device)
        .ok_or_else(|| format!("{name} is on {}, which has no buffer", place.device))?;
    let mut bytes = vec![0u8; size];
    buffers[i]
        .read_at(&mut bytes, place.offset)
        .map_err(|e| e.to_string())?;
    Ok((bytes, place.device.clone()))
}

/// A number field of `/proc/<pid>/status` (`VmRSS:` in KiB, `Threads:`);
/// 0 when the process or the field is gone.
pub fn proc_status_field(pid: u32, name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Resident memory of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    proc_status_field(pid, "VmRSS:") << 10
}

/// Creates a FIFO (named pipe) at `path`.
pub fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

/// Runs `cmd`, asserts success, returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let (out, stdout, stderr) = run(cmd);
    assert!(
        out.status.success(),
        "failed: {cmd:?}\nstdout: {stdout}\nstderr: {stderr}"
    );
    stdout
}

/// Asserts that no cause is said twice in a row in an error line
/// ("tcp connect error: tcp connect error").
pub fn assert_no_repeated_causes(text: &str) {
    for line in text.lines() {
        let parts: Vec<&str> = line.split(": ").collect();
        for pair in parts.windows(2) {
            assert_ne!(pair[0], pair[1], "a cause said twice: {line}");
        }
        assert!(!line.contains("Stack backtrace"), "a backtrace: {text}");
    }
}

/// Runs `cmd`, asserts failure, returns stdout + stderr.
pub fn run_err(cmd: &mut Command) -> String {
    let (out, stdout, stderr) = run(cmd);
    assert!(
        !out.status.success(),
        "unexpectedly succeeded: {cmd:?}\nstdout: {stdout}"
    );
    format!("{stdout}{stderr}")
}

/// A tensor to put in a checkpoint.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Tensor {
    /// A tensor with random bytes.
    pub fn random(name: &str, dtype: Dtype, shape: &[usize], seed: u64) -> Self {
        let len = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        Self {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }
}

/// Writes `tensors` as one safetensors file with the `safetensors` crate.
pub fn write_safetensors(path: &Path, tensors: &[Tensor]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

/// Writes a sharded checkpoint: one file per group and the index.
pub fn write_sharded(dir: &Path, shards: &[Vec<Tensor>]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut weight_map = serde_json::Map::new();
    for (i, group) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len());
        write_safetensors(&dir.join(&name), group);
        for t in group {
            weight_map.insert(t.name.clone(), name.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// Writes a raw safetensors file from a header given as JSON text and data.
pub fn write_raw_safetensors(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// A stored model read back without the store's code: the index as plain
/// JSON and the partitions concatenated.
pub struct Stored {
    pub index: serde_json::Map<String, serde_json::Value>,
    pub bytes: Vec<u8>,
    pub partition_sizes: Vec<u64>,
}

impl Stored {
    pub fn read(model_dir: &Path) -> Self {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(model_dir.join("tensor_index.json")).unwrap())
                .unwrap();
        let mut bytes = Vec::new();
        let mut partition_sizes = Vec::new();
        for i in 0.. {
            let Ok(part) = std::fs::read(model_dir.join(format!("tensor.data_{i}"))) else {
                break;
            };
            partition_sizes.push(part.len() as u64);
            bytes.extend_from_slice(&part);
        }
        Self {
            index: index.as_object().unwrap().clone(),
            bytes,
            partition_sizes,
        }
    }

    /// `(offset, size, shape, stride, dtype)` of `name`.
    pub fn entry(&self, name: &str) -> (u64, u64, Vec<u64>, Vec<u64>, String) {
        let e = self
            .index
            .get(name)
            .unwrap_or_else(|| panic!("{name} not in the index"));
        serde_json::from_value(e.clone()).unwrap()
    }

    /// Asserts every tensor is stored with its dtype, shape, contiguous
    /// stride and exact bytes.
    pub fn assert_holds(&self, tensors: &[Tensor]) {
        assert_eq!(self.index.len(), tensors.len(), "tensor count");
        for t in tensors {
            let (offset, size, shape, stride, dtype) = self.entry(&t.name);
            assert_eq!(dtype, torch_name(t.dtype), "{}", t.name);
            assert_eq!(
                shape,
                t.shape.iter().map(|&d| d as u64).collect::<Vec<_>>(),
                "{}",
                t.name
            );
            assert_eq!(stride, contiguous(&shape), "{}", t.name);
            assert_eq!(size, t.data.len() as u64, "{}", t.name);
            let range = offset as usize..(offset + size) as usize;
            assert!(
                self.bytes[range.clone()] == t.data[..],
                "bytes of {} differ",
                t.name
            );
            if size > 0 {
                assert_eq!(offset % 4096, 0, "{} is aligned", t.name);
            }
        }
    }
}

fn contiguous(shape: &[u64]) -> Vec<u64> {
    let mut stride = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        stride[i] = stride[i + 1] * shape[i + 1].max(1);
    }
    stride
}

/// The torch name the store must write for a safetensors dtype.
pub fn torch_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F16 => "torch.float16",
        Dtype::BF16 => "torch.bfloat16",
        Dtype::F32 => "torch.float32",
        Dtype::F64 => "torch.float64",
        Dtype::I8 => "torch.int8",
        Dtype::I16 => "torch.int16",
        Dtype::I32 => "torch.int32",
        Dtype::I64 => "torch.int64",
        Dtype::U8 => "torch.uint8",
        Dtype::BOOL => "torch.bool",
        Dtype::F8_E4M3 => "torch.float8_e4m3fn",
        Dtype::F8_E5M2 => "torch.float8_e5m2",
        other => panic!("no torch name expected for {other:?}"),
    }
}

/// Asserts nothing is at `path` and no save left work behind in `storage`.
pub fn assert_nothing_published(storage: &Path, path: &Path) {
    assert!(!path.exists(), "{} must not exist", path.display());
    let staging = storage.join(".sllm-staging");
    if staging.exists() {
        let left: Vec<PathBuf> = std::fs::read_dir(&staging)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "staging leftovers: {left:?}");
    }
}

/// A daemon started for one test, stopped (SIGTERM, then waited for) on drop.
pub struct Daemon {
    pub child: std::process::Child,
    pub addr: String,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `sllm-store start --port 0 --storage-path <storage> <extra>`
    /// and waits for its ready line.
    pub fn start(home: &Path, storage: &Path, extra: &[&str]) -> Self {
        Self::start_via(home, storage, extra, &[])
    }

    /// Like [`start`](Self::start), with the binary run through `wrapper`
    /// (see [`sllm_store_via`]); the wrapper must exec it, so that the child
    /// is the daemon.
    pub fn start_via(home: &Path, storage: &Path, extra: &[&str], wrapper: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = sllm_store_via(home, wrapper)
            .env("RUST_LOG", "info")
            .args(["start", "--port", "0", "--storage-path"])
            .arg(storage)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("the daemon starts");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split(':').take(2).collect::<Vec<_>>().join(":");
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push(line);
            }
        });
        match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(addr) => Self { child, addr, log },
            Err(_) => {
                let _ = child.kill();
                panic!("the daemon did not get ready: {:?}", log.lock().unwrap());
            }
        }
    }

    /// Starts a daemon (with `extra`) over an empty store, `<home>/models`,
    /// for tests that need no model; returns the store's path too.
    pub fn over_empty_store(home: &Path, extra: &[&str]) -> (std::path::PathBuf, Self) {
        let storage = home.join("models");
        std::fs::create_dir_all(&storage).unwrap();
        let daemon = Self::start(home, &storage, extra);
        (storage, daemon)
    }

    /// A client connected to this daemon.
    pub async fn client(&self) -> sllm_client::StoreClient {
        sllm_client::StoreClient::connect(&self.addr)
            .await
            .expect("connect")
    }

    /// Sends SIGTERM and waits up to `secs` for the exit status.
    pub fn terminate(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let pid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        None
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.terminate(20).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Saves `tensors` as model `name` under `storage` with `sllm-store save`.
pub fn save_model(
    home: &Path,
    storage: &Path,
    name: &str,
    tensors: &[Tensor],
    partition_size: &str,
) {
    save_model_from(home, storage, name, tensors, partition_size, "", &[]);
}

/// Like [`save_model`], from a source directory named with `tag` (for a
/// second save of one model) and with `extra` flags (`--force`).
pub fn save_model_from(
    home: &Path,
    storage: &Path,
    name: &str,
    tensors: &[Tensor],
    partition_size: &str,
    tag: &str,
    extra: &[&str],
) {
    let src = home.join(format!("src-{}{tag}", name.replace('/', "-")));
    std::fs::create_dir_all(&src).unwrap();
    write_safetensors(&src.join("model.safetensors"), tensors);
    run_ok(
        sllm_store(home)
            .args([
                "save",
                "--model",
                name,
                "--partition-size",
                partition_size,
                "--local-model-path",
            ])
            .arg(&src)
            .arg("--storage-path")
            .arg(storage)
            .args(extra),
    );
}

/// Random tensors totalling about `bytes`.
pub fn tensors_of(bytes: usize, seed: u64) -> Vec<Tensor> {
    let mut out = Vec::new();
    let mut left = bytes;
    let mut i = 0;
    while left > 0 {
        let n = left.min(5000 + (i * 7919) % 60_000);
        out.push(Tensor::random(
            &format!("t{i}"),
            safetensors::Dtype::U8,
            &[n],
            seed * 1000 + i as u64,
        ));
        left -= n;
        i += 1;
    }
    out
}

/// Every file under `dir` (links not followed) with its bytes, by path
/// relative to `dir`: two reads compare equal when nothing changed.
pub fn read_tree(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().to_owned();
            if entry.file_type().unwrap().is_dir() {
                out.insert(rel, Vec::new());
                walk(root, &path, out);
            } else {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    assert!(!out.is_empty(), "{} holds nothing", dir.display());
    out
}
