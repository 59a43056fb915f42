//! A sans-IO FastCGI 1.0 codec for the responder side (and, in [`client`], the
//! client side used by tests and load generators).
//!
//! It parses bytes the caller has read and encodes into buffers the caller
//! writes; it does no IO, reads no clock and spawns nothing. "Need more bytes"
//! is [`Status::Partial`], not an error. Every size the peer controls is capped
//! by a named field of [`Limits`]. It does not know about Lua, scripts or HTTP.
//!
//! The pieces:
//!
//! - [`parse_header`] reads the fixed 8-byte record header.
//! - [`Decoder`] is the per-connection state machine: feed it the bytes read so
//!   far, it consumes at most one whole record per call and returns an
//!   [`Event`] when something happened that the caller must act on (a request
//!   fully assembled, an abort, a rejected `BEGIN_REQUEST`, a management
//!   query). It reassembles the PARAMS stream as bytes (front ends split name-value
//!   pairs across records), tolerates padding, repeated empty STDIN and
//!   trailing DATA records, and buffers the body up to a per-request limit.
//! - [`Params`] holds decoded name-value pairs compactly: the raw stream plus
//!   one small offset entry per pair.
//! - The `encode_*` functions append responder records to a `Vec<u8>`.
//!
//! What it does not do: it never answers on its own (the caller writes
//! `END_REQUEST` for [`Event::Rejected`], `GET_VALUES_RESULT` for
//! [`Event::GetValues`], and so on), it keeps no timers (read timeouts are the
//! caller's), and it implements only the Responder role; Authorizer and Filter
//! requests are rejected with [`ProtocolStatus::UnknownRole`].
//!
//! ```
//! use fastcgi_protocol::{client, Decoder, Event, Limits, Status};
//!
//! let mut wire = Vec::new();
//! client::encode_request(1, true, [(&b"SCRIPT_FILENAME"[..], &b"/srv/a.lua"[..])], b"", &mut wire);
//!
//! let mut decoder = Decoder::new(Limits::default());
//! let mut buf = &wire[..];
//! let mut request = None;
//! while let Status::Complete((used, event)) = decoder.decode(buf).unwrap() {
//!     buf = &buf[used..];
//!     if let Some(Event::Request(r)) = event {
//!         request = Some(r);
//!     }
//! }
//! let request = request.unwrap();
//! assert_eq!(request.params.unwrap().get(b"SCRIPT_FILENAME"), Some(&b"/srv/a.lua"[..]));
//! ```
#![forbid(unsafe_code)]

pub mod client;
mod decoder;
mod encode;
mod params;

pub use decoder::{Decoder, Event, Request};
pub use encode::{
    encode_end_request, encode_get_values_result, encode_record, encode_response, encode_stream,
    encode_unknown_type, frame_response,
};
pub use params::{encode_pair, Params, ParamsError};

/// The only protocol version there is.
pub const FCGI_VERSION_1: u8 = 1;
/// Length of a record header.
pub const HEADER_LEN: usize = 8;
/// Largest content a single record can carry.
pub const MAX_CONTENT_LEN: usize = 65535;
/// `BEGIN_REQUEST` role: produce a response (the only role served here).
pub const ROLE_RESPONDER: u16 = 1;
/// `BEGIN_REQUEST` role: authorizer (rejected with `UnknownRole`).
pub const ROLE_AUTHORIZER: u16 = 2;
/// `BEGIN_REQUEST` role: filter (rejected with `UnknownRole`).
pub const ROLE_FILTER: u16 = 3;
/// `BEGIN_REQUEST` flag: keep the connection open after the response.
pub const FLAG_KEEP_CONN: u8 = 1;

