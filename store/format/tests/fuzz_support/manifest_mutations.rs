//! Mutations of a real `sllm_manifest.json`, shared by the fuzz tests of the
//! format (`Manifest::read`, `verify`) and of the daemon (`OnDisk::read` and
//! loads): included with `#[path]` where needed.

#![allow(dead_code, reason = "each fuzz file uses part of the mutations")]

use proptest::prelude::*;
use serde_json::{Value, json};

/// Values to put anywhere (`block_bytes`: the model's block size).
pub fn odd_value(block_bytes: u64) -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(-1)),
        Just(json!(1.5)),
        Just(json!(u64::MAX)),
        Just(json!(1u64 << 63)),
        Just(json!("1024")),
        Just(json!(null)),
        Just(json!(true)),
        Just(json!([])),
        Just(json!({})),
        Just(json!("")),
        Just(json!("sllm-store-manifest/2")),
        Just(json!("xxh3-128")),
        Just(json!("sllm-store-manifest/1")),
        Just(json!("xxh3-64")),
        Just(json!(block_bytes)),
        Just(json!(block_bytes + 1)),
        Just(json!(block_bytes * 2)),
        Just(json!(block_bytes / 2)),
        Just(json!(4096)),
    ]
}

/// How to rewrite one checksum block.
#[derive(Clone, Copy, Debug)]
pub enum BlockEdit {
    Upper,
    Plus,
    TrimZeros,
    PadZero,
    Empty,
    Garbage,
    Prefix0x,
    FlipDigit,
}

