//! `sllm_manifest.json`: what the writer wrote, so a reader can tell a good
//! model from a damaged one. Reference readers ignore this file.
//!
//! For each partition it records the size and an xxh3-64 checksum of every
//! fixed-size block (the last block may be short); it also records the index
//! file's size and checksum, and where the model came from. Per-block sums
//! (rather than one per file) let a reader check any chunk it has just read
//! and let `verify` say *where* damage is.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::index::INDEX_FILE;
use crate::partitions::Partitions;

/// File name of the manifest inside a model directory.
pub const MANIFEST_FILE: &str = "sllm_manifest.json";
/// Value of the `format` field; bump the number on incompatible changes.
pub const MANIFEST_FORMAT: &str = "sllm-store-manifest/1";
/// The checksum algorithm named in the manifest.
pub const CHECKSUM_ALGORITHM: &str = "xxh3-64";
/// Default checksum block: matches the daemon's default chunk size, so a
/// chunk read from disk can be checked against exactly one block.
pub const DEFAULT_BLOCK_BYTES: u64 = 32 << 20;

/// The manifest's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub checksum: String,
    pub block_bytes: u64,
    pub tensors: u64,
    /// Bytes of tensor data, padding excluded.
    pub tensor_bytes: u64,
    pub index: FileDigest,
    pub partitions: Vec<PartitionDigest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceInfo>,
    pub written_by: String,
}

/// Size and checksum of a whole small file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size_bytes: u64,
    pub xxh3: String,
}

/// Size and per-block checksums of one partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionDigest {
    pub file: String,
    pub size_bytes: u64,
    pub blocks: Vec<String>,
}

/// Where a model was converted from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Hugging Face repo id, or the local directory given.
    pub model: String,
    /// The revision asked for (`main`, a tag, a hash), when from the HF cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The snapshot's commit hash, when from the HF cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The source directory, for people reading the manifest: JSON holds
    /// text, so a path that is not UTF-8 is written lossily.
    #[serde(serialize_with = "serialize_lossy")]
    pub directory: PathBuf,
    pub weight_files: Vec<SourceFile>,
}

fn serialize_lossy<S: serde::Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&path.to_string_lossy())
}

/// One weight file of the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    pub name: String,
    pub size_bytes: u64,
}

/// Reading a manifest failed.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid manifest: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path} is {found:?} with checksum {algorithm:?}; this build reads \
         {MANIFEST_FORMAT:?} with {CHECKSUM_ALGORITHM:?}: upgrade sllm-store"
    )]
    Unsupported {
        path: PathBuf,
        found: String,
        algorithm: String,
    },
}

