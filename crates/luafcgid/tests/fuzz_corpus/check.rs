//! The checks behind the `requests` and `config` fuzz targets, one function per target.
//!
//! `requests` drives the codec's connection decoder as the daemon's connection loop does
//! (`conn.rs`): with the limits the daemon derives from its default configuration, reads
//! of varying sizes, the body limit set when a request's params are complete (or the
//! request answered at once, as when rate-limited), and requests finished when their
//! reply is written. It keeps its own account of what each request was sent and checks
//! every request the decoder yields against it. `config` parses and validates a
//! `luafcgid.toml` as `luafcgid serve --config` does.
//!
//! `fuzz/fuzz_targets/{requests,config}.rs` include this file by path and call the same
//! functions as the corpus replay in `tests/fuzz_corpus.rs`. A broken invariant panics;
//! input the daemon refuses is not a failure. No sockets; `config` looks at the file
//! system only to check document roots, and never resolves host names.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use fastcgi_protocol::{
    encode_pair, encode_record, parse_header, record_type, Decoder, Event, Limits, Params, Status,
    FCGI_VERSION_1, HEADER_LEN, MAX_CONTENT_LEN, ROLE_RESPONDER,
};
use luafcgid::config::{check_ceiling, Config, Overrides, RawConfig};

/// The daemon's configuration when nothing is configured (document root `/`).
fn default_config() -> Config {
    let overrides = Overrides {
        docroot: vec![PathBuf::from("/")],
        ..Overrides::default()
    };
    RawConfig::default()
        .validate("defaults", &overrides)
        .expect("the default configuration is valid")
}

/// The codec limits the daemon runs with by default, derived from its configuration as
/// `server::Shared::new` derives them.
pub fn daemon_limits() -> &'static Limits {
    static LIMITS: OnceLock<Limits> = OnceLock::new();
    LIMITS.get_or_init(|| {
        let config = default_config();
        Limits {
            max_params_bytes: config.max_params,
            max_body_bytes: config.ceiling.body,
            ..Limits::default()
        }
    })
}

/// A request id: mostly one of a few (so ids collide and are reused), sometimes one of 64
/// others (so more than `max_requests_per_connection` can be active); 0 is the
/// management id.
#[derive(Debug, Clone, Copy, Arbitrary)]
struct Id(u8);

impl Id {
    fn get(self) -> u16 {
        if self.0 < 192 {
            u16::from(self.0 % 4)
        } else {
            u16::from(self.0)
        }
    }
}

/// One thing a client sends, or the daemon does, on the connection.
#[derive(Debug, Arbitrary)]
enum Step {
    /// `BEGIN_REQUEST`; a role other than responder unless `responder`.
    Begin {
        id: Id,
        responder: bool,
        role: u16,
        flags: u8,
    },
    /// Pairs encoded as one stream and cut into PARAMS records of `cut + 1` bytes, so
    /// pairs may be split across records as some clients do.
    Params {
        id: Id,
        pairs: Vec<(Vec<u8>, Vec<u8>)>,
        cut: u16,
    },
    /// Params bytes as they are, in one record.
    ParamsRaw {
        id: Id,
        bytes: Vec<u8>,
    },
    /// The empty PARAMS record.
    ParamsEnd {
        id: Id,
    },
    /// A STDIN record of `len` bytes of `fill`.
    Stdin {
        id: Id,
        len: u16,
        fill: u8,
    },
    /// The empty STDIN record.
    StdinEnd {
        id: Id,
    },
    Abort {
        id: Id,
    },
    Data {
        id: Id,
        content: Vec<u8>,
    },
    GetValues {
        names: Vec<Vec<u8>>,
    },
    /// Any record, with any padding.
    Record {
        kind: u8,
        id: Id,
        content: Vec<u8>,
        padding: u8,
    },
    /// Bytes as they are.
    Raw(Vec<u8>),
    /// The reply to `id` is written: the daemon finishes it.
    Reply {
        id: Id,
    },
}

/// What the daemon decides when a request's params are complete.
#[derive(Debug, Clone, Copy, Arbitrary)]
struct Screen {
    /// The script's body limit.
    body_limit: u32,
    /// Over a rate limit: answered at once, the id finished.
    limited: bool,
}

/// The structured input of `requests`.
#[derive(Debug, Arbitrary)]
struct Script {
    reads: Vec<u16>,
    screens: Vec<Screen>,
    steps: Vec<Step>,
}

/// Appends one record with `padding` bytes of padding.
fn record(kind: u8, id: u16, content: &[u8], padding: u8, out: &mut Vec<u8>) {
    let content = &content[..content.len().min(MAX_CONTENT_LEN)];
    let [id_hi, id_lo] = id.to_be_bytes();
    let [len_hi, len_lo] = (content.len() as u16).to_be_bytes();
    out.extend_from_slice(&[
        FCGI_VERSION_1,
        kind,
        id_hi,
        id_lo,
        len_hi,
        len_lo,
        padding,
        0,
    ]);
    out.extend_from_slice(content);
    out.resize(out.len() + usize::from(padding), 0);
}

