//! `luafcgid run`: one request through the same resolution, policy, sandbox, rendering and
//! audit line as the server, without a socket. A policy author sees what a script answers
//! under its effective policy, and how the request ended.
//!
//! It builds the CGI params a front end would send (`SCRIPT_FILENAME`, `REQUEST_METHOD`,
//! `QUERY_STRING`, `CONTENT_LENGTH`, the headers as `HTTP_*`, ...) and hands the request to
//! [`dispatch`] exactly as a connection does. It does not loop,
//! cache states between runs, or listen.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use fastcgi_protocol::{encode_pair, Params};
use luafcgid_sandbox::ClientProbe;
use tokio::sync::watch;

use crate::config::Config;
use crate::dispatch::{dispatch, Dispatched, Framing, Incoming};
use crate::outcome::Outcome;
use crate::server::{ServeError, Shared};

/// The request `luafcgid run` makes.
#[derive(Debug, Clone, Default)]
pub struct OneRequest {
    /// The script, as a path on disk (made absolute; it must lie in a document root).
    pub script: PathBuf,
    /// `REQUEST_METHOD` (default `GET`).
    pub method: String,
    /// `QUERY_STRING`, without the `?`.
    pub query: String,
    /// The request body.
    pub body: Vec<u8>,
    /// Request headers, sent as `HTTP_NAME` params (`Content-Type` as `CONTENT_TYPE`).
    pub headers: Vec<(String, String)>,
}

/// What came back: the CGI response (headers, blank line, body) and the outcome.
#[derive(Debug)]
pub struct OneReply {
    pub cgi: Vec<u8>,
    pub outcome: Outcome,
}

/// A client that never goes away.
struct Present;

impl ClientProbe for Present {
    fn gone(&self) -> bool {
        false
    }
}

/// Runs `req` under `config` and returns the response. The audit log goes where `config`
/// says (the caller chooses; `luafcgid run` defaults it to stderr).
pub fn run_one(config: Config, req: &OneRequest) -> Result<OneReply, ServeError> {
    let (_keep, shutdown) = watch::channel(false);
    let shared = Shared::new(config, shutdown)?;
    let script = absolute(&req.script);
    let params = Params::decode(params_for(&shared, &script, req))
        .map_err(|e| ServeError::Io(std::io::Error::other(e.to_string())))?;
    let resolved = shared
        .resolver
        .resolve(Some(script.as_os_str().as_encoded_bytes()), Instant::now());
    let inc = Incoming {
        framing: Framing::Cgi,
        keep_conn: false,
        params,
        body_len: req.body.len() as u64,
        body_exceeded: req.body.len() as u64 > shared.config.ceiling.body,
        body: req.body.clone(),
        peer: Arc::from("127.0.0.1"),
        abort: Arc::new(AtomicBool::new(false)),
        received: Instant::now(),
        rate: crate::ratelimit::Verdict::Unchecked,
        policy: None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = runtime.block_on(async {
        match dispatch(&shared, inc, resolved, Some(Arc::new(Present))) {
            Dispatched::Now(reply) => Some(reply),
            Dispatched::Queued(queued) => queued.wait().await,
        }
    });
    shared.audit.close();
    let reply = reply.ok_or_else(|| ServeError::Io(std::io::Error::other("no reply")))?;
    Ok(OneReply {
        cgi: reply.bytes,
        outcome: reply.outcome,
    })
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The params a front end would send for `req`.
fn params_for(shared: &Shared, script: &Path, req: &OneRequest) -> Vec<u8> {
    let filename = script.display().to_string();
    let root = shared
        .config
        .docroots
        .iter()
        .find(|r| script.starts_with(r))
        .cloned()
        .unwrap_or_default();
    let name = match script.strip_prefix(&root) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => filename.clone(),
    };
    let method = if req.method.is_empty() {
        "GET"
    } else {
        req.method.as_str()
    };
    let uri = if req.query.is_empty() {
        name.clone()
    } else {
        format!("{name}?{}", req.query)
    };
    let mut raw = Vec::with_capacity(1024);
    for (n, v) in [
        ("GATEWAY_INTERFACE", "CGI/1.1".to_string()),
        (
            "SERVER_SOFTWARE",
            concat!("luafcgid/", env!("CARGO_PKG_VERSION")).to_string(),
        ),
        ("SERVER_PROTOCOL", "HTTP/1.1".to_string()),
        ("REQUEST_METHOD", method.to_string()),
        ("REQUEST_URI", uri),
        ("SCRIPT_NAME", name),
        ("SCRIPT_FILENAME", filename),
        ("DOCUMENT_ROOT", root.display().to_string()),
        ("QUERY_STRING", req.query.clone()),
        ("CONTENT_LENGTH", req.body.len().to_string()),
        ("REMOTE_ADDR", "127.0.0.1".to_string()),
    ] {
        encode_pair(n.as_bytes(), v.as_bytes(), &mut raw);
    }
    for (name, value) in &req.headers {
        let key = name.trim().to_ascii_uppercase().replace('-', "_");
        let key = match key.as_str() {
            "CONTENT_TYPE" => key,
            _ => format!("HTTP_{key}"),
        };
        encode_pair(key.as_bytes(), value.trim().as_bytes(), &mut raw);
    }
    raw
}
