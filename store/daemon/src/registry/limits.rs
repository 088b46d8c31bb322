//! Every bound the registry keeps, in one place: per request, over all work
//! at once, and the waits and polls of its loops.

use std::time::Duration;

/// Limits checked on every request.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Copies (`MemCopyChunk`s) in one request, all devices together.
    pub max_copies_per_request: usize,
    /// Handles per device in one request.
    pub max_handles_per_device: usize,
    /// Replicas copying at once, all models together.
    pub max_active_replicas: usize,
    /// Bytes that the replicas copying at once may still have to copy, all
    /// together: the whole work the daemon accepts at a time.
    pub max_active_copy_bytes: u64,
    /// Pieces (copies after splitting per chunk) of the replicas copying at
    /// once: the memory their plans take.
    pub max_active_pieces: usize,
    /// How long ConfirmModel waits for a replica it has not heard of.
    pub unknown_replica_wait: Duration,
    /// How long ConfirmModel waits for a replica to finish, and how long a
    /// replica may copy at all, confirmed or not.
    pub confirm_timeout: Duration,
    /// Finished, unconfirmed replicas are forgotten after this long.
    pub replica_retention: Duration,
    /// How long a ConfirmModel that timed out waits for the aborted copies
    /// to release the client's buffers.
    pub abort_wait: Duration,
    /// Longest replica id (ServerlessLLM sends UUIDs, 36 characters).
    pub max_replica_id_bytes: usize,
    /// How often ConfirmModel looks again for a replica it has not heard
    /// of yet (LoadModelAsync and ConfirmModel may race).
    pub unknown_replica_poll: Duration,
    /// How often a copy waiting for a chunk checks for an abort or its
    /// deadline.
    pub chunk_wait_poll: Duration,
    /// A load that finds the pool full of chunks a just-finished copy is
    /// handing back retries this many times, this far apart.
    pub pool_busy_retries: u32,
    pub pool_busy_pause: Duration,
    /// How long a streamed load's full ring waits for a device to take a
    /// chunk before it fails and hands its chunks back.
    pub stream_drain_timeout: Duration,
    /// Bytes a streamed load's ring holds at most (at least two chunks, or
    /// what one checksum block spans, whichever is more).
    pub stream_ring_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_copies_per_request: 1 << 20,
            max_handles_per_device: 64,
            max_active_replicas: 256,
            // Four times the memory of eight 141 GiB GPUs: more than any one
            // host can take in at once, and a bound on what requests can queue.
            max_active_copy_bytes: 4 << 40,
            max_active_pieces: 8 << 20,
            unknown_replica_wait: Duration::from_millis(500),
            confirm_timeout: Duration::from_secs(1800),
            replica_retention: Duration::from_secs(600),
            abort_wait: Duration::from_secs(30),
            max_replica_id_bytes: 128,
            unknown_replica_poll: Duration::from_millis(20),
            chunk_wait_poll: Duration::from_millis(50),
            pool_busy_retries: 50,
            pool_busy_pause: Duration::from_millis(2),
            // Long enough for an inference engine to build its model and
            // allocate its memory between LoadModelAsync(CPU) and (GPU).
            stream_drain_timeout: Duration::from_secs(120),
            stream_ring_bytes: 1 << 30,
        }
    }
}
