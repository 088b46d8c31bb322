//! `sllm-store start`: flags and environment -> [`DaemonConfig`] -> daemon.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use crate::{DeviceArg, EngineArg};
use anyhow::{Context, bail};
use clap::Args;
use sllm_daemon::daemon::{DaemonConfig, Listen, run};
use sllm_daemon::device::host::DEFAULT_SHM_DIR;
use sllm_daemon::listener::DEFAULT_MAX_CONNECTIONS;
use sllm_daemon::registry::Limits;
use sllm_format::config::resolve_storage_path;
use sllm_format::units::ByteSize;

/// Flags of `start`, as ServerlessLLM's CLI spells them, plus ours.
#[derive(Args, Debug)]
pub struct StartArgs {
    /// Address to listen on (an IP address, or localhost). Loopback by default: ServerlessLLM
    /// listens on 0.0.0.0, but without --auth-token-file anyone who reaches the port may load
    /// models, so pass --host 0.0.0.0 only on a trusted network or with a token.
    #[arg(long, default_value = "127.0.0.1", value_parser = parse_host)]
    host: IpAddr,
    /// Port to listen on (0 picks a free one; the ready line says which).
    #[arg(long, default_value_t = 8073)]
    port: u16,
    /// Listen on a unix socket instead, e.g. `unix:/run/sllm-store.sock`.
    #[arg(long)]
    listen: Option<String>,
    /// Most client connections open at once. At the limit, the connection idle longest (no
    /// request for a second or more) is closed to let a new one in; gRPC clients reconnect on
    /// their next call. Lowered at start-up to what the open-file limit leaves after a reserve.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Where models are stored [default: $STORAGE_PATH, else ~/models].
    #[arg(long)]
    storage_path: Option<PathBuf>,
    /// I/O threads (pread engine) .
    #[arg(long, env = "SLLM_NUM_THREAD", default_value_t = 4)]
    num_thread: usize,
    /// Pool chunk size, a multiple of 4KiB (32MB = 32 MiB, as in ServerlessLLM).
    #[arg(long, env = "SLLM_CHUNK_SIZE", default_value = "32MB")]
    chunk_size: ByteSize,
    /// Host memory pool size.
    #[arg(long, env = "MEM_POOL_SIZE", default_value = "4GB")]
    mem_pool_size: ByteSize,
    /// Refuse to load models that were not registered with RegisterModel first.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
    registration_required: bool,
    /// Device backend: `cuda`, `host` (shared-memory pseudo-devices), or `auto`.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Host backend: number of pseudo-devices.
    #[arg(long, default_value_t = 1)]
    host_devices: usize,
    /// Host backend: the directory the shared-memory files behind handles must be in.
    #[arg(long, default_value = DEFAULT_SHM_DIR)]
    host_shm_dir: PathBuf,
    /// I/O engine: `io_uring`, `pread`, or `auto` (io_uring where the kernel allows it).
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    io_engine: EngineArg,
    /// io_uring: reads in flight.
    #[arg(long, default_value_t = 64)]
    queue_depth: u32,
    /// Largest single read.
    #[arg(long, default_value = "4MiB")]
    io_size: ByteSize,
    /// Serve Prometheus metrics on 127.0.0.1:<port>/metrics.
    #[arg(long)]
    metrics_port: Option<u16>,
    /// Don't check bytes read from disk against the checksums in sllm_manifest.json, nor the
    /// index against the manifest (checked by default; `sllm-bench load` reports the cost).
    #[arg(long)]
    skip_checksums: bool,
    /// Threads that checksum blocks as they are read [default: the CPUs, at most 8].
    #[arg(long)]
    checksum_threads: Option<usize>,
    /// A model larger than the pool streams through it to the devices that load it; this long
    /// (seconds) its ring waits for a device request before the load fails and frees the pool.
    #[arg(long, default_value_t = 120)]
    stream_drain_timeout: u64,
    /// Require this token (the file's first line) on every storage call, as gRPC metadata
    /// `authorization: Bearer <token>`; the file must be private (chmod 600). Clients send
    /// $SLLM_STORE_TOKEN, or the token in the file $SLLM_STORE_TOKEN_FILE names. Health
    /// checks stay open.
    #[arg(long, env = "SLLM_STORE_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// Mode of the unix socket (`--listen unix:<path>`), in octal: 600 lets only this user
    /// connect, 660 its group too.
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
    /// CUDA: streams each request's chunks are spread over, round robin (1 to 8).
    #[arg(long, default_value_t = 1)]
    copy_streams: usize,
}

