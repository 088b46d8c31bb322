//! Every request of `storage.Storage` under property-based fuzzing, sent to
//! a real daemon ([`serve`]: host backend, pread or io_uring, checksums on)
//! in this process over loopback gRPC.
//!
//! Each case is a short sequence of requests: `LoadModelAsync` (CPU, GPU,
//! and device types that do not exist) with model paths that escape (`..`,
//! absolute, through a symlink), hold NULs, backslashes, control characters
//! or 1 MiB of text, name files instead of directories, or are plain
//! garbage; replica ids empty, 128 and 129 bytes long; copy lists empty,
//! long, or with offsets and sizes at and past the model's and the buffer's
//! ends and near 2^64; handle indexes out of range; device UUIDs unknown,
//! upper-cased, empty; handle lists empty, over the limit, or naming files
//! outside the shared-memory directory, symlinks, FIFOs, directories,
//! missing files, non-UTF-8 bytes, CUDA-sized garbage. Also
//! `RegisterModel`, `UnloadModel`, `ConfirmModel`, `GetModelStatus`,
//! `ClearMem`, `GetServerConfig`, and raw request bodies (arbitrary bytes,
//! or real requests with bytes flipped, cut or appended) for every method.
//!
//! Properties:
//! - every request gets an answer within a bound: a response or a gRPC
//!   status the daemon chose, never a broken connection, and a status
//!   message short enough to deliver;
//! - no thread of the daemon panics;
//! - only the two real models are ever registered or loaded: nothing
//!   outside the storage path is served;
//! - no file or directory is created, removed or resized anywhere under the
//!   test's directory (storage path, shared-memory directory, and a
//!   directory outside both): copies change the bytes of the buffers only;
//! - a copy the daemon accepted and confirmed wrote exactly the model's
//!   bytes where it was asked to;
//! - the daemon keeps serving: `GetServerConfig` after every case, and a
//!   well-formed load of the whole model, checked byte for byte, every 50
//!   cases and at the end.

#[path = "../../format/tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use fuzz_support::{Tally, Tier, run};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use prost::Message;
use prost::bytes::BufMut;
use sllm_daemon::daemon::{DaemonConfig, Listen, spawn};
use sllm_daemon::registry::Limits;
use sllm_daemon::server::MAX_STATUS_MESSAGE_BYTES;
use sllm_format::{StoreWriter, WriterOptions};
use sllm_proto::storage_client::StorageClient;
use sllm_proto::{
    ClearMemRequest, ClearMemResponse, ConfirmModelRequest, ConfirmModelResponse,
    GetModelStatusRequest, GetModelStatusResponse, GetServerConfigRequest, GetServerConfigResponse,
    LoadModelRequest, LoadModelResponse, MemCopyChunk, MemCopyChunkList, MemCopyHandle,
    MemCopyHandleList, RegisterModelRequest, RegisterModelResponse, UnloadModelRequest,
    UnloadModelResponse,
};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The longest a request may take: ConfirmModel waits for a replica at
/// most `confirm_timeout` (5 s here).
const REQUEST_LIMIT: Duration = Duration::from_secs(20);
const DEVICE_TYPE_CPU: i32 = 1;
const DEVICE_TYPE_GPU: i32 = 2;

// ---------------------------------------------------------------------------
// Raw request bodies through tonic.

/// Sends the bytes it is given as the request message, unchecked, and
/// decodes the response as `R`.
struct RawCodec<R>(PhantomData<R>);

struct RawEncoder;

struct RawDecoder<R>(PhantomData<R>);

impl<R: Message + Default + Send + 'static> Codec for RawCodec<R> {
    type Encode = Vec<u8>;
    type Decode = R;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder<R>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder<R> {
        RawDecoder(PhantomData)
    }
}

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl<R: Message + Default> Decoder for RawDecoder<R> {
    type Item = R;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<R>, Status> {
        R::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("the response does not decode: {e}")))
    }
}

async fn raw<R: Message + Default + Send + Sync + 'static>(
    channel: &Channel,
    method: &'static str,
    body: Vec<u8>,
) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("transport: {e}")))?;
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static(method),
        RawCodec::<R>(PhantomData),
    )
    .await
    .map(|_| ())
}

/// The methods, as raw requests reach them.
const METHODS: &[&str] = &[
    "/storage.Storage/LoadModelAsync",
    "/storage.Storage/ConfirmModel",
    "/storage.Storage/UnloadModel",
    "/storage.Storage/ClearMem",
    "/storage.Storage/RegisterModel",
    "/storage.Storage/GetServerConfig",
    "/storage.Storage/GetModelStatus",
];

async fn send_raw(channel: &Channel, method: usize, body: Vec<u8>) -> Result<(), Status> {
    let m = METHODS[method % METHODS.len()];
    match method % METHODS.len() {
        0 => raw::<LoadModelResponse>(channel, m, body).await,
        1 => raw::<ConfirmModelResponse>(channel, m, body).await,
        2 => raw::<UnloadModelResponse>(channel, m, body).await,
        3 => raw::<ClearMemResponse>(channel, m, body).await,
        4 => raw::<RegisterModelResponse>(channel, m, body).await,
        5 => raw::<GetServerConfigResponse>(channel, m, body).await,
        _ => raw::<GetModelStatusResponse>(channel, m, body).await,
    }
}

