//! `tensor_index.json`: tensor name -> `[offset, size, shape, stride, dtype]`.
//!
//! `offset` is the global byte offset of the tensor's record across the
//! partitions, `size` its byte count, `shape` and `stride` lists of element
//! counts, `dtype` a torch name (`"torch.float16"`). Tensors that share storage
//! share an offset. Entries keep the order of the file, and a name may appear
//! only once (a JSON parser would silently keep the last of two).

use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::dtype::TorchDtype;

/// File name of the index inside a model directory.
pub const INDEX_FILE: &str = "tensor_index.json";

/// One tensor's place in the partitions and how to view its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(from = "(u64, u64, Vec<u64>, Vec<u64>, String)")]
pub struct TensorEntry {
    pub offset: u64,
    pub size: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
    /// Kept as written so that an index with an unknown dtype still parses;
    /// [`TensorEntry::dtype`] interprets it.
    pub dtype: String,
}

impl From<(u64, u64, Vec<u64>, Vec<u64>, String)> for TensorEntry {
    fn from((offset, size, shape, stride, dtype): (u64, u64, Vec<u64>, Vec<u64>, String)) -> Self {
        Self {
            offset,
            size,
            shape,
            stride,
            dtype,
        }
    }
}

impl TensorEntry {
    /// The entry's dtype, if it is one the store knows.
    pub fn dtype(&self) -> Option<TorchDtype> {
        TorchDtype::from_name(&self.dtype)
    }

    /// Number of elements, `None` on overflow. A scalar (empty shape) has one.
    pub fn numel(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// Bytes the shape and stride reach from the record's start: one past the
    /// last element addressed. Zero for tensors with no elements; `None` on
    /// overflow or when shape and stride disagree in length.
    pub fn span_bytes(&self, element_bytes: u64) -> Option<u64> {
        if self.shape.len() != self.stride.len() {
            return None;
        }
        if self.shape.contains(&0) {
            return Some(0);
        }
        let last = self
            .shape
            .iter()
            .zip(&self.stride)
            .try_fold(0u64, |acc, (&d, &s)| {
                acc.checked_add((d - 1).checked_mul(s)?)
            })?;
        last.checked_add(1)?.checked_mul(element_bytes)
    }

    /// One past the record's last byte, `None` on overflow.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.size)
    }
}

/// Row-major strides, in elements, for a contiguous tensor of `shape`.
pub fn contiguous_stride(shape: &[u64]) -> Vec<u64> {
    let mut stride = vec![1u64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        stride[i] = stride[i + 1].saturating_mul(shape[i + 1].max(1));
    }
    stride
}

/// The whole index, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TensorIndex {
    entries: Vec<(String, TensorEntry)>,
}

/// Reading or writing an index failed.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a valid tensor index: {source}; each entry must be \
         \"name\": [offset, size, [shape...], [stride...], \"torch.dtype\"]. \
         Re-create the model with `sllm-store save --force`"
    )]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl TensorIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an entry. Names must be unique; the writer guarantees it and a
    /// duplicate is a programming error.
    pub fn push(&mut self, name: String, entry: TensorEntry) {
        debug_assert!(self.get(&name).is_none(), "duplicate tensor name {name}");
        self.entries.push((name, entry));
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &TensorEntry)> {
        self.entries.iter().map(|(n, e)| (n.as_str(), e))
    }

    /// The entry named `name` (linear search: for tests and tools, not hot paths).
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, e)| e)
    }

    /// Parses index JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Reads `<model_dir>/tensor_index.json`.
    pub fn read(model_dir: &Path) -> Result<Self, IndexError> {
        let path = model_dir.join(INDEX_FILE);
        let bytes =
            crate::small_files::read_regular_file(&path).map_err(|source| IndexError::Read {
                path: path.clone(),
                source,
            })?;
        Self::from_json(&bytes).map_err(|source| IndexError::Parse { path, source })
    }

    /// The index as JSON, formatted as Python's `json.dump` formats the
    /// reference writer's index (`{"a": [0, 8, [2], [1], "torch.float32"]}`),
    /// so the two diff cleanly.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(64 + self.entries.len() * 96);
        out.push('{');
        for (i, (name, e)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            let name = serde_json::to_string(name).expect("a string always serializes");
            let dtype = serde_json::to_string(&e.dtype).expect("a string always serializes");
            let _ = write!(
                out,
                "{name}: [{}, {}, {}, {}, {dtype}]",
                e.offset,
                e.size,
                IntList(&e.shape),
                IntList(&e.stride)
            );
        }
        out.push('}');
        out
    }
}

