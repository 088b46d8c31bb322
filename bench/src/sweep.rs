//! `sllm-bench sweep`: our engines, disk to pool, cold, across chunk sizes,
//! queue depths, read sizes and thread counts, so the daemon's defaults are
//! chosen by measurement. Reports every setting, the best per engine, and
//! where the current defaults stand against it.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;
use sllm_format::units::{ByteSize, gib_per_s};

use crate::cache::drop_caches;
use crate::checkpoint::{BenchModel, sllm_store_binary};
use crate::engines::{EngineSettings, our_engine};
use crate::machine::Machine;
use crate::report::{Header, OutputArgs, Sample, Table, median};

#[derive(Args, Debug)]
pub struct SweepArgs {
    /// Size of the synthetic checkpoint.
    #[arg(long, default_value = "2GiB")]
    size: ByteSize,
    /// Where the checkpoint and the converted model live (on the disk to measure).
    /// Relative to the current directory; the generated checkpoint is kept
    /// there for the next run (delete the folder when done).
    #[arg(long, default_value = "target/sllm-bench")]
    dir: PathBuf,
    /// Cold runs per setting; the median is reported.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    #[command(flatten)]
    out: OutputArgs,
}

#[derive(Serialize)]
struct Trial {
    settings: EngineSettings,
    runs: Vec<Sample>,
    gib_per_s: f64,
    cpu_s_per_gib: f64,
}

#[derive(Serialize)]
struct Results {
    #[serde(flatten)]
    header: Header,
    model_bytes: u64,
    cold_method: &'static str,
    trials: Vec<Trial>,
}

const MIB: usize = 1 << 20;

/// The settings tried, the daemon's defaults among them.
fn grid() -> Vec<EngineSettings> {
    let mut out = Vec::new();
    for chunk in [8 * MIB, 32 * MIB, 128 * MIB] {
        for io in [MIB, 4 * MIB, 16 * MIB] {
            if io > chunk {
                continue;
            }
            for depth in [4, 16, 64, 256] {
                out.push(EngineSettings {
                    engine: "io_uring",
                    threads: 1,
                    queue_depth: depth,
                    chunk_bytes: chunk,
                    io_bytes: io,
                });
            }
            for threads in [1, 2, 4, 8] {
                out.push(EngineSettings {
                    engine: "pread",
                    threads,
                    queue_depth: 1,
                    chunk_bytes: chunk,
                    io_bytes: io,
                });
            }
        }
    }
    out
}

pub fn run(args: SweepArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let sllm_store = sllm_store_binary(args.out.sllm_store.clone())?;
    let BenchModel {
        dir,
        model_dir,
        parts,
        bytes,
        ..
    } = BenchModel::prepare(&sllm_store, &args.dir, args.size)?;
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let cold_method = drop_caches(&parts);

    let grid = grid();
    let mut runs: Vec<Vec<Sample>> = vec![Vec::new(); grid.len()];
    for r in 0..args.runs {
        for (i, settings) in grid.iter().enumerate() {
            drop_caches(&parts);
            let sample = our_engine(&model_dir, *settings)?;
            tracing::info!(run = r + 1, %settings, gib_per_s = gib_per_s(bytes, sample.wall_s), "sweep");
            runs[i].push(sample);
        }
    }
    let mut trials: Vec<Trial> = grid
        .into_iter()
        .zip(runs)
        .map(|(settings, runs)| {
            let m = median(&runs);
            Trial {
                settings,
                gib_per_s: gib_per_s(bytes, m.wall_s),
                cpu_s_per_gib: m.cpu_s / gib,
                runs,
            }
        })
        .collect();
    trials.sort_by(|a, b| b.gib_per_s.total_cmp(&a.gib_per_s));

    let results = Results {
        header: Header::new("sweep", Machine::probe(&dir)),
        model_bytes: bytes,
        cold_method,
        trials,
    };
    args.out
        .save(&results.header, &results, &markdown(&results))?;
    Ok(())
}

fn same(a: &EngineSettings, b: &EngineSettings) -> bool {
    a.engine == b.engine
        && a.chunk_bytes == b.chunk_bytes
        && a.io_bytes == b.io_bytes
        && match a.engine {
            "pread" => a.threads == b.threads,
            _ => a.queue_depth == b.queue_depth,
        }
}

fn markdown(r: &Results) -> String {
    let mut out = format!(
        "# Engine sweep: disk to pool, cold\n\n\
         {}- model: {:.2} GiB; cold runs drop the page cache with {}\n\n",
        r.header.markdown(),
        r.model_bytes as f64 / (1u64 << 30) as f64,
        r.cold_method,
    );
    let mut engines = Table::new(&[
        "engine",
        "best setting",
        ">GiB/s",
        "daemon default",
        ">GiB/s",
        ">default / best",
    ]);
    for engine in ["io_uring", "pread"] {
        let default = EngineSettings::daemon_default(engine);
        let best = r.trials.iter().find(|t| t.settings.engine == engine);
        let at_default = r.trials.iter().find(|t| same(&t.settings, &default));
        if let (Some(best), Some(d)) = (best, at_default) {
            engines.row([
                engine.to_string(),
                best.settings.to_string(),
                format!("{:.2}", best.gib_per_s),
                default.to_string(),
                format!("{:.2}", d.gib_per_s),
                format!("{:.2}", d.gib_per_s / best.gib_per_s),
            ]);
        }
    }
    out += engines.finish();
    let mut every = Table::new(&["setting", ">GiB/s", ">CPU s/GiB"]);
    for t in &r.trials {
        every.row([
            t.settings.to_string(),
            format!("{:.2}", t.gib_per_s),
            format!("{:.2}", t.cpu_s_per_gib),
        ]);
    }
    out += "\n## Every setting, fastest first\n\n";
    out + every.finish()
}
