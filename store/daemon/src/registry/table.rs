//! The model table behind the registry's one mutex: per model, the version
//! of its files that was read, its host copy and its replicas.

use std::collections::HashMap;
use std::sync::Arc;

use sllm_format::partitions::Partitions;

use super::RegistryError;
use super::host_copy::HostCopy;
use super::on_disk::{BlockSums, ModelStamp};
use super::replica::Replica;
use crate::io::ChunkSpan;

/// A registered model's layout, as read from one version of its files.
pub(super) struct ModelInfo {
    /// When the reading began ([`Table::reads`]): of two readings of one
    /// model racing each other, the one begun later is at least as fresh.
    pub(super) read_ticket: u64,
    pub(super) stamp: ModelStamp,
    pub(super) partitions: Partitions,
    pub(super) spans: Arc<[ChunkSpan]>,
    pub(super) size: u64,
    pub(super) checksums: Option<Arc<BlockSums>>,
}

pub(super) struct ModelEntry {
    pub(super) info: Arc<ModelInfo>,
    pub(super) host: Option<Arc<HostCopy>>,
    pub(super) last_used: u64,
    pub(super) replicas: HashMap<String, Arc<Replica>>,
    /// Why the last load failed, until the next one starts.
    pub(super) last_error: Option<String>,
    /// Copies of the model started in the pool (reads from disk), while its
    /// files stayed the same.
    pub(super) host_loads: u64,
}

impl ModelEntry {
    /// Refuses a replica id already in use for this model.
    pub(super) fn ensure_replica_free(&self, uuid: &str, model: &str) -> Result<(), RegistryError> {
        if self.replicas.contains_key(uuid) {
            return Err(RegistryError::ReplicaExists {
                uuid: uuid.into(),
                model: model.into(),
            });
        }
        Ok(())
    }

    /// Forgets the host copy; a load still in progress that no replica
    /// reads from is cancelled, so its chunks come back promptly.
    pub(super) fn drop_host_copy(&mut self) {
        if let Some(host) = self.host.take()
            && !host.is_complete()
            && !self.busy()
        {
            host.cancel();
        }
    }

    pub(super) fn busy(&self) -> bool {
        self.replicas.values().any(|r| r.status().is_copying())
    }

    /// No replica copying from it, and either resident, fully loaded (or
    /// failed) and held by nothing but the registry (evicting it frees its
    /// chunks now), or a stream still reading that no device reads yet
    /// (evicted, it stops and frees them a moment later).
    pub(super) fn evictable(&self) -> bool {
        self.host
            .as_ref()
            .is_some_and(|h| (h.is_complete() && Arc::strong_count(h) == 1) || h.is_unread_stream())
            && !self.busy()
    }
}

#[derive(Default)]
pub(super) struct Table {
    pub(super) models: HashMap<String, ModelEntry>,
    pub(super) clock: u64,
    /// Readings of models begun so far.
    pub(super) reads: u64,
    pub(super) shutting_down: bool,
}

impl Table {
    pub(super) fn entry(&self, model: &str) -> Result<&ModelEntry, RegistryError> {
        self.models
            .get(model)
            .ok_or_else(|| RegistryError::NotRegistered {
                model: model.into(),
            })
    }

    pub(super) fn entry_mut(&mut self, model: &str) -> Result<&mut ModelEntry, RegistryError> {
        self.models
            .get_mut(model)
            .ok_or_else(|| RegistryError::NotRegistered {
                model: model.into(),
            })
    }
}
