//! Timing commands and writing results: medians, CPU seconds of children
//! (from `/proc/self/stat`), and JSON + markdown files under bench/results/.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;

/// One timed run of a command.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    pub wall_s: f64,
    /// User + system CPU seconds of the command and its children.
    pub cpu_s: f64,
}

/// Runs `cmd` to completion and times it.
pub fn time_command(cmd: &mut Command) -> anyhow::Result<Sample> {
    let cpu_before = children_cpu_s();
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let wall_s = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(Sample {
        wall_s,
        cpu_s: children_cpu_s() - cpu_before,
    })
}

/// CPU seconds used by this process's waited-for children so far.
fn children_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // After the parenthesised command name come fields 3 (state), 4, ...;
    // cutime and cstime are fields 16 and 17 (proc(5)).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    match (field(16), field(17)) {
        (Some(u), Some(s)) => (u + s) as f64 / ticks,
        _ => 0.0,
    }
}

/// The median of `samples` by wall time (the upper one of an even count).
pub fn median(samples: &[Sample]) -> Sample {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
    sorted[sorted.len() / 2]
}

/// Writes `value` as pretty JSON and `markdown` beside it.
pub fn write_results(
    json_path: &Path,
    md_path: &Path,
    value: &impl Serialize,
    markdown: &str,
) -> anyhow::Result<()> {
    for path in [json_path, md_path] {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
    }
    std::fs::write(json_path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(md_path, markdown).with_context(|| format!("writing {}", md_path.display()))?;
    Ok(())
}