pub fn run_start(args: StartArgs) -> anyhow::Result<ExitCode> {
    let listen = match &args.listen {
        Some(spec) => match spec.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Listen::Unix(PathBuf::from(path)),
            _ => bail!(
                "--listen takes unix:<path>, e.g. unix:/run/sllm-store.sock (for TCP use --host and --port)"
            ),
        },
        None => Listen::Tcp(SocketAddr::new(args.host, args.port)),
    };
    if args.max_connections == 0 || args.max_connections > 1 << 20 {
        bail!(
            "--max-connections must be between 1 and 1048576, got {}",
            args.max_connections
        );
    }
    if args.num_thread == 0 || args.num_thread > 256 {
        bail!(
            "--num-thread must be between 1 and 256, got {}",
            args.num_thread
        );
    }
    if args.queue_depth == 0 || args.queue_depth > 4096 {
        bail!(
            "--queue-depth must be between 1 and 4096, got {}",
            args.queue_depth
        );
    }
    let io_size = args.io_size.bytes();
    if io_size < 4096 || !io_size.is_multiple_of(4096) || io_size > 1 << 30 {
        bail!(
            "--io-size must be a multiple of 4KiB up to 1GiB, got {}",
            args.io_size
        );
    }
    let checksum_threads = match args.checksum_threads {
        Some(n) if (1..=256).contains(&n) => n,
        Some(n) => bail!("--checksum-threads must be between 1 and 256, got {n}"),
        None => std::thread::available_parallelism().map_or(2, |n| n.get().min(8)),
    };
    if !(1..=sllm_daemon::device::cuda::MAX_COPY_STREAMS).contains(&args.copy_streams) {
        bail!(
            "--copy-streams must be between 1 and {}, got {}",
            sllm_daemon::device::cuda::MAX_COPY_STREAMS,
            args.copy_streams
        );
    }
    let storage_root = resolve_storage_path(args.storage_path.as_deref());
    if let Some(warning) = sllm_doctor::storage::os_disk_warning(&storage_root) {
        tracing::warn!("{warning}");
    }
    let cfg = DaemonConfig {
        storage_root,
        listen,
        max_connections: args.max_connections,
        io_threads: args.num_thread,
        chunk_bytes: usize::try_from(args.chunk_size.bytes()).context("--chunk-size")?,
        pool_bytes: usize::try_from(args.mem_pool_size.bytes()).context("--mem-pool-size")?,
        registration_required: args.registration_required,
        device: args.device.into(),
        host_devices: args.host_devices.clamp(1, 64),
        host_shm_dir: args.host_shm_dir,
        io_engine: args.io_engine.into(),
        queue_depth: args.queue_depth,
        max_io_bytes: io_size as usize,
        metrics_port: args.metrics_port,
        verify_checksums: !args.skip_checksums,
        checksum_threads,
        copy_streams: args.copy_streams,
        socket_mode: args.socket_mode,
        auth_token: args
            .auth_token_file
            .as_deref()
            .map(sllm_daemon::auth::Token::read_file)
            .transpose()?,
        limits: Limits {
            stream_drain_timeout: std::time::Duration::from_secs(args.stream_drain_timeout.max(1)),
            ..Limits::default()
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("sllm-rpc")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(cfg))?;
    Ok(ExitCode::SUCCESS)
}

/// `--host`: an IP address, or `localhost` (the IPv4 loopback).
fn parse_host(text: &str) -> Result<IpAddr, String> {
    if text.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::from([127, 0, 0, 1]));
    }
    text.parse().map_err(|_| {
        format!(
            "{text:?} is not an IP address; --host takes one (127.0.0.1 for this host only, \
             0.0.0.0 for every interface); host names other than localhost are not resolved"
        )
    })
}

/// An octal file mode, e.g. `600`, of permission bits only.
fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{text:?} is not an octal mode such as 600 or 660"))
}
