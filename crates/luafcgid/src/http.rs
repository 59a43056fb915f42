//! The development HTTP/1.1 listener (`--http`), as uWSGI's `--http`: lets a newcomer see a
//! page without a web server. It maps `/path` to `<first docroot>/path`, builds the CGI
//! params a web server would send and runs the request through the same dispatch as
//! FastCGI. It is deliberately small: `Content-Length` bodies only (no chunked uploads),
//! one request at a time per connection, and it is meant for loopback.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use fastcgi_protocol::{encode_pair, Params};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use crate::dispatch::{dispatch, Dispatched, Framing, Incoming};
use crate::probe::SocketProbe;
use crate::server::Shared;
use luafcgid_sandbox::ClientProbe;
use std::os::fd::AsRawFd;

/// Longest request head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most headers accepted.
pub const MAX_HEADERS: usize = 100;

/// Accepts development HTTP connections; each uses the configuration current when it
/// was accepted.
pub(crate) async fn accept(
    l: TcpListener,
    live: Arc<crate::server::Live>,
    connections: Arc<Semaphore>,
) {
    loop {
        match l.accept().await {
            Ok((stream, peer)) => {
                let shared = live.current();
                let Some(permit) = crate::server::connection_permit(&shared, &connections) else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let server = stream.local_addr().ok();
                    let _ = serve(stream, peer, server, shared).await;
                    drop(permit);
                });
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

async fn simple(stream: &mut TcpStream, status: &str) -> std::io::Result<()> {
    let body = format!("{status}\n");
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await
}

async fn serve(
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    server: Option<std::net::SocketAddr>,
    shared: Arc<Shared>,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let config = &shared.config;
    loop {
        // Read a whole head.
        let head_len = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEAD {
                return simple(&mut stream, "431 Request Header Fields Too Large").await;
            }
            let wait = if buf.is_empty() {
                config.idle_timeout
            } else {
                config.read_timeout
            };
            match tokio::time::timeout(wait, stream.read_buf(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Ok(()),
                Ok(Ok(_)) => {}
            }
        };
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let parsed = req.parse(&buf[..head_len]);
        if !matches!(parsed, Ok(httparse::Status::Complete(_))) {
            return simple(&mut stream, "400 Bad Request").await;
        }
        let method = req.method.unwrap_or("GET").to_string();
        let target = req.path.unwrap_or("/").to_string();
        let version = req.version.unwrap_or(1);
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let mut content_length: u64 = 0;
        let mut close = version == 0;
        let mut pairs: Vec<(String, Vec<u8>)> = Vec::new();
        for h in req.headers.iter() {
            let name = h.name.to_ascii_uppercase().replace('-', "_");
            if name == "CONTENT_LENGTH" {
                match std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                {
                    Some(n) => content_length = n,
                    None => return simple(&mut stream, "400 Bad Request").await,
                }
                continue;
            }
            if name == "TRANSFER_ENCODING" {
                return simple(&mut stream, "411 Length Required").await;
            }
            if name == "CONNECTION" {
                let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
                close = v.contains("close") || (version == 0 && !v.contains("keep-alive"));
            }
            if name == "CONTENT_TYPE" {
                pairs.push(("CONTENT_TYPE".into(), h.value.to_vec()));
                continue;
            }
            pairs.push((format!("HTTP_{name}"), h.value.to_vec()));
        }
        buf.drain(..head_len);
        let docroot = &config.docroots[0];
        let filename = format!("{}{}", docroot.display(), path);
        let received = Instant::now();
        let script = shared.resolver.resolve(Some(filename.as_bytes()), received);
        let limit = match &script {
            Ok(s) => shared.body_limit(s),
            Err(_) => 0,
        };
        let body_exceeded = content_length > limit;
        if body_exceeded {
            // Answer without reading the body, then close: the unread body ends the exchange.
            close = true;
        } else {
            while (buf.len() as u64) < content_length {
                match tokio::time::timeout(config.read_timeout, stream.read_buf(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Ok(()),
                    Ok(Ok(_)) => {}
                }
            }
        }
        let body: Vec<u8> = if body_exceeded {
            Vec::new()
        } else {
            buf.drain(..content_length as usize).collect()
        };
        let server = server.unwrap_or_else(|| ([127, 0, 0, 1], 0).into());
        let mut raw = Vec::with_capacity(1024);
        let fixed: [(&str, String); 14] = [
            ("GATEWAY_INTERFACE", "CGI/1.1".into()),
            (
                "SERVER_SOFTWARE",
                concat!("luafcgid/", env!("CARGO_PKG_VERSION")).into(),
            ),
            ("SERVER_PROTOCOL", format!("HTTP/1.{version}")),
            ("REQUEST_METHOD", method.clone()),
            ("REQUEST_URI", target.clone()),
            ("SCRIPT_NAME", path.to_string()),
            ("SCRIPT_FILENAME", filename),
            ("DOCUMENT_ROOT", docroot.display().to_string()),
            ("QUERY_STRING", query.to_string()),
            ("CONTENT_LENGTH", content_length.to_string()),
            ("REMOTE_ADDR", peer.ip().to_string()),
            ("REMOTE_PORT", peer.port().to_string()),
            ("SERVER_ADDR", server.ip().to_string()),
            ("SERVER_PORT", server.port().to_string()),
        ];
        for (n, v) in &fixed {
            encode_pair(n.as_bytes(), v.as_bytes(), &mut raw);
        }
        for (n, v) in &pairs {
            encode_pair(n.as_bytes(), v, &mut raw);
        }
        let params = match Params::decode(raw) {
            Ok(p) => p,
            Err(_) => return simple(&mut stream, "400 Bad Request").await,
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let abort = Arc::new(AtomicBool::new(false));
        let inc = Incoming {
            framing: Framing::Cgi,
            keep_conn: !close,
            params,
            body_len: content_length,
            body,
            body_exceeded,
            peer: Arc::from(peer.ip().to_string()),
            abort: abort.clone(),
            received,
            // Checked by dispatch, after the body (this listener is for development).
            rate: crate::ratelimit::Verdict::Unchecked,
            policy: None,
        };
        let inline = buf.is_empty().then(|| {
            Arc::new(SocketProbe::new(stream.as_raw_fd(), None)) as Arc<dyn ClientProbe + Send>
        });
        let reply = match dispatch(&shared, inc, script, inline) {
            Dispatched::Now(reply) => Some(reply),
            Dispatched::Queued(queued) => {
                queued.spawn(&tx);
                tokio::select! {
                r = rx.recv() => r,
                _ = stream.readable() => {
                    // The client sent more or closed while we worked; for a closed peer stop Lua.
                    let mut probe = [0u8; 1];
                    match stream.try_read(&mut probe) {
                        Ok(0) => {
                            abort.store(true, std::sync::atomic::Ordering::Relaxed);
                            return Ok(());
                        }
                        Ok(_) => { buf.push(probe[0]); rx.recv().await }
                        Err(_) => rx.recv().await,
                    }
                }
                }
            }
        };
        let Some(reply) = reply else { return Ok(()) };
        let http = cgi_to_http(&reply.bytes, method == "HEAD", close);
        stream.write_all(&http).await?;
        if close {
            return Ok(());
        }
    }
}

/// Turns CGI output (`Status:` header, other headers, blank line, body) into an HTTP/1.1
/// response.
pub fn cgi_to_http(cgi: &[u8], head: bool, close: bool) -> Vec<u8> {
    let split = cgi
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4))
        .unwrap_or((cgi.len(), cgi.len()));
    let headers = &cgi[..split.0];
    let body = &cgi[split.1..];
    let mut status = b"200 OK".to_vec();
    let mut out = Vec::with_capacity(cgi.len() + 64);
    let mut rest = Vec::new();
    for line in headers.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        if line.len() > 7 && line[..7].eq_ignore_ascii_case(b"status:") {
            status = line[7..].trim_ascii().to_vec();
        } else {
            rest.extend_from_slice(line);
            rest.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&status);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&rest);
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head {
        out.extend_from_slice(body);
    }
    out
}
