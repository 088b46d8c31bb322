//! `sllm-store load`: loads a stored model through a running daemon, the
//! way an inference engine would (register, host, devices, confirm), and
//! reports each phase; `--verify` reads the device buffers back and compares
//! them with the files.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use sllm_client::load::load_model;
use sllm_client::plan::Layout;
use sllm_client::proto::BackendKind;
use sllm_client::{StoreClient, client::DEFAULT_ADDR};
use sllm_format::ModelId;
use sllm_format::config::resolve_client_storage_path;
use sllm_format::units::human_bytes;

use crate::DeviceArg;

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
    /// Where models are stored (to read the tensor index) [default: $STORAGE_PATH, else the
    /// daemon's when it runs on this host, else ~/models].
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
    pub json: bool,
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
    let mut client = StoreClient::connect(&args.server).await?;
    let config = client.server_config().await?;
    let daemon_says =
        Some(std::path::Path::new(&config.storage_path)).filter(|p| !p.as_os_str().is_empty());
    let storage = resolve_client_storage_path(args.storage_path.as_deref(), daemon_says);
    if let Some(daemon_dir) = daemon_says
        && !same_dir(&storage, daemon_dir)
    {
        eprintln!(
            "warning: the daemon serves models from {}, but this load reads the tensor index \
             from {} (--storage-path or $STORAGE_PATH); unless they hold the same models, pass \
             --storage-path {} or leave it out",
            daemon_dir.display(),
            storage.display(),
            daemon_dir.display()
        );
    }
    let model_dir = model.dir_in(&storage);
    match (args.device, config.device_backend) {
        (DeviceArg::Host | DeviceArg::Auto, BackendKind::Host)
        | (DeviceArg::Cuda | DeviceArg::Auto, BackendKind::Cuda) => {}
        (wanted, served) => {
            let wanted = if wanted == DeviceArg::Cuda {
                "cuda"
            } else {
                "host"
            };
            bail!(
                "the daemon at {} serves {} devices, but --device {wanted} was asked for; \
                 restart the daemon with --device {wanted}, or load with --device {}",
                args.server,
                served.as_str(),
                served.as_str()
            )
        }
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
    for problem in &r.problems {
        eprintln!("{problem}");
    }
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
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

/// Whether `a` and `b` are one folder, as far as this host can tell: the
/// same device and inode, or (where `b` does not exist here, as for a daemon
/// in a container) the same path.
fn same_dir(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        (_, Err(_)) => true,
        (Err(_), Ok(_)) => a == b,
    }
}