/// Record type codes (the `type` byte of the header).
pub mod record_type {
    /// Client → application: starts a request.
    pub const BEGIN_REQUEST: u8 = 1;
    /// Client → application: the client gives up on a request.
    pub const ABORT_REQUEST: u8 = 2;
    /// Application → client: the request is over.
    pub const END_REQUEST: u8 = 3;
    /// Client → application: name-value pair stream, ended by an empty record.
    pub const PARAMS: u8 = 4;
    /// Client → application: the request body, ended by an empty record.
    pub const STDIN: u8 = 5;
    /// Application → client: the response.
    pub const STDOUT: u8 = 6;
    /// Application → client: diagnostics.
    pub const STDERR: u8 = 7;
    /// Client → application: filter data (ignored by responders).
    pub const DATA: u8 = 8;
    /// Management (id 0): the client asks for configuration values.
    pub const GET_VALUES: u8 = 9;
    /// Management (id 0): answer to `GET_VALUES`.
    pub const GET_VALUES_RESULT: u8 = 10;
    /// Management (id 0): answer to a record type the application does not know.
    pub const UNKNOWN_TYPE: u8 = 11;
}

/// The `protocolStatus` of an `END_REQUEST` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolStatus {
    /// Normal end of a request.
    RequestComplete = 0,
    /// A new request was refused because the connection has as many as allowed.
    CantMpxConn = 1,
    /// A new request was refused because the application is out of resources.
    Overloaded = 2,
    /// A new request was refused because its role is not served.
    UnknownRole = 3,
}

impl ProtocolStatus {
    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The status for a wire value, if it is one of the four defined.
    pub fn from_u8(value: u8) -> Option<ProtocolStatus> {
        match value {
            0 => Some(ProtocolStatus::RequestComplete),
            1 => Some(ProtocolStatus::CantMpxConn),
            2 => Some(ProtocolStatus::Overloaded),
            3 => Some(ProtocolStatus::UnknownRole),
            _ => None,
        }
    }
}

/// The result of parsing something that may not have fully arrived yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status<T> {
    /// Parsed.
    Complete(T),
    /// The buffer holds only a prefix: read more bytes and call again.
    Partial,
}

impl<T> Status<T> {
    /// `true` for [`Status::Partial`].
    pub fn is_partial(&self) -> bool {
        matches!(self, Status::Partial)
    }
}

/// A record header, as on the wire. Not validated: see [`Decoder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version; only [`FCGI_VERSION_1`] is valid.
    pub version: u8,
    /// Record type, one of [`record_type`] (or unknown).
    pub kind: u8,
    /// Request id; 0 for management records.
    pub request_id: u16,
    /// Bytes of content following the header.
    pub content_length: u16,
    /// Bytes of padding following the content.
    pub padding_length: u8,
}

impl Header {
    /// Length of the whole record: header, content and padding.
    pub fn record_len(&self) -> usize {
        HEADER_LEN + usize::from(self.content_length) + usize::from(self.padding_length)
    }
}

/// Parses a record header from the start of `buf`.
pub fn parse_header(buf: &[u8]) -> Status<Header> {
    match buf.first_chunk::<HEADER_LEN>() {
        Some(h) => Status::Complete(Header {
            version: h[0],
            kind: h[1],
            request_id: u16::from_be_bytes([h[2], h[3]]),
            content_length: u16::from_be_bytes([h[4], h[5]]),
            padding_length: h[6],
        }),
        None => Status::Partial,
    }
}

/// Default for [`Limits::max_params_bytes`]: 1 MiB.
pub const DEFAULT_MAX_PARAMS_BYTES: usize = 1 << 20;
/// Default for [`Limits::max_body_bytes`]: 1 GiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1 << 30;
/// Default for [`Limits::max_records_per_request`].
pub const DEFAULT_MAX_RECORDS_PER_REQUEST: u32 = 1_000_000;
/// Default for [`Limits::max_requests_per_connection`].
pub const DEFAULT_MAX_REQUESTS_PER_CONNECTION: usize = 64;

