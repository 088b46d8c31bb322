//! `sllm-bench`: measures sllm-store against the machine's limits and its
//! peers, side by side in one run, and records the figures with the machine
//! they came from (shared/DESIGN.md section 7).

mod cache;
mod checkpoint;
mod convert;
mod daemon;
mod engines;
mod fio;
mod load;
mod machine;
mod peers;
mod pgroup;
mod report;
mod restart;
mod scripts;
mod stream;
mod sweep;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "sllm-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Conversion speed of `sllm-store save` against `cp` + fsync of the same bytes.
    Convert(convert::ConvertArgs),
    /// Load throughput against the disk's and the copy's limits and the peers, in one run.
    Load(load::LoadArgs),
    /// vLLM's restart time, the usual start against the start through
    /// sllm-store: launch to ready and the first completion, interleaved runs.
    Restart(restart::RestartArgs),
    /// Models larger than the pool: cold loads streamed through it against the in-pool one,
    /// and what the kept prefix saves the next load.
    Stream(stream::StreamArgs),
    /// Our engines across chunk sizes, queue depths, read sizes and threads.
    Sweep(sweep::SweepArgs),
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line, each cause once, no backtrace.
            eprintln!(
                "error: {}",
                sllm_format::error_text::error_text(err.as_ref())
            );
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_ansi(colour)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match Cli::parse().command {
        Command::Convert(args) => convert::run(args),
        Command::Load(args) => load::run(args),
        Command::Restart(args) => restart::run(args),
        Command::Stream(args) => stream::run(args),
        Command::Sweep(args) => sweep::run(args),
    }
}
