//! Writes a model in the store format: records appended across partition
//! files, then the index and the manifest.
//!
//! Layout rules (shared/DESIGN.md section 2):
//! - A new partition starts when the next record would take the current one
//!   past the partition limit (10 GiB by default, as the reference writer);
//!   a record is never split, so a record larger than the limit gets a
//!   partition of its own.
//! - Each record starts at a multiple of the alignment, 4 KiB by default and
//!   never less than 256 bytes. 256 bytes is what `cudaMalloc` guarantees, so
//!   when a client mirrors the file layout in one device buffer every tensor
//!   is as aligned as if it had its own allocation; 4 KiB further makes each
//!   record start on a page and a disk sector, so a single tensor can be read
//!   with `O_DIRECT` without a bounce buffer, and keeps partition sizes
//!   multiples of 4 KiB. It costs under 4 KiB per tensor (about 1 MiB for a
//!   300-tensor 16 GiB model). The reference writer pads only to 8 bytes;
//!   readers rely on the index's offsets alone, so both layouts load alike.
//! - Records are padded with zeros up to the next aligned offset.
//! - Tensors sharing storage are written once: the caller adds several index
//!   entries with the same offset.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::durable::write_new_synced;
use crate::index::{INDEX_FILE, TensorEntry, TensorIndex};
use crate::manifest::{
    BlockHasher, CHECKSUM_ALGORITHM, FileDigest, MANIFEST_FILE, MANIFEST_FORMAT, Manifest,
    PartitionDigest, SourceInfo, checksum, checksum_hex,
};
use crate::partitions::partition_file_name;

/// The reference writer's partition limit.
pub const DEFAULT_PARTITION_LIMIT_BYTES: u64 = 10 << 30;
/// Default record alignment (see the module docs).
pub const DEFAULT_ALIGNMENT_BYTES: u64 = 4096;
/// Smallest record alignment accepted: `cudaMalloc`'s guarantee.
pub const MIN_ALIGNMENT_BYTES: u64 = 256;

/// How to lay out the files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriterOptions {
    pub partition_limit_bytes: u64,
    pub alignment_bytes: u64,
    pub block_bytes: u64,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            partition_limit_bytes: DEFAULT_PARTITION_LIMIT_BYTES,
            alignment_bytes: DEFAULT_ALIGNMENT_BYTES,
            block_bytes: crate::manifest::DEFAULT_BLOCK_BYTES,
        }
    }
}

impl WriterOptions {
    /// Checks the options against each other.
    pub fn validate(&self) -> Result<(), WriteError> {
        let a = self.alignment_bytes;
        if !a.is_power_of_two() || a < MIN_ALIGNMENT_BYTES {
            return Err(WriteError::Options(format!(
                "record alignment {a} must be a power of two of at least {MIN_ALIGNMENT_BYTES} bytes"
            )));
        }
        if self.partition_limit_bytes < a {
            return Err(WriteError::Options(format!(
                "partition size {} is smaller than the record alignment {a}; use at least {a} bytes",
                self.partition_limit_bytes
            )));
        }
        if self.block_bytes == 0 {
            return Err(WriteError::Options(
                "checksum block size must be non-zero".into(),
            ));
        }
        Ok(())
    }
}

/// Writing the model's files failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot write {path}: {source}; check free space and permissions there")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid writer options: {0}")]
    Options(String),
    #[error("internal error: record of {expected} bytes received {actual} bytes")]
    RecordLength { expected: u64, actual: u64 },
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenModel {
    pub tensors: usize,
    /// Tensor bytes, padding excluded.
    pub tensor_bytes: u64,
    /// Size of all partitions: the model size the daemon reports.
    pub total_bytes: u64,
    pub partitions: usize,
}

struct OpenPartition {
    number: usize,
    path: PathBuf,
    file: File,
    size: u64,
    hasher: BlockHasher,
}

