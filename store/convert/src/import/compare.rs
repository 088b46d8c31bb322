//! Comparing a stored model with the checkpoint it was converted from,
//! tensor by tensor and byte by byte (the demo's proof, and a tool for
//! doubting a conversion).

use std::os::unix::fs::FileExt;
use std::path::Path;

use sllm_format::index::{INDEX_FILE, TensorIndex};
use sllm_format::partitions::Partitions;
use sllm_format::progress::Progress;
use sllm_format::verify::{Problem, READ_BYTES, VerifyError};

use super::SourceCheckpoint;

/// Compares every tensor of `source` with the stored model in `model_dir`:
/// present in the index with the same dtype and shape, and the same bytes.
/// Returns the problems found (empty when the store matches).
pub fn compare_with_source(
    model_dir: &Path,
    source: &SourceCheckpoint,
    progress: &dyn Progress,
) -> Result<Vec<Problem>, VerifyError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| VerifyError::Io { path, source }
    };
    let index = TensorIndex::read(model_dir).map_err(|e| VerifyError::Io {
        path: model_dir.join(INDEX_FILE),
        source: std::io::Error::other(e.to_string()),
    })?;
    let parts = Partitions::discover(model_dir).map_err(io(model_dir))?;
    let mut problems = Vec::new();
    let mut stored = vec![0u8; READ_BYTES];
    let mut original = vec![0u8; READ_BYTES];
    let mut open_parts = Vec::new();
    progress.begin("comparing", source.tensor_bytes());
    for f in &source.files {
        let file = super::open_source_file(&f.path).map_err(|e| VerifyError::Io {
            path: f.path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        for t in &f.tensors {
            let Some(e) = index.get(&t.name) else {
                problems.push(Problem(format!(
                    "tensor {:?} is missing from the index",
                    t.name
                )));
                continue;
            };
            if e.dtype != t.dtype.name() || e.shape != t.shape || e.size != t.len {
                problems.push(Problem(format!(
                    "tensor {:?}: stored as {} {:?} ({} bytes), source has {} {:?} ({} bytes)",
                    t.name, e.dtype, e.shape, e.size, t.dtype, t.shape, t.len
                )));
                continue;
            }
            let mut done = 0u64;
            while done < t.len {
                let n = (t.len - done).min(READ_BYTES as u64) as usize;
                file.read_exact_at(&mut original[..n], t.file_offset + done)
                    .map_err(io(&f.path))?;
                parts
                    .read_exact_at(&mut open_parts, e.offset + done, &mut stored[..n])
                    .map_err(io(model_dir))?;
                if original[..n] != stored[..n] {
                    problems.push(Problem(format!(
                        "tensor {:?}: bytes differ from {} within [{done}, {})",
                        t.name,
                        f.path.display(),
                        done + n as u64
                    )));
                    break;
                }
                done += n as u64;
                progress.advance(n as u64);
            }
        }
    }
    progress.finish();
    Ok(problems)
}
