//! The partition files `tensor.data_0`, `tensor.data_1`, ... seen as one
//! logical byte range.
//!
//! Readers discover partitions by probing from 0 upward until a number is
//! missing, exactly as the reference daemon does; byte `g` of the model lives
//! in the partition whose predecessors' sizes sum to at most `g`.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Prefix of partition file names.
pub const PARTITION_PREFIX: &str = "tensor.data_";

/// File name of partition `i`.
pub fn partition_file_name(i: usize) -> String {
    format!("{PARTITION_PREFIX}{i}")
}

/// The number in a partition file name, if `name` is one.
pub fn partition_number(name: &str) -> Option<usize> {
    let digits = name.strip_prefix(PARTITION_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What tells one version of a file from another: a file replaced (a
/// re-save swaps in new inodes) or written in place (a new mtime, usually a
/// new size) differs from its old stamp in at least one field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
}

impl FileStamp {
    /// The stamp of the file `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// One partition file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub path: PathBuf,
    pub size: u64,
    /// Global offset of the partition's first byte.
    pub start: u64,
    /// The file as it was when discovered.
    pub stamp: FileStamp,
}

/// A model's partitions, in order.
#[derive(Clone, Debug, Default)]
pub struct Partitions {
    parts: Vec<Partition>,
    /// Partition files after the first gap: readers never see them.
    unreachable: Vec<PathBuf>,
}

impl Partitions {
    /// Probes `tensor.data_<i>` in `model_dir` from 0 until one is missing.
    pub fn discover(model_dir: &Path) -> io::Result<Self> {
        let mut parts = Vec::new();
        let mut start = 0u64;
        loop {
            let path = model_dir.join(partition_file_name(parts.len()));
            let meta = match std::fs::metadata(&path) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) => return Err(e),
            };
            if !meta.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not a regular file", path.display()),
                ));
            }
            parts.push(Partition {
                path,
                size: meta.len(),
                start,
                stamp: FileStamp::of(&meta),
            });
            start += meta.len();
        }
        let mut unreachable = Vec::new();
        for dirent in std::fs::read_dir(model_dir)? {
            let dirent = dirent?;
            let name = dirent.file_name();
            if let Some(i) = name.to_str().and_then(partition_number)
                && i >= parts.len()
            {
                unreachable.push(dirent.path());
            }
        }
        unreachable.sort();
        Ok(Self { parts, unreachable })
    }

    /// The partitions, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Partition> {
        self.parts.iter()
    }

    /// Number of partitions.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    /// True when there is no partition at all.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Partition files that exist past a missing number.
    pub fn unreachable(&self) -> &[PathBuf] {
        &self.unreachable
    }

    /// The model's size: the sum of the partitions' sizes.
    pub fn total_size(&self) -> u64 {
        self.parts.last().map_or(0, |p| p.start + p.size)
    }

    /// The partition holding global byte `offset` and the offset inside it.
    pub fn locate(&self, offset: u64) -> Option<(usize, u64)> {
        let i = self.parts.partition_point(|p| p.start + p.size <= offset);
        let p = self.parts.get(i)?;
        Some((i, offset - p.start))
    }

    /// Reads `buf.len()` bytes at global `offset`, across partition
    /// boundaries. `files` caches open partitions between calls.
    pub fn read_exact_at(
        &self,
        files: &mut Vec<Option<File>>,
        mut offset: u64,
        mut buf: &mut [u8],
    ) -> io::Result<()> {
        files.resize_with(self.parts.len(), || None);
        while !buf.is_empty() {
            let (i, local) = self.locate(offset).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "offset {offset} is past the model's end ({})",
                        self.total_size()
                    ),
                )
            })?;
            let part = &self.parts[i];
            let file = match &mut files[i] {
                Some(f) => f,
                slot => slot.insert(File::open(&part.path)?),
            };
            let n = (part.size - local).min(buf.len() as u64) as usize;
            let (head, tail) = buf.split_at_mut(n);
            file.read_exact_at(head, local)?;
            buf = tail;
            offset += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(partition_file_name(12), "tensor.data_12");
        assert_eq!(partition_number("tensor.data_12"), Some(12));
        assert_eq!(partition_number("tensor.data_"), None);
        assert_eq!(partition_number("tensor.data_1a"), None);
        assert_eq!(partition_number("tensor.data"), None);
    }

    #[test]
    fn reads_across_boundaries_and_finds_gaps() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tensor.data_0"), b"abc").unwrap();
        std::fs::write(dir.path().join("tensor.data_1"), b"").unwrap();
        std::fs::write(dir.path().join("tensor.data_2"), b"defgh").unwrap();
        std::fs::write(dir.path().join("tensor.data_4"), b"zz").unwrap();
        let parts = Partitions::discover(dir.path()).unwrap();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.total_size(), 8);
        assert_eq!(parts.unreachable(), [dir.path().join("tensor.data_4")]);
        assert_eq!(parts.locate(0), Some((0, 0)));
        assert_eq!(parts.locate(3), Some((2, 0)));
        assert_eq!(parts.locate(7), Some((2, 4)));
        assert_eq!(parts.locate(8), None);

        let mut files = Vec::new();
        let mut buf = [0u8; 6];
        parts.read_exact_at(&mut files, 1, &mut buf).unwrap();
        assert_eq!(&buf, b"bcdefg");
        let mut past = [0u8; 2];
        assert!(parts.read_exact_at(&mut files, 7, &mut past).is_err());
    }
}