// ---------------------------------------------------------------------------
// The daemon and its files.

/// Everything a case needs: the daemon, a client, and the files.
struct World {
    rt: tokio::runtime::Runtime,
    _tmp: tempfile::TempDir,
    root: PathBuf,
    shm: PathBuf,
    client: StorageClient<Channel>,
    channel: Channel,
    devices: Vec<String>,
    /// The real models and their bytes.
    models: BTreeMap<&'static str, Vec<u8>>,
    /// Model paths to pick from (the real ones among them).
    paths: Vec<String>,
    /// Handles to pick from: (bytes, the buffer file when it is one).
    handles: Vec<(Vec<u8>, Option<PathBuf>)>,
    /// The tree before the first case.
    tree: BTreeMap<PathBuf, u64>,
    _stop: tokio::sync::oneshot::Sender<()>,
    replicas: AtomicU64,
}

fn write_model(dir: &Path, lens: &[u64], seed: u8) -> Vec<u8> {
    std::fs::create_dir_all(dir).unwrap();
    let opts = WriterOptions {
        partition_limit_bytes: 192 << 10,
        alignment_bytes: 4096,
        block_bytes: 32 << 10,
    };
    let mut w = StoreWriter::new(dir, opts).unwrap();
    for (i, &len) in lens.iter().enumerate() {
        let bytes: Vec<u8> = (0..len)
            .map(|b| {
                ((b ^ (b >> 11)) as u8)
                    .wrapping_mul(seed)
                    .wrapping_add(i as u8)
            })
            .collect();
        fuzz_support::add_u8_tensor(&mut w, format!("t.{i}"), &bytes);
    }
    w.finish(None).unwrap();
    let mut parts = Vec::new();
    while let Ok(b) = std::fs::read(dir.join(format!("tensor.data_{}", parts.len()))) {
        parts.push(b);
    }
    parts.concat()
}

/// Every path under `root` with its size (directories: 0).
fn tree(root: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_owned()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                todo.push(path.clone());
                out.insert(path, 0);
            } else {
                out.insert(path, meta.len());
            }
        }
    }
    out
}

impl World {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let storage = root.join("models");
        let shm = root.join("shm");
        let outside = root.join("outside");
        for d in [&storage, &shm, &outside] {
            std::fs::create_dir_all(d).unwrap();
        }
        let mut models = BTreeMap::new();
        models.insert(
            "o/m",
            write_model(&storage.join("o/m"), &[100_000, 120_000, 30_000], 7),
        );
        models.insert("o/n", write_model(&storage.join("o/n"), &[5_000], 13));
        write_model(&outside.join("x/y"), &[4_000], 29);
        std::os::unix::fs::symlink(outside.join("x/y"), storage.join("o/escape")).unwrap();
        std::fs::write(outside.join("secret"), b"not for clients").unwrap();

        // Buffers (`buf-*`: written by copies) and things that are not.
        let model_size = models["o/m"].len() as u64;
        let mut handles: Vec<(Vec<u8>, Option<PathBuf>)> = Vec::new();
        for (name, len) in [
            ("buf-model", model_size),
            ("buf-small", 4096),
            ("buf-empty", 0),
            ("buf-large", 1 << 20),
        ] {
            let path = shm.join(name);
            std::fs::File::create(&path).unwrap().set_len(len).unwrap();
            handles.push((path.as_os_str().as_encoded_bytes().to_vec(), Some(path)));
        }
        std::os::unix::fs::symlink(outside.join("secret"), shm.join("link")).unwrap();
        std::fs::create_dir(shm.join("dir")).unwrap();
        fuzz_support::mkfifo(&shm.join("fifo"));
        let text = |p: &Path| p.display().to_string();
        for other in [
            text(&shm.join("link")),
            text(&shm.join("dir")),
            text(&shm.join("fifo")),
            text(&shm.join("missing")),
            text(&shm.join("dir/missing")),
            text(&outside.join("secret")),
            text(&outside.join("new-file")),
            format!("{}/../outside/secret", text(&shm)),
            format!("{}/./buf-small", text(&shm)),
            format!("{}//buf-small", text(&shm)),
            format!("{}/buf-small/", text(&shm)),
            format!("{}/buf-small\0x", text(&shm)),
            text(&shm),
            "/etc/passwd".into(),
            "/dev/zero".into(),
            "buf-small".into(),
            "/".into(),
        ] {
            handles.push((other.into_bytes(), None));
        }
        for raw in [
            vec![],
            vec![7u8; 64],
            vec![0xff, 0xfe, b'/'],
            vec![b'/'; 5000],
            b"/\xff/buf".to_vec(),
        ] {
            handles.push((raw, None));
        }

