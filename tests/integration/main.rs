//! Integration tests: the real `sllm-store` binary on real files made here.
//! One test binary (ripgrep's layout); each test works in its own temporary
//! directory, which is removed when it ends.

mod auth;
mod common;
mod connections;
mod daemon;
mod doctor;
mod hf_cache;
mod host_ownership;
mod kill;
mod python;
mod save_bad_input;
mod save_roundtrip;
mod soak;
mod streaming;
mod trust;
#[path = "../vllm/venv.rs"]
mod venv;
mod verify;
mod vllm;