/// Caps on everything a peer controls in one connection's [`Decoder`].
///
/// What a connection can make the decoder hold is bounded by
/// `max_requests_per_connection × (per-request params + body)`, where the
/// params of one request take at most `max_params_bytes` while they arrive and,
/// once decoded, that plus 12 bytes per pair (a pair takes at least 2 bytes).
/// Not covered: the caller's own read buffer (at most one record, 65,798 bytes,
/// is needed to make progress) and time (slow peers are the caller's to time out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes of the raw PARAMS stream of one request; more is
    /// [`Error::ParamsTooLarge`].
    pub max_params_bytes: usize,
    /// Hard cap on the body the decoder buffers for one request. Callers lower it per
    /// request with [`Decoder::set_body_limit`]; STDIN beyond the effective limit is
    /// counted and discarded ([`Request::body_exceeded`]), not an error.
    pub max_body_bytes: u64,
    /// Most records addressed to one request (from `BEGIN_REQUEST` on, including
    /// ignored ones); more is [`Error::TooManyRecords`]. Stops floods of tiny records.
    pub max_records_per_request: u32,
    /// Most request ids active at once on one connection; a `BEGIN_REQUEST` beyond it
    /// is answered [`Event::Rejected`] with [`ProtocolStatus::CantMpxConn`].
    pub max_requests_per_connection: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_params_bytes: DEFAULT_MAX_PARAMS_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_records_per_request: DEFAULT_MAX_RECORDS_PER_REQUEST,
            max_requests_per_connection: DEFAULT_MAX_REQUESTS_PER_CONNECTION,
        }
    }
}

/// A protocol violation. After any of these, close the connection: the byte
/// stream can no longer be trusted to be in step.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// A record header carries a version other than 1.
    #[error("unsupported FastCGI version {0}")]
    UnsupportedVersion(u8),
    /// A `BEGIN_REQUEST` record with less than 8 bytes of content.
    #[error("BEGIN_REQUEST record shorter than 8 bytes")]
    BadBeginRequest,
    /// A `BEGIN_REQUEST` for an id that is still active.
    #[error("BEGIN_REQUEST for request id {0}, which is already active")]
    DuplicateRequest(u16),
    /// The PARAMS stream of one request is longer than [`Limits::max_params_bytes`].
    #[error("PARAMS stream longer than {limit} bytes")]
    ParamsTooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// One request used more than [`Limits::max_records_per_request`] records.
    #[error("more than {limit} records for one request")]
    TooManyRecords {
        /// The limit that was exceeded.
        limit: u32,
    },
    /// A record that makes no sense where it arrived: STDIN before the params
    /// ended, data after a stream ended, or a type only an application sends.
    #[error("unexpected record of type {kind} for request id {id}")]
    UnexpectedRecord {
        /// Request id of the record.
        id: u16,
        /// Record type.
        kind: u8,
    },
    /// A management record that is malformed, or a request record on id 0, or a
    /// management type on a request id.
    #[error("malformed management record")]
    BadManagementRecord,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_parses_fields_big_endian() {
        let bytes = [1, 5, 0x12, 0x34, 0xff, 0xfe, 7, 0, 99];
        let Status::Complete(h) = parse_header(&bytes) else {
            panic!("header should be complete")
        };
        assert_eq!(
            h,
            Header {
                version: 1,
                kind: 5,
                request_id: 0x1234,
                content_length: 0xfffe,
                padding_length: 7
            }
        );
        assert_eq!(h.record_len(), 8 + 0xfffe + 7);
    }

    #[test]
    fn header_prefix_is_partial() {
        let bytes = [1, 5, 0, 1, 0, 0, 0, 0];
        for n in 0..HEADER_LEN {
            assert_eq!(parse_header(&bytes[..n]), Status::Partial);
        }
        assert!(!parse_header(&bytes).is_partial());
    }

    #[test]
    fn protocol_status_round_trips() {
        for v in 0..=3u8 {
            assert_eq!(
                ProtocolStatus::from_u8(v).map(ProtocolStatus::as_u8),
                Some(v)
            );
        }
        assert_eq!(ProtocolStatus::from_u8(4), None);
    }
}
