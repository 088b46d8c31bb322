//! `sllm-store verify`: checks a stored model and names every problem.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::bail;
use clap::Args;
use sllm_doctor::model::unservable_warning;
use sllm_format::ModelId;
use sllm_format::config::resolve_storage_path;
use sllm_format::verify::{summary_line, verify_model};

use crate::progress::TermProgress;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Model id under the storage path, e.g. `org/name`.
    #[arg(long = "model", value_name = "MODEL")]
    model_flag: Option<String>,
    /// The model id, as a positional argument (the same as --model).
    #[arg(value_name = "MODEL", conflicts_with = "model_flag")]
    model: Option<String>,
    /// Where models are stored [default: $STORAGE_PATH, else ~/models].
    #[arg(long)]
    storage_path: Option<PathBuf>,
    /// Print one JSON object instead of lines.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let Some(name) = args.model_flag.or(args.model) else {
        bail!("name the model to verify: sllm-store verify --model <org/name>");
    };
    let model = ModelId::parse(&name)?;
    let dir = model.dir_in(&resolve_storage_path(args.storage_path.as_deref()));
    let started = Instant::now();
    let progress = TermProgress::new();
    let report = verify_model(&dir, &progress)?;
    let seconds = started.elapsed().as_secs_f64();
    // Sound bytes, but a folder vLLM cannot start from: a warning, not a
    // failure of the check.
    let warnings: Vec<String> = unservable_warning(&dir).into_iter().collect();
    let status = if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    if args.json {
        let out = serde_json::json!({
            "model": model.as_str(),
            "ok": report.is_ok(),
            "tensors": report.tensors,
            "partitions": report.partitions,
            "bytes": report.total_bytes,
            "checksum_blocks": report.blocks_checked,
            "manifest": report.has_manifest,
            "seconds": seconds,
            "problems": report.problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "warnings": warnings,
        });
        println!("{out}");
        return Ok(status);
    }
    let line = summary_line(model.as_str(), &report, seconds);
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    if report.is_ok() {
        println!("ok {line}");
        return Ok(status);
    }
    for problem in &report.problems {
        println!("problem: {problem}");
    }
    println!("FAILED {line}: {} problem(s)", report.problems.len());
    Ok(status)
}