        let mut paths: Vec<String> = [
            "o/m",
            "o/n",
            "o/escape",
            "o/absent",
            "o",
            "",
            "../outside/x/y",
            "o/../../outside/x/y",
            "o/../o/m",
            "o/m\0",
            "o\0/m",
            "o//m",
            "./o/m",
            "o/m/",
            "o/.m",
            ".hidden/m",
            "o/m/tensor.data_0",
            "o/m/sllm_manifest.json",
            "o/m/tensor_index.json",
            "o\\m",
            "o/m\n",
            "o/m\u{7f}",
            "ö/m",
            "o/m/rank_0",
            "/",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        paths.push(text(&storage.join("o/m")));
        paths.push(text(&outside.join("x/y")));
        paths.push(format!("o/{}", "a".repeat(256)));
        paths.push("a/".repeat(600));
        paths.push("x".repeat(1 << 20));

        let tree = tree(&root);

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let cfg = DaemonConfig {
            host_devices: 2,
            limits: Limits {
                confirm_timeout: Duration::from_secs(5),
                unknown_replica_wait: Duration::from_millis(10),
                unknown_replica_poll: Duration::from_millis(2),
                replica_retention: Duration::from_secs(10),
                abort_wait: Duration::from_secs(5),
                stream_drain_timeout: Duration::from_secs(5),
                ..Limits::default()
            },
            ..DaemonConfig::host(
                storage.clone(),
                Listen::Tcp("127.0.0.1:0".parse().unwrap()),
                shm.clone(),
                2 << 20,
                64 << 10,
            )
        };
        let daemon = rt.block_on(async { spawn(cfg) });
        let (client, channel, devices) = rt.block_on(async {
            let addr = match daemon.ready.await {
                Ok(listen) => listen.to_string(),
                Err(_) => panic!("the daemon did not start: {:?}", daemon.task.await),
            };
            let channel = Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client = StorageClient::new(channel.clone());
            let devices = client
                .get_server_config(GetServerConfigRequest {})
                .await
                .unwrap()
                .into_inner()
                .device_uuids;
            (client, channel, devices)
        });
        assert_eq!(devices.len(), 2);
        Self {
            rt,
            _tmp: tmp,
            root,
            shm,
            client,
            channel,
            devices,
            models,
            paths,
            handles,
            tree,
            _stop: daemon.stop,
            replicas: AtomicU64::new(0),
        }
    }
}

// ---------------------------------------------------------------------------
// Requests.

