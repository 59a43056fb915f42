//! The per-connection state machine of the responder: records in, [`Event`]s out.
//!
//! A request id goes through these phases, kept in one slot per active id:
//! `BEGIN_REQUEST` → PARAMS records (raw bytes appended, capped) → empty PARAMS
//! (pairs decoded; [`Event::ParamsComplete`]) → STDIN records (body appended up
//! to its limit, then only counted) → empty STDIN ([`Event::Request`]) → the
//! caller answers and calls [`Decoder::finish`]. `ABORT_REQUEST` moves any phase
//! to aborted ([`Event::Abort`]; buffers freed) until `finish`. Records for ids
//! that are not active are ignored, as the specification asks.
//!
//! It does not write answers, time anything out, or look inside params.

use std::mem;

use crate::{
    parse_header, record_type, Error, Header, Limits, Params, ParamsError, ProtocolStatus, Status,
    FCGI_VERSION_1, FLAG_KEEP_CONN, HEADER_LEN, ROLE_RESPONDER,
};

/// A fully assembled request: params decoded (or not) and the body read.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Request id; stays active in the decoder until [`Decoder::finish`].
    pub id: u16,
    /// `FCGI_KEEP_CONN` was set: keep the connection open after the response.
    pub keep_conn: bool,
    /// The params, or why their stream was malformed (answer 400).
    pub params: Result<Params, ParamsError>,
    /// The body; empty when `body_exceeded`.
    pub body: Vec<u8>,
    /// More than the body limit arrived (answer 413).
    pub body_exceeded: bool,
    /// STDIN bytes received, counted even when discarded.
    pub body_len: u64,
}

/// Something the caller must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The params of `id` were decoded: [`Decoder::params`] and
    /// [`Decoder::set_body_limit`] are meaningful now (before the body arrives).
    /// Not emitted when the params are malformed; the [`Request`] carries the error.
    ParamsComplete {
        /// Request id.
        id: u16,
    },
    /// The empty STDIN arrived: the request is complete. The id stays active
    /// until [`Decoder::finish`].
    Request(Request),
    /// `ABORT_REQUEST` for an active id (also while its response is pending).
    /// Answer with `END_REQUEST` and call [`Decoder::finish`].
    Abort {
        /// Request id.
        id: u16,
    },
    /// A `BEGIN_REQUEST` was refused: answer `END_REQUEST` with this status. The id
    /// is not active; its other records are ignored.
    Rejected {
        /// Request id.
        id: u16,
        /// Why: `UnknownRole` or `CantMpxConn`.
        status: ProtocolStatus,
    },
    /// A `GET_VALUES` management record asking for these names.
    GetValues {
        /// Names requested, in order.
        names: Vec<Vec<u8>>,
    },
    /// A record of a type this codec does not know; answer with
    /// [`encode_unknown_type`](crate::encode_unknown_type).
    UnknownType {
        /// The unknown type.
        kind: u8,
    },
}

#[derive(Debug)]
enum Phase {
    /// PARAMS stream arriving.
    Params { raw: Vec<u8> },
    /// Params ended; STDIN arriving.
    Stdin { params: Result<Params, ParamsError> },
    /// [`Event::Request`] emitted; waiting for `finish`.
    Emitted,
    /// `ABORT_REQUEST` seen; waiting for `finish`.
    Aborted,
}

#[derive(Debug)]
struct Slot {
    id: u16,
    keep_conn: bool,
    records: u32,
    phase: Phase,
    body: Vec<u8>,
    body_limit: u64,
    body_len: u64,
    body_exceeded: bool,
}

impl Slot {
    fn exceed_body(&mut self) {
        self.body_exceeded = true;
        self.body = Vec::new();
    }
}

/// Appends `data` to `buf`, growing geometrically but never past `cap` bytes of
/// capacity. The caller has checked that `buf.len() + data.len() <= cap`.
fn append_capped(buf: &mut Vec<u8>, data: &[u8], cap: usize) {
    let needed = buf.len() + data.len();
    if needed > buf.capacity() {
        let target = needed.max(buf.capacity().saturating_mul(2)).min(cap);
        buf.reserve_exact(target - buf.len());
    }
    buf.extend_from_slice(data);
}

/// The responder side of one connection.
///
/// Feed [`decode`](Decoder::decode) the unconsumed bytes read so far; it
/// consumes at most one record per call. Drop the consumed prefix, act on the
/// event, and call again until [`Status::Partial`]. Any [`Error`] means: close
/// the connection.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    slots: Vec<Slot>,
}

