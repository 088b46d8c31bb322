//! Starting and stopping the daemon: builds the pool, the io engine, the
//! device backend and the registry from a validated [`DaemonConfig`], serves
//! `storage.Storage` and the standard gRPC health service on connections
//! accepted by [`crate::listener`] (capped, idle ones closed at the cap,
//! backing off when out of descriptors), and shuts down cleanly on
//! SIGINT/SIGTERM (stop accepting, cancel loads, free everything).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sllm_format::units::human_bytes;
use sllm_proto::storage_server::StorageServer;
use tokio::signal::unix::{SignalKind, signal};
use tonic::transport::Server;

use crate::device::cuda::CudaBackend;
use crate::device::host::HostBackend;
use crate::device::{BackendChoice, BackendKind, DeviceBackend, DeviceError};
use crate::io::{EngineKind, IoError, make_engine};
use crate::listener::{Connections, TrackRequestsLayer, connection_limit, incoming};
use crate::pool::{HostPool, PoolError};
use crate::registry::checksums::HashPool;
use crate::registry::{Limits, Registry, RegistryConfig};
use crate::server::StorageService;

/// Largest gRPC message accepted: a LoadModelRequest listing every tensor
/// of a very large model stays far below it.
const MAX_MESSAGE_BYTES: usize = 256 << 20;
/// How long in-flight requests may take to finish after a shutdown signal;
/// clients that keep idle connections open are not waited for beyond it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Where the daemon listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(addr) => write!(f, "{addr}"),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Everything the daemon needs, validated.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub storage_root: PathBuf,
    pub listen: Listen,
    /// Most connections open at once, before the open-file limit lowers it.
    pub max_connections: usize,
    pub io_threads: usize,
    pub chunk_bytes: usize,
    pub pool_bytes: usize,
    pub registration_required: bool,
    pub device: BackendChoice,
    pub host_devices: usize,
    pub host_shm_dir: PathBuf,
    pub io_engine: EngineKind,
    pub queue_depth: u32,
    pub max_io_bytes: usize,
    pub metrics_port: Option<u16>,
    /// Check reads against the manifest's checksums.
    pub verify_checksums: bool,
    /// Threads hashing blocks as they are read.
    pub checksum_threads: usize,
    /// CUDA: streams each request's chunks are spread over.
    pub copy_streams: usize,
    /// Mode bits of a unix socket (`--listen unix:`), set before it accepts.
    pub socket_mode: u32,
    /// The token every `storage.Storage` call must carry, if any.
    pub auth_token: Option<crate::auth::Token>,
    pub limits: Limits,
}

impl DaemonConfig {
    /// A small daemon on the host backend (one device, its buffers under
    /// `host_shm_dir`), checking checksums, with the default limits: what the
    /// demo and the tests run. Change what differs with struct update
    /// syntax: `DaemonConfig { host_devices: 2, ..DaemonConfig::host(..) }`.
    pub fn host(
        storage_root: PathBuf,
        listen: Listen,
        host_shm_dir: PathBuf,
        pool_bytes: usize,
        chunk_bytes: usize,
    ) -> Self {
        Self {
            storage_root,
            listen,
            max_connections: crate::listener::DEFAULT_MAX_CONNECTIONS,
            io_threads: 2,
            chunk_bytes,
            pool_bytes,
            registration_required: false,
            device: BackendChoice::Host,
            host_devices: 1,
            host_shm_dir,
            io_engine: EngineKind::Auto,
            queue_depth: 16,
            max_io_bytes: 1 << 20,
            metrics_port: None,
            verify_checksums: true,
            checksum_threads: 1,
            copy_streams: 1,
            socket_mode: 0o600,
            auth_token: None,
            limits: Limits::default(),
        }
    }
}

