//! Making a run cold: dropping the page cache for the files it reads.
//!
//! As root, `sync` then `echo 3 > /proc/sys/vm/drop_caches` drops everything;
//! otherwise `posix_fadvise(DONTNEED)` on each file drops its clean pages.

use std::fs::File;
use std::path::{Path, PathBuf};

/// How the cache was dropped, for the report.
pub fn drop_caches(files: &[PathBuf]) -> &'static str {
    let synced = std::process::Command::new("sync")
        .status()
        .is_ok_and(|s| s.success());
    if synced && std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok() {
        return "drop_caches";
    }
    for path in files {
        if let Ok(file) = File::open(path) {
            let _ = file.sync_all();
            let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed);
        }
    }
    "fadvise(DONTNEED)"
}

/// Every regular file under `dir`.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Reads the files once so that a warm run finds them in the page cache.
pub fn warm_up(files: &[PathBuf]) {
    for f in files {
        if let Ok(mut file) = File::open(f) {
            let _ = std::io::copy(&mut file, &mut std::io::sink());
        }
    }
}
