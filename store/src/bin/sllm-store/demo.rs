//! `sllm-store demo`: the main job on a built-in example, no GPU and no
//! network needed. Generates a small Llama-shaped checkpoint, converts it,
//! verifies the store against its manifest and byte for byte against the
//! source, and prints the figures.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use sllm_store::format::verify::verify_model;
use sllm_store::format::{ModelId, WriterOptions};
use sllm_store::import::SourceCheckpoint;
use sllm_store::import::compare::compare_with_source;
use sllm_store::save::{SaveRequest, Source, save};
use sllm_store::synth::{SynthSpec, write_synthetic};
use sllm_store::units::{ByteSize, gib_per_s, human_bytes};

use crate::progress::TermProgress;

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

    let request = SaveRequest {
        model: model.clone(),
        source: Source::Local(source_dir.clone()),
        storage_root: storage.clone(),
        force: false,
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
    let ok = verified.is_ok() && differences.is_empty();
    println!("{}", if ok { "demo OK" } else { "demo FAILED" });
    Ok(ok)
}
