//! Finding a model in the Hugging Face cache without touching the network.
//!
//! The cache lives in `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (the
//! order `huggingface_hub` uses). A repo `org/name` is the folder
//! `models--org--name`, with `refs/<ref>` files holding commit hashes and
//! `snapshots/<hash>/` holding the files (usually symlinks into `blobs/`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where the cache is and which setting chose it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfCache {
    pub root: PathBuf,
    /// The setting that chose `root`, e.g. `$HF_HUB_CACHE`, for messages.
    pub chosen_by: String,
}

/// A snapshot found in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub commit: String,
    /// The revision asked for.
    pub revision: String,
    /// The revision was a commit hash (whole or a unique prefix), not a
    /// ref that can move.
    pub pinned: bool,
}

/// The snapshot is not in the cache.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(
        "model {model} is not in the Hugging Face cache: {repo_dir} does not exist (cache chosen \
         by {chosen_by}). Download it while online with `hf download {model} --revision \
         {revision}` (or `huggingface-cli download ...`), set HF_HUB_CACHE/HF_HOME to the cache \
         that has it, or convert a downloaded folder instead (`sllm-store save --local-model-path \
         <dir>`)"
    )]
    RepoMissing {
        model: String,
        revision: String,
        repo_dir: PathBuf,
        chosen_by: String,
    },
    #[error(
        "revision {revision:?} of {model} is not in the cache: {ref_file} does not exist{known}. \
         Pass a commit hash with --revision, or download it while online with `hf download \
         {model} --revision {revision}`"
    )]
    RefMissing {
        model: String,
        revision: String,
        ref_file: PathBuf,
        known: String,
    },
    #[error(
        "{ref_file} should hold a 40-character commit hash but holds {content:?}; delete it and download again"
    )]
    BadRef { ref_file: PathBuf, content: String },
    /// A ref that is a FIFO, socket, device or directory.
    #[error(transparent)]
    RefNotAFile(super::ImportError),
    #[error(
        "snapshot {commit} of {model} (revision {revision:?}) is not in the cache: {dir} does \
         not exist{present}. Download it while online with `hf download {model} --revision \
         {commit}`"
    )]
    SnapshotMissing {
        model: String,
        revision: String,
        commit: String,
        dir: PathBuf,
        present: String,
    },
    #[error(
        "revision {revision:?} of {model} names {} snapshot in the cache{present}; {}",
        if matches.is_empty() { "no" } else { "more than one" },
        if matches.is_empty() {
            format!(
                "pass one of them, a ref (main), or download it while online with `hf download \
                 {model} --revision <its full 40-digit hash>`"
            )
        } else {
            "give more digits of the hash".into()
        }
    )]
    ShortHash {
        model: String,
        revision: String,
        matches: Vec<String>,
        present: String,
    },
}

