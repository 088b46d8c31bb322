//! Finding and checking a checkpoint to convert: a directory of safetensors
//! files (one file, several, or shards listed by
//! `model.safetensors.index.json`), found directly or in the Hugging Face
//! cache, plus the model's other files (config, tokenizer) to copy along.
//!
//! Everything is checked before anything is written: every shard present and
//! whole, every dtype supported, no tensor name twice, every file to read a
//! regular file (or a link to one). Source files are opened with
//! [`open_source_file`], never with a plain blocking open: a FIFO named
//! `model.safetensors` would otherwise hang the save forever.

pub mod compare;
pub mod hf_cache;
pub mod safetensors;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use self::safetensors::{SafetensorsFile, SourceTensor};
use sllm_format::is_store_file_name;
use sllm_format::small_files::{OpenError, describe, open_regular_file};

/// Name of the shard index Transformers writes beside sharded checkpoints.
pub const SHARD_INDEX_FILE: &str = "model.safetensors.index.json";

/// File name endings of weights in any format: never copied along.
const WEIGHT_SUFFIXES: [&str; 15] = [
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".onnx_data",
    ".ot",
    ".tflite",
    ".npz",
    ".safetensors.index.json",
    ".bin.index.json",
];

/// A checkpoint cannot be converted.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("source directory {path} does not exist; check --local-model-path")]
    SourceMissing { path: PathBuf },
    #[error(
        "source {path} is {what}, not a folder; --local-model-path takes the folder that holds \
         the *.safetensors files and config.json"
    )]
    SourceNotAFolder { path: PathBuf, what: &'static str },
    #[error(
        "no *.safetensors files in {dir}{others}; only safetensors checkpoints can be \
         converted: save the model with safe_serialization=True or convert it first"
    )]
    NoWeights { dir: PathBuf, others: String },
    #[error(
        "{path} is missing: it is a link to {target}, which does not exist (an interrupted \
         download?); download the model again"
    )]
    BrokenLink { path: PathBuf, target: PathBuf },
    #[error(
        "{path} is {what}, not a regular file, so it cannot be read as part of a checkpoint; \
         replace it with the real file (a link to a regular file is fine) or move it out of the \
         checkpoint's folder"
    )]
    NotRegularFile { path: PathBuf, what: &'static str },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file: {reason}")]
    InvalidSafetensors { path: PathBuf, reason: String },
    #[error(
        "tensor {tensor:?} in {path} has dtype {dtype}, which the store cannot hold; supported: {}",
        sllm_format::TorchDtype::supported_safetensors_names()
    )]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path} is not a valid shard index: {reason}")]
    BadShardIndex { path: PathBuf, reason: String },
    #[error(
        "{index} lists shards that are missing: {}; download the model again or fix the index",
        missing.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    MissingShards {
        index: PathBuf,
        missing: Vec<PathBuf>,
    },
    #[error(
        "tensor {name:?} appears in both {} and {}; a checkpoint must hold each tensor once: \
         remove the stray file or point --local-model-path at a directory with one copy",
        first.display(), second.display()
    )]
    DuplicateTensor {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{index} says tensor {name:?} is in {}, but that file does not hold it", shard.display())]
    NotInShard {
        index: PathBuf,
        name: String,
        shard: PathBuf,
    },
}

