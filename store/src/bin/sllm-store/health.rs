//! `sllm-store health`: the doctor's daemon check alone, for liveness and
//! readiness probes (docker-compose `healthcheck`, Kubernetes `exec`):
//! one line, exit 0 when the daemon answers and serves, 1 otherwise.

use std::process::ExitCode;

use clap::Args;
use sllm_client::client::DEFAULT_ADDR;
use sllm_doctor::{Status, services};

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// The daemon's address: host:port or unix:<path>.
    #[arg(long, env = "SLLM_STORE_ADDR", default_value = DEFAULT_ADDR)]
    server: String,
}

pub fn run(args: HealthArgs) -> anyhow::Result<ExitCode> {
    let check = services::daemon(&args.server, true);
    println!("{} {}", check.status.label(), check.summary);
    Ok(if check.status == Status::Stop {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
