//! Copy planning: from a model's tensor index and a device map to the
//! buffers a client allocates and the copies it asks the daemon for.
//!
//! - [`Layout::Mirrored`] (default): each device gets one buffer laid out
//!   like the file, from its first tensor's offset to its last tensor's end;
//!   destination = source - base. Neighbouring records are merged into one
//!   copy across the writer's padding, so a model on one device is a single
//!   copy, and every tensor keeps the writer's alignment (4 KiB for models
//!   written by `sllm-store save`).
//! - [`Layout::Packed`]: ServerlessLLM's layout: each device's tensors back
//!   to back in index order, each start aligned to 256 bytes.
//!
//! Tensors that share storage (same offset) are copied once and placed once.

use std::collections::HashMap;

use sllm_format::TensorIndex;
use sllm_proto::MemCopyChunk;

/// Records closer than this are merged into one copy (the gap is copied).
pub const MERGE_GAP_BYTES: u64 = 64 << 10;
/// Alignment of each tensor in the packed layout (`cudaMalloc`'s).
pub const PACKED_ALIGN_BYTES: u64 = 256;

/// How tensors are placed in device buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    #[default]
    Mirrored,
    Packed,
}

/// Tensor name prefix -> device UUID; the longest matching prefix wins and
/// `""` matches every tensor (ServerlessLLM's `{"": 0}`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceMap(pub Vec<(String, String)>);

impl DeviceMap {
    /// Every tensor on one device.
    pub fn single(uuid: &str) -> Self {
        Self(vec![(String::new(), uuid.to_owned())])
    }

    fn device_of(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .filter(|(prefix, _)| name.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, uuid)| uuid.as_str())
    }
}

/// Where a tensor ends up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub device: String,
    /// Byte offset in that device's buffer.
    pub offset: u64,
}

/// One device's buffer and the copies that fill it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceBuffer {
    pub uuid: String,
    pub size_bytes: u64,
    pub copies: Vec<MemCopyChunk>,
}

/// The whole plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadPlan {
    pub buffers: Vec<DeviceBuffer>,
    pub tensors: HashMap<String, Placement>,
}

impl LoadPlan {
    /// Copies per device UUID, as `StoreClient::load_to_devices` takes them.
    pub fn copies_by_device(&self) -> HashMap<String, Vec<MemCopyChunk>> {
        self.buffers
            .iter()
            .filter(|b| !b.copies.is_empty())
            .map(|b| (b.uuid.clone(), b.copies.clone()))
            .collect()
    }

    /// Bytes the daemon will copy.
    pub fn copy_bytes(&self) -> u64 {
        self.buffers
            .iter()
            .flat_map(|b| &b.copies)
            .map(|c| c.size)
            .sum()
    }
}

/// A plan cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "tensor {0:?} matches no prefix of the device map; add a prefix for it (\"\" matches all)"
    )]
    Unmapped(String),
}

/// Plans the load of `index` onto the devices of `map`.
pub fn plan(index: &TensorIndex, map: &DeviceMap, layout: Layout) -> Result<LoadPlan, PlanError> {
    // Group tensors by device, keeping index order.
    let mut order: Vec<String> = Vec::new();
    let mut by_device: HashMap<String, Vec<(&str, u64, u64)>> = HashMap::new();
    for (name, e) in index.iter() {
        let device = map
            .device_of(name)
            .ok_or_else(|| PlanError::Unmapped(name.to_owned()))?;
        if !by_device.contains_key(device) {
            order.push(device.to_owned());
        }
        by_device
            .entry(device.to_owned())
            .or_default()
            .push((name, e.offset, e.size));
    }
    let mut out = LoadPlan::default();
    for device in order {
        let tensors = &by_device[&device];
        let buffer = match layout {
            Layout::Mirrored => mirrored(&device, tensors, &mut out.tensors),
            Layout::Packed => packed(&device, tensors, &mut out.tensors),
        };
        out.buffers.push(buffer);
    }
    Ok(out)
}

fn mirrored(
    device: &str,
    tensors: &[(&str, u64, u64)],
    placed: &mut HashMap<String, Placement>,
) -> DeviceBuffer {
    let mut records: Vec<(u64, u64)> = tensors
        .iter()
        .filter(|t| t.2 > 0)
        .map(|t| (t.1, t.1 + t.2))
        .collect();
    records.sort_unstable();
    let base = records.first().map_or(0, |r| r.0);
    let end = records.iter().map(|r| r.1).max().unwrap_or(base);
    let mut copies: Vec<MemCopyChunk> = Vec::new();
    let mut current: Option<(u64, u64)> = None;
    for (start, stop) in records {
        current = match current {
            Some((s, e)) if start <= e + MERGE_GAP_BYTES => Some((s, e.max(stop))),
            Some((s, e)) => {
                copies.push(copy(s, e - s, s - base));
                Some((start, stop))
            }
            None => Some((start, stop)),
        };
    }
    if let Some((s, e)) = current {
        copies.push(copy(s, e - s, s - base));
    }
    for &(name, offset, size) in tensors {
        let offset = if size > 0 { offset - base } else { 0 };
        placed.insert(
            name.to_owned(),
            Placement {
                device: device.to_owned(),
                offset,
            },
        );
    }
    DeviceBuffer {
        uuid: device.to_owned(),
        size_bytes: end - base,
        copies,
    }
}

