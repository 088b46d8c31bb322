//! `sllm-store doctor`: runs the environment checks and prints one line per
//! check (`PASS`, `WARN`, `STOP`, with the fix under each WARN and STOP), or
//! JSON; exits non-zero when anything says STOP.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use serde_json::json;
use sllm_client::client::DEFAULT_ADDR;
use sllm_doctor::{self as doctor, Check, DoctorRequest, HfEnv, Status};
use sllm_format::config::resolve_storage_path;
use sllm_format::units::ByteSize;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Where models are stored [default: $STORAGE_PATH, else ~/models].
    #[arg(long)]
    storage_path: Option<PathBuf>,
    /// A Hugging Face model to check end to end: cached snapshot, offline
    /// readiness, pinned hash, converted copy. Also a snapshot folder
    /// (`/.../models--org--name/snapshots/<hash>`, as vLLM is started in
    /// production); with --local-model-path, the id the model is stored under.
    #[arg(long)]
    model: Option<String>,
    /// A folder of weights downloaded with `hf download --local-dir`, instead of the cache:
    /// checked for what vLLM and `sllm-store save` need.
    #[arg(long)]
    local_model_path: Option<PathBuf>,
    /// The model's revision: a ref such as `main`, or a commit hash.
    #[arg(long, default_value = "main")]
    revision: String,
    /// The store daemon's address (host:port or unix:<path>) [default: 127.0.0.1:8073].
    #[arg(long, env = "SLLM_STORE_ADDR")]
    server: Option<String>,
    /// vLLM's OpenAI server, e.g. http://127.0.0.1:8000, to check `GET /v1/models`.
    #[arg(long)]
    vllm_url: Option<String>,
    /// The pool size the daemon runs with, to check memory against.
    #[arg(long, env = "MEM_POOL_SIZE", default_value = "4GB")]
    mem_pool_size: ByteSize,
    /// Check the converted model's index and sizes only, not every checksum.
    #[arg(long)]
    quick: bool,
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let mut hf = HfEnv::from_env();
    let mut model = args.model.clone();
    let mut revision = args.revision.clone();
    if let Some(m) = &args.model
        && is_path(m)
    {
        let path = std::path::Path::new(m);
        match doctor::hf::parse_snapshot_path(&path.canonicalize().unwrap_or(path.to_owned())) {
            Some((root, id, commit)) => {
                hf = hf.with_cache_from_path(&root);
                model = Some(id);
                revision = commit;
            }
            None => bail!(
                "--model {m} is a folder, not a snapshot in the Hugging Face cache \
                 (.../models--<org>--<name>/snapshots/<hash>); for a folder made with \
                 `hf download --local-dir`, pass --local-model-path {m} --model <org/name>"
            ),
        }
    }
    if let Some(m) = model.as_deref().filter(|_| args.local_model_path.is_some()) {
        sllm_format::ModelId::parse(m)?;
    }
    let req = DoctorRequest {
        storage_path: resolve_storage_path(args.storage_path.as_deref()),
        pool_bytes: args.mem_pool_size.bytes(),
        model: model.clone(),
        local_model_path: args.local_model_path.clone(),
        revision: revision.clone(),
        server: args.server.clone().unwrap_or_else(|| DEFAULT_ADDR.into()),
        server_named: args.server.is_some(),
        vllm_url: args.vllm_url.clone(),
        hf,
        quick: args.quick,
    };
    let checks = doctor::run(&req);
    let worst = doctor::worst(&checks);
    if args.json {
        let out = json!({
            "storage_path": req.storage_path,
            "model": model,
            "revision": revision,
            "worst": worst,
            "checks": checks,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_checks(&checks);
    }
    Ok(if worst == Status::Stop {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// A model given as a path rather than an `org/name` id.
fn is_path(model: &str) -> bool {
    model.starts_with('/') || model.starts_with("./") || model.starts_with("../") || model == "."
}

fn print_checks(checks: &[Check]) {
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let paint = |status: Status| {
        let label = status.label();
        match (colour, status) {
            (true, Status::Stop) => format!("\x1b[1;31m{label}\x1b[0m"),
            (true, Status::Warn) => format!("\x1b[33m{label}\x1b[0m"),
            _ => label.to_owned(),
        }
    };
    for c in checks {
        println!("{} {:<18} {}", paint(c.status), c.name, c.summary);
        if let Some(fix) = &c.fix {
            println!("     {:<18} fix: {fix}", "");
        }
    }
    let count = |s: Status| checks.iter().filter(|c| c.status == s).count();
    println!(
        "{} pass, {} warn, {} stop{}",
        count(Status::Pass),
        count(Status::Warn),
        count(Status::Stop),
        if count(Status::Stop) > 0 {
            ": fix every STOP before starting"
        } else {
            ""
        }
    );
}
