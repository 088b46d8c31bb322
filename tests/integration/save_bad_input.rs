//! `save` on bad input: a clear error naming the problem, a non-zero exit,
//! and nothing at the final path or in staging.

use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::common::*;

struct Case {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    src: PathBuf,
    storage: PathBuf,
}

impl Case {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        Self {
            home: tmp.path().to_owned(),
            storage: tmp.path().join("models"),
            src,
            _tmp: tmp,
        }
    }

    /// Saves `src` as `org/bad`, expects failure, checks nothing was left.
    fn save_cmd(&self) -> std::process::Command {
        let mut cmd = sllm_store(&self.home);
        cmd.args(["save", "--model", "org/bad", "--local-model-path"])
            .arg(&self.src)
            .arg("--storage-path")
            .arg(&self.storage);
        cmd
    }

    /// Expects the save to fail within 20 s (a hang is a failure too).
    fn fails_with(&self, needles: &[&str]) -> String {
        let (status, stdout, stderr) = run_bounded(&mut self.save_cmd(), 20);
        assert!(!status.success(), "unexpectedly succeeded: {stdout}");
        let err = format!("{stdout}{stderr}");
        for needle in needles {
            assert!(err.contains(needle), "expected {needle:?} in: {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
        assert_nothing_published(&self.storage, &self.storage.join("org/bad"));
        err
    }

    fn file(&self, name: &str) -> PathBuf {
        self.src.join(name)
    }
}

fn one_tensor(path: &Path) {
    write_safetensors(path, &[Tensor::random("w", Dtype::F32, &[64], 1)]);
}

#[test]
fn truncated_file() {
    let c = Case::new();
    one_tensor(&c.file("model.safetensors"));
    let bytes = std::fs::read(c.file("model.safetensors")).unwrap();
    std::fs::write(c.file("model.safetensors"), &bytes[..bytes.len() - 10]).unwrap();
    c.fails_with(&["model.safetensors", "truncated", "holds 246"]);
}

#[test]
fn file_shorter_than_its_header() {
    let c = Case::new();
    std::fs::write(
        c.file("model.safetensors"),
        [200, 0, 0, 0, 0, 0, 0, 0, b'{'],
    )
    .unwrap();
    c.fails_with(&["model.safetensors", "header claims 200 bytes", "truncated"]);
    std::fs::write(c.file("model.safetensors"), [1, 2, 3]).unwrap();
    c.fails_with(&["shorter than the 8-byte header length"]);
}

#[test]
fn header_offsets_out_of_range() {
    let c = Case::new();
    let header = r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"v":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}}"#;
    write_raw_safetensors(&c.file("model.safetensors"), header, &[0u8; 20]);
    c.fails_with(&[
        "model.safetensors",
        "describes 32 bytes of tensor data but the file holds 20",
    ]);
}

#[test]
fn overlapping_tensors() {
    let c = Case::new();
    let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    write_raw_safetensors(&c.file("model.safetensors"), header, &[0u8; 12]);
    c.fails_with(&[
        "model.safetensors",
        "not a valid safetensors file",
        "invalid offset",
    ]);
}

#[test]
fn shape_that_disagrees_with_offsets() {
    let c = Case::new();
    let header = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
    write_raw_safetensors(&c.file("model.safetensors"), header, &[0u8; 8]);
    c.fails_with(&["model.safetensors", "invalid shape, data type, or offset"]);
}

#[test]
fn not_json_header() {
    let c = Case::new();
    write_raw_safetensors(&c.file("model.safetensors"), "PK\u{3}\u{4} zip?", &[0u8; 8]);
    c.fails_with(&["model.safetensors", "bad header"]);
}

#[test]
fn tensor_name_in_two_shards() {
    let c = Case::new();
    one_tensor(&c.file("a.safetensors"));
    one_tensor(&c.file("b.safetensors"));
    c.fails_with(&["\"w\" appears in both", "a.safetensors", "b.safetensors"]);
}

