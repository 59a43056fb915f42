//! The `luafcgid` module scripts get from `require("luafcgid")`: `urlencode`, `urldecode`,
//! `parse` (query strings) and `serialize` (Lua literals).
//!
//! All four are Rust functions that run no Lua code (no metamethods are called: `serialize`
//! reads tables raw), so they cannot be used to re-enter the script. `serialize` builds its
//! result outside the Lua heap, so its size is bounded by the run's remaining output budget
//! instead. It does not parse `multipart/form-data` or cookies.

use std::ffi::c_void;

use mlua::{Error, Lua, Table, Value};

use crate::limits::Stop;
use crate::request::with_ctx;
use crate::LimitKind;

/// Deepest table nesting `serialize` writes.
pub(crate) const MAX_SERIALIZE_DEPTH: usize = 64;

/// Builds the module table.
pub(crate) fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table_with_capacity(0, 4)?;
    m.raw_set(
        "urlencode",
        lua.create_function(|lua, s: mlua::LuaString| lua.create_string(urlencode(&s.as_bytes())))?,
    )?;
    m.raw_set(
        "urldecode",
        lua.create_function(|lua, s: mlua::LuaString| lua.create_string(urldecode(&s.as_bytes())))?,
    )?;
    m.raw_set(
        "parse",
        lua.create_function(|lua, s: mlua::LuaString| parse(lua, &s.as_bytes()))?,
    )?;
    m.raw_set(
        "serialize",
        lua.create_function(|lua, v: Value| {
            let max = with_ctx(lua, |ctx| {
                ctx.budget.check()?;
                Ok(ctx.remaining_output())
            })?;
            let mut out = Vec::new();
            match serialize(&v, &mut out, max) {
                Ok(()) => lua.create_string(out),
                Err(SerializeError::TooLong) => with_ctx(lua, |ctx| {
                    Err(ctx.budget.trip(Stop::Limit(LimitKind::Output)))
                }),
                Err(SerializeError::Lua(e)) => Err(e),
            }
        })?,
    )?;
    Ok(m)
}

/// Percent-encodes every byte but ASCII letters, digits and `-._~`; a space becomes `+`.
pub(crate) fn urlencode(s: &[u8]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(s.len());
    for &c in s {
        match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(c),
            b' ' => out.push(b'+'),
            _ => out.extend_from_slice(&[b'%', HEX[usize::from(c >> 4)], HEX[usize::from(c & 15)]]),
        }
    }
    out
}

