//! `verify` names every problem of a damaged model, and accepts models laid
//! out as the reference writer lays them out.

use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::common::*;

/// A model saved by `save`, returned with its directory.
fn saved_model(tmp: &Path) -> (PathBuf, Vec<Tensor>) {
    let src = tmp.join("src");
    std::fs::create_dir(&src).unwrap();
    let tensors: Vec<Tensor> = (0..6)
        .map(|i| Tensor::random(&format!("t{i}"), Dtype::F32, &[1000 + i], i as u64))
        .collect();
    write_safetensors(&src.join("model.safetensors"), &tensors);
    run_ok(
        sllm_store(tmp)
            .args([
                "save",
                "--model",
                "o/m",
                "--partition-size",
                "8KiB",
                "--local-model-path",
            ])
            .arg(&src)
            .arg("--storage-path")
            .arg(tmp.join("s")),
    );
    (tmp.join("s/o/m"), tensors)
}

fn verify(tmp: &Path) -> String {
    run_err(
        sllm_store(tmp)
            .args(["verify", "o/m", "--storage-path"])
            .arg(tmp.join("s")),
    )
}

#[test]
fn a_flipped_byte_is_located_to_its_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = saved_model(tmp.path());
    let part = model.join("tensor.data_1");
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&part, bytes).unwrap();
    let out = verify(tmp.path());
    assert!(
        out.contains("tensor.data_1: bytes [0, 8192) (checksum block 0)"),
        "{out}"
    );
    assert!(
        out.contains("affecting tensors t2")
            && out.contains("FAILED o/m")
            && out.contains("1 problem(s)"),
        "{out}"
    );
}

#[test]
fn truncation_and_a_missing_partition_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = saved_model(tmp.path());
    let last = model.join("tensor.data_2");
    let len = std::fs::metadata(&last).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let out = verify(tmp.path());
    assert!(
        out.contains("tensor.data_2 is") && out.contains("truncated or replaced"),
        "{out}"
    );
    assert!(
        out.contains("\"t5\"") && out.contains("past the end of the partitions"),
        "{out}"
    );

    std::fs::remove_file(model.join("tensor.data_1")).unwrap();
    let out = verify(tmp.path());
    assert!(
        out.contains("tensor.data_2 exists but an earlier partition number is missing"),
        "{out}"
    );
    assert!(
        out.contains("lists 3 partitions but 1 are on disk"),
        "{out}"
    );
}

#[test]
fn index_edits_are_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = saved_model(tmp.path());
    let stored = Stored::read(&model);
    let (t0, ..) = stored.entry("t0");
    let mut index = stored.index.clone();
    // t1 now starts inside t0; t2 claims a shape its size cannot hold; t3 has
    // a dtype no one knows.
    index["t1"][0] = (t0 + 16).into();
    index["t2"][2] = serde_json::json!([2000]);
    index["t3"][4] = "torch.complex32".into();
    std::fs::write(
        model.join("tensor_index.json"),
        serde_json::to_string(&index).unwrap(),
    )
    .unwrap();
    let out = verify(tmp.path());
    for needle in [
        "tensors \"t0\" and \"t1\" overlap",
        "tensor \"t2\": size is 4008 bytes but shape [2000] of torch.float32 needs 8000",
        "tensor \"t3\": unknown dtype \"torch.complex32\"",
        "tensor_index.json changed since it was written",
    ] {
        assert!(out.contains(needle), "expected {needle:?} in {out}");
    }
}

#[test]
fn a_garbled_index_or_manifest_is_a_problem_not_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = saved_model(tmp.path());
    std::fs::write(model.join("tensor_index.json"), "{\"t0\": [0, 1").unwrap();
    std::fs::write(model.join("sllm_manifest.json"), "[]").unwrap();
    let out = verify(tmp.path());
    assert!(
        out.contains("is not a valid tensor index") && out.contains("is not a valid manifest"),
        "{out}"
    );
    assert!(!out.contains("panicked"), "{out}");
}

#[test]
fn a_missing_model_says_where_it_looked() {
    let tmp = tempfile::tempdir().unwrap();
    let err = run_err(
        sllm_store(tmp.path())
            .args(["verify", "o/none", "--storage-path"])
            .arg(tmp.path()),
    );
    assert!(
        err.contains(&format!("no model at {}/o/none", tmp.path().display())),
        "{err}"
    );
    assert!(err.contains("sllm-store save"), "{err}");
}

#[test]
fn a_reference_layout_model_verifies() {
    // As ServerlessLLM's writer lays a model out: records padded to 8 bytes
    // only, tied weights written once with two index entries at one offset,
    // a record never split, no manifest.
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("s/o/m");
    std::fs::create_dir_all(&model).unwrap();
    let mut part0 = vec![1u8; 12];
    part0.extend_from_slice(&[0; 4]); // pad to 16
    part0.extend_from_slice(&[2u8; 8]);
    std::fs::write(model.join("tensor.data_0"), &part0).unwrap();
    std::fs::write(model.join("tensor.data_1"), [3u8; 6]).unwrap(); // ends unaligned
    let index = r#"{"embed.weight": [0, 12, [3], [1], "torch.float32"], "lm_head.weight": [0, 12, [3], [1], "torch.float32"], "norm": [16, 8, [2, 2], [2, 1], "torch.bfloat16"], "bias": [24, 6, [3], [1], "torch.float16"]}"#;
    std::fs::write(model.join("tensor_index.json"), index).unwrap();
    let out = run_ok(
        sllm_store(tmp.path())
            .args(["verify", "o/m", "--storage-path"])
            .arg(tmp.path().join("s")),
    );
    assert!(
        out.contains("ok o/m: 4 tensors") && out.contains("no manifest"),
        "{out}"
    );
}

#[test]
fn verify_takes_model_like_every_command_and_prints_json() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = saved_model(tmp.path());
    let storage = tmp.path().join("s");
    // --model, the positional form, and --json agree.
    let out = run_ok(
        sllm_store(tmp.path())
            .args(["verify", "--model", "o/m", "--storage-path"])
            .arg(&storage),
    );
    assert!(out.contains("ok o/m: 6 tensors"), "{out}");
    let json = run_ok(
        sllm_store(tmp.path())
            .args(["verify", "--model", "o/m", "--json", "--storage-path"])
            .arg(&storage),
    );
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["ok"], true, "{json}");
    assert_eq!(v["tensors"], 6, "{json}");
    assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{json}");
    // A folder of weights alone: sound, but vLLM cannot start from it.
    let warnings = v["warnings"].as_array().unwrap();
    assert!(
        warnings.len() == 1 && warnings[0].as_str().unwrap().contains("has no config.json"),
        "{json}"
    );
    // A damaged model: not ok, exit status 1, the problem in the list.
    let part = model.join("tensor.data_0");
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&part, bytes).unwrap();
    let (out, json, _) = run(sllm_store(tmp.path())
        .args(["verify", "--model", "o/m", "--json", "--storage-path"])
        .arg(&storage));
    assert_eq!(out.status.code(), Some(1), "{json}");
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["ok"], false, "{json}");
    assert!(!v["problems"].as_array().unwrap().is_empty(), "{json}");
    // Naming the model twice is refused; naming it not at all says how.
    let err = run_err(
        sllm_store(tmp.path())
            .args(["verify", "o/m", "--model", "o/m", "--storage-path"])
            .arg(&storage),
    );
    assert!(err.contains("cannot be used with"), "{err}");
    let err = run_err(sllm_store(tmp.path()).args(["verify"]));
    assert!(err.contains("sllm-store verify --model"), "{err}");
}
