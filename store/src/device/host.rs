//! The host backend: pseudo-devices whose memory is a shared-memory file the
//! client created (shared/DESIGN.md section 5). The handle bytes are the
//! file's absolute path; the daemon writes into it with `pwrite`, exactly
//! where a GPU copy would land, so everything but the CUDA calls is
//! exercised without a GPU.
//!
//! A client must not be able to make the daemon write anywhere else: a
//! handle must name a regular file inside the allowed directory (`/dev/shm`
//! by default), with no symlink on the way, and writes never extend it.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
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
        let devices = (0..count.max(1))
            .map(|index| DeviceInfo {
                uuid: host_device_uuid(index),
                name: format!("host-{index}"),
                index,
            })
            .collect();
        Ok(Self { devices, root })
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
            let file = open_handle(&self.root, handle).map_err(invalid)?;
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
fn open_handle(root: &Path, handle: &[u8]) -> Result<File, String> {
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
    let path = Path::new(text);
    if !path.is_absolute()
        || path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(format!("{text:?} is not a plain absolute path"));
    }
    let real = path.canonicalize().map_err(|e| format!("{text}: {e}"))?;
    if real != path || !real.starts_with(root) {
        return Err(format!(
            "{text} is not a file inside {} (symlinks are not followed)",
            root.display()
        ));
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| format!("{text}: {e}"))?;
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
        if dst_offset + len as u64 > self.sizes[handle_idx] {
            return Err(copy_err(format!(
                "destination {dst_offset}+{len} is past the buffer's end"
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
        let d = dir.path().display();
        for (handle, why) in [
            (vec![7u8; 64], "CUDA IPC handle"),
            (vec![0xffu8; 10], "are not one"),
            (Vec::new(), "got 0 bytes"),
            (b"relative/path".to_vec(), "are not one"),
            (format!("{d}/../x").into_bytes(), "plain absolute"),
            (
                outside.path().to_str().unwrap().as_bytes().to_vec(),
                "not a file inside",
            ),
            (format!("{d}/link").into_bytes(), "not a file inside"),
            (format!("{d}/missing").into_bytes(), "No such file"),
            (format!("{d}/sub").into_bytes(), ""),
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
