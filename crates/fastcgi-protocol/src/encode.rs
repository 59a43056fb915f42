//! Encoding records into a caller's buffer: the responder's side of the wire
//! (STDOUT, END_REQUEST, management answers). Every record is padded with
//! zeros to a multiple of 8 bytes. Nothing here validates what the caller
//! chose to send beyond what the format can express.

use crate::{params::encode_pair, record_type, ProtocolStatus, HEADER_LEN, MAX_CONTENT_LEN};

const ZEROS: [u8; 8] = [0; 8];

/// Padding that brings `content_len` to a multiple of 8.
#[inline]
pub(crate) fn padding_for(content_len: usize) -> usize {
    content_len.wrapping_neg() & 7
}

/// Bytes a record with `content_len` bytes of content takes on the wire.
#[inline]
pub(crate) fn record_size(content_len: usize) -> usize {
    HEADER_LEN + content_len + padding_for(content_len)
}

/// Bytes [`encode_stream`] produces for `data_len` bytes.
fn stream_size(data_len: usize) -> usize {
    let full = data_len / MAX_CONTENT_LEN;
    let rest = data_len % MAX_CONTENT_LEN;
    full * record_size(MAX_CONTENT_LEN) + if rest > 0 { record_size(rest) } else { 0 }
}

/// The header of a record of `kind` for `id` with `len` bytes of content and `pad` of padding.
fn header(kind: u8, id: u16, len: u16, pad: usize) -> [u8; HEADER_LEN] {
    let [id_hi, id_lo] = id.to_be_bytes();
    let [len_hi, len_lo] = len.to_be_bytes();
    [
        crate::FCGI_VERSION_1,
        kind,
        id_hi,
        id_lo,
        len_hi,
        len_lo,
        pad as u8,
        0,
    ]
}

/// Appends one record: header, `content`, zero padding to a multiple of 8.
///
/// # Panics
///
/// If `content` is longer than [`MAX_CONTENT_LEN`]; use [`encode_stream`] for
/// data of any length.
pub fn encode_record(kind: u8, id: u16, content: &[u8], out: &mut Vec<u8>) {
    assert!(
        content.len() <= MAX_CONTENT_LEN,
        "FastCGI record content is at most 65535 bytes, got {}",
        content.len()
    );
    let pad = padding_for(content.len());
    out.reserve(HEADER_LEN + content.len() + pad);
    out.extend_from_slice(&header(kind, id, content.len() as u16, pad));
    out.extend_from_slice(content);
    out.extend_from_slice(&ZEROS[..pad]);
}

/// Appends `data` as records of `kind` of at most [`MAX_CONTENT_LEN`] bytes each.
/// Empty `data` appends nothing; the empty record that ends a stream is the
/// caller's to add (or [`encode_response`]'s).
pub fn encode_stream(kind: u8, id: u16, data: &[u8], out: &mut Vec<u8>) {
    out.reserve(stream_size(data.len()));
    for chunk in data.chunks(MAX_CONTENT_LEN) {
        encode_record(kind, id, chunk, out);
    }
}

/// Appends an `END_REQUEST` record.
pub fn encode_end_request(id: u16, app_status: u32, status: ProtocolStatus, out: &mut Vec<u8>) {
    let s = app_status.to_be_bytes();
    encode_record(
        record_type::END_REQUEST,
        id,
        &[s[0], s[1], s[2], s[3], status.as_u8(), 0, 0, 0],
        out,
    );
}

/// Appends a whole response: `stdout` as STDOUT records, the empty STDOUT that
/// ends the stream, and `END_REQUEST` with app status 0 and `RequestComplete`.
pub fn encode_response(id: u16, stdout: &[u8], out: &mut Vec<u8>) {
    out.reserve(stream_size(stdout.len()) + 2 * HEADER_LEN + record_size(8));
    encode_stream(record_type::STDOUT, id, stdout, out);
    encode_record(record_type::STDOUT, id, &[], out);
    encode_end_request(id, 0, ProtocolStatus::RequestComplete, out);
}

/// Frames a whole response written in place, without copying it when it fits in one
/// record: `out[start..start + HEADER_LEN]` was left for a record header (any bytes) and
/// the stdout bytes run from there to the end of `out`. Afterwards `out[start..]` holds
/// what [`encode_response`] would have appended at `start` for those bytes.
///
/// # Panics
///
/// If `out` is shorter than `start + HEADER_LEN`.
pub fn frame_response(id: u16, out: &mut Vec<u8>, start: usize) {
    let content = out.len() - (start + HEADER_LEN);
    if content == 0 || content > MAX_CONTENT_LEN {
        // No record of its own (empty), or several: framed by copy.
        let stdout = out.split_off(start + HEADER_LEN);
        out.truncate(start);
        encode_response(id, &stdout, out);
        return;
    }
    let pad = padding_for(content);
    out[start..start + HEADER_LEN].copy_from_slice(&header(
        record_type::STDOUT,
        id,
        content as u16,
        pad,
    ));
    out.reserve(pad + HEADER_LEN + record_size(8));
    out.extend_from_slice(&ZEROS[..pad]);
    encode_record(record_type::STDOUT, id, &[], out);
    encode_end_request(id, 0, ProtocolStatus::RequestComplete, out);
}

/// Appends a `GET_VALUES_RESULT` management record holding `pairs`. Pairs that
/// would not fit in one record are left out.
pub fn encode_get_values_result(pairs: &[(&[u8], &[u8])], out: &mut Vec<u8>) {
    let mut content = Vec::new();
    for (name, value) in pairs {
        let before = content.len();
        encode_pair(name, value, &mut content);
        if content.len() > MAX_CONTENT_LEN {
            content.truncate(before);
        }
    }
    encode_record(record_type::GET_VALUES_RESULT, 0, &content, out);
}