/// The daemon could not start or failed while serving.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "storage path {path} is unusable: {source}; create it, or point --storage-path (or $STORAGE_PATH) at your models"
    )]
    StorageRoot {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "storage path {path} is {what}, not a folder; point --storage-path (or $STORAGE_PATH) at \
         the folder that holds your models"
    )]
    StorageRootNotAFolder { path: PathBuf, what: &'static str },
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("cannot listen on {listen}: {source}; {hint}")]
    Bind {
        listen: Listen,
        source: std::io::Error,
        /// What to do, for this error at this address ([`DaemonError::bind`]).
        hint: String,
    },
    #[error("cannot start the checksum threads: {0}; the machine is out of threads or memory")]
    Threads(std::io::Error),
    #[error("cannot start the metrics endpoint on port {port}: {reason}")]
    Metrics { port: u16, reason: String },
    #[error("the server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl DaemonError {
    /// Binding `listen` failed with `source`: the error, with a fix that
    /// fits the cause (a live daemon, a file in the way, a missing folder).
    fn bind(listen: &Listen, source: std::io::Error) -> Self {
        use std::io::ErrorKind;
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let hint = match (listen, source.kind()) {
            (Listen::Unix(path), ErrorKind::AddrInUse) => match std::fs::symlink_metadata(path) {
                Ok(meta) if !meta.file_type().is_socket() => format!(
                    "{} is {}, not a socket, and is left alone; remove it or pick another --listen",
                    path.display(),
                    sllm_format::small_files::describe_mode(meta.mode())
                ),
                _ => {
                    "another daemon is serving on it; stop that one or pick another --listen".into()
                }
            },
            (Listen::Unix(path), ErrorKind::NotFound) => format!(
                "the folder {} does not exist; create it or pick another --listen",
                path.parent().unwrap_or(path).display()
            ),
            (Listen::Tcp(_), ErrorKind::AddrInUse) => {
                "is another daemon running there? pick another --port or --listen".into()
            }
            (Listen::Tcp(addr), ErrorKind::AddrNotAvailable) => format!(
                "{} is not an address of this machine; pass a --host it has (127.0.0.1 for this \
                 host only, 0.0.0.0 for every interface)",
                addr.ip()
            ),
            (_, ErrorKind::PermissionDenied) => {
                "this user may not listen there; pick another --port (1024 or above) or a \
                 --listen socket in a folder it may write"
                    .into()
            }
            _ => "pick another --port or --listen".into(),
        };
        Self::Bind {
            listen: listen.clone(),
            source,
            hint,
        }
    }
}

/// Builds everything, serves until SIGINT/SIGTERM, then stops cleanly.
pub async fn run(cfg: DaemonConfig) -> Result<(), DaemonError> {
    serve(cfg, wait_for_signal(), |_| {}).await
}

/// A daemon serving on a task of a tokio runtime ([`spawn`]): the demo's,
/// and tests' that run one in process.
pub struct Spawned {
    /// The bound address, once listening. Closed without one when the
    /// daemon failed to start; `task` then says why.
    pub ready: tokio::sync::oneshot::Receiver<Listen>,
    /// Stops the daemon when sent to or dropped.
    pub stop: tokio::sync::oneshot::Sender<()>,
    /// How serving ended.
    pub task: tokio::task::JoinHandle<Result<(), DaemonError>>,
}

/// Serves `cfg` on a new task of the current tokio runtime (call it inside
/// one) until [`Spawned::stop`] is sent to or dropped.
pub fn spawn(cfg: DaemonConfig) -> Spawned {
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready) = tokio::sync::oneshot::channel::<Listen>();
    let task = tokio::spawn(serve(
        cfg,
        async move {
            let _ = stop_rx.await;
        },
        move |listen| {
            let _ = ready_tx.send(listen.clone());
        },
    ));
    Spawned { ready, stop, task }
}

