//! A model's files as the registry last read them, and how to tell when they
//! change.
//!
//! [`ModelStamp`] is the model directory's identity plus a [`FileStamp`] of
//! the index, the manifest and every partition: a handful of `stat` calls,
//! taken on every request that names the model. A re-save swaps in a new
//! directory (new inodes), an edit in place changes an mtime or a size, so
//! any change to what a client could read shows in the stamp.
//!
//! [`OnDisk::read`] reads what the daemon needs to serve a model (its
//! partitions, the manifest's block checksums, the index checked against the
//! manifest) between two stamps, and retries until both are equal, whatever
//! the reading found, errors included: a model swapped mid-read is read
//! again, never called damaged. What it returns belongs to one version of
//! the model. (A directory swapped out and back again between the two stamps
//! would go unseen; saves never bring an old directory back, and a load
//! checks each partition it opens against its stamp anyway.)

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sllm_format::manifest::ManifestError;
use sllm_format::partitions::{FileStamp, Partitions, partition_file_name};
use sllm_format::{INDEX_FILE, MANIFEST_FILE, Manifest, TensorIndex};

/// How often [`OnDisk::read`] tries for a stable view of a model that keeps
/// changing under it.
const READ_ATTEMPTS: usize = 3;

/// One version of a model's files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelStamp {
    /// The model directory, symlinks resolved.
    real_dir: PathBuf,
    /// `(st_dev, st_ino)` of the directory: a re-save publishes a new one.
    dir: (u64, u64),
    index: Option<FileStamp>,
    manifest: Option<FileStamp>,
    partitions: Vec<FileStamp>,
}

impl ModelStamp {
    /// Stamps the model in `real_dir` (a canonical path). Symlinks are not
    /// followed, so a partition replaced by a link changes the stamp too.
    pub fn read(real_dir: &Path) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let dir = std::fs::metadata(real_dir)?;
        let stamp = |name: &str| match std::fs::symlink_metadata(real_dir.join(name)) {
            Ok(meta) => Ok(Some(FileStamp::of(&meta))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
        let mut partitions = Vec::new();
        while let Some(p) = stamp(&partition_file_name(partitions.len()))? {
            partitions.push(p);
        }
        Ok(Self {
            real_dir: real_dir.to_owned(),
            dir: (dir.dev(), dir.ino()),
            index: stamp(INDEX_FILE)?,
            manifest: stamp(MANIFEST_FILE)?,
            partitions,
        })
    }

    /// The model directory this stamp was taken of.
    pub fn real_dir(&self) -> &Path {
        &self.real_dir
    }
}

/// The manifest's checksum of every block of every partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSums {
    pub block_bytes: u64,
    /// `partitions[p][b]`: xxh3-64 of block `b` of partition `p`.
    pub partitions: Vec<Vec<u64>>,
}

/// What the daemon knows about one version of a model.
#[derive(Debug)]
pub struct OnDisk {
    pub stamp: ModelStamp,
    pub partitions: Partitions,
    /// `None` for models without a manifest (written by the reference tools).
    pub checksums: Option<Arc<BlockSums>>,
}

/// A model's files could not be read, or disagree with its manifest.
#[derive(Debug, thiserror::Error)]
pub enum OnDiskError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{}", .0.join("; "))]
    Mismatch(Vec<String>),
    #[error("{path} is a symbolic link; partitions must be regular files")]
    Symlink { path: PathBuf },
    #[error(
        "{dir} changed {READ_ATTEMPTS} times while it was being read; wait for the save \
         writing it to finish, then load it again"
    )]
    KeptChanging { dir: PathBuf },
}

impl OnDisk {
    /// Reads the model in `real_dir` (a canonical path). With `checksums`,
    /// the manifest's block checksums are kept for checking reads, and the
    /// index and partitions are checked against the manifest; without, the
    /// manifest is not read at all.
    pub fn read(real_dir: &Path, checksums: bool) -> Result<Self, OnDiskError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| OnDiskError::Io { path, source }
        };
        for _ in 0..READ_ATTEMPTS {
            let before = ModelStamp::read(real_dir).map_err(io_err(real_dir))?;
            let attempt = read_once(real_dir, checksums);
            let after = ModelStamp::read(real_dir).map_err(io_err(real_dir))?;
            // Whatever the attempt found, errors included, counts only if
            // the model held still while it was read: a save swapping it in
            // meanwhile must not look like damage.
            if before != after {
                continue;
            }
            let (partitions, checksums) = attempt?;
            return Ok(Self {
                stamp: after,
                partitions,
                checksums,
            });
        }
        Err(OnDiskError::KeptChanging {
            dir: real_dir.to_owned(),
        })
    }
}

