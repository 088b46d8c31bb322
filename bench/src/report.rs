//! Timing commands and writing results: medians, CPU seconds of children
//! (from `/proc/self/stat`), and JSON + markdown files under bench/results/.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;

use crate::machine::{Machine, utc_now};

/// One timed run of a command.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    pub wall_s: f64,
    /// User + system CPU seconds of the command and its children.
    pub cpu_s: f64,
}

/// Runs `cmd` to completion and times it.
pub fn time_command(cmd: &mut Command) -> anyhow::Result<Sample> {
    time_command_output(cmd).map(|(sample, _)| sample)
}

/// Runs `cmd` to completion, times it, and returns what it printed.
pub fn time_command_output(cmd: &mut Command) -> anyhow::Result<(Sample, Vec<u8>)> {
    let cpu_before = children_cpu_s();
    let start = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let wall_s = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let sample = Sample {
        wall_s,
        cpu_s: children_cpu_s() - cpu_before,
    };
    Ok((sample, out.stdout))
}

/// CPU seconds used by this process's waited-for children so far.
fn children_cpu_s() -> f64 {
    // cutime and cstime are fields 16 and 17 of /proc/<pid>/stat (proc(5)).
    stat_cpu_s("/proc/self/stat", 16)
}

/// CPU seconds (user + system, all threads) this process has used so far.
pub fn self_cpu_s() -> f64 {
    // The process CPU clock counts in nanoseconds; /proc counts in 10 ms
    // ticks, too coarse for an in-process read of a small model.
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// CPU seconds (user + system, all threads) process `pid` has used so far.
pub fn pid_cpu_s(pid: u32) -> f64 {
    stat_cpu_s(&format!("/proc/{pid}/stat"), 14)
}

/// Resident memory of process `pid`, in bytes (`VmRSS`).
pub fn pid_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kib << 10)
}

/// The sum of fields `first` and `first + 1` of a stat file, in seconds.
fn stat_cpu_s(path: &str, first: usize) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // After the parenthesised command name come fields 3 (state), 4, ...
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    match (field(first), field(first + 1)) {
        (Some(u), Some(s)) => (u + s) as f64 / ticks,
        _ => 0.0,
    }
}

/// A markdown table, the one way the benchmarks write one. A column whose
/// title starts with `>` is right-aligned (numbers); the `>` is not shown.
pub struct Table {
    out: String,
}

impl Table {
    pub fn new(columns: &[&str]) -> Self {
        let titles: Vec<&str> = columns.iter().map(|c| c.trim_start_matches('>')).collect();
        let rules: Vec<&str> = columns
            .iter()
            .map(|c| if c.starts_with('>') { "---:" } else { "---" })
            .collect();
        Self {
            out: format!("| {} |\n|{}|\n", titles.join(" | "), rules.join("|")),
        }
    }

    /// One row, its cells already formatted.
    pub fn row<S: AsRef<str>>(&mut self, cells: impl IntoIterator<Item = S>) -> &mut Self {
        let cells: Vec<String> = cells.into_iter().map(|c| c.as_ref().to_owned()).collect();
        self.out += &format!("| {} |\n", cells.join(" | "));
        self
    }

    pub fn finish(&self) -> &str {
        &self.out
    }
}

/// The median of `items` by `key` (the upper one of an even count): the one
/// median of the benchmarks. None when there are no items.
pub fn median_by<T: Copy>(
    items: impl IntoIterator<Item = T>,
    key: impl Fn(&T) -> f64,
) -> Option<T> {
    let mut sorted: Vec<T> = items.into_iter().collect();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted.get(sorted.len() / 2).copied()
}

/// The median of numbers (the upper one of an even count).
pub fn median_f64(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    median_by(values, |v| *v)
}

/// The median of `samples` by wall time; `samples` is never empty (every
/// scenario runs at least once).
pub fn median(samples: &[Sample]) -> Sample {
    median_by(samples.iter().copied(), |s| s.wall_s).expect("at least one run")
}