impl Step {
    /// Appends what the client sends for this step; `Reply` sends nothing.
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Step::Begin {
                id,
                responder,
                role,
                flags,
            } => {
                let role = if *responder { ROLE_RESPONDER } else { *role };
                let [r_hi, r_lo] = role.to_be_bytes();
                let body = [r_hi, r_lo, *flags, 0, 0, 0, 0, 0];
                encode_record(record_type::BEGIN_REQUEST, id.get(), &body, out);
            }
            Step::Params { id, pairs, cut } => {
                let mut stream = Vec::new();
                for (name, value) in pairs {
                    encode_pair(name, value, &mut stream);
                }
                for chunk in stream.chunks(usize::from(*cut) + 1) {
                    encode_record(record_type::PARAMS, id.get(), chunk, out);
                }
            }
            Step::ParamsRaw { id, bytes } => record(record_type::PARAMS, id.get(), bytes, 0, out),
            Step::ParamsEnd { id } => encode_record(record_type::PARAMS, id.get(), b"", out),
            Step::Stdin { id, len, fill } => {
                let body = vec![*fill; usize::from(*len)];
                encode_record(record_type::STDIN, id.get(), &body, out);
            }
            Step::StdinEnd { id } => encode_record(record_type::STDIN, id.get(), b"", out),
            Step::Abort { id } => encode_record(record_type::ABORT_REQUEST, id.get(), b"", out),
            Step::Data { id, content } => record(record_type::DATA, id.get(), content, 3, out),
            Step::GetValues { names } => {
                let mut stream = Vec::new();
                for name in names {
                    encode_pair(name, b"", &mut stream);
                }
                record(record_type::GET_VALUES, 0, &stream, 0, out);
            }
            Step::Record {
                kind,
                id,
                content,
                padding,
            } => record(*kind, id.get(), content, *padding, out),
            Step::Raw(bytes) => out.extend_from_slice(bytes),
            Step::Reply { .. } => {}
        }
    }
}

/// What the client sent a request the decoder accepted, by this account.
#[derive(Debug)]
struct Sent {
    keep_conn: bool,
    params: Vec<u8>,
    params_done: bool,
    body: Vec<u8>,
    body_len: u64,
    /// The effective body limit.
    limit: u64,
    /// Emitted or aborted: the decoder holds nothing for it any more.
    over: bool,
}

/// One connection as the daemon runs it, with the account of what was sent.
struct Connection<'a> {
    limits: &'a Limits,
    decoder: Decoder,
    inbuf: Vec<u8>,
    sent: HashMap<u16, Sent>,
    /// Requests emitted and waiting for their reply (the daemon's `in_flight`).
    in_flight: HashSet<u16>,
    screens: &'a [Screen],
    screened: usize,
    closed: bool,
    requests: usize,
}

