//! The JSON audit log: one line per request and per lifecycle event, written by one
//! background thread so a slow disk never stalls a request. Lifecycle lines are built by
//! the caller with serde_json and queued without blocking. A request line, the busiest
//! path, is queued as what it is made of (a [`RequestLine`], timestamped when queued) and
//! written out by the writer thread with [`RequestEvent::write_line`], byte for byte as
//! serde_json would write it: the thread that answers the request only moves data, and the
//! lines keep the order in which they were queued.
//! When the queue is full (in lines or bytes), or a write fails (disk full), a line is
//! counted as dropped and a later `log_dropped` event reports the count. [`AuditLog::reopen`]
//! makes the writer reopen its file by name between two lines (logrotate's `postrotate`).
//!
//! It does not rotate, compress or sync files, and it does not retry lines that failed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::Serialize;

/// Lines that may wait for the writer.
pub const AUDIT_QUEUE_LINES: usize = 65_536;

/// Bytes that may wait for the writer (with [`AUDIT_QUEUE_LINES`], whichever is reached
/// first): 65,536 lines of `r:log` messages at their full length would be 270 MB.
pub const AUDIT_QUEUE_BYTES: usize = 32 << 20;

/// After writing a batch the writer rests this long, so that under load lines are written
/// in batches and queueing a line rarely has to wake the writer thread.
pub const AUDIT_BATCH_PAUSE: Duration = Duration::from_millis(2);

/// The writer hands its batch to the file whenever it reaches this many bytes.
pub const AUDIT_WRITE_CHUNK: usize = 64 * 1024;

/// While writes keep failing, the writer says so on stderr at most this often.
pub const AUDIT_FAILURE_REPORT: Duration = Duration::from_secs(10);

/// How long [`AuditLog::close`] waits for the writer to write what is queued (a log on a
/// pipe nobody reads would otherwise hold the daemon's exit forever).
pub const AUDIT_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest script-controlled text kept in a log field, in bytes.
pub const AUDIT_TEXT_MAX: usize = 4096;

/// A request line as queued: it writes itself, as JSON, when the writer thread gets to it.
pub trait RequestLine: Send {
    /// Appends the line, newline included.
    fn write(&self, out: &mut Vec<u8>);
    /// Bytes it holds, counted against [`AUDIT_QUEUE_BYTES`] while it waits.
    fn cost(&self) -> usize;
}

/// What the writer thread receives.
enum Message {
    /// One JSON line, newline included.
    Line(Vec<u8>),
    /// One request line, written by the writer; with its [`RequestLine::cost`].
    Request(Box<dyn RequestLine>, usize),
    /// Wakes the writer to reopen its file (the request itself is [`Counters::reopen`]).
    Reopen,
    /// Write what came before, then stop.
    Stop,
}

/// What callers and the writer share.
#[derive(Debug, Default)]
struct Counters {
    /// Lines lost since the start: queue full, or their write failed.
    dropped: AtomicU64,
    /// Bytes of the lines in the queue.
    queued_bytes: AtomicUsize,
    /// Set by [`AuditLog::reopen`], cleared by the writer when it reopens.
    reopen: AtomicBool,
}

/// Where lines go.
#[derive(Debug)]
pub struct AuditLog {
    sender: Sender<Message>,
    counters: Arc<Counters>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Disconnected when the writer thread has finished.
    finished: Receiver<()>,
}

