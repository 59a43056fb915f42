//! The client side of the wire (what a web server sends, and reading what a
//! responder answers), for tests and load generators. It encodes the way a
//! careful client would (streams cut at 65,535 bytes, padded); it is not a
//! connection manager and checks replies only for framing.

use crate::{
    encode_record, encode_stream, parse_header, record_type, Error, Params, Status, FCGI_VERSION_1,
    FLAG_KEEP_CONN, HEADER_LEN, ROLE_RESPONDER,
};

/// Appends a `BEGIN_REQUEST` record.
pub fn encode_begin_request(id: u16, role: u16, flags: u8, out: &mut Vec<u8>) {
    let [r0, r1] = role.to_be_bytes();
    encode_record(
        record_type::BEGIN_REQUEST,
        id,
        &[r0, r1, flags, 0, 0, 0, 0, 0],
        out,
    );
}

/// Appends the PARAMS stream of `pairs` (cut into records of at most 65,535
/// bytes, so a pair may be split between records) and the empty PARAMS that ends it.
pub fn encode_params<'a>(
    id: u16,
    pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    out: &mut Vec<u8>,
) {
    let mut stream = Vec::new();
    for (name, value) in pairs {
        crate::encode_pair(name, value, &mut stream);
    }
    encode_stream(record_type::PARAMS, id, &stream, out);
    encode_record(record_type::PARAMS, id, &[], out);
}

/// Appends `body` as STDIN records and the empty STDIN that ends it.
pub fn encode_stdin(id: u16, body: &[u8], out: &mut Vec<u8>) {
    encode_stream(record_type::STDIN, id, body, out);
    encode_record(record_type::STDIN, id, &[], out);
}

/// Appends a whole responder request: `BEGIN_REQUEST` (with `FCGI_KEEP_CONN`
/// when `keep_conn`), the params and the body.
pub fn encode_request<'a>(
    id: u16,
    keep_conn: bool,
    pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    body: &[u8],
    out: &mut Vec<u8>,
) {
    let flags = if keep_conn { FLAG_KEEP_CONN } else { 0 };
    encode_begin_request(id, ROLE_RESPONDER, flags, out);
    encode_params(id, pairs, out);
    encode_stdin(id, body, out);
}

/// Appends an `ABORT_REQUEST` record.
pub fn encode_abort(id: u16, out: &mut Vec<u8>) {
    encode_record(record_type::ABORT_REQUEST, id, &[], out);
}

/// Appends a `GET_VALUES` management record asking for `names`.
///
/// # Panics
///
/// If the names do not fit in one record (65,535 bytes).
pub fn encode_get_values(names: &[&[u8]], out: &mut Vec<u8>) {
    let mut content = Vec::new();
    for name in names {
        crate::encode_pair(name, b"", &mut content);
    }
    encode_record(record_type::GET_VALUES, 0, &content, out);
}

/// One record from a responder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// STDOUT content (empty: end of the stream).
    Stdout {
        /// Request id.
        id: u16,
        /// Content of this record.
        data: Vec<u8>,
    },
    /// STDERR content (empty: end of the stream).
    Stderr {
        /// Request id.
        id: u16,
        /// Content of this record.
        data: Vec<u8>,
    },
    /// `END_REQUEST`.
    End {
        /// Request id.
        id: u16,
        /// The application's exit status.
        app_status: u32,
        /// The protocol status byte (see [`crate::ProtocolStatus::from_u8`]).
        status: u8,
    },
    /// `GET_VALUES_RESULT` pairs.
    GetValuesResult(Vec<(Vec<u8>, Vec<u8>)>),
    /// `UNKNOWN_TYPE`: the responder did not know this record type.
    UnknownType(u8),
}

