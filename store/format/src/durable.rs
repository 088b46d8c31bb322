//! Small helpers for making files and directories durable: a file written and
//! fsynced, a directory's entries fsynced. The save path's atomicity rests on
//! them (data first, then the directory entry that makes it visible).

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Creates `path` (which must not exist), writes `bytes` and fsyncs it.
pub fn write_new_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create_new(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Fsyncs a directory, making the creation, rename or removal of its entries
/// durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Fsyncs a file that is already closed (e.g. written by `std::fs::copy`).
pub fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}
