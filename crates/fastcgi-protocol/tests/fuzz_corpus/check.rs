//! The checks behind the `records` and `params` fuzz targets, one function per target.
//!
//! `fuzz/fuzz_targets/{records,params}.rs` include this file by path and call the same
//! functions as the corpus replay in `tests/fuzz_corpus.rs`, so an input the fuzzer kept
//! (or a crash it found) is checked again by every `cargo test`. A broken invariant
//! panics; an input the codec refuses is not a failure. Nothing here reads files.

use fastcgi_protocol::{
    encode_pair, parse_header, Decoder, Error, Event, Limits, Params, Status, HEADER_LEN,
};

/// Limits small enough that short inputs reach every one of them.
pub fn tight_limits() -> Limits {
    Limits {
        max_params_bytes: 64,
        max_body_bytes: 64,
        max_records_per_request: 16,
        max_requests_per_connection: 2,
    }
}

/// Read sizes: a xorshift sequence from one seed byte, between 1 and `max` bytes.
struct Reads(u32);

impl Reads {
    fn new(seed: u8) -> Reads {
        Reads(0x9e37_79b9 ^ u32::from(seed).wrapping_mul(0x0101_0101) | 1)
    }

    fn next(&mut self, max: usize) -> usize {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        1 + (x as usize) % max
    }
}

/// What one connection's decoder made of a byte stream: its events in order, the bytes
/// it consumed, and the error that ended it, if any.
#[derive(Debug, PartialEq)]
pub struct Run {
    pub events: Vec<Event>,
    pub consumed: usize,
    pub error: Option<Error>,
}

/// The bound [`Limits`] documents for what a decoder holds for `active` requests:
/// params (their stream plus 12 bytes per pair of at least 2 bytes) and a body each.
fn held_bound(limits: &Limits, active: usize) -> u64 {
    let per_request = 7 * limits.max_params_bytes as u64 + limits.max_body_bytes;
    active as u64 * per_request
}

/// Checks what one `decode` call returned against the bytes it was given.
fn check_step(
    decoder: &Decoder,
    buf: &[u8],
    status: &Status<(usize, Option<Event>)>,
    limits: &Limits,
) {
    match status {
        Status::Partial => {
            if let Status::Complete(h) = parse_header(buf) {
                assert!(
                    buf.len() < h.record_len(),
                    "Partial with a whole record of {} bytes in a buffer of {}",
                    h.record_len(),
                    buf.len()
                );
            }
        }
        Status::Complete((used, _)) => {
            let Status::Complete(h) = parse_header(buf) else {
                panic!(
                    "a record consumed from {} bytes, less than a header",
                    buf.len()
                );
            };
            assert_eq!(*used, h.record_len(), "consumed other than one record");
            assert!(*used >= HEADER_LEN && *used <= buf.len());
        }
    }
    assert!(
        decoder.active() <= limits.max_requests_per_connection,
        "{} requests active, limit {}",
        decoder.active(),
        limits.max_requests_per_connection
    );
    let held = decoder.buffered() as u64;
    assert!(
        held <= held_bound(limits, decoder.active()),
        "decoder holds {held} bytes for {} requests",
        decoder.active()
    );
}

/// Checks one assembled request against the limits.
fn check_request(request: &fastcgi_protocol::Request, limits: &Limits) {
    if request.body_exceeded {
        assert!(request.body.is_empty(), "an exceeded body is kept");
        assert!(request.body_len > limits.max_body_bytes);
    } else {
        assert_eq!(request.body.len() as u64, request.body_len);
        assert!(request.body_len <= limits.max_body_bytes);
    }
    if let Ok(params) = &request.params {
        assert!(params.raw_len() <= limits.max_params_bytes);
    }
}

/// Feeds `stream` to a new decoder as the daemon does: reads of the sizes `reads` gives
/// (all at once for `None`), every whole record decoded before the next read, and each
/// request finished as soon as it is complete or aborted (the reply written at once).
pub fn decode_stream(limits: &Limits, stream: &[u8], mut reads: Option<u8>) -> Run {
    let mut reads = reads.take().map(Reads::new);
    let mut decoder = Decoder::new(limits.clone());
    let mut run = Run {
        events: Vec::new(),
        consumed: 0,
        error: None,
    };
    let mut inbuf: Vec<u8> = Vec::new();
    let mut fed = 0;
    while fed < stream.len() {
        let n = match &mut reads {
            Some(r) => r.next(1 << 17).min(stream.len() - fed),
            None => stream.len(),
        };
        inbuf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        let mut start = 0;
        loop {
            let buf = &inbuf[start..];
            let status = match decoder.decode(buf) {
                Ok(s) => s,
                Err(e) => {
                    run.consumed += start;
                    run.error = Some(e);
                    return run;
                }
            };
            check_step(&decoder, buf, &status, limits);
            let Status::Complete((used, event)) = status else {
                break;
            };
            start += used;
            match &event {
                Some(Event::Request(r)) => {
                    check_request(r, limits);
                    decoder.finish(r.id);
                }
                Some(Event::Abort { id }) => decoder.finish(*id),
                _ => {}
            }
            run.events.extend(event);
        }
        run.consumed += start;
        inbuf.drain(..start);
    }
    run
}

/// The `records` target: `data[0]` seeds the read sizes, the rest is the byte stream a
/// peer sends. Decoded in those reads and all at once, with the default and with tight
/// limits: never a panic, every invariant of [`check_step`] holds, and the reads make no
/// difference to the events, the bytes consumed or the error.
pub fn records(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    for limits in [Limits::default(), tight_limits()] {
        let whole = decode_stream(&limits, stream, None);
        let split = decode_stream(&limits, stream, Some(seed));
        assert_eq!(whole, split, "read sizes changed what was decoded");
        if let Some(e) = &whole.error {
            assert!(!e.to_string().is_empty());
        }
    }
}

/// The `params` target: `data` is a whole name-value pair stream. A decoded stream
/// re-encodes (with the shortest lengths) to no more bytes and decodes back to the same
/// pairs; lookups find the first pair of a name; a refused stream says why.
pub fn params(data: &[u8]) {
    match Params::decode(data.to_vec()) {
        Ok(p) => {
            assert_eq!(p.raw_len(), data.len());
            assert!(p.len() * 2 <= data.len(), "a pair takes at least 2 bytes");
            assert_eq!(p.is_empty(), data.is_empty());
            assert!(p.heap_size() >= data.len());
            let mut again = Vec::new();
            for (name, value) in p.iter() {
                encode_pair(name, value, &mut again);
            }
            assert!(again.len() <= data.len());
            let q = Params::decode(again).expect("re-encoded pairs decode");
            assert!(p.iter().eq(q.iter()), "pairs changed by re-encoding");
            for (i, (name, _)) in p.iter().enumerate() {
                let first = p.iter().find(|(n, _)| *n == name).map(|(_, v)| v);
                assert_eq!(p.get(name), first, "lookup of pair {i}");
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