#[test]
fn tensor_name_in_two_indexed_shards() {
    let c = Case::new();
    write_sharded(
        &c.src,
        &[
            vec![
                Tensor::random("w", Dtype::F16, &[4], 1),
                Tensor::random("a", Dtype::F16, &[4], 3),
            ],
            vec![
                Tensor::random("w", Dtype::F16, &[4], 2),
                Tensor::random("b", Dtype::F16, &[4], 4),
            ],
        ],
    );
    // The index maps "w" to one shard (a JSON object holds a name once), but
    // both listed shards carry it.
    c.fails_with(&[
        "\"w\" appears in both",
        "model-00001-of-00002",
        "model-00002-of-00002",
    ]);
}

#[test]
fn missing_shard() {
    let c = Case::new();
    write_sharded(
        &c.src,
        &[
            vec![Tensor::random("a", Dtype::F16, &[4], 1)],
            vec![Tensor::random("b", Dtype::F16, &[4], 2)],
            vec![Tensor::random("c", Dtype::F16, &[4], 3)],
        ],
    );
    std::fs::remove_file(c.file("model-00002-of-00003.safetensors")).unwrap();
    c.fails_with(&[
        "lists shards that are missing",
        "model-00002-of-00003.safetensors",
    ]);
}

#[test]
fn index_that_points_outside_the_directory() {
    let c = Case::new();
    one_tensor(&c.file("model.safetensors"));
    std::fs::write(
        c.file("model.safetensors.index.json"),
        r#"{"weight_map": {"w": "../model.safetensors"}}"#,
    )
    .unwrap();
    c.fails_with(&["not a valid shard index", "../model.safetensors"]);
}

#[test]
fn index_naming_a_tensor_the_shard_lacks() {
    let c = Case::new();
    one_tensor(&c.file("model.safetensors"));
    std::fs::write(
        c.file("model.safetensors.index.json"),
        r#"{"weight_map": {"w": "model.safetensors", "ghost": "model.safetensors"}}"#,
    )
    .unwrap();
    c.fails_with(&["\"ghost\"", "does not hold it"]);
}

#[test]
fn unsupported_dtype() {
    let c = Case::new();
    write_safetensors(
        &c.file("model.safetensors"),
        &[Tensor::random("u", Dtype::U16, &[4], 1)],
    );
    c.fails_with(&["\"u\"", "U16", "supported: F16, BF16"]);
}

#[test]
fn no_safetensors_at_all() {
    let c = Case::new();
    std::fs::write(c.file("pytorch_model.bin"), "pickle").unwrap();
    c.fails_with(&["no *.safetensors files", "found pytorch_model.bin"]);
}

#[test]
fn missing_source_directory() {
    let c = Case::new();
    std::fs::remove_dir(&c.src).unwrap();
    c.fails_with(&["does not exist", "--local-model-path"]);
}

#[test]
fn broken_link_to_a_weight_file() {
    let c = Case::new();
    std::os::unix::fs::symlink("../blobs/gone", c.file("model.safetensors")).unwrap();
    c.fails_with(&[
        "model.safetensors is missing",
        "../blobs/gone",
        "download the model again",
    ]);
}

#[test]
fn fifo_named_like_weights_fails_instead_of_hanging() {
    let c = Case::new();
    mkfifo(&c.file("model.safetensors"));
    c.fails_with(&["model.safetensors is a FIFO", "not a regular file"]);
}

#[test]
fn fifo_as_shard_index_fails_instead_of_hanging() {
    let c = Case::new();
    one_tensor(&c.file("model.safetensors"));
    mkfifo(&c.file("model.safetensors.index.json"));
    c.fails_with(&["model.safetensors.index.json is a FIFO"]);
}

