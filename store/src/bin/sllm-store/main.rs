//! `sllm-store`: the command line. Glue only: parse the flags, hand them to
//! the library, turn the outcome into output and an exit status.

mod demo;
mod doctor;
mod health;
mod load;
mod progress;
mod save;
mod start;
mod verify;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sllm_daemon::device::BackendChoice;
use sllm_daemon::io::EngineKind;

/// `--device`: which device backend (the daemon's, or the one a client expects).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    /// The daemon's choice: CUDA when a driver and a GPU are present, else host.
    Auto,
    /// Shared-memory pseudo-devices (no GPU needed).
    Host,
    /// NVIDIA GPUs through the CUDA driver (an error without one).
    Cuda,
}

impl From<DeviceArg> for BackendChoice {
    fn from(arg: DeviceArg) -> Self {
        match arg {
            DeviceArg::Auto => BackendChoice::Auto,
            DeviceArg::Host => BackendChoice::Host,
            DeviceArg::Cuda => BackendChoice::Cuda,
        }
    }
}

/// `--io-engine`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum EngineArg {
    /// io_uring where the kernel allows it, else pread.
    Auto,
    #[value(name = "io_uring")]
    IoUring,
    Pread,
}

impl From<EngineArg> for EngineKind {
    fn from(arg: EngineArg) -> Self {
        match arg {
            EngineArg::Auto => EngineKind::Auto,
            EngineArg::IoUring => EngineKind::IoUring,
            EngineArg::Pread => EngineKind::Pread,
        }
    }
}

/// A fast, ServerlessLLM-compatible model store for LLM serving.
#[derive(Parser, Debug)]
#[command(name = "sllm-store", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Convert a safetensors checkpoint (local or from the Hugging Face cache) into the store, atomically.
    Save(save::SaveArgs),
    /// Check a stored model: index, partitions and checksums.
    Verify(verify::VerifyArgs),
    /// Generate a small checkpoint, convert it, verify it and print the figures.
    Demo(demo::DemoArgs),
    /// Run the store daemon (the ServerlessLLM `storage.Storage` gRPC service).
    Start(start::StartArgs),
    /// Load a stored model through a running daemon and report each phase.
    Load(load::LoadArgs),
    /// Check the machine, the storage path, the Hugging Face cache, a model and the services.
    Doctor(doctor::DoctorArgs),
    /// Exit 0 when the daemon answers and serves (for health probes).
    Health(health::HealthArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs what it does; one-shot commands print their own
    // summary, and logs would only interleave with it (RUST_LOG=info shows
    // them).
    let default_level = match cli.command {
        Command::Start(_) => "info",
        _ => "warn",
    };
    init_logging(cli.log_format, default_level);
    // A command asked for JSON answers its failure in JSON too, so that a
    // script reading stdout is never left with nothing.
    let json_out = match &cli.command {
        Command::Verify(a) => a.json,
        Command::Load(a) => a.json,
        Command::Doctor(a) => a.json,
        _ => false,
    };
    let outcome = match cli.command {
        Command::Save(args) => save::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Start(args) => start::run_start(args),
        Command::Load(args) => load::run_load(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Health(args) => health::run(args),
    };
    match outcome {
        Ok(code) => code,
        Err(err) => {
            let text = sllm_format::error_text::error_text(err.as_ref());
            if json_out {
                println!("{}", serde_json::json!({ "ok": false, "error": text }));
            }
            match cli.log_format {
                // One JSON line, like the log lines before it; written
                // directly, so that no RUST_LOG filter can hide it.
                LogFormat::Json => eprintln!(
                    "{}",
                    serde_json::json!({ "level": "ERROR", "fields": { "message": text } })
                ),
                LogFormat::Text => eprintln!("error: {text}"),
            }
            err.downcast_ref::<save::Interrupted>()
                .map_or(ExitCode::FAILURE, |i| ExitCode::from(i.exit_code))
        }
    }
}

/// Logs to stderr at `default_level` and up unless `RUST_LOG` says otherwise.
fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour only for a person at a terminal, and never with NO_COLOR set.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