impl<'a> Connection<'a> {
    fn new(limits: &'a Limits, screens: &'a [Screen]) -> Connection<'a> {
        Connection {
            limits,
            decoder: Decoder::new(limits.clone()),
            inbuf: Vec::new(),
            sent: HashMap::new(),
            in_flight: HashSet::new(),
            screens,
            screened: 0,
            closed: false,
            requests: 0,
        }
    }

    fn next_screen(&mut self) -> Screen {
        if self.screens.is_empty() {
            return Screen {
                body_limit: luafcgid_policy::Policy::default().body as u32,
                limited: false,
            };
        }
        let s = self.screens[self.screened % self.screens.len()];
        self.screened += 1;
        s
    }

    /// The reply to `id` is written.
    fn reply(&mut self, id: u16) {
        if self.in_flight.remove(&id) {
            self.decoder.finish(id);
            self.sent.remove(&id);
        }
    }

    /// Reads `bytes` (as one read) and decodes every whole record, as the daemon's
    /// connection loop does. A protocol error closes the connection.
    fn read(&mut self, bytes: &[u8]) {
        if self.closed {
            return;
        }
        self.inbuf.extend_from_slice(bytes);
        let mut start = 0;
        loop {
            let buf = &self.inbuf[start..];
            let (used, event) = match self.decoder.decode(buf) {
                Ok(Status::Partial) => {
                    if let Status::Complete(h) = parse_header(buf) {
                        assert!(buf.len() < h.record_len(), "a whole record left undecoded");
                    }
                    break;
                }
                Ok(Status::Complete(done)) => done,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    self.closed = true;
                    break;
                }
            };
            let Status::Complete(header) = parse_header(buf) else {
                panic!("a record decoded from less than a header");
            };
            assert_eq!(used, header.record_len());
            let content = buf[HEADER_LEN..][..usize::from(header.content_length)].to_vec();
            start += used;
            self.account(header.kind, header.request_id, &content, &event);
            if let Some(event) = event {
                self.on_event(event);
            }
            self.check_memory();
        }
        self.inbuf.drain(..start);
    }

    /// Updates the account with a record the decoder took without error.
    fn account(&mut self, kind: u8, id: u16, content: &[u8], event: &Option<Event>) {
        let max_body = self.limits.max_body_bytes;
        match kind {
            record_type::BEGIN_REQUEST if event.is_none() => {
                let previous = self.sent.insert(
                    id,
                    Sent {
                        keep_conn: content[2] & 1 != 0,
                        params: Vec::new(),
                        params_done: false,
                        body: Vec::new(),
                        body_len: 0,
                        limit: max_body,
                        over: false,
                    },
                );
                assert!(previous.is_none(), "request {id} accepted while active");
            }
            record_type::PARAMS => {
                if let Some(s) = self.sent.get_mut(&id).filter(|s| !s.over) {
                    if content.is_empty() {
                        s.params_done = true;
                    } else {
                        assert!(!s.params_done, "params after their end accepted");
                        s.params.extend_from_slice(content);
                    }
                }
            }
            record_type::STDIN if !content.is_empty() => {
                if let Some(s) = self.sent.get_mut(&id).filter(|s| !s.over) {
                    assert!(s.params_done, "body before the end of params accepted");
                    s.body_len += content.len() as u64;
                    if s.body_len <= s.limit {
                        s.body.extend_from_slice(content);
                    } else {
                        s.body = Vec::new();
                    }
                }
            }
            _ => {}
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::ParamsComplete { id } => {
                let params = self.decoder.params(id).expect("params of a complete id");
                let sent = self
                    .sent
                    .get(&id)
                    .expect("params completed for an accepted id");
                assert_eq!(Ok(params), Params::decode(sent.params.clone()).as_ref());
                let screen = self.next_screen();
                if screen.limited {
                    self.decoder.finish(id);
                    self.sent.remove(&id);
                } else {
                    self.decoder
                        .set_body_limit(id, u64::from(screen.body_limit));
                    let s = self.sent.get_mut(&id).expect("still accepted");
                    s.limit = u64::from(screen.body_limit).min(self.limits.max_body_bytes);
                }
            }
            Event::Request(r) => {
                self.requests += 1;
                let s = self
                    .sent
                    .get_mut(&r.id)
                    .expect("a request for an accepted id");
                assert!(!s.over, "request {} emitted twice or after an abort", r.id);
                s.over = true;
                assert_eq!(r.keep_conn, s.keep_conn);
                assert_eq!(r.params, Params::decode(std::mem::take(&mut s.params)));
                if let Ok(p) = &r.params {
                    assert!(p.raw_len() <= self.limits.max_params_bytes);
                }
                assert_eq!(r.body_len, s.body_len);
                assert_eq!(r.body_exceeded, s.body_len > s.limit);
                if r.body_exceeded {
                    assert!(r.body.is_empty());
                } else {
                    assert!(r.body == s.body, "body of request {} differs", r.id);
                }
                assert!(r.body.len() as u64 <= self.limits.max_body_bytes);
                self.in_flight.insert(r.id);
            }
            Event::Abort { id } => {
                let s = self.sent.get_mut(&id).expect("an abort for an accepted id");
                s.over = true;
                s.body = Vec::new();
                if !self.in_flight.contains(&id) {
                    // Aborted while being assembled: answered at once.
                    self.decoder.finish(id);
                    self.sent.remove(&id);
                }
            }
            Event::Rejected { id, .. } => {
                assert!(!self.sent.contains_key(&id), "active request {id} rejected");
            }
            Event::GetValues { .. } | Event::UnknownType { .. } => {}
        }
    }

    /// The decoder holds requests the account knows, and no more memory for them than
    /// the limits allow: while params arrive, `max_params_bytes`; once decoded, that plus
    /// 12 bytes per pair, and the body up to the request's limit; nothing once emitted or
    /// aborted.
    fn check_memory(&self) {
        assert_eq!(self.decoder.active(), self.sent.len());
        assert!(self.decoder.active() <= self.limits.max_requests_per_connection);
        let max_params = self.limits.max_params_bytes as u64;
        let bound: u64 = self
            .sent
            .values()
            .map(|s| match (s.over, s.params_done) {
                (true, _) => 0,
                (false, false) => max_params,
                (false, true) => 7 * max_params + s.limit,
            })
            .sum();
        let held = self.decoder.buffered() as u64;
        assert!(
            held <= bound,
            "decoder holds {held} bytes, limits allow {bound}"
        );
    }
}

