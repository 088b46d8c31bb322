//! The Hugging Face side: which settings are in force, where the cache is,
//! and whether a model's snapshot is complete enough to start with the
//! network off.
//!
//! The traps: `HF_HUB_OFFLINE=1` set globally so a model missing from the
//! cache makes vLLM exit at start (a crash loop under a supervisor, a "hang"
//! in a benchmark); a snapshot with interrupted downloads; a moving ref
//! (`main`) where a pinned hash was meant; a baseline that silently
//! downloads and so inflates every speed-up measured against it.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::Path;

use super::Check;
use crate::import::hf_cache::{HfCache, ResolveError, Snapshot, is_commit_hash};
use crate::units::human_bytes;

/// The variables the doctor reports, in this order.
const VARS: [&str; 4] = [
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
];

/// Files of which a model folder needs one for vLLM to build a tokenizer.
pub const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "tiktoken.model",
];

/// The Hugging Face settings as a process sees them.
#[derive(Clone, Debug, Default)]
pub struct HfEnv {
    vars: Vec<(String, OsString)>,
    /// A cache named by a snapshot path (`.../models--org--name/snapshots/
    /// <hash>`), which wins over the variables.
    cache_from_path: Option<std::path::PathBuf>,
}

impl HfEnv {
    /// The settings of this process.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// The settings `var` returns (for tests and for judging another
    /// process's environment).
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Self {
        let names = VARS.iter().chain(&["XDG_CACHE_HOME", "HOME"]);
        Self {
            vars: names
                .filter_map(|n| var(n).map(|v| ((*n).to_owned(), v)))
                .collect(),
            cache_from_path: None,
        }
    }

    /// The same settings, looking for models in the cache `root` (the one a
    /// snapshot path given as the model lies in).
    pub fn with_cache_from_path(mut self, root: &Path) -> Self {
        self.cache_from_path = Some(root.to_owned());
        self
    }

    /// The same settings with offline mode on (`HF_HUB_OFFLINE=1`,
    /// `TRANSFORMERS_OFFLINE=1`).
    pub fn offline(mut self) -> Self {
        self.vars
            .retain(|(n, _)| n != "HF_HUB_OFFLINE" && n != "TRANSFORMERS_OFFLINE");
        self.vars.push(("HF_HUB_OFFLINE".into(), "1".into()));
        self.vars.push(("TRANSFORMERS_OFFLINE".into(), "1".into()));
        self
    }

    /// The same settings without `name`.
    fn without(&self, name: &str) -> Self {
        let mut out = self.clone();
        out.vars.retain(|(n, _)| n != name);
        out
    }