impl Decoder {
    /// A decoder for a new connection.
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            limits,
            slots: Vec::new(),
        }
    }

    /// The limits this decoder enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Decodes at most one whole record (header, content and padding) from the
    /// start of `buf`, returning the bytes it took and the event, if any.
    /// [`Status::Partial`] when `buf` does not hold a whole record yet (a record is
    /// at most 65,798 bytes). A bad version is reported as soon as the header is in.
    pub fn decode(&mut self, buf: &[u8]) -> Result<Status<(usize, Option<Event>)>, Error> {
        let header = match parse_header(buf) {
            Status::Complete(h) => h,
            Status::Partial => return Ok(Status::Partial),
        };
        if header.version != FCGI_VERSION_1 {
            return Err(Error::UnsupportedVersion(header.version));
        }
        let total = header.record_len();
        let Some(record) = buf.get(..total) else {
            return Ok(Status::Partial);
        };
        let content = &record[HEADER_LEN..HEADER_LEN + usize::from(header.content_length)];
        let event = self.on_record(&header, content)?;
        Ok(Status::Complete((total, event)))
    }

    /// The decoded params of `id`, between [`Event::ParamsComplete`] and
    /// [`Event::Request`] (which moves them out).
    pub fn params(&self, id: u16) -> Option<&Params> {
        match &self.slot(id)?.phase {
            Phase::Stdin { params: Ok(p) } => Some(p),
            _ => None,
        }
    }

    /// Caps the body buffered for `id` at `min(limit, max_body_bytes)`. STDIN
    /// beyond it is counted in [`Request::body_len`] and discarded, and
    /// [`Request::body_exceeded`] is set; a body already past the new limit is
    /// freed at once. Unknown ids are ignored.
    pub fn set_body_limit(&mut self, id: u16, limit: u64) {
        let effective = limit.min(self.limits.max_body_bytes);
        if let Some(slot) = self.slot_mut(id) {
            slot.body_limit = effective;
            if !slot.body_exceeded && slot.body_len > effective {
                slot.exceed_body();
            }
        }
    }

    /// The response for `id` is written (or the id was aborted): the id is free
    /// for a new `BEGIN_REQUEST`, and everything held for it is dropped.
    pub fn finish(&mut self, id: u16) {
        if let Some(i) = self.index(id) {
            self.slots.swap_remove(i);
        }
    }

    /// Ids begun and not finished (assembling, answered-pending or aborted).
    pub fn active(&self) -> usize {
        self.slots.len()
    }

    /// Whether some request has begun whose STDIN has not ended (and was not
    /// aborted): the connection is mid-request, so a read timeout applies.
    pub fn assembling(&self) -> bool {
        self.slots
            .iter()
            .any(|s| matches!(s.phase, Phase::Params { .. } | Phase::Stdin { .. }))
    }

    /// Heap bytes held for active requests (params and bodies), for memory
    /// accounting. Bounded as [`Limits`] describes.
    pub fn buffered(&self) -> usize {
        self.slots
            .iter()
            .map(|s| {
                s.body.capacity()
                    + match &s.phase {
                        Phase::Params { raw } => raw.capacity(),
                        Phase::Stdin { params: Ok(p) } => p.heap_size(),
                        _ => 0,
                    }
            })
            .sum()
    }

    fn index(&self, id: u16) -> Option<usize> {
        self.slots.iter().position(|s| s.id == id)
    }

    fn slot(&self, id: u16) -> Option<&Slot> {
        self.slots.iter().find(|s| s.id == id)
    }

    fn slot_mut(&mut self, id: u16) -> Option<&mut Slot> {
        self.slots.iter_mut().find(|s| s.id == id)
    }

    fn on_record(&mut self, header: &Header, content: &[u8]) -> Result<Option<Event>, Error> {
        let id = header.request_id;
        match header.kind {
            record_type::GET_VALUES => {
                if id != 0 {
                    return Err(Error::BadManagementRecord);
                }
                let pairs =
                    Params::decode(content.to_vec()).map_err(|_| Error::BadManagementRecord)?;
                let names = pairs.iter().map(|(n, _)| n.to_vec()).collect();
                Ok(Some(Event::GetValues { names }))
            }
            record_type::BEGIN_REQUEST
            | record_type::ABORT_REQUEST
            | record_type::PARAMS
            | record_type::STDIN
            | record_type::DATA => {
                if id == 0 {
                    return Err(Error::BadManagementRecord);
                }
                if header.kind == record_type::BEGIN_REQUEST {
                    self.begin(id, content)
                } else {
                    self.on_request_record(header.kind, id, content)
                }
            }
            // Types only an application sends.
            record_type::END_REQUEST
            | record_type::STDOUT
            | record_type::STDERR
            | record_type::GET_VALUES_RESULT
            | record_type::UNKNOWN_TYPE => Err(Error::UnexpectedRecord {
                id,
                kind: header.kind,
            }),
            kind => Ok(Some(Event::UnknownType { kind })),
        }
    }

    fn begin(&mut self, id: u16, content: &[u8]) -> Result<Option<Event>, Error> {
        let Some(body) = content.first_chunk::<8>() else {
            return Err(Error::BadBeginRequest);
        };
        if self.index(id).is_some() {
            return Err(Error::DuplicateRequest(id));
        }
        let role = u16::from_be_bytes([body[0], body[1]]);
        if role != ROLE_RESPONDER {
            return Ok(Some(Event::Rejected {
                id,
                status: ProtocolStatus::UnknownRole,
            }));
        }
        if self.slots.len() >= self.limits.max_requests_per_connection {
            return Ok(Some(Event::Rejected {
                id,
                status: ProtocolStatus::CantMpxConn,
            }));
        }
        if self.limits.max_records_per_request == 0 {
            return Err(Error::TooManyRecords { limit: 0 });
        }
        self.slots.push(Slot {
            id,
            keep_conn: body[2] & FLAG_KEEP_CONN != 0,
            records: 1,
            phase: Phase::Params { raw: Vec::new() },
            body: Vec::new(),
            body_limit: self.limits.max_body_bytes,
            body_len: 0,
            body_exceeded: false,
        });
        Ok(None)
    }

    fn on_request_record(
        &mut self,
        kind: u8,
        id: u16,
        content: &[u8],
    ) -> Result<Option<Event>, Error> {
        let limits = &self.limits;
        let Some(slot) = self.slots.iter_mut().find(|s| s.id == id) else {
            return Ok(None); // not active: ignored
        };
        slot.records += 1;
        if slot.records > limits.max_records_per_request {
            return Err(Error::TooManyRecords {
                limit: limits.max_records_per_request,
            });
        }
        let unexpected = Err(Error::UnexpectedRecord { id, kind });
        match kind {
            record_type::ABORT_REQUEST => {
                if matches!(slot.phase, Phase::Aborted) {
                    return Ok(None);
                }
                slot.phase = Phase::Aborted;
                slot.body = Vec::new();
                Ok(Some(Event::Abort { id }))
            }
            record_type::PARAMS => match &mut slot.phase {
                Phase::Params { raw } if content.is_empty() => {
                    let params = Params::decode(mem::take(raw));
                    let ok = params.is_ok();
                    slot.phase = Phase::Stdin { params };
                    Ok(ok.then_some(Event::ParamsComplete { id }))
                }
                Phase::Params { raw } => {
                    if raw.len() + content.len() > limits.max_params_bytes {
                        return Err(Error::ParamsTooLarge {
                            limit: limits.max_params_bytes,
                        });
                    }
                    append_capped(raw, content, limits.max_params_bytes);
                    Ok(None)
                }
                Phase::Aborted => Ok(None),
                // A repeated end of stream is harmless; more data is not.
                Phase::Stdin { .. } | Phase::Emitted if content.is_empty() => Ok(None),
                Phase::Stdin { .. } | Phase::Emitted => unexpected,
            },
            record_type::STDIN if content.is_empty() => {
                match mem::replace(&mut slot.phase, Phase::Emitted) {
                    Phase::Stdin { params } => Ok(Some(Event::Request(Request {
                        id,
                        keep_conn: slot.keep_conn,
                        params,
                        body: mem::take(&mut slot.body),
                        body_exceeded: slot.body_exceeded,
                        body_len: slot.body_len,
                    }))),
                    Phase::Params { raw } => {
                        slot.phase = Phase::Params { raw };
                        unexpected
                    }
                    // Some clients send a second empty STDIN; after an abort
                    // everything is ignored.
                    other => {
                        slot.phase = other;
                        Ok(None)
                    }
                }
            }
            record_type::STDIN => match &slot.phase {
                Phase::Params { .. } | Phase::Emitted => unexpected,
                Phase::Stdin { .. } => {
                    let n = content.len() as u64;
                    slot.body_len = slot.body_len.saturating_add(n);
                    if !slot.body_exceeded {
                        if slot.body_len > slot.body_limit {
                            slot.exceed_body();
                        } else {
                            let cap = usize::try_from(slot.body_limit).unwrap_or(usize::MAX);
                            append_capped(&mut slot.body, content, cap);
                        }
                    }
                    Ok(None)
                }
                Phase::Aborted => Ok(None),
            },
            // DATA (the filter role's second stream): ignored by responders.
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{
        encode_abort, encode_begin_request, encode_get_values, encode_params, encode_request,
        encode_stdin,
    };
    use crate::{encode_pair, encode_record, ROLE_AUTHORIZER};

    /// Decodes every whole record in `buf`, asserting all of it was consumed.
    fn feed(dec: &mut Decoder, mut buf: &[u8]) -> Result<Vec<Event>, Error> {
        let mut events = Vec::new();
        while let Status::Complete((n, ev)) = dec.decode(buf)? {
            assert!(n >= HEADER_LEN && n <= buf.len());
            buf = &buf[n..];
            events.extend(ev);
        }
        assert!(buf.is_empty(), "{} bytes left undecoded", buf.len());
        Ok(events)
    }

    fn only_request(events: Vec<Event>) -> Request {
        let mut requests: Vec<Request> = events
            .into_iter()
            .filter_map(|e| match e {
                Event::Request(r) => Some(r),
                _ => None,
            })
            .collect();
        assert_eq!(requests.len(), 1, "expected exactly one request");
        requests.remove(0)
    }

    fn nginx_pairs() -> Vec<(&'static [u8], &'static [u8])> {
        vec![
            (b"QUERY_STRING", b"a=1&b=2"),
            (b"REQUEST_METHOD", b"GET"),
            (b"CONTENT_TYPE", b""),
            (b"CONTENT_LENGTH", b""),
            (b"SCRIPT_FILENAME", b"/srv/www/hello.lua"),
            (b"SCRIPT_NAME", b"/hello.lua"),
            (b"REQUEST_URI", b"/hello.lua?a=1&b=2"),
            (b"DOCUMENT_URI", b"/hello.lua"),
            (b"DOCUMENT_ROOT", b"/srv/www"),
            (b"SERVER_PROTOCOL", b"HTTP/1.1"),
            (b"REQUEST_SCHEME", b"http"),
            (b"GATEWAY_INTERFACE", b"CGI/1.1"),
            (b"SERVER_SOFTWARE", b"nginx/1.22.1"),
            (b"REMOTE_ADDR", b"127.0.0.1"),
            (b"REMOTE_PORT", b"51234"),
            (b"SERVER_ADDR", b"127.0.0.1"),
            (b"SERVER_PORT", b"80"),
            (b"SERVER_NAME", b"localhost"),
            (b"REDIRECT_STATUS", b"200"),
            (b"HTTP_HOST", b"localhost"),
            (b"HTTP_USER_AGENT", b"wrk"),
            (b"HTTP_ACCEPT", b"*/*"),
        ]
    }

    fn raw_pairs(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut raw = Vec::new();
        for (n, v) in pairs {
            encode_pair(n, v, &mut raw);
        }
        raw
    }

    /// A record with explicit padding (encode_record always pads minimally).
    fn record_with_padding(kind: u8, id: u16, content: &[u8], pad: u8, out: &mut Vec<u8>) {
        let [i0, i1] = id.to_be_bytes();
        let [l0, l1] = (content.len() as u16).to_be_bytes();
        out.extend_from_slice(&[1, kind, i0, i1, l0, l1, pad, 0]);
        out.extend_from_slice(content);
        out.extend(std::iter::repeat_n(0xee, usize::from(pad)));
    }

    fn begin(id: u16, out: &mut Vec<u8>) {
        encode_begin_request(id, ROLE_RESPONDER, FLAG_KEEP_CONN, out);
    }

    #[test]
    fn nginx_style_request_round_trips() {
        let pairs = nginx_pairs();
        let mut wire = Vec::new();
        encode_request(1, true, pairs.iter().copied(), b"", &mut wire);
        let mut dec = Decoder::new(Limits::default());
        let events = feed(&mut dec, &wire).unwrap();
        assert!(matches!(events[0], Event::ParamsComplete { id: 1 }));
        let r = only_request(events);
        assert_eq!(r.id, 1);
        assert!(r.keep_conn);
        assert!(r.body.is_empty());
        assert_eq!(r.body_len, 0);
        assert!(!r.body_exceeded);
        let params = r.params.unwrap();
        assert_eq!(params.len(), pairs.len());
        assert_eq!(params.iter().collect::<Vec<_>>(), pairs);
        assert_eq!(
            params.get(b"SCRIPT_FILENAME"),
            Some(&b"/srv/www/hello.lua"[..])
        );
        assert_eq!(dec.active(), 1);
        assert!(!dec.assembling());
        dec.finish(1);
        assert_eq!(dec.active(), 0);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn keep_conn_flag_off_is_reported() {
        let mut wire = Vec::new();
        encode_request(1, false, [(&b"A"[..], &b"1"[..])], b"", &mut wire);
        let r = only_request(feed(&mut Decoder::new(Limits::default()), &wire).unwrap());
        assert!(!r.keep_conn);
    }

    #[test]
    fn padding_of_any_length_is_skipped() {
        for pad in [0u8, 1, 7, 8, 255] {
            let mut wire = Vec::new();
            record_with_padding(
                record_type::BEGIN_REQUEST,
                1,
                &[0, 1, 0, 0, 0, 0, 0, 0],
                pad,
                &mut wire,
            );
            let raw = raw_pairs(&[(b"SCRIPT_FILENAME", b"/a.lua")]);
            record_with_padding(record_type::PARAMS, 1, &raw, pad, &mut wire);
            record_with_padding(record_type::PARAMS, 1, &[], pad, &mut wire);
            record_with_padding(record_type::STDIN, 1, b"body", pad, &mut wire);
            record_with_padding(record_type::STDIN, 1, &[], pad, &mut wire);
            let r = only_request(feed(&mut Decoder::new(Limits::default()), &wire).unwrap());
            assert_eq!(
                r.params.unwrap().get(b"SCRIPT_FILENAME"),
                Some(&b"/a.lua"[..])
            );
            assert_eq!(r.body, b"body");
        }
    }

    #[test]
    fn pairs_split_at_every_byte_offset_reassemble() {
        let pairs: Vec<(&[u8], &[u8])> = vec![
            (b"SCRIPT_FILENAME", b"/srv/www/x.lua"),
            (b"HTTP_COOKIE", &[b'c'; 200]),
            (b"Q", b""),
        ];
        let raw = raw_pairs(&pairs);
        for cut in 1..raw.len() {
            let mut wire = Vec::new();
            begin(1, &mut wire);
            encode_record(record_type::PARAMS, 1, &raw[..cut], &mut wire);
            encode_record(record_type::PARAMS, 1, &raw[cut..], &mut wire);
            encode_record(record_type::PARAMS, 1, &[], &mut wire);
            encode_stdin(1, b"", &mut wire);
            let r = only_request(feed(&mut Decoder::new(Limits::default()), &wire).unwrap());
            let params = r.params.unwrap();
            assert_eq!(params.iter().collect::<Vec<_>>(), pairs, "cut at {cut}");
        }
    }

    #[test]
    fn params_one_byte_per_record_reassemble() {
        let pairs = nginx_pairs();
        let raw = raw_pairs(&pairs);
        let mut wire = Vec::new();
        begin(1, &mut wire);
        for b in &raw {
            encode_record(record_type::PARAMS, 1, std::slice::from_ref(b), &mut wire);
        }
        encode_record(record_type::PARAMS, 1, &[], &mut wire);
        encode_stdin(1, b"", &mut wire);
        let r = only_request(feed(&mut Decoder::new(Limits::default()), &wire).unwrap());
        assert_eq!(r.params.unwrap().iter().collect::<Vec<_>>(), pairs);
    }

    #[test]
    fn four_byte_lengths_and_params_over_64k() {
        let cookie = vec![b'k'; 70_000];
        let name = vec![b'N'; 130];
        let mut wire = Vec::new();
        encode_request(
            1,
            true,
            [(&name[..], &b"v"[..]), (&b"HTTP_COOKIE"[..], &cookie[..])],
            b"",
            &mut wire,
        );
        let r = only_request(feed(&mut Decoder::new(Limits::default()), &wire).unwrap());
        let params = r.params.unwrap();
        assert_eq!(params.get(&name), Some(&b"v"[..]));
        assert_eq!(params.get(b"HTTP_COOKIE"), Some(&cookie[..]));
    }

    #[test]
    fn stdin_records_of_any_size_concatenate() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        for chunk in [1usize, 7, 8184, 32 * 1024, 65535] {
            let mut wire = Vec::new();
            begin(1, &mut wire);
            encode_params(1, [(&b"A"[..], &b"1"[..])], &mut wire);
            let limit = if chunk == 1 { 5000 } else { body.len() };
            for c in body[..limit].chunks(chunk) {
                encode_record(record_type::STDIN, 1, c, &mut wire);
            }
            encode_record(record_type::STDIN, 1, &[], &mut wire);
            let r = only_request(feed(&mut Decoder::new(Limits::default()), &wire).unwrap());
            assert_eq!(r.body, &body[..limit], "chunk {chunk}");
            assert_eq!(r.body_len, limit as u64);
        }
    }

    #[test]
    fn repeated_empty_stdin_is_ignored() {
        let mut wire = Vec::new();
        encode_request(1, true, [(&b"A"[..], &b"1"[..])], b"x", &mut wire);
        encode_record(record_type::STDIN, 1, &[], &mut wire);
        encode_record(record_type::PARAMS, 1, &[], &mut wire);
        let mut dec = Decoder::new(Limits::default());
        let events = feed(&mut dec, &wire).unwrap();
        assert_eq!(events.len(), 2, "{events:?}"); // ParamsComplete, Request
        assert_eq!(only_request(events).body, b"x");
        assert_eq!(dec.active(), 1);
    }

    #[test]
    fn stdin_data_after_the_end_is_an_error() {
        let mut wire = Vec::new();
        encode_request(1, true, [(&b"A"[..], &b"1"[..])], b"", &mut wire);
        encode_record(record_type::STDIN, 1, b"late", &mut wire);
        assert_eq!(
            feed(&mut Decoder::new(Limits::default()), &wire).unwrap_err(),
            Error::UnexpectedRecord {
                id: 1,
                kind: record_type::STDIN
            }
        );
    }

    #[test]
    fn data_records_are_ignored_including_a_trailing_empty_one() {
        let mut wire = Vec::new();
        begin(1, &mut wire);
        encode_record(record_type::DATA, 1, b"early", &mut wire);
        encode_params(1, [(&b"A"[..], &b"1"[..])], &mut wire);
        encode_record(record_type::DATA, 1, b"filter data", &mut wire);
        encode_stdin(1, b"body", &mut wire);
        encode_record(record_type::DATA, 1, &[], &mut wire);
        let mut dec = Decoder::new(Limits::default());
        let events = feed(&mut dec, &wire).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(only_request(events).body, b"body");
    }

    #[test]
    fn records_for_inactive_ids_are_ignored() {
        let mut wire = Vec::new();
        encode_record(record_type::PARAMS, 9, b"\x01\x01ab", &mut wire);
        encode_record(record_type::STDIN, 9, b"zz", &mut wire);
        encode_record(record_type::STDIN, 9, &[], &mut wire);
        encode_abort(9, &mut wire);
        encode_record(record_type::DATA, 9, &[], &mut wire);
        let mut dec = Decoder::new(Limits::default());
        assert!(feed(&mut dec, &wire).unwrap().is_empty());
        assert_eq!(dec.active(), 0);
    }

    #[test]
    fn unknown_types_are_reported_for_any_id() {
        let mut wire = Vec::new();
        encode_record(0, 0, &[], &mut wire);
        encode_record(12, 0, b"x", &mut wire);
        encode_record(200, 3, b"abc", &mut wire);
        let events = feed(&mut Decoder::new(Limits::default()), &wire).unwrap();
        let kinds: Vec<u8> = events
            .iter()
            .map(|e| match e {
                Event::UnknownType { kind } => *kind,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(kinds, vec![0, 12, 200]);
    }

    #[test]
    fn application_side_types_from_the_client_are_errors() {
        for kind in [
            record_type::END_REQUEST,
            record_type::STDOUT,
            record_type::STDERR,
            record_type::GET_VALUES_RESULT,
            record_type::UNKNOWN_TYPE,
        ] {
            let mut wire = Vec::new();
            encode_record(kind, 1, &[0; 8], &mut wire);
            assert_eq!(
                feed(&mut Decoder::new(Limits::default()), &wire).unwrap_err(),
                Error::UnexpectedRecord { id: 1, kind }
            );
        }
    }

    #[test]
    fn request_records_on_id_zero_and_get_values_on_a_request_id_are_errors() {
        for kind in [
            record_type::BEGIN_REQUEST,
            record_type::PARAMS,
            record_type::STDIN,
            record_type::ABORT_REQUEST,
            record_type::DATA,
        ] {
            let mut wire = Vec::new();
            encode_record(kind, 0, &[0, 1, 0, 0, 0, 0, 0, 0], &mut wire);
            assert_eq!(
                feed(&mut Decoder::new(Limits::default()), &wire).unwrap_err(),
                Error::BadManagementRecord
            );
        }
        let mut wire = Vec::new();
        encode_record(record_type::GET_VALUES, 1, &[], &mut wire);
        assert_eq!(
            feed(&mut Decoder::new(Limits::default()), &wire).unwrap_err(),
            Error::BadManagementRecord
        );
    }

    #[test]
    fn unknown_role_is_rejected_and_its_records_ignored() {
        for role in [0, ROLE_AUTHORIZER, crate::ROLE_FILTER, 0xffff] {
            let mut wire = Vec::new();
            encode_begin_request(1, role, FLAG_KEEP_CONN, &mut wire);
            encode_params(1, [(&b"A"[..], &b"1"[..])], &mut wire);
            encode_stdin(1, b"x", &mut wire);
            let mut dec = Decoder::new(Limits::default());
            let events = feed(&mut dec, &wire).unwrap();
            assert_eq!(events.len(), 1);
            assert!(matches!(
                events[0],
                Event::Rejected {
                    id: 1,
                    status: ProtocolStatus::UnknownRole
                }
            ));
            assert_eq!(dec.active(), 0);
        }
    }

    #[test]
    fn get_values_lists_names() {
        let mut wire = Vec::new();
        encode_get_values(
            &[b"FCGI_MAX_CONNS", b"FCGI_MAX_REQS", b"FCGI_MPXS_CONNS"],
            &mut wire,
        );
        let events = feed(&mut Decoder::new(Limits::default()), &wire).unwrap();
        let [Event::GetValues { names }] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!(
            names,
            &vec![
                b"FCGI_MAX_CONNS".to_vec(),
                b"FCGI_MAX_REQS".to_vec(),
                b"FCGI_MPXS_CONNS".to_vec()
            ]
        );
    }

    #[test]
    fn malformed_get_values_is_an_error() {
        let mut wire = Vec::new();
        encode_record(record_type::GET_VALUES, 0, &[5, 0, b'a'], &mut wire);
        assert_eq!(
            feed(&mut Decoder::new(Limits::default()), &wire).unwrap_err(),
            Error::BadManagementRecord
        );
    }

    #[test]
    fn abort_while_assembling_frees_and_ignores_the_rest() {
        let mut wire = Vec::new();
        begin(1, &mut wire);
        encode_params(1, [(&b"A"[..], &b"1"[..])], &mut wire);
        encode_record(record_type::STDIN, 1, b"partial body", &mut wire);
        encode_abort(1, &mut wire);
        encode_abort(1, &mut wire); // a second abort: nothing new
        encode_stdin(1, b"more", &mut wire);
        let mut dec = Decoder::new(Limits::default());
        let events = feed(&mut dec, &wire).unwrap();
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(matches!(events[0], Event::ParamsComplete { id: 1 }));
        assert!(matches!(events[1], Event::Abort { id: 1 }));
        assert_eq!(dec.active(), 1);
        assert!(!dec.assembling());
        assert_eq!(dec.buffered(), 0);
        assert!(dec.params(1).is_none());
        dec.finish(1);
        assert_eq!(dec.active(), 0);
    }

    #[test]
    fn abort_after_request_emitted_is_reported() {
        let mut wire = Vec::new();
        encode_request(3, true, [(&b"A"[..], &b"1"[..])], b"", &mut wire);
        encode_abort(3, &mut wire);
        let events = feed(&mut Decoder::new(Limits::default()), &wire).unwrap();
        assert_eq!(events.len(), 3);
        assert!(matches!(events[2], Event::Abort { id: 3 }));
    }

    #[test]
    fn abort_for_an_inactive_id_is_ignored() {
        let mut wire = Vec::new();
        encode_abort(4, &mut wire);
        assert!(feed(&mut Decoder::new(Limits::default()), &wire)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn duplicate_begin_is_an_error_until_finish() {
        let mut wire = Vec::new();
        encode_request(1, true, [(&b"A"[..], &b"1"[..])], b"", &mut wire);
        let mut dec = Decoder::new(Limits::default());
        feed(&mut dec, &wire).unwrap();
        let mut again = Vec::new();
        begin(1, &mut again);
        assert_eq!(
            feed(&mut dec, &again).unwrap_err(),
            Error::DuplicateRequest(1)
        );
        // After finish the id is free again (keep-alive reuse, as nginx does).
        dec.finish(1);
        let r = only_request(feed(&mut dec, &wire).unwrap());
        assert_eq!(r.id, 1);
    }

    #[test]
    fn short_begin_request_is_an_error() {
        let mut wire = Vec::new();
        encode_record(
            record_type::BEGIN_REQUEST,
            1,
            &[0, 1, 0, 0, 0, 0, 0],
            &mut wire,
        );
        assert_eq!(
            feed(&mut Decoder::new(Limits::default()), &wire).unwrap_err(),
            Error::BadBeginRequest
        );
        // Longer than 8 is accepted.
        let mut wire = Vec::new();
        encode_record(
            record_type::BEGIN_REQUEST,
            1,
            &[0, 1, 1, 0, 0, 0, 0, 0, 9, 9],
            &mut wire,
        );
        let mut dec = Decoder::new(Limits::default());
        assert!(feed(&mut dec, &wire).unwrap().is_empty());
        assert_eq!(dec.active(), 1);
    }

    #[test]
    fn bad_version_is_an_error_as_soon_as_the_header_is_in() {
        let mut dec = Decoder::new(Limits::default());
        let header = [2, 1, 0, 1, 0, 8, 0, 0];
        assert_eq!(dec.decode(&header), Err(Error::UnsupportedVersion(2)));
        assert_eq!(
            dec.decode(&[0, 1, 0, 1, 0, 0, 0, 0]),
            Err(Error::UnsupportedVersion(0))
        );
    }

    #[test]
    fn every_prefix_of_a_record_is_partial() {
        let mut rec = Vec::new();
        encode_params(1, [(&b"NAME"[..], &b"value!"[..])], &mut rec);
        let first_len = rec.len() - HEADER_LEN; // drop the empty PARAMS
        let mut dec = Decoder::new(Limits::default());
        let mut b = Vec::new();
        begin(1, &mut b);
        feed(&mut dec, &b).unwrap();
        for n in 0..first_len {
            assert_eq!(
                dec.decode(&rec[..n]).unwrap(),
                Status::Partial,
                "prefix {n}"
            );
        }
        let Status::Complete((used, None)) = dec.decode(&rec).unwrap() else {
            panic!()
        };
        assert_eq!(used, first_len);
        assert_eq!(dec.decode(&[]).unwrap(), Status::Partial);
    }

    #[test]
    fn decode_consumes_one_record_at_a_time() {
        let mut wire = Vec::new();
        encode_request(1, true, [(&b"A"[..], &b"1"[..])], b"", &mut wire);
        let mut dec = Decoder::new(Limits::default());
        let Status::Complete((used, ev)) = dec.decode(&wire).unwrap() else {
            panic!()
        };
        assert_eq!(used, 16); // BEGIN_REQUEST only
        assert!(ev.is_none());
    }

    #[test]
    fn params_over_the_limit_are_an_error() {
        let limits = Limits {
            max_params_bytes: 100,
            ..Limits::default()
        };
        // Exactly at the limit is fine.
        let ok = [b'v'; 100 - 2 - 1];
        let mut wire = Vec::new();
        encode_request(1, true, [(&b"A"[..], &ok[..])], b"", &mut wire);
        let r = only_request(feed(&mut Decoder::new(limits.clone()), &wire).unwrap());
        assert_eq!(r.params.unwrap().raw_len(), 100);
        // One byte more, even across records, is not.
        let raw = raw_pairs(&[(b"A", &[b'v'; 98])]);
        let mut wire = Vec::new();
        begin(1, &mut wire);
        encode_record(record_type::PARAMS, 1, &raw[..60], &mut wire);
        encode_record(record_type::PARAMS, 1, &raw[60..], &mut wire);
        assert_eq!(
            feed(&mut Decoder::new(limits), &wire).unwrap_err(),
            Error::ParamsTooLarge { limit: 100 }
        );
    }

    #[test]
    fn too_many_records_is_an_error() {
        let limits = Limits {
            max_records_per_request: 10,
            ..Limits::default()
        };
        // BEGIN + PARAMS + empty PARAMS + 6 STDIN + empty STDIN = 10: fine.
        let mut wire = Vec::new();
        begin(1, &mut wire);
        encode_params(1, [(&b"A"[..], &b"1"[..])], &mut wire);
        for _ in 0..6 {
            encode_record(record_type::STDIN, 1, b"x", &mut wire);
        }
        encode_record(record_type::STDIN, 1, &[], &mut wire);
        let mut dec = Decoder::new(limits.clone());
        assert_eq!(only_request(feed(&mut dec, &wire).unwrap()).body_len, 6);
        // The eleventh record, even an ignored empty STDIN, is one too many.
        let mut extra = Vec::new();
        encode_record(record_type::STDIN, 1, &[], &mut extra);
        assert_eq!(
            feed(&mut dec, &extra).unwrap_err(),
            Error::TooManyRecords { limit: 10 }
        );
    }

    #[test]
    fn body_over_the_limit_is_counted_and_dropped() {
        let mut wire = Vec::new();
        begin(1, &mut wire);
        encode_params(1, [(&b"A"[..], &b"1"[..])], &mut wire);
        let mut dec = Decoder::new(Limits::default());
        let events = feed(&mut dec, &wire).unwrap();
        assert!(matches!(events[..], [Event::ParamsComplete { id: 1 }]));
        assert_eq!(dec.params(1).unwrap().get(b"A"), Some(&b"1"[..]));
        dec.set_body_limit(1, 10);
        let mut body = Vec::new();
        encode_record(record_type::STDIN, 1, b"0123456789", &mut body);
        feed(&mut dec, &body).unwrap();
        assert!(dec.buffered() >= 10);
        assert!(dec.buffered() <= 10 + dec.params(1).unwrap().heap_size());
        let mut more = Vec::new();
        encode_record(record_type::STDIN, 1, b"x", &mut more);
        encode_record(record_type::STDIN, 1, &[b'y'; 1000], &mut more);
        feed(&mut dec, &more).unwrap();
        assert_eq!(dec.buffered(), dec.params(1).unwrap().heap_size());
        let mut end = Vec::new();
        encode_record(record_type::STDIN, 1, &[], &mut end);
        let r = only_request(feed(&mut dec, &end).unwrap());
        assert!(r.body_exceeded);
        assert!(r.body.is_empty());
        assert_eq!(r.body_len, 1011);
        assert!(r.params.is_ok());
    }

    #[test]
    fn body_exactly_at_the_limit_is_kept() {
        let mut wire = Vec::new();
        begin(1, &mut wire);
        encode_params(1, [(&b"A"[..], &b"1"[..])], &mut wire);
        let mut dec = Decoder::new(Limits {
            max_body_bytes: 5,
            ..Limits::default()
        });
        feed(&mut dec, &wire).unwrap();
        dec.set_body_limit(1, 1000); // capped by max_body_bytes
        let mut body = Vec::new();
        encode_stdin(1, b"12345", &mut body);
        let r = only_request(feed(&mut dec, &body).unwrap());
        assert!(!r.body_exceeded);
        assert_eq!(r.body, b"12345");
        assert_eq!(r.body.capacity(), 5);
    }

    #[test]
    fn lowering_the_limit_below_what_arrived_drops_the_body() {
        let mut wire = Vec::new();
        begin(1, &mut wire);
        encode_params(1, [(&b"A"[..], &b"1"[..])], &mut wire);
        encode_record(record_type::STDIN, 1, b"abcdef", &mut wire);
        let mut dec = Decoder::new(Limits::default());
        feed(&mut dec, &wire).unwrap();
        dec.set_body_limit(1, 3);
        let mut end = Vec::new();
        encode_stdin(1, b"g", &mut end);
        let r = only_request(feed(&mut dec, &end).unwrap());
        assert!(r.body_exceeded);
        assert_eq!(r.body_len, 7);
    }

    #[test]
    fn body_buffer_never_grows_past_its_limit() {
        let mut wire = Vec::new();
        begin(1, &mut wire);
        encode_params(1, [(&b"A"[..], &b"1"[..])], &mut wire);
        let mut dec = Decoder::new(Limits::default());
        feed(&mut dec, &wire).unwrap();
        dec.set_body_limit(1, 1000);
        let mut body = Vec::new();
        for _ in 0..9 {
            encode_record(record_type::STDIN, 1, &[b'z'; 111], &mut body);
        }
        encode_record(record_type::STDIN, 1, &[], &mut body);
        let r = only_request(feed(&mut dec, &body).unwrap());
        assert_eq!(r.body.len(), 999);
        assert!(r.body.capacity() <= 1000, "capacity {}", r.body.capacity());
    }

    #[test]
    fn stdin_before_params_end_is_an_error() {
        for body in [&b"x"[..], &b""[..]] {
            let mut wire = Vec::new();
            begin(1, &mut wire);
            encode_record(record_type::PARAMS, 1, b"\x01\x01ab", &mut wire);
            encode_record(record_type::STDIN, 1, body, &mut wire);
            assert_eq!(
                feed(&mut Decoder::new(Limits::default()), &wire).unwrap_err(),
                Error::UnexpectedRecord {
                    id: 1,
                    kind: record_type::STDIN
                }
            );
        }
    }

    #[test]
    fn params_data_after_params_end_is_an_error() {
        let mut wire = Vec::new();
        begin(1, &mut wire);
        encode_params(1, [(&b"A"[..], &b"1"[..])], &mut wire);
        encode_record(record_type::PARAMS, 1, b"\x01\x01bc", &mut wire);
        assert_eq!(
            feed(&mut Decoder::new(Limits::default()), &wire).unwrap_err(),
            Error::UnexpectedRecord {
                id: 1,
                kind: record_type::PARAMS
            }
        );
    }

    #[test]
    fn malformed_params_still_yield_a_request_with_the_error() {
        let mut wire = Vec::new();
        begin(1, &mut wire);
        encode_record(record_type::PARAMS, 1, &[1, 5, b'a', b'b'], &mut wire);
        encode_record(record_type::PARAMS, 1, &[], &mut wire);
        encode_stdin(1, b"body", &mut wire);
        let mut dec = Decoder::new(Limits::default());
        let events = feed(&mut dec, &wire).unwrap();
        assert_eq!(events.len(), 1, "no ParamsComplete: {events:?}");
        let r = only_request(events);
        assert_eq!(r.params.unwrap_err(), ParamsError::LengthOverflow);
        assert_eq!(r.body, b"body");
    }

    #[test]
    fn too_many_concurrent_ids_are_rejected_cant_mpx() {
        let mut dec = Decoder::new(Limits {
            max_requests_per_connection: 2,
            ..Limits::default()
        });
        let mut wire = Vec::new();
        begin(1, &mut wire);
        begin(2, &mut wire);
        begin(3, &mut wire);
        let events = feed(&mut dec, &wire).unwrap();
        assert!(matches!(
            events[..],
            [Event::Rejected {
                id: 3,
                status: ProtocolStatus::CantMpxConn
            }]
        ));
        assert_eq!(dec.active(), 2);
        dec.finish(1);
        let mut again = Vec::new();
        begin(3, &mut again);
        assert!(feed(&mut dec, &again).unwrap().is_empty());
        assert_eq!(dec.active(), 2);
    }

    #[test]
    fn multiplexed_ids_interleave() {
        let ids = [1u16, 2, 300];
        let mut per_id: Vec<Vec<Vec<u8>>> = Vec::new();
        for &id in &ids {
            let value = format!("/srv/{id}.lua");
            let raw = raw_pairs(&[(b"SCRIPT_FILENAME", value.as_bytes())]);
            let mut recs = Vec::new();
            let mut r = Vec::new();
            begin(id, &mut r);
            recs.push(std::mem::take(&mut r));
            for chunk in raw.chunks(5) {
                encode_record(record_type::PARAMS, id, chunk, &mut r);
                recs.push(std::mem::take(&mut r));
            }
            encode_record(record_type::PARAMS, id, &[], &mut r);
            recs.push(std::mem::take(&mut r));
            for _ in 0..id % 4 {
                encode_record(record_type::STDIN, id, &id.to_be_bytes(), &mut r);
                recs.push(std::mem::take(&mut r));
            }
            encode_record(record_type::STDIN, id, &[], &mut r);
            recs.push(std::mem::take(&mut r));
            per_id.push(recs);
        }
        // Round-robin one record from each id.
        let mut wire = Vec::new();
        let longest = per_id.iter().map(Vec::len).max().unwrap();
        for i in 0..longest {
            for recs in &per_id {
                if let Some(r) = recs.get(i) {
                    wire.extend_from_slice(r);
                }
            }
        }
        let mut dec = Decoder::new(Limits::default());
        let events = feed(&mut dec, &wire).unwrap();
        let mut seen = Vec::new();
        for e in events {
            if let Event::Request(r) = e {
                let expected = format!("/srv/{}.lua", r.id);
                assert_eq!(
                    r.params.unwrap().get(b"SCRIPT_FILENAME"),
                    Some(expected.as_bytes())
                );
                assert_eq!(r.body, r.id.to_be_bytes().repeat(usize::from(r.id % 4)));
                seen.push(r.id);
            }
        }
        seen.sort_unstable();
        assert_eq!(seen, ids);
        assert_eq!(dec.active(), 3);
    }

    #[test]
    fn assembling_tracks_requests_mid_stream() {
        let mut dec = Decoder::new(Limits::default());
        assert!(!dec.assembling());
        let mut wire = Vec::new();
        begin(1, &mut wire);
        feed(&mut dec, &wire).unwrap();
        assert!(dec.assembling());
        let mut rest = Vec::new();
        encode_params(1, [(&b"A"[..], &b"1"[..])], &mut rest);
        feed(&mut dec, &rest).unwrap();
        assert!(dec.assembling());
        let mut end = Vec::new();
        encode_stdin(1, b"", &mut end);
        feed(&mut dec, &end).unwrap();
        assert!(!dec.assembling());
        assert_eq!(dec.active(), 1);
    }

    #[test]
    fn params_accessor_is_valid_only_between_complete_and_request() {
        let mut dec = Decoder::new(Limits::default());
        let mut wire = Vec::new();
        begin(1, &mut wire);
        feed(&mut dec, &wire).unwrap();
        assert!(dec.params(1).is_none());
        let mut p = Vec::new();
        encode_params(1, [(&b"K"[..], &b"V"[..])], &mut p);
        feed(&mut dec, &p).unwrap();
        assert_eq!(dec.params(1).unwrap().get(b"K"), Some(&b"V"[..]));
        assert!(dec.params(2).is_none());
        let mut end = Vec::new();
        encode_stdin(1, b"", &mut end);
        feed(&mut dec, &end).unwrap();
        assert!(dec.params(1).is_none());
    }

    // ---- property tests ----

    use proptest::prelude::*;

    fn small_limits() -> Limits {
        Limits {
            max_params_bytes: 700,
            max_body_bytes: 500,
            max_records_per_request: 50,
            max_requests_per_connection: 3,
        }
    }

    /// Feeds `input` in chunks of the given sizes through a read buffer, as a
    /// connection would; finishes requests as they complete. Checks the memory
    /// bound after every record. Returns the requests seen, or the first error.
    fn drive(limits: &Limits, input: &[u8], chunks: &[usize]) -> Result<Vec<Request>, Error> {
        let mut dec = Decoder::new(limits.clone());
        // Per request: params while arriving, or decoded (stream + 12 B per pair,
        // a pair being at least 2 bytes), plus the body.
        let per_request = limits.max_params_bytes * 7 + limits.max_body_bytes as usize;
        let bound = limits.max_requests_per_connection * per_request;
        let mut pending = Vec::new();
        let mut requests = Vec::new();
        let mut rest = input;
        let mut sizes = chunks.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
            pending.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            loop {
                match dec.decode(&pending)? {
                    Status::Partial => break,
                    Status::Complete((used, ev)) => {
                        assert!(used >= HEADER_LEN && used <= pending.len());
                        pending.drain(..used);
                        match ev {
                            Some(Event::Request(r)) => {
                                if r.id % 2 == 0 {
                                    dec.finish(r.id);
                                }
                                requests.push(r);
                            }
                            Some(Event::Abort { id }) => dec.finish(id),
                            Some(Event::ParamsComplete { id }) => dec.set_body_limit(id, 300),
                            _ => {}
                        }
                    }
                }
                assert!(dec.active() <= limits.max_requests_per_connection);
                assert!(
                    dec.buffered() <= bound,
                    "buffered {} > bound {bound}",
                    dec.buffered()
                );
            }
            // At most one record (plus what the last read added) is ever pending.
            assert!(pending.len() < HEADER_LEN + 65535 + 255 + n.max(1));
        }
        Ok(requests)
    }

    /// Records built from a small vocabulary so that the decoder gets deep
    /// into its states, with occasional garbage.
    fn arb_record() -> impl Strategy<Value = Vec<u8>> {
        let kind = prop_oneof![
            8 => 1u8..=9,
            1 => any::<u8>(),
        ];
        let id = prop_oneof![4 => 1u16..=4, 1 => Just(0u16), 1 => any::<u16>()];
        let content = prop_oneof![
            2 => Just(Vec::new()),
            2 => Just(vec![0, 1, 1, 0, 0, 0, 0, 0]),
            3 => proptest::collection::vec(any::<u8>(), 0..64),
            1 => proptest::collection::vec(any::<u8>(), 64..400),
        ];
        let garbage = proptest::collection::vec(any::<u8>(), 0..16);
        prop_oneof![
            20 => (kind, id, content, 0u8..16).prop_map(|(k, id, c, pad)| {
                let mut out = Vec::new();
                record_with_padding(k, id, &c, pad, &mut out);
                out
            }),
            1 => garbage,
        ]
    }

    /// The records of one plausible request on `id`: BEGIN, params cut at random
    /// points (sometimes with a malformed tail), STDIN in random pieces, and the
    /// quirks real clients add (repeated empty STDIN, DATA, an ABORT).
    fn arb_request(id: u16) -> impl Strategy<Value = Vec<Vec<u8>>> {
        let pairs = proptest::collection::vec(
            (
                proptest::collection::vec(any::<u8>(), 0..20),
                proptest::collection::vec(any::<u8>(), 0..150),
            ),
            0..6,
        );
        (
            prop_oneof![8 => Just(ROLE_RESPONDER), 1 => any::<u16>()],
            any::<u8>(),
            pairs,
            proptest::collection::vec(any::<u8>(), 0..3),
            proptest::collection::vec(1usize..80, 1..5),
            proptest::collection::vec(any::<u8>(), 0..700),
            any::<u8>(),
        )
            .prop_map(move |(role, flags, pairs, tail, cuts, body, quirks)| {
                let mut recs = Vec::new();
                let mut r = Vec::new();
                encode_begin_request(id, role, flags, &mut r);
                recs.push(std::mem::take(&mut r));
                let mut raw = Vec::new();
                for (n, v) in &pairs {
                    encode_pair(n, v, &mut raw);
                }
                if quirks & 1 != 0 {
                    raw.extend_from_slice(&tail);
                }
                let mut rest = &raw[..];
                let mut cut = cuts.iter().cycle();
                while !rest.is_empty() {
                    let n = (*cut.next().unwrap()).min(rest.len());
                    encode_record(record_type::PARAMS, id, &rest[..n], &mut r);
                    recs.push(std::mem::take(&mut r));
                    rest = &rest[n..];
                }
                encode_record(record_type::PARAMS, id, &[], &mut r);
                recs.push(std::mem::take(&mut r));
                if quirks & 2 != 0 {
                    encode_record(record_type::DATA, id, b"d", &mut r);
                    recs.push(std::mem::take(&mut r));
                }
                let mut rest = &body[..];
                while !rest.is_empty() {
                    let n = (*cut.next().unwrap() * 3).min(rest.len());
                    encode_record(record_type::STDIN, id, &rest[..n], &mut r);
                    recs.push(std::mem::take(&mut r));
                    rest = &rest[n..];
                }
                encode_record(record_type::STDIN, id, &[], &mut r);
                recs.push(std::mem::take(&mut r));
                if quirks & 4 != 0 {
                    encode_record(record_type::STDIN, id, &[], &mut r);
                    recs.push(std::mem::take(&mut r));
                }
                if quirks & 8 != 0 {
                    encode_record(record_type::DATA, id, &[], &mut r);
                    recs.push(std::mem::take(&mut r));
                }
                if quirks & 0x30 == 0x30 {
                    let at = usize::from(quirks) % (recs.len() + 1);
                    encode_abort(id, &mut r);
                    recs.insert(at, std::mem::take(&mut r));
                }
                recs
            })
    }

    /// A connection's worth of requests on distinct ids, their records
    /// interleaved in a random order, with a rare random record injected.
    fn arb_session() -> impl Strategy<Value = Vec<u8>> {
        (
            (1u16..6).prop_flat_map(|n| (1..=n).map(arb_request).collect::<Vec<_>>()),
            proptest::collection::vec(any::<u8>(), 0..200),
            proptest::collection::vec(prop::option::weighted(0.01, arb_record()), 0..200),
        )
            .prop_map(|(mut requests, order, noise)| {
                let mut out = Vec::new();
                let mut positions = vec![0usize; requests.len()];
                let mut noise = noise.into_iter().flatten();
                let mut order = order.into_iter();
                loop {
                    let live: Vec<usize> = (0..requests.len())
                        .filter(|&i| positions[i] < requests[i].len())
                        .collect();
                    if live.is_empty() {
                        break;
                    }
                    let pick = live[usize::from(order.next().unwrap_or(0)) % live.len()];
                    out.append(&mut requests[pick][positions[pick]]);
                    positions[pick] += 1;
                    if let Some(junk) = noise.next() {
                        out.extend_from_slice(&junk);
                    }
                }
                out
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn random_bytes_never_panic_or_overgrow(
            input in proptest::collection::vec(any::<u8>(), 0..4096),
            chunks in proptest::collection::vec(1usize..300, 1..20),
        ) {
            let _ = drive(&small_limits(), &input, &chunks);
        }

        #[test]
        fn random_records_never_panic_or_overgrow(
            records in proptest::collection::vec(arb_record(), 0..60),
            chunks in proptest::collection::vec(1usize..300, 1..20),
        ) {
            let input: Vec<u8> = records.concat();
            let _ = drive(&small_limits(), &input, &chunks);
        }

        #[test]
        fn interleaved_sessions_never_panic_or_overgrow(
            input in arb_session(),
            chunks in proptest::collection::vec(1usize..300, 1..20),
        ) {
            let _ = drive(&small_limits(), &input, &chunks);
        }

        #[test]
        fn client_requests_round_trip_in_any_chunking(
            pairs in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..200),
                 proptest::collection::vec(any::<u8>(), 0..300)),
                0..12),
            body in proptest::collection::vec(any::<u8>(), 0..2000),
            id in 1u16..,
            keep_conn in any::<bool>(),
            chunks in proptest::collection::vec(1usize..500, 1..10),
        ) {
            let mut wire = Vec::new();
            encode_request(
                id,
                keep_conn,
                pairs.iter().map(|(n, v)| (&n[..], &v[..])),
                &body,
                &mut wire,
            );
            let limits = Limits { max_body_bytes: 4096, ..Limits::default() };
            let mut dec = Decoder::new(limits);
            let mut pending = Vec::new();
            let mut got = None;
            let mut rest = &wire[..];
            let mut sizes = chunks.iter().cycle();
            while !rest.is_empty() {
                let n = (*sizes.next().unwrap()).min(rest.len());
                pending.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                while let Status::Complete((used, ev)) = dec.decode(&pending).unwrap() {
                    pending.drain(..used);
                    if let Some(Event::Request(r)) = ev {
                        got = Some(r);
                    }
                }
            }
            prop_assert!(pending.is_empty());
            let r = got.expect("a request");
            prop_assert_eq!(r.id, id);
            prop_assert_eq!(r.keep_conn, keep_conn);
            prop_assert_eq!(&r.body, &body);
            prop_assert_eq!(r.body_len, body.len() as u64);
            let params = r.params.unwrap();
            let decoded: Vec<(Vec<u8>, Vec<u8>)> =
                params.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
            prop_assert_eq!(decoded, pairs);
        }
    }
}
