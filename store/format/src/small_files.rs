//! Opening files that must be regular files without hanging: the format's
//! small files (`tensor_index.json`, `sllm_manifest.json`), and the
//! checkpoint files the converter reads. Each is opened non-blocking and its
//! type checked on the opened descriptor, so a FIFO or a device planted in a
//! model folder fails at once instead of blocking the reader (a daemon
//! request, a `verify`, a `save`) forever, and a file swapped after a check
//! cannot slip through.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;

/// Why [`open_regular_file`] refused.
#[derive(Debug)]
pub enum OpenError {
    /// The open or the stat failed.
    Io(std::io::Error),
    /// It is something else: what, in words ([`describe`]).
    NotRegular(&'static str),
}

/// Opens `path` for reading, refusing anything but a regular file (links
/// are followed). `O_NONBLOCK` makes the open of a FIFO return at once
/// instead of waiting for a writer; it stays set, which changes nothing for
/// reads of a regular file.
pub fn open_regular_file(path: &Path) -> Result<File, OpenError> {
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    let fd = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => fd,
        // A socket (or a device without a driver) cannot be opened at all.
        Err(Errno::NXIO | Errno::NODEV) => {
            let what = rustix::fs::stat(path).map_or("a socket or device", |st| {
                describe(FileType::from_raw_mode(st.st_mode))
            });
            return Err(OpenError::NotRegular(what));
        }
        Err(e) => return Err(OpenError::Io(e.into())),
    };
    let kind = FileType::from_raw_mode(
        rustix::fs::fstat(&fd)
            .map_err(|e| OpenError::Io(e.into()))?
            .st_mode,
    );
    if kind != FileType::RegularFile {
        return Err(OpenError::NotRegular(describe(kind)));
    }
    Ok(File::from(fd))
}

/// What a file with `st_mode` `mode` (e.g. `MetadataExt::mode`) is, in
/// words.
pub fn describe_mode(mode: u32) -> &'static str {
    describe(FileType::from_raw_mode(mode))
}

/// What is at `path` when something is there but it is not a directory
/// (symlinks followed), in words; `None` for a directory or for nothing.
/// For errors that say "a regular file, not a folder" rather than "does
/// not exist".
pub fn not_a_folder(path: &Path) -> Option<&'static str> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    (!meta.is_dir()).then(|| describe_mode(meta.mode()))
}

/// What a file of type `kind` is, in words.
pub fn describe(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Fifo => "a FIFO (named pipe)",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Symlink => "a symbolic link",
        _ => "not a regular file",
    }
}

/// The bytes of the regular file at `path`; an error of kind
/// `InvalidInput` naming what it is when it is something else.
pub fn read_regular_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = open_regular_file(path).map_err(|e| match e {
        OpenError::Io(e) => e,
        OpenError::NotRegular(what) => std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is {what}, not a regular file"),
        ),
    })?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::read_regular_file;

    #[test]
    fn a_fifo_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("tensor_index.json");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = read_regular_file(&fifo).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        let file = dir.path().join("f");
        std::fs::write(&file, b"{}").unwrap();
        assert_eq!(read_regular_file(&file).unwrap(), b"{}");
    }
}
