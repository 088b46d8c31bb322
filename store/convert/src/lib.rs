//! Conversion into the store, offline: safetensors checkpoints and the
//! Hugging Face cache (`import`) written as a stored model (`save`) through a
//! staging directory published atomically (`staging`, `placement`), and the
//! synthetic checkpoints of the demo and the benchmarks (`synth`).
//!
//! It depends on the format (`sllm-format`) only.

pub use sllm_format as format;
pub use sllm_format::{durable, progress, units};

pub mod import;
pub mod placement;
pub mod save;
pub mod staging;
pub mod synth;
