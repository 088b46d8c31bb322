//! `save` round trips: every tensor's bytes in the store equal the source.

use safetensors::Dtype;

use crate::common::*;

fn all_dtypes() -> Vec<Tensor> {
    vec![
        Tensor::random("f16.odd", Dtype::F16, &[3, 5, 7], 1),
        Tensor::random("bf16", Dtype::BF16, &[4, 33], 2),
        Tensor::random("f32.scalar", Dtype::F32, &[], 3),
        Tensor::random("f64", Dtype::F64, &[9], 4),
        Tensor::random("i8", Dtype::I8, &[1, 1, 13], 5),
        Tensor::random("i16", Dtype::I16, &[2, 3], 6),
        Tensor::random("i32", Dtype::I32, &[5000], 7),
        Tensor::random("i64.empty", Dtype::I64, &[0, 4], 8),
        Tensor::random("u8", Dtype::U8, &[4097], 9),
        Tensor::random("bool", Dtype::BOOL, &[1], 10),
        Tensor::random("f8_e4m3", Dtype::F8_E4M3, &[16, 3], 11),
        Tensor::random("f8_e5m2", Dtype::F8_E5M2, &[2, 2, 2, 2, 2], 12),
        Tensor::random("empty.1d", Dtype::F32, &[0], 13),
    ]
}

#[test]
fn every_dtype_odd_sizes_empty_and_scalar_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let tensors = all_dtypes();
    write_safetensors(&src.join("model.safetensors"), &tensors);
    std::fs::write(src.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();

    let storage = tmp.path().join("models");
    let out = run_ok(
        sllm_store(tmp.path())
            .args(["save", "--model", "org/all-dtypes", "--local-model-path"])
            .arg(&src)
            .arg("--storage-path")
            .arg(&storage),
    );
    assert!(out.contains("saved org/all-dtypes: 13 tensors"), "{out}");

    let model = storage.join("org/all-dtypes");
    Stored::read(&model).assert_holds(&tensors);
    assert_eq!(
        std::fs::read_to_string(model.join("config.json")).unwrap(),
        r#"{"model_type": "llama"}"#
    );
    assert!(model.join("sllm_manifest.json").exists());
    let ok = run_ok(
        sllm_store(tmp.path())
            .args(["verify", "org/all-dtypes", "--storage-path"])
            .arg(&storage),
    );
    assert!(ok.starts_with("ok org/all-dtypes: 13 tensors"), "{ok}");
}

#[test]
fn sharded_input_many_partitions_and_other_files() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let shards: Vec<Vec<Tensor>> = (0..3)
        .map(|s| {
            (0..4)
                .map(|i| {
                    Tensor::random(
                        &format!("layers.{s}.w{i}"),
                        Dtype::BF16,
                        &[37, 50 + i],
                        (s * 10 + i) as u64,
                    )
                })
                .collect()
        })
        .collect();
    write_sharded(&src, &shards);
    std::fs::write(src.join("config.json"), "{}").unwrap();
    std::fs::write(src.join("tokenizer.json"), "{\"t\": 1}").unwrap();
    std::fs::create_dir_all(src.join("original")).unwrap();
    std::fs::write(src.join("original/params.json"), "{}").unwrap();
    std::fs::write(src.join("original/consolidated.00.pth"), "weights").unwrap();
    std::fs::write(src.join("pytorch_model.bin"), "weights").unwrap();
    std::fs::write(src.join(".gitattributes"), "x").unwrap();
    // A sentence-transformers model: vLLM reads its modules' folders,
    // weights included.
    std::fs::write(
        src.join("modules.json"),
        r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]"#,
    )
    .unwrap();
    std::fs::create_dir_all(src.join("1_Pooling")).unwrap();
    std::fs::write(src.join("1_Pooling/config.json"), "{}").unwrap();
    std::fs::create_dir_all(src.join("2_Dense")).unwrap();
    std::fs::write(src.join("2_Dense/config.json"), "{}").unwrap();
    std::fs::write(src.join("2_Dense/model.safetensors"), "dense").unwrap();

    let storage = tmp.path().join("models");
    let out = run_ok(
        sllm_store(tmp.path())
            .args([
                "save",
                "--model",
                "org/sharded",
                "--partition-size",
                "12KiB",
                "--local-model-path",
            ])
            .arg(&src)
            .env("STORAGE_PATH", &storage),
    );
    assert!(out.contains("12 tensors"), "{out}");

    let model = storage.join("org/sharded");
    let stored = Stored::read(&model);
    let all: Vec<Tensor> = shards.concat();
    stored.assert_holds(&all);
    // Each record is ~3.9 KiB padded to 4 KiB: three per 12 KiB partition.
    assert_eq!(stored.partition_sizes, vec![12288, 12288, 12288, 12288]);
    // Records never straddle a partition boundary.
    for t in &all {
        let (offset, size, ..) = stored.entry(&t.name);
        assert_eq!(
            offset / 12288,
            (offset + size - 1) / 12288,
            "{} straddles",
            t.name
        );
    }
    for copied in [
        "config.json",
        "tokenizer.json",
        "original/params.json",
        "modules.json",
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "2_Dense/model.safetensors",
    ] {
        assert!(model.join(copied).is_file(), "{copied} copied");
    }
    for skipped in [
        "original/consolidated.00.pth",
        "pytorch_model.bin",
        ".gitattributes",
        "model.safetensors.index.json",
    ] {
        assert!(!model.join(skipped).exists(), "{skipped} not copied");
    }
    run_ok(
        sllm_store(tmp.path())
            .args(["verify", "org/sharded"])
            .env("STORAGE_PATH", &storage),
    );
}

