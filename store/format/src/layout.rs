//! Which directories hold a stored model, in one place: the converter's
//! `--force` (what it may replace), its nesting checks, and the doctor all ask
//! the same question and must get the same answer.
//!
//! A model directory is in the plain layout (its own `tensor_index.json` and
//! `tensor.data_<i>` files) or in vLLM's tensor-parallel layout (folders
//! `rank_<r>/`, each in the plain layout, with the config beside them). A
//! directory counts as holding a model's files when it holds either
//! `tensor_index.json` or `tensor.data_0`, so a damaged model (index lost,
//! or a partition lost) is still recognised as a model and never mistaken
//! for someone else's folder.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::INDEX_FILE;
use crate::partitions::partition_file_name;

/// Prefix of a tensor-parallel rank's folder: `rank_<r>`.
pub const RANK_PREFIX: &str = "rank_";

/// True when `dir` holds a model's own files (plain layout):
/// `tensor_index.json` or `tensor.data_0`, as regular files (links followed).
pub fn holds_model_files(dir: &Path) -> bool {
    [INDEX_FILE.to_owned(), partition_file_name(0)]
        .iter()
        .any(|name| std::fs::metadata(dir.join(name)).is_ok_and(|m| m.is_file()))
}

/// The rank of a `rank_<r>` folder name (`r` in decimal digits only).
pub fn rank_number(name: &OsStr) -> Option<u32> {
    let digits = name.to_str()?.strip_prefix(RANK_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The folders holding the stored model at `model_dir`: `model_dir` itself
/// (plain layout), or its `rank_<r>/` folders that hold model files, in rank
/// order (vLLM's layout). Empty when `model_dir` holds no model.
pub fn model_dirs(model_dir: &Path) -> Vec<PathBuf> {
    if holds_model_files(model_dir) {
        return vec![model_dir.to_owned()];
    }
    let mut ranks: Vec<(u32, PathBuf)> = std::fs::read_dir(model_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let rank = rank_number(&e.file_name())?;
            let dir = e.path();
            holds_model_files(&dir).then_some((rank, dir))
        })
        .collect();
    ranks.sort();
    ranks.into_iter().map(|(_, d)| d).collect()
}

/// True when `dir` is a stored model, in either layout.
pub fn is_stored_model(dir: &Path) -> bool {
    !model_dirs(dir).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_both_layouts_and_damaged_models() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for (dir, file) in [
            ("plain", INDEX_FILE),
            ("no-index", "tensor.data_0"),
            ("tp/rank_1", INDEX_FILE),
            ("tp/rank_0", "tensor.data_0"),
            ("tp/rank_x", INDEX_FILE),
            ("org/notes", "README.md"),
            ("later-partition-only", "tensor.data_1"),
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            std::fs::write(root.join(dir).join(file), "x").unwrap();
        }
        std::fs::create_dir_all(root.join("index-is-a-dir/tensor_index.json")).unwrap();

        assert_eq!(model_dirs(&root.join("plain")), vec![root.join("plain")]);
        assert!(is_stored_model(&root.join("no-index")));
        assert_eq!(
            model_dirs(&root.join("tp")),
            vec![root.join("tp/rank_0"), root.join("tp/rank_1")]
        );
        for not in [
            "org",
            "org/notes",
            "later-partition-only",
            "index-is-a-dir",
            "absent",
        ] {
            assert!(!is_stored_model(&root.join(not)), "{not}");
        }
    }

    #[test]
    fn rank_names() {
        assert_eq!(rank_number(OsStr::new("rank_0")), Some(0));
        assert_eq!(rank_number(OsStr::new("rank_17")), Some(17));
        for bad in [
            "rank_",
            "rank_+1",
            "rank_-1",
            "rank_1a",
            "Rank_1",
            "rank_99999999999",
        ] {
            assert_eq!(rank_number(OsStr::new(bad)), None, "{bad}");
        }
    }
}