/// A checked checkpoint, ready to convert.
#[derive(Clone, Debug)]
pub struct SourceCheckpoint {
    pub dir: PathBuf,
    /// Weight files in conversion order (shard order, then data order).
    pub files: Vec<SafetensorsFile>,
    /// Other files to copy, relative to `dir`, names byte for byte.
    pub extra_files: Vec<PathBuf>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl SourceCheckpoint {
    /// Finds and checks the checkpoint in `dir`.
    pub fn open(dir: &Path) -> Result<Self, ImportError> {
        if let Some(what) = crate::format::small_files::not_a_folder(dir) {
            return Err(ImportError::SourceNotAFolder {
                path: dir.to_owned(),
                what,
            });
        }
        if !dir.is_dir() {
            return Err(ImportError::SourceMissing {
                path: dir.to_owned(),
            });
        }
        let index_path = dir.join(SHARD_INDEX_FILE);
        let files = if index_path.exists() {
            open_sharded(dir, &index_path)?
        } else {
            open_unsharded(dir)?
        };
        check_unique_names(&files)?;
        let mut extra_files = Vec::new();
        let modules = sentence_transformers_modules(dir);
        collect_extra_files(dir, Path::new(""), &modules, &mut extra_files)?;
        extra_files.sort();
        Ok(Self {
            dir: dir.to_owned(),
            files,
            extra_files,
        })
    }

    /// Number of tensors over all files.
    pub fn tensor_count(&self) -> usize {
        self.files.iter().map(|f| f.tensors.len()).sum()
    }

    /// Bytes of tensor data over all files.
    pub fn tensor_bytes(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| &f.tensors)
            .map(|t| t.len)
            .sum()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImportError + '_ {
    move |source| ImportError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Opens a file of a checkpoint for reading, refusing anything but a regular
/// file (links are followed: the HF cache links to blobs), never blocking on
/// a FIFO: [`sllm_format::small_files::open_regular_file`].
pub fn open_source_file(path: &Path) -> Result<File, ImportError> {
    open_regular_file(path).map_err(|e| match e {
        OpenError::Io(e) => io_err(path)(e),
        OpenError::NotRegular(what) => ImportError::NotRegularFile {
            path: path.to_owned(),
            what,
        },
    })
}

fn open_weight_file(path: &Path) -> Result<SafetensorsFile, ImportError> {
    if path.is_symlink() && !path.exists() {
        let target = std::fs::read_link(path).map_err(io_err(path))?;
        return Err(ImportError::BrokenLink {
            path: path.to_owned(),
            target,
        });
    }
    SafetensorsFile::open(path)
}

fn open_sharded(dir: &Path, index_path: &Path) -> Result<Vec<SafetensorsFile>, ImportError> {
    let bad = |reason: String| ImportError::BadShardIndex {
        path: index_path.to_owned(),
        reason,
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut open_source_file(index_path)?, &mut bytes)
        .map_err(io_err(index_path))?;
    let index: ShardIndex = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("{e}; expected {{\"weight_map\": {{name: file}}}}")))?;
    let mut shard_names: Vec<&str> = index.weight_map.values().map(String::as_str).collect();
    shard_names.sort_unstable();
    shard_names.dedup();
    if let Some(name) = shard_names
        .iter()
        .find(|n| n.is_empty() || n.contains('/') || **n == "." || **n == "..")
    {
        return Err(bad(format!(
            "shard name {name:?} is not a file name in {}",
            dir.display()
        )));
    }
    let missing: Vec<PathBuf> = shard_names
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| !p.exists())
        .collect();
    if !missing.is_empty() {
        return Err(ImportError::MissingShards {
            index: index_path.to_owned(),
            missing,
        });
    }
    let files = shard_names
        .iter()
        .map(|n| open_weight_file(&dir.join(n)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut by_file: HashMap<&Path, std::collections::HashSet<&str>> = HashMap::new();
    for f in &files {
        by_file.insert(&f.path, f.tensors.iter().map(|t| t.name.as_str()).collect());
    }
    for (name, shard) in &index.weight_map {
        let shard = dir.join(shard);
        if !by_file
            .get(shard.as_path())
            .is_some_and(|names| names.contains(name.as_str()))
        {
            return Err(ImportError::NotInShard {
                index: index_path.to_owned(),
                name: name.clone(),
                shard,
            });
        }
    }
    Ok(files)
}

fn open_unsharded(dir: &Path) -> Result<Vec<SafetensorsFile>, ImportError> {
    let mut weights = Vec::new();
    let mut others = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") {
            weights.push(entry.path());
        } else if is_weight_file(&name) {
            others.push(name);
        }
    }
    if weights.is_empty() {
        others.sort();
        let others = if others.is_empty() {
            String::new()
        } else {
            format!(" (found {})", others.join(", "))
        };
        return Err(ImportError::NoWeights {
            dir: dir.to_owned(),
            others,
        });
    }
    weights.sort();
    weights.iter().map(|p| open_weight_file(p)).collect()
}

