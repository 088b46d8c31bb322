//! Turning a request's copy list (`MemCopyChunk`s: global source offset,
//! size, destination offset, buffer) into pieces per pool chunk, so each
//! chunk's copies can start the moment it lands.
//!
//! Every copy is checked before anything moves: inside the model, inside its
//! destination buffer, naming a buffer that exists. Pieces that continue each
//! other in the chunk and in the same buffer are coalesced, so a mirrored
//! layout (destination offset = source offset) becomes one copy per chunk.

pub use crate::device::Piece;
use crate::io::ChunkSpan;

/// One copy as the client asked for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestedCopy {
    pub src_offset: u64,
    pub size: u64,
    pub dst_offset: u64,
    pub handle_idx: u64,
}

/// A device's copies, by chunk of the model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyPlan {
    /// `per_chunk[i]`: pieces sourced from chunk `i`, in chunk order.
    pub per_chunk: Vec<Vec<Piece>>,
    pub bytes: u64,
}

impl CopyPlan {
    /// The first chunk a piece comes from (past the last chunk when none).
    pub fn first_chunk(&self) -> usize {
        self.per_chunk
            .iter()
            .position(|p| !p.is_empty())
            .unwrap_or(self.per_chunk.len())
    }

    /// Number of pieces after coalescing.
    pub fn pieces(&self) -> usize {
        self.per_chunk.iter().map(Vec::len).sum()
    }
}

/// Bytes one device's copies may add up to, in multiples of the model's
/// size: a planner copies each byte once, twice at most when it duplicates
/// tensors that share storage. The cap bounds the work and the memory one
/// small request can cause.
pub const MAX_COPY_AMPLIFICATION: u64 = 2;

/// A copy that cannot be done.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "the copies for one device add up to more than {limit} bytes ({MAX_COPY_AMPLIFICATION}x \
         the model); copy each tensor once"
    )]
    TooMuch { limit: u64 },
    #[error(
        "copy {index}: source bytes [{src_offset}, +{size}) are outside the model ({model_size} \
         bytes); plan copies from the model's tensor_index.json"
    )]
    OutsideModel {
        index: usize,
        src_offset: u64,
        size: u64,
        model_size: u64,
    },
    #[error(
        "copy {index}: handle_idx {handle_idx} but only {handles} handle(s) were sent for this device"
    )]
    NoSuchHandle {
        index: usize,
        handle_idx: u64,
        handles: usize,
    },
    #[error(
        "copy {index}: destination bytes [{dst_offset}, +{size}) are outside buffer {handle_idx} \
         ({buffer_size} bytes)"
    )]
    OutsideBuffer {
        index: usize,
        dst_offset: u64,
        size: u64,
        handle_idx: u64,
        buffer_size: u64,
    },
}

/// Plans `copies` against the model's chunks and the device's buffers.
pub fn plan_copies(
    spans: &[ChunkSpan],
    model_size: u64,
    copies: &[RequestedCopy],
    buffer_sizes: &[u64],
) -> Result<CopyPlan, PlanError> {
    let mut plan = CopyPlan {
        per_chunk: vec![Vec::new(); spans.len()],
        bytes: 0,
    };
    let limit = model_size.saturating_mul(MAX_COPY_AMPLIFICATION);
    // Checked before anything is planned: a request over the cap costs
    // one pass over its list, nothing more.
    let total = copies
        .iter()
        .try_fold(0u64, |sum, c| sum.checked_add(c.size))
        .unwrap_or(u64::MAX);
    if total > limit {
        return Err(PlanError::TooMuch { limit });
    }
    for (index, c) in copies.iter().enumerate() {
        let src_end = c
            .src_offset
            .checked_add(c.size)
            .filter(|&e| e <= model_size);
        let Some(src_end) = src_end else {
            return Err(PlanError::OutsideModel {
                index,
                src_offset: c.src_offset,
                size: c.size,
                model_size,
            });
        };
        let Some(&buffer_size) = usize::try_from(c.handle_idx)
            .ok()
            .and_then(|h| buffer_sizes.get(h))
        else {
            return Err(PlanError::NoSuchHandle {
                index,
                handle_idx: c.handle_idx,
                handles: buffer_sizes.len(),
            });
        };
        if c.dst_offset
            .checked_add(c.size)
            .is_none_or(|e| e > buffer_size)
        {
            return Err(PlanError::OutsideBuffer {
                index,
                dst_offset: c.dst_offset,
                size: c.size,
                handle_idx: c.handle_idx,
                buffer_size,
            });
        }
        let mut at = c.src_offset;
        let mut i = spans.partition_point(|s| s.global_end() <= at);
        while at < src_end {
            let span = &spans[i];
            let end = src_end.min(span.global_end());
            plan.per_chunk[i].push(Piece {
                chunk_offset: (at - span.global_start) as usize,
                len: (end - at) as usize,
                handle_idx: c.handle_idx as usize,
                dst_offset: c.dst_offset + (at - c.src_offset),
            });
            at = end;
            i += 1;
        }
        plan.bytes += c.size;
    }
    for pieces in &mut plan.per_chunk {
        coalesce(pieces);
    }
    Ok(plan)
}

