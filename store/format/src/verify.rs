//! Checks a stored model: the index parses; every entry's dtype, shape,
//! stride and size agree and lie inside the partitions; no two distinct
//! records overlap; partitions and checksums match the manifest when there is
//! one. Every problem is collected, none stops the check early, so one run
//! names everything that is wrong.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::index::{INDEX_FILE, TensorIndex};
use crate::manifest::{Manifest, checksum_hex};
use crate::partitions::Partitions;
use crate::progress::Progress;
use crate::units::human_bytes;

/// Read size while checksumming.
pub const READ_BYTES: usize = 8 << 20;

/// The model could not be checked at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "no model at {path}: the directory does not exist; check --storage-path \
         (or $STORAGE_PATH) and the model id, or create it with `sllm-store save`"
    )]
    NotFound { path: PathBuf },
    #[error(
        "no model at {path}: it is {what}, not a model folder; check the model id and \
         --storage-path (or $STORAGE_PATH)"
    )]
    NotAFolder { path: PathBuf, what: &'static str },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One thing wrong with a stored model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem(pub String);

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The outcome of a check.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    pub tensors: usize,
    pub partitions: usize,
    pub total_bytes: u64,
    /// Checksum blocks compared against the manifest (0 without a manifest).
    pub blocks_checked: usize,
    pub has_manifest: bool,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, text: impl Into<String>) {
        self.problems.push(Problem(text.into()));
    }
}

/// How much of a model to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    /// Index, partitions, sizes and every checksum block (reads every byte).
    Full,
    /// Index, partitions and sizes only (reads no tensor bytes).
    Structure,
}

/// Checks the model in `model_dir`, every byte.
pub fn verify_model(
    model_dir: &Path,
    progress: &dyn Progress,
) -> Result<VerifyReport, VerifyError> {
    verify_model_to(model_dir, Depth::Full, progress)
}

/// Checks the model in `model_dir` to `depth`.
pub fn verify_model_to(
    model_dir: &Path,
    depth: Depth,
    progress: &dyn Progress,
) -> Result<VerifyReport, VerifyError> {
    if let Some(what) = crate::small_files::not_a_folder(model_dir) {
        return Err(VerifyError::NotAFolder {
            path: model_dir.to_owned(),
            what,
        });
    }
    if !model_dir.is_dir() {
        return Err(VerifyError::NotFound {
            path: model_dir.to_owned(),
        });
    }
    let mut report = VerifyReport::default();
    let parts = Partitions::discover(model_dir).map_err(|source| VerifyError::Io {
        path: model_dir.to_owned(),
        source,
    })?;
    report.partitions = parts.len();
    report.total_bytes = parts.total_size();
    if parts.is_empty() {
        report.problem(format!(
            "{} is missing: a model needs at least partition tensor.data_0",
            model_dir.join("tensor.data_0").display()
        ));
    }
    for stray in parts.unreachable() {
        report.problem(format!(
            "{} exists but an earlier partition number is missing; readers stop at the \
             first gap and never see it",
            stray.display()
        ));
    }

    let index = match TensorIndex::read(model_dir) {
        Ok(index) => Some(index),
        Err(e) => {
            report.problem(e.to_string());
            None
        }
    };
    if let Some(index) = &index {
        report.tensors = index.len();
        check_entries(index, parts.total_size(), &mut report);
    }

    match Manifest::read(model_dir) {
        Ok(Some(manifest)) => {
            report.has_manifest = true;
            check_manifest(
                model_dir,
                &manifest,
                &parts,
                index.as_ref(),
                depth,
                progress,
                &mut report,
            );
        }
        Ok(None) => {}
        Err(e) => report.problem(e.to_string()),
    }
    Ok(report)
}

fn check_entries(index: &TensorIndex, total: u64, report: &mut VerifyReport) {
    // offset -> (name, end) of the records there, to tell shared storage
    // from overlap.
    let mut at_offset: BTreeMap<u64, Vec<(&str, u64)>> = BTreeMap::new();
    for (name, e) in index.iter() {
        if e.size > 0 {
            at_offset
                .entry(e.offset)
                .or_default()
                .push((name, e.end().unwrap_or(u64::MAX)));
        }
    }
    for (name, e) in index.iter() {
        let Some(dtype) = e.dtype() else {
            report.problem(format!(
                "tensor {name:?}: unknown dtype {:?}; expected a torch name such as \"torch.float16\"",
                e.dtype
            ));
            continue;
        };
        if e.shape.len() != e.stride.len() {
            report.problem(format!(
                "tensor {name:?}: shape {:?} has {} dimensions but stride {:?} has {}",
                e.shape,
                e.shape.len(),
                e.stride,
                e.stride.len()
            ));
            continue;
        }
        let (Some(numel), Some(span), Some(end)) =
            (e.numel(), e.span_bytes(dtype.size_bytes()), e.end())
        else {
            report.problem(format!(
                "tensor {name:?}: shape, stride or offset overflow 64 bits"
            ));
            continue;
        };
        let expected = numel.saturating_mul(dtype.size_bytes());
        let shares_storage = at_offset
            .get(&e.offset)
            .is_some_and(|names| names.len() > 1);
        if e.size != expected && !(shares_storage && e.size >= span) {
            report.problem(format!(
                "tensor {name:?}: size is {} bytes but shape {:?} of {dtype} needs {expected}",
                e.size, e.shape
            ));
        } else if span > e.size {
            report.problem(format!(
                "tensor {name:?}: stride {:?} reaches {span} bytes past its offset, beyond its size {}",
                e.stride, e.size
            ));
        }
        if end > total {
            report.problem(format!(
                "tensor {name:?}: bytes [{}, {end}) lie past the end of the partitions ({total} bytes); \
                 a partition is missing or truncated",
                e.offset
            ));
        }
    }
    // Distinct records (distinct offsets) must not overlap. Records at one
    // offset are shared storage: the widest one counts.
    let mut previous: Option<(u64, &str)> = None; // (end, name)
    for (&offset, records) in &at_offset {
        let (name, _) = records[0];
        let end = records.iter().map(|&(_, end)| end).max().unwrap_or(offset);
        if let Some((prev_end, prev_name)) = previous
            && offset < prev_end
        {
            report.problem(format!(
                "tensors {prev_name:?} and {name:?} overlap: {prev_name:?} ends at byte \
                     {prev_end}, {name:?} starts at {offset}"
            ));
        }
        if previous.is_none_or(|(prev_end, _)| end > prev_end) {
            previous = Some((end, name));
        }
    }
}

