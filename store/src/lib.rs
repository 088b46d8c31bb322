//! The ServerlessLLM-compatible model store: the on-disk format, the offline
//! converter from safetensors and the Hugging Face cache, and verification.
//!
//! The `sllm-store` binary is glue over this library; see
//! `docs/ARCHITECTURE.md` for the map of modules and what each may touch.

pub mod config;
pub mod durable;
pub mod format;
pub mod import;
pub mod progress;
pub mod save;
pub mod staging;
pub mod synth;
pub mod units;
