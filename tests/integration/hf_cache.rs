//! `save --model` from a Hugging Face cache laid out as `huggingface_hub`
//! lays it out (blobs, snapshot symlinks, refs), with no network.

use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::common::*;

pub const MAIN: &str = "1111111111111111111111111111111111111111";
pub const OLD: &str = "2222222222222222222222222222222222222222";

/// Adds snapshot `commit` of `org/model` to the cache at `hub`, files as
/// symlinks into blobs/, and returns the tensors it holds.
pub fn add_snapshot(hub: &Path, commit: &str, seed: u64) -> Vec<Tensor> {
    let repo = hub.join("models--org--model");
    let blobs = repo.join("blobs");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    let tensors = vec![Tensor::random("w", Dtype::BF16, &[16, 16], seed)];
    let blob = blobs.join(format!("weights-{commit}"));
    write_safetensors(&blob, &tensors);
    std::os::unix::fs::symlink(
        format!("../../blobs/weights-{commit}"),
        snap.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        blobs.join(format!("config-{commit}")),
        format!("{{\"seed\": {seed}}}"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        format!("../../blobs/config-{commit}"),
        snap.join("config.json"),
    )
    .unwrap();
    tensors
}

pub fn cache_with_two_snapshots(root: &Path) -> (PathBuf, Vec<Tensor>, Vec<Tensor>) {
    let hub = root.join("hub");
    let main = add_snapshot(&hub, MAIN, 1);
    let old = add_snapshot(&hub, OLD, 2);
    let refs = hub.join("models--org--model/refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join("main"), MAIN).unwrap();
    (hub, main, old)
}

#[test]
fn resolves_main_a_hash_and_hf_home() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, main, old) = cache_with_two_snapshots(tmp.path());
    let storage = tmp.path().join("models");

    let out = run_ok(
        sllm_store(tmp.path())
            .args(["save", "--model", "org/model", "--storage-path"])
            .arg(&storage)
            .env("HF_HUB_CACHE", &hub)
            .env("HF_HUB_OFFLINE", "1"),
    );
    assert!(out.contains(&format!("snapshot {MAIN}")), "{out}");
    let model = storage.join("org/model");
    Stored::read(&model).assert_holds(&main);
    assert_eq!(
        std::fs::read_to_string(model.join("config.json")).unwrap(),
        "{\"seed\": 1}"
    );
    assert!(
        !model.join("config.json").is_symlink(),
        "files are copied, not linked into the cache"
    );
    let manifest = std::fs::read_to_string(model.join("sllm_manifest.json")).unwrap();
    assert!(
        manifest.contains(MAIN) && manifest.contains("\"revision\": \"main\""),
        "{manifest}"
    );

    // By full hash, through $HF_HOME (whose hub/ is the cache).
    run_ok(
        sllm_store(tmp.path())
            .args([
                "save",
                "--model",
                "org/model",
                "--force",
                "--revision",
                OLD,
                "--storage-path",
            ])
            .arg(&storage)
            .env("HF_HOME", tmp.path()),
    );
    Stored::read(&model).assert_holds(&old);
}

#[test]
fn default_cache_is_under_home() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, main, _) = cache_with_two_snapshots(&tmp.path().join(".cache/huggingface"));
    run_ok(sllm_store(tmp.path()).args(["save", "--model", "org/model"]));
    Stored::read(&tmp.path().join("models/org/model")).assert_holds(&main);
}

#[test]
fn missing_pieces_name_the_paths_and_the_fetch_command() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, _, _) = cache_with_two_snapshots(tmp.path());
    let storage = tmp.path().join("models");
    let save = |model: &str, revision: &str| {
        let mut cmd = sllm_store(tmp.path());
        cmd.args([
            "save",
            "--model",
            model,
            "--revision",
            revision,
            "--storage-path",
        ])
        .arg(&storage)
        .env("HF_HUB_CACHE", &hub);
        cmd
    };

    let err = run_err(&mut save("org/absent", "main"));
    assert!(
        err.contains(&hub.join("models--org--absent").display().to_string()),
        "{err}"
    );
    assert!(
        err.contains("hf download org/absent --revision main") && err.contains("$HF_HUB_CACHE"),
        "{err}"
    );

    let err = run_err(&mut save("org/model", "v1.0"));
    assert!(
        err.contains("refs/v1.0") && err.contains("refs present: main"),
        "{err}"
    );
    assert!(
        err.contains("hf download org/model --revision v1.0"),
        "{err}"
    );

    let unknown = "3333333333333333333333333333333333333333";
    let err = run_err(&mut save("org/model", unknown));
    assert!(err.contains(&format!("snapshots/{unknown}")), "{err}");

    // A blob lost after the snapshot was made (an interrupted download).
    std::fs::remove_file(hub.join(format!("models--org--model/blobs/weights-{MAIN}"))).unwrap();
    let err = run_err(&mut save("org/model", "main"));
    assert!(
        err.contains("model.safetensors is missing") && err.contains("download the model again"),
        "{err}"
    );
    assert_nothing_published(&storage, &storage.join("org/model"));
}

#[test]
fn revisions_as_refs_main_and_short_hashes_and_never_with_a_local_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (hub, _main, old) = cache_with_two_snapshots(tmp.path());
    let storage = tmp.path().join("models");
    let save = |revision: &str| {
        let mut cmd = sllm_store(tmp.path());
        cmd.args([
            "save",
            "--model",
            "org/model",
            "--force",
            "--revision",
            revision,
        ])
        .arg("--storage-path")
        .arg(&storage)
        .env("HF_HUB_CACHE", &hub);
        cmd
    };
    let (out, stdout, stderr) = run(&mut save("refs/main"));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains(&format!("snapshot {MAIN}")), "{stdout}");
    // The snapshot has a config but no tokenizer: vLLM could not start.
    assert!(
        stderr.contains("warning:") && stderr.contains("no tokenizer file"),
        "{stderr}"
    );
    let out = run_ok(&mut save(&OLD[..6]));
    assert!(out.contains(&format!("snapshot {OLD}")), "{out}");
    Stored::read(&storage.join("org/model")).assert_holds(&old);
    let err = run_err(&mut save("abcd"));
    assert!(
        err.contains("names no snapshot")
            && err.contains(&format!("snapshots present: {MAIN}, {OLD}")),
        "{err}"
    );
    let err = run_err(
        sllm_store(tmp.path())
            .args([
                "save",
                "--model",
                "org/x",
                "--revision",
                "main",
                "--local-model-path",
            ])
            .arg(tmp.path())
            .arg("--storage-path")
            .arg(&storage),
    );
    assert!(err.contains("pass one of them"), "{err}");
}