    fn get(&self, name: &str) -> Option<&OsString> {
        self.vars.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The cache these settings choose.
    pub fn cache(&self) -> HfCache {
        match &self.cache_from_path {
            Some(root) => HfCache {
                root: root.clone(),
                chosen_by: "the snapshot path given as the model".into(),
            },
            None => HfCache::from_vars(|n| self.get(n).cloned()),
        }
    }

    /// Offline mode as `huggingface_hub` reads it (and `transformers`
    /// through it): `HF_HUB_OFFLINE` when set and not empty, else
    /// `TRANSFORMERS_OFFLINE`; true for 1, ON, YES or TRUE (any case).
    pub fn is_offline(&self) -> bool {
        let set = |n: &str| self.get(n).filter(|v| !v.is_empty());
        set("HF_HUB_OFFLINE")
            .or_else(|| set("TRANSFORMERS_OFFLINE"))
            .is_some_and(|v| truthy(&v.to_string_lossy()))
    }
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

/// The settings line, and for a model (with its snapshot as [`find`]
/// found it) the snapshot checks.
pub fn checks(
    env: &HfEnv,
    model: Option<(&str, &Result<CachedSnapshot, ResolveError>)>,
    revision: &str,
) -> Vec<Check> {
    let cache = env.cache();
    let settings: Vec<String> = VARS
        .iter()
        .map(|n| match env.get(n) {
            Some(v) => format!("{n}={}", v.to_string_lossy()),
            None => format!("{n} unset"),
        })
        .collect();
    let mode = if env.is_offline() {
        "offline mode ON: nothing will be downloaded"
    } else {
        "online: missing files are downloaded at start"
    };
    let summary = format!(
        "{}; cache {} (from {}); {mode}",
        settings.join(", "),
        cache.root.display(),
        cache.chosen_by
    );
    let mut out = vec![if cache.root.is_dir() || model.is_some() {
        Check::pass("hf.settings", summary)
    } else {
        Check::warn(
            "hf.settings",
            format!("{summary}; the cache directory does not exist"),
            "set HF_HUB_CACHE or HF_HOME to where your models were downloaded",
        )
    }];
    if let Some((model, found)) = model {
        out.extend(snapshot_checks(env, model, revision, found));
    }
    out
}

/// When `HF_HUB_CACHE` chooses a cache without the model but the cache the
/// other settings choose (`$HF_HOME/hub`, the default) has it: the check
/// that says so. The fix is to unset `HF_HUB_CACHE`, not offline mode (which
/// would make vLLM download at every start, or loop on a crash).
fn in_the_other_cache(env: &HfEnv, model: &str, revision: &str) -> Option<Check> {
    if env.cache_from_path.is_some() {
        return None;
    }
    env.get("HF_HUB_CACHE").filter(|v| !v.is_empty())?;
    let here = env.cache();
    let other = env.without("HF_HUB_CACHE").cache();
    if other.root == here.root {
        return None;
    }
    let snapshot = other.resolve(model, revision).ok()?;
    let summary = format!(
        "{model} is not in the cache HF_HUB_CACHE chooses ({}) but is in {} (chosen by {} once \
         HF_HUB_CACHE is unset): vLLM, run with these settings, would not find it",
        here.root.display(),
        snapshot.dir.display(),
        other.chosen_by
    );
    let fix = format!(
        "unset HF_HUB_CACHE (the model is in {}), or point HF_HUB_CACHE at that cache",
        other.root.display()
    );
    Some(if env.is_offline() {
        Check::stop("hf.snapshot", summary, fix)
    } else {
        Check::warn("hf.snapshot", summary, fix)
    })
}

/// A snapshot folder given as the model (`vllm serve /.../models--org--name/
/// snapshots/<hash>`, the runbook's production form): its cache root, the
/// model id and the commit. `None` for any other path.
pub fn parse_snapshot_path(path: &Path) -> Option<(std::path::PathBuf, String, String)> {
    let hash = path.file_name()?.to_str()?;
    let snapshots = path.parent()?;
    let repo = snapshots.parent()?;
    if snapshots.file_name()? != "snapshots" || !is_commit_hash(hash) {
        return None;
    }
    let id = repo.file_name()?.to_str()?.strip_prefix("models--")?;
    let (org, name) = id.split_once("--")?;
    if org.is_empty() || name.is_empty() {
        return None;
    }
    Some((
        repo.parent()?.to_owned(),
        format!("{org}/{name}"),
        hash.to_owned(),
    ))
}

/// A model's snapshot in the cache and what is in it, read once per run.
#[derive(Debug)]
pub struct CachedSnapshot {
    pub snapshot: Snapshot,
    contents: Contents,
}

impl CachedSnapshot {
    /// The commit the revision resolved to.
    pub fn commit(&self) -> &str {
        &self.snapshot.commit
    }

    /// Total size of the weight files.
    pub fn weight_bytes(&self) -> u64 {
        self.contents.weight_bytes
    }

    /// Whether every file a conversion reads is there (config, and weights
    /// whose blobs are whole): `sllm-store save` can convert it.
    pub fn is_whole(&self) -> bool {
        self.contents.missing.is_empty() && !self.contents.weights.is_empty()
    }
}

/// Resolves `revision` of `model` in the cache `env` chooses, and reads
/// what the snapshot holds.
pub fn find(env: &HfEnv, model: &str, revision: &str) -> Result<CachedSnapshot, ResolveError> {
    let snapshot = env.cache().resolve(model, revision)?;
    let contents = contents(&snapshot);
    Ok(CachedSnapshot { snapshot, contents })
}

/// Is `model` at `revision` (`found` by [`find`]) in the cache, complete,
/// and pinned? Offline mode is judged from `env`.
pub fn snapshot_checks(
    env: &HfEnv,
    model: &str,
    revision: &str,
    found: &Result<CachedSnapshot, ResolveError>,
) -> Vec<Check> {
    let offline = env.is_offline();
    let cached = match found {
        Ok(c) => c,
        Err(e) => {
            if let Some(check) = in_the_other_cache(env, model, revision) {
                return vec![check];
            }
            return vec![if offline {
                Check::stop(
                    "hf.snapshot",
                    format!(
                        "{e}. With offline mode on, vLLM cannot download it and exits at start \
                         (a crash loop under a supervisor)"
                    ),
                    format!(
                        "download it while online (`hf download {model} --revision {revision}`), \
                         or unset HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE"
                    ),
                )
            } else {
                Check::warn(
                    "hf.snapshot",
                    format!(
                        "{e}. vLLM would download it at start, so a restart benchmark's \
                         baseline would time the download"
                    ),
                    format!("download it first: `hf download {model} --revision {revision}`"),
                )
            }];
        }
    };
    let snapshot = &cached.snapshot;
    let mut out = vec![Check::pass(
        "hf.snapshot",
        format!(
            "{model}@{revision} -> {} at {}",
            snapshot.commit,
            snapshot.dir.display()
        ),
    )];
    out.push(files_check(snapshot, &cached.contents, model, offline));
    out.push(if snapshot.pinned {
        Check::pass(
            "hf.pinned",
            format!("revision pinned to {}", snapshot.commit),
        )
    } else {
        Check::warn(
            "hf.pinned",
            format!(
                "revision {revision:?} is a moving ref; it resolves to {} today",
                snapshot.commit
            ),
            format!(
                "pin it on every command line: `vllm serve {model} --revision {c}` and \
                 `sllm-store save --model {model} --revision {c}`",
                c = snapshot.commit
            ),
        )
    });
    out
}

/// What is in a snapshot.
#[derive(Debug, Default)]
struct Contents {
    has_config: bool,
    /// Weight files named by the index (or found), and their total size.
    weights: Vec<String>,
    weight_bytes: u64,
    /// Needed files that are absent or dangling symlinks (blob missing).
    missing: Vec<String>,
    has_tokenizer: bool,
    /// Interrupted downloads among the repo's blobs.
    incomplete_blobs: usize,
}

fn contents(snapshot: &Snapshot) -> Contents {
    let dir = &snapshot.dir;
    let mut c = Contents::default();
    // `exists` follows symlinks, so a link whose blob is gone reads as missing.
    let present = |name: &str| dir.join(name).exists();
    c.has_config = present("config.json");
    if !c.has_config {
        c.missing.push("config.json".into());
    }
    let index = dir.join("model.safetensors.index.json");
    // Opened like the converter opens it: a FIFO there must not hang the doctor.
    if let Some(map) = crate::import::open_source_file(&index).ok().and_then(|f| {
        serde_json::from_reader::<_, serde_json::Value>(std::io::BufReader::new(f)).ok()
    }) {
        let shards: BTreeSet<String> = map["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        c.weights = shards.into_iter().collect();
    } else {
        let mut found: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".safetensors"))
            .collect();
        found.sort();
        c.weights = found;
    }
    for w in &c.weights {
        match std::fs::metadata(dir.join(w)) {
            Ok(m) => c.weight_bytes += m.len(),
            Err(_) => c.missing.push(w.clone()),
        }
    }
    c.has_tokenizer = TOKENIZER_FILES.iter().any(|n| present(n));
    let blobs = dir
        .parent()
        .and_then(Path::parent)
        .map(|repo| repo.join("blobs"));
    c.incomplete_blobs = blobs
        .and_then(|b| std::fs::read_dir(b).ok())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
        .count();
    c
}

fn files_check(snapshot: &Snapshot, c: &Contents, model: &str, offline: bool) -> Check {
    let name = "hf.files";
    let redownload = format!(
        "download it again while online: `hf download {model} --revision {}`",
        snapshot.commit
    );
    if c.weights.is_empty() {
        let summary = format!(
            "{} has no .safetensors weights (sllm-store converts safetensors only)",
            snapshot.dir.display()
        );
        return if offline {
            Check::stop(name, summary, redownload)
        } else {
            Check::warn(name, summary, redownload)
        };
    }
    if !c.missing.is_empty() {
        let summary = format!(
            "{} is incomplete: {} missing or dangling ({} interrupted download(s) in blobs/)",
            snapshot.dir.display(),
            c.missing.join(", "),
            c.incomplete_blobs
        );
        return if offline {
            Check::stop(
                name,
                format!("{summary}; offline, vLLM cannot fetch them and exits at start"),
                redownload,
            )
        } else {
            Check::warn(
                name,
                format!("{summary}; vLLM would download them at start"),
                redownload,
            )
        };
    }
    let summary = format!(
        "config.json and {} weight file(s), {}, all present",
        c.weights.len(),
        human_bytes(c.weight_bytes)
    );
    if !c.has_tokenizer {
        return Check::warn(
            name,
            format!(
                "{summary}; no tokenizer file ({})",
                TOKENIZER_FILES.join(", ")
            ),
            "vLLM loads the tokenizer from the snapshot: download it, or start vLLM with \
             --tokenizer <other> or --skip-tokenizer-init",
        );
    }
    if c.incomplete_blobs > 0 {
        return Check::warn(
            name,
            format!(
                "{summary}; {} interrupted download(s) left in blobs/",
                c.incomplete_blobs
            ),
            "harmless but wasted space: remove the *.incomplete files, or `hf cache scan`",
        );
    }
    Check::pass(name, summary)
}

/// Is the snapshot on the same drive as the storage path? If not, a
/// restart comparison also compares two drives.
pub fn device_check(cached: &CachedSnapshot, storage: &Path) -> Option<Check> {
    let weight = cached.contents.weights.first()?;
    // The snapshot's files are links into blobs/: judge where the bytes are.
    let data = std::fs::canonicalize(cached.snapshot.dir.join(weight)).ok()?;
    let (same, cache, store) = super::storage::same_disks(&data, storage)?;
    let describe = |l: &super::storage::Location| {
        format!(
            "{} ({}, mounted at {})",
            l.describe_disks(),
            l.fstype,
            l.mount_point.display()
        )
    };
    Some(if same {
        Check::pass(
            "hf.device",
            format!(
                "the snapshot's weights and the storage path share {}",
                describe(&cache)
            ),
        )
    } else {
        Check::warn(
            "hf.device",
            format!(
                "the snapshot's weights are on {}, the storage path on {}: a restart comparison \
                 would also compare the two drives",
                describe(&cache),
                describe(&store)
            ),
            "for a like-for-like benchmark put HF_HUB_CACHE on the storage path's drive, or \
             report both drives with the result",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HfEnv {
        HfEnv::from_vars(|n| {
            pairs
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| OsString::from(v))
        })
    }

    #[test]
    fn offline_is_read_like_huggingface_hub() {
        assert!(!env(&[]).is_offline());
        assert!(env(&[("HF_HUB_OFFLINE", "1")]).is_offline());
        assert!(env(&[("TRANSFORMERS_OFFLINE", "yes")]).is_offline());
        assert!(env(&[("HF_HUB_OFFLINE", "True")]).is_offline());
        assert!(!env(&[("HF_HUB_OFFLINE", "0")]).is_offline());
        assert!(!env(&[("HF_HUB_OFFLINE", "")]).is_offline());
        assert!(env(&[("HF_HUB_OFFLINE", ""), ("TRANSFORMERS_OFFLINE", "1")]).is_offline());
        assert!(
            !env(&[("HF_HUB_OFFLINE", "0"), ("TRANSFORMERS_OFFLINE", "1")]).is_offline(),
            "HF_HUB_OFFLINE wins when set"
        );
        assert!(env(&[("HF_HUB_OFFLINE", "0")]).offline().is_offline());
    }

    #[test]
    fn the_cache_follows_the_variables() {
        let e = env(&[("HF_HOME", "/h"), ("HOME", "/home/u")]);
        assert_eq!(e.cache().root, Path::new("/h/hub"));
        assert_eq!(
            env(&[("HOME", "/home/u")]).cache().root,
            Path::new("/home/u/.cache/huggingface/hub")
        );
    }
}