/// Writes `value` as pretty JSON and `markdown` beside it.
fn write_results(
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

/// What every result file starts with: which benchmark, when, the command
/// line, and the machine.
#[derive(Debug, Serialize)]
pub struct Header {
    pub benchmark: &'static str,
    pub date: String,
    pub command: String,
    pub machine: Machine,
}

impl Header {
    /// Stamps `benchmark` with now, this process's command line and `machine`.
    pub fn new(benchmark: &'static str, machine: Machine) -> Self {
        Self {
            benchmark,
            date: utc_now(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine,
        }
    }

    /// The date, command and machine as markdown list items.
    pub fn markdown(&self) -> String {
        format!(
            "- date: {}\n- command: `{}`\n{}",
            self.date,
            self.command,
            self.machine.markdown()
        )
    }
}

/// Flags every benchmark takes: where results go and which binary to run.
#[derive(Args, Debug)]
pub struct OutputArgs {
    /// Directory the results go into under their default names [default: the current directory].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// JSON output [default: <benchmark>-<host>-<date and time>.json in --out; never overwritten].
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Markdown output [default: beside the JSON, .md].
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// The sllm-store binary [default: next to this one].
    #[arg(long)]
    pub sllm_store: Option<PathBuf>,
}

impl OutputArgs {
    /// Prints the markdown and writes the results where the flags say, else
    /// in the current directory, named by benchmark, host, date and time,
    /// never over an earlier result (run it from `bench/results/` to add to
    /// the record).
    pub fn save(
        &self,
        header: &Header,
        value: &impl Serialize,
        markdown: &str,
    ) -> anyhow::Result<()> {
        print!("{markdown}");
        let json = match &self.json {
            Some(path) => path.clone(),
            None => {
                let dir = match &self.out {
                    Some(dir) => {
                        std::fs::create_dir_all(dir)
                            .with_context(|| format!("creating {}", dir.display()))?;
                        dir.clone()
                    }
                    None => std::env::current_dir()?,
                };
                unused_path(&dir, &default_stem(header))?
            }
        };
        let md = self
            .markdown
            .clone()
            .unwrap_or_else(|| json.with_extension("md"));
        write_results(&json, &md, value, markdown)?;
        eprintln!("wrote {} and {}", json.display(), md.display());
        Ok(())
    }
}

/// `<benchmark>-<host>-<YYYY-MM-DD>T<HH-MM-SS>`: sortable, one per run.
fn default_stem(header: &Header) -> String {
    let date = &header.date;
    let when = date[..19.min(date.len())].replace(':', "-");
    format!("{}-{}-{when}", header.benchmark, header.machine.hostname)
}

/// `<dir>/<stem>.json`, or `<stem>-2.json`, ... if an earlier run (or its
/// markdown) is already there.
fn unused_path(dir: &Path, stem: &str) -> anyhow::Result<PathBuf> {
    for n in 1..1000 {
        let name = if n == 1 {
            stem.to_owned()
        } else {
            format!("{stem}-{n}")
        };
        let json = dir.join(format!("{name}.json"));
        if !json.exists() && !json.with_extension("md").exists() {
            return Ok(json);
        }
    }
    anyhow::bail!(
        "{} holds 999 results named {stem}: pass --json",
        dir.display()
    )
}

#[cfg(test)]
mod table_tests {
    use super::Table;

    #[test]
    fn a_table_has_its_header_rule_and_rows() {
        let mut t = Table::new(&["name", ">GiB/s"]);
        t.row(["a", "1.00"]).row(["b", "2.00"]);
        assert_eq!(
            t.finish(),
            "| name | GiB/s |\n|---|---:|\n| a | 1.00 |\n| b | 2.00 |\n"
        );
    }

    #[test]
    fn results_never_overwrite_an_earlier_run() {
        let dir = tempfile::tempdir().unwrap();
        let first = super::unused_path(dir.path(), "load-h-2026-11-30T10-00-00").unwrap();
        assert_eq!(first, dir.path().join("load-h-2026-11-30T10-00-00.json"));
        std::fs::write(&first, "{}").unwrap();
        let second = super::unused_path(dir.path(), "load-h-2026-11-30T10-00-00").unwrap();
        assert_eq!(second, dir.path().join("load-h-2026-11-30T10-00-00-2.json"));
        std::fs::write(second.with_extension("md"), "").unwrap();
        let third = super::unused_path(dir.path(), "load-h-2026-11-30T10-00-00").unwrap();
        assert_eq!(third, dir.path().join("load-h-2026-11-30T10-00-00-3.json"));
    }
}
