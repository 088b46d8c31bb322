//! `sllm-store save`: flags -> [`sllm_convert::save::SaveRequest`] -> summary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{Context, bail};
use clap::Args;
use sllm_convert::import::hf_cache::HfCache;
use sllm_convert::save::{SaveError, SaveReport, SaveRequest, Source, save_unless};
use sllm_format::config::resolve_storage_path;
use sllm_format::units::{ByteSize, gib_per_s, human_bytes};
use sllm_format::writer::{DEFAULT_ALIGNMENT_BYTES, DEFAULT_PARTITION_LIMIT_BYTES};
use sllm_format::{ModelId, WriterOptions};

use crate::progress::TermProgress;

/// Flags of `save`, as ServerlessLLM's CLI spells them.
#[derive(Args, Debug)]
pub struct SaveArgs {
    /// Model id, e.g. `meta-llama/Llama-3.1-8B-Instruct`: where the model is stored under the
    /// storage path, and the repo looked up in the Hugging Face cache.
    #[arg(long)]
    model: String,
    /// Hugging Face revision: a commit hash (or a unique prefix of one) or a ref such as `main`
    /// or `refs/main` (cache only) [default: main].
    #[arg(long)]
    revision: Option<String>,
    /// Convert this directory of *.safetensors instead of looking in the Hugging Face cache.
    #[arg(long)]
    local_model_path: Option<PathBuf>,
    /// Where models are stored [default: $STORAGE_PATH, else ~/models].
    #[arg(long)]
    storage_path: Option<PathBuf>,
    /// Tensor naming: `transformers` keeps the checkpoint's names (the only one supported).
    #[arg(long, default_value = "transformers")]
    backend: String,
    /// Replace a model already stored under this id (atomically).
    #[arg(long)]
    force: bool,
    /// Largest partition file; a new `tensor.data_<i>` starts past it.
    #[arg(long, default_value_t = ByteSize(DEFAULT_PARTITION_LIMIT_BYTES))]
    partition_size: ByteSize,
    /// Alignment of each tensor's record (a power of two, at least 256 bytes).
    #[arg(long, default_value_t = ByteSize(DEFAULT_ALIGNMENT_BYTES), hide = true)]
    alignment: ByteSize,
}

pub fn run(args: SaveArgs) -> anyhow::Result<ExitCode> {
    if args.backend != "transformers" {
        bail!(
            "--backend {:?} is not supported; this version converts with --backend transformers \
             (tensor names as in the checkpoint), which vLLM's serverless_llm loader also reads",
            args.backend
        );
    }
    let model = ModelId::parse(&args.model)?;
    let source = match args.local_model_path {
        Some(dir) => {
            if let Some(revision) = &args.revision {
                bail!(
                    "--revision {revision} picks a snapshot in the Hugging Face cache, and \
                     --local-model-path {} is a folder, which has no revisions: pass one of them",
                    dir.display()
                );
            }
            Source::Local(dir)
        }
        None => Source::HfCache {
            cache: HfCache::from_env(),
            revision: args.revision.unwrap_or_else(|| "main".into()),
        },
    };
    let request = SaveRequest {
        model: model.clone(),
        source,
        storage_root: resolve_storage_path(args.storage_path.as_deref()),
        force: args.force,
        writer: WriterOptions {
            partition_limit_bytes: args.partition_size.bytes(),
            alignment_bytes: args.alignment.bytes(),
            ..WriterOptions::default()
        },
    };
    let signals = Signals::watch()?;
    // Said once the save has passed its checks and begins to copy.
    let progress = TermProgress::warning_at_start(sllm_doctor::storage::os_disk_warning(
        &request.storage_root,
    ));
    let report = match save_unless(&request, &progress, &signals.cancel) {
        Ok(report) => report,
        Err(error @ SaveError::Interrupted { .. }) => {
            return Err(Interrupted {
                error,
                exit_code: signals.exit_code(),
            }
            .into());
        }
        Err(e) => return Err(e.into()),
    };
    println!("{}", summary(&model, &report));
    // vLLM could not start from the stored model's folder (for one rank of
    // the vLLM layout, the folder above): said, not a failure.
    if let Some(warning) = sllm_doctor::model::unservable_warning(&report.target) {
        eprintln!("warning: {warning}");
    }
    Ok(ExitCode::SUCCESS)
}

fn summary(model: &ModelId, r: &SaveReport) -> String {
    let w = &r.written;
    format!(
        "saved {model}: {} tensors, {} in {} partition(s), {} other file(s), {:.2} s, {:.2} GiB/s -> {}{}{}",
        w.tensors,
        human_bytes(w.tensor_bytes),
        w.partitions,
        r.extra_files,
        r.seconds,
        gib_per_s(w.tensor_bytes, r.seconds),
        r.target.display(),
        r.commit
            .as_ref()
            .map(|c| format!(" (snapshot {c})"))
            .unwrap_or_default(),
        if r.replaced {
            " (replaced the previous copy)"
        } else {
            ""
        },
    )
}

/// A save stopped by a signal: the error, and the exit code a shell expects
/// (128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM).
#[derive(Debug)]
pub struct Interrupted {
    error: SaveError,
    pub exit_code: u8,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for Interrupted {}

/// SIGINT (Ctrl-C) and SIGTERM, watched so that an interrupted save removes
/// its partial copy (which can be as large as the model) instead of leaving
/// it for the next save to find. A second signal exits at once, for a save
/// stuck where it cannot look at the flag.
struct Signals {
    cancel: Arc<AtomicBool>,
    /// The number of the signal that set `cancel`.
    which: Arc<AtomicUsize>,
}

impl Signals {
    fn watch() -> anyhow::Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        use signal_hook::flag;
        let signals = Self {
            cancel: Arc::new(AtomicBool::new(false)),
            which: Arc::new(AtomicUsize::new(SIGINT as usize)),
        };
        for signal in [SIGINT, SIGTERM] {
            // Registered first, so it sees the flag as it was before this
            // signal: set only by an earlier one.
            flag::register_conditional_shutdown(signal, 128 + signal, Arc::clone(&signals.cancel))
                .context("watching for Ctrl-C")?;
            flag::register_usize(signal, Arc::clone(&signals.which), signal as usize)
                .context("watching for Ctrl-C")?;
            flag::register(signal, Arc::clone(&signals.cancel)).context("watching for Ctrl-C")?;
        }
        Ok(signals)
    }

    /// 128 + the number of the signal that stopped the save.
    fn exit_code(&self) -> u8 {
        u8::try_from(128 + self.which.load(Ordering::Relaxed)).unwrap_or(u8::MAX)
    }
}
