//! The benchmarks' inputs: a synthetic safetensors checkpoint of a given
//! size, and the same checkpoint converted into the store format, each made
//! once and reused by later runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use sllm_convert::synth::{SynthSpec, write_synthetic};
use sllm_format::units::ByteSize;

use crate::cache::files_under;

/// Marker written last, so a generation cut short is redone.
const COMPLETE: &str = ".complete";

/// Generates a safetensors checkpoint of about `size` bytes in `dir` unless
/// a complete one is there; returns its total size in bytes.
pub fn ensure_checkpoint(dir: &Path, size: u64) -> anyhow::Result<u64> {
    if !dir.join(COMPLETE).exists() {
        let _ = std::fs::remove_dir_all(dir);
        tracing::info!(dir = %dir.display(), size, "generating the checkpoint");
        let shards = (size >> 32).max(2) as usize;
        write_synthetic(
            dir,
            &SynthSpec {
                target_bytes: size,
                shards,
                seed: 1,
            },
        )
        .with_context(|| format!("generating {}", dir.display()))?;
        std::fs::write(dir.join(COMPLETE), "")?;
    }
    Ok(weight_files(dir)
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum())
}

/// The checkpoint's `.safetensors` files, in name order.
pub fn weight_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "safetensors"))
        .collect()
}

/// Converts `source` into `<storage>/<model>` with `sllm-store save` unless
/// it is there already (a save publishes atomically, so present = complete);
/// returns the model's directory.
fn ensure_converted(
    sllm_store: &Path,
    source: &Path,
    storage: &Path,
    model: &str,
) -> anyhow::Result<PathBuf> {
    let model_dir = storage.join(model);
    if !model_dir.join("tensor_index.json").exists() {
        tracing::info!(model, storage = %storage.display(), "converting the checkpoint");
        let out = Command::new(sllm_store)
            .args(["save", "--model", model, "--local-model-path"])
            .arg(source)
            .arg("--storage-path")
            .arg(storage)
            .env("RUST_LOG", "warn")
            .output()
            .with_context(|| format!("running {}", sllm_store.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "converting {} failed: {}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(model_dir)
}

/// The partition files (`tensor.data_<i>`) of a converted model, in order.
fn partition_files(model_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let partitions = sllm_format::partitions::Partitions::discover(model_dir)
        .with_context(|| format!("listing the partitions of {}", model_dir.display()))?;
    Ok(partitions.iter().map(|p| p.path.clone()).collect())
}

/// Creates the benchmark's working directory; its absolute path.
pub fn work_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(std::fs::canonicalize(dir)?)
}

/// A checkpoint of one size, converted: what the load benchmarks read.
pub struct BenchModel {
    /// The benchmark's working directory (absolute).
    pub dir: PathBuf,
    /// The safetensors checkpoint.
    pub source: PathBuf,
    /// The storage path holding the converted model.
    pub storage: PathBuf,
    /// The model's id under `storage`.
    pub name: String,
    pub model_dir: PathBuf,
    /// Its partition files, in order.
    pub parts: Vec<PathBuf>,
    /// Their total size.
    pub bytes: u64,
}

impl BenchModel {
    /// Makes (or reuses) the checkpoint of `size` under `dir` and its
    /// converted copy under `<dir>/store`.
    pub fn prepare(sllm_store: &Path, dir: &Path, size: ByteSize) -> anyhow::Result<Self> {
        let dir = work_dir(dir)?;
        let source = dir.join(format!("checkpoint-{size}"));
        ensure_checkpoint(&source, size.bytes())?;
        let storage = dir.join("store");
        let name = format!("bench/load-{size}");
        let model_dir = ensure_converted(sllm_store, &source, &storage, &name)?;
        let parts = partition_files(&model_dir)?;
        let bytes = parts
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()))
            .sum::<Result<_, _>>()?;
        Ok(Self {
            dir,
            source,
            storage,
            name,
            model_dir,
            parts,
            bytes,
        })
    }
}

/// Finds `sllm-store`: the flag, else next to this binary.
pub fn sllm_store_binary(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match flag {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("sllm-store"),
    };
    anyhow::ensure!(
        path.is_file(),
        "{} not found: build it with `cargo build --release -p sllm-store` or pass --sllm-store",
        path.display()
    );
    Ok(path)
}