/// Read sizes for raw streams: a xorshift sequence from one seed byte.
fn xorshift_reads(seed: u8) -> impl FnMut() -> usize {
    let mut x = 0x9e37_79b9 ^ u32::from(seed).wrapping_mul(0x0101_0101) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        1 + (x as usize) % (32 << 10)
    }
}

/// The `requests` target. `data[0]` even: `data[1]` seeds the read sizes and the rest is
/// the byte stream a client sends (what real front ends send, in the seeds). Odd: the rest
/// is a [`Script`] of steps built with `arbitrary`. Either way: never a panic, every
/// request yielded holds the params and body it was sent (params within
/// `max_params_bytes`, body within its limit or marked exceeded), and the decoder's memory
/// stays within what the limits allow after every record.
pub fn requests(data: &[u8]) {
    let limits = daemon_limits();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let Some((&seed, stream)) = rest.split_first() else {
            return;
        };
        let mut conn = Connection::new(limits, &[]);
        let mut next = xorshift_reads(seed);
        let mut fed = 0;
        while fed < stream.len() && !conn.closed {
            let n = next().min(stream.len() - fed);
            conn.read(&stream[fed..fed + n]);
            fed += n;
        }
        return;
    }
    let Ok(script) = Script::arbitrary_take_rest(Unstructured::new(rest)) else {
        return;
    };
    let mut conn = Connection::new(limits, &script.screens);
    let mut reads = script.reads.iter().cycle();
    let mut wire = Vec::new();
    for step in &script.steps {
        if let Step::Reply { id } = step {
            conn.reply(id.get());
            continue;
        }
        wire.clear();
        step.encode(&mut wire);
        let mut fed = 0;
        while fed < wire.len() && !conn.closed {
            let n = reads
                .next()
                .map_or(wire.len(), |&r| usize::from(r) + 1)
                .min(wire.len() - fed);
            conn.read(&wire[fed..fed + n]);
            fed += n;
        }
        if conn.closed {
            break;
        }
    }
}

/// Keeps only the addresses `ListenAddr::parse` takes without a name lookup: the check
/// makes no DNS queries. The lookup itself is the C library's.
fn without_lookups(addrs: &mut Vec<String>) {
    addrs.retain(|a| {
        let t = a.trim();
        t.is_empty()
            || t.contains('/')
            || t.starts_with(':')
            || t.parse::<std::net::SocketAddr>().is_ok()
            || t.rsplit_once(':').is_none()
    });
}

/// Checks a configuration that validated.
fn check_config(c: &Config) {
    assert!((1024..=64 << 20).contains(&c.max_params));
    assert!((1..=1024).contains(&c.workers));
    assert!((1..=c.workers).contains(&c.tenant_workers));
    assert!(c.states >= 1 && c.queue_max >= 1 && c.max_connections >= 1);
    assert!((100..=599).contains(&c.default_status));
    assert!(
        !c.listen.is_empty() || c.http.is_some(),
        "nothing to listen on"
    );
    assert!(!c.docroots.is_empty() && c.docroots.iter().all(|d| d.is_absolute()));
    for (name, value) in &c.headers {
        assert!(!name.is_empty() && !value.contains(['\r', '\n', '\0']));
    }
    if let Err((key, message)) = check_ceiling(&c.defaults, &c.ceiling) {
        panic!("validated defaults over the ceiling: {key}: {message}");
    }
    let _ = c.operator_policy();
}

/// The `config` target: `data` is a `luafcgid.toml`. Parsed as `serve --config` parses
/// it, then validated twice: as written, and with the document root given on the command
/// line (so that the checks after the document roots are reached). Never a panic; a parse
/// error points at a line of the text; every error has a message; a configuration that
/// validates keeps every documented bound.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // refused when read, before parsing
    };
    let path = Path::new("luafcgid.toml");
    let lines = text.matches('\n').count() + 1;
    let with_root = Overrides {
        docroot: vec![PathBuf::from("/")],
        ..Overrides::default()
    };
    for overrides in [Overrides::default(), with_root] {
        let mut raw = match RawConfig::parse(text, path) {
            Ok(raw) => raw,
            Err(e) => {
                if let luafcgid::config::ConfigError::Parse { line, .. } = &e {
                    assert!(*line <= lines, "parse error on line {line} of {lines}");
                }
                assert!(!e.to_string().is_empty());
                return;
            }
        };
        if let Some(listen) = &mut raw.listen {
            without_lookups(listen);
        }
        if let Some(http) = raw.http.take() {
            let mut one = vec![http];
            without_lookups(&mut one);
            raw.http = one.pop();
        }
        match raw.validate("luafcgid.toml", &overrides) {
            Ok(c) => check_config(&c),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}
