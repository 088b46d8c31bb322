//! A replica: one client's copy of a model into its device buffers. One
//! thread per device walks the model's chunks in order, waits for each to
//! land, and starts that chunk's copies; the replica is done when every
//! device has synchronized.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::watch;

use super::copy_plan::CopyPlan;
use super::host_copy::HostCopy;
use crate::device::{DeviceInfo, DeviceTarget};

/// Where a replica stands.
#[derive(Clone, Debug, PartialEq)]
pub enum ReplicaStatus {
    Copying,
    Done { bytes: u64, seconds: f64 },
    Failed(String),
}

/// One device's share of a replica.
pub struct DeviceCopy {
    pub device: DeviceInfo,
    pub target: Box<dyn DeviceTarget>,
    pub plan: CopyPlan,
}

/// A replica in progress or finished.
pub struct Replica {
    pub uuid: String,
    status: watch::Receiver<ReplicaStatus>,
    pub started: Instant,
}

impl Replica {
    /// Starts copying from `host` to every device of `copies`.
    pub fn start(
        uuid: String,
        host: Arc<HostCopy>,
        copies: Vec<DeviceCopy>,
        on_done: impl Fn(&ReplicaStatus) + Send + Sync + 'static,
    ) -> Arc<Self> {
        let (tx, rx) = watch::channel(ReplicaStatus::Copying);
        let started = Instant::now();
        let replica = Arc::new(Self {
            uuid,
            status: rx,
            started,
        });
        let shared = Arc::new(Shared {
            tx,
            remaining: AtomicUsize::new(copies.len()),
            bytes: copies.iter().map(|c| c.plan.bytes).sum(),
            on_done: Box::new(on_done),
            started,
        });
        if copies.is_empty() {
            shared.finish(None);
        }
        for copy in copies {
            let (host, shared) = (Arc::clone(&host), Arc::clone(&shared));
            std::thread::Builder::new()
                .name("sllm-copy".into())
                .spawn(move || {
                    let device = copy.device.uuid.clone();
                    let result = run_device_copy(&host, copy);
                    drop(host);
                    shared.device_done(result.err().map(|e| format!("device {device}: {e}")));
                })
                .expect("spawning a copy thread");
        }
        replica
    }

    /// The current status.
    pub fn status(&self) -> ReplicaStatus {
        self.status.borrow().clone()
    }

    /// Waits until the replica is no longer copying.
    pub async fn finished(&self) -> ReplicaStatus {
        let mut rx = self.status.clone();
        match rx.wait_for(|s| *s != ReplicaStatus::Copying).await {
            Ok(status) => status.clone(),
            Err(_) => ReplicaStatus::Failed("the copy threads ended without a result".into()),
        }
    }
}

struct Shared {
    tx: watch::Sender<ReplicaStatus>,
    remaining: AtomicUsize,
    bytes: u64,
    on_done: Box<dyn Fn(&ReplicaStatus) + Send + Sync>,
    started: Instant,
}

impl Shared {
    fn device_done(&self, error: Option<String>) {
        if let Some(e) = error {
            // The first failure decides; later devices only count down.
            self.tx.send_if_modified(|s| {
                let first = *s == ReplicaStatus::Copying;
                if first {
                    *s = ReplicaStatus::Failed(e);
                }
                first
            });
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish(None);
        }
    }

    fn finish(&self, _: Option<()>) {
        self.tx.send_if_modified(|s| {
            if *s == ReplicaStatus::Copying {
                *s = ReplicaStatus::Done {
                    bytes: self.bytes,
                    seconds: self.started.elapsed().as_secs_f64(),
                };
                true
            } else {
                false
            }
        });
        (self.on_done)(&self.tx.borrow());
    }
}

fn run_device_copy(host: &HostCopy, mut copy: DeviceCopy) -> Result<(), String> {
    for (i, pieces) in copy.plan.per_chunk.iter().enumerate() {
        if pieces.is_empty() {
            continue;
        }
        let chunk = host.wait_chunk(i).map_err(|e| e.to_string())?;
        for p in pieces {
            copy.target
                .copy(&chunk, p.chunk_offset, p.len, p.handle_idx, p.dst_offset)
                .map_err(|e| e.to_string())?;
        }
    }
    copy.target.synchronize().map_err(|e| e.to_string())
}
