//! The converted model in the storage path: present (plain layout, or the
//! vLLM layout with `rank_<r>/` folders), passing `verify`, converted from
//! the snapshot the Hugging Face ref points at today, and carrying the
//! `config.json` vLLM reads.

use std::path::{Path, PathBuf};

use super::Check;
use super::hf::CachedSnapshot;
use super::storage::{self, Location};
use crate::format::layout::{is_stored_model, model_dirs};
use crate::format::verify::{Depth, verify_model_to};
use crate::format::{INDEX_FILE, MANIFEST_FILE, Manifest, ModelId};
use crate::units::human_bytes;

/// True when `model` has been converted into `storage`.
pub fn is_converted(storage: &Path, model: &str) -> bool {
    ModelId::parse(model).is_ok_and(|id| is_stored_model(&id.dir_in(storage)))
}

/// What the model checks are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// The doctor's verdict: a model not converted yet is a WARN, its drive
    /// is judged like the storage path's; `quick` skips the checksums (the
    /// index, partitions and sizes are still checked).
    Doctor { quick: bool },
    /// Can the fast start start offline? Only what stops it counts: a model
    /// not converted, broken, or out of the daemon's reach is a STOP; its
    /// drive is not judged. Checksums are skipped.
    OfflineReadiness,
}

/// The converted-model checks, for `purpose`. `snapshot` is what
/// `revision` resolves to in the Hugging Face cache, when it is there.
pub fn checks(
    storage: &Path,
    model: &str,
    revision: &str,
    snapshot: Option<&CachedSnapshot>,
    purpose: Purpose,
) -> Vec<Check> {
    let commit = snapshot.map(CachedSnapshot::commit);
    let readiness = purpose == Purpose::OfflineReadiness;
    let quick = purpose != Purpose::Doctor { quick: false };
    let id = match ModelId::parse(model) {
        Ok(id) => id,
        Err(e) => {
            return vec![Check::stop(
                "model.converted",
                e.to_string(),
                "pass the model as org/name",
            )];
        }
    };
    let model_dir = id.dir_in(storage);
    let dirs = model_dirs(&model_dir);
    if dirs.is_empty() {
        let summary = format!(
            "{model} is not converted: no {INDEX_FILE} or tensor.data_0 in {} or its \
             rank_<r>/ folders",
            model_dir.display()
        );
        let mut fix = format!(
            "sllm-store save --model {model} --revision {} --storage-path {}",
            commit.unwrap_or(revision),
            storage.display()
        );
        if snapshot.is_some_and(|s| !s.is_whole()) {
            fix = format!("download the snapshot's missing files first (see hf.files), then {fix}");
        }
        return vec![if readiness {
            Check::stop("model.converted", summary, fix)
        } else {
            Check::warn("model.converted", summary, fix)
        }];
    }
    let mut out = vec![verify_check(model, &dirs, quick)];
    out.extend(device_check(storage, &dirs[0], !readiness));
    if let Some(c) = stale_check(model, revision, &dirs, commit, readiness) {
        out.push(c);
    }
    match serving_gap(&model_dir) {
        Some(gap @ ServingGap::NoConfig) if readiness => out.push(Check::stop(
            "model.config",
            format!("{}: vLLM cannot start", gap.describe(&model_dir)),
            gap.fix(),
        )),
        Some(gap) => out.push(Check::warn(
            "model.config",
            gap.describe(&model_dir),
            gap.fix(),
        )),
        None => {}
    }
    out
}

