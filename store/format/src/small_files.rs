//! Reading the format's small files (`tensor_index.json`,
//! `sllm_manifest.json`) without hanging: each is opened non-blocking and
//! must be a regular file, so a FIFO or a device planted in a model folder
//! fails at once instead of blocking the reader (a daemon request, a
//! `verify`) forever.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The bytes of the regular file at `path`; an error of kind
/// `InvalidInput` naming what it is when it is something else.
pub fn read_regular_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is {what}, not a regular file"),
        ));
    }
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