/// Decodes `%XX` escapes and `+` (a space); a `%` not followed by two hex digits stays.
pub(crate) fn urldecode(s: &[u8]) -> Vec<u8> {
    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < s.len() => match (hex(s[i + 1]), hex(s[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    out
}

/// Splits a query string into decoded `(key, value)` pairs in order; empty pieces are
/// skipped and a key without `=` gets the value `""`.
pub(crate) fn parse_pairs(s: &[u8]) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> + '_ {
    s.split(|&c| c == b'&')
        .filter(|p| !p.is_empty())
        .map(|piece| match piece.iter().position(|&c| c == b'=') {
            Some(eq) => (urldecode(&piece[..eq]), urldecode(&piece[eq + 1..])),
            None => (urldecode(piece), Vec::new()),
        })
}

/// `parse(s)`: a key seen once maps to its value, a repeated key to an array of its values in
/// order.
fn parse(lua: &Lua, s: &[u8]) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    for (k, v) in parse_pairs(s) {
        let k = lua.create_string(k)?;
        let v = lua.create_string(v)?;
        match t.raw_get::<Value>(&k)? {
            Value::Nil => t.raw_set(k, v)?,
            Value::Table(values) => values.raw_push(v)?,
            first => {
                let values = lua.create_table_with_capacity(2, 0)?;
                values.raw_push(first)?;
                values.raw_push(v)?;
                t.raw_set(k, values)?;
            }
        }
    }
    Ok(t)
}

#[derive(Debug)]
pub(crate) enum SerializeError {
    /// The result would exceed the remaining output budget.
    TooLong,
    Lua(Error),
}

impl From<Error> for SerializeError {
    fn from(e: Error) -> Self {
        SerializeError::Lua(e)
    }
}

fn fail(message: &str) -> SerializeError {
    SerializeError::Lua(Error::runtime(format!("serialize: {message}")))
}

/// Writes `v` as a Lua literal that `load("return " .. s)` turns back into an equal value:
/// nil, booleans, numbers (integers stay integers, floats stay floats, `1/0`, `-1/0`, `0/0`),
/// strings (quoted as `string.format("%q")` does) and tables (raw contents, sequence first,
/// then the other keys sorted: booleans, numbers, strings, then tables as met). Functions,
/// userdata, threads, cycles and nesting deeper than [`MAX_SERIALIZE_DEPTH`] are errors.
pub(crate) fn serialize(v: &Value, out: &mut Vec<u8>, max: usize) -> Result<(), SerializeError> {
    let mut path = Vec::new();
    write_value(v, out, max, &mut path)
}

fn write_value(
    v: &Value,
    out: &mut Vec<u8>,
    max: usize,
    path: &mut Vec<*const c_void>,
) -> Result<(), SerializeError> {
    match v {
        Value::Nil => out.extend_from_slice(b"nil"),
        Value::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Integer(i) if *i == i64::MIN => out.extend_from_slice(b"(-9223372036854775807-1)"),
        Value::Integer(i) => out.extend_from_slice(i.to_string().as_bytes()),
        Value::Number(n) => write_float(*n, out),
        Value::String(s) => quote(&s.as_bytes(), out),
        Value::Table(t) => write_table(t, out, max, path)?,
        other => return Err(fail(&format!("cannot serialize a {}", other.type_name()))),
    }
    if out.len() > max {
        return Err(SerializeError::TooLong);
    }
    Ok(())
}

fn write_float(n: f64, out: &mut Vec<u8>) {
    if n.is_nan() {
        out.extend_from_slice(b"0/0");
    } else if n.is_infinite() {
        out.extend_from_slice(if n > 0.0 { b"1/0" } else { b"-1/0" });
    } else {
        // Rust's `{:?}` is the shortest text that reads back to the same f64, and always has a
        // `.` or an exponent, so Lua reads it back as a float.
        out.extend_from_slice(format!("{n:?}").as_bytes());
    }
}

/// Quotes `s` as Lua's `string.format("%q", s)` does.
pub(crate) fn quote(s: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    for (i, &c) in s.iter().enumerate() {
        match c {
            b'"' | b'\\' | b'\n' => out.extend_from_slice(&[b'\\', c]),
            c if c < 0x20 || c == 0x7f => {
                let next_is_digit = s.get(i + 1).is_some_and(u8::is_ascii_digit);
                let text = if next_is_digit {
                    format!("\\{c:03}")
                } else {
                    format!("\\{c}")
                };
                out.extend_from_slice(text.as_bytes());
            }
            c => out.push(c),
        }
    }
    out.push(b'"');
}

const LUA_KEYWORDS: &[&str] = &[
    "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto", "if", "in",
    "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while",
];

fn is_identifier(s: &[u8]) -> bool {
    matches!(s.first(), Some(c) if c.is_ascii_alphabetic() || *c == b'_')
        && s.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
        && !LUA_KEYWORDS.iter().any(|k| k.as_bytes() == s)
}

fn key_rank(k: &Value) -> u8 {
    match k {
        Value::Boolean(_) => 0,
        Value::Integer(_) | Value::Number(_) => 1,
        Value::String(_) => 2,
        _ => 3,
    }
}

fn key_cmp(a: &Value, b: &Value) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let num = |v: &Value| match v {
        Value::Integer(i) => Some(*i as f64),
        Value::Number(n) => Some(*n),
        _ => None,
    };
    key_rank(a).cmp(&key_rank(b)).then_with(|| match (a, b) {
        (Value::Boolean(x), Value::Boolean(y)) => x.cmp(y),
        (Value::Integer(x), Value::Integer(y)) => x.cmp(y),
        (Value::String(x), Value::String(y)) => x.as_bytes().cmp(&y.as_bytes()),
        _ => match (num(a), num(b)) {
            (Some(x), Some(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
            _ => Ordering::Equal,
        },
    })
}

fn write_table(
    t: &Table,
    out: &mut Vec<u8>,
    max: usize,
    path: &mut Vec<*const c_void>,
) -> Result<(), SerializeError> {
    let ptr = t.to_pointer();
    if path.contains(&ptr) {
        return Err(fail("cycle in table"));
    }
    if path.len() >= MAX_SERIALIZE_DEPTH {
        return Err(fail(&format!(
            "tables nested deeper than {MAX_SERIALIZE_DEPTH}"
        )));
    }
    path.push(ptr);
    out.push(b'{');
    let len = t.raw_len();
    let mut first = true;
    for i in 1..=len {
        if !first {
            out.push(b',');
        }
        first = false;
        write_value(&t.raw_get::<Value>(i)?, out, max, path)?;
    }
    let mut rest = Vec::new();
    t.for_each::<Value, Value>(|k, v| {
        let in_sequence = matches!(k, Value::Integer(i) if i >= 1 && (i as u64) <= len as u64);
        if !in_sequence {
            rest.push((k, v));
        }
        Ok(())
    })?;
    rest.sort_by(|(a, _), (b, _)| key_cmp(a, b));
    for (k, v) in &rest {
        if !first {
            out.push(b',');
        }
        first = false;
        match k {
            Value::String(s) if is_identifier(&s.as_bytes()) => {
                out.extend_from_slice(&s.as_bytes());
            }
            _ => {
                out.push(b'[');
                write_value(k, out, max, path)?;
                out.push(b']');
            }
        }
        out.push(b'=');
        write_value(v, out, max, path)?;
        if out.len() > max {
            return Err(SerializeError::TooLong);
        }
    }
    out.push(b'}');
    path.pop();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_round_trip() {
        assert_eq!(urlencode(b"a b&c=d/\xff~"), b"a+b%26c%3Dd%2F%FF~");
        assert_eq!(urldecode(b"a+b%26c%3Dd%2F%FF~"), b"a b&c=d/\xff~");
        assert_eq!(urldecode(b"100%"), b"100%");
        assert_eq!(urldecode(b"%4"), b"%4");
        assert_eq!(urldecode(b"%zz%41"), b"%zzA");
        assert_eq!(urldecode(b"%41"), b"A");
    }

    #[test]
    fn query_pairs() {
        let pairs: Vec<_> = parse_pairs(b"a=1&&b&c=x%20y&a=2=3").collect();
        assert_eq!(
            pairs,
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"".to_vec()),
                (b"c".to_vec(), b"x y".to_vec()),
                (b"a".to_vec(), b"2=3".to_vec()),
            ]
        );
    }

    #[test]
    fn quoting_matches_lua() {
        let mut out = Vec::new();
        quote(b"a\"b\\c\nd\re\0f\x001\x01\x7f", &mut out);
        assert_eq!(out, b"\"a\\\"b\\\\c\\\nd\\13e\\0f\\0001\\1\\127\"".to_vec());
    }

    #[test]
    fn floats() {
        let mut out = Vec::new();
        for n in [
            1.0,
            0.1,
            -0.0,
            1e300,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ] {
            write_float(n, &mut out);
            out.push(b' ');
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1.0 0.1 -0.0 1e300 1/0 -1/0 0/0 "
        );
    }
}