/// One reading of the partitions and (with `checksums`) the manifest.
fn read_once(
    real_dir: &Path,
    checksums: bool,
) -> Result<(Partitions, Option<Arc<BlockSums>>), OnDiskError> {
    let partitions = Partitions::discover(real_dir).map_err(|source| OnDiskError::Io {
        path: real_dir.to_owned(),
        source,
    })?;
    // A partition that is a symlink could lead anywhere; they are also
    // opened with O_NOFOLLOW at load time, so a later swap fails too.
    for p in partitions.iter() {
        let meta = std::fs::symlink_metadata(&p.path).map_err(|source| OnDiskError::Io {
            path: p.path.clone(),
            source,
        })?;
        if meta.file_type().is_symlink() {
            return Err(OnDiskError::Symlink {
                path: p.path.clone(),
            });
        }
    }
    let manifest = if checksums {
        Manifest::read(real_dir)?
    } else {
        None
    };
    let sums = match manifest {
        Some(manifest) => Some(Arc::new(check_manifest(real_dir, &manifest, &partitions)?)),
        None => {
            check_index_reach(real_dir, &partitions)?;
            None
        }
    };
    Ok((partitions, sums))
}

/// Without a manifest (the reference tools write none, and `--no-checksums`
/// reads none) only the index says how many bytes the model should have:
/// a partition truncated, or one missing at the end, shows as a tensor
/// placed past the end of the partitions. Caught here, the load fails with
/// what happened instead of the client's copies failing as out of range.
/// A missing index is left to the client (it cannot plan without one).
fn check_index_reach(real_dir: &Path, partitions: &Partitions) -> Result<(), OnDiskError> {
    if partitions.is_empty() {
        // No tensor.data_0: not a model here (NOT_FOUND), not a damaged one.
        return Ok(());
    }
    let path = real_dir.join(INDEX_FILE);
    let bytes = match sllm_format::small_files::read_regular_file(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(OnDiskError::Io { path, source }),
    };
    let index = TensorIndex::from_json(&bytes).map_err(|e| {
        OnDiskError::Mismatch(vec![format!(
            "{} is not a tensor index ({e}); clients plan their copies from it: save the \
             model again",
            path.display()
        )])
    })?;
    let total = partitions.total_size();
    let furthest = index
        .iter()
        .map(|(name, e)| (name, e.end().unwrap_or(u64::MAX)))
        .max_by_key(|&(_, end)| end);
    match furthest {
        Some((name, end)) if end > total => Err(OnDiskError::Mismatch(vec![format!(
            "{} places tensor {name:?} up to byte {end}, but the partitions hold {total} bytes: \
             a partition is truncated or missing; `sllm-store verify` on the model says which, \
             then save the model again",
            path.display(),
        )])),
        _ => Ok(()),
    }
}

