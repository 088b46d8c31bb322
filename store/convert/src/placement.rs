//! Where a save may put a model in the storage path, checked so that a save
//! never replaces or deletes anything but a stored model.
//!
//! Two rules:
//! - A model id is never a prefix directory of another model: `org/x/y` is
//!   refused while `org/x` is a stored model, and `org` while `org/x` is one
//!   (a `--force` save of the outer id would delete the inner model). The one
//!   nesting that is a model's own is vLLM's layout: `org/m/rank_<r>` beside
//!   other `rank_<r>/` folders of `org/m`.
//! - `--force` replaces only a directory that is itself a stored model (see
//!   [`crate::format::layout`]) and holds no other model. A file, a link, or
//!   a directory that is not a model (someone's files, an org folder) is
//!   refused even with `--force`; an empty directory is taken over.
//!
//! [`check`] costs a few `stat` calls and short directory walks. A save runs it
//! before writing anything, so it fails early, and [`crate::staging`] runs it
//! again under the publish lock right before the rename, where it counts.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::format::layout::{holds_model_files, is_stored_model, rank_number};
use crate::format::{ModelId, small_files};

/// Most directory entries looked at below one target before giving up: a
/// stored model holds a handful of files, an org folder a few models.
const MAX_ENTRIES_WALKED: usize = 100_000;

/// What is at a model's path now, as far as a save is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Nothing, or an empty directory: the model can be moved in.
    Vacant,
    /// A stored model holding no other model, which `--force` may replace;
    /// `dev` and `ino` name its directory, so that whoever swaps it out can
    /// check it took what was checked.
    Model { dev: u64, ino: u64 },
}

/// A model cannot be put at the path its id names.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementError {
    #[error(
        "{path} already exists; pass --force to replace it atomically, or check it with \
         `sllm-store verify`"
    )]
    TargetExists { path: PathBuf },
    #[error(
        "cannot save {model}: {other} is a stored model ({other_path}), and a model id must not \
         name a folder inside another model (a --force save of {other} would delete it); pick \
         an id outside it, or remove {other} first if it is no longer needed"
    )]
    InsideModel {
        model: String,
        other: String,
        other_path: PathBuf,
    },
    #[error(
        "cannot save {model} at {path}: that folder holds the stored model {other} \
         ({other_path}), which replacing it would delete; pick another id (a model id must not \
         be a prefix folder of another model), or move {other} away first"
    )]
    HoldsModel {
        model: String,
        path: PathBuf,
        other: String,
        other_path: PathBuf,
    },
    #[error(
        "cannot save {model}: {path} is {what}, not a stored model, and a save replaces only a \
         stored model, even with --force; move it away or pick another id"
    )]
    NotAModel {
        model: String,
        path: PathBuf,
        what: String,
    },
    #[error(
        "cannot save {model}: {path} is {what}, where the id needs a folder; move it away or \
         pick another id"
    )]
    NotAFolder {
        model: String,
        path: PathBuf,
        what: &'static str,
    },
    #[error("cannot check what is at {path} before saving there: {source}; fix its permissions")]
    Io { path: PathBuf, source: io::Error },
}

/// Checks that `model` may be put under `root`; with `replace`, over a
/// stored model already there.
pub fn check(root: &Path, model: &ModelId, replace: bool) -> Result<Target, PlacementError> {
    check_ancestors(root, model)?;
    let target = model.dir_in(root);
    let meta = match fs::symlink_metadata(&target) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Target::Vacant),
        Err(source) => {
            return Err(PlacementError::Io {
                path: target,
                source,
            });
        }
    };
    let not_a_model = |what: String| PlacementError::NotAModel {
        model: model.to_string(),
        path: target.clone(),
        what,
    };
    if meta.file_type().is_symlink() {
        let to = fs::read_link(&target).unwrap_or_default();
        return Err(not_a_model(format!("a symbolic link to {}", to.display())));
    }
    if !meta.is_dir() {
        return Err(not_a_model(small_files::describe_mode(meta.mode()).into()));
    }
    let first_entry = match fs::read_dir(&target).and_then(|mut d| d.next().transpose()) {
        Ok(None) => return Ok(Target::Vacant),
        Ok(Some(entry)) => entry.file_name(),
        Err(source) => {
            return Err(PlacementError::Io {
                path: target,
                source,
            });
        }
    };
    let is_model = is_stored_model(&target);
    let mut budget = MAX_ENTRIES_WALKED;
    match find_model_below(&target, is_model, &mut budget) {
        // Named first: --force would not help.
        Ok(Some(other_path)) => Err(PlacementError::HoldsModel {
            model: model.to_string(),
            other: id_of(root, &other_path),
            path: target,
            other_path,
        }),
        _ if is_model && !replace => Err(PlacementError::TargetExists { path: target }),
        Ok(None) if is_model => Ok(Target::Model {
            dev: meta.dev(),
            ino: meta.ino(),
        }),
        Ok(None) => Err(not_a_model(format!(
            "a folder holding {:?} (no tensor_index.json or tensor.data_0, in it or in \
             rank_<r>/ folders)",
            first_entry
        ))),
        Err(Walk::TooMany) => Err(not_a_model(format!(
            "a folder with more than {MAX_ENTRIES_WALKED} entries below it"
        ))),
        Err(Walk::Io(path, source)) if is_model => Err(PlacementError::Io { path, source }),
        Err(Walk::Io(..)) => Err(not_a_model(format!("a folder holding {first_entry:?}"))),
    }
}

