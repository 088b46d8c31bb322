//! Talking to the server under test: `/v1/models`, the first completion,
//! whether the port is taken, and how a crash is described.

use super::*;

pub(super) fn crash(status: ExitStatus, started: Instant) -> (FailureKind, String) {
    let hint = if status.success() {
        ": the command must keep the server in the foreground (no `&`, no daemon mode)"
    } else {
        ""
    };
    (
        FailureKind::Crash,
        format!(
            "the command exited ({status}) {:.1} s after its start, before it was ready{hint}",
            started.elapsed().as_secs_f64()
        ),
    )
}

/// Why `GET /v1/models` did not list the models.
pub(super) enum NotReady {
    /// HTTP 401 or 403: the server is up and wants an API key (or another).
    Unauthorized(u16),
    /// Anything else: not up yet, or not answering 200 yet.
    Other(String),
}

/// Adds `Authorization: Bearer <key>` when there is a key, as vLLM's
/// `--api-key` expects.
fn with_key<B>(request: ureq::RequestBuilder<B>, key: Option<&str>) -> ureq::RequestBuilder<B> {
    match key {
        Some(key) => request.header("Authorization", format!("Bearer {key}")),
        None => request,
    }
}

/// `Ok` with the listed model ids when `GET /v1/models` answers 200, else
/// why not.
pub(super) fn probe_models(
    agent: &ureq::Agent,
    url: &str,
    key: Option<&str>,
) -> Result<Vec<String>, NotReady> {
    match with_key(agent.get(format!("{url}/v1/models")), key).call() {
        Ok(mut response) if response.status() == 200 => Ok(response
            .body_mut()
            .read_json::<serde_json::Value>()
            .map(|v| model_ids(&v))
            .unwrap_or_default()),
        Ok(response) if matches!(response.status().as_u16(), 401 | 403) => {
            Err(NotReady::Unauthorized(response.status().as_u16()))
        }
        Ok(response) => Err(NotReady::Other(format!(
            "HTTP {}",
            response.status().as_u16()
        ))),
        Err(ureq::Error::Timeout(_)) => Err(NotReady::Other(format!(
            "no answer within {} s",
            POLL_TIMEOUT.as_secs()
        ))),
        Err(e) => Err(NotReady::Other(e.to_string())),
    }
}

/// What to do about a server that refused `GET /v1/models` with `status`.
pub(super) fn unauthorized(url: &str, status: u16, key: Option<&str>) -> String {
    match key {
        None => format!(
            "GET {url}/v1/models answered HTTP {status}: the server wants an API key (vLLM's \
             --api-key); give the benchmark the same key with --api-key or VLLM_API_KEY"
        ),
        Some(_) => format!(
            "GET {url}/v1/models answered HTTP {status} to the API key given (--api-key or \
             VLLM_API_KEY): give the key the command passes to vLLM's --api-key"
        ),
    }
}

/// When a server already answers at `url`, what it said.
pub(super) fn port_taken(url: &str) -> Option<String> {
    match local_agent(POLL_TIMEOUT)
        .get(format!("{url}/v1/models"))
        .call()
    {
        Ok(response) => Some(format!(
            "GET /v1/models: HTTP {}",
            response.status().as_u16()
        )),
        Err(ureq::Error::Timeout(_)) => Some("it accepts connections but does not answer".into()),
        Err(_) => None,
    }
}

/// Seconds a completion (temperature 0) took from request to full answer,
/// and the text of its first choice.
pub(super) fn first_completion(
    agent: &ureq::Agent,
    url: &str,
    model: &str,
    prompt: &str,
    max_tokens: u32,
    key: Option<&str>,
) -> Result<(f64, String), String> {
    let endpoint = format!("{url}/v1/completions");
    let start = Instant::now();
    let mut response = with_key(agent.post(&endpoint), key)
        .send_json(serde_json::json!({
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
        }))
        .map_err(|e| format!("POST {endpoint}: {e}"))?;
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("POST {endpoint}: reading the answer: {e}"))?;
    let seconds = start.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    let text = check_completion(status, &body)
        .map_err(|e| format!("POST {endpoint} (model {model}): {e}"))?;
    Ok((seconds, text))
}

/// A completion must be HTTP 200 with a non-empty `choices` array; the
/// text of the first choice (empty when it has none).
pub(super) fn check_completion(status: u16, body: &str) -> Result<String, String> {
    if status != 200 {
        return Err(format!("HTTP {status}: {}", quote(body)));
    }
    let parsed: serde_json::Value = serde_json::from_str(body)
        .map_err(|e| format!("answer is not JSON ({e}): {}", quote(body)))?;
    match parsed["choices"].as_array() {
        Some(choices) if !choices.is_empty() => {
            Ok(choices[0]["text"].as_str().unwrap_or_default().to_owned())
        }
        _ => Err(format!("answer has no choices: {}", quote(body))),
    }
}

/// `body` cut to [`BODY_QUOTE`] bytes (on a character boundary).
pub(super) fn quote(body: &str) -> String {
    if body.len() <= BODY_QUOTE {
        return body.to_owned();
    }
    let mut end = BODY_QUOTE;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &body[..end], body.len())
}