/// The manifest's checksums, once the index and partitions agree with it.
fn check_manifest(
    real_dir: &Path,
    manifest: &Manifest,
    partitions: &Partitions,
) -> Result<BlockSums, OnDiskError> {
    let index_path = real_dir.join(INDEX_FILE);
    let index = match sllm_format::small_files::read_regular_file(&index_path) {
        Ok(bytes) => Some(bytes),
        // The daemon serves bytes, not the index; a missing one is the
        // client's concern (and `verify` reports it).
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(OnDiskError::Io {
                path: index_path,
                source,
            });
        }
    };
    let mut problems = manifest.mismatches(real_dir, partitions, index.as_deref());
    let mut sums = Vec::with_capacity(manifest.partitions.len());
    for p in &manifest.partitions {
        let parsed: Result<Vec<u64>, _> = p
            .blocks
            .iter()
            .map(|hex| u64::from_str_radix(hex, 16))
            .collect();
        match parsed {
            Ok(blocks) => sums.push(blocks),
            Err(_) => problems.push(format!(
                "{} holds a checksum of {} that is not 16 hex digits",
                real_dir.join(MANIFEST_FILE).display(),
                p.file
            )),
        }
    }
    if !problems.is_empty() {
        return Err(OnDiskError::Mismatch(problems));
    }
    Ok(BlockSums {
        block_bytes: manifest.block_bytes,
        partitions: sums,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sllm_format::{StoreWriter, TensorEntry, WriterOptions};

    /// A model of `len` bytes written by the store's writer (with manifest).
    fn write_model(dir: &Path, len: usize, block_bytes: u64) {
        let mut w = StoreWriter::new(
            dir,
            WriterOptions {
                block_bytes,
                ..WriterOptions::default()
            },
        )
        .unwrap();
        let offset = w.begin_record(len as u64).unwrap();
        w.write(&vec![5u8; len]).unwrap();
        w.end_record().unwrap();
        w.add_entry(
            "w".into(),
            TensorEntry {
                offset,
                size: len as u64,
                shape: vec![len as u64],
                stride: vec![1],
                dtype: "torch.uint8".into(),
            },
        );
        w.finish(None).unwrap();
    }

    #[test]
    fn stamps_change_with_a_resave_and_an_edit_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        std::fs::create_dir(&dir).unwrap();
        write_model(&dir, 10_000, 4096);
        let first = ModelStamp::read(&dir).unwrap();
        assert_eq!(first, ModelStamp::read(&dir).unwrap());
        assert_eq!(first.partitions.len(), 1);

        // Rewritten in place, same size: the mtime moves.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let part = dir.join("tensor.data_0");
        let bytes = std::fs::read(&part).unwrap();
        std::fs::write(&part, &bytes).unwrap();
        let edited = ModelStamp::read(&dir).unwrap();
        assert_ne!(first, edited);

        // Swapped for another directory (what `save --force` does).
        let other = tmp.path().join("n");
        std::fs::create_dir(&other).unwrap();
        write_model(&other, 10_000, 4096);
        std::fs::rename(&dir, tmp.path().join("old")).unwrap();
        std::fs::rename(&other, &dir).unwrap();
        assert_ne!(edited, ModelStamp::read(&dir).unwrap());
    }

    #[test]
    fn reads_the_checksums_and_refuses_a_model_that_disagrees_with_its_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        write_model(&dir, 10_000, 4096);
        let on_disk = OnDisk::read(&dir, true).unwrap();
        let sums = on_disk.checksums.expect("a manifest");
        assert_eq!(sums.block_bytes, 4096);
        assert_eq!(sums.partitions.len(), 1);
        assert_eq!(sums.partitions[0].len(), 3);
        assert!(OnDisk::read(&dir, false).unwrap().checksums.is_none());

        // A tampered index.
        let index = dir.join(INDEX_FILE);
        let text = std::fs::read_to_string(&index).unwrap();
        std::fs::write(&index, text.replace("[10000]", "[9999]")).unwrap();
        let err = OnDisk::read(&dir, true).unwrap_err().to_string();
        assert!(
            err.contains("tensor_index.json changed since it was written"),
            "{err}"
        );
        // Not checked when checksums are off.
        OnDisk::read(&dir, false).unwrap();
        std::fs::write(&index, text).unwrap();

        // A truncated partition.
        let part = dir.join("tensor.data_0");
        let f = std::fs::OpenOptions::new().write(true).open(&part).unwrap();
        f.set_len(4096).unwrap();
        let err = OnDisk::read(&dir, true).unwrap_err().to_string();
        assert!(err.contains("but the manifest says"), "{err}");
    }

    #[test]
    fn a_model_swapped_while_it_is_read_is_read_again_not_called_damaged() {
        use rustix::fs::{CWD, RenameFlags, renameat_with};
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        std::fs::create_dir(&dir).unwrap();
        write_model(&dir, 10_000, 4096);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (mut read, mut changing, mut wrong) = (0, 0, Vec::new());
        std::thread::scope(|scope| {
            scope.spawn(|| {
                // What `save --force` does, as fast as it can: a new version
                // (of another size, so a mix of two would look like damage)
                // swapped in, the old one deleted.
                for round in 0u64.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let next = tmp.path().join(format!("v{round}"));
                    std::fs::create_dir(&next).unwrap();
                    write_model(&next, if round % 2 == 0 { 30_000 } else { 10_000 }, 4096);
                    renameat_with(CWD, &next, CWD, &dir, RenameFlags::EXCHANGE).unwrap();
                    std::fs::remove_dir_all(&next).unwrap();
                }
            });
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(700);
            while std::time::Instant::now() < deadline {
                match OnDisk::read(&dir, true) {
                    Ok(on_disk) => {
                        let size = on_disk.partitions.total_size();
                        let blocks = on_disk.checksums.map(|s| s.partitions[0].len() as u64);
                        if blocks != Some(size.div_ceil(4096)) {
                            wrong.push(format!("{size} bytes with {blocks:?} blocks"));
                        }
                        read += 1;
                    }
                    Err(OnDiskError::KeptChanging { .. }) => changing += 1,
                    Err(e) => wrong.push(e.to_string()),
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        eprintln!("{read} whole reads, {changing} that kept changing");
        assert!(
            wrong.is_empty(),
            "a model swapped under the read: {wrong:?}"
        );
    }

    #[test]
    fn a_model_without_a_manifest_has_no_checksums() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("tensor.data_0"), [1u8; 100]).unwrap();
        let on_disk = OnDisk::read(tmp.path(), true).unwrap();
        assert!(on_disk.checksums.is_none());
        assert_eq!(on_disk.partitions.total_size(), 100);
    }

    #[test]
    fn without_a_manifest_the_index_tells_a_truncated_partition() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        write_model(&dir, 10_000, 4096);
        std::fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
        OnDisk::read(&dir, true).unwrap();
        let part = dir.join("tensor.data_0");
        let f = std::fs::OpenOptions::new().write(true).open(&part).unwrap();
        f.set_len(6_000).unwrap();
        // With the manifest gone, and with checksums off, alike.
        for checksums in [true, false] {
            let err = OnDisk::read(&dir, checksums).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, OnDiskError::Mismatch(_)), "{text}");
            for needle in [
                "\"w\" up to byte 10000",
                "hold 6000 bytes",
                "truncated",
                "verify",
            ] {
                assert!(text.contains(needle), "{needle:?} in {text}");
            }
        }
        // An index that is not one.
        std::fs::write(dir.join(INDEX_FILE), "{").unwrap();
        let text = OnDisk::read(&dir, true).unwrap_err().to_string();
        assert!(text.contains("is not a tensor index"), "{text}");
        // No partition at all is no model (the registry's NOT_FOUND), not
        // a damaged one.
        std::fs::remove_file(&part).unwrap();
        assert!(OnDisk::read(&dir, true).unwrap().partitions.is_empty());
    }
}
