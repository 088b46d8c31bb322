//! Progress reporting for long work (saving, verifying), decoupled from how
//! it is shown: the binary draws a bar on a terminal, tests and the daemon
//! pass `&()` and see nothing.

/// Receives progress of one long operation, from any thread.
pub trait Progress: Sync {
    /// Work of `total_bytes` begins; `what` names it ("saving", "verifying").
    fn begin(&self, what: &str, total_bytes: u64) {
        let _ = (what, total_bytes);
    }
    /// `bytes` more are done.
    fn advance(&self, bytes: u64) {
        let _ = bytes;
    }
    /// The work ended (successfully or not).
    fn finish(&self) {}
}

/// No progress display.
impl Progress for () {}