#[derive(Clone, Debug)]
enum ModelPath {
    Listed(prop::sample::Index),
    Plain(&'static str),
    Any(String),
}

#[derive(Clone, Debug)]
enum Replica {
    /// The case's own id (the case number appended): the same for all
    /// the case's requests, unused by any other case.
    Fresh,
    /// One of a few fixed ids, reused across requests.
    Fixed(&'static str),
    /// An id of this many bytes.
    Long(usize),
}

#[derive(Clone, Debug)]
enum DeviceKey {
    Real(usize),
    Other(String),
}

#[derive(Clone, Debug)]
enum Num {
    /// A fraction (per mille) of the model's size, plus a delta.
    OfModel(u16, i8),
    Exact(u64),
}

#[derive(Clone, Debug)]
struct Copy {
    src: Num,
    size: Num,
    dst: Num,
    handle_idx: u64,
}

#[derive(Clone, Debug)]
enum Handle {
    Listed(prop::sample::Index),
    /// One of the four buffers (they come first in the list).
    Buffer(usize),
    Bytes(Vec<u8>),
}

#[derive(Clone, Debug)]
enum Req {
    Load {
        model: ModelPath,
        replica: Replica,
        chunks: Vec<(DeviceKey, Vec<Copy>)>,
        /// Also this many zero-size copies for the first device.
        many: usize,
        handles: Vec<(DeviceKey, Vec<Handle>)>,
        device_type: i32,
    },
    Register(ModelPath),
    Unload(ModelPath, Replica, i32),
    Confirm(ModelPath, Replica, i32),
    Status(ModelPath),
    ClearMem,
    ServerConfig,
    /// Arbitrary bytes as the body of method `n`.
    Raw(usize, Vec<u8>),
    /// A real request of method `n` (from `Req`), its encoding mutated.
    Mangled(
        Box<Req>,
        Vec<(prop::sample::Index, u8)>,
        Option<prop::sample::Index>,
        Vec<u8>,
    ),
}

fn model_path() -> impl Strategy<Value = ModelPath> {
    prop_oneof![
        6 => any::<prop::sample::Index>().prop_map(ModelPath::Listed),
        1 => "[a-z./\\\\\\x00-\\x1f]{0,24}".prop_map(ModelPath::Any),
        1 => any::<String>().prop_map(ModelPath::Any),
    ]
}

/// A model path that is mostly a real model's.
fn likely_model() -> impl Strategy<Value = ModelPath> {
    prop_oneof![
        3 => Just(ModelPath::Plain("o/m")),
        1 => Just(ModelPath::Plain("o/n")),
        3 => model_path(),
    ]
}

fn replica() -> impl Strategy<Value = Replica> {
    prop_oneof![
        3 => Just(Replica::Fresh),
        1 => prop::sample::select(vec!["r", "", "\0", "ü", "00000000-0000-0000-0000-000000000000"])
            .prop_map(Replica::Fixed),
        1 => prop::sample::select(vec![128usize, 129, 5000]).prop_map(Replica::Long),
    ]
}

fn device_key() -> impl Strategy<Value = DeviceKey> {
    prop_oneof![
        6 => (0usize..2).prop_map(DeviceKey::Real),
        1 => prop::sample::select(vec![
            "".to_owned(),
            "00000000-0000-0000-0000-000000000000".to_owned(),
            "686F7374-0000-4000-8000-000000000000".to_owned(),
            "GPU-686f7374-0000-4000-8000-000000000000".to_owned(),
            "686f7374-0000-4000-8000-000000000002".to_owned(),
            "x".repeat(10_000),
        ])
        .prop_map(DeviceKey::Other),
        1 => any::<String>().prop_map(DeviceKey::Other),
    ]
}

fn num() -> impl Strategy<Value = Num> {
    prop_oneof![
        4 => (0u16..=1000, -2i8..=2).prop_map(|(f, d)| Num::OfModel(f, d)),
        2 => prop::sample::select(vec![
            0u64,
            1,
            4095,
            4096,
            4097,
            (1 << 20) - 1,
            1 << 20,
            (1 << 20) + 1,
            1 << 32,
            1 << 63,
            u64::MAX - 1,
            u64::MAX,
        ])
        .prop_map(Num::Exact),
        1 => any::<u64>().prop_map(Num::Exact),
    ]
}

fn copy() -> impl Strategy<Value = Copy> {
    (
        num(),
        num(),
        num(),
        prop_oneof![6 => 0u64..2, 1 => 2u64..5, 1 => Just(u64::MAX), 1 => Just(1u64 << 32)],
    )
        .prop_map(|(src, size, dst, handle_idx)| Copy {
            src,
            size,
            dst,
            handle_idx,
        })
}

fn handle() -> impl Strategy<Value = Handle> {
    prop_oneof![
        8 => any::<prop::sample::Index>().prop_map(Handle::Listed),
        1 => prop::collection::vec(any::<u8>(), 0..80).prop_map(Handle::Bytes),
    ]
}

fn device_type() -> impl Strategy<Value = i32> {
    prop_oneof![
        8 => Just(DEVICE_TYPE_GPU),
        3 => Just(DEVICE_TYPE_CPU),
        1 => prop::sample::select(vec![0, 3, -1, i32::MAX, i32::MIN]),
    ]
}

fn load() -> impl Strategy<Value = Req> {
    (
        model_path(),
        replica(),
        prop::collection::vec((device_key(), prop::collection::vec(copy(), 0..6)), 0..3),
        prop_oneof![8 => Just(0usize), 1 => Just(70_000usize)],
        prop::collection::vec(
            (
                device_key(),
                prop_oneof![
                    8 => prop::collection::vec(handle(), 0..4),
                    1 => prop::collection::vec(handle(), 65..70),
                ],
            ),
            0..3,
        ),
        device_type(),
    )
        .prop_map(
            |(model, replica, chunks, many, handles, device_type)| Req::Load {
                model,
                replica,
                chunks,
                many,
                handles,
                device_type,
            },
        )
}

/// A load a client could send: a real model and device, buffers for
/// handles, copies inside the model (a fraction of the large model's
/// size) and mostly inside their buffer, so that many are accepted and
/// their bytes can be checked; one field now and then pushed out of range.
fn plausible_load() -> impl Strategy<Value = Req> {
    let copy = (
        0u16..1000,
        0u16..1000,
        prop::bool::weighted(0.7),
        0u16..1000,
        0u64..3,
    )
        .prop_map(|(a, b, mirror, d, handle_idx)| {
            let (src, len) = (a.min(b), a.max(b) - a.min(b));
            let dst = if mirror { src } else { d.min(1000 - len) };
            Copy {
                src: Num::OfModel(src, 0),
                size: Num::OfModel(len, 0),
                dst: Num::OfModel(dst, 0),
                handle_idx,
            }
        });
    (
        prop_oneof![9 => Just(0usize), 1 => Just(1usize)],
        0usize..2,
        prop::collection::vec(copy, 1..6),
        prop::collection::vec(
            prop_oneof![3 => Just(0usize), 3 => Just(3usize), 1 => Just(1usize), 1 => Just(2usize)],
            1..4,
        ),
        prop::option::of((any::<prop::sample::Index>(), 0usize..4, num())),
        prop_oneof![4 => Just(DEVICE_TYPE_GPU), 1 => Just(DEVICE_TYPE_CPU)],
    )
        .prop_map(|(model, device, mut copies, buffers, push, device_type)| {
            if let Some((i, field, n)) = push {
                let at = i.index(copies.len());
                let c = &mut copies[at];
                match field {
                    0 => c.src = n,
                    1 => c.size = n,
                    2 => c.dst = n,
                    _ => c.handle_idx = 7,
                }
            }
            Req::Load {
                model: ModelPath::Plain(if model == 0 { "o/m" } else { "o/n" }),
                replica: Replica::Fresh,
                chunks: vec![(DeviceKey::Real(device), copies)],
                many: 0,
                handles: vec![(
                    DeviceKey::Real(device),
                    buffers.into_iter().map(Handle::Buffer).collect(),
                )],
                device_type,
            }
        })
}

fn plain_request() -> impl Strategy<Value = Req> {
    prop_oneof![
        4 => load(),
        4 => plausible_load(),
        2 => likely_model().prop_map(Req::Register),
        1 => (likely_model(), replica(), device_type()).prop_map(|(m, r, t)| Req::Unload(m, r, t)),
        2 => (likely_model(), replica(), device_type()).prop_map(|(m, r, t)| Req::Confirm(m, r, t)),
        1 => likely_model().prop_map(Req::Status),
        1 => Just(Req::ClearMem),
        1 => Just(Req::ServerConfig),
        1 => (0usize..7, prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(m, b)| Req::Raw(m, b)),
    ]
}

fn request() -> impl Strategy<Value = Req> {
    prop_oneof![
        10 => plain_request(),
        2 => (
            plain_request(),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
            prop::option::of(any::<prop::sample::Index>()),
            prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(any::<u8>(), 0..16)],
        )
            .prop_map(|(r, flips, cut, tail)| Req::Mangled(Box::new(r), flips, cut, tail)),
    ]
}

/// A request turned into what goes on the wire.
enum Wire {
    Load(LoadModelRequest),
    Register(RegisterModelRequest),
    Unload(UnloadModelRequest),
    Confirm(ConfirmModelRequest),
    Status(GetModelStatusRequest),
    ClearMem,
    ServerConfig,
    Raw(usize, Vec<u8>),
}

impl Wire {
    /// The method number (in `METHODS`) and the encoded message.
    fn encode(&self) -> (usize, Vec<u8>) {
        match self {
            Wire::Load(m) => (0, m.encode_to_vec()),
            Wire::Confirm(m) => (1, m.encode_to_vec()),
            Wire::Unload(m) => (2, m.encode_to_vec()),
            Wire::ClearMem => (3, ClearMemRequest {}.encode_to_vec()),
            Wire::Register(m) => (4, m.encode_to_vec()),
            Wire::ServerConfig => (5, GetServerConfigRequest {}.encode_to_vec()),
            Wire::Status(m) => (6, m.encode_to_vec()),
            Wire::Raw(n, b) => (*n, b.clone()),
        }
    }
}

/// What one case's context resolves requests against.
struct Ctx<'a> {
    w: &'a World,
    case: u64,
    model_size: u64,
}