/// A folder of weights given instead of the cache (`--local-model-path`,
/// e.g. made by `hf download --local-dir`): safetensors files in it, and
/// what vLLM needs beside them.
pub fn local_source_check(dir: &Path) -> Check {
    let name = "source.folder";
    if !dir.is_dir() {
        return Check::stop(
            name,
            format!("{} is not a folder", dir.display()),
            "pass the folder the model was downloaded to (`hf download <org/name> --local-dir <dir>`)",
        );
    }
    let weights: Vec<u64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .collect();
    if weights.is_empty() {
        return Check::stop(
            name,
            format!("{} holds no .safetensors file", dir.display()),
            "download the safetensors weights into it (`hf download <org/name> --local-dir <dir>`)",
        );
    }
    let summary = format!(
        "{}: {} safetensors file(s), {}",
        dir.display(),
        weights.len(),
        human_bytes(weights.iter().sum())
    );
    match serving_gap(dir) {
        Some(gap @ ServingGap::NoConfig) => Check::stop(
            name,
            format!(
                "{summary}; {}: vLLM cannot start from it",
                gap.describe(dir)
            ),
            gap.fix(),
        ),
        Some(gap) => Check::warn(name, format!("{summary}; {}", gap.describe(dir)), gap.fix()),
        None => Check::pass(name, format!("{summary}, config and tokenizer")),
    }
}

/// What a folder vLLM is started from lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServingGap {
    /// No `config.json`: vLLM cannot start.
    NoConfig,
    /// A config but no tokenizer file: vLLM starts only with another
    /// tokenizer or none.
    NoTokenizer,
}

impl ServingGap {
    /// One line about `dir`.
    pub fn describe(self, dir: &Path) -> String {
        match self {
            Self::NoConfig => format!("{} has no config.json", dir.display()),
            Self::NoTokenizer => format!(
                "{} has config.json but no tokenizer file ({})",
                dir.display(),
                super::hf::TOKENIZER_FILES.join(", ")
            ),
        }
    }

    /// What to do about it.
    pub fn fix(self) -> String {
        let fix = "vLLM reads the model's config and tokenizer from this folder: convert from \
                   the HF cache (which copies them), or copy config.json and the tokenizer \
                   files in";
        match self {
            Self::NoConfig => fix.into(),
            Self::NoTokenizer => {
                format!("{fix}; or start vLLM with --tokenizer <other> or --skip-tokenizer-init")
            }
        }
    }
}

/// What `dir` lacks for vLLM to start from it, if anything.
pub fn serving_gap(dir: &Path) -> Option<ServingGap> {
    if !dir.join("config.json").is_file() {
        Some(ServingGap::NoConfig)
    } else if !super::hf::TOKENIZER_FILES
        .iter()
        .any(|f| dir.join(f).is_file())
    {
        Some(ServingGap::NoTokenizer)
    } else {
        None
    }
}

/// What keeps vLLM from starting from the model stored in `model_dir` (from
/// its [`serving_dir`]) and the fix, in one line; `None` when nothing does.
pub fn unservable_warning(model_dir: &Path) -> Option<String> {
    let dir = serving_dir(model_dir);
    serving_gap(dir).map(|gap| format!("{}: {}", gap.describe(dir), gap.fix()))
}

/// The folder vLLM is started from for a model stored in `model_dir`: the
/// folder above it for one rank of the vLLM layout (`.../rank_<r>`).
pub fn serving_dir(model_dir: &Path) -> &Path {
    let is_rank = model_dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("rank_"))
        .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()));
    match model_dir.parent() {
        Some(parent) if is_rank => parent,
        _ => model_dir,
    }
}

/// Where the model's bytes really are. The daemon refuses a model whose
/// folder leads out of the storage path or whose partitions are symlinks,
/// so those are STOPs; a filesystem mounted inside the storage path is
/// allowed, and named. With `judge_drive`, a drive other than the storage
/// path's gets its own verdict (OS disk, tmpfs, not NVMe...); the storage
/// path's own is storage.device's, not said twice.
fn device_check(storage: &Path, dir: &Path, judge_drive: bool) -> Option<Check> {
    let name = "model.device";
    let root = std::fs::canonicalize(storage).ok()?;
    let real = std::fs::canonicalize(dir).ok()?;
    let data = dir.join("tensor.data_0");
    // The daemon refuses any partition that is a symlink.
    let linked = (0..)
        .map(|i| dir.join(format!("tensor.data_{i}")))
        .map_while(|p| std::fs::symlink_metadata(&p).ok().map(|m| (p, m)))
        .find(|(_, m)| m.file_type().is_symlink())
        .map(|(p, _)| p);
    if !real.starts_with(&root) || linked.is_some() {
        return Some(Check::stop(
            name,
            format!(
                "{} leads out of the storage path {} through a symlink: the daemon refuses to \
                 load it",
                linked.as_deref().unwrap_or(dir).display(),
                root.display()
            ),
            "move the model's files into the storage path (or point --storage-path at where \
             they are) instead of linking them",
        ));
    }
    if !judge_drive {
        return None;
    }
    let loc = Location::of(&data).ok()?;
    let outer = Location::of(&root).ok();
    if outer.as_ref().is_some_and(|outer| outer.dev == loc.dev) {
        // storage.device has judged this filesystem: said once.
        return Some(Check::pass(
            name,
            format!(
                "{} is on the storage path's filesystem ({}; judged under storage.device)",
                data.display(),
                loc.describe_disks()
            ),
        ));
    }
    let check = storage::device_check(name, &data, &loc);
    match outer {
        Some(outer) if check.status == super::Status::Pass => Some(Check::warn(
            name,
            format!(
                "{}; another filesystem than the storage path's ({} on {})",
                check.summary,
                outer.fstype,
                outer.describe_disks()
            ),
            "a filesystem is mounted inside the storage path: make sure it is the drive you \
                 meant",
        )),
        _ => Some(check),
    }
}