#[derive(Clone, Debug)]
pub enum Mutation {
    /// Set top-level field `name` (one of the manifest's or an unknown one).
    Field(&'static str, Value),
    Remove(&'static str),
    PartitionRemove(usize),
    PartitionRepeat(usize),
    PartitionSwap(usize, usize),
    PartitionField(usize, &'static str, Value),
    BlockRemove(usize, usize),
    BlockRepeat(usize, usize),
    BlockSwap(usize, usize, usize),
    BlockEdit(usize, usize, BlockEdit),
    /// The first partition's block list as `n` copies of "0".
    ManyBlocks(usize),
    /// `block_bytes` set to this, and every partition's blocks recomputed
    /// for it from the real bytes: a manifest that is right, at a block
    /// size the writer would not pick.
    Rechunk(u64),
    IndexField(&'static str, Value),
    /// A field nested `depth` lists deep.
    Deep(&'static str, usize),
    /// Text-level: a top-level key written twice (the first copy wins
    /// nothing: serde refuses duplicate fields).
    DuplicateKey(&'static str),
    Flip(usize, u8),
    Truncate(usize),
    NonUtf8InString,
}

const FIELDS: &[&str] = &[
    "format",
    "checksum",
    "block_bytes",
    "tensors",
    "tensor_bytes",
    "index",
    "partitions",
    "source",
    "written_by",
    "unknown",
];

pub fn mutation(block_bytes: u64) -> impl Strategy<Value = Mutation> {
    let f = prop::sample::select(FIELDS);
    let n = 0usize..4;
    let b = 0usize..8;
    let edit = prop::sample::select(vec![
        BlockEdit::Upper,
        BlockEdit::Plus,
        BlockEdit::TrimZeros,
        BlockEdit::PadZero,
        BlockEdit::Empty,
        BlockEdit::Garbage,
        BlockEdit::Prefix0x,
        BlockEdit::FlipDigit,
    ]);
    prop_oneof![
        4 => (f.clone(), odd_value(block_bytes)).prop_map(|(f, v)| Mutation::Field(f, v)),
        1 => f.clone().prop_map(Mutation::Remove),
        1 => n.clone().prop_map(Mutation::PartitionRemove),
        1 => n.clone().prop_map(Mutation::PartitionRepeat),
        1 => (n.clone(), n.clone()).prop_map(|(i, j)| Mutation::PartitionSwap(i, j)),
        2 => (n.clone(), prop::sample::select(vec!["file", "size_bytes", "blocks", "extra"]), odd_value(block_bytes))
            .prop_map(|(i, f, v)| Mutation::PartitionField(i, f, v)),
        1 => (n.clone(), b.clone()).prop_map(|(i, k)| Mutation::BlockRemove(i, k)),
        1 => (n.clone(), b.clone()).prop_map(|(i, k)| Mutation::BlockRepeat(i, k)),
        1 => (n.clone(), b.clone(), b.clone()).prop_map(|(i, k, l)| Mutation::BlockSwap(i, k, l)),
        3 => (n, b, edit).prop_map(|(i, k, e)| Mutation::BlockEdit(i, k, e)),
        1 => prop::sample::select(vec![0usize, 1, 2, 4, 5, 100_000]).prop_map(Mutation::ManyBlocks),
        2 => prop_oneof![
            prop::sample::select(vec![
                7u64, 64, 1000, 4095, 4096, 4097, 65_535, 65_536, 65_537, 100_000, 131_072,
                1 << 20, 1 << 40, u64::MAX / 2, u64::MAX - 1, u64::MAX,
            ]),
            1u64..300_000,
        ]
        .prop_map(Mutation::Rechunk),
        1 => (prop::sample::select(vec!["size_bytes", "xxh3"]), odd_value(block_bytes))
            .prop_map(|(f, v)| Mutation::IndexField(f, v)),
        1 => (f.clone(), prop::sample::select(vec![100usize, 127, 128, 129, 100_000]))
            .prop_map(|(f, d)| Mutation::Deep(f, d)),
        1 => f.prop_map(Mutation::DuplicateKey),
        1 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i.index(1 << 20), b)),
        1 => any::<prop::sample::Index>().prop_map(|i| Mutation::Truncate(i.index(1 << 20))),
        1 => Just(Mutation::NonUtf8InString),
    ]
}

fn edit_block(block: &str, edit: BlockEdit) -> String {
    let tail = |from: usize| block.get(from..).unwrap_or("");
    match edit {
        BlockEdit::Upper => block.to_uppercase(),
        BlockEdit::Plus => format!("+{}", tail(1)),
        BlockEdit::TrimZeros => block.trim_start_matches('0').to_owned(),
        BlockEdit::PadZero => format!("0{block}"),
        BlockEdit::Empty => String::new(),
        BlockEdit::Garbage => "zzzzzzzzzzzzzzzz".into(),
        BlockEdit::Prefix0x => format!("0x{}", tail(2)),
        BlockEdit::FlipDigit => {
            let mut chars: Vec<char> = block.chars().collect();
            if let Some(c) = chars.last_mut() {
                *c = if *c == '0' { '1' } else { '0' };
            }
            chars.into_iter().collect()
        }
    }
}

/// The manifest's text after `mutations`; `partitions` are the bytes of
/// the model's partitions (for [`Mutation::Rechunk`]).
pub fn mutate(base: &Value, mutations: &[Mutation], partitions: &[Vec<u8>]) -> Vec<u8> {
    let mut m = base.clone();
    let mut text_ops = Vec::new();
    for op in mutations {
        let obj = m.as_object_mut().unwrap();
        let parts = obj
            .get_mut("partitions")
            .and_then(Value::as_array_mut)
            .map(std::mem::take);
        let mut parts = parts.unwrap_or_default();
        let n = parts.len();
        match op {
            Mutation::Field(f, v) => {
                obj.insert((*f).into(), v.clone());
            }
            Mutation::Remove(f) => {
                obj.remove(*f);
            }
            Mutation::PartitionRemove(i) if n > 0 => {
                parts.remove(i % n);
            }
            Mutation::PartitionRepeat(i) if n > 0 => {
                let p = parts[i % n].clone();
                parts.insert(i % n, p);
            }
            Mutation::PartitionSwap(i, j) if n > 0 => parts.swap(i % n, j % n),
            Mutation::PartitionField(i, f, v) if n > 0 => {
                if let Some(p) = parts[i % n].as_object_mut() {
                    p.insert((*f).into(), v.clone());
                }
            }
            Mutation::BlockRemove(i, k)
            | Mutation::BlockRepeat(i, k)
            | Mutation::BlockSwap(i, k, _)
            | Mutation::BlockEdit(i, k, _)
                if n > 0 =>
            {
                if let Some(blocks) = parts[i % n].get_mut("blocks").and_then(Value::as_array_mut)
                    && !blocks.is_empty()
                {
                    let len = blocks.len();
                    let k = k % len;
                    match op {
                        Mutation::BlockRemove(..) => {
                            blocks.remove(k);
                        }
                        Mutation::BlockRepeat(..) => {
                            let b = blocks[k].clone();
                            blocks.insert(k, b);
                        }
                        Mutation::BlockSwap(_, _, l) => blocks.swap(k, l % len),
                        Mutation::BlockEdit(_, _, e) => {
                            if let Some(s) = blocks[k].as_str() {
                                blocks[k] = Value::String(edit_block(s, *e));
                            }
                        }
                        _ => {}
                    }
                }
            }
            Mutation::ManyBlocks(count) if n > 0 => {
                if let Some(p) = parts[0].as_object_mut() {
                    p.insert("blocks".into(), Value::Array(vec![json!("0"); *count]));
                }
            }
            Mutation::Rechunk(block) => {
                obj.insert("block_bytes".into(), json!(block));
                let size = usize::try_from(*block).unwrap_or(usize::MAX);
                for (p, bytes) in parts.iter_mut().zip(partitions) {
                    if let Some(p) = p.as_object_mut() {
                        let blocks: Vec<Value> = bytes
                            .chunks(size)
                            .map(|b| json!(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(b))))
                            .collect();
                        p.insert("blocks".into(), Value::Array(blocks));
                    }
                }
            }
            Mutation::IndexField(f, v) => {
                if let Some(index) = obj.get_mut("index").and_then(Value::as_object_mut) {
                    index.insert((*f).into(), v.clone());
                }
            }
            Mutation::Deep(f, depth) => {
                let mut v = json!(0);
                for _ in 0..(*depth).min(1000) {
                    v = Value::Array(vec![v]);
                }
                if *depth > 1000 {
                    // Too deep for serde_json to write: spliced in as text.
                    text_ops.push(op.clone());
                } else {
                    obj.insert((*f).into(), v);
                }
            }
            other => text_ops.push(other.clone()),
        }
        if let Some(slot) = obj.get_mut("partitions").and_then(Value::as_array_mut) {
            *slot = parts;
        }
    }
    // Deeply nested values must not be dropped recursively by serde_json
    // here: they stay at most 1000 deep in `m`.
    let mut text = serde_json::to_string_pretty(&m).unwrap().into_bytes();
    for op in text_ops {
        // After `{\n` (or wherever a truncated text ends).
        let head = text.len().min(2);
        match op {
            Mutation::Deep(f, depth) => {
                let mut field = format!("\"{f}\": ").into_bytes();
                field.extend(std::iter::repeat_n(b'[', depth));
                field.extend(std::iter::repeat_n(b']', depth));
                field.extend_from_slice(b",\n");
                text.splice(head..head, field);
            }
            Mutation::DuplicateKey(f) => {
                let field = format!("\"{f}\": {},\n", base.get(f).unwrap_or(&json!(1)));
                text.splice(head..head, field.into_bytes());
            }
            Mutation::Flip(i, b) if !text.is_empty() => {
                let i = i % text.len();
                text[i] ^= b.max(1);
            }
            Mutation::Truncate(i) => text.truncate(i % (text.len() + 1)),
            Mutation::NonUtf8InString => {
                if let Some(at) = text.iter().position(|&c| c == b'"') {
                    text.insert(at + 1, 0xff);
                }
            }
            _ => {}
        }
    }
    text
}
