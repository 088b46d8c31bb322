//! The ServerlessLLM store format (shared/DESIGN.md section 2): a model
//! directory holding `tensor_index.json` and partitions `tensor.data_<i>`,
//! plus our `sllm_manifest.json` with checksums that reference readers ignore.
//!
//! Its own crate so that the daemon (`sllm-store`) and the client
//! (`sllm-client`) share one reader of the format without depending on each
//! other. Also home to the small pieces both need: byte sizes (`units`),
//! durable writes (`durable`) and progress reporting (`progress`).

pub mod config;
pub mod dtype;
pub mod durable;
pub mod error_text;
pub mod index;
pub mod layout;
pub mod manifest;
pub mod model_id;
pub mod partitions;
pub mod progress;
pub mod small_files;
pub mod units;
pub mod verify;
pub mod writer;

pub use dtype::TorchDtype;
pub use index::{INDEX_FILE, TensorEntry, TensorIndex};
pub use layout::is_stored_model;
pub use manifest::{MANIFEST_FILE, Manifest};
pub use model_id::ModelId;
pub use partitions::Partitions;
pub use writer::{StoreWriter, WriterOptions};

/// True for a file name the store itself writes into a model directory, which
/// a source must not overwrite.
pub fn is_store_file_name(name: &str) -> bool {
    name == INDEX_FILE || name == MANIFEST_FILE || partitions::partition_number(name).is_some()
}

/// `text` cut to at most `max_bytes` (at a character boundary) with a note of
/// how much was left out: errors that repeat what a client sent stay short
/// whatever it sent.
pub fn elide(text: &str, max_bytes: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max_bytes {
        return text.into();
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} more bytes)", &text[..end], text.len() - end).into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn elide_cuts_at_a_character_boundary() {
        assert_eq!(super::elide("short", 10), "short");
        assert_eq!(super::elide("abcdef", 3), "abc... (3 more bytes)");
        // 'é' is two bytes: never cut in half.
        assert_eq!(super::elide("aéb", 2), "a... (3 more bytes)");
    }
}

#[cfg(test)]
mod randomized_tests {
    //! Random models through the writer, read back through the reader and
    //! checked by `verify`: whatever the dtypes, shapes (empty, scalar, odd),
    //! shared entries, partition limits and alignments, nothing is lost and
    //! nothing is reported.
    use proptest::prelude::*;

    use super::index::contiguous_stride;
    use super::verify::verify_model;
    use super::*;

    #[derive(Clone, Debug)]
    struct Spec {
        dtype: TorchDtype,
        shape: Vec<u64>,
        /// Also index this record under a second name (shared storage).
        alias: bool,
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (
            prop::sample::select(TorchDtype::ALL.to_vec()),
            prop::collection::vec(0u64..40, 0..4),
            any::<bool>(),
        )
            .prop_map(|(dtype, shape, alias)| Spec {
                dtype,
                shape,
                alias,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn written_models_read_back_and_verify(
            specs in prop::collection::vec(spec(), 0..24),
            limit_kib in 1u64..64,
            align_shift in 8u32..14,
            block_bytes in 1u64..20_000,
            seed in any::<u64>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let alignment = 1u64 << align_shift;
            let opts = WriterOptions {
                partition_limit_bytes: (limit_kib << 10).max(alignment),
                alignment_bytes: alignment,
                block_bytes,
            };
            let mut writer = StoreWriter::new(dir.path(), opts).unwrap();
            let mut expected = Vec::new();
            let mut state = seed | 1;
            for (i, s) in specs.iter().enumerate() {
                let numel: u64 = s.shape.iter().product();
                let len = numel * s.dtype.size_bytes();
                let bytes: Vec<u8> = (0..len).map(|_| {
                    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                    state as u8
                }).collect();
                let offset = writer.begin_record(len).unwrap();
                for piece in bytes.chunks(1000) {
                    writer.write(piece).unwrap();
                }
                writer.end_record().unwrap();
                prop_assert_eq!(offset % alignment, 0);
                let entry = TensorEntry {
                    offset,
                    size: len,
                    shape: s.shape.clone(),
                    stride: contiguous_stride(&s.shape),
                    dtype: s.dtype.name().into(),
                };
                if s.alias {
                    writer.add_entry(format!("alias.{i}"), entry.clone());
                    expected.push((format!("alias.{i}"), bytes.clone()));
                }
                writer.add_entry(format!("t.{i}"), entry);
                expected.push((format!("t.{i}"), bytes));
            }
            writer.finish(None).unwrap();

            let report = verify_model(dir.path(), &()).unwrap();
            prop_assert!(report.is_ok(), "{:?}", report.problems);
            let index = TensorIndex::read(dir.path()).unwrap();
            prop_assert_eq!(index.len(), expected.len());
            let parts = Partitions::discover(dir.path()).unwrap();
            for p in parts.iter() {
                prop_assert_eq!(p.size % alignment, 0, "partitions end aligned");
            }
            let mut files = Vec::new();
            for (name, bytes) in &expected {
                let e = index.get(name).unwrap();
                let mut read = vec![0u8; bytes.len()];
                parts.read_exact_at(&mut files, e.offset, &mut read).unwrap();
                prop_assert_eq!(&read, bytes);
                // A record never straddles partitions.
                if e.size > 0 {
                    let (first, _) = parts.locate(e.offset).unwrap();
                    let (last, _) = parts.locate(e.offset + e.size - 1).unwrap();
                    prop_assert_eq!(first, last);
                }
            }
        }
    }
}