/// Decodes one record a responder sent from the start of `buf`, returning the
/// bytes it took. Records a responder never sends are
/// [`Error::UnexpectedRecord`]; a short `END_REQUEST` is too.
pub fn decode_reply(buf: &[u8]) -> Result<Status<(usize, Reply)>, Error> {
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
    let id = header.request_id;
    let unexpected = Error::UnexpectedRecord {
        id,
        kind: header.kind,
    };
    let reply = match header.kind {
        record_type::STDOUT => Reply::Stdout {
            id,
            data: content.to_vec(),
        },
        record_type::STDERR => Reply::Stderr {
            id,
            data: content.to_vec(),
        },
        record_type::END_REQUEST => {
            let Some(c) = content.first_chunk::<8>() else {
                return Err(unexpected);
            };
            Reply::End {
                id,
                app_status: u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                status: c[4],
            }
        }
        record_type::GET_VALUES_RESULT => {
            let pairs = Params::decode(content.to_vec()).map_err(|_| Error::BadManagementRecord)?;
            Reply::GetValuesResult(
                pairs
                    .iter()
                    .map(|(n, v)| (n.to_vec(), v.to_vec()))
                    .collect(),
            )
        }
        record_type::UNKNOWN_TYPE => match content.first() {
            Some(&kind) => Reply::UnknownType(kind),
            None => return Err(Error::BadManagementRecord),
        },
        _ => return Err(unexpected),
    };
    Ok(Status::Complete((total, reply)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        encode_end_request, encode_get_values_result, encode_response, encode_unknown_type,
        ProtocolStatus,
    };

    fn replies(mut buf: &[u8]) -> Vec<Reply> {
        let mut out = Vec::new();
        while let Status::Complete((n, r)) = decode_reply(buf).unwrap() {
            out.push(r);
            buf = &buf[n..];
        }
        assert!(buf.is_empty(), "trailing bytes");
        out
    }

    #[test]
    fn begin_request_layout() {
        let mut out = Vec::new();
        encode_begin_request(0x0203, ROLE_RESPONDER, FLAG_KEEP_CONN, &mut out);
        assert_eq!(out, vec![1, 1, 2, 3, 0, 8, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn abort_and_get_values_layout() {
        let mut out = Vec::new();
        encode_abort(5, &mut out);
        assert_eq!(out, vec![1, 2, 0, 5, 0, 0, 0, 0]);
        out.clear();
        encode_get_values(&[b"FCGI_MPXS_CONNS"], &mut out);
        // 2 length bytes + 15 name bytes = 17, padded to 24.
        assert_eq!(&out[..8], &[1, 9, 0, 0, 0, 17, 7, 0]);
        assert_eq!(out.len(), 8 + 24);
    }

    #[test]
    fn response_round_trips_through_decode_reply() {
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        encode_response(9, &body, &mut out);
        let rs = replies(&out);
        let mut joined = Vec::new();
        for r in &rs[..rs.len() - 2] {
            match r {
                Reply::Stdout { id: 9, data } => joined.extend_from_slice(data),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(joined, body);
        assert_eq!(
            rs[rs.len() - 2],
            Reply::Stdout {
                id: 9,
                data: vec![]
            }
        );
        assert_eq!(
            rs[rs.len() - 1],
            Reply::End {
                id: 9,
                app_status: 0,
                status: 0
            }
        );
    }

    #[test]
    fn management_replies_decode() {
        let mut out = Vec::new();
        encode_get_values_result(&[(b"FCGI_MAX_REQS", b"64")], &mut out);
        encode_unknown_type(77, &mut out);
        encode_end_request(4, 7, ProtocolStatus::CantMpxConn, &mut out);
        encode_record(record_type::STDERR, 4, b"oops", &mut out);
        assert_eq!(
            replies(&out),
            vec![
                Reply::GetValuesResult(vec![(b"FCGI_MAX_REQS".to_vec(), b"64".to_vec())]),
                Reply::UnknownType(77),
                Reply::End {
                    id: 4,
                    app_status: 7,
                    status: 1
                },
                Reply::Stderr {
                    id: 4,
                    data: b"oops".to_vec()
                },
            ]
        );
    }

    #[test]
    fn reply_prefixes_are_partial_and_bad_records_are_errors() {
        let mut out = Vec::new();
        encode_response(1, b"hello", &mut out);
        for n in 0..16 {
            assert_eq!(decode_reply(&out[..n]), Ok(Status::Partial), "prefix {n}");
        }
        let mut begin = Vec::new();
        encode_begin_request(1, ROLE_RESPONDER, 0, &mut begin);
        assert_eq!(
            decode_reply(&begin),
            Err(Error::UnexpectedRecord { id: 1, kind: 1 })
        );
        let mut short_end = Vec::new();
        encode_record(record_type::END_REQUEST, 1, &[0, 0, 0], &mut short_end);
        assert!(decode_reply(&short_end).is_err());
        assert_eq!(
            decode_reply(&[2, 6, 0, 1, 0, 0, 0, 0]),
            Err(Error::UnsupportedVersion(2))
        );
    }
}
