//! One FastCGI connection: reads records into the sans-IO decoder, answers management
//! records, resolves each request's script as soon as its params are complete (so an
//! oversized body is never buffered), dispatches complete requests, and writes replies as
//! workers finish them, in any order (several requests may share a connection).
//!
//! A connection costs no worker while idle or while its peer is slow: Lua only sees whole
//! requests. Timeouts: the requests being assembled must make progress within
//! `read_timeout`, an idle keep-alive connection closes after `idle_timeout`, and a peer
//! that does not read its replies is dropped after `read_timeout`. When the peer goes away,
//! every request of the connection still in Lua is told to stop.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use fastcgi_protocol::{
    encode_end_request, encode_get_values_result, encode_unknown_type, Decoder, Event, Status,
};
use luafcgid_sandbox::ClientProbe;
use std::os::fd::AsRawFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant as TokioInstant;

use crate::dispatch::{dispatch, Dispatched, Framing, Incoming, Reply};
use crate::probe::SocketProbe;
use crate::ratelimit::Verdict;
use crate::resolve::{Refusal, Script};
use crate::server::{Live, Shared};

/// What is known of a request once its params are complete: its script, what the rate
/// limits said, and its policy (resolved once, for `dispatch` too).
type Screened = (
    Result<Arc<Script>, Refusal>,
    Verdict,
    Option<luafcgid_policy::Resolution>,
);

/// Bytes read from the socket at a time (the buffer grows only to hold one record).
const READ_CHUNK: usize = 16 * 1024;

struct InFlight {
    abort: Arc<AtomicBool>,
}

/// Values by FastCGI request id for one connection. A web server keeps one request in
/// flight per connection (nginx, Apache, lighttpd, Caddy); the decoder holds at most
/// `max_requests_per_connection` (64 by default) at once, and nothing is kept here for an
/// id it let go of. So a linear scan of a short vector, with no hashing: it cost a
/// `HashMap` some 250 instructions per request to insert and remove in two of them.
struct ById<V> {
    entries: Vec<(u16, V)>,
}

impl<V> ById<V> {
    fn new() -> Self {
        ById {
            entries: Vec::new(),
        }
    }

    /// Sets `id`'s value, replacing the one it had.
    fn insert(&mut self, id: u16, value: V) {
        match self.entries.iter_mut().find(|(i, _)| *i == id) {
            Some((_, v)) => *v = value,
            None => self.entries.push((id, value)),
        }
    }

    fn get(&self, id: u16) -> Option<&V> {
        self.entries.iter().find(|(i, _)| *i == id).map(|(_, v)| v)
    }

    fn remove(&mut self, id: u16) -> Option<V> {
        let at = self.entries.iter().position(|(i, _)| *i == id)?;
        Some(self.entries.swap_remove(at).1)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }
}

/// A cleared abort flag for a new request: `spare` again when nothing else holds it any
/// more (its request ended), else a new one, kept in `spare`. Spares a connection an
/// allocation per request.
fn fresh_abort(spare: &mut Arc<AtomicBool>) -> Arc<AtomicBool> {
    match Arc::get_mut(spare) {
        Some(flag) => *flag.get_mut() = false,
        None => *spare = Arc::new(AtomicBool::new(false)),
    }
    spare.clone()
}

/// Whether this daemon multiplexes requests on one connection (`FCGI_MPXS_CONNS`).
pub const MPXS_CONNS: bool = true;

fn get_values(shared: &Shared, names: &[Vec<u8>], out: &mut Vec<u8>) {
    let max_conns = shared.config.max_connections.to_string();
    let max_reqs =
        (shared.config.max_connections * shared.limits.max_requests_per_connection).to_string();
    let mut pairs: Vec<(&[u8], &[u8])> = Vec::new();
    for n in names {
        match n.as_slice() {
            b"FCGI_MAX_CONNS" => pairs.push((b"FCGI_MAX_CONNS", max_conns.as_bytes())),
            b"FCGI_MAX_REQS" => pairs.push((b"FCGI_MAX_REQS", max_reqs.as_bytes())),
            b"FCGI_MPXS_CONNS" => {
                pairs.push((b"FCGI_MPXS_CONNS", if MPXS_CONNS { b"1" } else { b"0" }))
            }
            _ => {}
        }
    }
    encode_get_values_result(&pairs, out);
}

