//! Device memory for the daemon's host backend: a shared-memory file whose
//! absolute path is the handle the daemon writes through. Removed on drop.
//!
//! A process that is killed cannot remove its buffers, and a tmpfs file
//! holds its memory until someone does. So a buffer's name carries its
//! process (`sllm-buffer-<pid>-<start time>-<uuid>`), and creating one first
//! removes this user's buffers whose process is gone, as GPU memory is freed
//! when the process that allocated it dies. The Python client names and
//! sweeps its buffers the same way.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A shared-memory "device buffer".
#[derive(Debug)]
pub struct ShmBuffer {
    path: PathBuf,
    file: File,
    size: u64,
}

impl ShmBuffer {
    /// Creates a zero-filled buffer of `size` bytes in `dir` (the daemon's
    /// `host_shm_dir`), readable and writable by this user only. Its memory
    /// is allocated and written now, as `cudaMalloc` hands out memory that
    /// is really there, so the daemon's copies only copy: `fallocate` alone
    /// reserves tmpfs pages without touching them, and on a VM whose host
    /// takes freed guest memory back (free page reporting) the first write
    /// to each page then pays a host fault inside the copy (4x slower here).
    pub fn create(dir: &Path, size: u64) -> io::Result<Self> {
        remove_orphans(dir);
        let me = std::process::id();
        let path = dir.join(format!(
            "{PREFIX}{me}-{}-{}",
            start_time(me).unwrap_or(0),
            uuid::Uuid::new_v4()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let buffer = Self { path, file, size };
        if size > 0 {
            // Fails fast with ENOSPC before writing anything.
            rustix::fs::fallocate(&buffer.file, rustix::fs::FallocateFlags::empty(), 0, size)?;
            const PIECE: u64 = 8 << 20;
            let zeros = vec![0u8; PIECE.min(size) as usize];
            for offset in (0..size).step_by(PIECE as usize) {
                let len = PIECE.min(size - offset) as usize;
                buffer.file.write_all_at(&zeros[..len], offset)?;
            }
        }
        Ok(buffer)
    }

    /// The handle to send the daemon.
    pub fn handle(&self) -> Vec<u8> {
        self.path.as_os_str().as_encoded_bytes().to_vec()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads bytes back (to verify a load).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

const PREFIX: &str = "sllm-buffer-";

/// When process `pid` started (clock ticks after boot, `/proc/<pid>/stat`'s
/// 22nd field): with the pid, it names one process even after pids wrap.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Removes the buffers in `dir` that this user owns and whose process is
/// gone (or whose pid now names another process). Buffers named otherwise,
/// or another user's, are left alone.
pub fn remove_orphans(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let uid = rustix::process::geteuid().as_raw();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((pid, started)) =
            name.to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|rest| {
                    let mut parts = rest.splitn(3, '-');
                    let pid = parts.next()?.parse::<u32>().ok()?;
                    let started = parts.next()?.parse::<u64>().ok()?;
                    parts.next()?;
                    Some((pid, started))
                })
        else {
            continue;
        };
        let mine = entry
            .metadata()
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == uid);
        if mine && start_time(pid) != Some(started) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl Drop for ShmBuffer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_process_buffers_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let live = ShmBuffer::create(dir.path(), 4096).unwrap();
        // A process that has exited: a child that ran and was reaped.
        let child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        let mut child = child;
        child.wait().unwrap();
        let dead = dir.path().join(format!("{PREFIX}{dead_pid}-1-x"));
        std::fs::write(&dead, b"left behind").unwrap();
        // This process, but a start time it does not have: its pid reused.
        let reused = dir
            .path()
            .join(format!("{PREFIX}{}-1-x", std::process::id()));
        std::fs::write(&reused, b"left behind").unwrap();
        let other = dir.path().join("sllm-buffer-not-ours");
        std::fs::write(&other, b"unknown name").unwrap();

        let next = ShmBuffer::create(dir.path(), 4096).unwrap();
        assert!(!dead.exists(), "the dead process's buffer stays");
        assert!(!reused.exists(), "the buffer of a reused pid stays");
        assert!(other.exists(), "a buffer named otherwise was removed");
        assert!(live.path().exists() && next.path().exists());
        let path = next.path().to_owned();
        drop(next);
        assert!(!path.exists(), "a dropped buffer stays");
    }
}
