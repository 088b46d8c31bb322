//! The Rust planner against the golden plans in `tests/planner/golden.json`,
//! which the Python planner must produce too
//! (`client/python/tests/test_plan_and_proto.py`): one set of rules, two
//! implementations, checked against the same vectors.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use sllm_client::plan::{DeviceMap, Layout, plan};
use sllm_format::index::TensorIndex;

fn golden() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/planner/golden.json");
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).expect("golden.json parses")
}

#[test]
fn the_rust_planner_makes_the_golden_plans() {
    let golden = golden();
    let cases = golden["cases"].as_array().expect("cases");
    assert!(cases.len() >= 10, "the golden file lost its cases");
    for case in cases {
        let what = format!(
            "{} {} {}",
            case["index"], case["layout"], case["device_map"]
        );
        let index_json =
            serde_json::to_vec(&golden["indices"][case["index"].as_str().unwrap()]).unwrap();
        let index = TensorIndex::from_json(&index_json).expect("index");
        let map = DeviceMap(
            case["device_map"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect(),
        );
        let layout = match case["layout"].as_str().unwrap() {
            "mirrored" => Layout::Mirrored,
            "packed" => Layout::Packed,
            other => panic!("layout {other}"),
        };
        let result = plan(&index, &map, layout);
        if let Some(error) = case.get("error") {
            let err = result.expect_err(&what).to_string();
            // Same tensor named; the quoting differs between the languages.
            let name = error.as_str().unwrap().split('\'').nth(1).unwrap();
            assert!(err.contains(name), "{what}: {err}");
            continue;
        }
        let p = result.unwrap_or_else(|e| panic!("{what}: {e}"));
        let buffers: Vec<Value> = p
            .buffers
            .iter()
            .map(|b| {
                serde_json::json!({
                    "device": b.uuid,
                    "size": b.size_bytes,
                    "copies": b.copies.iter().map(|c| [c.src_offset, c.size, c.dst_offset]).collect::<Vec<_>>(),
                })
            })
            .collect();
        assert_eq!(Value::from(buffers), case["buffers"], "{what}: buffers");
        let tensors: BTreeMap<&String, Value> = p
            .tensors
            .iter()
            .map(|(n, t)| (n, serde_json::json!([t.device, t.offset])))
            .collect();
        assert_eq!(
            serde_json::to_value(tensors).unwrap(),
            case["tensors"],
            "{what}: tensors"
        );
        assert!(
            p.buffers
                .iter()
                .all(|b| b.copies.iter().all(|c| c.handle_idx == 0))
        );
    }
}