impl HfCache {
    /// The cache chosen by the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// The cache chosen by the variables `var` returns (for tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Self {
        let set = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(root) = set("HF_HUB_CACHE") {
            return Self {
                root,
                chosen_by: "$HF_HUB_CACHE".into(),
            };
        }
        if let Some(home) = set("HF_HOME") {
            return Self {
                root: home.join("hub"),
                chosen_by: "$HF_HOME".into(),
            };
        }
        if let Some(xdg) = set("XDG_CACHE_HOME") {
            return Self {
                root: xdg.join("huggingface").join("hub"),
                chosen_by: "$XDG_CACHE_HOME".into(),
            };
        }
        let home = set("HOME").unwrap_or_else(|| PathBuf::from("/root"));
        Self {
            root: home.join(".cache").join("huggingface").join("hub"),
            chosen_by: "the default, ~/.cache/huggingface/hub".into(),
        }
    }

    /// The repo folder of `model` (`org/name` -> `models--org--name`).
    pub fn repo_dir(&self, model: &str) -> PathBuf {
        self.root
            .join(format!("models--{}", model.replace('/', "--")))
    }

    /// Resolves `revision` of `model`: a commit hash, a unique prefix of
    /// one (at least 4 digits) among the snapshots present, or a ref such as
    /// `main` (also written `refs/main`).
    pub fn resolve(&self, model: &str, revision: &str) -> Result<Snapshot, ResolveError> {
        let revision = revision.strip_prefix("refs/").unwrap_or(revision);
        let repo = self.repo_dir(model);
        if !repo.is_dir() {
            return Err(ResolveError::RepoMissing {
                model: model.into(),
                revision: revision.into(),
                repo_dir: repo,
                chosen_by: self.chosen_by.clone(),
            });
        }
        let snapshots = repo.join("snapshots");
        let pinned = is_commit_hash(revision)
            || (is_short_hash(revision) && !repo.join("refs").join(revision).exists());
        let commit = if is_commit_hash(revision) {
            revision.to_owned()
        } else if pinned {
            let present = known_snapshots(&snapshots);
            let matches: Vec<String> = present
                .iter()
                .filter(|h| h.starts_with(&revision.to_ascii_lowercase()))
                .cloned()
                .collect();
            match matches.as_slice() {
                [one] => one.clone(),
                _ => {
                    return Err(ResolveError::ShortHash {
                        model: model.into(),
                        revision: revision.into(),
                        present: listed(if matches.is_empty() {
                            &present
                        } else {
                            &matches
                        }),
                        matches,
                    });
                }
            }
        } else {
            read_ref(&repo, model, revision)?
        };
        let dir = snapshots.join(&commit);
        if !dir.is_dir() {
            return Err(ResolveError::SnapshotMissing {
                model: model.into(),
                revision: revision.into(),
                commit,
                dir,
                present: listed(&known_snapshots(&snapshots)),
            });
        }
        Ok(Snapshot {
            dir,
            commit,
            revision: revision.into(),
            pinned,
        })
    }
}

/// True for a full 40-hex-digit commit hash.
pub fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// True for what may be an abbreviated commit hash (4 to 39 hex digits).
fn is_short_hash(s: &str) -> bool {
    (4..40).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The names of the entries of `dir` that `keep` takes (given the entry's
/// path and name), sorted; none when `dir` cannot be read.
fn sorted_names(dir: &Path, keep: impl Fn(&Path, &str) -> bool) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            keep(&e.path(), &name).then_some(name)
        })
        .collect();
    names.sort();
    names
}

/// The snapshot folders (commit hashes) under `snapshots`, sorted.
fn known_snapshots(snapshots: &Path) -> Vec<String> {
    sorted_names(snapshots, |path, name| {
        path.is_dir() && is_commit_hash(name)
    })
}

/// " (snapshots present: a, b)", or " (no snapshot is present)".
fn listed(hashes: &[String]) -> String {
    if hashes.is_empty() {
        " (no snapshot is present)".into()
    } else {
        format!(" (snapshots present: {})", hashes.join(", "))
    }
}

fn read_ref(repo: &Path, model: &str, revision: &str) -> Result<String, ResolveError> {
    let ref_file = repo.join("refs").join(revision);
    // A ref is a relative name; refuse anything that would leave refs/.
    let escapes = revision
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..");
    let read = |path: &Path| -> Result<String, super::ImportError> {
        let mut content = String::new();
        std::io::Read::read_to_string(&mut super::open_source_file(path)?, &mut content).map_err(
            |source| super::ImportError::Io {
                path: path.to_owned(),
                source,
            },
        )?;
        Ok(content)
    };
    let content = match (escapes, read(&ref_file)) {
        (false, Ok(content)) => content,
        (false, Err(e @ super::ImportError::NotRegularFile { .. })) => {
            return Err(ResolveError::RefNotAFile(e));
        }
        _ => {
            return Err(ResolveError::RefMissing {
                model: model.into(),
                revision: revision.into(),
                known: known_refs(&repo.join("refs")),
                ref_file,
            });
        }
    };
    let commit = content.trim();
    if !is_commit_hash(commit) {
        return Err(ResolveError::BadRef {
            ref_file,
            content: content.clone(),
        });
    }
    Ok(commit.to_owned())
}

