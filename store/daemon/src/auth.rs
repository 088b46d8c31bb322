//! Access control for shared hosts: an optional token (`--auth-token-file`)
//! that every `storage.Storage` call must carry as gRPC metadata
//! `authorization: Bearer <token>`, the convention of gRPC and Kubernetes.
//! A call without it, or with another, gets UNAUTHENTICATED; the health
//! service stays open for probes. The comparison takes the same time
//! whatever the token sent.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use crate::peer::Peer;

/// Longest token file read.
const MAX_TOKEN_BYTES: u64 = 4096;

/// A secret; its `Debug` does not show it.
#[derive(Clone)]
pub struct Token(Arc<[u8]>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// The token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the token file {path} can be read by other users (mode {mode:o}); make it private: \
         chmod 600 {path}"
    )]
    Readable { path: PathBuf, mode: u32 },
    #[error(
        "the token file {path} is empty or larger than {MAX_TOKEN_BYTES} bytes; put one line \
         of random text in it, e.g. `openssl rand -hex 32 > {path}`"
    )]
    Size { path: PathBuf },
    #[error(
        "the token in {path} holds characters gRPC metadata cannot carry; use printable ASCII, \
         e.g. `openssl rand -hex 32 > {path}`"
    )]
    NotAscii { path: PathBuf },
}

impl Token {
    /// The token in `path`: its first line, surrounding whitespace removed.
    /// The file must be private to its owner (no group or other access).
    pub fn read_file(path: &Path) -> Result<Self, TokenError> {
        let read = |source| TokenError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
        if mode & 0o077 != 0 {
            return Err(TokenError::Readable {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Size {
                path: path.to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let token = text.lines().next().unwrap_or("").trim();
        if token.is_empty() {
            return Err(TokenError::Size {
                path: path.to_owned(),
            });
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::NotAscii {
                path: path.to_owned(),
            });
        }
        Ok(Self(token.as_bytes().into()))
    }
}

/// The interceptor in front of `storage.Storage`.
#[derive(Clone, Debug, Default)]
pub struct Check {
    token: Option<Token>,
}

impl Check {
    /// Lets every call through without a token, or only calls carrying it.
    pub fn new(token: Option<Token>) -> Self {
        Self { token }
    }
}

impl tonic::service::Interceptor for Check {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Ok(request);
        };
        let sent = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        let refusal = match sent {
            Some(sent) if bool::from(sent.ct_eq(&token.0)) => return Ok(request),
            Some(_) => "the token sent does not match this daemon's (--auth-token-file)",
            None => {
                "this daemon requires a token (--auth-token-file): send gRPC metadata \
                 `authorization: Bearer <token>`; sllm-store's clients send the one in \
                 $SLLM_STORE_TOKEN, or in the file $SLLM_STORE_TOKEN_FILE names"
            }
        };
        let peer = request
            .extensions()
            .get::<Peer>()
            .map_or_else(|| "an unknown peer".to_owned(), ToString::to_string);
        tracing::warn!(%peer, "refused a call: {refusal}");
        metrics::counter!("sllm_errors_total", "kind" => "unauthenticated").increment(1);
        Err(Status::unauthenticated(refusal))
    }
}