impl OpenPartition {
    fn write(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        self.file
            .write_all(bytes)
            .map_err(|source| WriteError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.hasher.update(bytes);
        self.size += bytes.len() as u64;
        Ok(())
    }

    fn close(self) -> Result<PartitionDigest, WriteError> {
        self.file.sync_all().map_err(|source| WriteError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(PartitionDigest {
            file: partition_file_name(self.number),
            size_bytes: self.size,
            blocks: self.hasher.finish().into_iter().map(checksum_hex).collect(),
        })
    }
}

/// Appends records to partitions in a directory the caller owns (a staging
/// directory: the writer does not make anything visible).
pub struct StoreWriter {
    dir: PathBuf,
    opts: WriterOptions,
    offset: u64,
    current: Option<OpenPartition>,
    closed: Vec<PartitionDigest>,
    /// Bytes still expected for the open record.
    record_left: Option<u64>,
    index: TensorIndex,
    tensor_bytes: u64,
}

const ZEROS: [u8; 4096] = [0; 4096];

impl StoreWriter {
    /// A writer into `dir`, which must exist and hold no model files.
    pub fn new(dir: &Path, opts: WriterOptions) -> Result<Self, WriteError> {
        opts.validate()?;
        Ok(Self {
            dir: dir.to_owned(),
            opts,
            offset: 0,
            current: None,
            closed: Vec::new(),
            record_left: None,
            index: TensorIndex::new(),
            tensor_bytes: 0,
        })
    }

    fn padded(&self, len: u64) -> u64 {
        len.div_ceil(self.opts.alignment_bytes) * self.opts.alignment_bytes
    }

    fn open_next_partition(&mut self) -> Result<(), WriteError> {
        if let Some(done) = self.current.take() {
            self.closed.push(done.close()?);
        }
        let number = self.closed.len();
        let path = self.dir.join(partition_file_name(number));
        let file = File::create_new(&path).map_err(|source| WriteError::Io {
            path: path.clone(),
            source,
        })?;
        self.current = Some(OpenPartition {
            number,
            path,
            file,
            size: 0,
            hasher: BlockHasher::new(self.opts.block_bytes),
        });
        Ok(())
    }

    /// Starts a record of `len` bytes and returns its global offset. Exactly
    /// `len` bytes must follow through [`write`](Self::write) before
    /// [`end_record`](Self::end_record).
    pub fn begin_record(&mut self, len: u64) -> Result<u64, WriteError> {
        debug_assert!(self.record_left.is_none(), "record already open");
        let padded = self.padded(len);
        let roll = match &self.current {
            None => true,
            Some(p) => len > 0 && p.size > 0 && p.size + padded > self.opts.partition_limit_bytes,
        };
        if roll {
            self.open_next_partition()?;
        }
        self.record_left = Some(len);
        Ok(self.offset)
    }

    /// Appends bytes to the open record.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        let left = self.record_left.unwrap_or(0);
        if bytes.len() as u64 > left {
            return Err(WriteError::RecordLength {
                expected: left,
                actual: bytes.len() as u64,
            });
        }
        let part = self
            .current
            .as_mut()
            .expect("begin_record opened a partition");
        part.write(bytes)?;
        self.record_left = Some(left - bytes.len() as u64);
        self.offset += bytes.len() as u64;
        self.tensor_bytes += bytes.len() as u64;
        Ok(())
    }

    /// Closes the open record, padding it to the alignment.
    pub fn end_record(&mut self) -> Result<(), WriteError> {
        match self.record_left.take() {
            Some(0) => {}
            Some(left) => {
                return Err(WriteError::RecordLength {
                    expected: left,
                    actual: 0,
                });
            }
            None => debug_assert!(false, "no record open"),
        }
        let pad = self.padded(self.offset) - self.offset;
        let part = self
            .current
            .as_mut()
            .expect("begin_record opened a partition");
        let mut left = pad;
        while left > 0 {
            let n = left.min(ZEROS.len() as u64) as usize;
            part.write(&ZEROS[..n])?;
            left -= n as u64;
        }
        self.offset += pad;
        Ok(())
    }

    /// Adds an index entry. Entries that share storage share an offset.
    pub fn add_entry(&mut self, name: String, entry: TensorEntry) {
        self.index.push(name, entry);
    }

    /// Closes the last partition and writes the index and the manifest, each
    /// fsynced. The directory itself is for the caller to sync.
    pub fn finish(mut self, source: Option<SourceInfo>) -> Result<WrittenModel, WriteError> {
        if self.current.is_none() {
            // A model without bytes still has `tensor.data_0`, so that the
            // daemon's probe finds a (zero-sized) model.
            self.open_next_partition()?;
        }
        let last = self.current.take().expect("a partition is open");
        self.closed.push(last.close()?);

        let index_json = self.index.to_json();
        let index_path = self.dir.join(INDEX_FILE);
        write_new_synced(&index_path, index_json.as_bytes()).map_err(|source| WriteError::Io {
            path: index_path,
            source,
        })?;

        let written = WrittenModel {
            tensors: self.index.len(),
            tensor_bytes: self.tensor_bytes,
            total_bytes: self.offset,
            partitions: self.closed.len(),
        };
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            checksum: CHECKSUM_ALGORITHM.into(),
            block_bytes: self.opts.block_bytes,
            tensors: written.tensors as u64,
            tensor_bytes: written.tensor_bytes,
            index: FileDigest {
                size_bytes: index_json.len() as u64,
                xxh3: checksum_hex(checksum(index_json.as_bytes())),
            },
            partitions: self.closed,
            source,
            written_by: concat!("sllm-store ", env!("CARGO_PKG_VERSION")).into(),
        };
        let manifest_path = self.dir.join(MANIFEST_FILE);
        write_new_synced(&manifest_path, manifest.to_json().as_bytes()).map_err(|source| {
            WriteError::Io {
                path: manifest_path,
                source,
            }
        })?;
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::contiguous_stride;
    use crate::partitions::Partitions;

    fn write_record(w: &mut StoreWriter, bytes: &[u8]) -> u64 {
        let offset = w.begin_record(bytes.len() as u64).unwrap();
        for piece in bytes.chunks(3) {
            w.write(piece).unwrap();
        }
        w.end_record().unwrap();
        offset
    }

    fn entry(offset: u64, size: u64) -> TensorEntry {
        TensorEntry {
            offset,
            size,
            shape: vec![size],
            stride: contiguous_stride(&[size]),
            dtype: "torch.uint8".into(),
        }
    }

    #[test]
    fn aligns_records_rolls_partitions_and_shares_storage() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WriterOptions {
            partition_limit_bytes: 1024,
            alignment_bytes: 256,
            block_bytes: 300,
        };
        let mut w = StoreWriter::new(dir.path(), opts).unwrap();
        let a = write_record(&mut w, &[1; 10]);
        let b = write_record(&mut w, &[2; 700]); // 256 + 768 = 1024: still fits
        let c = write_record(&mut w, &[3; 1]); // would pass 1024: new partition
        let big = write_record(&mut w, &[4; 2000]); // larger than the limit: own partition
        let empty = write_record(&mut w, &[]);
        assert_eq!((a, b, c, big, empty), (0, 256, 1024, 1280, 3328));
        w.add_entry("a".into(), entry(a, 10));
        w.add_entry("a_alias".into(), entry(a, 10));
        w.add_entry("b".into(), entry(b, 700));
        w.add_entry("c".into(), entry(c, 1));
        w.add_entry("big".into(), entry(big, 2000));
        w.add_entry("empty".into(), entry(empty, 0));
        let written = w.finish(None).unwrap();
        assert_eq!(written.partitions, 3);
        assert_eq!(written.tensors, 6);
        assert_eq!(written.tensor_bytes, 2711);
        assert_eq!(written.total_bytes, 3328);

        let parts = Partitions::discover(dir.path()).unwrap();
        let sizes: Vec<_> = parts.iter().map(|p| p.size).collect();
        assert_eq!(sizes, [1024, 256, 2048]);
        let mut files = Vec::new();
        let mut buf = vec![0; 2000];
        parts.read_exact_at(&mut files, big, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 4));
        let mut pad = vec![9; 246];
        parts.read_exact_at(&mut files, 10, &mut pad).unwrap();
        assert!(pad.iter().all(|&b| b == 0), "padding is zeros");