impl Manifest {
    /// Reads `<model_dir>/sllm_manifest.json`; `Ok(None)` when there is none
    /// (models written by the reference writer have no manifest).
    pub fn read(model_dir: &Path) -> Result<Option<Self>, ManifestError> {
        let path = model_dir.join(MANIFEST_FILE);
        let bytes = match crate::small_files::read_regular_file(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ManifestError::Read { path, source }),
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| ManifestError::Parse {
                path: path.clone(),
                source,
            })?;
        if manifest.format != MANIFEST_FORMAT
            || manifest.checksum != CHECKSUM_ALGORITHM
            || manifest.block_bytes == 0
        {
            return Err(ManifestError::Unsupported {
                path,
                found: manifest.format,
                algorithm: manifest.checksum,
            });
        }
        Ok(Some(manifest))
    }

    /// Where this manifest and the files beside it disagree, without reading
    /// a tensor byte: the index (`index_bytes`, the content of
    /// `tensor_index.json`) against its recorded size and checksum, the
    /// number of partitions, and each partition's size and count of checksum
    /// blocks. One line per disagreement, each naming the file; empty when
    /// they agree. Checking the blocks themselves is the reader's job.
    pub fn mismatches(
        &self,
        model_dir: &Path,
        parts: &Partitions,
        index_bytes: Option<&[u8]>,
    ) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(bytes) = index_bytes {
            let sum = checksum_hex(checksum(bytes));
            if bytes.len() as u64 != self.index.size_bytes || sum != self.index.xxh3 {
                out.push(format!(
                    "{} changed since it was written: {} bytes with checksum {sum}, the \
                     manifest says {} bytes with {}",
                    model_dir.join(INDEX_FILE).display(),
                    bytes.len(),
                    self.index.size_bytes,
                    self.index.xxh3
                ));
            }
        }
        if self.partitions.len() != parts.len() {
            out.push(format!(
                "{} lists {} partitions but {} are on disk",
                model_dir.join(MANIFEST_FILE).display(),
                self.partitions.len(),
                parts.len()
            ));
        }
        for (expected, part) in self.partitions.iter().zip(parts.iter()) {
            if part.size != expected.size_bytes {
                out.push(format!(
                    "{} is {} bytes but the manifest says {}: the file was truncated or replaced",
                    part.path.display(),
                    part.size,
                    expected.size_bytes
                ));
            } else if expected.blocks.len() as u64 != part.size.div_ceil(self.block_bytes) {
                out.push(format!(
                    "{} lists {} checksum blocks for {}, which has {} of {} bytes",
                    model_dir.join(MANIFEST_FILE).display(),
                    expected.blocks.len(),
                    part.path.display(),
                    part.size.div_ceil(self.block_bytes),
                    self.block_bytes
                ));
            }
        }
        out
    }

    /// Pretty JSON, for people who open the file.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the manifest always serializes")
    }
}

/// A checksum as written in the manifest.
pub fn checksum_hex(sum: u64) -> String {
    format!("{sum:016x}")
}

/// The checksum of a whole byte string.
pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Streams bytes and cuts them into checksummed blocks of a fixed size.
pub struct BlockHasher {
    block_bytes: u64,
    hasher: Xxh3,
    filled: u64,
    blocks: Vec<u64>,
}

impl BlockHasher {
    /// A hasher with `block_bytes`-sized blocks (must be non-zero).
    pub fn new(block_bytes: u64) -> Self {
        assert!(block_bytes > 0, "checksum block size must be non-zero");
        Self {
            block_bytes,
            hasher: Xxh3::new(),
            filled: 0,
            blocks: Vec::new(),
        }
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = (self.block_bytes - self.filled).min(bytes.len() as u64) as usize;
            let (head, tail) = bytes.split_at(room);
            self.hasher.update(head);
            self.filled += room as u64;
            bytes = tail;
            if self.filled == self.block_bytes {
                self.blocks.push(self.hasher.digest());
                self.hasher.reset();
                self.filled = 0;
            }
        }
    }

    /// The block checksums, the last (short) block included.
    pub fn finish(mut self) -> Vec<u64> {
        if self.filled > 0 {
            self.blocks.push(self.hasher.digest());
        }
        self.blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_do_not_depend_on_how_bytes_arrive() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut whole = BlockHasher::new(4096);
        whole.update(&data);
        let whole = whole.finish();
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[0], checksum(&data[..4096]));
        assert_eq!(whole[2], checksum(&data[8192..]));

        let mut pieces = BlockHasher::new(4096);
        for piece in data.chunks(777) {
            pieces.update(piece);
        }
        assert_eq!(pieces.finish(), whole);
        assert!(BlockHasher::new(8).finish().is_empty());
    }

    #[test]
    fn a_source_directory_that_is_not_utf8_still_serializes() {
        use std::os::unix::ffi::OsStrExt;
        let source = SourceInfo {
            model: "m".into(),
            revision: None,
            commit: None,
            directory: Path::new(std::ffi::OsStr::from_bytes(b"/src\xff")).to_owned(),
            weight_files: Vec::new(),
        };
        let json = serde_json::to_value(&source).unwrap();
        assert_eq!(json["directory"], "/src\u{fffd}");
    }
}
