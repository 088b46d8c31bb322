//! `sllm-bench stream`: models larger than the pool. The same model is
//! loaded cold by daemons whose pool holds it whole, half of it and a
//! quarter of it (so the last two stream it through a ring), then loaded a
//! second time, cold again, where the streamed daemons start from the prefix
//! they kept. Reports each cold load against the in-pool one, the time the
//! kept prefix saves against the fraction it holds, and how much the
//! daemon's resident memory grew past its pool.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;
use sllm_format::units::{ByteSize, gib_per_s, human_bytes};

use crate::cache::drop_caches;
use crate::checkpoint::{BenchModel, sllm_store_binary};
use crate::daemon::Daemon;
use crate::machine::Machine;
use crate::report::{Header, OutputArgs, Table, median_f64, pid_rss_bytes};

#[derive(Args, Debug)]
pub struct StreamArgs {
    /// Size of the synthetic checkpoint.
    #[arg(long, default_value = "1GiB")]
    size: ByteSize,
    /// Where the checkpoint and the converted model live (on the disk to measure).
    /// Relative to the current directory; the generated checkpoint is kept
    /// there for the next run (delete the folder when done).
    #[arg(long, default_value = "target/sllm-bench")]
    dir: PathBuf,
    /// Runs per pool size, interleaved; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Device backend of the daemons: `host` or `cuda`.
    #[arg(long, default_value = "host")]
    device: String,
    /// The daemons' chunk size.
    #[arg(long, default_value = "32MiB")]
    chunk_size: ByteSize,
    #[command(flatten)]
    out: OutputArgs,
}

/// One pool size, all its runs.
#[derive(Serialize)]
struct Scenario {
    name: String,
    pool_bytes: u64,
    /// LoadModelAsync to confirmed, first load (cold), per run.
    cold_s: Vec<f64>,
    /// The same for the second load (page cache dropped again), per run.
    second_s: Vec<f64>,
    /// Bytes of the model in the pool after the first load, per run.
    resident_bytes: Vec<u64>,
    /// How much the daemon's RSS grew from ready to after both loads.
    rss_growth_bytes: Vec<u64>,
}

#[derive(Serialize)]
struct Row {
    name: String,
    pool_bytes: u64,
    cold_s: f64,
    cold_gib_per_s: f64,
    /// Cold rate against the in-pool cold rate.
    vs_in_pool: f64,
    resident_fraction: f64,
    second_s: f64,
    /// 1 - second / cold.
    saved_fraction: f64,
    rss_growth_bytes: u64,
}

#[derive(Serialize)]
struct Results {
    #[serde(flatten)]
    header: Header,
    device: String,
    model_bytes: u64,
    chunk_bytes: u64,
    cold_method: &'static str,
    scenarios: Vec<Scenario>,
    rows: Vec<Row>,
}

