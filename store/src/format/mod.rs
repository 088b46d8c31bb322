//! The ServerlessLLM store format (shared/DESIGN.md section 2): a model
//! directory holding `tensor_index.json` and partitions `tensor.data_<i>`,
//! plus our `sllm_manifest.json` with checksums that reference readers ignore.

pub mod dtype;
pub mod index;
pub mod manifest;
pub mod model_id;
pub mod partitions;
pub mod verify;
pub mod writer;

pub use dtype::TorchDtype;
pub use index::{INDEX_FILE, TensorEntry, TensorIndex};
pub use manifest::{MANIFEST_FILE, Manifest};
pub use model_id::ModelId;
pub use partitions::Partitions;
pub use writer::{StoreWriter, WriterOptions};

/// True for a file name the store itself writes into a model directory, which
/// a source must not overwrite.
pub fn is_store_file_name(name: &str) -> bool {
    name == INDEX_FILE || name == MANIFEST_FILE || partitions::partition_number(name).is_some()
}
