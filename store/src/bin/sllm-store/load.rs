//! `sllm-store load`: loads a stored model through a running daemon, the
//! way an inference engine would (register, host, devices, confirm), and
//! reports each phase; `--verify` reads the device buffers back and compares
//! them with the files.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use sllm_client::proto::BackendKind;

use crate::DeviceArg;
use sllm_client::cuda::{CudaBuffer, CudaDevice};
use sllm_client::plan::{DeviceMap, Layout, LoadPlan, plan};
use sllm_client::shm::ShmBuffer;
use sllm_client::{ServerConfig, StoreClient, client::DEFAULT_ADDR};
use sllm_format::config::resolve_storage_path;
use sllm_format::partitions::{FileStamp, Partitions};
use sllm_format::units::{gib_per_s, human_bytes};
use sllm_format::{INDEX_FILE, ModelId, TensorIndex};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LayoutArg {
    Mirrored,
    Packed,
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Model id under the storage path, e.g. `org/name`.
    #[arg(long)]
    model: String,
    /// The daemon: host:port or unix:<path>.
    #[arg(long, env = "SLLM_STORE_ADDR", default_value = DEFAULT_ADDR)]
    server: String,
    /// Where models are stored (to read the tensor index) [default: $STORAGE_PATH, else ~/models].
    #[arg(long)]
    storage_path: Option<PathBuf>,
    /// Device kind to load into; `auto` takes what the daemon serves.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Buffer layout: like the file (few large copies) or packed (ServerlessLLM's).
    #[arg(long, value_enum, default_value_t = LayoutArg::Mirrored)]
    layout: LayoutArg,
    /// Read the loaded bytes back and compare them with the files.
    #[arg(long)]
    verify: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run_load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(load(args))
}

async fn load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let model = ModelId::parse(&args.model)?;
    let model_dir = model.dir_in(&resolve_storage_path(args.storage_path.as_deref()));
    let mut client = StoreClient::connect(&args.server).await?;
    let config = client.server_config().await?;
    match (args.device, config.device_backend) {
        (DeviceArg::Host | DeviceArg::Auto, BackendKind::Host)
        | (DeviceArg::Cuda | DeviceArg::Auto, BackendKind::Cuda) => {}
        (wanted, served) => bail!(
            "the daemon at {} serves {served:?} devices, not {wanted:?}; restart it with --device {}",
            args.server,
            format!("{wanted:?}").to_lowercase()
        ),
    }
    let layout = match args.layout {
        LayoutArg::Mirrored => Layout::Mirrored,
        LayoutArg::Packed => Layout::Packed,
    };
    let r = load_model(
        &mut client,
        &config,
        &model,
        &model_dir,
        layout,
        args.verify,
    )
    .await?;
    if args.json {
        let out = serde_json::json!({
            "model": model.as_str(),
            "bytes": r.bytes,
            "model_size": r.model_size,
            "tensors": r.tensors,
            "backend": config.device_backend.as_str(),
            "io_engine": config.io_engine,
            "layout": format!("{:?}", args.layout).to_lowercase(),
            "register_s": r.register_s,
            "host_load_s": r.host_load_s,
            "device_copy_s": r.device_copy_s,
            "total_s": r.total_s,
            "gib_per_s": gib_per_s(r.bytes, r.total_s),
            "verified": r.verified,
        });
        println!("{out}");
    } else {
        println!(
            "loaded {} ({} tensors, {}) via {} backend, {} engine",
            model,
            r.tensors,
            human_bytes(r.bytes),
            config.device_backend,
            config.io_engine
        );
        print!("{}", r.phases());
    }
    Ok(if r.verified == Some(false) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// What one load through the daemon took.
pub struct LoadReport {
    pub bytes: u64,
    pub model_size: u64,
    pub tensors: usize,
    pub register_s: f64,
    pub host_load_s: f64,
    pub device_copy_s: f64,
    pub total_s: f64,
    pub verified: Option<bool>,
}

impl LoadReport {
    /// The phases, one per line, for people.
    pub fn phases(&self) -> String {
        let mut out = format!(
            "  register     {:>8.3} s\n  host load    {:>8.3} s  {:>7.2} GiB/s  (in the daemon)\n  \
             device copy  {:>8.3} s  {:>7.2} GiB/s  (overlaps the host load)\n  total        {:>8.3} s  {:>7.2} GiB/s\n",
            self.register_s,
            self.host_load_s,
            gib_per_s(self.model_size, self.host_load_s),
            self.device_copy_s,
            gib_per_s(self.bytes, self.device_copy_s),
            self.total_s,
            gib_per_s(self.bytes, self.total_s),
        );
        if let Some(ok) = self.verified {
            out += &format!(
                "  verified     {}\n",
                if ok {
                    "every tensor matches the files"
                } else {
                    "MISMATCH"
                }
            );
        }
        out
    }
}

/// Device buffers of either backend.
enum Buffers<'d> {
    Shm(Vec<ShmBuffer>),
    Cuda(Vec<CudaBuffer<'d>>),
}

impl Buffers<'_> {
    fn handle(&self, i: usize) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            Buffers::Shm(b) => b[i].handle(),
            Buffers::Cuda(b) => b[i].ipc_handle()?,
        })
    }

    fn read_at(&self, i: usize, buf: &mut [u8], offset: u64) -> anyhow::Result<()> {
        match self {
            Buffers::Shm(b) => b[i].read_at(buf, offset)?,
            Buffers::Cuda(b) => b[i].read_at(buf, offset)?,
        }
        Ok(())
    }
}

