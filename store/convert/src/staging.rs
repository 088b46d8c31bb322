//! Staging directories and atomic publication: how a model appears at its
//! final path whole or not at all.
//!
//! A save writes into `<storage>/.sllm-staging/<name>` (same filesystem as the
//! final path, so a rename can publish it), fsyncs everything, then renames
//! the directory into place with `renameat2(RENAME_NOREPLACE)`, or, when
//! replacing (`--force`), swaps it with the old model in one step with
//! `RENAME_EXCHANGE`. Readers see the old model or the new one, never a mix.
//!
//! Nothing but a stored model is ever replaced or deleted (see
//! [`crate::placement`]): right before the rename, under an `flock` on the
//! `.sllm-staging` directory itself that every publish takes (so two saves
//! never check and rename at once), the target is checked again; after a
//! swap, what came out is checked to be the very directory that was checked
//! (same inode, still a model, holding no other model) before it is
//! deleted, and is swapped back otherwise.
//!
//! Each staging directory `<name>` has a lock file `<name>.lock` holding an
//! `flock` for as long as its save runs. The kernel drops the lock when the
//! process dies however it dies, so the next save removes every staging
//! directory whose lock it can take: leftovers of killed saves, never the
//! work of a save still running.

use std::fs::{self, File, TryLockError};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::fs::{CWD, RenameFlags, renameat_with};
use rustix::io::Errno;

use crate::durable::sync_dir;
use crate::format::ModelId;
use crate::placement::{self, PlacementError, Target};

/// Folder under the storage path holding saves in progress.
pub const STAGING_DIR: &str = ".sllm-staging";
const LOCK_SUFFIX: &str = ".lock";
const OLD_SUFFIX: &str = ".old";
/// Marks what a save could not put back: never cleaned up automatically.
const STRANDED_SUFFIX: &str = ".stranded";
/// Longest wait for another save's publish (a few renames and stats).
const PUBLISH_LOCK_WAIT: Duration = Duration::from_secs(60);

/// Publishing a staged model failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error("cannot move the finished model into {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "publishing stopped half-way ({source}): what was at {target} is now at {kept}; move \
         it back to {target} by hand before running another save, which would clean it away"
    )]
    Stranded {
        target: PathBuf,
        kept: PathBuf,
        source: io::Error,
    },
}

/// A staging directory owned by this process until it is published or dropped.
#[derive(Debug)]
pub struct Staging {
    root: PathBuf,
    model: ModelId,
    dir: PathBuf,
    lock_path: PathBuf,
    _lock: File,
    published: bool,
    /// Something that was at the model's path is stuck in staging: keep it.
    stranded: bool,
}

/// How the model reached its final path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// Nothing was there.
    New,
    /// An older model was replaced.
    Replaced,
}

impl Staging {
    /// Creates a staging directory for `model` under `storage_root`, after
    /// removing what killed saves left behind.
    pub fn create(storage_root: &Path, model: &ModelId) -> io::Result<Self> {
        let base = storage_root.join(STAGING_DIR);
        fs::create_dir_all(&base)?;
        let cleaned = clean_stale(&base)?;
        if cleaned > 0 {
            tracing::info!(cleaned, dir = %base.display(), "removed leftovers of interrupted saves");
        }
        let stem: String = model.flat_name().chars().take(96).collect();
        for attempt in 0u32.. {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let name = format!("{stem}.{}.{nanos}.{attempt}", std::process::id());
            let lock_path = base.join(format!("{name}{LOCK_SUFFIX}"));
            let lock = match File::create_new(&lock_path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            };
            // A concurrent cleaner may take and delete a lock file in the
            // instant between its creation and our flock; then the inode we
            // locked is no longer at `lock_path`, and we try a new name.
            if lock.try_lock().is_err() || !same_file(&lock, &lock_path) {
                continue;
            }
            let dir = base.join(&name);
            fs::create_dir(&dir)?;
            return Ok(Self {
                root: storage_root.to_owned(),
                model: model.clone(),
                dir,
                lock_path,
                _lock: lock,
                published: false,
                stranded: false,
            });
        }
        unreachable!("the attempt counter does not run out")
    }

