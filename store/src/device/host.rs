//! The host backend: pseudo-devices whose memory is a shared-memory file the
//! client created (shared/DESIGN.md section 5). The handle bytes are the
//! file's absolute path; the daemon writes into it with `pwrite`, exactly
//! where a GPU copy would land, so everything but the CUDA calls is
//! exercised without a GPU.
//!
//! A client must not be able to make the daemon write anywhere else. A
//! handle is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//! relative to a directory fd held on the allowed directory (`/dev/shm` by
//! default), so no symlink, `..` or rename race can lead out of it; it is
//! opened with `O_NONBLOCK` (a FIFO fails instead of blocking the request)
//! and must be a regular file, checked on the opened fd. Writes never go past
//! the file's size at open.
//!
//! The daemon writes into any regular file in that directory it is allowed
//! to open: this backend is for tests and machines without a GPU. Give it a
//! directory of its own (`--host-shm-dir`) where other users' files could be.

use std::fs::File;
use std::os::unix::fs::FileExt;

use rustix::fs::{Mode, OFlags, ResolveFlags};
use std::path::{Component, Path, PathBuf};

use super::{DeviceBackend, DeviceError, DeviceInfo, DeviceTarget};
use crate::pool::SharedChunk;

/// Default directory for the files behind host handles.
pub const DEFAULT_SHM_DIR: &str = "/dev/shm";
/// Longest handle accepted, in bytes.
const MAX_HANDLE_BYTES: usize = 4096;

/// Pseudo-devices backed by shared-memory files.
pub struct HostBackend {
    devices: Vec<DeviceInfo>,
    root: PathBuf,
    /// Held open: handles are resolved beneath it.
    root_dir: rustix::fd::OwnedFd,
}

impl HostBackend {
    /// `count` pseudo-devices accepting files under `root`.
    pub fn new(count: usize, root: &Path) -> Result<Self, DeviceError> {
        let root = root.canonicalize().map_err(|e| {
            DeviceError::Unavailable(format!(
                "the host backend's directory {} is unusable: {e}; pass --host-shm-dir",
                root.display()
            ))
        })?;
        let root_dir = rustix::fs::open(
            &root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| DeviceError::Unavailable(format!("cannot open {}: {e}", root.display())))?;
        let devices = (0..count.max(1))
            .map(|index| DeviceInfo {
                uuid: host_device_uuid(index),
                name: format!("host-{index}"),
                index,
            })
            .collect();
        Ok(Self {
            devices,
            root,
            root_dir,
        })
    }

    /// The directory handles must live in.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// The UUID of host pseudo-device `index` ("host" in hex, then the index).
pub fn host_device_uuid(index: usize) -> String {
    format!("686f7374-0000-4000-8000-{index:012x}")
}

impl DeviceBackend for HostBackend {
    fn kind(&self) -> &'static str {
        "host"
    }

    fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    fn open_target(
        &self,
        device: &DeviceInfo,
        handles: &[Vec<u8>],
    ) -> Result<Box<dyn DeviceTarget>, DeviceError> {
        let mut files = Vec::with_capacity(handles.len());
        let mut sizes = Vec::with_capacity(handles.len());
        for (index, handle) in handles.iter().enumerate() {
            let invalid = |reason: String| DeviceError::InvalidHandle {
                device: device.uuid.clone(),
                index,
                reason,
            };
            let file = open_handle(&self.root, &self.root_dir, handle).map_err(invalid)?;
            let size = file.metadata().map_err(|e| invalid(e.to_string()))?.len();
            files.push(file);
            sizes.push(size);
        }
        Ok(Box::new(HostTarget {
            device: device.uuid.clone(),
            files,
            sizes,
        }))
    }
}

/// Opens the file a handle names, or says why it is not acceptable.
fn open_handle(root: &Path, root_dir: &rustix::fd::OwnedFd, handle: &[u8]) -> Result<File, String> {
    if handle.is_empty() || handle.len() > MAX_HANDLE_BYTES {
        return Err(format!(
            "a host handle is the path of a shared-memory file (1 to {MAX_HANDLE_BYTES} bytes), got {} bytes",
            handle.len()
        ));
    }
    let text = match std::str::from_utf8(handle) {
        Ok(text) if text.starts_with('/') => text,
        _ => {
            let hint = if handle.len() == 64 {
                " (it looks like a 64-byte CUDA IPC handle: this daemon runs the host backend; \
                 start it with --device cuda on the GPU machine)"
            } else {
                ""
            };
            return Err(format!(
                "a host handle is the absolute path of a shared-memory file, got {} bytes that \
                 are not one{hint}",
                handle.len()
            ));
        }
    };
    let outside = || {
        format!(
            "{text} is not a file inside {} (symlinks are not followed)",
            root.display()
        )
    };
    let relative = Path::new(text).strip_prefix(root).map_err(|_| outside())?;
    if relative.as_os_str().is_empty()
        || relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(outside());
    }
    let fd = rustix::fs::openat2(
        root_dir,
        relative,
        OFlags::WRONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| match e {
        rustix::io::Errno::XDEV | rustix::io::Errno::LOOP => outside(),
        rustix::io::Errno::NXIO => format!("{text} is a FIFO or device, not a shared-memory file"),
        e => format!("{text}: {}", std::io::Error::from(e)),
    })?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| format!("{text}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{text} is not a regular file"));
    }
    Ok(file)
}

