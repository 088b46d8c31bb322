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
//! Nor may a client make the daemon write where the client itself could not
//! (the daemon often runs as root). The path is walked one directory at a
//! time, each opened beneath the one before, and each directory and the file
//! are checked on their fds against the [`ClientIdentity`] of the request,
//! by their mode bits in the kernel's order (owner class, else group class,
//! else other class): the client must be able to search every directory
//! from the allowed one down, and to write the file. A file with more than
//! one hard link is refused unless it is the client's (another name for it
//! may lie outside the directory). Root clients may write anything. When the
//! daemon cannot tell who the client is, it writes only into files owned by
//! its own user, and a daemon running as root writes nothing for such a
//! client. Two conservative gaps, as the daemon knows only a client's uid
//! and primary gid: a file whose group class grants less than its other
//! class is refused to non-members too, and POSIX ACLs are not consulted
//! (mode bits only).

use sllm_proto::BackendKind;
use std::fs::File;
use std::os::unix::fs::FileExt;

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use std::path::{Component, Path, PathBuf};

use super::{ClientIdentity, DeviceBackend, DeviceError, DeviceInfo, DeviceTarget};
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
    root_dir: OwnedFd,
    /// The daemon's effective uid: whose files an unknown client may name.
    daemon_uid: u32,
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
            daemon_uid: rustix::process::geteuid().as_raw(),
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
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }

    fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    fn open_target(
        &self,
        device: &DeviceInfo,
        handles: &[Vec<u8>],
        client: &ClientIdentity,
    ) -> Result<Box<dyn DeviceTarget>, DeviceError> {
        let mut files = Vec::with_capacity(handles.len());
        let mut sizes = Vec::with_capacity(handles.len());
        for (index, handle) in handles.iter().enumerate() {
            let invalid = |reason: String| DeviceError::InvalidHandle {
                device: device.uuid.clone(),
                index,
                reason,
            };
            let file = open_handle(self, handle, client).map_err(invalid)?;
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

/// Opens the file a handle names for `client`, or says why it is not
/// acceptable.
fn open_handle(
    backend: &HostBackend,
    handle: &[u8],
    client: &ClientIdentity,
) -> Result<File, String> {
    let root = backend.root.as_path();
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
    if let ClientIdentity::Unknown(why) = client
        && backend.daemon_uid == 0
    {
        return Err(format!(
            "the daemon runs as root and cannot tell who sent this request ({why}), so it \
             writes into no file for it: connect over a unix socket (--listen unix:<path>) or \
             loopback so the daemon can tell who you are"
        ));
    }
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
    let open_err = |e: rustix::io::Errno| match e {
        rustix::io::Errno::XDEV | rustix::io::Errno::LOOP => outside(),
        rustix::io::Errno::NXIO => format!("{text} is a FIFO or device, not a shared-memory file"),
        e => format!("{text}: {}", std::io::Error::from(e)),
    };
    let stat = |fd: BorrowedFd<'_>, path: &Path| {
        FileMeta::of(fd).map_err(|e| format!("{}: {e}", path.display()))
    };
    // One directory at a time, each beneath the one before, so that the
    // checks see exactly the directories the path goes through.
    let requester = Requester::new(client, backend.daemon_uid);
    let parts: Vec<&std::ffi::OsStr> = relative.iter().collect();
    let Some((name, dirs)) = parts.split_last() else {
        return Err(outside());
    };
    let mut walked = root.to_path_buf();
    requester.may_search(&walked, &stat(backend.root_dir.as_fd(), &walked)?)?;
    let mut dir: Option<OwnedFd> = None;
    for part in dirs {
        let parent = dir.as_ref().map_or(backend.root_dir.as_fd(), AsFd::as_fd);
        let next = rustix::fs::openat2(
            parent,
            *part,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(open_err)?;
        walked.push(part);
        requester.may_search(&walked, &stat(next.as_fd(), &walked)?)?;
        dir = Some(next);
    }
    let parent = dir.as_ref().map_or(backend.root_dir.as_fd(), AsFd::as_fd);
    let fd = rustix::fs::openat2(
        parent,
        *name,
        OFlags::WRONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(open_err)?;
    let meta = stat(fd.as_fd(), Path::new(text))?;
    if !meta.is_file() {
        return Err(format!("{text} is not a regular file"));
    }
    requester.may_write(text, &meta, root)?;
    Ok(File::from(fd))
}

/// Owner, group, mode and links of an opened file or directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileMeta {
    uid: u32,
    gid: u32,
    mode: u32,
    nlink: u64,
}

impl FileMeta {
    fn of(fd: BorrowedFd<'_>) -> std::io::Result<Self> {
        let st = rustix::fs::fstat(fd)?;
        Ok(Self {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode,
            nlink: st.st_nlink,
        })
    }

    fn is_file(&self) -> bool {
        FileType::from_raw_mode(self.mode) == FileType::RegularFile
    }
}

impl std::fmt::Display for FileMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "owner uid {}, group {}, mode {:04o}",
            self.uid,
            self.gid,
            self.mode & 0o7777
        )
    }
}