/// Loads `model` through `client` onto the first device the daemon serves
/// (a shared-memory buffer for the host backend, GPU memory shared by IPC
/// handle for CUDA), the way an inference engine would: register, load to
/// host, load to the device, confirm; optionally reads the buffer back and
/// compares it with the files.
pub async fn load_model(
    client: &mut StoreClient,
    config: &ServerConfig,
    model: &ModelId,
    model_dir: &std::path::Path,
    layout: Layout,
    verify_bytes: bool,
) -> anyhow::Result<LoadReport> {
    let device = config
        .device_uuids
        .first()
        .context("the daemon serves no devices")?
        .clone();
    let total = Instant::now();
    let t = Instant::now();
    let model_size = client.register(model.as_str()).await?;
    let register_s = t.elapsed().as_secs_f64();

    let index_stamp = || {
        std::fs::metadata(model_dir.join(INDEX_FILE))
            .ok()
            .map(|m| FileStamp::of(&m))
    };
    let stamp_before = index_stamp();
    let index = TensorIndex::read(model_dir).context(
        "reading the model's index: pass --storage-path pointing at the daemon's storage path",
    )?;
    let plan = plan(&index, &DeviceMap::single(&device), layout)?;
    let gpus: Vec<CudaDevice> = if config.device_backend == BackendKind::Cuda {
        plan.buffers
            .iter()
            .map(|b| CudaDevice::by_uuid(&b.uuid))
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let buffers = if config.device_backend == BackendKind::Cuda {
        Buffers::Cuda(
            plan.buffers
                .iter()
                .zip(&gpus)
                .map(|(b, gpu)| gpu.alloc(b.size_bytes))
                .collect::<Result<_, _>>()?,
        )
    } else {
        let shm_dir = PathBuf::from(&config.host_shm_dir);
        Buffers::Shm(
            plan.buffers
                .iter()
                .map(|b| ShmBuffer::create(&shm_dir, b.size_bytes))
                .collect::<Result<_, _>>()
                .with_context(|| {
                    format!("allocating host-backend buffers in {}", shm_dir.display())
                })?,
        )
    };

    client.load_to_host(model.as_str()).await?;
    let copy_started = Instant::now();
    let replica = uuid::Uuid::new_v4().to_string();
    let handles = plan
        .buffers
        .iter()
        .enumerate()
        .map(|(i, b)| Ok((b.uuid.clone(), vec![buffers.handle(i)?])))
        .collect::<anyhow::Result<_>>()?;
    let bytes = plan.copy_bytes();
    if bytes > 0 {
        client
            .load_to_devices(model.as_str(), &replica, plan.copies_by_device(), handles)
            .await?;
        client.confirm(model.as_str(), &replica).await?;
    }
    let device_copy_s = copy_started.elapsed().as_secs_f64();
    // The daemon served the files on disk when asked: with the index the same
    // file throughout, the bytes belong to the index the plan was made from.
    if index_stamp() != stamp_before {
        bail!(
            "{model} changed on disk during the load (a `sllm-store save --force`?); the bytes \
             may not match the index read before it: load it again"
        );
    }
    let total_s = total.elapsed().as_secs_f64();
    let host_load_s = client.model_status(model.as_str()).await?.host_load_seconds;
    let verified = if verify_bytes {
        Some(verify(model_dir, &index, &plan, &buffers)?)
    } else {
        None
    };
    Ok(LoadReport {
        bytes,
        model_size,
        tensors: index.len(),
        register_s,
        host_load_s,
        device_copy_s,
        total_s,
        verified,
    })
}

/// Compares every tensor in the buffers with its bytes in the partitions,
/// and the partitions with their manifest's checksums: bytes that match
/// damaged files are not verified.
fn verify(
    model_dir: &std::path::Path,
    index: &TensorIndex,
    plan: &LoadPlan,
    buffers: &Buffers<'_>,
) -> anyhow::Result<bool> {
    let parts = Partitions::discover(model_dir)?;
    let mut open = Vec::new();
    let mut ok = true;
    for (name, e) in index.iter() {
        let place = &plan.tensors[name];
        let buffer = plan
            .buffers
            .iter()
            .position(|b| b.uuid == place.device)
            .context("a planned device has no buffer")?;
        let mut expected = vec![0u8; e.size as usize];
        let mut loaded = vec![0u8; e.size as usize];
        parts.read_exact_at(&mut open, e.offset, &mut expected)?;
        buffers.read_at(buffer, &mut loaded, place.offset)?;
        if expected != loaded {
            eprintln!(
                "mismatch: tensor {name:?} differs from {}",
                model_dir.display()
            );
            ok = false;
        }
    }
    let report = sllm_format::verify::verify_model(model_dir, &())?;
    for problem in &report.problems {
        eprintln!("damaged: {problem}");
    }
    Ok(ok && report.is_ok())
}