        let manifest = Manifest::read(dir.path()).unwrap().unwrap();
        assert_eq!(manifest.partitions[0].blocks.len(), 4); // 1024 bytes in 300-byte blocks
        assert_eq!(manifest.partitions[2].size_bytes, 2048);
        let index = TensorIndex::read(dir.path()).unwrap();
        assert_eq!(index.get("a_alias").unwrap().offset, 0);
    }

    #[test]
    fn an_empty_model_still_has_partition_zero() {
        let dir = tempfile::tempdir().unwrap();
        let w = StoreWriter::new(dir.path(), WriterOptions::default()).unwrap();
        let written = w.finish(None).unwrap();
        assert_eq!(written.partitions, 1);
        assert_eq!(
            std::fs::metadata(dir.path().join("tensor.data_0"))
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn rejects_bad_options_and_wrong_record_lengths() {
        let dir = tempfile::tempdir().unwrap();
        for (limit, align) in [(1 << 20, 100), (1 << 20, 128), (100, 256)] {
            let opts = WriterOptions {
                partition_limit_bytes: limit,
                alignment_bytes: align,
                ..WriterOptions::default()
            };
            assert!(StoreWriter::new(dir.path(), opts).is_err());
        }
        let mut w = StoreWriter::new(dir.path(), WriterOptions::default()).unwrap();
        w.begin_record(4).unwrap();
        assert!(matches!(
            w.write(&[0; 5]),
            Err(WriteError::RecordLength { .. })
        ));
        w.write(&[0; 3]).unwrap();
        assert!(matches!(
            w.end_record(),
            Err(WriteError::RecordLength { .. })
        ));
    }
}
