//! `sllm-store load`: loads a stored model through a running daemon, the
//! way an inference engine would (register, host, devices, confirm), and
//! reports each phase; `--verify` reads the device buffers back and compares
//! them with the files.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use sllm_client::plan::{DeviceMap, Layout, LoadPlan, plan};
use sllm_client::shm::ShmBuffer;
use sllm_client::{StoreClient, client::DEFAULT_ADDR};
use sllm_store::config::resolve_storage_path;
use sllm_store::format::partitions::Partitions;
use sllm_store::format::{ModelId, TensorIndex};
use sllm_store::units::{gib_per_s, human_bytes};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    Auto,
    Host,
    Cuda,
}

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
    match (args.device, config.device_backend.as_str()) {
        (DeviceArg::Host | DeviceArg::Auto, "host") => {}
        (DeviceArg::Auto | DeviceArg::Cuda, "cuda") => {
            bail!(
                "loading into CUDA memory from this command is not built yet; use the Python client"
            )
        }
        (wanted, served) => bail!(
            "the daemon at {} serves {served:?} devices, not {wanted:?}; restart it with --device {}",
            args.server,
            format!("{wanted:?}").to_lowercase()
        ),
    }
    let device = config
        .device_uuids
        .first()
        .context("the daemon serves no devices")?
        .clone();

    let total = Instant::now();
    let t = Instant::now();
    let size = client.register(model.as_str()).await?;
    let register_s = t.elapsed().as_secs_f64();

    let index = TensorIndex::read(&model_dir).with_context(|| {
        "reading the model's index: pass --storage-path pointing at the daemon's storage path"
            .to_string()
    })?;
    let layout = match args.layout {
        LayoutArg::Mirrored => Layout::Mirrored,
        LayoutArg::Packed => Layout::Packed,
    };
    let plan = plan(&index, &DeviceMap::single(&device), layout)?;
    let shm_dir = PathBuf::from(&config.host_shm_dir);
    let buffers: Vec<ShmBuffer> = plan
        .buffers
        .iter()
        .map(|b| ShmBuffer::create(&shm_dir, b.size_bytes))
        .collect::<Result<_, _>>()
        .with_context(|| format!("allocating host-backend buffers in {}", shm_dir.display()))?;

    client.load_to_host(model.as_str()).await?;
    let copy_started = Instant::now();
    let replica = uuid::Uuid::new_v4().to_string();
    let handles = plan
        .buffers
        .iter()
        .zip(&buffers)
        .map(|(b, shm)| (b.uuid.clone(), vec![shm.handle()]))
        .collect();
    let bytes = plan.copy_bytes();
    if bytes > 0 {
        client
            .load_to_devices(model.as_str(), &replica, plan.copies_by_device(), handles)
            .await?;
        client.confirm(model.as_str(), &replica).await?;
    }
    let device_copy_s = copy_started.elapsed().as_secs_f64();
    let total_s = total.elapsed().as_secs_f64();
    let status = client.model_status(model.as_str()).await?;
    let host_load_s = status.host_load_seconds;

    let verified = if args.verify {
        Some(verify(&model_dir, &index, &plan, &buffers)?)
    } else {
        None
    };
    let gib_s = gib_per_s(bytes, total_s);
    if args.json {
        let out = serde_json::json!({
            "model": model.as_str(),
            "bytes": bytes,
            "model_size": size,
            "tensors": index.len(),
            "backend": config.device_backend,
            "io_engine": config.io_engine,
            "layout": format!("{:?}", args.layout).to_lowercase(),
            "register_s": register_s,
            "host_load_s": host_load_s,
            "device_copy_s": device_copy_s,
            "total_s": total_s,
            "gib_per_s": gib_s,
            "verified": verified,
        });
        println!("{out}");
    } else {
        println!(
            "loaded {} ({} tensors, {}) via {} backend, {} engine",
            model,
            index.len(),
            human_bytes(bytes),
            config.device_backend,
            config.io_engine
        );
        println!("  register     {register_s:>8.3} s");
        println!(
            "  host load    {host_load_s:>8.3} s  {:>7.2} GiB/s  (in the daemon)",
            gib_per_s(size, host_load_s)
        );
        println!(
            "  device copy  {device_copy_s:>8.3} s  {:>7.2} GiB/s  (overlaps the host load)",
            gib_per_s(bytes, device_copy_s)
        );
        println!("  total        {total_s:>8.3} s  {gib_s:>7.2} GiB/s");
        if let Some(ok) = verified {
            println!(
                "  verified     {}",
                if ok {
                    "every tensor matches the files"
                } else {
                    "MISMATCH"
                }
            );
        }
    }
    Ok(if verified == Some(false) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Compares every tensor in the buffers with its bytes in the partitions.
fn verify(
    model_dir: &std::path::Path,
    index: &TensorIndex,
    plan: &LoadPlan,
    buffers: &[ShmBuffer],
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
            .map(|i| &buffers[i])
            .context("a planned device has no buffer")?;
        let mut expected = vec![0u8; e.size as usize];
        let mut loaded = vec![0u8; e.size as usize];
        parts.read_exact_at(&mut open, e.offset, &mut expected)?;
        buffer.read_at(&mut loaded, place.offset)?;
        if expected != loaded {
            eprintln!(
                "mismatch: tensor {name:?} differs from {}",
                model_dir.display()
            );
            ok = false;
        }
    }
    Ok(ok)
}
