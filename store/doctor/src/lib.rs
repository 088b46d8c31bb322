//! The environment doctor: each trap of a model-store runbook turned into a
//! check that says `PASS`, `WARN` or `STOP`, and for every WARN and STOP what
//! to do about it.
//!
//! The checks only read (apart from one 4 KiB probe file in the storage path,
//! removed at once), never download, and never change settings, so the
//! doctor is safe to run beside a serving daemon. Each area is one module:
//!
//! - [`storage`]: the storage path's filesystem and block device, free space,
//!   write access and `O_DIRECT`;
//! - [`system`]: io_uring, memory against the pool, huge pages, GPUs;
//! - [`hf`]: the Hugging Face settings and whether a snapshot can start offline;
//! - [`model`]: the converted model in the storage path;
//! - [`services`]: the daemon (health, config) and vLLM's `/v1/models`.
//!
//! [`offline_readiness`] is the subset the restart benchmark runs before an
//! offline comparison.

// The doctor reads what the converter and the daemon define.
use sllm_convert::{import, save};
use sllm_daemon::{device, io};
use sllm_format::{self as format, units};

pub mod hf;
pub mod model;
pub mod services;
pub mod storage;
pub mod system;

use std::path::PathBuf;

use serde::Serialize;

pub use hf::HfEnv;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    /// Nothing to do.
    Pass,
    /// Works, but slower or more fragile than it should be.
    Warn,
    /// Will fail, or will silently measure the wrong thing: fix it first.
    Stop,
}

impl Status {
    /// `PASS`, `WARN` or `STOP`.
    pub fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Stop => "STOP",
        }
    }
}

/// One line of the doctor's report.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// Short stable name, e.g. `storage.device`, for scripts reading `--json`.
    pub name: &'static str,
    pub status: Status,
    /// What was found, naming the path, device or setting.
    pub summary: String,
    /// What to do; set for every WARN and STOP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub fn pass(name: &'static str, summary: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Pass,
            summary: summary.into(),
            fix: None,
        }
    }

    pub fn warn(name: &'static str, summary: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Warn,
            summary: summary.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn stop(name: &'static str, summary: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Stop,
            summary: summary.into(),
            fix: Some(fix.into()),
        }
    }
}

/// The worst status among `checks` (`Pass` when empty).
pub fn worst(checks: &[Check]) -> Status {
    checks
        .iter()
        .map(|c| c.status)
        .max()
        .unwrap_or(Status::Pass)
}

/// What to examine.
#[derive(Clone, Debug)]
pub struct DoctorRequest {
    /// The resolved storage path.
    pub storage_path: PathBuf,
    /// The pool size the daemon is (or will be) started with.
    pub pool_bytes: u64,
    /// A Hugging Face model id to check end to end, e.g. `org/name`.
    pub model: Option<String>,
    /// A local folder of safetensors the model is converted from instead of
    /// the Hugging Face cache: its files are checked in the cache's place,
    /// and no snapshot is looked up.
    pub local_model_path: Option<PathBuf>,
    /// Its revision (a ref such as `main`, or a commit hash).
    pub revision: String,
    /// The daemon's address, and whether the user named it (an unreachable
    /// daemon the user named is a STOP; the default one only a WARN).
    pub server: String,
    pub server_named: bool,
    /// vLLM's base URL, e.g. `http://127.0.0.1:8000`.
    pub vllm_url: Option<String>,
    /// The Hugging Face settings to judge.
    pub hf: HfEnv,
    /// Skip the full checksum pass over the converted model (index and
    /// partition sizes are still checked).
    pub quick: bool,
}

/// Runs every check, in the order they are printed.
pub fn run(req: &DoctorRequest) -> Vec<Check> {
    // The model's snapshot is resolved and read once, for every check.
    let model = req
        .model
        .as_deref()
        .filter(|_| req.local_model_path.is_none())
        .map(|m| (m, hf::find(&req.hf, m, &req.revision)));
    // Space a conversion would still need, when known.
    let needed_bytes = match &model {
        Some((m, Ok(cached)))
            if cached.is_whole() && !model::is_converted(&req.storage_path, m) =>
        {
            Some(cached.weight_bytes())
        }
        _ => None,
    };
    let mut checks = storage::checks(&req.storage_path, needed_bytes);
    checks.extend(system::checks(req.pool_bytes));
    checks.extend(hf::checks(
        &req.hf,
        model.as_ref().map(|(m, found)| (*m, found)),
        &req.revision,
    ));
    if let Some((m, found)) = &model {
        let cached = found.as_ref().ok();
        checks.extend(cached.and_then(|c| hf::device_check(c, &req.storage_path)));
        checks.extend(model::checks(
            &req.storage_path,
            m,
            &req.revision,
            cached,
            model::Purpose::Doctor { quick: req.quick },
        ));
    }
    if let Some(dir) = &req.local_model_path {
        checks.push(model::local_source_check(dir));
        if let Some(m) = &req.model {
            checks.extend(model::checks(
                &req.storage_path,
                m,
                &req.revision,
                None,
                model::Purpose::Doctor { quick: req.quick },
            ));
        }
    }
    checks.push(services::daemon(&req.server, req.server_named));
    if let Some(url) = &req.vllm_url {
        checks.push(services::vllm(url, model.as_ref().map(|(m, _)| *m)));
    }
    checks
}

/// Can both sides of a restart comparison start with the network off? The
/// baseline needs the complete snapshot in the Hugging Face cache; the fast
/// start needs the converted model in the storage path. Judged as if
/// `HF_HUB_OFFLINE=1` were set, whatever `hf` says.
pub fn offline_readiness(
    hf: &HfEnv,
    storage_path: &std::path::Path,
    model: &str,
    revision: &str,
) -> Vec<Check> {
    let hf = hf.clone().offline();
    let found = hf::find(&hf, model, revision);
    let mut checks = hf::snapshot_checks(&hf, model, revision, &found);
    checks.extend(model::checks(
        storage_path,
        model,
        revision,
        found.as_ref().ok(),
        model::Purpose::OfflineReadiness,
    ));
    checks
}
