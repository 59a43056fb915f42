//! FastCGI name-value pairs: decoding a whole PARAMS (or GET_VALUES) stream into
//! [`Params`], and encoding one pair.
//!
//! A pair on the wire is `nameLength valueLength name value`, each length one
//! byte (< 128) or four bytes big-endian with the top bit set. [`Params`] keeps
//! the stream as it arrived and one 12-byte entry per pair pointing into it; it
//! does not copy, sort, deduplicate or interpret names or values.

use std::fmt;

/// A malformed name-value pair stream.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ParamsError {
    /// The stream ends inside a length prefix.
    #[error("name-value pair stream ends inside a length")]
    Truncated,
    /// A name or value length runs past the end of the stream (or the stream is
    /// longer than 4 GiB, more than [`Params`] can index).
    #[error("name-value pair length runs past the end of the stream")]
    LengthOverflow,
}

/// Decoded name-value pairs (FastCGI params), owned.
///
/// Lookup is a linear scan in arrival order and returns the first match, as
/// CGI environments are built: cheap for the ~30 params a web server sends.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Params {
    data: Vec<u8>,
    entries: Vec<Entry>,
}

/// Entries a stream is first given room for: more than the ~20 params nginx sends.
const SPARE_ENTRIES: usize = 32;

/// One pair: `data[name_start..][..name_len]` then the value right after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    name_start: u32,
    name_len: u32,
    value_len: u32,
}

/// Reads one length at `*pos`, advancing it.
#[inline]
fn read_len(buf: &[u8], pos: &mut usize) -> Result<usize, ParamsError> {
    let first = *buf.get(*pos).ok_or(ParamsError::Truncated)?;
    if first & 0x80 == 0 {
        *pos += 1;
        return Ok(usize::from(first));
    }
    let Some(b) = buf.get(*pos..).and_then(<[u8]>::first_chunk::<4>) else {
        return Err(ParamsError::Truncated);
    };
    *pos += 4;
    let len = u32::from_be_bytes([b[0] & 0x7f, b[1], b[2], b[3]]);
    usize::try_from(len).map_err(|_| ParamsError::LengthOverflow)
}

/// Reads the pair at `pos`: `(name_start, name_len, value_len, next_pos)`.
#[inline]
fn read_pair(buf: &[u8], mut pos: usize) -> Result<(usize, usize, usize, usize), ParamsError> {
    let name_len = read_len(buf, &mut pos)?;
    let value_len = read_len(buf, &mut pos)?;
    let end = pos
        .checked_add(name_len)
        .and_then(|n| n.checked_add(value_len))
        .filter(|&end| end <= buf.len())
        .ok_or(ParamsError::LengthOverflow)?;
    Ok((pos, name_len, value_len, end))
}

impl Params {
    /// Decodes a complete name-value pair stream, taking ownership of it.
    ///
    /// One pass; the memory held is the stream plus 12 bytes per pair (and spare room for
    /// at most `SPARE_ENTRIES` (32) more, or a quarter of the entries).
    pub fn decode(raw: Vec<u8>) -> Result<Params, ParamsError> {
        if u32::try_from(raw.len()).is_err() {
            return Err(ParamsError::LengthOverflow);
        }
        // Room for what a web server sends; a pair takes at least two bytes.
        let mut entries = Vec::with_capacity(SPARE_ENTRIES.min(raw.len() / 2));
        let mut pos = 0;
        while pos < raw.len() {
            let (name_start, name_len, value_len, next) = read_pair(&raw, pos)?;
            // All three fit in u32: checked against raw.len() above.
            entries.push(Entry {
                name_start: name_start as u32,
                name_len: name_len as u32,
                value_len: value_len as u32,
            });
            pos = next;
        }
        if entries.capacity() - entries.len() > SPARE_ENTRIES.max(entries.len() / 4) {
            entries.shrink_to_fit();
        }
        Ok(Params { data: raw, entries })
    }

    #[inline]
    fn name_of(&self, e: &Entry) -> &[u8] {
        let start = e.name_start as usize;
        &self.data[start..start + e.name_len as usize]
    }

    #[inline]
    fn value_of(&self, e: &Entry) -> &[u8] {
        let start = e.name_start as usize + e.name_len as usize;
        &self.data[start..start + e.value_len as usize]
    }