fn known_refs(refs: &Path) -> String {
    let names = sorted_names(refs, |path, _| path.is_file());
    if names.is_empty() {
        String::new()
    } else {
        format!(" (refs present: {})", names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chooses_the_cache_like_huggingface_hub() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let c = HfCache::from_vars(vars(&[("HF_HUB_CACHE", "/a"), ("HF_HOME", "/b")]));
        assert_eq!(c.root, Path::new("/a"));
        let c = HfCache::from_vars(vars(&[("HF_HUB_CACHE", ""), ("HF_HOME", "/b")]));
        assert_eq!(c.root, Path::new("/b/hub"));
        let c = HfCache::from_vars(vars(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/h")]));
        assert_eq!(c.root, Path::new("/x/huggingface/hub"));
        let c = HfCache::from_vars(vars(&[("HOME", "/h")]));
        assert_eq!(c.root, Path::new("/h/.cache/huggingface/hub"));
        assert_eq!(
            c.repo_dir("org/name"),
            Path::new("/h/.cache/huggingface/hub/models--org--name")
        );
    }

    /// A cache in a new temporary directory (removed when the first is dropped).
    fn temp_cache() -> (tempfile::TempDir, HfCache) {
        let root = tempfile::tempdir().unwrap();
        let cache = HfCache {
            root: root.path().into(),
            chosen_by: "test".into(),
        };
        (root, cache)
    }

    #[test]
    fn resolves_refs_main_and_unique_short_hashes() {
        let (_root, cache) = temp_cache();
        let a = "abcdef0123456789abcdef0123456789abcdef01";
        let b = "abcd990123456789abcdef0123456789abcdef01";
        let repo = cache.repo_dir("org/m");
        for h in [a, b] {
            std::fs::create_dir_all(repo.join("snapshots").join(h)).unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), a).unwrap();
        assert_eq!(cache.resolve("org/m", "refs/main").unwrap().commit, a);
        assert_eq!(cache.resolve("org/m", "abcdef0").unwrap().commit, a);
        assert_eq!(cache.resolve("org/m", "ABCD99").unwrap().commit, b);
        let e = cache.resolve("org/m", "abcd").unwrap_err().to_string();
        assert!(
            e.contains("more than one") && e.contains(a) && e.contains(b),
            "{e}"
        );
        let e = cache.resolve("org/m", "fff0").unwrap_err().to_string();
        assert!(
            e.contains("names no snapshot") && e.contains(&format!("snapshots present: {b}, {a}")),
            "{e}"
        );
    }

    #[test]
    fn resolves_refs_and_hashes() {
        let (_root, cache) = temp_cache();
        let hash = "0123456789abcdef0123456789abcdef01234567";
        let repo = cache.repo_dir("org/m");
        std::fs::create_dir_all(repo.join("snapshots").join(hash)).unwrap();
        std::fs::create_dir_all(repo.join("refs/pr")).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{hash}\n")).unwrap();
        std::fs::write(repo.join("refs/pr/1"), hash).unwrap();
        std::fs::write(repo.join("refs/broken"), "not a hash").unwrap();

        assert_eq!(cache.resolve("org/m", "main").unwrap().commit, hash);
        assert_eq!(cache.resolve("org/m", "pr/1").unwrap().commit, hash);
        assert_eq!(
            cache.resolve("org/m", hash).unwrap().dir,
            repo.join("snapshots").join(hash)
        );

        let e = cache.resolve("org/m", "v2").unwrap_err().to_string();
        assert!(
            e.contains("refs present: broken, main")
                && e.contains("hf download org/m --revision v2"),
            "{e}"
        );
        let e = cache.resolve("org/m", "../../etc").unwrap_err();
        assert!(matches!(e, ResolveError::RefMissing { .. }));
        assert!(matches!(
            cache.resolve("org/m", "broken"),
            Err(ResolveError::BadRef { .. })
        ));
        // A FIFO as a ref fails at once instead of blocking the read.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            repo.join("refs/pipe"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = cache.resolve("org/m", "pipe").unwrap_err();
        assert!(
            matches!(e, ResolveError::RefNotAFile(_)) && e.to_string().contains("is a FIFO"),
            "{e}"
        );
        let other = "1111111111111111111111111111111111111111";
        let e = cache.resolve("org/m", other).unwrap_err().to_string();
        assert!(e.contains(&format!("snapshots/{other}")), "{e}");
        assert!(e.contains(&format!("snapshots present: {hash}")), "{e}");
        let e = cache
            .resolve("org/missing", "main")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("models--org--missing") && e.contains("--local-model-path"),
            "{e}"
        );
    }
}
