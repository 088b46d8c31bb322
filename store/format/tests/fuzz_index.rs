//! `tensor_index.json` under property-based fuzzing.
//!
//! Two targets:
//! - `index_parser`: arbitrary bytes, token soup, and valid indexes mutated
//!   in their text (numbers negative, fractional, past 2^64, quoted; wrong
//!   arity; non-lists; unknown dtypes; duplicate, escaped and non-UTF-8
//!   names; nesting past serde_json's depth limit; flipped bytes) go through
//!   [`TensorIndex::from_json`] and [`TensorIndex::read`]. Properties: no
//!   panic, no hang, memory bounded by the input's size, and acceptance
//!   exactly when the text is what the module promises (one JSON object,
//!   each name once, each value `[u64, u64, [u64...], [u64...], string]`),
//!   with entries in file order and a faithful `to_json` round trip.
//! - `index_placement`: valid layouts over real partition files, mutated in
//!   their values (offsets and sizes moved, past the end, near 2^64; shapes
//!   and strides disagreeing; unknown dtypes; aliases of another size), go
//!   through `verify` (structure). Property: a model it passes has every
//!   tensor inside the partitions, every view inside its record, a known
//!   dtype, and no two distinct records overlapping, checked here with
//!   128-bit arithmetic of our own; and an unmutated layout always passes.
//!
//! Each target has a smoke variant in the fast tier and a time-boxed fuzz
//! variant in the slow tier (`cargo test -- --include-ignored`).

mod fuzz_support;
#[path = "fuzz_support/json_keys.rs"]
mod json_keys;

use std::fmt;

use fuzz_support::{Tally, Tier, check_allocation, measure, run};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use sllm_format::index::contiguous_stride;
use sllm_format::verify::{Depth, verify_model_to};
use sllm_format::{TensorEntry, TensorIndex, TorchDtype};

// ---------------------------------------------------------------------------
// Inputs.

/// Bytes shown as a byte string, so a failing case can be pasted back.
#[derive(Clone)]
struct Doc(Vec<u8>);

impl fmt::Debug for Doc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

/// A tensor as the generators lay it out (always valid until mutated).
#[derive(Clone, Debug)]
struct Spec {
    dtype: TorchDtype,
    shape: Vec<u64>,
    /// Also index the record under a second name (shared storage).
    alias: bool,
    /// Padding after the record, in bytes.
    gap: u64,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::sample::select(TorchDtype::ALL.to_vec()),
        prop::collection::vec(0u64..6, 0..4),
        prop::bool::weighted(0.15),
        prop_oneof![3 => Just(0u64), 1 => 0u64..64],
    )
        .prop_map(|(dtype, shape, alias, gap)| Spec {
            dtype,
            shape,
            alias,
            gap,
        })
}

/// A valid index for `specs` and the size of the partitions it fits.
fn lay_out(specs: &[Spec], tail: u64) -> (Vec<(String, TensorEntry)>, u64) {
    let mut entries = Vec::new();
    let mut at = 0u64;
    for (i, s) in specs.iter().enumerate() {
        let size = s.shape.iter().product::<u64>() * s.dtype.size_bytes();
        let entry = TensorEntry {
            offset: at,
            size,
            shape: s.shape.clone(),
            stride: contiguous_stride(&s.shape),
            dtype: s.dtype.name().into(),
        };
        if s.alias {
            entries.push((format!("alias.{i}"), entry.clone()));
        }
        entries.push((format!("t.{i}"), entry));
        at += size + s.gap;
    }
    (entries, at + tail)
}

/// The text of an index, entries in order, names possibly repeated (which
/// [`TensorIndex::to_json`] cannot write).
fn render(entries: &[(String, TensorEntry)]) -> String {
    let body: Vec<String> = entries
        .iter()
        .map(|(name, e)| {
            let one = entry_json(name, e);
            // `{"name": [...]}` without its braces.
            one[1..one.len() - 1].to_owned()
        })
        .collect();
    format!("{{{}}}", body.join(", "))
}