#[test]
fn fifo_or_socket_as_an_extra_file_is_refused() {
    let c = Case::new();
    one_tensor(&c.file("model.safetensors"));
    mkfifo(&c.file("config.json"));
    c.fails_with(&[
        "config.json is a FIFO",
        "move it out of the checkpoint's folder",
    ]);
    std::fs::remove_file(c.file("config.json")).unwrap();
    std::fs::create_dir(c.file("sub")).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(c.file("sub/tokenizer.model")).unwrap();
    c.fails_with(&["sub/tokenizer.model is a socket"]);
}

#[test]
fn directory_named_like_weights() {
    let c = Case::new();
    std::fs::create_dir(c.file("model.safetensors")).unwrap();
    c.fails_with(&["model.safetensors is a directory, not a regular file"]);
}

#[test]
fn unwritable_storage_path() {
    let c = Case::new();
    one_tensor(&c.file("model.safetensors"));
    // A regular file where the storage directory should be: refused even
    // for root, unlike a permission bit.
    std::fs::write(&c.storage, "not a directory").unwrap();
    let err = run_err(&mut c.save_cmd());
    assert!(
        err.contains("is a regular file, not a folder") && err.contains("--storage-path"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&c.storage).unwrap(),
        "not a directory"
    );
    let err = run_err(
        sllm_store(&c.home)
            .args([
                "save",
                "--model",
                "org/bad",
                "--storage-path",
                "/proc/sllm-store-test",
                "--local-model-path",
            ])
            .arg(&c.src),
    );
    assert!(
        err.contains("cannot write to the storage path /proc/sllm-store-test"),
        "{err}"
    );
}

#[test]
fn unsupported_backend_and_bad_model_ids() {
    let c = Case::new();
    one_tensor(&c.file("model.safetensors"));
    let err = run_err(
        sllm_store(&c.home)
            .args([
                "save",
                "--model",
                "o/m",
                "--backend",
                "vllm",
                "--local-model-path",
            ])
            .arg(&c.src),
    );
    assert!(
        err.contains("--backend \"vllm\" is not supported") && err.contains("transformers"),
        "{err}"
    );
    for bad in ["../escape", "/abs", "a//b", ".hidden/x"] {
        let err = run_err(
            sllm_store(&c.home)
                .args(["save", "--model", bad, "--local-model-path"])
                .arg(&c.src),
        );
        assert!(err.contains("invalid model id"), "{bad}: {err}");
    }
    let err = run_err(
        sllm_store(&c.home)
            .args([
                "save",
                "--model",
                "o/m",
                "--partition-size",
                "10XB",
                "--local-model-path",
            ])
            .arg(&c.src),
    );
    assert!(err.contains("invalid size"), "{err}");
    assert!(!c.home.join("models").exists(), "nothing written");
}

/// A storage path with models saved in it, and saves to try against them.
struct Store {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    src: PathBuf,
    storage: PathBuf,
}

impl Store {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        one_tensor(&src.join("model.safetensors"));
        std::fs::write(src.join("config.json"), "{}").unwrap();
        Self {
            home: tmp.path().to_owned(),
            storage: tmp.path().join("models"),
            src,
            _tmp: tmp,
        }
    }

    fn save(&self, model: &str, force: bool) -> std::process::Command {
        let mut cmd = sllm_store(&self.home);
        cmd.args(["save", "--model", model, "--local-model-path"])
            .arg(&self.src)
            .arg("--storage-path")
            .arg(&self.storage);
        if force {
            cmd.arg("--force");
        }
        cmd
    }

    fn dir(&self, model: &str) -> PathBuf {
        self.storage.join(model)
    }

    /// Expects `save` of `model` (with and without --force) to fail with
    /// every needle, leaving `kept` byte for byte as it was and nothing in
    /// staging.
    fn refused(&self, model: &str, kept: &Path, needles: &[&str]) {
        let before = read_tree(kept);
        for force in [false, true] {
            let err = run_err(&mut self.save(model, force));
            for needle in needles {
                assert!(err.contains(needle), "force={force}: {needle:?} in: {err}");
            }
            assert!(!err.contains("panicked"), "{err}");
            assert_eq!(
                read_tree(kept),
                before,
                "force={force}: {} changed",
                kept.display()
            );
            assert_nothing_published(&self.storage, &self.storage.join("none"));
        }
    }
}

