//! `save`: converts a safetensors checkpoint (a local directory or a Hugging
//! Face cache snapshot) into the store format, atomically.
//!
//! Order of work: resolve and check the whole source (no byte is written for
//! a bad checkpoint), check the model's path (an existing model is refused
//! unless replacing; anything that is not a stored model, or a path inside
//! or around another model, always: see [`crate::placement`]), write into a
//! staging directory, fsync, publish with one rename (see [`crate::staging`]).
//! A save killed at any point leaves nothing at the final path.
//!
//! Tensor bytes flow through a two-thread pipeline: a reader thread fills
//! 8 MiB buffers from the source files in file order while this thread
//! checksums and writes the previous ones, so reading and writing overlap.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::durable::sync_dir;
use crate::format::index::contiguous_stride;
use crate::format::manifest::{SourceFile, SourceInfo};
use crate::format::writer::{WriteError, WrittenModel};
use crate::format::{ModelId, StoreWriter, TensorEntry, WriterOptions};
use crate::import::hf_cache::{HfCache, ResolveError};
use crate::import::{ImportError, SafetensorsFile, SourceCheckpoint, open_source_file};
use crate::placement::{self, PlacementError};
use crate::progress::Progress;
use crate::staging::{PublishError, Published, Staging};
use crate::units::human_bytes;

/// Size of one read buffer in the copy pipeline.
const PIECE_BYTES: usize = 8 << 20;
/// Buffers in flight between the reader and the writer.
const PIECES_IN_FLIGHT: usize = 4;

/// Where the checkpoint comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A directory holding `*.safetensors` (`--local-model-path`).
    Local(PathBuf),
    /// The Hugging Face cache, at a revision (a ref or a commit hash).
    HfCache { cache: HfCache, revision: String },
}

/// One conversion to run.
#[derive(Clone, Debug)]
pub struct SaveRequest {
    pub model: ModelId,
    pub source: Source,
    pub storage_root: PathBuf,
    /// Replace an existing model (atomically).
    pub force: bool,
    pub writer: WriterOptions,
}

/// What a finished save did.
#[derive(Clone, Debug)]
pub struct SaveReport {
    pub target: PathBuf,
    pub source_dir: PathBuf,
    /// The snapshot's commit, when from the HF cache.
    pub commit: Option<String>,
    pub written: WrittenModel,
    pub extra_files: usize,
    pub replaced: bool,
    pub seconds: f64,
}

/// A save failed; nothing was published.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(
        "cannot write to the storage path {path}: {source}; pass a writable --storage-path \
         (or set $STORAGE_PATH), or fix its permissions"
    )]
    StorageUnusable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the storage path {path} is {what}, not a folder; pass --storage-path (or set \
         $STORAGE_PATH) to the folder models are kept in"
    )]
    StorageNotAFolder { path: PathBuf, what: &'static str },
    #[error(
        "not enough space for {model} under {path}: it needs {}, {} are free; free some \
         space or pass another --storage-path",
        human_bytes(*needed), human_bytes(*available)
    )]
    NoSpace {
        model: String,
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("cannot copy {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the save of {model} was interrupted; nothing was saved, and its partial copy is removed"
    )]
    Interrupted { model: String },
}

/// Runs a conversion.
pub fn save(req: &SaveRequest, progress: &dyn Progress) -> Result<SaveReport, SaveError> {
    save_unless(req, progress, &AtomicBool::new(false))
}