/// Whose permissions a request's writes are checked against.
enum Requester<'a> {
    /// Root may write anything.
    Root,
    /// A client the kernel identified.
    Client {
        uid: u32,
        gid: Option<u32>,
        who: &'a ClientIdentity,
    },
    /// An unknown client of a daemon not running as root (the root case is
    /// refused before anything is opened): the daemon's own files only.
    Unknown { daemon_uid: u32, why: &'a str },
}

/// Mode bits: write and search, in the other class; shifted for the others.
const WRITE: u32 = 0o2;
const SEARCH: u32 = 0o1;

impl<'a> Requester<'a> {
    fn new(client: &'a ClientIdentity, daemon_uid: u32) -> Self {
        match client {
            ClientIdentity::Known { uid: 0, .. } => Requester::Root,
            ClientIdentity::Known { uid, gid, .. } => Requester::Client {
                uid: *uid,
                gid: *gid,
                who: client,
            },
            ClientIdentity::Unknown(why) => Requester::Unknown { daemon_uid, why },
        }
    }

    /// Whether the client could enter directory `path` itself.
    fn may_search(&self, path: &Path, meta: &FileMeta) -> Result<(), String> {
        match self {
            Requester::Client { uid, gid, who } if !grants(meta, *uid, *gid, SEARCH) => {
                Err(format!(
                    "the client ({who}) cannot enter {} ({meta}), so it could not write the \
                     file behind this handle itself; use a buffer in a directory you can reach",
                    path.display()
                ))
            }
            // The daemon reached it, and an unknown client may name only
            // the daemon's own files.
            _ => Ok(()),
        }
    }

    /// Whether the client could write the file `path` itself.
    fn may_write(&self, path: &str, meta: &FileMeta, root: &Path) -> Result<(), String> {
        match self {
            Requester::Root => Ok(()),
            Requester::Client { uid, .. } if meta.nlink > 1 && meta.uid != *uid => Err(format!(
                "{path} ({meta}) has {} hard links and is not the client's (uid {uid}): \
                 another name for it may lie outside {}; create a buffer of your own",
                meta.nlink,
                root.display()
            )),
            Requester::Client { uid, gid, who } => {
                if grants(meta, *uid, *gid, WRITE) {
                    Ok(())
                } else {
                    Err(format!(
                        "{path} ({meta}) is not writable by the client ({who}): the daemon \
                         writes only into files its client could write itself; create the \
                         buffer as that user (e.g. mode 0600) and send its path"
                    ))
                }
            }
            Requester::Unknown { daemon_uid, why } => {
                if meta.uid == *daemon_uid && meta.mode & (WRITE << 6) != 0 {
                    Ok(())
                } else {
                    Err(format!(
                        "{path} ({meta}) is not the daemon's (uid {daemon_uid}) to write, and the \
                         daemon cannot tell who sent this request ({why}): connect over a unix \
                         socket or loopback so the daemon can tell who you are"
                    ))
                }
            }
        }
    }
}