/// Serves one FastCGI connection until it closes. Each request uses the configuration
/// current when its params complete; the connection's own limits and timeouts are those
/// of its start. After shutdown is signalled, requests already sent are answered, then the
/// connection closes.
pub async fn serve<S>(mut stream: S, peer: Arc<str>, live: Arc<Live>)
where
    S: AsyncRead + AsyncWrite + AsRawFd + Unpin,
{
    let mut generation = live.generation();
    let mut shared = live.current();
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let mut decoder = Decoder::new(shared.limits.clone());
    let mut inbuf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut out: Vec<u8> = Vec::new();
    // Requests dispatched and not answered yet: at the `select!` only those queued for a
    // state (an inline run's reply is queued at once), whose replies come on `rx`.
    let mut in_flight: ById<InFlight> = ById::new();
    let mut resolved: ById<Screened> = ById::new();
    // Kept between requests, to be reused by the next one once the last let go of them.
    let mut spare_abort = Arc::new(AtomicBool::new(false));
    let mut spare_probe = Arc::new(SocketProbe::new(stream.as_raw_fd(), None));
    let shutdown = shared.shutdown_signal();
    // One wait for the whole connection, polled only the first time (to register its
    // wake-up) and when the signal's version moved: a new `changed()` future per turn of the
    // loop cost about as much as decoding a request's params, and polling a waiting one half
    // of that.
    let mut stopping = false;
    let mut registered = false;
    let stop = {
        let mut signal = shared.shutdown_signal();
        async move {
            let _ = signal.wait_for(|&stop| stop).await;
        }
    };
    tokio::pin!(stop);
    let (read_timeout, idle_timeout) = (shared.config.read_timeout, shared.config.idle_timeout);
    let mut progress = Instant::now();
    // When bytes were last read: every request decoded since was received then (one clock
    // read per read, shared by what it brought).
    let mut read_at = progress;
    let mut closing = false;
    // One timer per connection, moved only when a deadline comes closer; when it fires
    // early (the connection made progress since), it is re-armed. A keep-alive connection
    // thus touches the runtime's timer wheel about once per timeout, not once per request.
    let timer = tokio::time::sleep(idle_timeout);
    tokio::pin!(timer);
    let mut armed = progress + idle_timeout;

    'conn: loop {
        // A reload took effect: move to it between requests (none half screened).
        if resolved.is_empty() && live.generation() != generation {
            generation = live.generation();
            shared = live.current();
        }
        // Decode every whole record in the buffer.
        let mut start = 0;
        loop {
            match decoder.decode(&inbuf[start..]) {
                Ok(Status::Partial) => break,
                Ok(Status::Complete((used, event))) => {
                    start += used;
                    let Some(event) = event else { continue };
                    match event {
                        Event::ParamsComplete { id } => {
                            let params = decoder.params(id);
                            let answer = shared
                                .resolver
                                .resolve(params.and_then(|p| p.get(b"SCRIPT_FILENAME")), read_at);
                            let (limit, rate, policy) = match &answer {
                                Ok(script) => {
                                    let (limit, rate, policy) =
                                        shared.screen(script, params, &peer);
                                    (limit, rate, Some(policy))
                                }
                                Err(_) => (0, Verdict::Unchecked, None),
                            };
                            if let (Verdict::Limited { .. }, Some(params)) = (rate, params) {
                                // Over a rate limit: answered now, before any of the body
                                // is read, and the id ends here (the rest of its records
                                // are ignored, as for any inactive id). The connection
                                // stays open either way: the client may still be sending.
                                let inc = Incoming {
                                    framing: Framing::FastCgi { id },
                                    keep_conn: true,
                                    params: params.clone(),
                                    body: Vec::new(),
                                    body_len: 0,
                                    body_exceeded: false,
                                    peer: peer.clone(),
                                    abort: Arc::new(AtomicBool::new(false)),
                                    received: read_at,
                                    rate,
                                    policy,
                                };
                                decoder.finish(id);
                                match dispatch(&shared, inc, answer, None) {
                                    Dispatched::Now(reply) => out.extend_from_slice(&reply.bytes),
                                    // Never so: a limited request is answered before
                                    // admission.
                                    Dispatched::Queued(queued) => queued.spawn(&tx),
                                }
                                continue;
                            }
                            decoder.set_body_limit(id, limit);
                            resolved.insert(id, (answer, rate, policy));
                        }
                        Event::Request(req) => {
                            progress = read_at;
                            let id = req.id;
                            let abort = fresh_abort(&mut spare_abort);
                            in_flight.insert(
                                id,
                                InFlight {
                                    abort: abort.clone(),
                                },
                            );
                            let (answer, rate, policy) = match resolved.remove(id) {
                                Some((answer, rate, policy)) => (Some(answer), rate, policy),
                                None => (None, Verdict::Unchecked, None),
                            };
                            let (params, answer) = match req.params {
                                Ok(p) => {
                                    (p, answer.unwrap_or(Err(Refusal::BadRequest("no params"))))
                                }
                                Err(_) => (
                                    fastcgi_protocol::Params::decode(Vec::new())
                                        .expect("no pairs is a valid params stream"),
                                    Err(Refusal::BadRequest("malformed params")),
                                ),
                            };
                            let inc = Incoming {
                                framing: Framing::FastCgi { id },
                                keep_conn: req.keep_conn,
                                params,
                                body: req.body,
                                body_len: req.body_len,
                                body_exceeded: req.body_exceeded,
                                peer: peer.clone(),
                                abort,
                                received: read_at,
                                rate,
                                policy,
                            };
                            // Run at once on this thread only when the connection has
                            // nothing else pending, so no other request waits behind it.
                            let alone = in_flight.len() == 1 && start == inbuf.len();
                            let inline = alone.then(|| {
                                SocketProbe::reuse(&mut spare_probe, stream.as_raw_fd(), Some(id))
                                    as Arc<dyn ClientProbe + Send>
                            });
                            let reply = match dispatch(&shared, inc, answer, inline) {
                                Dispatched::Now(reply) => Some(reply),
                                // Nothing else to do meanwhile: it waits for its state
                                // here, without a task and a hand-off of its own.
                                Dispatched::Queued(queued)
                                    if alone && queued.may_wait_in_place() =>
                                {
                                    queued.wait().await
                                }
                                Dispatched::Queued(queued) => {
                                    queued.spawn(&tx);
                                    None
                                }
                            };
                            if let Some(reply) = reply {
                                if !queue_reply(reply, &mut in_flight, &mut decoder, &mut out) {
                                    closing = true;
                                }
                            }
                        }
                        Event::Abort { id } => {
                            if let Some(f) = in_flight.get(id) {
                                f.abort.store(true, Ordering::Relaxed);
                            } else {
                                // Aborted while still being assembled: answer at once.
                                decoder.finish(id);
                                resolved.remove(id);
                                encode_end_request(
                                    id,
                                    1,
                                    fastcgi_protocol::ProtocolStatus::RequestComplete,
                                    &mut out,
                                );
                            }
                        }
                        Event::Rejected { id, status } => {
                            encode_end_request(id, 0, status, &mut out);
                        }
                        Event::GetValues { names } => get_values(&shared, &names, &mut out),
                        Event::UnknownType { kind } => encode_unknown_type(kind, &mut out),
                    }
                }
                Err(e) => {
                    tracing::debug!("closing a FastCGI connection: {e}");
                    let _ = write_out(&mut stream, &mut out, read_timeout).await;
                    break 'conn;
                }
            }
        }
        if start > 0 {
            inbuf.drain(..start);
        }
        if !out.is_empty()
            && write_out(&mut stream, &mut out, read_timeout)
                .await
                .is_err()
        {
            break 'conn;
        }
        if closing && in_flight.is_empty() {
            break;
        }
        let assembling = decoder.assembling();
        let deadline = if assembling {
            Some(progress + read_timeout)
        } else if in_flight.is_empty() {
            // Shutting down: what the peer sent before it is still answered.
            if *shutdown.borrow()
                && inbuf.is_empty()
                && !crate::probe::bytes_waiting(stream.as_raw_fd())
            {
                break;
            }
            Some(progress + idle_timeout)
        } else {
            None
        };
        if let Some(due) = deadline {
            if due < armed {
                armed = due;
                timer.as_mut().reset(TokioInstant::from_std(due));
            }
        }
        if inbuf.capacity() - inbuf.len() < READ_CHUNK / 4 {
            inbuf.reserve(READ_CHUNK);
        }
        tokio::select! {
            // In this order: finished replies go out before more requests are read.
            biased;
            // Polled only while a reply can come: polling it cost every request 500 instructions.
            Some(reply) = rx.recv(), if !in_flight.is_empty() => {
                progress = Instant::now();
                let mut keep = queue_reply(reply, &mut in_flight, &mut decoder, &mut out);
                // Write what else is ready in the same syscall.
                while let Ok(more) = rx.try_recv() {
                    keep &= queue_reply(more, &mut in_flight, &mut decoder, &mut out);
                }
                if write_out(&mut stream, &mut out, read_timeout).await.is_err() {
                    break 'conn;
                }
                if !keep {
                    closing = true;
                    if in_flight.is_empty() {
                        break 'conn;
                    }
                }
            }
            r = stream.read_buf(&mut inbuf), if !closing => {
                match r {
                    Ok(0) | Err(_) => break 'conn,
                    Ok(_) => {
                        read_at = Instant::now();
                        if !assembling && in_flight.is_empty() {
                            progress = read_at;
                        }
                    }
                }
            }
            _ = &mut timer, if deadline.is_some() => {
                let due = deadline.unwrap_or(armed);
                if Instant::now() >= due {
                    break 'conn;
                }
                armed = due;
                timer.as_mut().reset(TokioInstant::from_std(due));
            }
            () = std::future::poll_fn(|cx| {
                if registered && matches!(shutdown.has_changed(), Ok(false)) {
                    return Poll::Pending;
                }
                registered = true;
                stop.as_mut().poll(cx)
            }), if !stopping => stopping = true,
            // Nothing left to wait for (closing, no reply to come): done.
            else => break 'conn,
        }
    }
    for f in in_flight.values() {
        f.abort.store(true, Ordering::Relaxed);
    }
    let _ = stream.shutdown().await;
}