/// Writes `n` as exactly `width` decimal digits (zero-padded) into `out`.
fn push_digits(out: &mut [u8], n: u64) {
    let mut n = n;
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of a time in whole seconds since the epoch.
fn format_seconds(secs: i64) -> [u8; 19] {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut b = *b"0000-00-00T00:00:00";
    push_digits(&mut b[0..4], year.clamp(0, 9999) as u64);
    push_digits(&mut b[5..7], month as u64);
    push_digits(&mut b[8..10], day as u64);
    push_digits(&mut b[11..13], (sod / 3600) as u64);
    push_digits(&mut b[14..16], ((sod % 3600) / 60) as u64);
    push_digits(&mut b[17..19], (sod % 60) as u64);
    b
}

thread_local! {
    /// The last second formatted on this thread: most lines share it.
    static LAST_SECOND: std::cell::Cell<(i64, [u8; 19])> = const { std::cell::Cell::new((i64::MIN, [0; 19])) };
}

/// RFC 3339 UTC time with microseconds.
pub fn timestamp() -> String {
    String::from_utf8_lossy(&timestamp_bytes(now())).into_owned()
}

/// The time now, since the epoch: what a line's `ts` shows.
pub fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// [`timestamp`] of a time since the epoch, as bytes, without an allocation.
fn timestamp_bytes(d: Duration) -> [u8; 27] {
    let secs = d.as_secs() as i64;
    let prefix = LAST_SECOND.with(|last| {
        let (at, text) = last.get();
        if at == secs {
            text
        } else {
            let text = format_seconds(secs);
            last.set((secs, text));
            text
        }
    });
    let mut b = [0u8; 27];
    b[..19].copy_from_slice(&prefix);
    b[19] = b'.';
    push_digits(&mut b[20..26], u64::from(d.subsec_micros()));
    b[26] = b'Z';
    b
}

/// Cuts script-controlled text to [`AUDIT_TEXT_MAX`] bytes at a character boundary.
pub fn truncate(text: &str) -> &str {
    if text.len() <= AUDIT_TEXT_MAX {
        return text;
    }
    let mut end = AUDIT_TEXT_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The policy files applied to a script (relative to its document root), serialized as an
/// array of strings without copying them first.
#[derive(Debug, Clone, Copy)]
pub struct PolicyFiles<'a>(pub &'a [std::path::PathBuf]);

impl Serialize for PolicyFiles<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|p| p.to_string_lossy()))
    }
}

/// One `request` event.
#[derive(Debug)]
pub struct RequestEvent<'a> {
    /// Its time, since the epoch ([`now`] when it was queued).
    pub at: Duration,
    pub event: &'static str,
    pub request_id: &'a str,
    pub client: Option<&'a str>,
    pub method: Option<&'a str>,
    pub uri: Option<&'a str>,
    pub script: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub policy: Option<PolicyFiles<'a>>,
    pub status: Option<u16>,
    pub outcome: &'static str,
    pub duration_us: u64,
    pub instructions: Option<u64>,
    pub memory: Option<u64>,
    pub bytes_in: Option<u64>,
    pub bytes_out: Option<u64>,
    pub state: Option<&'static str>,
    pub error: Option<&'a str>,
}

/// How JSON writes each byte of a string: 0 as is, `u` as `\u00XX`, else `\` and that byte.
const ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// Whether any of the eight bytes of `chunk` needs an escape: a control character, a
/// quote or a backslash (the zero-byte and less-than tests of "Bit Twiddling Hacks", which
/// tell exactly whether such a byte is present).
fn any_escape(chunk: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let control = chunk.wrapping_sub(ONES * 0x20) & !chunk;
    let q = chunk ^ (ONES * u64::from(b'"'));
    let quote = q.wrapping_sub(ONES) & !q;
    let b = chunk ^ (ONES * u64::from(b'\\'));
    let backslash = b.wrapping_sub(ONES) & !b;
    (control | quote | backslash) & HIGH != 0
}

/// Appends `text` as a JSON string, escaped as serde_json escapes it (quote, backslash and
/// control characters; everything else, UTF-8 included, as is). Eight bytes at a time are
/// checked for a byte to escape (the last few padded with spaces); text without one, nearly
/// all of it, is copied whole.
fn push_json_str(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    out.push(b'"');
    let mut clean = true;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        if any_escape(word) {
            clean = false;
            break;
        }
    }
    if clean {
        let rest = chunks.remainder();
        let mut padded = [b' '; 8];
        padded[..rest.len()].copy_from_slice(rest);
        clean = !any_escape(u64::from_le_bytes(padded));
    }
    if clean {
        out.extend_from_slice(bytes);
    } else {
        push_escaped(out, bytes);
    }
    out.push(b'"');
}