/// Whether the mode bits grant `want` (in the other class's position) to
/// `uid` with primary group `gid`: the owner class if it owns the file, else
/// the group class if the group is its primary one, else the other class.
/// The client's supplementary groups are unknown, and if it were in the
/// file's group the group class would apply instead: the other class grants
/// only where the group class grants too.
fn grants(meta: &FileMeta, uid: u32, gid: Option<u32>, want: u32) -> bool {
    let (owner, group, other) = (
        meta.mode & (want << 6) != 0,
        meta.mode & (want << 3) != 0,
        meta.mode & want != 0,
    );
    if meta.uid == uid {
        owner
    } else if gid == Some(meta.gid) {
        group
    } else {
        other && group
    }
}

struct HostTarget {
    device: String,
    files: Vec<File>,
    sizes: Vec<u64>,
}

impl DeviceTarget for HostTarget {
    fn device(&self) -> &str {
        &self.device
    }

    fn buffer_sizes(&self) -> &[u64] {
        &self.sizes
    }

    /// The size now, not at open: a client that shrank its file must not see
    /// the daemon grow it back.
    fn current_size(&self, handle_idx: usize) -> Result<u64, DeviceError> {
        let file = self
            .files
            .get(handle_idx)
            .ok_or_else(|| self.copy_error(format!("no handle {handle_idx}")))?;
        Ok(file
            .metadata()
            .map_err(|e| self.copy_error(e.to_string()))?
            .len())
    }

    fn copy_checked(
        &mut self,
        chunk: &SharedChunk,
        src: std::ops::Range<usize>,
        handle_idx: usize,
        dst_offset: u64,
    ) -> Result<(), DeviceError> {
        self.files[handle_idx]
            .write_all_at(&chunk.bytes()[src], dst_offset)
            .map_err(|e| self.copy_error(e.to_string()))
    }

    fn synchronize(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Piece;
    use crate::pool::HostPool;

    /// This process, as the kernel would report it over a unix socket.
    fn me() -> ClientIdentity {
        ClientIdentity::Known {
            uid: rustix::process::geteuid().as_raw(),
            gid: Some(rustix::process::getegid().as_raw()),
            pid: Some(std::process::id() as i32),
        }
    }

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

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
            .open_target(&backend.devices()[0], &[handle], &me())
            .unwrap();
        assert_eq!(target.buffer_sizes(), [100]);

        let pool = HostPool::new(4096, 4096, 1).unwrap();
        let mut lease = pool.try_lease(1).unwrap().pop().unwrap();
        lease.as_mut_slice()[..10].copy_from_slice(b"0123456789");
        let chunk = lease.freeze(10);
        let piece = |chunk_offset, len, dst_offset| Piece {
            chunk_offset,
            len,
            handle_idx: 0,
            dst_offset,
        };
        target.copy(&chunk, &piece(2, 5, 90)).unwrap();
        target.synchronize().unwrap();
        assert_eq!(&std::fs::read(&buf).unwrap()[90..95], b"23456");
        assert!(
            target.copy(&chunk, &piece(0, 10, 95)).is_err(),
            "never extends the file"
        );
        assert!(
            target.copy(&chunk, &piece(5, 10, 0)).is_err(),
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
                .open_target(dev, &[handle], &me())
                .err()
                .expect("refused")
                .to_string();
            assert!(err.contains(why), "{why}: {err}");
        }
    }

    fn meta(uid: u32, gid: u32, mode: u32, nlink: u64) -> FileMeta {
        FileMeta {
            uid,
            gid,
            mode: 0o100000 | mode,
            nlink,
        }
    }

    fn client(uid: u32, gid: Option<u32>) -> ClientIdentity {
        ClientIdentity::Known {
            uid,
            gid,
            pid: None,
        }
    }