impl Ctx<'_> {
    fn path(&self, p: &ModelPath) -> String {
        match p {
            ModelPath::Listed(i) => self.w.paths[i.index(self.w.paths.len())].clone(),
            ModelPath::Plain(p) => (*p).to_owned(),
            ModelPath::Any(s) => s.clone(),
        }
    }

    fn replica(&self, r: &Replica) -> String {
        match r {
            Replica::Fresh => format!("fuzz-{}", self.case),
            Replica::Fixed(s) => (*s).to_owned(),
            Replica::Long(n) => "x".repeat(*n),
        }
    }

    fn device(&self, d: &DeviceKey) -> String {
        match d {
            DeviceKey::Real(i) => self.w.devices[*i].clone(),
            DeviceKey::Other(s) => s.clone(),
        }
    }

    fn num(&self, n: &Num) -> u64 {
        match n {
            Num::OfModel(f, d) => {
                (self.model_size * u64::from(*f) / 1000).saturating_add_signed(i64::from(*d))
            }
            Num::Exact(v) => *v,
        }
    }

    fn handle(&self, h: &Handle) -> Vec<u8> {
        match h {
            Handle::Listed(i) => self.w.handles[i.index(self.w.handles.len())].0.clone(),
            Handle::Buffer(i) => self.w.handles[*i % 4].0.clone(),
            Handle::Bytes(b) => b.clone(),
        }
    }

    fn wire(&self, req: &Req) -> Wire {
        match req {
            Req::Load {
                model,
                replica,
                chunks,
                many,
                handles,
                device_type,
            } => {
                let mut chunk_map: HashMap<String, MemCopyChunkList> = HashMap::new();
                for (k, (dev, copies)) in chunks.iter().enumerate() {
                    let list = chunk_map.entry(self.device(dev)).or_default();
                    list.chunks.extend(copies.iter().map(|c| MemCopyChunk {
                        src_offset: self.num(&c.src),
                        size: self.num(&c.size),
                        dst_offset: self.num(&c.dst),
                        handle_idx: c.handle_idx,
                    }));
                    if k == 0 && *many > 0 {
                        list.chunks.extend(std::iter::repeat_n(
                            MemCopyChunk {
                                src_offset: 0,
                                size: 0,
                                dst_offset: 0,
                                handle_idx: 0,
                            },
                            *many,
                        ));
                    }
                }
                let mut handle_map: HashMap<String, MemCopyHandleList> = HashMap::new();
                for (dev, list) in handles {
                    handle_map
                        .entry(self.device(dev))
                        .or_default()
                        .handles
                        .extend(list.iter().map(|h| MemCopyHandle {
                            cuda_ipc_handle: self.handle(h),
                        }));
                }
                Wire::Load(LoadModelRequest {
                    model_path: self.path(model),
                    replica_uuid: self.replica(replica),
                    chunks: chunk_map,
                    handles: handle_map,
                    target_device_type: *device_type,
                })
            }
            Req::Register(m) => Wire::Register(RegisterModelRequest {
                model_path: self.path(m),
            }),
            Req::Unload(m, r, t) => Wire::Unload(UnloadModelRequest {
                model_path: self.path(m),
                replica_uuid: self.replica(r),
                target_device_type: *t,
            }),
            Req::Confirm(m, r, t) => Wire::Confirm(ConfirmModelRequest {
                model_path: self.path(m),
                replica_uuid: self.replica(r),
                target_device_type: *t,
            }),
            Req::Status(m) => Wire::Status(GetModelStatusRequest {
                model_path: self.path(m),
            }),
            Req::ClearMem => Wire::ClearMem,
            Req::ServerConfig => Wire::ServerConfig,
            Req::Raw(m, b) => Wire::Raw(*m, b.clone()),
            Req::Mangled(inner, flips, cut, tail) => {
                let (method, mut body) = self.wire(inner).encode();
                for (i, b) in flips {
                    if !body.is_empty() {
                        let i = i.index(body.len());
                        body[i] ^= (*b).max(1);
                    }
                }
                if let Some(c) = cut {
                    body.truncate(c.index(body.len() + 1));
                }
                body.extend_from_slice(tail);
                Wire::Raw(method, body)
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Panics on the daemon's threads.

static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Panics on threads other than the tests' own (the daemon's), recorded
/// by a hook installed once.
fn panics() -> Vec<String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("");
            // The test threads' own panics are the harness's business.
            if !name.starts_with("requests_") && name != "main" {
                PANICS
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(format!("thread {name:?}: {info}"));
            }
            previous(info);
        }));
    });
    PANICS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