/// Builds everything, calls `on_ready` with the bound address once
/// listening, serves until `stop` completes, then stops cleanly.
pub async fn serve(
    cfg: DaemonConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(&Listen),
) -> Result<(), DaemonError> {
    let started = Instant::now();
    raise_open_file_limit();
    let limit = connection_limit(cfg.max_connections, crate::listener::open_file_limit());
    if limit.lowered() {
        tracing::info!(
            "at most {} connections at once, not {} (--max-connections): the open-file limit is {} \
             and {} descriptors stay in reserve; raise the limit (ulimit -n, systemd LimitNOFILE=) for more",
            limit.max,
            limit.requested,
            limit.open_files.unwrap_or(0),
            limit.reserve
        );
    } else {
        tracing::info!(
            "at most {} connections at once (--max-connections)",
            limit.max
        );
    }
    let connections = Connections::new(limit.max);
    let storage_root =
        cfg.storage_root
            .canonicalize()
            .map_err(|source| DaemonError::StorageRoot {
                path: cfg.storage_root.clone(),
                source,
            })?;
    if let Some(what) = sllm_format::small_files::not_a_folder(&storage_root) {
        return Err(DaemonError::StorageRootNotAFolder {
            path: cfg.storage_root.clone(),
            what,
        });
    }
    let backend = make_backend(&cfg)?;
    let (engine, engine_reason) = make_engine(cfg.io_engine, cfg.io_threads, cfg.queue_depth)?;
    let touch_threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let (pool_bytes, chunk_bytes) = (cfg.pool_bytes, cfg.chunk_bytes);
    let pool =
        tokio::task::spawn_blocking(move || HostPool::new(pool_bytes, chunk_bytes, touch_threads))
            .await
            .expect("the pool thread does not panic")?;
    let registering = Instant::now();
    backend.register_host_memory(&pool)?;
    if backend.kind() == BackendKind::Cuda {
        tracing::info!(
            seconds = registering.elapsed().as_secs_f64(),
            "pool page-locked for DMA"
        );
    }
    let hashers = HashPool::new(cfg.checksum_threads).map_err(DaemonError::Threads)?;
    let registry = Registry::new(
        RegistryConfig {
            storage_root: storage_root.clone(),
            registration_required: cfg.registration_required,
            max_io_bytes: cfg.max_io_bytes,
            verify_checksums: cfg.verify_checksums,
            limits: cfg.limits.clone(),
        },
        pool.clone(),
        engine,
        backend,
        hashers,
    );
    if let Some(port) = cfg.metrics_port {
        start_metrics(port, Arc::clone(&registry))?;
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<StorageServer<StorageService>>().await;
    let service = tonic::service::interceptor::InterceptedService::new(
        StorageServer::new(StorageService::new(
            Arc::clone(&registry),
            cfg.host_shm_dir.display().to_string(),
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES),
        crate::auth::Check::new(cfg.auth_token.clone()),
    );
    let router = Server::builder()
        .layer(TrackRequestsLayer)
        .add_service(health_service)
        .add_service(service);
    let signalled = Arc::new(tokio::sync::Notify::new());
    let shutdown = {
        let (registry, signalled) = (Arc::clone(&registry), Arc::clone(&signalled));
        async move {
            stop.await;
            tracing::info!("shutting down: no new requests, cancelling loads");
            registry.shutdown();
            health
                .set_not_serving::<StorageServer<StorageService>>()
                .await;
            signalled.notify_one();
        }
    };
    // Graceful shutdown waits for connections to close; a client that
    // holds an idle one open must not keep the daemon alive.
    let grace_over = async move {
        signalled.notified().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        tracing::warn!(
            "open connections or requests did not finish within {SHUTDOWN_GRACE:?}; stopping anyway"
        );
    };

    let ready = |listen: &Listen| {
        on_ready(listen);
        let b = registry.backend();
        tracing::info!(
            address = %listen,
            backend = %b.kind(),
            storage = %storage_root.display(),
            pool_bytes = pool.total_bytes(),
            "listening on {listen}: backend {} ({} device(s)), io engine {} ({engine_reason}), pool {} in {} chunks of {}{}, checksums {}, storage {}, started in {:.2} s",
            b.kind(),
            b.devices().len(),
            registry.engine_name(),
            human_bytes(pool.total_bytes() as u64),
            pool.total_chunks(),
            human_bytes(pool.chunk_bytes() as u64),
            if pool.backing().hugetlb {
                " (huge pages)"
            } else {
                ""
            },
            if cfg.verify_checksums {
                format!("checked on {} thread(s)", cfg.checksum_threads)
            } else {
                "not checked (--skip-checksums)".into()
            },
            storage_root.display(),
            started.elapsed().as_secs_f64()
        );
    };
    match &cfg.listen {
        Listen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| DaemonError::bind(&cfg.listen, e))?;
            let local = listener
                .local_addr()
                .map_err(|e| DaemonError::bind(&cfg.listen, e))?;
            ready(&Listen::Tcp(local));
            let incoming = incoming(listener, connections);
            tokio::select! {
                served = router.serve_with_incoming_shutdown(incoming, shutdown) => served?,
                () = grace_over => {}
            }
        }
        Listen::Unix(path) => {
            remove_stale_socket(path);
            let listener =
                bind_unix(path, cfg.socket_mode).map_err(|e| DaemonError::bind(&cfg.listen, e))?;
            ready(&cfg.listen);
            let incoming = incoming(listener, connections);
            let served = tokio::select! {
                served = router.serve_with_incoming_shutdown(incoming, shutdown) => served,
                () = grace_over => Ok(()),
            };
            let _ = std::fs::remove_file(path);
            served?;
        }
    }
    registry.clear();
    tracing::info!("stopped");
    Ok(())
}