fn check_unique_names(files: &[SafetensorsFile]) -> Result<(), ImportError> {
    let mut seen: HashMap<&str, &Path> = HashMap::new();
    for f in files {
        for t in &f.tensors {
            if let Some(first) = seen.insert(&t.name, &f.path) {
                return Err(ImportError::DuplicateTensor {
                    name: t.name.clone(),
                    first: first.to_owned(),
                    second: f.path.clone(),
                });
            }
        }
    }
    Ok(())
}

/// The sub-folders that a sentence-transformers `modules.json` names (its
/// modules other than the transformer itself, e.g. `1_Pooling`,
/// `2_Dense`). None when there is no such file or it cannot be read: then
/// only the weights are left out of sub-folders as everywhere.
fn sentence_transformers_modules(dir: &Path) -> Vec<PathBuf> {
    #[derive(Deserialize)]
    struct Module {
        #[serde(default)]
        path: String,
    }
    std::fs::read(dir.join("modules.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Vec<Module>>(&bytes).ok())
        .into_iter()
        .flatten()
        .map(|m| PathBuf::from(m.path))
        .filter(|p| {
            !p.as_os_str().is_empty()
                && p.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
        })
        .collect()
}

/// True for weights in any format (and their shard indexes).
pub fn is_weight_file(name: &str) -> bool {
    WEIGHT_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Collects files to copy along: everything but weights, hidden entries, and
/// names the store writes itself, with their names as they are on disk
/// (bytes, not necessarily UTF-8). Symlinked directories are not followed
/// (they could loop); symlinked files are (the HF cache links to blobs), and
/// a broken one is an error, since the model would not start without it. So
/// is a FIFO, socket or device: copying it would block or make no sense, and
/// skipping it could leave the model without a file it needs. Weight files
/// inside the folders of sentence-transformers modules (`modules`) are
/// copied: vLLM reads them (a `2_Dense/model.safetensors`). Other weights in
/// sub-folders (`original/consolidated.00.pth`) are not.
fn collect_extra_files(
    root: &Path,
    rel: &Path,
    modules: &[PathBuf],
    out: &mut Vec<PathBuf>,
) -> Result<(), ImportError> {
    let dir = root.join(rel);
    for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
        let entry = entry.map_err(io_err(&dir))?;
        // Paths are built from the name's bytes; the lossy text only
        // classifies it (a suffix, a leading dot, a store name: all ASCII).
        let name = entry.file_name();
        let text = name.to_string_lossy();
        let rel_path = rel.join(&name);
        let path = entry.path();
        let top_level = rel.as_os_str().is_empty();
        let in_module = modules.iter().any(|m| rel.starts_with(m));
        if text.starts_with('.') || (is_weight_file(&text) && !in_module) {
            continue;
        }
        if top_level && name.to_str().is_some_and(is_store_file_name) {
            tracing::warn!(file = %path.display(), "not copying a file whose name the store uses itself");
            continue;
        }
        let file_type = entry.file_type().map_err(io_err(&path))?;
        if file_type.is_dir() {
            collect_extra_files(root, &rel_path, modules, out)?;
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => out.push(rel_path),
            // A link to a directory: not followed.
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) => {
                return Err(ImportError::NotRegularFile {
                    what: describe(rustix::fs::FileType::from_raw_mode(meta.mode())),
                    path,
                });
            }
            Err(e) if file_type.is_symlink() && e.kind() == std::io::ErrorKind::NotFound => {
                let target = std::fs::read_link(&path).map_err(io_err(&path))?;
                return Err(ImportError::BrokenLink { path, target });
            }
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    Ok(())
}