fn check_manifest(
    model_dir: &Path,
    manifest: &Manifest,
    parts: &Partitions,
    index: Option<&TensorIndex>,
    depth: Depth,
    progress: &dyn Progress,
    report: &mut VerifyReport,
) {
    let index_bytes = std::fs::read(model_dir.join(INDEX_FILE)).ok();
    for problem in manifest.mismatches(model_dir, parts, index_bytes.as_deref()) {
        report.problem(problem);
    }
    let total = manifest
        .partitions
        .iter()
        .fold(0u64, |sum, p| sum.saturating_add(p.size_bytes));
    progress.begin("verifying", total);
    let mut buf = vec![0u8; READ_BYTES];
    for (expected, part) in manifest.partitions.iter().zip(parts.iter()) {
        // Sizes and block counts that disagree were reported above.
        let blocks = part.size.div_ceil(manifest.block_bytes);
        if part.size != expected.size_bytes
            || expected.blocks.len() as u64 != blocks
            || depth == Depth::Structure
        {
            continue;
        }
        let bad = match check_blocks(
            &part.path,
            manifest.block_bytes,
            &expected.blocks,
            &mut buf,
            progress,
        ) {
            Ok((checked, bad)) => {
                report.blocks_checked += checked;
                bad
            }
            Err(e) => {
                report.problem(format!("cannot read {}: {e}", part.path.display()));
                continue;
            }
        };
        for (first, last) in runs(&bad) {
            let start = first as u64 * manifest.block_bytes;
            let end = ((last + 1) as u64 * manifest.block_bytes).min(part.size);
            let hit = index.map(|i| tensors_in(i, part.start + start, part.start + end));
            let blocks = if first == last {
                format!("checksum block {first}")
            } else {
                format!("checksum blocks {first} to {last}")
            };
            report.problem(format!(
                "{}: bytes [{start}, {end}) ({blocks}) differ from the manifest{}; re-create the \
                 model with `sllm-store save --force`",
                part.path.display(),
                hit.map(|h| format!(", affecting {h}")).unwrap_or_default()
            ));
        }
    }
    progress.finish();
}

/// Checksums `path` block by block; returns (blocks checked, bad block numbers).
fn check_blocks(
    path: &Path,
    block_bytes: u64,
    expected: &[String],
    buf: &mut [u8],
    progress: &dyn Progress,
) -> std::io::Result<(usize, Vec<usize>)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let blocks = size.div_ceil(block_bytes) as usize;
    let mut bad = Vec::new();
    for block in 0..blocks {
        let start = block as u64 * block_bytes;
        let len = block_bytes.min(size - start);
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], start + done)?;
            hasher.update(&buf[..n]);
            done += n as u64;
            progress.advance(n as u64);
        }
        if expected.get(block) != Some(&checksum_hex(hasher.digest())) {
            bad.push(block);
        }
    }
    if expected.len() > blocks {
        bad.extend(blocks..expected.len());
    }
    Ok((blocks, bad))
}

/// Consecutive numbers folded into inclusive ranges.
fn runs(numbers: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &n in numbers {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == n => *last = n,
            _ => out.push((n, n)),
        }
    }
    out
}

/// Names the tensors whose records intersect global bytes [start, end).
fn tensors_in(index: &TensorIndex, start: u64, end: u64) -> String {
    const SHOWN: usize = 5;
    let names: Vec<&str> = index
        .iter()
        .filter(|(_, e)| e.size > 0 && e.offset < end && e.end().is_some_and(|x| x > start))
        .map(|(n, _)| n)
        .collect();
    match names.len() {
        0 => "padding only".into(),
        n if n <= SHOWN => format!("tensors {}", names.join(", ")),
        n => format!(
            "tensors {} and {} more",
            names[..SHOWN].join(", "),
            n - SHOWN
        ),
    }
}

/// One line for people: what was checked.
pub fn summary_line(model: &str, report: &VerifyReport, seconds: f64) -> String {
    let checksums = if report.has_manifest {
        match report.blocks_checked {
            1 => "1 checksum block".into(),
            n => format!("{n} checksum blocks"),
        }
    } else {
        "no manifest, checksums not checked".into()
    };
    format!(
        "{model}: {} tensors, {} in {} partition(s), {checksums}, {seconds:.2} s",
        report.tensors,
        human_bytes(report.total_bytes),
        report.partitions,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_runs() {
        assert_eq!(runs(&[]), []);
        assert_eq!(runs(&[1, 2, 3, 7, 9, 10]), [(1, 3), (7, 7), (9, 10)]);
    }
}