/// `TensorIndex::to_json` of one entry, used to render entries one by one.
fn entry_json(name: &str, e: &TensorEntry) -> String {
    let mut one = TensorIndex::new();
    one.push(name.to_owned(), e.clone());
    one.to_json()
}

/// Numbers that are not a u64, or are one only barely.
const ODD_NUMBERS: &[&str] = &[
    "-1",
    "-0",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "1.5",
    "1e3",
    "1E400",
    "0.0",
    "01",
    "0x10",
    "+1",
    "NaN",
    "Infinity",
    "\"7\"",
    "null",
    "true",
    "[]",
    "{}",
];

/// Names that a parser might trip on.
const ODD_NAMES: &[&[u8]] = &[
    b"\"\"",
    b"\"\\u0000\"",
    b"\"\\ud800\"",
    b"\"\\udc00\\ud800\"",
    b"\"\\ud83d\\ude00\"",
    b"\"\xff\xfe\"",
    b"\"\xc3\"",
    b"\"\xed\xa0\x80\"",
    b"\"a\\\"b\"",
    b"\"\\x41\"",
    b"\"tab\there\"",
    b"\"\xe2\x82\xac\"",
    b"5",
    b"null",
    b"[\"a\"]",
];

/// Values that are not `[offset, size, shape, stride, dtype]`.
const ODD_VALUES: &[&str] = &[
    "[]",
    "{}",
    "null",
    "\"x\"",
    "[0, 8, [2], [1]]",
    "[0, 8, [2], [1], \"torch.float32\", 7]",
    "[0, 8, 2, [1], \"torch.float32\"]",
    "[0, 8, [2], [1], 5]",
    "[0, 8, [[2]], [1], \"torch.float32\"]",
    "[0, 8, [2], [1], \"torch.complex64\"]",
    "[0, 8, [2], [1], null]",
    "{\"offset\": 0, \"size\": 8}",
    "[0, 8, [2], [1], \"torch.float32\",]",
];