    #[test]
    fn writes_only_where_the_client_could_write() {
        let root = Path::new("/dev/shm/x");
        let write = |who: &ClientIdentity, m: FileMeta, daemon_uid: u32| {
            Requester::new(who, daemon_uid).may_write("/dev/shm/x/f", &m, root)
        };
        let alice = client(1000, Some(1000));
        let alice_by_tcp = client(1000, None);
        for (who, m, ok, why) in [
            (
                &alice,
                meta(1000, 1000, 0o600, 1),
                true,
                "hers, owner-writable",
            ),
            (&alice, meta(1000, 1000, 0o400, 1), false, "hers, read-only"),
            (
                &alice,
                meta(1000, 1000, 0o066, 1),
                false,
                "hers: the owner class decides",
            ),
            (
                &alice,
                meta(2000, 1000, 0o620, 1),
                true,
                "her group may write",
            ),
            (
                &alice_by_tcp,
                meta(2000, 1000, 0o620, 1),
                false,
                "group unknown over TCP",
            ),
            (
                &alice,
                meta(2000, 1000, 0o606, 1),
                false,
                "her group may not, others may",
            ),
            (&alice, meta(2000, 2000, 0o666, 1), true, "anyone may write"),
            (
                &alice_by_tcp,
                meta(2000, 2000, 0o666, 1),
                true,
                "anyone may write",
            ),
            (
                &alice,
                meta(2000, 2000, 0o646, 1),
                false,
                "a group class granting less",
            ),
            (&alice, meta(2000, 2000, 0o600, 1), false, "someone else's"),
            (&alice, meta(0, 0, 0o600, 1), false, "root's"),
            (
                &alice,
                meta(2000, 2000, 0o666, 2),
                false,
                "someone else's, hard-linked",
            ),
            (
                &alice,
                meta(1000, 1000, 0o600, 2),
                true,
                "hers, hard-linked",
            ),
            (
                &client(0, Some(0)),
                meta(2000, 2000, 0o400, 3),
                true,
                "root writes anything",
            ),
        ] {
            let got = write(who, m, 0);
            assert_eq!(got.is_ok(), ok, "{why}: {got:?}");
            if let Err(e) = got {
                assert!(e.contains("/dev/shm/x/f") && e.contains("owner uid"), "{e}");
                assert!(e.contains("uid 1000"), "names the client: {e}");
            }
        }
        // Unknown clients: only the daemon's own owner-writable files (the
        // root daemon's refusal comes before any file is opened).
        let unknown = ClientIdentity::Unknown("a test".into());
        assert!(write(&unknown, meta(500, 500, 0o600, 1), 500).is_ok());
        for m in [meta(500, 500, 0o400, 1), meta(501, 500, 0o666, 1)] {
            let e = write(&unknown, m, 500).unwrap_err();
            assert!(
                e.contains("cannot tell who") && e.contains("unix socket"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_client_must_be_able_to_enter_each_directory() {
        let dir = |uid: u32, gid: u32, mode: u32| FileMeta {
            mode: 0o040000 | mode,
            ..meta(uid, gid, 0, 2)
        };
        let path = Path::new("/dev/shm/x/private");
        let alice = client(1000, Some(1000));
        let search = |who: &ClientIdentity, m| Requester::new(who, 0).may_search(path, &m);
        assert!(search(&alice, dir(0, 0, 0o1777)).is_ok());
        assert!(search(&alice, dir(1000, 1000, 0o700)).is_ok());
        assert!(search(&alice, dir(2000, 1000, 0o750)).is_ok());
        let e = search(&alice, dir(2000, 2000, 0o700)).unwrap_err();
        assert!(
            e.contains("cannot enter /dev/shm/x/private") && e.contains("0700"),
            "{e}"
        );
        assert!(search(&client(0, None), dir(2000, 2000, 0o700)).is_ok());
    }

    #[test]
    fn unknown_clients_get_the_daemons_own_files_or_nothing_as_root() {
        let dir = tempfile::tempdir_in(DEFAULT_SHM_DIR).unwrap();
        let backend = HostBackend::new(1, dir.path()).unwrap();
        let dev = &backend.devices()[0];
        let (own, read_only) = (dir.path().join("own"), dir.path().join("read-only"));
        std::fs::write(&own, [0u8; 8]).unwrap();
        std::fs::write(&read_only, [0u8; 8]).unwrap();
        std::fs::set_permissions(
            &read_only,
            std::os::unix::fs::PermissionsExt::from_mode(0o400),
        )
        .unwrap();
        let unknown = ClientIdentity::Unknown("connected from 192.0.2.1:5000".into());
        let open = |path: &Path| {
            backend
                .open_target(dev, &[path.to_str().unwrap().as_bytes().to_vec()], &unknown)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        if is_root() {
            for path in [&own, &read_only] {
                let e = open(path).unwrap_err();
                assert!(
                    e.contains("runs as root and cannot tell who")
                        && e.contains("192.0.2.1")
                        && e.contains("so the daemon can tell who you are"),
                    "{e}"
                );
            }
        } else {
            open(&own).unwrap();
            let e = open(&read_only).unwrap_err();
            assert!(
                e.contains("mode 0400") && e.contains("cannot tell who"),
                "{e}"
            );
        }
    }

    #[test]
    fn other_users_files_and_private_directories_are_refused_as_root() {
        if !is_root() {
            eprintln!("skipping: needs root to make files owned by other users");
            return;
        }
        let dir = tempfile::tempdir_in(DEFAULT_SHM_DIR).unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o1777),
        )
        .unwrap();
        let backend = HostBackend::new(1, dir.path()).unwrap();
        let dev = &backend.devices()[0];
        let nobody = client(65534, Some(65534));
        let make = |name: &str, uid: u32, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, [7u8; 16]).unwrap();
            std::os::unix::fs::chown(&path, Some(uid), Some(uid)).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .unwrap();
            path
        };
        let open = |path: &Path| {
            backend
                .open_target(dev, &[path.to_str().unwrap().as_bytes().to_vec()], &nobody)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        open(&make("mine", 65534, 0o600)).unwrap();
        open(&make("open-to-all", 65533, 0o666)).unwrap();
        let e = open(&make("theirs", 65533, 0o400)).unwrap_err();
        assert!(
            e.contains("owner uid 65533") && e.contains("mode 0400") && e.contains("uid 65534"),
            "{e}"
        );
        let e = open(&make("roots", 0, 0o600)).unwrap_err();
        assert!(e.contains("owner uid 0"), "{e}");
        // Hard-linked: refused although anyone may write it.
        let linked = make("linked", 65533, 0o666);
        std::fs::hard_link(&linked, dir.path().join("other-name")).unwrap();
        let e = open(&linked).unwrap_err();
        assert!(e.contains("2 hard links"), "{e}");
        // A world-writable file inside someone's private directory.
        let private = dir.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::write(private.join("f"), [0u8; 4]).unwrap();
        std::fs::set_permissions(
            private.join("f"),
            std::os::unix::fs::PermissionsExt::from_mode(0o666),
        )
        .unwrap();
        std::fs::set_permissions(
            &private,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let e = open(&private.join("f")).unwrap_err();
        assert!(e.contains("cannot enter") && e.contains("private"), "{e}");
        // Once the directory is theirs: the world-writable file is fine, a
        // read-only one is not, until it is theirs too.
        std::os::unix::fs::chown(&private, Some(65534), Some(65534)).unwrap();
        open(&private.join("f")).unwrap();
        std::fs::set_permissions(
            private.join("f"),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        let e = open(&private.join("f")).unwrap_err();
        assert!(e.contains("not writable by the client (uid 65534"), "{e}");
        std::os::unix::fs::chown(private.join("f"), Some(65534), Some(65534)).unwrap();
        open(&private.join("f")).unwrap();
    }
}