#[test]
fn default_storage_path_is_home_models() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let tensors = vec![Tensor::random("w", Dtype::F32, &[8], 1)];
    write_safetensors(&src.join("model.safetensors"), &tensors);
    run_ok(
        sllm_store(tmp.path())
            .args(["save", "--model", "m"])
            .arg("--local-model-path")
            .arg(&src),
    );
    Stored::read(&tmp.path().join("models/m")).assert_holds(&tensors);
}

#[test]
fn several_unsharded_files_are_merged() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let a = vec![Tensor::random("a", Dtype::F16, &[10], 1)];
    let b = vec![Tensor::random("b", Dtype::F16, &[11], 2)];
    write_safetensors(&src.join("a.safetensors"), &a);
    write_safetensors(&src.join("b.safetensors"), &b);
    let storage = tmp.path().join("s");
    run_ok(
        sllm_store(tmp.path())
            .args(["save", "--model", "x/y", "--local-model-path"])
            .arg(&src)
            .arg("--storage-path")
            .arg(&storage),
    );
    Stored::read(&storage.join("x/y")).assert_holds(&[a, b].concat());
}

#[test]
fn force_replaces_an_existing_model() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let storage = tmp.path().join("s");
    let save = |force: bool| {
        let mut cmd = sllm_store(tmp.path());
        cmd.args(["save", "--model", "o/m", "--local-model-path"])
            .arg(&src)
            .arg("--storage-path")
            .arg(&storage);
        if force {
            cmd.arg("--force");
        }
        cmd
    };
    let first = vec![Tensor::random("w", Dtype::F32, &[4], 1)];
    write_safetensors(&src.join("model.safetensors"), &first);
    run_ok(&mut save(false));

    let second = vec![
        Tensor::random("w", Dtype::F32, &[4], 2),
        Tensor::random("v", Dtype::F16, &[3], 3),
    ];
    write_safetensors(&src.join("model.safetensors"), &second);
    let err = run_err(&mut save(false));
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    Stored::read(&storage.join("o/m")).assert_holds(&first);

    let out = run_ok(&mut save(true));
    assert!(out.contains("replaced"), "{out}");
    Stored::read(&storage.join("o/m")).assert_holds(&second);
    assert_nothing_published(&storage, &storage.join("o/none"));
}

#[test]
fn names_that_are_not_utf8_are_kept_byte_for_byte() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let name = |bytes: &[u8]| OsStr::from_bytes(bytes).to_owned();

    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join(name(b"src\xfe"));
    std::fs::create_dir_all(src.join(name(b"sub\xfe"))).unwrap();
    let tensors = vec![Tensor::random("w", Dtype::BF16, &[3, 7], 1)];
    write_safetensors(&src.join(name(b"w\xff.safetensors")), &tensors);
    let tok: Vec<u8> = (0..=255u8).collect();
    std::fs::write(src.join(name(b"tok\xff.json")), &tok).unwrap();
    std::fs::write(src.join(name(b"sub\xfe")).join(name(b"x\xff.txt")), "deep").unwrap();
    std::fs::write(src.join("config.json"), "{}").unwrap();

    let storage = tmp.path().join("models");
    let out = run_ok(
        sllm_store(tmp.path())
            .args(["save", "--model", "org/odd", "--local-model-path"])
            .arg(&src)
            .arg("--storage-path")
            .arg(&storage),
    );
    assert!(out.contains("3 other file(s)"), "{out}");
    let model = storage.join("org/odd");
    Stored::read(&model).assert_holds(&tensors);
    assert_eq!(
        std::fs::read(model.join(name(b"tok\xff.json"))).unwrap(),
        tok
    );
    assert_eq!(
        std::fs::read(model.join(name(b"sub\xfe")).join(name(b"x\xff.txt"))).unwrap(),
        b"deep"
    );

    let ok = run_ok(
        sllm_store(tmp.path())
            .args(["verify", "org/odd", "--storage-path"])
            .arg(&storage),
    );
    assert!(ok.starts_with("ok org/odd: 1 tensors"), "{ok}");
    // The doctor reads the same folder: the model passes.
    let (_, stdout, stderr) = run(sllm_store(tmp.path())
        .args([
            "doctor",
            "--json",
            "--mem-pool-size",
            "64MiB",
            "--model",
            "org/odd",
        ])
        .arg("--storage-path")
        .arg(&storage));
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e}): {stdout}\n{stderr}"));
    let verify = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "model.verify")
        .unwrap_or_else(|| panic!("no model.verify in {report:#}"));
    assert_eq!(verify["status"], "PASS", "{verify:#}");
}

#[test]
fn links_to_regular_files_are_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let blobs = tmp.path().join("blobs");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&src).unwrap();
    let tensors = vec![Tensor::random("w", Dtype::F16, &[5], 2)];
    write_safetensors(&blobs.join("weights"), &tensors);
    std::fs::write(blobs.join("config"), "{\"a\": 1}").unwrap();
    std::os::unix::fs::symlink("../blobs/weights", src.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink("../blobs/config", src.join("config.json")).unwrap();
    let storage = tmp.path().join("models");
    run_ok(
        sllm_store(tmp.path())
            .args(["save", "--model", "org/linked", "--local-model-path"])
            .arg(&src)
            .arg("--storage-path")
            .arg(&storage),
    );
    let model = storage.join("org/linked");
    Stored::read(&model).assert_holds(&tensors);
    assert!(!model.join("config.json").is_symlink());
    assert_eq!(
        std::fs::read_to_string(model.join("config.json")).unwrap(),
        "{\"a\": 1}"
    );
}
