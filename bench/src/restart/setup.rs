//! Before the runs: the offline checks, the daemon's pool emptied, the files
//! whose caches are dropped, and the environment the commands see.

use super::*;

/// Runs the doctor's offline checks and prints them; refuses on any STOP
/// (among them a stale conversion, `model.source`: offline, the baseline
/// would load the snapshot the ref points at and the fast start a copy
/// converted from another commit, two different models).
pub(super) fn offline_checks(
    storage_path: &Path,
    model: &str,
    revision: &str,
) -> anyhow::Result<Vec<Check>> {
    let checks = doctor::offline_readiness(&HfEnv::from_env(), storage_path, model, revision);
    for c in &checks {
        eprintln!("{} {}: {}", c.status.label(), c.name, c.summary);
        if let Some(fix) = &c.fix {
            eprintln!("  fix: {fix}");
        }
    }
    let stops = checks.iter().filter(|c| c.status == Status::Stop).count();
    ensure!(
        stops == 0,
        "{stops} offline check(s) of {model} say STOP (above): with HF_HUB_OFFLINE=1 a command \
         would fail to start, or load something else than measured. Fix them, or run without \
         --offline"
    );
    Ok(checks)
}

/// Empties the daemon's pool, so that the next fast start is cold.
pub(super) fn clear_pool(addr: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for the daemon client")?;
    // Bounded: a stopped or wedged daemon must not hang the benchmark.
    let limit = Duration::from_secs(30);
    runtime
        .block_on(async {
            // Created inside the runtime: a timer needs its context.
            tokio::time::timeout(limit, async {
                let mut client = sllm_client::StoreClient::connect(addr).await?;
                client.clear().await
            })
            .await
        })
        .map_err(|_| {
            anyhow::anyhow!(
                "the daemon at {addr} did not empty its pool within {} s: check that it runs \
                 (not stopped, not wedged), or leave --server out",
                limit.as_secs()
            )
        })??;
    Ok(())
}

/// The files of `model` that a start reads: its Hugging Face snapshot and
/// its converted copy under the storage path.
pub(super) fn model_files(storage_path: &Path, model: &str, revision: &str) -> Vec<PathBuf> {
    let mut files = match HfCache::from_env().resolve(model, revision) {
        Ok(snapshot) => files_under(&snapshot.dir),
        Err(e) => {
            tracing::warn!(
                "--drop-caches: the Hugging Face snapshot of {model} was not found, so without \
                 root only its converted copy is dropped from the page cache ({e})"
            );
            Vec::new()
        }
    };
    files.extend(files_under(&storage_path.join(model)));
    files
}

/// The recorded variables as sllm-bench passes them to the commands
/// (a command's own `NAME=value` prefix is not included); secrets masked.
pub(super) fn command_env(offline: bool) -> BTreeMap<&'static str, Option<String>> {
    RECORDED_ENV
        .iter()
        .map(|&name| {
            let set = OFFLINE_ENV
                .iter()
                .find(|(n, _)| offline && *n == name)
                .map(|(_, v)| (*v).to_owned());
            let value = set.or_else(|| std::env::var(name).ok());
            let value = value.map(|v| {
                if is_secret_var(name) {
                    MASKED.to_owned()
                } else {
                    v
                }
            });
            (name, value)
        })
        .collect()
}

pub(super) fn describe_caches(bench: &Bench) -> String {
    let model = bench.args.model.as_deref();
    let mut out = match (bench.drop_method, model) {
        (None, _) if !bench.args.drop_caches => {
            "page cache not dropped (pass --drop-caches for cold starts)".to_owned()
        }
        (None, _) => "page cache: nothing started, nothing dropped".to_owned(),
        (Some("drop_caches"), _) => {
            "the whole page cache dropped before every start (/proc/sys/vm/drop_caches, as root)"
                .to_owned()
        }
        (Some(_), None) => "page cache NOT dropped: only root can drop the whole cache, and \
                            without --model no files are known to drop with fadvise(DONTNEED)"
            .to_owned(),
        (Some(_), Some(model)) if bench.cache_files.is_empty() => format!(
            "page cache NOT dropped: only root can drop the whole cache, and no files of {model} \
             were found in the Hugging Face cache or the storage path"
        ),
        (Some(method), Some(model)) => format!(
            "{method} on the {} files of {model} (Hugging Face snapshot and converted copy) \
             before every start; other files (Python, libraries, compile caches) stay cached, \
             as only root can drop the whole cache",
            bench.cache_files.len()
        ),
    };
    if let Some(addr) = &bench.args.server {
        out += &format!("; the pool of the daemon at {addr} emptied before every fast start");
    }
    out
}
