//! Device memory for the daemon's host backend: a shared-memory file whose
//! absolute path is the handle the daemon writes through. Removed on drop.

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
        let path = dir.join(format!("sllm-buffer-{}", uuid::Uuid::new_v4()));
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

impl Drop for ShmBuffer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
