//! Model ids (`meta-llama/Llama-3.1-8B-Instruct`, `org/model/rank_0`): the
//! relative path of a model under the storage path, checked so that it can
//! never name anything outside it.

use std::fmt;
use std::path::{Path, PathBuf};

/// Longest model id accepted, in bytes.
pub const MAX_MODEL_ID_BYTES: usize = 1024;
/// Longest path component accepted (the Linux `NAME_MAX`).
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Bytes of a refused id that its error repeats.
const SHOWN_ID_BYTES: usize = 200;

/// A relative model path that stays inside the storage path: `/`-separated,
/// no empty, `.` or `..` components, no hidden components (the store keeps its
/// own bookkeeping under names starting with `.`), no backslashes or NULs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelId(String);

/// Why a string is not a model id.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid model id {id:?}: {reason}; use a relative id such as `org/name` \
     (letters, digits, `-`, `_`, `.` inside names; no `..`, no leading `/`)"
)]
pub struct ModelIdError {
    id: String,
    reason: String,
}

impl ModelId {
    /// Validates `id`.
    pub fn parse(id: &str) -> Result<Self, ModelIdError> {
        let err = |reason: String| ModelIdError {
            id: crate::elide(id, SHOWN_ID_BYTES).into_owned(),
            reason,
        };
        if id.is_empty() {
            return Err(err("it is empty".into()));
        }
        if id.len() > MAX_MODEL_ID_BYTES {
            return Err(err(format!("it is longer than {MAX_MODEL_ID_BYTES} bytes")));
        }
        if id.starts_with('/') {
            return Err(err("it is an absolute path".into()));
        }
        if let Some(bad) = id
            .chars()
            .find(|c| matches!(c, '\\' | '\0') || c.is_control())
        {
            return Err(err(format!("it contains the character {bad:?}")));
        }
        for component in id.split('/') {
            match component {
                "" => return Err(err("it has an empty path component".into())),
                "." | ".." => {
                    return Err(err(format!("it has a `{component}` component")));
                }
                c if c.starts_with('.') => {
                    return Err(err(format!("component {c:?} starts with `.`")));
                }
                c if c.len() > MAX_COMPONENT_BYTES => {
                    return Err(err(format!(
                        "a component is longer than {MAX_COMPONENT_BYTES} bytes"
                    )));
                }
                _ => {}
            }
        }
        Ok(Self(id.to_owned()))
    }

    /// The id as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The model's directory under `storage_root`.
    pub fn dir_in(&self, storage_root: &Path) -> PathBuf {
        storage_root.join(&self.0)
    }

    /// The id with `/` replaced, usable as one file name.
    pub fn flat_name(&self) -> String {
        self.0.replace('/', "--")
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hub_ids_and_rank_dirs() {
        for ok in [
            "gpt2",
            "meta-llama/Llama-3.1-8B-Instruct",
            "facebook/opt-1.3b/rank_0",
            "Qwen/Qwen2.5-0.5B",
        ] {
            assert_eq!(ModelId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_escapes_and_oddities() {
        for bad in [
            "",
            "/etc",
            "../x",
            "a/../../b",
            "a//b",
            "a/",
            "./a",
            "a/.",
            ".sllm-staging/x",
            "a\\b",
            "a\0b",
            "a\nb",
        ] {
            let err = ModelId::parse(bad).unwrap_err().to_string();
            assert!(err.contains("invalid model id"), "{bad:?}: {err}");
        }
        assert!(ModelId::parse(&"a".repeat(300)).is_err());
        assert!(ModelId::parse(&"a/".repeat(600)).is_err());
    }

    #[test]
    fn joins_under_the_root() {
        let id = ModelId::parse("org/name").unwrap();
        assert_eq!(
            id.dir_in(Path::new("/models")),
            Path::new("/models/org/name")
        );
        assert_eq!(id.flat_name(), "org--name");
    }
}