    /// The value of the first pair named `name`.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|e| self.is_named(e, name))
            .map(|e| self.value_of(e))
    }

    /// Whether `e` is named `name`. Most pairs are told apart by the length in their entry,
    /// without slicing the stream. The names a web server sends share their lengths and
    /// prefixes often (`REMOTE_ADDR`, `REQUEST_URI`, `SERVER_NAME`, ...) but rarely their
    /// last byte: compared next, it settles most of the rest without a call to `memcmp`.
    #[inline]
    fn is_named(&self, e: &Entry, name: &[u8]) -> bool {
        if e.name_len as usize != name.len() {
            return false;
        }
        let own = self.name_of(e);
        own.last() == name.last() && own == name
    }

    /// The first values of the params named `names`, found in one pass over the pairs.
    pub fn first_of<const N: usize>(&self, names: [&[u8]; N]) -> [Option<&[u8]>; N] {
        let mut found = [None; N];
        let mut missing = N;
        for e in &self.entries {
            for (slot, wanted) in found.iter_mut().zip(names) {
                if slot.is_none() && self.is_named(e, wanted) {
                    *slot = Some(self.value_of(e));
                    missing -= 1;
                }
            }
            if missing == 0 {
                break;
            }
        }
        found
    }

    /// All pairs in arrival order, duplicates included.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.entries
            .iter()
            .map(|e| (self.name_of(e), self.value_of(e)))
    }

    /// Number of pairs, duplicates included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `true` when there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of the encoded stream the pairs were decoded from.
    pub fn raw_len(&self) -> usize {
        self.data.len()
    }

    /// Heap bytes held (stream plus entries), for memory accounting.
    pub fn heap_size(&self) -> usize {
        self.data.capacity() + self.entries.capacity() * std::mem::size_of::<Entry>()
    }
}

impl fmt::Debug for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.iter()
                    .map(|(n, v)| (String::from_utf8_lossy(n), String::from_utf8_lossy(v))),
            )
            .finish()
    }
}