/// Runs a conversion that stops when `cancel` is set (by a signal handler,
/// say): between pieces of the copy, and before publishing. A cancelled
/// save publishes nothing and removes its staging directory; once
/// publishing has begun it completes.
pub fn save_unless(
    req: &SaveRequest,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<SaveReport, SaveError> {
    let interrupted = || SaveError::Interrupted {
        model: req.model.to_string(),
    };
    let started = Instant::now();
    let (source_dir, mut info) = resolve_source(req)?;
    let checkpoint = SourceCheckpoint::open(&source_dir)?;
    // Names for the manifest (text): lossy where not UTF-8.
    info.weight_files = checkpoint
        .files
        .iter()
        .map(|f| SourceFile {
            name: f
                .path
                .strip_prefix(&source_dir)
                .unwrap_or(&f.path)
                .display()
                .to_string(),
            size_bytes: f.file_len,
        })
        .collect();
    tracing::info!(
        model = %req.model,
        source = %source_dir.display(),
        tensors = checkpoint.tensor_count(),
        bytes = checkpoint.tensor_bytes(),
        files = checkpoint.files.len(),
        "converting"
    );

    let target = req.model.dir_in(&req.storage_root);
    let unusable = |source| SaveError::StorageUnusable {
        path: req.storage_root.clone(),
        source,
    };
    if let Some(what) = crate::format::small_files::not_a_folder(&req.storage_root) {
        return Err(SaveError::StorageNotAFolder {
            path: req.storage_root.clone(),
            what,
        });
    }
    std::fs::create_dir_all(&req.storage_root).map_err(unusable)?;
    // Checked again right before publishing; this one fails before writing.
    placement::check(&req.storage_root, &req.model, req.force)?;
    check_free_space(req, &checkpoint)?;
    let staging = Staging::create(&req.storage_root, &req.model).map_err(unusable)?;

    let mut writer = StoreWriter::new(staging.path(), req.writer)?;
    progress.begin("saving", checkpoint.tensor_bytes());
    let copied = copy_tensors(&checkpoint.files, &mut writer, progress, cancel);
    progress.finish();
    copied?.ok_or_else(interrupted)?;
    tracing::info!("tensors copied; flushing them to disk");
    copy_extra_files(&checkpoint, staging.path())?;
    let written = writer.finish(Some(info.clone()))?;
    if cancel.load(Ordering::Relaxed) {
        return Err(interrupted());
    }
    let published = staging.publish(req.force)?;

    let report = SaveReport {
        target,
        source_dir,
        commit: info.commit,
        written,
        extra_files: checkpoint.extra_files.len(),
        replaced: published == Published::Replaced,
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(
        model = %req.model,
        target = %report.target.display(),
        bytes = report.written.total_bytes,
        seconds = report.seconds,
        "saved"
    );
    Ok(report)
}

fn resolve_source(req: &SaveRequest) -> Result<(PathBuf, SourceInfo), SaveError> {
    let (dir, model, revision, commit) = match &req.source {
        Source::Local(dir) => (dir.clone(), dir.to_string_lossy().into_owned(), None, None),
        Source::HfCache { cache, revision } => {
            let snap = cache.resolve(req.model.as_str(), revision)?;
            tracing::info!(revision = %revision, commit = %snap.commit, dir = %snap.dir.display(), "found in the Hugging Face cache");
            (
                snap.dir,
                req.model.to_string(),
                Some(snap.revision),
                Some(snap.commit),
            )
        }
    };
    let info = SourceInfo {
        model,
        revision,
        commit,
        directory: dir.clone(),
        weight_files: Vec::new(),
    };
    Ok((dir, info))
}

/// Fails early, before gigabytes are written, when the storage filesystem
/// cannot hold the converted model.
fn check_free_space(req: &SaveRequest, checkpoint: &SourceCheckpoint) -> Result<(), SaveError> {
    let padding = checkpoint.tensor_count() as u64 * req.writer.alignment_bytes;
    let extra: u64 = checkpoint
        .extra_files
        .iter()
        .filter_map(|rel| std::fs::metadata(checkpoint.dir.join(rel)).ok())
        .map(|m| m.len())
        .sum();
    let needed = checkpoint.tensor_bytes() + padding + extra;
    let available = free_bytes(&req.storage_root).map_err(|source| SaveError::StorageUnusable {
        path: req.storage_root.clone(),
        source,
    })?;
    if needed > available {
        return Err(SaveError::NoSpace {
            model: req.model.to_string(),
            path: req.storage_root.clone(),
            needed,
            available,
        });
    }
    Ok(())
}

/// Bytes an unprivileged writer may still use on the filesystem of `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

type Piece = Result<(Vec<u8>, usize), ImportError>;

/// Copies every tensor, in file order, into the writer and indexes it.
/// Copies every tensor into `writer`; `Ok(None)` when `cancel` stopped it.
fn copy_tensors(
    files: &[SafetensorsFile],
    writer: &mut StoreWriter,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Option<()>, SaveError> {
    let (free_tx, free_rx) = bounded::<Vec<u8>>(PIECES_IN_FLIGHT);
    let (full_tx, full_rx) = bounded::<Piece>(PIECES_IN_FLIGHT);
    for _ in 0..PIECES_IN_FLIGHT {
        free_tx
            .send(vec![0u8; PIECE_BYTES])
            .expect("the channel has room");
    }
    std::thread::scope(|scope| {
        scope.spawn(move || read_pieces(files, free_rx, full_tx));
        // The writer's channel ends drop when it returns, which stops the
        // reader if the writer failed first.
        write_pieces(files, writer, progress, cancel, free_tx, full_rx)
    })
}

/// Reader thread: fills free buffers with tensor bytes in file order.
fn read_pieces(files: &[SafetensorsFile], free: Receiver<Vec<u8>>, full: Sender<Piece>) {
    for f in files {
        let file = match open_source_file(&f.path) {
            Ok(file) => file,
            Err(e) => {
                let _ = full.send(Err(e));
                return;
            }
        };
        // Advice only: the copy is correct without it.
        let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Sequential);
        for t in &f.tensors {
            let mut pos = t.file_offset;
            let end = t.file_offset + t.len;
            while pos < end {
                let Ok(mut buf) = free.recv() else { return };
                let n = (end - pos).min(buf.len() as u64) as usize;
                let piece = match file.read_exact_at(&mut buf[..n], pos) {
                    Ok(()) => Ok((buf, n)),
                    Err(source) => Err(ImportError::Io {
                        path: f.path.clone(),
                        source,
                    }),
                };
                let failed = piece.is_err();
                if full.send(piece).is_err() || failed {
                    return;
                }
                pos += n as u64;
            }
        }
    }
}

/// Writer side: appends the pieces as records and builds the index.
fn write_pieces(
    files: &[SafetensorsFile],
    writer: &mut StoreWriter,
    progress: &dyn Progress,
    cancel: &AtomicBool,
    free: Sender<Vec<u8>>,
    full: Receiver<Piece>,
) -> Result<Option<()>, SaveError> {
    for f in files {
        for t in &f.tensors {
            let offset = writer.begin_record(t.len)?;
            let mut left = t.len;
            while left > 0 {
                if cancel.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                let (buf, n) = full.recv().map_err(|_| ImportError::Io {
                    path: f.path.clone(),
                    source: std::io::Error::other("the reader thread stopped"),
                })??;
                writer.write(&buf[..n])?;
                progress.advance(n as u64);
                left -= n as u64;
                let _ = free.send(buf);
            }
            writer.end_record()?;
            writer.add_entry(
                t.name.clone(),
                TensorEntry {
                    offset,
                    size: t.len,
                    stride: contiguous_stride(&t.shape),
                    shape: t.shape.clone(),
                    dtype: t.dtype.name().into(),
                },
            );
        }
    }
    Ok(Some(()))
}

/// Copies config, tokenizer and other non-weight files beside the index,
/// then fsyncs every directory they live in. Each source is opened with
/// [`open_source_file`] (regular files only, never blocking on a FIFO).
fn copy_extra_files(checkpoint: &SourceCheckpoint, staging: &Path) -> Result<(), SaveError> {
    let mut dirs = std::collections::BTreeSet::from([staging.to_owned()]);
    for rel in &checkpoint.extra_files {
        let from = checkpoint.dir.join(rel);
        let to = staging.join(rel);
        let copy_err = |source| SaveError::Copy {
            from: from.clone(),
            to: to.clone(),
            source,
        };
        for ancestor in rel
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
        {
            dirs.insert(staging.join(ancestor));
        }
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(copy_err)?;
        }
        let mut source = open_source_file(&from)?;
        let mode = source.metadata().map_err(copy_err)?.mode() & 0o777;
        let mut copy = File::create_new(&to).map_err(copy_err)?;
        std::io::copy(&mut source, &mut copy).map_err(copy_err)?;
        copy.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(copy_err)?;
        copy.sync_all().map_err(copy_err)?;
    }
    // Deepest first: a directory's entry in its parent is synced after it.
    for dir in dirs.iter().rev() {
        sync_dir(dir).map_err(|source| SaveError::Copy {
            from: checkpoint.dir.clone(),
            to: dir.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_larger_than_the_disk_is_refused_before_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        // A valid checkpoint one GiB larger than the free space, as a sparse
        // file: nothing real is allocated.
        let len = free_bytes(tmp.path()).unwrap() + (1 << 30);
        let header =
            format!(r#"{{"w":{{"dtype":"U8","shape":[{len}],"data_offsets":[0,{len}]}}}}"#);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        let path = src.join("model.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(bytes.len() as u64 + len)
            .expect("a sparse file of that size");

        let storage = tmp.path().join("models");
        let req = SaveRequest {
            model: ModelId::parse("o/huge").unwrap(),
            source: Source::Local(src),
            storage_root: storage.clone(),
            force: false,
            writer: WriterOptions::default(),
        };
        let err = save(&req, &()).unwrap_err();
        assert!(
            matches!(err, SaveError::NoSpace { needed, available, .. } if needed > available),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("not enough space for o/huge") && text.contains("--storage-path"),
            "{text}"
        );
        assert!(
            !storage.join(crate::staging::STAGING_DIR).exists(),
            "nothing was staged"
        );
    }
}