fn make_backend(cfg: &DaemonConfig) -> Result<Arc<dyn DeviceBackend>, DaemonError> {
    let host = || -> Result<Arc<dyn DeviceBackend>, DaemonError> {
        Ok(Arc::new(HostBackend::new(
            cfg.host_devices,
            &cfg.host_shm_dir,
        )?))
    };
    match cfg.device {
        BackendChoice::Host => host(),
        BackendChoice::Cuda => Ok(Arc::new(
            CudaBackend::probe()
                .map_err(|e| {
                    DeviceError::Unavailable(format!(
                        "{e}; --device cuda needs an NVIDIA driver and a GPU (use --device host or auto)"
                    ))
                })?
                .with_copy_streams(cfg.copy_streams),
        )),
        BackendChoice::Auto => match CudaBackend::probe() {
            Ok(cuda) => Ok(Arc::new(cuda.with_copy_streams(cfg.copy_streams))),
            Err(e) => {
                tracing::info!(reason = %e, "no CUDA; serving host pseudo-devices");
                host()
            }
        },
    }
}

/// A listening unix socket at `path` with mode `mode`: bound, given its
/// mode, and only then listening, so no client connects through laxer
/// permissions in between.
fn bind_unix(path: &std::path::Path, mode: u32) -> std::io::Result<tokio::net::UnixListener> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
    let placed = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .and_then(|()| Ok(rustix::net::listen(&fd, 1024)?));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    tokio::net::UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
}

/// Raises the soft limit on open files to the hard one: every partition is
/// opened twice per load (direct and buffered) and every handle once.
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(error = %e, "could not raise the open-file limit");
        }
    }
}

/// A socket file left by a daemon that died: remove it if nothing answers.
fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
}

async fn wait_for_signal() {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the daemon");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn start_metrics(port: u16, registry: Arc<Registry>) -> Result<(), DaemonError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(SocketAddr::from(([127, 0, 0, 1], port)))
        .install()
        .map_err(|e| DaemonError::Metrics {
            port,
            reason: e.to_string(),
        })?;
    metrics::gauge!("sllm_pool_bytes").set(registry.pool().total_bytes() as f64);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            metrics::gauge!("sllm_pool_used_bytes").set(registry.pool_used_bytes() as f64);
            for (model, bytes) in registry.resident_bytes() {
                metrics::gauge!("sllm_model_resident_bytes", "model" => model).set(bytes as f64);
            }
        }
    });
    Ok(())
}