/// The bytes of a JSON string that has something to escape, one at a time.
fn push_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape = ESCAPE[b as usize];
        if escape == 0 {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match escape {
            b'u' => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
            e => out.extend_from_slice(&[b'\\', e]),
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// `key` is the field's `,"name":` prefix.
fn push_opt_str(out: &mut Vec<u8>, key: &[u8], value: Option<&str>) {
    out.extend_from_slice(key);
    match value {
        Some(v) => push_json_str(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

fn push_opt_u64(out: &mut Vec<u8>, key: &[u8], value: Option<u64>) {
    out.extend_from_slice(key);
    match value {
        Some(v) => crate::render::push_number(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

impl RequestEvent<'_> {
    /// Appends the event as one JSON line (newline included): the same fields, order and
    /// escapes as serde_json gives for a struct of them.
    pub fn write_line(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"ts\":\"");
        out.extend_from_slice(&timestamp_bytes(self.at));
        out.push(b'"');
        push_opt_str(out, b",\"event\":", Some(self.event));
        push_opt_str(out, b",\"request_id\":", Some(self.request_id));
        push_opt_str(out, b",\"client\":", self.client);
        push_opt_str(out, b",\"method\":", self.method);
        push_opt_str(out, b",\"uri\":", self.uri);
        push_opt_str(out, b",\"script\":", self.script);
        push_opt_str(out, b",\"tenant\":", self.tenant);
        out.extend_from_slice(b",\"policy\":");
        match self.policy {
            Some(PolicyFiles(files)) => {
                out.push(b'[');
                for (i, f) in files.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    match f.to_str() {
                        Some(name) => push_json_str(out, name),
                        None => push_json_str(out, &f.to_string_lossy()),
                    }
                }
                out.push(b']');
            }
            None => out.extend_from_slice(b"null"),
        }
        push_opt_u64(out, b",\"status\":", self.status.map(u64::from));
        push_opt_str(out, b",\"outcome\":", Some(self.outcome));
        push_opt_u64(out, b",\"duration_us\":", Some(self.duration_us));
        push_opt_u64(out, b",\"instructions\":", self.instructions);
        push_opt_u64(out, b",\"memory\":", self.memory);
        push_opt_u64(out, b",\"bytes_in\":", self.bytes_in);
        push_opt_u64(out, b",\"bytes_out\":", self.bytes_out);
        push_opt_str(out, b",\"state\":", self.state);
        push_opt_str(out, b",\"error\":", self.error);
        out.extend_from_slice(b"}\n");
    }
}

/// Where the writer writes.
enum Sink {
    Stdout,
    Stderr,
    File {
        path: PathBuf,
        file: std::fs::File,
    },
    /// `unix:/path`: one datagram per line (without its newline) to a unix datagram socket,
    /// as a local collector (vector, fluent-bit, a syslog daemon's JSON input) listens.
    Datagram {
        path: PathBuf,
        socket: std::os::unix::net::UnixDatagram,
    },
}

/// The prefix of a `log` value naming a unix datagram socket.
pub const DATAGRAM_PREFIX: &str = "unix:";

fn connect_datagram(path: &Path) -> std::io::Result<std::os::unix::net::UnixDatagram> {
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    socket.connect(path)?;
    Ok(socket)
}

impl Sink {
    fn open(path: Option<&PathBuf>) -> std::io::Result<Sink> {
        Ok(match path {
            None => Sink::Stdout,
            // The daemon's own streams, shared with what else writes to them (not a second,
            // independently positioned open of the same file).
            Some(p) if p.as_os_str() == "/dev/stdout" => Sink::Stdout,
            Some(p) if p.as_os_str() == "/dev/stderr" => Sink::Stderr,
            Some(p) if p.to_string_lossy().starts_with(DATAGRAM_PREFIX) => {
                let path = PathBuf::from(&p.to_string_lossy()[DATAGRAM_PREFIX.len()..]);
                Sink::Datagram {
                    socket: connect_datagram(&path)?,
                    path,
                }
            }
            Some(p) => Sink::File {
                file: open_append(p)?,
                path: p.clone(),
            },
        })
    }

    fn name(&self) -> String {
        match self {
            Sink::Stdout => "stdout".into(),
            Sink::Stderr => "stderr".into(),
            Sink::File { path, .. } => path.display().to_string(),
            Sink::Datagram { path, .. } => format!("{DATAGRAM_PREFIX}{}", path.display()),
        }
    }

    /// Writes `bytes` whole, or says how many were written before the error.
    fn write_all(&mut self, bytes: &[u8]) -> Result<(), (usize, std::io::Error)> {
        let (mut stdout, mut stderr);
        let out: &mut dyn Write = match self {
            Sink::Stdout => {
                stdout = std::io::stdout();
                &mut stdout
            }
            Sink::Stderr => {
                stderr = std::io::stderr();
                &mut stderr
            }
            Sink::File { file, .. } => file,
            Sink::Datagram { path, socket } => return send_lines(path, socket, bytes),
        };
        let mut done = 0;
        while done < bytes.len() {
            match out.write(&bytes[done..]) {
                Ok(0) => return Err((done, std::io::ErrorKind::WriteZero.into())),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err((done, e)),
            }
        }
        out.flush().map_err(|e| (done, e))
    }

    /// Opens the file again by name (a new file when it was renamed away), or connects to
    /// the socket again. Streams stay.
    fn reopen(&mut self) -> std::io::Result<()> {
        match self {
            Sink::File { path, file } => *file = open_append(path)?,
            Sink::Datagram { path, socket } => *socket = connect_datagram(path)?,
            Sink::Stdout | Sink::Stderr => {}
        }
        Ok(())
    }
}

/// Sends each line of `bytes` as one datagram. A collector that restarted (its socket is
/// new) is connected to again once; on failure, says how many bytes of whole lines went.
fn send_lines(
    path: &Path,
    socket: &mut std::os::unix::net::UnixDatagram,
    bytes: &[u8],
) -> Result<(), (usize, std::io::Error)> {
    let mut done = 0;
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let sent = loop {
            match socket.send(text) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => break r,
            }
        };
        if let Err(e) = sent {
            let gone = matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotConnected
            );
            let again = gone
                && connect_datagram(path)
                    .map(|s| *socket = s)
                    .and_then(|()| socket.send(text))
                    .is_ok();
            if !again {
                return Err((done, e));
            }
        }
        done += line.len();
    }
    Ok(())
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

impl AuditLog {
    /// Opens the log (`None`: stdout; `unix:PATH`: a unix datagram socket) and starts its
    /// writer thread. The error names the log.
    pub fn open(path: Option<&PathBuf>) -> std::io::Result<AuditLog> {
        let sink = Sink::open(path).map_err(|e| {
            let name = path.map_or("stdout".into(), |p| p.display().to_string());
            std::io::Error::new(e.kind(), format!("audit log {name}: {e}"))
        })?;
        let (tx, rx) = crossbeam_channel::bounded::<Message>(AUDIT_QUEUE_LINES);
        let (finished_tx, finished) = crossbeam_channel::bounded::<()>(1);
        let counters = Arc::new(Counters::default());
        let writer = Writer {
            sink,
            counters: counters.clone(),
            batch: Vec::with_capacity(AUDIT_WRITE_CHUNK + 8192),
            reported: 0,
            cut: false,
            failing: None,
        };
        let writer = std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || {
                // Under the normal policy even when the daemon's other threads run as a
                // batch: at one connection through nginx, the p50 was 2-5% lower so
                // (docs/performance.md, "Batch scheduling").
                luafcgid_sandbox::leave_batch_scheduling();
                writer.run(rx);
                drop(finished_tx);
            })?;
        Ok(AuditLog {
            sender: tx,
            counters,
            writer: Mutex::new(Some(writer)),
            finished,
        })
    }

    /// Queues one event; never waits. A line that does not fit in the queue is dropped
    /// and counted.
    pub fn emit<T: Serialize>(&self, event: &T) {
        let mut line = Vec::with_capacity(512);
        if serde_json::to_writer(&mut line, event).is_err() {
            return;
        }
        line.push(b'\n');
        self.queue_line(line);
    }

    /// Queues one `request` line, to be written by the writer thread; never waits. Dropped
    /// and counted as [`AuditLog::emit`]'s lines are.
    pub fn emit_request(&self, line: Box<dyn RequestLine>) {
        let cost = line.cost();
        self.queue(cost, Message::Request(line, cost));
    }

    /// Queues one whole line, newline included.
    fn queue_line(&self, line: Vec<u8>) {
        self.queue(line.len(), Message::Line(line));
    }

    /// Queues a message holding `len` bytes.
    fn queue(&self, len: usize, message: Message) {
        let c = &self.counters;
        let queued = c.queued_bytes.fetch_add(len, Ordering::Relaxed) + len <= AUDIT_QUEUE_BYTES;
        if !queued || self.sender.try_send(message).is_err() {
            c.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            c.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues a lifecycle event with extra fields.
    pub fn lifecycle(&self, event: &'static str, fields: serde_json::Value) {
        let mut obj = serde_json::Map::new();
        obj.insert("ts".into(), timestamp().into());
        obj.insert("event".into(), event.into());
        if let serde_json::Value::Object(m) = fields {
            obj.extend(m);
        }
        self.emit(&serde_json::Value::Object(obj));
    }

    /// Asks the writer to reopen the log file by its name after the lines already queued
    /// (SIGUSR1, after logrotate renamed the file). Never waits; a no-op for stdout/stderr.
    /// When the file cannot be opened, the writer says so on stderr and keeps the old one.
    pub fn reopen(&self) {
        self.counters.reopen.store(true, Ordering::Release);
        // A full queue means the writer is busy: it looks at the flag after its batch.
        let _ = self.sender.try_send(Message::Reopen);
    }

    /// Counts `n` events that were never emitted (a bounded buffer elsewhere overflowed);
    /// the next `log_dropped` reports them with the lines the log lost.
    pub fn count_dropped(&self, n: u64) {
        self.counters.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Lines lost since the start because the writer fell behind or a write failed.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Writes everything queued and stops the writer; gives up after
    /// [`AUDIT_CLOSE_TIMEOUT`] when the writer is stuck (a pipe nobody reads), saying so on
    /// stderr. Lines emitted afterwards are dropped.
    pub fn close(&self) {
        let Some(handle) = self.writer.lock().ok().and_then(|mut w| w.take()) else {
            return;
        };
        let deadline = Instant::now() + AUDIT_CLOSE_TIMEOUT;
        let stopped = self.sender.send_deadline(Message::Stop, deadline).is_ok()
            && matches!(
                self.finished.recv_deadline(deadline),
                Err(RecvTimeoutError::Disconnected)
            );
        if stopped {
            let _ = handle.join();
        } else {
            tracing::error!(
                "the audit log writer did not finish within {:?}; lines still queued are lost",
                AUDIT_CLOSE_TIMEOUT
            );
        }
    }
}

/// Writes that keep failing.
#[derive(Debug)]
struct Failing {
    /// When stderr last heard of it.
    said: Instant,
    /// Lines lost since the first failure.
    lost: u64,
}

/// The writer thread's side.
struct Writer {
    sink: Sink,
    counters: Arc<Counters>,
    /// Lines received and not written yet.
    batch: Vec<u8>,
    /// `counters.dropped` as far as `log_dropped` events have reported it.
    reported: u64,
    /// The last failed write stopped inside a line: the next write starts a new one.
    cut: bool,
    failing: Option<Failing>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Message>) {
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    Message::Line(line) => {
                        self.counters
                            .queued_bytes
                            .fetch_sub(line.len(), Ordering::Relaxed);
                        self.batch.extend_from_slice(&line);
                        if self.batch.len() >= AUDIT_WRITE_CHUNK {
                            self.flush();
                        }
                    }
                    Message::Request(line, cost) => {
                        self.counters
                            .queued_bytes
                            .fetch_sub(cost, Ordering::Relaxed);
                        let start = self.batch.len();
                        let batch = &mut self.batch;
                        let written =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                line.write(batch)
                            }));
                        if written.is_err() {
                            // A bug in one line's writing loses that line, not the writer.
                            self.batch.truncate(start);
                            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        drop(line);
                        if self.batch.len() >= AUDIT_WRITE_CHUNK {
                            self.flush();
                        }
                    }
                    Message::Reopen => self.reopen_if_asked(),
                    Message::Stop => {
                        self.flush();
                        return;
                    }
                }
                next = rx.try_recv().ok();
            }
            self.flush();
            self.reopen_if_asked();
            std::thread::sleep(AUDIT_BATCH_PAUSE);
        }
        self.flush();
    }

    fn reopen_if_asked(&mut self) {
        if !self.counters.reopen.swap(false, Ordering::Acquire) {
            return;
        }
        // What came before the request goes to the old file.
        self.flush();
        match self.sink.reopen() {
            Ok(()) => tracing::info!("audit log {} reopened", self.sink.name()),
            Err(e) => tracing::error!(
                "cannot reopen the audit log {}: {e}; still writing to the file opened before",
                self.sink.name()
            ),
        }
    }

    /// Writes the batch, preceded by a `log_dropped` event when lines were lost since the
    /// last one. Lines whose write fails are counted as dropped in turn.
    fn flush(&mut self) {
        let dropped = self.counters.dropped.load(Ordering::Relaxed);
        if self.batch.is_empty() && dropped == self.reported {
            return;
        }
        if dropped > self.reported {
            let mut line = Vec::with_capacity(160);
            if self.cut {
                line.push(b'\n');
            }
            let ev = serde_json::json!({
                "ts": timestamp(),
                "event": "log_dropped",
                "count": dropped - self.reported,
                "request_id": null,
                "script": null,
            });
            let _ = serde_json::to_writer(&mut line, &ev);
            line.push(b'\n');
            match self.sink.write_all(&line) {
                Ok(()) => {
                    self.reported = dropped;
                    self.succeeded();
                }
                Err((done, e)) => self.failed(&line, done, e, 0),
            }
        }
        if self.batch.is_empty() {
            return;
        }
        if self.cut {
            self.batch.insert(0, b'\n');
        }
        let batch = std::mem::take(&mut self.batch);
        match self.sink.write_all(&batch) {
            Ok(()) => self.succeeded(),
            Err((done, e)) => {
                let lost = batch[done..].iter().filter(|&&b| b == b'\n').count() as u64;
                self.counters.dropped.fetch_add(lost, Ordering::Relaxed);
                self.failed(&batch, done, e, lost);
            }
        }
        self.batch = batch;
        self.batch.clear();
    }

    fn succeeded(&mut self) {
        self.cut = false;
        if let Some(f) = self.failing.take() {
            tracing::warn!(
                "audit log {}: writing again; {} lines were lost (counted by log_dropped)",
                self.sink.name(),
                f.lost
            );
        }
    }

    /// A write of `bytes` failed after `done` of them, losing `lost` lines: says so on stderr,
    /// at once the first time and then at most every [`AUDIT_FAILURE_REPORT`].
    fn failed(&mut self, bytes: &[u8], done: usize, e: std::io::Error, lost: u64) {
        if done > 0 {
            self.cut = bytes[done - 1] != b'\n';
        }
        let name = self.sink.name();
        match &mut self.failing {
            None => {
                tracing::error!(
                    "audit log {name}: {e}; lines are dropped and counted until writing works again"
                );
                self.failing = Some(Failing {
                    said: Instant::now(),
                    lost,
                });
            }
            Some(f) => {
                f.lost += lost;
                if f.said.elapsed() >= AUDIT_FAILURE_REPORT {
                    tracing::error!(
                        "audit log {name}: still failing ({e}); {} lines lost",
                        f.lost
                    );
                    f.said = Instant::now();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut every_byte = String::new();
        for c in (0u8..0x80).map(char::from) {
            every_byte.push(c);
        }
        for text in [
            "",
            "plain /path/to/hello.lua?x=1&y=2",
            "quote \" backslash \\ tab \t newline \n cr \r",
            "\u{0}\u{1f}\u{7f}\u{8}\u{c}",
            "ünïcödé ✓ 𝄞",
            every_byte.as_str(),
        ] {
            let mut ours = Vec::new();
            push_json_str(&mut ours, text);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(text).unwrap(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn an_escape_is_found_wherever_it_falls_in_a_chunk() {
        for special in ['"', '\\', '\n', '\u{0}', '\u{1f}'] {
            for at in 0..17 {
                for len in [at + 1, at + 8, 24] {
                    let text: String = (0..len)
                        .map(|i| if i == at { special } else { 'é' })
                        .collect();
                    let mut ours = Vec::new();
                    push_json_str(&mut ours, &text);
                    assert_eq!(
                        String::from_utf8(ours).unwrap(),
                        serde_json::to_string(&text).unwrap()
                    );
                }
            }
        }
    }

    #[test]
    fn a_request_line_is_json_with_every_field_in_order() {
        let files = [
            PathBuf::from("policy.toml"),
            PathBuf::from("site/\"odd\".toml"),
        ];
        let full = RequestEvent {
            at: now(),
            event: "request",
            request_id: "0123456789abcdef",
            client: Some("127.0.0.1"),
            method: Some("GET"),
            uri: Some("/a \"b\"\n"),
            script: Some("site/hello.lua"),
            tenant: Some("site"),
            policy: Some(PolicyFiles(&files)),
            status: Some(200),
            outcome: "ok",
            duration_us: 17,
            instructions: Some(u64::MAX),
            memory: Some(0),
            bytes_in: Some(5),
            bytes_out: Some(11),
            state: Some("warm"),
            error: Some("line 1: \u{1}"),
        };
        let empty = RequestEvent {
            client: None,
            method: None,
            uri: None,
            script: None,
            tenant: None,
            policy: None,
            status: None,
            instructions: None,
            memory: None,
            bytes_in: None,
            bytes_out: None,
            state: None,
            error: None,
            ..full
        };
        let keys = [
            "ts",
            "event",
            "request_id",
            "client",
            "method",
            "uri",
            "script",
            "tenant",
            "policy",
            "status",
            "outcome",
            "duration_us",
            "instructions",
            "memory",
            "bytes_in",
            "bytes_out",
            "state",
            "error",
        ];
        for ev in [&full, &empty] {
            let mut line = Vec::new();
            ev.write_line(&mut line);
            assert_eq!(line.pop(), Some(b'\n'));
            assert!(!line.contains(&b'\n'), "one line");
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            let text = String::from_utf8(line).unwrap();
            let mut at = 0;
            for key in keys {
                let found = text[at..]
                    .find(&format!("\"{key}\":"))
                    .unwrap_or_else(|| panic!("{key} missing or out of order in {text}"));
                at += found + 1;
            }
            assert_eq!(v.as_object().unwrap().len(), keys.len());
            let ts = v["ts"].as_str().unwrap();
            assert_eq!(ts.len(), 27, "{ts}");
            assert!(ts.ends_with('Z'));
        }
        let mut line = Vec::new();
        full.write_line(&mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["uri"], "/a \"b\"\n");
        assert_eq!(
            v["policy"],
            serde_json::json!(["policy.toml", "site/\"odd\".toml"])
        );
        assert_eq!(v["status"], 200);
        assert_eq!(v["instructions"], u64::MAX);
        assert_eq!(v["memory"], 0);
        assert_eq!(v["error"], "line 1: \u{1}");
        line.clear();
        empty.write_line(&mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        for key in [
            "client",
            "policy",
            "status",
            "instructions",
            "state",
            "error",
        ] {
            assert!(v[key].is_null(), "{key}");
        }
        assert_eq!(v["duration_us"], 17);
    }

    #[test]
    fn known_dates_format() {
        assert_eq!(&format_seconds(0), b"1970-01-01T00:00:00");
        assert_eq!(&format_seconds(951_782_400), b"2000-02-29T00:00:00");
        assert_eq!(&format_seconds(1_795_704_832), b"2026-11-26T14:53:52");
    }

    #[test]
    fn timestamp_is_rfc3339_micros() {
        let t = timestamp();
        assert_eq!(t.len(), 27, "{t}");
        assert!(t.ends_with('Z'));
        assert_eq!(&t[4..5], "-");
        assert_eq!(&t[10..11], "T");
        assert_eq!(&t[19..20], ".");
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn reopen_switches_files_between_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let rotated = dir.path().join("audit.jsonl.1");
        let log = AuditLog::open(Some(&path)).unwrap();
        log.lifecycle("first", serde_json::json!({}));
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        let t = Instant::now();
        while !path.exists() {
            assert!(t.elapsed() < Duration::from_secs(10), "never reopened");
            std::thread::yield_now();
        }
        log.lifecycle("second", serde_json::json!({}));
        log.close();
        let old = lines(&rotated);
        let new = lines(&path);
        assert_eq!(old.len(), 1);
        assert_eq!(old[0]["event"], "first");
        assert_eq!(new.len(), 1);
        assert_eq!(new[0]["event"], "second");
        assert_eq!(log.dropped(), 0);
    }

    /// A fifo in `dir`, and a reader of it that reads nothing: a writer blocks once the
    /// pipe is full.
    fn idle_fifo(dir: &Path) -> (PathBuf, std::fs::File) {
        use std::os::unix::fs::OpenOptionsExt;
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success());
        let idle = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        (fifo, idle)
    }

    #[test]
    fn the_queue_is_bounded_in_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (fifo, idle) = idle_fifo(dir.path());
        let log = AuditLog::open(Some(&fifo)).unwrap();
        let big = "x".repeat(1 << 20);
        let lines = 2 * AUDIT_QUEUE_BYTES / big.len();
        for _ in 0..lines {
            log.lifecycle("big", serde_json::json!({ "text": big }));
        }
        // Far fewer lines than AUDIT_QUEUE_LINES, but more bytes than AUDIT_QUEUE_BYTES.
        let dropped = log.dropped() as usize;
        assert!(dropped >= lines / 2 - 2, "{dropped} of {lines}");
        let reader = std::thread::spawn(move || {
            let mut n = 0;
            let mut f = std::fs::File::open(fifo).unwrap();
            let mut buf = vec![0; 1 << 16];
            while let Ok(k) = std::io::Read::read(&mut f, &mut buf) {
                if k == 0 {
                    break;
                }
                n += buf[..k].iter().filter(|&&b| b == b'\n').count();
            }
            n
        });
        log.close();
        drop(idle);
        // Every line written, plus the log_dropped line.
        assert_eq!(reader.join().unwrap(), lines - dropped + 1);
    }

    /// A request line holding `cost` bytes, written as one line of that much text.
    struct Heavy(usize);

    impl RequestLine for Heavy {
        fn write(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(b"{\"text\":\"");
            out.resize(out.len() + self.0, b'x');
            out.extend_from_slice(b"\"}\n");
        }

        fn cost(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn queued_request_lines_count_the_bytes_they_hold() {
        let dir = tempfile::tempdir().unwrap();
        let (fifo, idle) = idle_fifo(dir.path());
        let log = AuditLog::open(Some(&fifo)).unwrap();
        let size = 1 << 20;
        let lines = 2 * AUDIT_QUEUE_BYTES / size;
        for _ in 0..lines {
            log.emit_request(Box::new(Heavy(size)));
        }
        // Far fewer lines than AUDIT_QUEUE_LINES, but more bytes than AUDIT_QUEUE_BYTES.
        let dropped = log.dropped() as usize;
        assert!(dropped >= lines / 2 - 2, "{dropped} of {lines}");
        drop(idle);
        // A reader drains the pipe: the writer writes what it kept and stops.
        let reader = std::thread::spawn(move || {
            let mut f = std::fs::File::open(fifo).unwrap();
            std::io::copy(&mut f, &mut std::io::sink()).unwrap()
        });
        log.close();
        reader.join().unwrap();
    }

    /// A request line whose writing fails half way.
    struct Broken;

    impl RequestLine for Broken {
        fn write(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(b"{\"ts\":");
            panic!("a bug while writing a line");
        }

        fn cost(&self) -> usize {
            16
        }
    }

    #[test]
    fn a_line_that_fails_to_write_is_counted_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(Some(&path)).unwrap();
        log.lifecycle("first", serde_json::json!({}));
        log.emit_request(Box::new(Broken));
        log.lifecycle("second", serde_json::json!({}));
        log.close();
        let lines = lines(&path);
        let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
        // The count comes before the next batch written after the loss.
        let without: Vec<&str> = events
            .iter()
            .copied()
            .filter(|e| *e != "log_dropped")
            .collect();
        assert_eq!(without, ["first", "second"], "{events:?}");
        let dropped: Vec<_> = lines
            .iter()
            .filter(|l| l["event"] == "log_dropped")
            .collect();
        assert_eq!(dropped.len(), 1, "{events:?}");
        assert_eq!(dropped[0]["count"], 1);
    }

    #[test]
    fn lines_of_a_failing_write_are_counted() {
        let log = AuditLog::open(Some(&PathBuf::from("/dev/full"))).unwrap();
        for _ in 0..3 {
            log.lifecycle("x", serde_json::json!({}));
        }
        log.close();
        assert_eq!(log.dropped(), 3);
        // After close nothing is written; a line is counted, not queued.
        log.lifecycle("late", serde_json::json!({}));
        assert_eq!(log.dropped(), 4);
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        let s = "é".repeat(AUDIT_TEXT_MAX);
        let t = truncate(&s);
        assert!(t.len() <= AUDIT_TEXT_MAX);
        assert!(t.len() >= AUDIT_TEXT_MAX - 1);
    }
}