/// Sorts a chunk's pieces and merges those that continue each other.
fn coalesce(pieces: &mut Vec<Piece>) {
    pieces.sort_by_key(|p| (p.chunk_offset, p.handle_idx, p.dst_offset));
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for p in pieces.drain(..) {
        match out.last_mut() {
            Some(last)
                if last.handle_idx == p.handle_idx
                    && last.chunk_offset + last.len == p.chunk_offset
                    && last.dst_offset + last.len as u64 == p.dst_offset =>
            {
                last.len += p.len;
            }
            _ => out.push(p),
        }
    }
    *pieces = out;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::chunk_spans;
    use proptest::prelude::*;

    fn copy(src: u64, size: u64, dst: u64, h: u64) -> RequestedCopy {
        RequestedCopy {
            src_offset: src,
            size,
            dst_offset: dst,
            handle_idx: h,
        }
    }

    #[test]
    fn a_mirrored_model_is_one_copy_per_chunk() {
        let spans = chunk_spans([10_000, 5_000], 4096);
        let copies = [
            copy(0, 100, 0, 0),
            copy(100, 9000, 100, 0),
            copy(9100, 5900, 9100, 0),
        ];
        let plan = plan_copies(&spans, 15_000, &copies, &[15_000]).unwrap();
        assert_eq!(plan.pieces(), spans.len());
        assert_eq!(plan.bytes, 15_000);
        for (span, pieces) in spans.iter().zip(&plan.per_chunk) {
            assert_eq!(
                pieces,
                &[Piece {
                    chunk_offset: 0,
                    len: span.len,
                    handle_idx: 0,
                    dst_offset: span.global_start
                }]
            );
        }
    }

    #[test]
    fn rejects_what_does_not_fit() {
        let spans = chunk_spans([8192], 4096);
        let bad = [
            (copy(8000, 200, 0, 0), "outside the model"),
            (copy(u64::MAX, 2, 0, 0), "outside the model"),
            (copy(0, 10, 0, 3), "handle_idx 3"),
            (copy(0, 10, 95, 0), "outside buffer 0"),
            (copy(0, 10, u64::MAX, 0), "outside buffer 0"),
        ];
        for (c, why) in bad {
            let err = plan_copies(&spans, 8192, &[c], &[100])
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{why}: {err}");
        }
        assert_eq!(plan_copies(&spans, 8192, &[], &[100]).unwrap().pieces(), 0);
    }

    #[test]
    fn refuses_more_than_twice_the_model_before_planning_anything() {
        let spans = chunk_spans([8192], 4096);
        // Twice the model is fine (tensors sharing storage, copied twice).
        let twice = [copy(0, 8192, 0, 0), copy(0, 8192, 8192, 0)];
        assert_eq!(
            plan_copies(&spans, 8192, &twice, &[16384]).unwrap().bytes,
            16384
        );
        // One byte more is not.
        let over = [copy(0, 8192, 0, 0), copy(0, 8192, 0, 0), copy(0, 1, 0, 0)];
        let err = plan_copies(&spans, 8192, &over, &[16384]).unwrap_err();
        assert_eq!(err, PlanError::TooMuch { limit: 16384 });
        assert!(err.to_string().contains("copy each tensor once"), "{err}");
        // A million copies of the whole model: refused without a piece
        // being made (the cap is checked first).
        let many = vec![copy(0, 8192, 0, 0); 1 << 20];
        assert!(matches!(
            plan_copies(&spans, 8192, &many, &[8192]),
            Err(PlanError::TooMuch { .. })
        ));
        // Sizes that overflow when summed.
        let huge = [copy(0, u64::MAX, 0, 0), copy(0, 2, 0, 0)];
        assert!(matches!(
            plan_copies(&spans, 8192, &huge, &[8192]),
            Err(PlanError::TooMuch { .. })
        ));
    }

    proptest! {
        /// Every requested byte appears exactly once, at the right place.
        #[test]
        fn pieces_reproduce_the_requested_copies(
            sizes in prop::collection::vec(1u64..20_000, 1..4),
            chunk_pages in 1usize..5,
            raw in prop::collection::vec((0u64..1_000_000, 0u64..6000, 0u64..1_000_000, 0u64..2), 0..20),
        ) {
            let spans = chunk_spans(sizes.clone(), chunk_pages * 4096);
            let model: u64 = sizes.iter().sum();
            let buffers = [model, model / 2 + 1];
            let copies: Vec<RequestedCopy> = raw
                .into_iter()
                .map(|(s, n, d, h)| {
                    let src = s % model;
                    let size = n.min(model - src);
                    let cap = buffers[h as usize];
                    let size = size.min(cap);
                    copy(src, size, d % (cap - size + 1), h)
                })
                .collect();
            // Stay within the amplification cap (tested on its own above).
            let mut total = 0;
            let copies: Vec<RequestedCopy> = copies
                .into_iter()
                .take_while(|c| {
                    total += c.size;
                    total <= model * MAX_COPY_AMPLIFICATION
                })
                .collect();
            let plan = plan_copies(&spans, model, &copies, &buffers).unwrap();
            // Expand both sides to (buffer, dst byte, src byte) and compare
            // as sorted lists: destinations may repeat.
            let mut want = Vec::new();
            for c in &copies {
                for k in 0..c.size {
                    want.push((c.handle_idx as usize, c.dst_offset + k, c.src_offset + k));
                }
            }
            let mut got = Vec::new();
            for (span, pieces) in spans.iter().zip(&plan.per_chunk) {
                for p in pieces {
                    prop_assert!(p.chunk_offset + p.len <= span.len);
                    for k in 0..p.len {
                        got.push((p.handle_idx, p.dst_offset + k as u64, span.global_start + (p.chunk_offset + k) as u64));
                    }
                }
            }
            want.sort_unstable();
            got.sort_unstable();
            prop_assert_eq!(got, want);
        }
    }
}