/// `[1, 2, 3]` as Python prints a list of ints.
struct IntList<'a>(&'a [u64]);

impl fmt::Display for IntList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{v}")?;
        }
        f.write_str("]")
    }
}

impl<'de> Deserialize<'de> for TensorIndex {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IndexVisitor;

        impl<'de> Visitor<'de> for IndexVisitor {
            type Value = TensorIndex;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "an object mapping tensor names to [offset, size, shape, stride, dtype]",
                )
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TensorIndex, A::Error> {
                let mut seen = HashSet::new();
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(name) = map.next_key::<String>()? {
                    if !seen.insert(name.clone()) {
                        return Err(de::Error::custom(format!("tensor {name:?} appears twice")));
                    }
                    let entry: TensorEntry = map.next_value()?;
                    entries.push((name, entry));
                }
                Ok(TensorIndex { entries })
            }
        }

        deserializer.deserialize_map(IndexVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: u64, size: u64, shape: &[u64], dtype: &str) -> TensorEntry {
        TensorEntry {
            offset,
            size,
            shape: shape.to_vec(),
            stride: contiguous_stride(shape),
            dtype: dtype.into(),
        }
    }

    #[test]
    fn writes_what_python_json_dump_writes() {
        let mut index = TensorIndex::new();
        index.push("a.weight".into(), entry(0, 24, &[2, 3], "torch.float32"));
        index.push("scalar".into(), entry(4096, 2, &[], "torch.float16"));
        assert_eq!(
            index.to_json(),
            r#"{"a.weight": [0, 24, [2, 3], [3, 1], "torch.float32"], "scalar": [4096, 2, [], [], "torch.float16"]}"#
        );
        assert_eq!(
            TensorIndex::from_json(index.to_json().as_bytes()).unwrap(),
            index
        );
    }

    #[test]
    fn keeps_file_order_and_rejects_duplicates() {
        let json =
            br#"{"z": [8, 8, [2], [1], "torch.float32"], "a": [0, 8, [2], [1], "torch.float32"]}"#;
        let index = TensorIndex::from_json(json).unwrap();
        let names: Vec<_> = index.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["z", "a"]);

        let dup =
            br#"{"a": [0, 8, [2], [1], "torch.float32"], "a": [8, 8, [2], [1], "torch.float32"]}"#;
        let err = TensorIndex::from_json(dup).unwrap_err().to_string();
        assert!(err.contains("appears twice"), "{err}");
    }

    #[test]
    fn rejects_malformed_entries() {
        for bad in [
            &br#"{"a": [0, 8, [2], [1]]}"#[..],
            br#"{"a": [-1, 8, [2], [1], "torch.float32"]}"#,
            br#"{"a": {"offset": 0}}"#,
            br#"[]"#,
            br#"{"a": [0, 8, [2], [1], "torch.float32", 7]}"#,
        ] {
            assert!(
                TensorIndex::from_json(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn strides_and_spans() {
        assert_eq!(contiguous_stride(&[2, 3, 4]), [12, 4, 1]);
        assert_eq!(contiguous_stride(&[]), Vec::<u64>::new());
        assert_eq!(contiguous_stride(&[0, 5]), [5, 1]);
        let e = entry(0, 48, &[2, 3, 4], "torch.float16");
        assert_eq!(e.numel(), Some(24));
        assert_eq!(e.span_bytes(2), Some(48));
        assert_eq!(entry(0, 0, &[0, 7], "torch.float16").span_bytes(2), Some(0));
        assert_eq!(entry(0, 2, &[], "torch.float16").span_bytes(2), Some(2));
        let mut mismatched = entry(0, 2, &[2], "torch.float16");
        mismatched.stride.clear();
        assert_eq!(mismatched.span_bytes(2), None);
    }
}
