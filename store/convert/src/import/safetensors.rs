//! Reading one `.safetensors` file's header without mapping the file: the
//! tensors it holds, where their bytes are, and whether the file is whole.
//!
//! The `safetensors` crate parses and validates the header (offsets
//! contiguous, sizes matching shape and dtype, no overflow); we add what it
//! can only check with the whole file in memory: the data region's length
//! against the file's.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::ImportError;
use crate::format::TorchDtype;

/// The crate's limit on header size (and Python's); a larger header is not
/// safetensors.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor in a source file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceTensor {
    pub name: String,
    pub dtype: TorchDtype,
    pub shape: Vec<u64>,
    /// Absolute byte offset of the data in the file.
    pub file_offset: u64,
    pub len: u64,
}

/// A parsed safetensors file.
#[derive(Clone, Debug)]
pub struct SafetensorsFile {
    pub path: PathBuf,
    pub file_len: u64,
    /// Tensors in the order of their data in the file.
    pub tensors: Vec<SourceTensor>,
}

impl SafetensorsFile {
    /// Reads and checks the header of `path`.
    pub fn open(path: &Path) -> Result<Self, ImportError> {
        let io_err = |source| ImportError::Io {
            path: path.to_owned(),
            source,
        };
        let invalid = |reason: String| ImportError::InvalidSafetensors {
            path: path.to_owned(),
            reason,
        };
        let mut file = super::open_source_file(path)?;
        let file_len = file.metadata().map_err(io_err)?.len();
        if file_len < 8 {
            return Err(invalid(format!(
                "the file is {file_len} bytes, shorter than the 8-byte header length; it is \
                 truncated (an interrupted download?)"
            )));
        }
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes).map_err(io_err)?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES {
            return Err(invalid(format!(
                "the header claims {header_len} bytes, more than the format's limit of \
                 {MAX_HEADER_BYTES}; this is not a safetensors file"
            )));
        }
        if 8 + header_len > file_len {
            return Err(invalid(format!(
                "the header claims {header_len} bytes but the file has only {} after the length; \
                 it is truncated (an interrupted download?)",
                file_len - 8
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io_err)?;
        if let Some(name) = duplicate_key(&header) {
            return Err(invalid(format!(
                "the header names {name:?} twice; the format forbids duplicate keys: the file is \
                 damaged or was not written by a safetensors library"
            )));
        }
        let metadata: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).map_err(|e| invalid(format!("bad header: {e}")))?;

        let data_start = 8 + header_len;
        let data_len = metadata.data_len() as u64;
        let present = file_len - data_start;
        if data_len > present {
            return Err(invalid(format!(
                "the header describes {data_len} bytes of tensor data but the file holds {present}; \
                 it is truncated (an interrupted download?): fetch it again"
            )));
        }
        if data_len < present {
            return Err(invalid(format!(
                "the file has {} bytes after the last tensor; it is damaged or not safetensors",
                present - data_len
            )));
        }

        let mut tensors = Vec::new();
        for name in metadata.offset_keys() {
            let info = metadata.info(&name).expect("offset_keys names a tensor");
            let dtype = TorchDtype::from_safetensors(info.dtype).ok_or_else(|| {
                ImportError::UnsupportedDtype {
                    path: path.to_owned(),
                    tensor: name.clone(),
                    dtype: info.dtype.to_string(),
                }
            })?;
            let (start, end) = info.data_offsets;
            tensors.push(SourceTensor {
                name,
                dtype,
                shape: info.shape.iter().map(|&d| d as u64).collect(),
                file_offset: data_start + start as u64,
                len: (end - start) as u64,
            });
        }
        // The crate orders by offset; tensors that share one (empty ones,
        // and the tensor after them) come in hash-map order, which differs
        // from run to run. By offset, then length (empty ones first, so the
        // tensors still lie back to back), then name: one checkpoint always
        // converts to the same index.
        tensors
            .sort_by(|a, b| (a.file_offset, a.len, &a.name).cmp(&(b.file_offset, b.len, &b.name)));
        Ok(Self {
            path: path.to_owned(),
            file_len,
            tensors,
        })
    }
}

/// A key the header's top-level object holds twice (a JSON map would keep
/// the last silently); `None` when there is none, or when the header is not
/// an object (the full parse says why).
fn duplicate_key(header: &[u8]) -> Option<String> {
    struct Keys;
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                if !seen.insert(key.clone()) {
                    return Ok(Some(key));
                }
            }
            Ok(None)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(header);
    serde::Deserializer::deserialize_map(&mut de, Keys)
        .ok()
        .flatten()
}
