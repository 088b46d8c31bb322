//! The oracle's view of a JSON object's keys, shared by the fuzz files of
//! the index and the safetensors header (each includes this file:
//! `#[path = ...] mod json_keys;`): serde_json's generic value keeps the
//! last of two equal keys, so the keys are listed with a visitor of their
//! own.

use std::fmt;

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

/// The keys of a JSON object in order, duplicates kept.
struct Keys(Vec<String>);

impl<'de> serde::Deserialize<'de> for Keys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Keys;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    map.next_value::<IgnoredAny>()?;
                    keys.push(k);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(V)
    }
}

/// The keys of the JSON object `json`, in order, duplicates kept; `None`
/// when `json` is not an object.
pub fn object_keys(json: &[u8]) -> Option<Vec<String>> {
    serde_json::from_slice::<Keys>(json).ok().map(|k| k.0)
}

/// Whether some key stands twice in `keys`.
pub fn repeats(keys: &[String]) -> bool {
    let mut unique = keys.to_vec();
    unique.sort();
    unique.dedup();
    unique.len() != keys.len()
}