/// Appends an `UNKNOWN_TYPE` management record answering a record of type `kind`.
pub fn encode_unknown_type(kind: u8, out: &mut Vec<u8>) {
    encode_record(
        record_type::UNKNOWN_TYPE,
        0,
        &[kind, 0, 0, 0, 0, 0, 0, 0],
        out,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse_header, Status};

    #[test]
    fn records_are_padded_to_8_with_zeros() {
        for len in 0..=17usize {
            let content = vec![0xaa; len];
            let mut out = vec![0x55]; // appended, not overwritten
            encode_record(record_type::STDOUT, 7, &content, &mut out);
            let rec = &out[1..];
            assert_eq!(rec.len() % 8, 0, "len {len}");
            assert_eq!(rec.len(), record_size(len));
            let Status::Complete(h) = parse_header(rec) else {
                panic!()
            };
            assert_eq!(h.version, 1);
            assert_eq!(h.kind, record_type::STDOUT);
            assert_eq!(h.request_id, 7);
            assert_eq!(usize::from(h.content_length), len);
            assert_eq!(usize::from(h.padding_length), (8 - len % 8) % 8);
            assert_eq!(rec[7], 0, "reserved byte");
            assert_eq!(&rec[8..8 + len], &content[..]);
            assert!(rec[8 + len..].iter().all(|&b| b == 0));
            assert_eq!(h.record_len(), rec.len());
        }
    }

    #[test]
    fn streams_split_at_65535() {
        let data: Vec<u8> = (0..150_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        encode_stream(record_type::STDOUT, 1, &data, &mut out);
        assert_eq!(out.len(), stream_size(data.len()));
        let mut pos = 0;
        let mut lens = Vec::new();
        let mut joined = Vec::new();
        while pos < out.len() {
            let Status::Complete(h) = parse_header(&out[pos..]) else {
                panic!()
            };
            lens.push(h.content_length);
            joined.extend_from_slice(&out[pos + 8..pos + 8 + usize::from(h.content_length)]);
            pos += h.record_len();
        }
        assert_eq!(lens, vec![65535u16, 65535, 18_930]);
        assert_eq!(joined, data);

        let mut empty = Vec::new();
        encode_stream(record_type::STDOUT, 1, &[], &mut empty);
        assert!(empty.is_empty());
    }

    #[test]
    fn end_request_layout() {
        let mut out = Vec::new();
        encode_end_request(0x0102, 0x0a0b0c0d, ProtocolStatus::Overloaded, &mut out);
        assert_eq!(
            out,
            vec![1, 3, 1, 2, 0, 8, 0, 0, 0x0a, 0x0b, 0x0c, 0x0d, 2, 0, 0, 0]
        );
    }

    #[test]
    fn response_is_stdout_then_empty_stdout_then_end() {
        let mut out = Vec::new();
        encode_response(3, b"Status: 200 OK\r\n\r\nhi", &mut out);
        let mut expected = Vec::new();
        encode_record(
            record_type::STDOUT,
            3,
            b"Status: 200 OK\r\n\r\nhi",
            &mut expected,
        );
        expected.extend_from_slice(&[1, 6, 0, 3, 0, 0, 0, 0]);
        expected.extend_from_slice(&[1, 3, 0, 3, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(out, expected);
    }

    #[test]
    fn a_response_framed_in_place_is_the_one_encoded_by_copy() {
        for len in [
            0,
            1,
            7,
            8,
            9,
            100,
            MAX_CONTENT_LEN - 1,
            MAX_CONTENT_LEN,
            MAX_CONTENT_LEN + 1,
            200_000,
        ] {
            let stdout: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
            let mut expected = b"before".to_vec();
            encode_response(513, &stdout, &mut expected);
            let mut framed = b"before".to_vec();
            framed.extend_from_slice(&[0xff; HEADER_LEN]);
            framed.extend_from_slice(&stdout);
            frame_response(513, &mut framed, 6);
            assert!(
                framed == expected,
                "{len} bytes of stdout framed differently"
            );
        }
    }

    #[test]
    fn unknown_type_layout() {
        let mut out = Vec::new();
        encode_unknown_type(42, &mut out);
        assert_eq!(out, vec![1, 11, 0, 0, 0, 8, 0, 0, 42, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn get_values_result_leaves_out_pairs_that_do_not_fit() {
        let big = vec![b'v'; 70_000];
        let mut out = Vec::new();
        encode_get_values_result(
            &[
                (b"FCGI_MPXS_CONNS", b"1"),
                (b"HUGE", &big),
                (b"FCGI_MAX_REQS", b"64"),
            ],
            &mut out,
        );
        let Status::Complete(h) = parse_header(&out) else {
            panic!()
        };
        assert_eq!(h.kind, record_type::GET_VALUES_RESULT);
        assert_eq!(h.request_id, 0);
        let content = out[8..8 + usize::from(h.content_length)].to_vec();
        let p = crate::Params::decode(content).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p.get(b"FCGI_MPXS_CONNS"), Some(&b"1"[..]));
        assert_eq!(p.get(b"FCGI_MAX_REQS"), Some(&b"64"[..]));
    }

    #[test]
    #[should_panic(expected = "at most 65535")]
    fn oversized_record_panics() {
        encode_record(record_type::STDOUT, 1, &[0; 65536], &mut Vec::new());
    }
}
