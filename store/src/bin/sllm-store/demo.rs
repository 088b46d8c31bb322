//! `sllm-store demo`: the main job on a built-in example, no GPU and no
//! network needed. Generates a small Llama-shaped checkpoint, converts it,
//! verifies the store against its manifest and byte for byte against the
//! source, starts the daemon (host backend, on a unix socket), loads the
//! model through it as an inference engine would, checks every byte that
//! arrived in the "device" buffers, and prints the figures.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use sllm_convert::import::SourceCheckpoint;
use sllm_convert::import::compare::compare_with_source;
use sllm_convert::save::{SaveRequest, Source, save};
use sllm_convert::synth::{SynthSpec, write_synthetic};
use sllm_format::units::{ByteSize, gib_per_s, human_bytes};
use sllm_format::verify::verify_model;
use sllm_format::{ModelId, WriterOptions};

use crate::progress::TermProgress;
use sllm_client::StoreClient;
use sllm_client::load::load_model;
use sllm_client::plan::Layout;
use sllm_daemon::daemon::{DaemonConfig, Listen, spawn};
use sllm_daemon::device::host::DEFAULT_SHM_DIR;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size of the generated checkpoint.
    #[arg(long, default_value = "64MiB")]
    size: ByteSize,
    /// Work directory [default: a new temporary directory, removed afterwards].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the work directory.
    #[arg(long)]
    keep: bool,
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let temp;
    let work = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new().prefix("sllm-demo-").tempdir()?;
            temp.path().to_owned()
        }
    };
    let outcome = demo(&work, args.size);
    if args.keep || args.dir.is_some() {
        println!("work directory kept: {}", work.display());
    } else if let Err(e) = std::fs::remove_dir_all(&work) {
        tracing::warn!(dir = %work.display(), error = %e, "could not remove the work directory");
    }
    outcome.map(|ok| {
        if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}

fn demo(work: &Path, size: ByteSize) -> anyhow::Result<bool> {
    let progress = TermProgress::new();
    let source_dir = work.join("checkpoint");
    let storage = work.join("models");
    let model = ModelId::parse("demo/llama-synthetic")?;

    let t = Instant::now();
    let spec = SynthSpec {
        target_bytes: size.bytes(),
        shards: 2,
        seed: 42,
    };
    let synth = write_synthetic(&source_dir, &spec).context("generating the demo checkpoint")?;
    let generate_s = t.elapsed().as_secs_f64();
    println!(
        "generated  {} tensors, {} in {} safetensors shards ({generate_s:.2} s) -> {}",
        synth.tensors,
        human_bytes(synth.tensor_bytes),
        synth.weight_files.len(),
        source_dir.display()
    );
    if synth.tensor_bytes > size.bytes().saturating_mul(2) {
        println!(
            "           (--size {size} is below the smallest model the generator makes: one of each layer)"
        );
    }

    let request = SaveRequest {
        model: model.clone(),
        source: Source::Local(source_dir.clone()),
        storage_root: storage.clone(),
        // A second demo in the same --dir replaces the first one's model
        // (a folder there that is not a stored model is still refused).
        force: true,
        writer: WriterOptions::default(),
    };
    let report = save(&request, &progress)?;
    let bytes = report.written.tensor_bytes;
    println!(
        "saved      {} tensors in {} partition(s), {:.2} s, {:.2} GiB/s -> {}",
        report.written.tensors,
        report.written.partitions,
        report.seconds,
        gib_per_s(bytes, report.seconds),
        report.target.display()
    );

    let t = Instant::now();
    let verified = verify_model(&report.target, &progress)?;
    let verify_s = t.elapsed().as_secs_f64();
    println!(
        "verified   {} checksum blocks, {} problem(s), {verify_s:.2} s, {:.2} GiB/s",
        verified.blocks_checked,
        verified.problems.len(),
        gib_per_s(verified.total_bytes, verify_s)
    );

    let t = Instant::now();
    let checkpoint = SourceCheckpoint::open(&source_dir)?;
    let differences = compare_with_source(&report.target, &checkpoint, &progress)?;
    let compare_s = t.elapsed().as_secs_f64();
    println!(
        "compared   every tensor with the source: {} difference(s), {compare_s:.2} s",
        differences.len()
    );
    for problem in verified.problems.iter().chain(&differences) {
        println!("problem: {problem}");
    }
    let loaded = serve_and_load(work, &storage, &model, report.written.total_bytes)?;
    let ok = verified.is_ok() && differences.is_empty() && loaded;
    println!("{}", if ok { "demo OK" } else { "demo FAILED" });
    Ok(ok)
}

/// Starts the daemon in this process, loads `model` through it with the
/// same code as `sllm-store load --verify`, prints the phases, stops it.
fn serve_and_load(
    work: &Path,
    storage: &Path,
    model: &ModelId,
    model_bytes: u64,
) -> anyhow::Result<bool> {
    let socket = work.join("sllm-store.sock");
    let shm_dir = if Path::new(DEFAULT_SHM_DIR).is_dir() {
        PathBuf::from(DEFAULT_SHM_DIR)
    } else {
        work.to_owned()
    };
    let chunk_bytes = 8usize << 20;
    let cfg = DaemonConfig {
        io_threads: 4,
        queue_depth: 64,
        max_io_bytes: 4 << 20,
        checksum_threads: 2,
        ..DaemonConfig::host(
            storage.to_owned(),
            Listen::Unix(socket.clone()),
            shm_dir,
            (model_bytes as usize).next_multiple_of(chunk_bytes) + 2 * chunk_bytes,
            chunk_bytes,
        )
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let daemon = runtime.block_on(async { spawn(cfg) });
    let outcome = runtime.block_on(async {
        daemon.ready.await.context("the daemon did not start")?;
        let ready_s = started.elapsed().as_secs_f64();
        let mut client = StoreClient::connect(&format!("unix:{}", socket.display())).await?;
        let config = client.server_config().await?;
        println!(
            "daemon     ready in {ready_s:.2} s on unix:{} ({} backend, {} engine, pool {})",
            socket.display(),
            config.device_backend,
            config.io_engine,
            human_bytes(config.mem_pool_size)
        );
        let report = load_model(
            &mut client,
            &config,
            model,
            &model.dir_in(storage),
            Layout::Mirrored,
            true,
        )
        .await?;
        println!(
            "loaded     {} tensors, {} through the daemon:",
            report.tensors,
            human_bytes(report.bytes)
        );
        print!("{}", report.phases());
        anyhow::Ok(report.verified == Some(true))
    });
    let _ = daemon.stop.send(());
    runtime.block_on(daemon.task).context("the daemon task")??;
    outcome
}