struct HostTarget {
    device: String,
    files: Vec<File>,
    sizes: Vec<u64>,
}

impl DeviceTarget for HostTarget {
    fn buffer_sizes(&self) -> &[u64] {
        &self.sizes
    }

    fn copy(
        &mut self,
        chunk: &SharedChunk,
        src_offset: usize,
        len: usize,
        handle_idx: usize,
        dst_offset: u64,
    ) -> Result<(), DeviceError> {
        let copy_err = |reason: String| DeviceError::Copy {
            device: self.device.clone(),
            reason,
        };
        let src = chunk
            .bytes()
            .get(src_offset..src_offset + len)
            .ok_or_else(|| {
                copy_err(format!(
                    "source range {src_offset}+{len} is outside the chunk"
                ))
            })?;
        let file = self
            .files
            .get(handle_idx)
            .ok_or_else(|| copy_err(format!("no handle {handle_idx}")))?;
        // The size now, not at open: a client that shrank its file must not
        // see the daemon grow it back.
        let size = file.metadata().map_err(|e| copy_err(e.to_string()))?.len();
        if dst_offset
            .checked_add(len as u64)
            .is_none_or(|end| end > size)
        {
            return Err(copy_err(format!(
                "destination {dst_offset}+{len} is past the buffer's end ({size})"
            )));
        }
        file.write_all_at(src, dst_offset)
            .map_err(|e| copy_err(e.to_string()))
    }

    fn synchronize(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::HostPool;

    #[test]
    fn copies_into_a_shared_memory_file() {
        let dir = tempfile::tempdir_in(DEFAULT_SHM_DIR).unwrap();
        let backend = HostBackend::new(2, dir.path()).unwrap();
        assert_eq!(
            backend.devices()[1].uuid,
            "686f7374-0000-4000-8000-000000000001"
        );
        let buf = dir.path().join("buf");
        std::fs::write(&buf, vec![0u8; 100]).unwrap();
        let handle = buf.to_str().unwrap().as_bytes().to_vec();
        let mut target = backend
            .open_target(&backend.devices()[0], &[handle])
            .unwrap();
        assert_eq!(target.buffer_sizes(), [100]);

        let pool = HostPool::new(4096, 4096, 1).unwrap();
        let mut lease = pool.try_lease(1).unwrap().pop().unwrap();
        lease.as_mut_slice()[..10].copy_from_slice(b"0123456789");
        let chunk = lease.freeze(10);
        target.copy(&chunk, 2, 5, 0, 90).unwrap();
        target.synchronize().unwrap();
        assert_eq!(&std::fs::read(&buf).unwrap()[90..95], b"23456");
        assert!(
            target.copy(&chunk, 0, 10, 0, 95).is_err(),
            "never extends the file"
        );
        assert!(
            target.copy(&chunk, 5, 10, 0, 0).is_err(),
            "source outside the chunk"
        );
    }

    #[test]
    fn refuses_handles_that_point_elsewhere() {
        let dir = tempfile::tempdir_in(DEFAULT_SHM_DIR).unwrap();
        let backend = HostBackend::new(1, dir.path()).unwrap();
        let dev = &backend.devices()[0];
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(dir.path().join("real"), [0u8; 8]).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let d = dir.path().display();
        // A symlinked directory on the way is refused too.
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::write(elsewhere.path().join("x"), [0u8; 8]).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("linkdir")).unwrap();
        for (handle, why) in [
            (format!("{d}/linkdir/x").into_bytes(), "not a file inside"),
            (vec![7u8; 64], "CUDA IPC handle"),
            (vec![0xffu8; 10], "are not one"),
            (Vec::new(), "got 0 bytes"),
            (b"relative/path".to_vec(), "are not one"),
            (format!("{d}/../x").into_bytes(), "not a file inside"),
            (
                outside.path().to_str().unwrap().as_bytes().to_vec(),
                "not a file inside",
            ),
            (format!("{d}/link").into_bytes(), "not a file inside"),
            (format!("{d}/missing").into_bytes(), "No such file"),
            (format!("{d}/sub").into_bytes(), ""),
            (format!("{d}/fifo").into_bytes(), "FIFO"),
            (format!("{d}/sub/../real").into_bytes(), "not a file inside"),
        ] {
            let err = backend
                .open_target(dev, &[handle])
                .err()
                .expect("refused")
                .to_string();
            assert!(err.contains(why), "{why}: {err}");
        }
    }
}