/// Queues a finished reply: frees its request id and appends its bytes to `out`. Returns
/// whether the connection may stay open after it.
fn queue_reply(
    reply: Reply,
    in_flight: &mut ById<InFlight>,
    decoder: &mut Decoder,
    out: &mut Vec<u8>,
) -> bool {
    if let Framing::FastCgi { id } = reply.framing {
        in_flight.remove(id);
        decoder.finish(id);
    }
    out.extend_from_slice(&reply.bytes);
    reply.keep_conn
}

/// Writes `out` whole, within `timeout`, and empties it. A reply that fits in the socket
/// at once (nearly all) is written without arming a timer.
async fn write_out<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut Vec<u8>,
    timeout: std::time::Duration,
) -> Result<(), ()> {
    let mut write = std::pin::pin!(stream.write_all(out));
    let r = match std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
        Poll::Ready(r) => Ok(r),
        Poll::Pending => tokio::time::timeout(timeout, write).await,
    };
    out.clear();
    match r {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_by_id_keep_one_value_per_id() {
        let mut m = ById::new();
        assert!(m.is_empty());
        m.insert(1, "a");
        m.insert(7, "b");
        m.insert(1, "c");
        assert_eq!(m.len(), 2);
        assert_eq!(m.get(1), Some(&"c"));
        assert_eq!(m.get(7), Some(&"b"));
        assert_eq!(m.get(2), None);
        assert_eq!(m.remove(1), Some("c"));
        assert_eq!(m.remove(1), None);
        assert_eq!(m.get(7), Some(&"b"));
        assert_eq!(m.values().collect::<Vec<_>>(), [&"b"]);
        assert_eq!(m.remove(7), Some("b"));
        assert!(m.is_empty());
    }

    #[test]
    fn an_abort_flag_is_reused_cleared_only_once_its_request_let_go() {
        let mut spare = Arc::new(AtomicBool::new(false));
        let first = fresh_abort(&mut spare);
        assert!(Arc::ptr_eq(&first, &spare));
        first.store(true, Ordering::Relaxed);
        let second = fresh_abort(&mut spare);
        assert!(
            !Arc::ptr_eq(&first, &second),
            "the first request still holds its flag"
        );
        assert!(first.load(Ordering::Relaxed), "and it stays set");
        assert!(!second.load(Ordering::Relaxed));
        second.store(true, Ordering::Relaxed);
        drop((first, second));
        let third = fresh_abort(&mut spare);
        assert!(Arc::ptr_eq(&third, &spare));
        assert!(!third.load(Ordering::Relaxed), "reused, and cleared");
    }
}