/// Checks that `dir`, which a publish just swapped out of a model's path, is
/// the stored model [`check`] found there (`expected`): same directory, still
/// a model, still holding no other model. Only then may it be deleted.
pub fn check_swapped_out(
    root: &Path,
    model: &ModelId,
    dir: &Path,
    expected: Target,
) -> Result<(), PlacementError> {
    let target = model.dir_in(root);
    let changed = |what: &str| PlacementError::NotAModel {
        model: model.to_string(),
        path: target.clone(),
        what: format!("{what} (it changed while the save was publishing)"),
    };
    let Target::Model { dev, ino } = expected else {
        return Err(changed("not the model found there before"));
    };
    let meta = fs::symlink_metadata(dir).map_err(|source| PlacementError::Io {
        path: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() || meta.dev() != dev || meta.ino() != ino {
        return Err(changed("another entry than the model found there before"));
    }
    if !is_stored_model(dir) {
        return Err(changed("a folder that no longer holds a model"));
    }
    let mut budget = MAX_ENTRIES_WALKED;
    match find_model_below(dir, true, &mut budget) {
        Ok(None) => Ok(()),
        Ok(Some(other_path)) => Err(PlacementError::HoldsModel {
            model: model.to_string(),
            path: target,
            other: id_of(root, &other_path),
            other_path,
        }),
        Err(Walk::TooMany) => Err(changed("a folder with too many entries")),
        Err(Walk::Io(path, source)) => Err(PlacementError::Io { path, source }),
    }
}

/// Refuses an id that names a folder inside a stored model.
fn check_ancestors(root: &Path, model: &ModelId) -> Result<(), PlacementError> {
    let components: Vec<&str> = model.as_str().split('/').collect();
    let Some((last, parents)) = components.split_last() else {
        return Ok(());
    };
    let mut dir = root.to_owned();
    for (i, component) in parents.iter().enumerate() {
        dir.push(component);
        let meta = match fs::metadata(&dir) {
            Ok(meta) => meta,
            // Nothing deeper exists either.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(PlacementError::Io { path: dir, source }),
        };
        if !meta.is_dir() {
            return Err(PlacementError::NotAFolder {
                model: model.to_string(),
                what: small_files::describe_mode(meta.mode()),
                path: dir,
            });
        }
        let own_rank = i + 1 == parents.len() && rank_number(std::ffi::OsStr::new(last)).is_some();
        // A rank folder of vLLM's layout may join its siblings; anything
        // else inside a model would be deleted with it.
        let inside = if own_rank {
            holds_model_files(&dir)
        } else {
            is_stored_model(&dir)
        };
        if inside {
            return Err(PlacementError::InsideModel {
                model: model.to_string(),
                other: id_of(root, &dir),
                other_path: dir,
            });
        }
    }
    Ok(())
}

enum Walk {
    TooMany,
    Io(PathBuf, io::Error),
}

/// The first stored model in a folder below `dir` (links not followed).
/// With `own_ranks`, `dir` is a model and its `rank_<r>/` folders are its own.
fn find_model_below(
    dir: &Path,
    own_ranks: bool,
    budget: &mut usize,
) -> Result<Option<PathBuf>, Walk> {
    let io_err = |source| Walk::Io(dir.to_owned(), source);
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        *budget = budget.checked_sub(1).ok_or(Walk::TooMany)?;
        if !entry.file_type().map_err(io_err)?.is_dir() {
            continue;
        }
        let path = entry.path();
        let is_own_rank = own_ranks && rank_number(&entry.file_name()).is_some();
        if !is_own_rank && is_stored_model(&path) {
            return Ok(Some(path));
        }
        if let Some(found) = find_model_below(&path, false, budget)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// The model id of a folder under `root`, as a user would type it.
fn id_of(root: &Path, dir: &Path) -> String {
    dir.strip_prefix(root).unwrap_or(dir).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ModelId {
        ModelId::parse(s).unwrap()
    }

    fn model_at(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("tensor_index.json"), "{}").unwrap();
    }

    #[test]
    fn vacant_model_and_exists() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        assert_eq!(check(root, &id("org/m"), false).unwrap(), Target::Vacant);
        fs::create_dir_all(root.join("org/m")).unwrap();
        assert_eq!(check(root, &id("org/m"), true).unwrap(), Target::Vacant);
        model_at(&root.join("org/m"));
        assert!(matches!(
            check(root, &id("org/m"), false),
            Err(PlacementError::TargetExists { .. })
        ));
        assert!(matches!(
            check(root, &id("org/m"), true),
            Ok(Target::Model { .. })
        ));
        // A model's own subfolders (copied extra files) are no obstacle.
        fs::create_dir_all(root.join("org/m/original")).unwrap();
        fs::write(root.join("org/m/original/params.json"), "{}").unwrap();
        assert!(matches!(
            check(root, &id("org/m"), true),
            Ok(Target::Model { .. })
        ));
    }

    #[test]
    fn no_model_inside_another() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        model_at(&root.join("org/x"));
        for replace in [false, true] {
            let err = check(root, &id("org/x/y/z"), replace).unwrap_err();
            assert!(
                matches!(&err, PlacementError::InsideModel { other, .. } if other == "org/x"),
                "{err}"
            );
            let err = check(root, &id("org"), replace).unwrap_err();
            assert!(
                matches!(&err, PlacementError::HoldsModel { other, .. } if other == "org/x"),
                "{err}"
            );
        }
        // A model holding another (made before these checks existed).
        model_at(&root.join("org/x/deep/er"));
        let err = check(root, &id("org/x"), true).unwrap_err();
        assert!(
            matches!(&err, PlacementError::HoldsModel { other, .. } if other == "org/x/deep/er"),
            "{err}"
        );
    }

    #[test]
    fn ranks_of_the_vllm_layout_join_their_siblings() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        model_at(&root.join("org/m/rank_0"));
        fs::write(root.join("org/m/config.json"), "{}").unwrap();
        assert_eq!(
            check(root, &id("org/m/rank_1"), false).unwrap(),
            Target::Vacant
        );
        assert!(matches!(
            check(root, &id("org/m/rank_0"), true),
            Ok(Target::Model { .. })
        ));
        assert!(matches!(
            check(root, &id("org/m"), true),
            Ok(Target::Model { .. })
        ));
        for inside in ["org/m/other", "org/m/rank_0/x", "org/m/rank_x"] {
            assert!(
                matches!(
                    check(root, &id(inside), true),
                    Err(PlacementError::InsideModel { .. })
                ),
                "{inside}"
            );
        }
        // A rank folder under a plain model is inside it.
        model_at(&root.join("org/plain"));
        assert!(matches!(
            check(root, &id("org/plain/rank_0"), false),
            Err(PlacementError::InsideModel { .. })
        ));
    }

    #[test]
    fn what_is_not_a_model_is_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("org/notes")).unwrap();
        fs::write(root.join("org/notes/todo.txt"), "x").unwrap();
        fs::write(root.join("org/file"), "x").unwrap();
        std::os::unix::fs::symlink(root.join("org/notes"), root.join("org/link")).unwrap();
        for (name, needle) in [
            ("org/notes", "todo.txt"),
            ("org/file", "is a regular file"),
            ("org/link", "symbolic link"),
        ] {
            let err = check(root, &id(name), true).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, PlacementError::NotAModel { .. }) && text.contains(needle),
                "{name}: {text}"
            );
        }
        let err = check(root, &id("org/file/m"), false).unwrap_err();
        assert!(
            matches!(err, PlacementError::NotAFolder { .. })
                && err
                    .to_string()
                    .contains("is a regular file, where the id needs a folder"),
            "{err}"
        );
    }

    #[test]
    fn a_swapped_out_directory_must_be_the_checked_model() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        model_at(&root.join("org/m"));
        let found = check(root, &id("org/m"), true).unwrap();
        check_swapped_out(root, &id("org/m"), &root.join("org/m"), found).unwrap();
        // Another directory in its place, even a model, is not it.
        fs::rename(root.join("org/m"), root.join("org/m.moved")).unwrap();
        model_at(&root.join("org/m"));
        assert!(check_swapped_out(root, &id("org/m"), &root.join("org/m"), found).is_err());
        assert!(
            check_swapped_out(root, &id("org/m"), &root.join("org/m"), Target::Vacant).is_err()
        );
    }
}