/// Appends one pair, with 1-byte lengths below 128 and 4-byte lengths otherwise.
///
/// # Panics
///
/// If `name` or `value` is longer than 2³¹ − 1 bytes, which no length can express.
pub fn encode_pair(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    fn push_len(len: usize, out: &mut Vec<u8>) {
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let len = u32::try_from(len)
                .ok()
                .filter(|&l| l <= 0x7fff_ffff)
                .expect("a FastCGI name or value is at most 2^31 - 1 bytes");
            out.extend_from_slice(&(len | 0x8000_0000).to_be_bytes());
        }
    }
    out.reserve(8 + name.len() + value.len());
    push_len(name.len(), out);
    push_len(value.len(), out);
    out.extend_from_slice(name);
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, v) in pairs {
            encode_pair(n, v, &mut out);
        }
        out
    }

    #[test]
    fn first_of_finds_the_first_value_of_each_name_in_one_pass() {
        let raw = stream(&[
            (b"REMOTE_ADDR", b"192.0.2.1"),
            (b"REQUEST_URI", b"/first"),
            (b"REQUEST_URL", b"/not-this"),
            (b"REQUEST_URI", b"/second"),
            (b"SERVER_NAME", b"example"),
            (b"", b"empty name"),
        ]);
        let p = Params::decode(raw).unwrap();
        assert_eq!(
            p.first_of([b"REQUEST_URI", b"REMOTE_ADDR", b"REQUEST_METHOD", b""]),
            [
                Some(&b"/first"[..]),
                Some(&b"192.0.2.1"[..]),
                None,
                Some(&b"empty name"[..]),
            ]
        );
        // Same length, same last byte, different elsewhere.
        assert_eq!(p.first_of([b"REQUEST_XRI"]), [None]);
        assert_eq!(p.get(b"REQUEST_XRI"), None);
        assert_eq!(p.get(b"REQUEST_URL"), Some(&b"/not-this"[..]));
    }

    #[test]
    fn decodes_pairs_in_order_and_get_returns_first_match() {
        let raw = stream(&[(b"A", b"1"), (b"B", b""), (b"A", b"2"), (b"", b"x")]);
        let raw_len = raw.len();
        let p = Params::decode(raw).unwrap();
        assert_eq!(p.len(), 4);
        assert!(!p.is_empty());
        assert_eq!(p.raw_len(), raw_len);
        assert_eq!(p.get(b"A"), Some(&b"1"[..]));
        assert_eq!(p.get(b"B"), Some(&b""[..]));
        assert_eq!(p.get(b""), Some(&b"x"[..]));
        assert_eq!(p.get(b"C"), None);
        assert_eq!(p.get(b"AA"), None);
        let all: Vec<_> = p.iter().collect();
        assert_eq!(
            all,
            vec![
                (&b"A"[..], &b"1"[..]),
                (&b"B"[..], &b""[..]),
                (&b"A"[..], &b"2"[..]),
                (&b""[..], &b"x"[..])
            ]
        );
    }

    #[test]
    fn empty_stream_is_empty_params() {
        let p = Params::decode(Vec::new()).unwrap();
        assert!(p.is_empty());
        assert_eq!(p.len(), 0);
        assert_eq!(p.get(b"X"), None);
    }

    #[test]
    fn length_encoding_switches_at_128() {
        let mut out = Vec::new();
        encode_pair(&[b'n'; 127], &[b'v'; 128], &mut out);
        assert_eq!(out[0], 127);
        assert_eq!(&out[1..5], &[0x80, 0, 0, 128]);
        assert_eq!(out.len(), 1 + 4 + 127 + 128);
        let p = Params::decode(out).unwrap();
        assert_eq!(p.get(&[b'n'; 127]), Some(&[b'v'; 128][..]));
    }

    #[test]
    fn four_byte_lengths_decode_large_values() {
        let name = vec![b'N'; 300];
        let value = vec![b'V'; 70_000];
        let raw = stream(&[(&name, &value), (b"K", b"v")]);
        assert_eq!(&raw[..4], &(300u32 | 0x8000_0000).to_be_bytes());
        let p = Params::decode(raw).unwrap();
        assert_eq!(p.get(&name).map(<[u8]>::len), Some(70_000));
        assert_eq!(p.get(b"K"), Some(&b"v"[..]));
    }

    #[test]
    fn four_byte_length_form_accepted_for_short_lengths() {
        // Legal: a sender may use the long form for any length.
        let raw = vec![0x80, 0, 0, 1, 0x80, 0, 0, 2, b'a', b'x', b'y'];
        let p = Params::decode(raw).unwrap();
        assert_eq!(p.get(b"a"), Some(&b"xy"[..]));
    }

    #[test]
    fn truncated_length_is_an_error() {
        assert_eq!(Params::decode(vec![1]), Err(ParamsError::Truncated));
        assert_eq!(
            Params::decode(vec![0x80, 0, 0]),
            Err(ParamsError::Truncated)
        );
        assert_eq!(
            Params::decode(vec![1, 0x80, 0, 0]),
            Err(ParamsError::Truncated)
        );
    }

    #[test]
    fn length_past_end_is_an_error() {
        assert_eq!(
            Params::decode(vec![1, 1, b'a']),
            Err(ParamsError::LengthOverflow)
        );
        assert_eq!(
            Params::decode(vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(ParamsError::LengthOverflow)
        );
        let mut raw = stream(&[(b"A", b"1")]);
        raw.extend_from_slice(&[3, 0, b'a']);
        assert_eq!(Params::decode(raw), Err(ParamsError::LengthOverflow));
    }

    #[test]
    fn every_prefix_of_a_stream_decodes_or_errors_without_panic() {
        let raw = stream(&[(b"NAME", &[b'x'; 200]), (b"B", b"2")]);
        for n in 0..raw.len() {
            let r = Params::decode(raw[..n].to_vec());
            // Cuts at a pair boundary decode; others do not.
            match n {
                0 => assert_eq!(r.map(|p| p.len()), Ok(0)),
                209 => assert_eq!(r.map(|p| p.len()), Ok(1)),
                _ => assert!(r.is_err(), "prefix {n} should fail"),
            }
        }
    }

    #[test]
    fn spare_entries_are_bounded() {
        for n in [0usize, 1, 3, 20, 33, 100, 600, 1000] {
            let names: Vec<Vec<u8>> = (0..n).map(|i| i.to_string().into_bytes()).collect();
            let pairs: Vec<(&[u8], &[u8])> = names.iter().map(|k| (&k[..], &b"v"[..])).collect();
            let raw = stream(&pairs);
            let cap = raw.capacity();
            let p = Params::decode(raw).unwrap();
            assert_eq!(p.len(), n);
            let entries = (p.heap_size() - cap) / 12;
            assert!(entries >= n, "{n} pairs, room for {entries}");
            assert!(
                entries - n <= SPARE_ENTRIES.max(n / 4),
                "{n} pairs, room for {entries}"
            );
        }
    }

    #[test]
    fn debug_shows_pairs() {
        let p = Params::decode(stream(&[(b"A", b"1")])).unwrap();
        assert_eq!(format!("{p:?}"), r#"{"A": "1"}"#);
    }
}