pub fn run(args: StreamArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(
        matches!(args.device.as_str(), "host" | "cuda"),
        "--device takes host or cuda, got {}",
        args.device
    );
    let sllm_store = sllm_store_binary(args.out.sllm_store.clone())?;
    let model = BenchModel::prepare(&sllm_store, &args.dir, args.size)?;
    let chunk = args.chunk_size.bytes();
    let round = |b: u64| b.div_ceil(chunk) * chunk;
    // Whole, with room to spare; half; a quarter.
    let mut scenarios: Vec<Scenario> = [
        ("in the pool", round(model.bytes) + 2 * chunk),
        ("2x the pool", round(model.bytes / 2)),
        ("4x the pool", round(model.bytes / 4)),
    ]
    .into_iter()
    .map(|(name, pool_bytes)| Scenario {
        name: name.into(),
        pool_bytes,
        cold_s: Vec::new(),
        second_s: Vec::new(),
        resident_bytes: Vec::new(),
        rss_growth_bytes: Vec::new(),
    })
    .collect();
    let cold_method = drop_caches(&model.parts);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let chunk_arg = args.chunk_size.to_string();
    for run in 0..args.runs {
        for s in &mut scenarios {
            let pool = s.pool_bytes.to_string();
            let daemon = Daemon::start(
                &sllm_store,
                &model.storage,
                &pool,
                &["--device", &args.device, "--chunk-size", &chunk_arg],
            )?;
            let ready_rss = pid_rss_bytes(daemon.pid())?;
            drop_caches(&model.parts);
            let (cold, _) = daemon.load(&model.name)?;
            let resident = runtime.block_on(async {
                let mut client = sllm_client::StoreClient::connect(&daemon.addr).await?;
                anyhow::Ok(client.model_status(&model.name).await?.resident_bytes as u64)
            })?;
            drop_caches(&model.parts);
            let (second, _) = daemon.load(&model.name)?;
            let grown = pid_rss_bytes(daemon.pid())?.saturating_sub(ready_rss);
            daemon.stop()?;
            tracing::info!(
                run = run + 1,
                scenario = %s.name,
                cold_s = cold.device_copy_s,
                second_s = second.device_copy_s,
                resident = %human_bytes(resident),
                "stream"
            );
            s.cold_s.push(cold.device_copy_s);
            s.second_s.push(second.device_copy_s);
            s.resident_bytes.push(resident);
            s.rss_growth_bytes.push(grown);
        }
    }
    let rows = rows(&scenarios, model.bytes);
    let results = Results {
        header: Header::new("stream", Machine::probe(&model.dir)),
        device: args.device.clone(),
        model_bytes: model.bytes,
        chunk_bytes: chunk,
        cold_method,
        scenarios,
        rows,
    };
    args.out
        .save(&results.header, &results, &markdown(&results))?;
    Ok(())
}

fn rows(scenarios: &[Scenario], bytes: u64) -> Vec<Row> {
    let med = |v: &[f64]| median_f64(v.iter().copied()).unwrap_or(f64::NAN);
    let in_pool = med(&scenarios[0].cold_s);
    scenarios
        .iter()
        .map(|s| {
            let cold = med(&s.cold_s);
            let second = med(&s.second_s);
            let resident = med(&s
                .resident_bytes
                .iter()
                .map(|&b| b as f64)
                .collect::<Vec<_>>());
            Row {
                name: s.name.clone(),
                pool_bytes: s.pool_bytes,
                cold_s: cold,
                cold_gib_per_s: gib_per_s(bytes, cold),
                vs_in_pool: in_pool / cold,
                resident_fraction: resident / bytes as f64,
                second_s: second,
                saved_fraction: 1.0 - second / cold,
                rss_growth_bytes: s.rss_growth_bytes.iter().copied().max().unwrap_or(0),
            }
        })
        .collect()
}

fn markdown(r: &Results) -> String {
    let mut out = format!(
        "# Models larger than the pool: streamed loads\n\n\
         {}- model: {}; chunks of {}; device backend: {}; cold runs drop the page cache with {}\n\
         - time: `sllm-store load --json` device_copy_s (LoadModelAsync to confirmed), medians of {} interleaved runs\n\
         - target: a streamed cold load at >= 0.9 x the in-pool one; the second load saves in proportion to what stayed resident\n\n",
        r.header.markdown(),
        human_bytes(r.model_bytes),
        human_bytes(r.chunk_bytes),
        r.device,
        r.cold_method,
        r.scenarios.first().map_or(0, |s| s.cold_s.len()),
    );
    let mut t = Table::new(&[
        "model vs pool",
        ">pool",
        ">cold s",
        ">GiB/s",
        ">vs in pool",
        ">resident after",
        ">second load s",
        ">time saved",
        ">daemon RSS growth",
    ]);
    for row in &r.rows {
        t.row([
            row.name.clone(),
            human_bytes(row.pool_bytes),
            format!("{:.3}", row.cold_s),
            format!("{:.2}", row.cold_gib_per_s),
            format!("{:.2}", row.vs_in_pool),
            format!("{:.0}%", 100.0 * row.resident_fraction),
            format!("{:.3}", row.second_s),
            format!("{:.0}%", 100.0 * row.saved_fraction),
            human_bytes(row.rss_growth_bytes),
        ]);
    }
    out += t.finish();
    out += "\nThe in-pool row's second load is warm (the whole model stayed); the streamed rows' \
            second loads read only what the kept prefix lacks.\n";
    out
}