#[test]
fn force_over_an_org_folder_never_deletes_its_models() {
    let s = Store::new();
    run_ok(&mut s.save("org/x", false));
    let inner = s.dir("org/x");
    s.refused(
        "org",
        &inner,
        &[
            "the stored model org/x",
            &inner.display().to_string(),
            "pick another id",
        ],
    );
    assert!(run_ok(&mut s.save("org/x", true)).contains("replaced"));
}

#[test]
fn force_over_a_folder_holding_a_nested_model_is_refused() {
    // org/a holding the model org/a/b: first as a plain folder, then as a
    // model itself (made by hand, as an older version could leave it).
    let s = Store::new();
    run_ok(&mut s.save("org/a/b", false));
    let outer = s.dir("org/a");
    let needles = ["org/a/b", "pick another id"];
    s.refused("org/a", &outer, &needles);
    run_ok(&mut s.save("elsewhere/a", false));
    for f in ["tensor_index.json", "tensor.data_0", "sllm_manifest.json"] {
        std::fs::rename(s.dir("elsewhere/a").join(f), outer.join(f)).unwrap();
    }
    s.refused("org/a", &outer, &needles);
}

#[test]
fn a_model_inside_another_is_refused() {
    let s = Store::new();
    run_ok(&mut s.save("org/x", false));
    let outer = s.dir("org/x");
    s.refused(
        "org/x/y",
        &outer,
        &[
            "org/x is a stored model",
            &outer.display().to_string(),
            "pick an id outside it",
        ],
    );
    assert!(!s.dir("org/x/y").exists());
}

#[test]
fn force_over_what_is_not_a_model_is_refused() {
    let s = Store::new();
    let mine = s.dir("org/mine");
    std::fs::create_dir_all(mine.join("sub")).unwrap();
    std::fs::write(mine.join("sub/notes.txt"), "precious").unwrap();
    s.refused(
        "org/mine",
        &mine,
        &[
            &mine.display().to_string(),
            "not a stored model",
            "even with --force",
            "sub",
        ],
    );
    std::fs::write(s.dir("org/file"), "precious").unwrap();
    s.refused(
        "org/file",
        &s.dir("org"),
        &["is a regular file, not a stored model"],
    );
}

#[test]
fn ranks_of_the_vllm_layout_are_saved_side_by_side() {
    let s = Store::new();
    run_ok(&mut s.save("org/tp/rank_0", false));
    run_ok(&mut s.save("org/tp/rank_1", false));
    assert!(run_ok(&mut s.save("org/tp/rank_0", true)).contains("replaced"));
    let tp = s.dir("org/tp");
    s.refused("org/tp/other", &tp, &["org/tp is a stored model"]);
    run_ok(
        sllm_store(&s.home)
            .args(["verify", "org/tp/rank_1", "--storage-path"])
            .arg(&s.storage),
    );
}

#[test]
fn a_file_where_a_folder_belongs_is_called_a_file() {
    // The source.
    let mut c = Case::new();
    std::fs::remove_dir(&c.src).unwrap();
    std::fs::write(&c.src, "not a checkpoint").unwrap();
    c.fails_with(&["is a regular file, not a folder", "--local-model-path"]);
    // (The storage path: unwritable_storage_path.) verify, on a model id
    // that names a file.
    c.storage = c.home.join("models2");
    std::fs::create_dir_all(c.storage.join("org")).unwrap();
    std::fs::write(c.storage.join("org/file"), "x").unwrap();
    let err = run_err(
        sllm_store(&c.home)
            .args(["verify", "--model", "org/file", "--storage-path"])
            .arg(&c.storage),
    );
    assert!(
        err.contains("is a regular file, not a model folder"),
        "{err}"
    );
}
