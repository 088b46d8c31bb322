//! The running services: the store daemon (gRPC health and its settings)
//! and vLLM's OpenAI server (`GET /v1/models`).

use sllm_proto::BackendKind;
use std::time::Duration;

use sllm_client::StoreClient;

use super::Check;
use crate::units::human_bytes;

/// How long each service gets to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Is the daemon at `addr` up and serving, and with which settings? An
/// unreachable daemon is a STOP when the user `named` the address, else a
/// WARN (the doctor is also run before the daemon is started).
pub fn daemon(addr: &str, named: bool) -> Check {
    let name = "daemon";
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return Check::warn(name, format!("cannot start an async runtime: {e}"), "retry");
        }
    };
    let asked = runtime.block_on(async {
        tokio::time::timeout(ANSWER_WITHIN, async {
            let mut client = StoreClient::connect(addr).await?;
            // The health service answers without the token a daemon may
            // require; the settings need it.
            let serving = client.serving().await?;
            let config = match client.server_config().await {
                Err(e) if e.code() == Some(tonic::Code::Unauthenticated) => Err(e),
                other => Ok(other?),
            };
            Ok::<_, sllm_client::ClientError>((serving, config))
        })
        .await
    });
    let (serving, config) = match asked {
        Ok(Ok((serving, Ok(config)))) => (serving, config),
        Ok(Ok((serving, Err(e)))) => {
            let summary = format!(
                "the daemon at {addr} {}, and requires a token for everything else: {e}",
                if serving {
                    "serves"
                } else {
                    "reports NOT_SERVING (shutting down)"
                }
            );
            let fix = "set SLLM_STORE_TOKEN (or SLLM_STORE_TOKEN_FILE) to the daemon's token";
            return if serving {
                Check::warn(name, summary, fix)
            } else {
                Check::stop(name, summary, fix)
            };
        }
        Ok(Err(e)) => {
            let reason = match e {
                sllm_client::ClientError::Connect { reason, .. } => reason,
                other => other.to_string(),
            };
            let summary = format!("no daemon answers at {addr}: {reason}");
            let fix = "start it beside vLLM (`sllm-store start --storage-path <dir>`), or pass \
                       --server <addr> where it listens";
            return if named {
                Check::stop(name, summary, fix)
            } else {
                Check::warn(name, summary, fix)
            };
        }
        Err(_) => {
            return Check::stop(
                name,
                format!("the daemon at {addr} did not connect and answer within {ANSWER_WITHIN:?}"),
                "check its log; a daemon stopped with SIGSTOP or overloaded past this limit needs a restart",
            );
        }
    };
    if !serving {
        return Check::stop(
            name,
            format!("the daemon at {addr} reports NOT_SERVING: it is shutting down"),
            "wait for it to exit and start it again",
        );
    }
    let summary = format!(
        "daemon {} at {addr} serving: {} backend ({} device(s)), {} engine, pool {} in {} chunks",
        config.version,
        config.device_backend,
        config.device_uuids.len(),
        config.io_engine,
        human_bytes(config.mem_pool_size),
        human_bytes(config.chunk_size)
    );
    if config.device_backend == BackendKind::Host {
        return Check::warn(
            name,
            format!("{summary}; the host backend copies into shared-memory files, not GPUs"),
            "for vLLM, run the daemon on the GPU host with --device cuda (host is for tests)",
        );
    }
    if config.io_engine != "io_uring" {
        return Check::warn(
            name,
            format!("{summary}; not reading with io_uring"),
            "see the system.io_uring check for why; cold loads are slower without it",
        );
    }
    Check::pass(name, summary)
}

/// An HTTP client for a local server (vLLM's OpenAI API): every request
/// gives up after `timeout`, HTTP errors come back as responses, and proxy
/// settings are ignored (an `HTTP_PROXY` meant for the internet must not
/// reroute a request to loopback).
pub fn local_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .proxy(None)
        .build()
        .into()
}

/// vLLM's base URL from what a user gives: a scheme added when missing
/// (http), and a trailing `/` or `/v1` (the OpenAI clients' base URL)
/// taken off, so that `<base>/v1/models` is the models endpoint.
pub fn vllm_base(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    let url = url.strip_suffix("/v1").unwrap_or(url).trim_end_matches('/');
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

/// Does vLLM answer `GET <url>/v1/models`, and does it serve `model`?
pub fn vllm(url: &str, model: Option<&str>) -> Check {
    let name = "vllm";
    let base = vllm_base(url);
    let endpoint = format!("{base}/v1/models");
    let agent = local_agent(ANSWER_WITHIN);
    let mut response = match agent.get(&endpoint).call() {
        Ok(r) => r,
        // Something answered, but not in HTTP/1.1: a gRPC server (the
        // store daemon's port, say) or another protocol.
        Err(e @ ureq::Error::Protocol(_)) => {
            return Check::stop(
                name,
                format!(
                    "something answers at {endpoint}, but not as an HTTP server ({e}): not \
                     vLLM's OpenAI server (the store daemon's gRPC port answers this way)"
                ),
                "point --vllm-url at vLLM's port (vllm serve --port, 8000 by default)",
            );
        }
        Err(e) => {
            return Check::stop(
                name,
                format!("nothing answers at {endpoint}: {e}"),
                "start vLLM (its OpenAI server), or fix --vllm-url (scheme, host and port)",
            );
        }
    };
    let status = response.status().as_u16();
    if status == 401 || status == 403 {
        return Check::stop(
            name,
            format!("{endpoint} answered HTTP {status}: vLLM was started with --api-key"),
            "the doctor sends no key: check this endpoint with curl -H 'Authorization: Bearer \
             <key>', or run vLLM without --api-key on a private network",
        );
    }
    if status != 200 {
        return Check::stop(
            name,
            format!("{endpoint} answered HTTP {status}"),
            "vLLM answers 200 once the model is loaded: wait, or check that this URL is vLLM's \
             OpenAI server",
        );
    }
    let ids: Vec<String> = response
        .body_mut()
        .read_json::<serde_json::Value>()
        .ok()
        .and_then(|v| {
            v["data"].as_array().map(|models| {
                models
                    .iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default();
    if ids.is_empty() {
        return Check::stop(
            name,
            format!("{endpoint} answered 200 but lists no model (no data[].id)"),
            "check that this URL is vLLM's OpenAI server",
        );
    }
    let summary = format!("vLLM at {url} serves {}", ids.join(", "));
    match model {
        Some(m)
            if !ids
                .iter()
                .any(|id| id == m || id.ends_with(&format!("/{m}"))) =>
        {
            Check::warn(
                name,
                format!("{summary}, not {m}"),
                "check which model this vLLM was started with (or its --served-model-name)",
            )
        }
        _ => Check::pass(name, summary),
    }
}

#[cfg(test)]
mod tests {
    use super::vllm_base;

    #[test]
    fn the_vllm_url_may_end_in_v1_or_lack_a_scheme() {
        for url in [
            "http://127.0.0.1:8000",
            "http://127.0.0.1:8000/",
            "http://127.0.0.1:8000/v1",
            "http://127.0.0.1:8000/v1/",
            "127.0.0.1:8000/v1",
        ] {
            assert_eq!(vllm_base(url), "http://127.0.0.1:8000", "{url}");
        }
        assert_eq!(vllm_base("https://host/api/v1"), "https://host/api");
    }
}
