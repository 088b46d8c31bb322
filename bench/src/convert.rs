//! `sllm-bench convert`: how fast `sllm-store save` turns a safetensors
//! checkpoint into the store format, against the plain copy of the same
//! bytes with `cp` followed by an fsync of the copies (the save fsyncs too,
//! so that is the fair floor), cold (page cache dropped) and warm.

use std::path::PathBuf;
use std::process::Command;

use clap::Args;
use serde::Serialize;
use sllm_format::units::{ByteSize, gib_per_s};

use crate::cache::{drop_caches, files_under, warm_up};
use crate::checkpoint::{ensure_checkpoint, sllm_store_binary, work_dir};
use crate::machine::Machine;
use crate::report::{Header, OutputArgs, Sample, Table, median, time_command};

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Size of the synthetic checkpoint.
    #[arg(long, default_value = "1GiB")]
    size: ByteSize,
    /// Where the checkpoint and the copies go (on the disk to measure).
    /// Relative to the current directory; the generated checkpoint is kept
    /// there for the next run (delete the folder when done).
    #[arg(long, default_value = "target/sllm-bench")]
    dir: PathBuf,
    /// Runs per scenario; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Serialize)]
struct Scenario {
    name: String,
    cache: &'static str,
    runs: Vec<Sample>,
    median_wall_s: f64,
    gib_per_s: f64,
    cpu_s_per_gib: f64,
    /// Throughput relative to `cp + fsync` in the same cache state.
    ratio_to_cp: f64,
}

#[derive(Serialize)]
struct Results {
    #[serde(flatten)]
    header: Header,
    checkpoint_bytes: u64,
    cold_method: &'static str,
    scenarios: Vec<Scenario>,
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let sllm_store = sllm_store_binary(args.out.sllm_store.clone())?;
    let dir = work_dir(&args.dir)?;
    let source = dir.join(format!("checkpoint-{}", args.size));
    let bytes = ensure_checkpoint(&source, args.size.bytes())?;
    let source_files = files_under(&source);

    let cp_out = dir.join("copy");
    // Not "store": the load benchmarks keep their converted models there.
    let store = dir.join("convert-store");
    let mut cold_method = "none";
    let mut samples: Vec<(String, &'static str, Vec<Sample>)> = Vec::new();
    for cold in [true, false] {
        let cache = if cold { "cold" } else { "warm" };
        let mut cp_runs = Vec::new();
        let mut save_runs = Vec::new();
        for run in 0..args.runs {
            // Alternate the order so neither side always follows the other.
            for first_cp in [run % 2 == 0, run % 2 != 0] {
                // Both targets start empty, deleted before the clock starts:
                // removing an old copy is not conversion work (NOTES.md).
                let _ = std::fs::remove_dir_all(&cp_out);
                let _ = std::fs::remove_dir_all(&store);
                if cold {
                    cold_method = drop_caches(&source_files);
                } else {
                    warm_up(&source_files);
                }
                if first_cp {
                    cp_runs.push(time_command(Command::new("sh").arg("-c").arg(format!(
                        "cp -r '{}' '{}' && sync '{}'/*",
                        source.display(),
                        cp_out.display(),
                        cp_out.display()
                    )))?);
                } else {
                    save_runs.push(time_command(
                        Command::new(&sllm_store)
                            .args(["save", "--model", "bench/model", "--local-model-path"])
                            .arg(&source)
                            .arg("--storage-path")
                            .arg(&store)
                            .env("RUST_LOG", "warn"),
                    )?);
                }
            }
        }
        samples.push(("cp + fsync".into(), cache, cp_runs));
        samples.push(("sllm-store save".into(), cache, save_runs));
    }
    let _ = std::fs::remove_dir_all(&cp_out);
    let _ = std::fs::remove_dir_all(&store);

    let scenarios = summarize(samples, bytes);
    let results = Results {
        header: Header::new("convert", Machine::probe(&dir)),
        checkpoint_bytes: bytes,
        cold_method,
        scenarios,
    };
    args.out
        .save(&results.header, &results, &markdown(&results))?;
    Ok(())
}

fn summarize(samples: Vec<(String, &'static str, Vec<Sample>)>, bytes: u64) -> Vec<Scenario> {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let cp_wall = |cache: &str| {
        samples
            .iter()
            .find(|(n, c, _)| n == "cp + fsync" && *c == cache)
            .map_or(0.0, |(_, _, runs)| median(runs).wall_s)
    };
    samples
        .iter()
        .map(|(name, cache, runs)| {
            let m = median(runs);
            Scenario {
                name: name.clone(),
                cache,
                median_wall_s: m.wall_s,
                gib_per_s: gib_per_s(bytes, m.wall_s),
                cpu_s_per_gib: m.cpu_s / gib,
                ratio_to_cp: cp_wall(cache) / m.wall_s,
                runs: runs.clone(),
            }
        })
        .collect()
}

fn markdown(r: &Results) -> String {
    let out = format!(
        "# Conversion: `sllm-store save` against `cp` + fsync\n\n\
         {}- checkpoint: {:.2} GiB; cold runs drop the page cache with {}\n\n",
        r.header.markdown(),
        r.checkpoint_bytes as f64 / (1u64 << 30) as f64,
        r.cold_method,
    );
    let mut table = Table::new(&[
        "scenario",
        "cache",
        ">median s",
        ">GiB/s",
        ">ratio to cp",
        ">CPU s/GiB",
    ]);
    for s in &r.scenarios {
        table.row([
            s.name.to_string(),
            s.cache.to_string(),
            format!("{:.3}", s.median_wall_s),
            format!("{:.2}", s.gib_per_s),
            format!("{:.2}", s.ratio_to_cp),
            format!("{:.2}", s.cpu_s_per_gib),
        ]);
    }
    out + table.finish()
}