fn packed(
    device: &str,
    tensors: &[(&str, u64, u64)],
    placed: &mut HashMap<String, Placement>,
) -> DeviceBuffer {
    let mut cursor = 0u64;
    let mut at_offset: HashMap<u64, (u64, u64)> = HashMap::new(); // src offset -> (dst, size)
    let mut copies = Vec::new();
    for &(name, offset, size) in tensors {
        let dst = match at_offset.get(&offset) {
            Some(&(dst, placed_size)) if size <= placed_size => dst,
            _ => {
                let dst = cursor.next_multiple_of(PACKED_ALIGN_BYTES);
                if size > 0 {
                    copies.push(copy(offset, size, dst));
                }
                cursor = dst + size;
                at_offset.insert(offset, (dst, size));
                dst
            }
        };
        placed.insert(
            name.to_owned(),
            Placement {
                device: device.to_owned(),
                offset: dst,
            },
        );
    }
    DeviceBuffer {
        uuid: device.to_owned(),
        size_bytes: cursor,
        copies,
    }
}

fn copy(src_offset: u64, size: u64, dst_offset: u64) -> MemCopyChunk {
    MemCopyChunk {
        src_offset,
        size,
        dst_offset,
        handle_idx: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn index(entries: &[(&str, u64, u64)]) -> TensorIndex {
        let json: Vec<String> = entries
            .iter()
            .map(|(n, o, s)| format!("\"{n}\": [{o}, {s}, [{s}], [1], \"torch.uint8\"]"))
            .collect();
        TensorIndex::from_json(format!("{{{}}}", json.join(", ")).as_bytes()).unwrap()
    }

    #[test]
    fn mirrored_single_device_is_one_copy() {
        let idx = index(&[
            ("a", 0, 100),
            ("b", 4096, 10),
            ("tied", 0, 100),
            ("empty", 8192, 0),
            ("c", 8192, 5000),
        ]);
        let p = plan(&idx, &DeviceMap::single("d0"), Layout::Mirrored).unwrap();
        assert_eq!(p.buffers.len(), 1);
        assert_eq!(p.buffers[0].size_bytes, 13192);
        assert_eq!(p.buffers[0].copies, [copy(0, 13192, 0)]);
        assert_eq!(p.tensors["b"].offset, 4096);
        assert_eq!(p.tensors["tied"].offset, 0);
    }

    #[test]
    fn packed_places_back_to_back_and_shares_storage() {
        let idx = index(&[
            ("a", 0, 100),
            ("tied", 0, 100),
            ("b", 4096, 10),
            ("c", 8192, 300),
        ]);
        let p = plan(&idx, &DeviceMap::single("d0"), Layout::Packed).unwrap();
        assert_eq!(
            p.buffers[0].copies,
            [copy(0, 100, 0), copy(4096, 10, 256), copy(8192, 300, 512)]
        );
        assert_eq!(p.buffers[0].size_bytes, 812);
        assert_eq!(p.tensors["tied"].offset, 0);
    }

    #[test]
    fn longest_prefix_picks_the_device() {
        let idx = index(&[
            ("layers.0.w", 0, 10),
            ("layers.1.w", 4096, 10),
            ("head", 8192, 10),
        ]);
        let map = DeviceMap(vec![
            ("".into(), "d0".into()),
            ("layers.1".into(), "d1".into()),
        ]);
        let p = plan(&idx, &map, Layout::Mirrored).unwrap();
        assert_eq!(p.tensors["layers.1.w"].device, "d1");
        assert_eq!(p.tensors["head"].device, "d0");
        let unmapped = plan(
            &idx,
            &DeviceMap(vec![("layers".into(), "d0".into())]),
            Layout::Mirrored,
        );
        assert_eq!(unmapped.unwrap_err(), PlanError::Unmapped("head".into()));
    }

    proptest! {
        /// Whatever the layout, every tensor's bytes land at its placement.
        #[test]
        fn every_tensor_lands_where_it_is_placed(
            sizes in prop::collection::vec(0u64..9000, 1..12),
            devices in prop::collection::vec(0usize..3, 12),
            packed_layout in any::<bool>(),
        ) {
            let mut entries = Vec::new();
            let mut offset = 0;
            for (i, s) in sizes.iter().enumerate() {
                entries.push((format!("t{i}"), offset, *s));
                offset = (offset + s).next_multiple_of(4096);
            }
            let refs: Vec<(&str, u64, u64)> = entries.iter().map(|(n, o, s)| (n.as_str(), *o, *s)).collect();
            let idx = index(&refs);
            let map = DeviceMap(entries.iter().enumerate().map(|(i, (n, ..))| (n.clone(), format!("d{}", devices[i]))).collect());
            let layout = if packed_layout { Layout::Packed } else { Layout::Mirrored };
            let p = plan(&idx, &map, layout).unwrap();
            // Simulate: file bytes are their own offsets (mod 251).
            let mut memory: HashMap<String, Vec<Option<u8>>> = HashMap::new();
            for b in &p.buffers {
                let mut m = vec![None; b.size_bytes as usize];
                for c in &b.copies {
                    for k in 0..c.size {
                        m[(c.dst_offset + k) as usize] = Some(((c.src_offset + k) % 251) as u8);
                    }
                }
                memory.insert(b.uuid.clone(), m);
            }
            for (name, o, s) in &entries {
                let place = &p.tensors[name];
                let m = &memory[&place.device];
                for k in 0..*s {
                    prop_assert_eq!(m[(place.offset + k) as usize], Some(((o + k) % 251) as u8));
                }
            }
        }
    }
}