    /// The directory to write into.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Makes the staged model visible at its path: fsyncs the staging
    /// directory, checks the path (see [`placement::check`]) and renames the
    /// model into place under the publish lock, swapping it with the stored
    /// model there when `replace`, then fsyncs the parent and deletes the
    /// model swapped out.
    pub fn publish(mut self, replace: bool) -> Result<Published, PublishError> {
        let target = self.model.dir_in(&self.root);
        let io_err = |source| PublishError::Io {
            path: target.clone(),
            source,
        };
        sync_dir(&self.dir).map_err(io_err)?;
        let parent = target
            .parent()
            .expect("a model path has a parent")
            .to_owned();
        let published = {
            let _lock = self.publish_lock().map_err(io_err)?;
            let found = placement::check(&self.root, &self.model, replace)?;
            fs::create_dir_all(&parent).map_err(io_err)?;
            match found {
                Target::Vacant => {
                    self.move_in(&target)?;
                    Published::New
                }
                Target::Model { .. } => {
                    self.exchange(&target, found)?;
                    Published::Replaced
                }
            }
        };
        self.published = true;
        sync_dir(&parent).map_err(io_err)?;
        // After a swap the old model, checked, sits where the staging dir
        // was (or at the `.old` path after two renames).
        remove_if_present(&self.dir);
        remove_if_present(&self.old_path());
        Ok(published)
    }

    /// Waits for the publish lock: an `flock` on the staging base directory.
    fn publish_lock(&self) -> io::Result<File> {
        let base = self.dir.parent().expect("a staging dir has a parent");
        let lock = File::open(base)?;
        let deadline = Instant::now() + PUBLISH_LOCK_WAIT;
        loop {
            match lock.try_lock() {
                Ok(()) => return Ok(lock),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "another save has held the publish lock on {} for over {} s; \
                             check for a hung `sllm-store save` and try again",
                            base.display(),
                            PUBLISH_LOCK_WAIT.as_secs()
                        ),
                    ));
                }
                Err(TryLockError::Error(e)) => return Err(e),
            }
        }
    }

    /// Moves the staged model to `target`, where nothing (or an empty
    /// directory) was found.
    fn move_in(&self, target: &Path) -> Result<(), PublishError> {
        if is_empty_dir(target) {
            // An empty directory holds no model; take its place.
            let _ = fs::remove_dir(target);
        }
        let exists = || PlacementError::TargetExists {
            path: target.to_owned(),
        };
        match rename(&self.dir, target, RenameFlags::NOREPLACE) {
            Ok(()) => Ok(()),
            Err(e) if e == Errno::EXIST || e == Errno::NOTEMPTY => Err(exists().into()),
            Err(e) if e == Errno::INVAL || e == Errno::NOSYS => {
                // The filesystem lacks RENAME_NOREPLACE; a plain rename
                // still cannot replace a non-empty directory.
                match fs::rename(&self.dir, target) {
                    Ok(()) => Ok(()),
                    Err(e) if e.raw_os_error() == Some(Errno::NOTEMPTY.raw_os_error()) => {
                        Err(exists().into())
                    }
                    Err(source) => Err(PublishError::Io {
                        path: target.to_owned(),
                        source,
                    }),
                }
            }
            Err(e) => Err(PublishError::Io {
                path: target.to_owned(),
                source: e.into(),
            }),
        }
    }

    /// Swaps the staged model with the stored model `found` at `target`, and
    /// checks that what came out is that model; if not, swaps back.
    fn exchange(&mut self, target: &Path, found: Target) -> Result<(), PublishError> {
        let io_err = |source| PublishError::Io {
            path: target.to_owned(),
            source,
        };
        match rename(&self.dir, target, RenameFlags::EXCHANGE) {
            Ok(()) => {
                let Err(refused) =
                    placement::check_swapped_out(&self.root, &self.model, &self.dir, found)
                else {
                    return Ok(());
                };
                if let Err(e) = rename(&self.dir, target, RenameFlags::EXCHANGE) {
                    return Err(self.strand(target, self.dir.clone(), e.into()));
                }
                Err(refused.into())
            }
            Err(e) if e == Errno::INVAL || e == Errno::NOSYS => {
                // No RENAME_EXCHANGE here (some network and overlay
                // filesystems): move the old model aside, then the new one
                // in. Readers may briefly find no model, never a mixed one.
                tracing::warn!(
                    path = %target.display(),
                    "filesystem cannot swap directories atomically; replacing in two renames"
                );
                let old = self.old_path();
                fs::rename(target, &old).map_err(io_err)?;
                let moved_in =
                    match placement::check_swapped_out(&self.root, &self.model, &old, found) {
                        Ok(()) => fs::rename(&self.dir, target).map_err(io_err),
                        Err(refused) => Err(refused.into()),
                    };
                if let Err(e) = moved_in {
                    // Put back what was there; delete nothing.
                    if let Err(back) = fs::rename(&old, target) {
                        return Err(self.strand(target, old, back));
                    }
                    return Err(e);
                }
                Ok(())
            }
            Err(e) => Err(io_err(e.into())),
        }
    }

    /// What was at `target` could not be put back from `kept`: never delete
    /// it. It is renamed with a suffix that [`clean_stale`] leaves alone, so
    /// no later save removes it either.
    fn strand(&mut self, target: &Path, kept: PathBuf, source: io::Error) -> PublishError {
        self.stranded = true;
        let mut marked = kept.clone().into_os_string();
        marked.push(STRANDED_SUFFIX);
        let kept = match fs::rename(&kept, &marked) {
            Ok(()) => PathBuf::from(marked),
            Err(e) => {
                tracing::error!(path = %kept.display(), error = %e, "could not mark it as stranded either");
                kept
            }
        };
        tracing::error!(target = %target.display(), kept = %kept.display(), error = %source, "could not put back what was at the model's path");
        PublishError::Stranded {
            target: target.to_owned(),
            kept,
            source,
        }
    }

    fn old_path(&self) -> PathBuf {
        let mut name = self
            .dir
            .file_name()
            .expect("staging dir has a name")
            .to_owned();
        name.push(OLD_SUFFIX);
        self.dir.with_file_name(name)
    }
}