fn verify_check(model: &str, dirs: &[PathBuf], quick: bool) -> Check {
    let name = "model.verify";
    let depth = if quick { Depth::Structure } else { Depth::Full };
    let mut problems = Vec::new();
    let mut unchecked = Vec::new();
    let (mut bytes, mut tensors) = (0u64, 0usize);
    for dir in dirs {
        match verify_model_to(dir, depth, &()) {
            Ok(report) => {
                bytes += report.total_bytes;
                tensors += report.tensors;
                problems.extend(report.problems.iter().map(|p| p.to_string()));
                if !report.has_manifest {
                    unchecked.push(dir.display().to_string());
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    let what = if quick {
        "index and sizes checked"
    } else {
        "every checksum matches"
    };
    if problems.is_empty() && !unchecked.is_empty() {
        // Written by the reference tools: nothing to check the bytes against,
        // here or when the daemon loads them.
        return Check::warn(
            name,
            format!(
                "{model}: {} folder(s), {tensors} tensors, {}; index and sizes checked, but {} \
                 has no {MANIFEST_FILE}: its bytes cannot be checked, here or when the daemon \
                 loads them",
                dirs.len(),
                human_bytes(bytes),
                unchecked.join(", ")
            ),
            format!(
                "convert it again with `sllm-store save --model {model} --force` (from its \
                 safetensors) to get checksums"
            ),
        );
    }
    if problems.is_empty() {
        return Check::pass(
            name,
            format!(
                "{model}: {} folder(s), {tensors} tensors, {}; {what}",
                dirs.len(),
                human_bytes(bytes)
            ),
        );
    }
    let shown = problems.len().min(3);
    Check::stop(
        name,
        format!(
            "{model} fails verify with {} problem(s): {}{}",
            problems.len(),
            problems[..shown].join("; "),
            if problems.len() > shown { "; ..." } else { "" }
        ),
        format!("see `sllm-store verify {model}`; re-create it with `sllm-store save --force`"),
    )
}

/// A conversion from another commit than the one the ref points at now: a
/// STOP for offline readiness (the two sides would serve different weights),
/// else a WARN.
fn stale_check(
    model: &str,
    revision: &str,
    dirs: &[PathBuf],
    commit: Option<&str>,
    readiness: bool,
) -> Option<Check> {
    let commit = commit?;
    let converted_from = dirs
        .iter()
        .find_map(|d| Manifest::read(d).ok().flatten()?.source?.commit)?;
    if converted_from == commit {
        return Some(Check::pass(
            "model.source",
            format!("converted from {commit}, the snapshot that revision {revision} resolves to"),
        ));
    }
    let summary = format!(
        "converted from {converted_from}, but {revision} now points at {commit}: the stored \
         model is stale"
    );
    let fix = format!("re-convert: sllm-store save --force --model {model} --revision {commit}");
    Some(if readiness {
        Check::stop("model.source", summary, fix)
    } else {
        Check::warn("model.source", summary, fix)
    })
}
