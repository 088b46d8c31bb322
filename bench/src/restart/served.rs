//! Which model a side serves. A vLLM serves what `GET /v1/models` lists:
//! the `--served-model-name`, else the model argument as given, so
//! `vllm serve org/name` lists `org/name` and `vllm serve
//! /storage/org/name` lists the path. The ids are read as the model they
//! name before the two sides are compared:
//!
//! - a path under the storage path is the model id below it
//!   (`/storage/org/name` is `org/name`);
//! - a snapshot in a Hugging Face cache is its repo
//!   (`.../models--org--name/snapshots/<commit>` is `org/name`);
//! - with `--model org/name`, a path that ends in `org/name` is that model.
//!
//! Anything else is compared as listed. Two sides that serve different
//! models are refused: their times do not compare, whatever the speed-up
//! says.

use super::*;

/// What one side serves, as the benchmark reads it (in the results, each
/// run's `model_id` and `served_as`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(super) struct Served {
    /// The id as `/v1/models` lists it; the first completion asks for it.
    #[serde(rename = "model_id")]
    pub(super) listed: String,
    /// The model it names (see the module docs): a path under the storage
    /// path is read as the model below it.
    #[serde(rename = "served_as")]
    pub(super) model: String,
}

impl Served {
    /// `org/name`, or `/storage/org/name (read as org/name)`.
    pub(super) fn describe(&self) -> String {
        if self.listed == self.model {
            format!("`{}`", self.listed)
        } else {
            format!("`{}` (read as `{}`)", self.listed, self.model)
        }
    }
}

/// The model `id` names: see the module docs.
pub(super) fn read_as(id: &str, storage_path: &Path, model: Option<&str>) -> String {
    let trimmed = if id.len() > 1 {
        id.trim_end_matches('/')
    } else {
        id
    };
    let path = Path::new(trimmed);
    if path.is_absolute() {
        let canonical = std::fs::canonicalize(storage_path).ok();
        for root in std::iter::once(storage_path).chain(canonical.as_deref()) {
            if let Ok(rest) = path.strip_prefix(root)
                && !rest.as_os_str().is_empty()
            {
                return rest.to_string_lossy().into_owned();
            }
        }
        if let Some((_, repo, _)) = sllm_doctor::hf::parse_snapshot_path(path) {
            return repo;
        }
    }
    match model {
        Some(m) if trimmed != m && trimmed.contains('/') && path.ends_with(m) => m.to_owned(),
        _ => trimmed.to_owned(),
    }
}

/// The ids of a `/v1/models` answer (`data[].id`), in its order.
pub(super) fn model_ids(models: &serde_json::Value) -> Vec<String> {
    models["data"]
        .as_array()
        .map(|data| {
            data.iter()
                .filter_map(|m| m.get("id")?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// What `side` serves, from the ids it `listed`, checked against `--model`
/// when given and else against what the other side served first
/// (`reference`). Err: why the two cannot be compared, with the fix.
pub(super) fn check_served(
    side: Side,
    listed: &[String],
    storage_path: &Path,
    model: Option<&str>,
    reference: Option<&(Side, Served)>,
) -> Result<Served, String> {
    let served: Vec<Served> = listed
        .iter()
        .map(|id| Served {
            listed: id.clone(),
            model: read_as(id, storage_path, model),
        })
        .collect();
    let describe = || {
        served
            .iter()
            .map(Served::describe)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let fix = "name the model the same on both sides: `vllm serve <path> ... \
               --served-model-name <org/name>` (a path under --storage-path, or in a Hugging \
               Face cache, is read as the model it holds)";
    if served.is_empty() {
        return Err(format!(
            "the {} lists no model (no data[].id in GET /v1/models), so it cannot be checked \
             that both sides serve the same model; start it with --served-model-name <org/name>",
            side.label()
        ));
    }
    if let Some(m) = model {
        return served
            .iter()
            .find(|s| s.model == m)
            .cloned()
            .ok_or_else(|| {
                format!(
                    "the {} serves {}, not --model `{m}` (as GET /v1/models lists it): a start of \
                 another model would be timed. Fix the command, or if it is that model under \
                 another name, {fix}",
                    side.label(),
                    describe()
                )
            });
    }
    match reference {
        None => Ok(served[0].clone()),
        Some((other, first)) => served
            .iter()
            .find(|s| s.model == first.model)
            .cloned()
            .ok_or_else(|| {
                format!(
                    "the {} serves {} but the {} serves {} (as GET /v1/models lists them): the \
                     two commands start different models, so their times do not compare. Start \
                     the same model on both sides, and {fix}",
                    other.label(),
                    first.describe(),
                    side.label(),
                    describe()
                )
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_read_as_the_model_they_hold() {
        let storage = Path::new("/mnt/nvme/models");
        let read = |id: &str, model: Option<&str>| read_as(id, storage, model);
        assert_eq!(read("org/name", None), "org/name");
        assert_eq!(read("/mnt/nvme/models/org/name", None), "org/name");
        assert_eq!(read("/mnt/nvme/models/org/name/", None), "org/name");
        assert_eq!(
            read(
                "/root/.cache/huggingface/hub/models--org--na-me/snapshots/0123456789abcdef0123456789abcdef01234567",
                None
            ),
            "org/na-me"
        );
        assert_eq!(read("/src/org/name", Some("org/name")), "org/name");
        assert_eq!(read("/src/org/name", None), "/src/org/name");
        assert_eq!(read("/src/xorg/name", Some("org/name")), "/src/xorg/name");
        assert_eq!(read("other/model", Some("org/name")), "other/model");
        assert_eq!(read("/mnt/nvme/models", None), "/mnt/nvme/models");
    }

    #[test]
    fn a_canonical_storage_path_counts_too() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let id = format!("{}/org/name", real.display());
        assert_eq!(read_as(&id, &link, None), "org/name");
    }

    #[test]
    fn different_models_are_refused_with_the_fix() {
        let storage = Path::new("/st");
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let base = check_served(Side::Baseline, &ids(&["org/name"]), storage, None, None).unwrap();
        let reference = (Side::Baseline, base);
        let fast = check_served(
            Side::Faststart,
            &ids(&["/st/org/name"]),
            storage,
            None,
            Some(&reference),
        )
        .unwrap();
        assert_eq!(fast.listed, "/st/org/name");
        assert_eq!(fast.model, "org/name");
        let e = check_served(
            Side::Faststart,
            &ids(&["/st/acme/tiny"]),
            storage,
            None,
            Some(&reference),
        )
        .unwrap_err();
        assert!(e.contains("`/st/acme/tiny` (read as `acme/tiny`)"), "{e}");
        assert!(e.contains("--served-model-name"), "{e}");
        let e = check_served(
            Side::Baseline,
            &ids(&["other/model"]),
            storage,
            Some("org/name"),
            None,
        )
        .unwrap_err();
        assert!(e.contains("not --model `org/name`"), "{e}");
        assert!(check_served(Side::Baseline, &[], storage, None, None).is_err());
    }

    #[test]
    fn ids_are_read_from_v1_models() {
        let v = serde_json::json!({"object": "list", "data": [{"id": "a/b"}, {"id": "c/d"}]});
        assert_eq!(model_ids(&v), ["a/b", "c/d"]);
        assert!(model_ids(&serde_json::json!({"data": []})).is_empty());
        assert!(model_ids(&serde_json::json!({"detail": "x"})).is_empty());
    }
}