// ---------------------------------------------------------------------------
// A case.

const HUNG: &str = "no answer within the fuzz test's bound";

/// The request's answer, or a status saying there was none in time.
async fn bounded<T>(
    request: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<(), Status> {
    match tokio::time::timeout(REQUEST_LIMIT, request).await {
        Ok(answer) => answer.map(|_| ()),
        Err(_) => Err(Status::deadline_exceeded(HUNG)),
    }
}

/// A GPU load the daemon accepted: where its copies went.
struct Accepted {
    model: String,
    replica: String,
    /// (buffer file, dst, src, size) of each copy into a buffer.
    copies: Vec<(PathBuf, u64, u64, u64)>,
}

fn status_problem(s: &Status) -> Option<String> {
    if matches!(
        s.code(),
        Code::Unknown | Code::Unavailable | Code::Cancelled
    ) {
        return Some(format!("a transport failure, not an answer: {s:?}"));
    }
    // Messages are cut at 4 KiB; an elision note follows.
    if s.message().len() > MAX_STATUS_MESSAGE_BYTES + 64 {
        return Some(format!(
            "a status message of {} bytes (limit {MAX_STATUS_MESSAGE_BYTES})",
            s.message().len()
        ));
    }
    None
}

fn check(reqs: &[Req], w: &World, tally: &Tally) -> Result<(), TestCaseError> {
    let case = w.replicas.fetch_add(1, Ordering::Relaxed);
    let ctx = Ctx {
        w,
        case,
        model_size: w.models["o/m"].len() as u64,
    };
    let mut accepted: Vec<Accepted> = Vec::new();
    // A raw LoadModelAsync that decoded into a GPU load may write buffers
    // unseen: then no bytes are checked in this case.
    let mut unseen_writes = false;
    // Replicas the case's own ConfirmModel confirmed.
    let mut confirmed_ok = Vec::new();
    let mut client = w.client.clone();
    for req in reqs {
        let wire = ctx.wire(req);
        let (label, model, outcome): (&str, Option<String>, Result<(), Status>) =
            w.rt.block_on(async {
                match &wire {
                    Wire::Load(m) => {
                        let label = match m.target_device_type {
                            DEVICE_TYPE_CPU => "LoadModelAsync(CPU)",
                            DEVICE_TYPE_GPU => "LoadModelAsync(GPU)",
                            _ => "LoadModelAsync(other)",
                        };
                        let r = bounded(client.load_model_async(m.clone())).await;
                        (label, Some(m.model_path.clone()), r)
                    }
                    Wire::Register(m) => {
                        let r = bounded(client.register_model(m.clone())).await;
                        ("RegisterModel", Some(m.model_path.clone()), r)
                    }
                    Wire::Unload(m) => (
                        "UnloadModel",
                        None,
                        bounded(client.unload_model(m.clone())).await,
                    ),
                    Wire::Confirm(m) => (
                        "ConfirmModel",
                        None,
                        bounded(client.confirm_model(m.clone())).await,
                    ),
                    Wire::Status(m) => {
                        let r = bounded(client.get_model_status(m.clone())).await;
                        ("GetModelStatus", Some(m.model_path.clone()), r)
                    }
                    Wire::ClearMem => (
                        "ClearMem",
                        None,
                        bounded(client.clear_mem(ClearMemRequest {})).await,
                    ),
                    Wire::ServerConfig => {
                        let r = bounded(client.get_server_config(GetServerConfigRequest {})).await;
                        ("GetServerConfig", None, r)
                    }
                    Wire::Raw(method, body) => {
                        let r = bounded(async {
                            send_raw(&w.channel, *method, body.clone())
                                .await
                                .map(tonic::Response::new)
                        })
                        .await;
                        ("raw", None, r)
                    }
                }
            });
        match &outcome {
            Err(s) if s.code() == Code::DeadlineExceeded && s.message() == HUNG => {
                return Err(TestCaseError::fail(format!(
                    "{label} got no answer in {} s",
                    REQUEST_LIMIT.as_secs()
                )));
            }
            Err(s) => {
                if let Some(problem) = status_problem(s) {
                    return Err(TestCaseError::fail(format!("{label}: {problem}")));
                }
                tally.note(&format!("{label}: {:?}", s.code()));
                if s.code() == Code::Internal
                    && std::env::var_os("SLLM_FUZZ_SHOW_INTERNAL").is_some()
                {
                    eprintln!("{label}: {}", fuzz_support::cut(s.message(), 300));
                }
            }
            Ok(()) => {
                tally.note(&format!("{label}: Ok"));
                if let Some(model) = &model {
                    let served = matches!(label, "RegisterModel" | "GetModelStatus")
                        || label.starts_with("LoadModelAsync");
                    prop_assert!(
                        !served || w.models.contains_key(model.as_str()),
                        "{label} succeeded for {:?}, which is not a model in the storage path",
                        fuzz_support::cut(model, 200)
                    );
                }
                if let Wire::Raw(method, _) = &wire {
                    unseen_writes |= method % METHODS.len() == 0;
                }
                if let Wire::Confirm(m) = &wire {
                    confirmed_ok.push((m.model_path.clone(), m.replica_uuid.clone()));
                }
                if let (Wire::Load(m), "LoadModelAsync(GPU)") = (&wire, label) {
                    accepted.push(accepted_copies(m, w).map_err(TestCaseError::fail)?);
                }
            }
        }
        let leaked = panics();
        prop_assert!(leaked.is_empty(), "the daemon panicked: {leaked:?}");
    }

    // Every accepted copy finishes; when it is the case's only one (so no
    // other copy wrote the same buffer meanwhile), its bytes are checked.
    let only = accepted.len() == 1 && !unseen_writes;
    for a in &accepted {
        let confirmed =
            w.rt.block_on(bounded(client.confirm_model(ConfirmModelRequest {
                model_path: a.model.clone(),
                replica_uuid: a.replica.clone(),
                target_device_type: DEVICE_TYPE_GPU,
            })));
        match confirmed {
            Err(s) if s.code() == Code::DeadlineExceeded && s.message() == HUNG => {
                return Err(TestCaseError::fail("ConfirmModel of an accepted copy hung"));
            }
            // Confirmed now, or by the case itself already.
            Ok(_) => {}
            Err(s)
                if s.code() == Code::NotFound
                    && confirmed_ok.contains(&(a.model.clone(), a.replica.clone())) => {}
            // Failed (or confirmed with a failure by the case itself).
            Err(s) => {
                if let Some(problem) = status_problem(&s) {
                    return Err(TestCaseError::fail(format!("ConfirmModel: {problem}")));
                }
                continue;
            }
        }
        if only && disjoint(&a.copies) {
            let bytes = &w.models[a.model.as_str()];
            for (path, dst, src, size) in &a.copies {
                let got = std::fs::read(path).unwrap();
                let (dst, src, size) = (*dst as usize, *src as usize, *size as usize);
                prop_assert!(
                    got[dst..dst + size] == bytes[src..src + size],
                    "a confirmed copy of {size} bytes from {src} to {} at {dst} holds other bytes",
                    path.display()
                );
            }
            tally.note("accepted copies checked byte for byte");
        }
    }
    // Still serving.
    let health =
        w.rt.block_on(bounded(client.get_server_config(GetServerConfigRequest {})));
    prop_assert!(health.is_ok(), "GetServerConfig after the case: {health:?}");
    if case % 50 == 49 {
        well_formed_load(w, case).map_err(TestCaseError::fail)?;
        check_tree(w).map_err(TestCaseError::fail)?;
    }
    Ok(())
}

/// The copies of an accepted GPU load, each with the buffer it writes;
/// an error when a handle it accepted is none of the buffers.
fn accepted_copies(m: &LoadModelRequest, w: &World) -> Result<Accepted, String> {
    use std::os::unix::ffi::OsStrExt;
    // The path a handle names, as the daemon resolves it (`.` and repeated
    // or trailing slashes are not components).
    let normal = |bytes: &[u8]| -> PathBuf {
        Path::new(std::ffi::OsStr::from_bytes(bytes))
            .components()
            .collect()
    };
    let mut copies = Vec::new();
    for (device, list) in &m.chunks {
        let handles = &m.handles[device].handles;
        for c in &list.chunks {
            let handle = &handles[c.handle_idx as usize].cuda_ipc_handle;
            let named = normal(handle);
            let path = w
                .handles
                .iter()
                .filter_map(|(_, path)| path.clone())
                .find(|path| *path == named)
                .ok_or_else(|| {
                    format!(
                        "the daemon accepted handle {:?}, which is not a buffer",
                        String::from_utf8_lossy(handle)
                    )
                })?;
            if c.size > 0 {
                copies.push((path, c.dst_offset, c.src_offset, c.size));
            }
        }
    }
    Ok(Accepted {
        model: m.model_path.clone(),
        replica: m.replica_uuid.clone(),
        copies,
    })
}

/// True when no two copies write the same byte of the same buffer.
fn disjoint(copies: &[(PathBuf, u64, u64, u64)]) -> bool {
    copies.iter().enumerate().all(|(i, a)| {
        copies[i + 1..]
            .iter()
            .all(|b| a.0 != b.0 || a.1 + a.3 <= b.1 || b.1 + b.3 <= a.1)
    })
}

/// A load of the whole model into a fresh buffer, as a client does it,
/// checked byte for byte.
fn well_formed_load(w: &World, case: u64) -> Result<(), String> {
    let bytes = &w.models["o/m"];
    let path = w.shm.join(format!("buf-check-{case}"));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(bytes.len() as u64)
        .unwrap();
    let handle = path.as_os_str().as_encoded_bytes().to_vec();
    let device = w.devices[0].clone();
    let replica = format!("check-{case}");
    let mut client = w.client.clone();
    let result: Result<(), Status> = w.rt.block_on(async {
        client
            .load_model_async(LoadModelRequest {
                model_path: "o/m".into(),
                target_device_type: DEVICE_TYPE_CPU,
                ..Default::default()
            })
            .await?;
        // A pool still handing back chunks of copies just finished may ask
        // for a moment.
        let mut tries = 0;
        loop {
            let r = client
                .load_model_async(LoadModelRequest {
                    model_path: "o/m".into(),
                    replica_uuid: replica.clone(),
                    chunks: HashMap::from([(
                        device.clone(),
                        MemCopyChunkList {
                            chunks: vec![MemCopyChunk {
                                src_offset: 0,
                                size: bytes.len() as u64,
                                dst_offset: 0,
                                handle_idx: 0,
                            }],
                        },
                    )]),
                    handles: HashMap::from([(
                        device.clone(),
                        MemCopyHandleList {
                            handles: vec![MemCopyHandle {
                                cuda_ipc_handle: handle.clone(),
                            }],
                        },
                    )]),
                    target_device_type: DEVICE_TYPE_GPU,
                })
                .await;
            match r {
                Err(s) if s.code() == Code::ResourceExhausted && tries < 20 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                r => {
                    r?;
                    break;
                }
            }
        }
        client
            .confirm_model(ConfirmModelRequest {
                model_path: "o/m".into(),
                replica_uuid: replica.clone(),
                target_device_type: DEVICE_TYPE_GPU,
            })
            .await?;
        Ok(())
    });
    let got = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    result.map_err(|s| format!("a well-formed load failed: {s:?}"))?;
    if &got != bytes {
        return Err("a well-formed load copied other bytes than the model's".into());
    }
    Ok(())
}

/// Nothing created, removed or resized under the test's directory (the
/// buffers keep their sizes too; only their bytes change).
fn check_tree(w: &World) -> Result<(), String> {
    let now = tree(&w.root);
    if now != w.tree {
        let added: Vec<_> = now.keys().filter(|k| !w.tree.contains_key(*k)).collect();
        let removed: Vec<_> = w.tree.keys().filter(|k| !now.contains_key(*k)).collect();
        let resized: Vec<_> = now
            .iter()
            .filter(|(k, v)| w.tree.get(*k).is_some_and(|old| old != *v))
            .map(|(k, _)| k)
            .collect();
        return Err(format!(
            "files changed under the test's directory: added {added:?}, removed {removed:?}, \
             resized {resized:?}"
        ));
    }
    Ok(())
}

fn target(tier: Tier, name: &str) {
    panics();
    let world = World::new();
    let tally = Tally::default();
    let strategy = prop::collection::vec(request(), 1..5);
    run(name, tier, strategy, |reqs| check(&reqs, &world, &tally));
    // And after everything, once more.
    well_formed_load(&world, u64::MAX).unwrap();
    check_tree(&world).unwrap();
    let leaked = panics();
    assert!(leaked.is_empty(), "the daemon panicked: {leaked:?}");
    tally.print(name);
}

#[test]
fn requests_smoke() {
    target(Tier::smoke(24), "requests (smoke)");
}

#[test]
#[ignore = "slow tier (fuzz, time-boxed): cargo test -- --include-ignored"]
fn requests_fuzz() {
    target(Tier::slow(50_000, 60), "requests");
}
