//! `sllm-store verify`: checks a stored model and names every problem.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use sllm_format::ModelId;
use sllm_format::config::resolve_storage_path;
use sllm_format::verify::{summary_line, verify_model};

use crate::progress::TermProgress;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Model id under the storage path, e.g. `org/name`.
    model: String,
    /// Where models are stored [default: $STORAGE_PATH, else ~/models].
    #[arg(long)]
    storage_path: Option<PathBuf>,
}

pub fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let model = ModelId::parse(&args.model)?;
    let dir = model.dir_in(&resolve_storage_path(args.storage_path.as_deref()));
    let started = Instant::now();
    let report = verify_model(&dir, &TermProgress::new())?;
    let line = summary_line(model.as_str(), &report, started.elapsed().as_secs_f64());
    if report.is_ok() {
        println!("ok {line}");
        return Ok(ExitCode::SUCCESS);
    }
    for problem in &report.problems {
        println!("problem: {problem}");
    }
    println!("FAILED {line}: {} problem(s)", report.problems.len());
    Ok(ExitCode::FAILURE)
}