impl Drop for Staging {
    /// Removes the staging directory of a save that did not publish. The lock
    /// file goes last, while we still hold its lock.
    fn drop(&mut self) {
        if self.stranded {
            tracing::warn!(dir = %self.dir.display(), "leaving the staging directory in place");
        } else {
            if !self.published {
                remove_if_present(&self.dir);
            }
            remove_if_present(&self.old_path());
        }
        let _ = fs::remove_file(&self.lock_path);
    }
}

fn rename(from: &Path, to: &Path, flags: RenameFlags) -> Result<(), Errno> {
    renameat_with(CWD, from, CWD, to, flags)
}

fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn is_empty_dir(path: &Path) -> bool {
    fs::read_dir(path).is_ok_and(|mut entries| entries.next().is_none())
}

fn remove_if_present(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            if let Err(e) = fs::remove_dir_all(path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove; the next save retries");
            }
        }
        Ok(_) => {
            let _ = fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// Removes staging entries whose save is no longer running; returns how many.
pub fn clean_stale(base: &Path) -> io::Result<usize> {
    let mut cleaned = 0;
    let mut names: Vec<String> = Vec::new();
    for entry in fs::read_dir(base)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    for name in &names {
        if let Some(stem) = name.strip_suffix(LOCK_SUFFIX) {
            let lock_path = base.join(name);
            let Ok(lock) = File::open(&lock_path) else {
                continue;
            };
            if lock.try_lock().is_ok() {
                // Its owner is gone: remove its work, then its lock.
                remove_if_present(&base.join(stem));
                remove_if_present(&base.join(format!("{stem}{OLD_SUFFIX}")));
                let _ = fs::remove_file(&lock_path);
                cleaned += 1;
            }
        }
    }
    for name in &names {
        if name.ends_with(LOCK_SUFFIX) || name.ends_with(STRANDED_SUFFIX) {
            continue;
        }
        let stem = name.strip_suffix(OLD_SUFFIX).unwrap_or(name);
        // Lock files are created before their directory and deleted only by
        // a holder of their lock, so a directory whose lock file is gone
        // belongs to no running save.
        let path = base.join(name);
        if path.symlink_metadata().is_ok() && !base.join(format!("{stem}{LOCK_SUFFIX}")).exists() {
            remove_if_present(&path);
            cleaned += 1;
        }
    }
    Ok(cleaned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::INDEX_FILE;

    fn model() -> ModelId {
        ModelId::parse("org/m").unwrap()
    }

    #[test]
    fn publishes_new_refuses_existing_and_replaces_with_force() {
        let root = tempfile::tempdir().unwrap();
        let target = model().dir_in(root.path());

        let s = Staging::create(root.path(), &model()).unwrap();
        fs::write(s.path().join(INDEX_FILE), "one").unwrap();
        assert_eq!(s.publish(false).unwrap(), Published::New);
        assert_eq!(fs::read_to_string(target.join(INDEX_FILE)).unwrap(), "one");

        let s = Staging::create(root.path(), &model()).unwrap();
        fs::write(s.path().join(INDEX_FILE), "two").unwrap();
        let staged = s.path().to_owned();
        assert!(matches!(
            s.publish(false),
            Err(PublishError::Placement(PlacementError::TargetExists { .. }))
        ));
        assert!(!staged.exists(), "a failed publish cleans its staging dir");
        assert_eq!(fs::read_to_string(target.join(INDEX_FILE)).unwrap(), "one");

        let s = Staging::create(root.path(), &model()).unwrap();
        fs::write(s.path().join(INDEX_FILE), "three").unwrap();
        assert_eq!(s.publish(true).unwrap(), Published::Replaced);
        assert_eq!(
            fs::read_to_string(target.join(INDEX_FILE)).unwrap(),
            "three"
        );
        let left: Vec<_> = fs::read_dir(root.path().join(STAGING_DIR))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "nothing left in staging: {left:?}");
    }

    #[test]
    fn replaces_nothing_but_a_stored_model() {
        let root = tempfile::tempdir().unwrap();
        let inner = root.path().join("org/x");
        fs::create_dir_all(&inner).unwrap();
        fs::write(inner.join("tensor_index.json"), "{}").unwrap();
        let notes = root.path().join("notes");
        fs::create_dir_all(&notes).unwrap();
        fs::write(notes.join("todo.txt"), "mine").unwrap();

        for (id, inside) in [("org", false), ("notes", false), ("org/x/y", true)] {
            let s = Staging::create(root.path(), &ModelId::parse(id).unwrap()).unwrap();
            fs::write(s.path().join("tensor_index.json"), "{}").unwrap();
            let staged = s.path().to_owned();
            let err = s.publish(true).unwrap_err();
            assert!(
                matches!(
                    (&err, inside),
                    (
                        PublishError::Placement(PlacementError::HoldsModel { .. }),
                        false
                    ) | (
                        PublishError::Placement(PlacementError::NotAModel { .. }),
                        false
                    ) | (
                        PublishError::Placement(PlacementError::InsideModel { .. }),
                        true
                    )
                ),
                "{id}: {err}"
            );
            assert!(
                !staged.exists(),
                "{id}: a refused publish cleans its staging dir"
            );
        }
        assert_eq!(
            fs::read_to_string(inner.join("tensor_index.json")).unwrap(),
            "{}"
        );
        assert_eq!(fs::read_to_string(notes.join("todo.txt")).unwrap(), "mine");
        assert!(!inner.join("y").exists());
    }

    #[test]
    fn an_empty_directory_is_not_a_model() {
        let root = tempfile::tempdir().unwrap();
        let target = model().dir_in(root.path());
        fs::create_dir_all(&target).unwrap();
        let s = Staging::create(root.path(), &model()).unwrap();
        assert_eq!(s.publish(false).unwrap(), Published::New);
    }

    #[test]
    fn cleans_only_what_no_one_holds() {
        let root = tempfile::tempdir().unwrap();
        let live = Staging::create(root.path(), &model()).unwrap();
        let base = root.path().join(STAGING_DIR);
        // Leftovers of a killed save: an unlocked lock file with its dir,
        // and a dir whose lock file is gone.
        fs::write(base.join("dead.1.2.0.lock"), "").unwrap();
        fs::create_dir(base.join("dead.1.2.0")).unwrap();
        fs::create_dir(base.join("orphan.3.4.0")).unwrap();
        fs::write(base.join("orphan.3.4.0/x"), "x").unwrap();
        // What a save could not put back is someone's data: never removed.
        fs::create_dir(base.join("lost.5.6.0.old.stranded")).unwrap();
        assert_eq!(clean_stale(&base).unwrap(), 2);
        assert!(live.path().exists(), "a running save's directory survives");
        assert!(!base.join("dead.1.2.0").exists() && !base.join("orphan.3.4.0").exists());
        drop(live);
        let left: Vec<_> = fs::read_dir(&base)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["lost.5.6.0.old.stranded"]);
    }
}