/// One textual mutation of a rendered index.
#[derive(Clone, Debug)]
enum TextMutation {
    /// Replace the `n`-th number token with an odd one.
    Number(usize, &'static str),
    /// Replace the `n`-th entry's name.
    Name(usize, &'static [u8]),
    /// Give the `n`-th entry the name of the `m`-th.
    DuplicateName(usize, usize),
    /// Replace the `n`-th entry's value.
    Value(usize, &'static str),
    /// Replace the `n`-th entry's value with `depth` nested lists.
    Deep(usize, usize),
    /// Wrap the whole document in `depth` lists (possibly unclosed).
    DeepDocument(usize, bool),
    /// Flip, insert or delete bytes.
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    /// Put `text` before or after the document.
    Prefix(&'static [u8]),
    Suffix(&'static [u8]),
}

fn text_mutation() -> impl Strategy<Value = TextMutation> {
    let idx = any::<prop::sample::Index>();
    prop_oneof![
        4 => (0usize..64, prop::sample::select(ODD_NUMBERS)).prop_map(|(n, s)| TextMutation::Number(n, s)),
        2 => (0usize..16, prop::sample::select(ODD_NAMES)).prop_map(|(n, s)| TextMutation::Name(n, s)),
        2 => (0usize..16, 0usize..16).prop_map(|(n, m)| TextMutation::DuplicateName(n, m)),
        2 => (0usize..16, prop::sample::select(ODD_VALUES)).prop_map(|(n, s)| TextMutation::Value(n, s)),
        1 => (0usize..16, prop::sample::select(vec![1usize, 2, 64, 126, 127, 128, 129, 1000, 100_000]))
            .prop_map(|(n, d)| TextMutation::Deep(n, d)),
        1 => (prop::sample::select(vec![1usize, 127, 128, 129, 5000, 200_000]), any::<bool>())
            .prop_map(|(d, closed)| TextMutation::DeepDocument(d, closed)),
        2 => (idx.clone(), any::<u8>()).prop_map(|(i, b)| TextMutation::Flip(i.index(1 << 20), b)),
        1 => (idx.clone(), any::<u8>()).prop_map(|(i, b)| TextMutation::Insert(i.index(1 << 20), b)),
        1 => idx.clone().prop_map(|i| TextMutation::Delete(i.index(1 << 20))),
        1 => idx.prop_map(|i| TextMutation::Truncate(i.index(1 << 20))),
        1 => prop::sample::select(vec![&b"\xef\xbb\xbf"[..], b" \n\t", b"[", b"{}", b"\0"]).prop_map(TextMutation::Prefix),
        1 => prop::sample::select(vec![&b" \n"[..], b",", b"}", b"{}", b"\0", b"\xff"]).prop_map(TextMutation::Suffix),
    ]
}

/// An index as entries of `(name, value)` texts, so that text mutations can
/// aim at a name or a value.
fn pieces(entries: &[(String, TensorEntry)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    entries
        .iter()
        .map(|(name, e)| {
            let one = entry_json(name, e);
            let name = serde_json::to_string(name).unwrap().into_bytes();
            // `{"n": [...]}`: the value is after `"n": ` and before `}`.
            let value = one.as_bytes()[1 + name.len() + 2..one.len() - 1].to_vec();
            (name, value)
        })
        .collect()
}

/// Positions of number tokens (digits not inside a string) in `text`.
fn number_spans(text: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut in_string = false;
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        if in_string {
            if b == b'\\' {
                i += 1;
            } else if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        if b == b'"' {
            in_string = true;
            i += 1;
        } else if b.is_ascii_digit() {
            let start = i;
            while i < text.len() && text[i].is_ascii_digit() {
                i += 1;
            }
            spans.push((start, i));
        } else {
            i += 1;
        }
    }
    spans
}

fn apply(mut parts: Vec<(Vec<u8>, Vec<u8>)>, mutations: &[TextMutation]) -> Vec<u8> {
    let mut prefix = Vec::new();
    let mut suffix = Vec::new();
    let mut bytes_ops = Vec::new();
    let mut deep_doc = None;
    for m in mutations {
        let n_parts = parts.len();
        match m {
            TextMutation::Number(n, odd) => {
                // The n-th number over all values.
                let mut left = *n;
                for (_, value) in parts.iter_mut() {
                    let spans = number_spans(value);
                    if left < spans.len() {
                        let (s, e) = spans[left];
                        value.splice(s..e, odd.bytes());
                        break;
                    }
                    left -= spans.len();
                }
            }
            TextMutation::Name(n, odd) if n_parts > 0 => parts[n % n_parts].0 = odd.to_vec(),
            TextMutation::DuplicateName(n, m) if n_parts > 0 => {
                parts[n % n_parts].0 = parts[m % n_parts].0.clone();
            }
            TextMutation::Value(n, odd) if n_parts > 0 => {
                parts[n % n_parts].1 = odd.as_bytes().to_vec();
            }
            TextMutation::Deep(n, depth) if n_parts > 0 => {
                let mut v = vec![b'['; *depth];
                v.push(b'0');
                v.extend(std::iter::repeat_n(b']', *depth));
                parts[n % n_parts].1 = v;
            }
            TextMutation::DeepDocument(depth, closed) => deep_doc = Some((*depth, *closed)),
            TextMutation::Prefix(p) => prefix.extend_from_slice(p),
            TextMutation::Suffix(s) => suffix.extend_from_slice(s),
            other => bytes_ops.push(other.clone()),
        }
    }
    let mut doc = prefix;
    if let Some((depth, _)) = deep_doc {
        doc.extend(std::iter::repeat_n(b'[', depth));
    }
    doc.push(b'{');
    for (i, (name, value)) in parts.iter().enumerate() {
        if i > 0 {
            doc.extend_from_slice(b", ");
        }
        doc.extend_from_slice(name);
        doc.extend_from_slice(b": ");
        doc.extend_from_slice(value);
    }
    doc.push(b'}');
    if let Some((depth, true)) = deep_doc {
        doc.extend(std::iter::repeat_n(b']', depth));
    }
    doc.extend_from_slice(&suffix);
    for op in bytes_ops {
        match op {
            TextMutation::Flip(i, b) if !doc.is_empty() => {
                let i = i % doc.len();
                doc[i] ^= b.max(1);
            }
            TextMutation::Insert(i, b) => {
                let i = i % (doc.len() + 1);
                doc.insert(i, b);
            }
            TextMutation::Delete(i) if !doc.is_empty() => {
                let i = i % doc.len();
                doc.remove(i);
            }
            TextMutation::Truncate(i) => {
                let i = i % (doc.len() + 1);
                doc.truncate(i);
            }
            _ => {}
        }
    }
    doc
}

/// JSON-ish tokens, strung together at random.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    " ",
    "\"a\"",
    "\"torch.float16\"",
    "\"\\u0041\"",
    "0",
    "8",
    "-1",
    "1.5",
    "18446744073709551616",
    "null",
    "true",
];

fn document() -> impl Strategy<Value = Doc> {
    let mutated = (
        prop::collection::vec(spec(), 0..8),
        prop::collection::vec(text_mutation(), 0..4),
    )
        .prop_map(|(specs, mutations)| {
            let (entries, _) = lay_out(&specs, 0);
            Doc(apply(pieces(&entries), &mutations))
        });
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(Doc),
        2 => prop::collection::vec(prop::sample::select(TOKENS), 0..48)
            .prop_map(|t| Doc(t.concat().into_bytes())),
        7 => mutated,
    ]
}

// ---------------------------------------------------------------------------
// The oracle of the parser: what the module's docs promise, decided with
// serde_json's generic value and a list of the object's keys.

fn as_u64(v: &serde_json::Value) -> Option<u64> {
    v.as_u64()
}

fn as_u64_list(v: &serde_json::Value) -> Option<Vec<u64>> {
    v.as_array()?.iter().map(as_u64).collect()
}

/// The entries `bytes` must parse to, or `None` when it must be refused.
fn expected_index(bytes: &[u8]) -> Option<Vec<(String, TensorEntry)>> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let object = value.as_object()?;
    let keys = json_keys::object_keys(bytes)?;
    if json_keys::repeats(&keys) {
        return None;
    }
    keys.into_iter()
        .map(|k| {
            let a = object.get(&k)?.as_array()?;
            if a.len() != 5 {
                return None;
            }
            let entry = TensorEntry {
                offset: as_u64(&a[0])?,
                size: as_u64(&a[1])?,
                shape: as_u64_list(&a[2])?,
                stride: as_u64_list(&a[3])?,
                dtype: a[4].as_str()?.to_owned(),
            };
            Some((k, entry))
        })
        .collect()
}

fn check_parser(
    doc: &Doc,
    dir: Option<&std::path::Path>,
    tally: &Tally,
) -> Result<(), TestCaseError> {
    let bytes = &doc.0;
    let (parsed, usage) = measure(|| TensorIndex::from_json(bytes));
    check_allocation(usage, bytes.len())?;
    tally.note(if parsed.is_ok() {
        "accepted"
    } else {
        "refused"
    });
    let expected = expected_index(bytes);
    match (&parsed, &expected) {
        (Ok(index), Some(entries)) => {
            let got: Vec<(String, TensorEntry)> = index
                .iter()
                .map(|(n, e)| (n.to_owned(), e.clone()))
                .collect();
            prop_assert_eq!(&got, entries, "entries, in file order");
            let again = TensorIndex::from_json(index.to_json().as_bytes());
            prop_assert!(
                again.as_ref().ok() == Some(index),
                "to_json does not read back: {:?}",
                again
            );
        }
        (Err(_), None) => {}
        (Ok(index), None) => {
            return Err(TestCaseError::fail(format!(
                "accepted an index the format refuses: {} entries",
                index.len()
            )));
        }
        (Err(e), Some(_)) => {
            return Err(TestCaseError::fail(format!("refused a valid index: {e}")));
        }
    }
    if let Some(dir) = dir {
        std::fs::write(dir.join(sllm_format::INDEX_FILE), bytes).unwrap();
        let (read, usage) = measure(|| TensorIndex::read(dir));
        check_allocation(usage, bytes.len())?;
        prop_assert_eq!(read.is_ok(), parsed.is_ok(), "read and from_json disagree");
        if let (Ok(read), Ok(parsed)) = (read, parsed) {
            prop_assert_eq!(read, parsed);
        }
    }
    Ok(())
}

fn parser_target(tier: Tier, name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let strategy = (document(), prop::bool::weighted(0.25));
    let tally = Tally::default();
    run(name, tier, strategy, |(doc, via_file)| {
        check_parser(&doc, via_file.then_some(tmp.path()), &tally)
    });
    tally.print(name);
}

#[test]
fn index_parser_smoke() {
    parser_target(Tier::smoke(64), "index_parser (smoke)");
}

#[test]
#[ignore = "slow tier (fuzz, time-boxed): cargo test -- --include-ignored"]
fn index_parser_fuzz() {
    parser_target(Tier::slow(200_000, 30), "index_parser");
}

// ---------------------------------------------------------------------------
// Placement: what `verify` passes lies inside the partitions, without
// overlaps.

/// One change to a valid layout's values.
#[derive(Clone, Debug)]
enum Change {
    Offset(usize, Target),
    Size(usize, Target),
    ShapeDim(usize, usize, u64),
    StrideDim(usize, usize, u64),
    DropStride(usize),
    PushShape(usize, u64),
    Dtype(usize, &'static str),
    /// Another name for entry `n`'s record, with `size`.
    Alias(usize, Target),
    Remove(usize),
}

/// Where a changed offset or size points.
#[derive(Clone, Copy, Debug)]
enum Target {
    Value(u64),
    /// The total size of the partitions, plus a delta.
    End(i64),
    /// Another entry's offset plus a delta.
    Other(usize, i64),
    /// This value's current value plus a delta.
    Delta(i64),
    Max(u64),
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        (0u64..5000).prop_map(Target::Value),
        (-8i64..8).prop_map(Target::End),
        (0usize..16, -8i64..8).prop_map(|(n, d)| Target::Other(n, d)),
        (-16i64..16).prop_map(Target::Delta),
        (0u64..4).prop_map(Target::Max),
    ]
}

fn change() -> impl Strategy<Value = Change> {
    let dtypes: Vec<&'static str> = TorchDtype::ALL
        .iter()
        .map(|d| d.name())
        .chain(["torch.complex64", "float16", "", "torch.float16 "])
        .collect();
    prop_oneof![
        3 => (0usize..16, target()).prop_map(|(n, t)| Change::Offset(n, t)),
        3 => (0usize..16, target()).prop_map(|(n, t)| Change::Size(n, t)),
        2 => (0usize..16, 0usize..4, prop_oneof![0u64..8, Just(u64::MAX), Just(1u64 << 32)])
            .prop_map(|(n, d, v)| Change::ShapeDim(n, d, v)),
        2 => (0usize..16, 0usize..4, prop_oneof![0u64..64, Just(u64::MAX), Just(1u64 << 62)])
            .prop_map(|(n, d, v)| Change::StrideDim(n, d, v)),
        1 => (0usize..16).prop_map(Change::DropStride),
        1 => (0usize..16, 0u64..4).prop_map(|(n, v)| Change::PushShape(n, v)),
        1 => (0usize..16, prop::sample::select(dtypes)).prop_map(|(n, d)| Change::Dtype(n, d)),
        2 => (0usize..16, target()).prop_map(|(n, t)| Change::Alias(n, t)),
        1 => (0usize..16).prop_map(Change::Remove),
    ]
}

fn resolve(t: Target, current: u64, total: u64, entries: &[(String, TensorEntry)]) -> u64 {
    let add = |base: u64, d: i64| base.saturating_add_signed(d);
    match t {
        Target::Value(v) => v,
        Target::End(d) => add(total, d),
        Target::Other(n, d) if !entries.is_empty() => add(entries[n % entries.len()].1.offset, d),
        Target::Other(_, d) | Target::Delta(d) => add(current, d),
        Target::Max(k) => u64::MAX - k,
    }
}

fn change_layout(entries: &mut Vec<(String, TensorEntry)>, total: u64, changes: &[Change]) {
    for (k, c) in changes.iter().enumerate() {
        if entries.is_empty() {
            return;
        }
        let len = entries.len();
        let snapshot = entries.clone();
        match c {
            Change::Offset(n, t) => {
                let e = &mut entries[n % len].1;
                e.offset = resolve(*t, e.offset, total, &snapshot);
            }
            Change::Size(n, t) => {
                let e = &mut entries[n % len].1;
                e.size = resolve(*t, e.size, total, &snapshot);
            }
            Change::ShapeDim(n, d, v) => {
                let e = &mut entries[n % len].1;
                if !e.shape.is_empty() {
                    let d = d % e.shape.len();
                    e.shape[d] = *v;
                }
            }
            Change::StrideDim(n, d, v) => {
                let e = &mut entries[n % len].1;
                if !e.stride.is_empty() {
                    let d = d % e.stride.len();
                    e.stride[d] = *v;
                }
            }
            Change::DropStride(n) => {
                entries[n % len].1.stride.pop();
            }
            Change::PushShape(n, v) => entries[n % len].1.shape.push(*v),
            Change::Dtype(n, d) => entries[n % len].1.dtype = (*d).to_owned(),
            Change::Alias(n, t) => {
                let mut e = entries[n % len].1.clone();
                e.size = resolve(*t, e.size, total, &snapshot);
                entries.push((format!("changed.alias.{k}"), e));
            }
            Change::Remove(n) => {
                entries.remove(n % len);
            }
        }
    }
}

/// Why an index that `verify` passed breaks the format's promises, checked
/// with 128-bit arithmetic independent of the crate's.
fn placement_problem(index: &TensorIndex, total: u64) -> Option<String> {
    let mut records: Vec<(u128, u128, &str)> = Vec::new();
    for (name, e) in index.iter() {
        let Some(dtype) = e.dtype() else {
            return Some(format!("{name}: unknown dtype {:?}", e.dtype));
        };
        if e.shape.len() != e.stride.len() {
            return Some(format!("{name}: shape and stride lengths differ"));
        }
        let (offset, size) = (u128::from(e.offset), u128::from(e.size));
        if offset + size > u128::from(total) {
            return Some(format!(
                "{name}: [{offset}, {}) past the partitions' {total} bytes",
                offset + size
            ));
        }
        // One past the last byte the view addresses.
        let span = if e.shape.contains(&0) {
            Some(0)
        } else {
            e.shape
                .iter()
                .zip(&e.stride)
                .try_fold(0u128, |last, (&d, &s)| {
                    last.checked_add(u128::from(d - 1).checked_mul(u128::from(s))?)
                })
                .and_then(|last| (last + 1).checked_mul(u128::from(dtype.size_bytes())))
        };
        let Some(span) = span else {
            return Some(format!("{name}: the view's extent overflows 128 bits"));
        };
        if span > size {
            return Some(format!(
                "{name}: the view reaches {span} bytes, past its record of {size}"
            ));
        }
        if size > 0 {
            records.push((offset, offset + size, name));
        }
    }
    for (i, a) in records.iter().enumerate() {
        for b in &records[i + 1..] {
            if a.0 != b.0 && a.0 < b.1 && b.0 < a.1 {
                return Some(format!(
                    "{} [{}, {}) and {} [{}, {}) overlap",
                    a.2, a.0, a.1, b.2, b.0, b.1
                ));
            }
        }
    }
    None
}

#[derive(Clone, Debug)]
struct Placement {
    specs: Vec<Spec>,
    tail: u64,
    /// Split the bytes into two partitions at this fraction (per mille).
    split: Option<u16>,
    changes: Vec<Change>,
}

fn placement() -> impl Strategy<Value = Placement> {
    (
        prop::collection::vec(spec(), 0..10),
        prop_oneof![3 => Just(0u64), 1 => 0u64..300],
        prop::option::of(0u16..=1000),
        prop::collection::vec(change(), 0..4),
    )
        .prop_map(|(specs, tail, split, changes)| Placement {
            specs,
            tail,
            split,
            changes,
        })
}

fn check_placement(
    p: &Placement,
    dir: &std::path::Path,
    tally: &Tally,
) -> Result<(), TestCaseError> {
    let (mut entries, total) = lay_out(&p.specs, p.tail);
    change_layout(&mut entries, total, &p.changes);
    for entry in std::fs::read_dir(dir).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let first = p.split.map_or(total, |s| total * u64::from(s) / 1000);
    let data0 = std::fs::File::create(dir.join("tensor.data_0")).unwrap();
    data0.set_len(first).unwrap();
    if first < total {
        let data1 = std::fs::File::create(dir.join("tensor.data_1")).unwrap();
        data1.set_len(total - first).unwrap();
    }
    let text = render(&entries);
    std::fs::write(dir.join(sllm_format::INDEX_FILE), &text).unwrap();
    let (report, usage) = measure(|| verify_model_to(dir, Depth::Structure, &()));
    check_allocation(usage, text.len())?;
    let report = report.unwrap();
    tally.note(if report.is_ok() { "passed" } else { "refused" });
    let index = TensorIndex::from_json(text.as_bytes());
    let names_unique = {
        let mut names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names.len() == entries.len()
    };
    prop_assert!(
        index.is_ok() || !names_unique,
        "a rendered index does not parse"
    );
    if report.is_ok() {
        let index = index.unwrap();
        if let Some(problem) = placement_problem(&index, total) {
            return Err(TestCaseError::fail(format!(
                "verify passed an index that breaks the format: {problem}"
            )));
        }
    }
    if p.changes.is_empty() {
        prop_assert!(
            report.is_ok(),
            "verify refused a valid layout: {:?}",
            report.problems
        );
    }
    Ok(())
}

fn placement_target(tier: Tier, name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let tally = Tally::default();
    run(name, tier, placement(), |p| {
        check_placement(&p, tmp.path(), &tally)
    });
    tally.print(name);
}

#[test]
fn index_placement_smoke() {
    placement_target(Tier::smoke(48), "index_placement (smoke)");
}

#[test]
#[ignore = "slow tier (fuzz, time-boxed): cargo test -- --include-ignored"]
fn index_placement_fuzz() {
    placement_target(Tier::slow(100_000, 20), "index_placement");
}

// ---------------------------------------------------------------------------
// The harness itself.

/// The allocation check would see a parser that believed a claimed length:
/// a 64 MiB buffer for 100 bytes of input fails it, the input's own size
/// does not.
#[test]
fn the_allocation_check_sees_an_allocation_a_claim_would_cause() {
    let (buffer, usage) = measure(|| vec![0u8; 64 << 20]);
    drop(buffer);
    assert!(usage.peak_bytes >= 64 << 20, "{usage:?}");
    assert!(check_allocation(usage, 100).is_err());
    let (index, usage) =
        measure(|| TensorIndex::from_json(br#"{"a": [0, 8, [2], [1], "torch.float32"]}"#));
    assert!(index.is_ok());
    assert!(check_allocation(usage, 40).is_ok(), "{usage:?}");
}
