//! The `luafcgid` module scripts get from `require("luafcgid")`: `urlencode`, `urldecode`,
//! `parse` (query strings) and `serialize` (Lua literals).
//!
//! All four are Rust functions that run no Lua code (no metamethods are called: `serialize`
//! reads tables raw), so they cannot be used to re-enter the script. `serialize` builds its
//! result outside the Lua heap, so its size is bounded by the run's remaining output budget
//! instead, and it checks the deadline every [`STEP_VALUES`] values; `urlencode` and
//! `urldecode` refuse (as the memory limit) a result larger than the state's memory limit
//! before building it, and `parse` checks the deadline every [`STEP_VALUES`] pairs. It does
//! not parse `multipart/form-data` or cookies.

use std::ffi::c_void;

use mlua::{Error, Lua, Table, Value};

use crate::limits::Stop;
use crate::request::with_ctx;
use crate::LimitKind;

/// Deepest table nesting `serialize` writes.
pub(crate) const MAX_SERIALIZE_DEPTH: usize = 64;

/// How many values `serialize` writes (and `parse` reads) between two deadline checks.
pub(crate) const STEP_VALUES: usize = 1024;

/// Errors (as the memory limit) when a `len`-byte result cannot fit the state's memory limit.
fn check_size(lua: &Lua, len: usize) -> mlua::Result<()> {
    with_ctx(lua, |ctx| {
        ctx.budget.step()?;
        let limit = ctx.budget.memory_limit();
        if limit > 0 && len > limit {
            return Err(ctx.budget.trip(Stop::Limit(LimitKind::Memory)));
        }
        Ok(())
    })
}

/// Builds the module table.
pub(crate) fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table_with_capacity(0, 4)?;
    m.raw_set(
        "urlencode",
        lua.create_function(|lua, s: mlua::LuaString| {
            let s = s.as_bytes();
            check_size(lua, urlencoded_len(&s))?;
            lua.create_string(urlencode(&s))
        })?,
    )?;
    m.raw_set(
        "urldecode",
        lua.create_function(|lua, s: mlua::LuaString| {
            let s = s.as_bytes();
            check_size(lua, s.len())?;
            lua.create_string(urldecode(&s))
        })?,
    )?;
    m.raw_set(
        "parse",
        lua.create_function(|lua, s: mlua::LuaString| parse(lua, &s.as_bytes()))?,
    )?;
    m.raw_set(
        "serialize",
        lua.create_function(|lua, v: Value| {
            let (max, budget) = with_ctx(lua, |ctx| {
                ctx.budget.check()?;
                Ok((ctx.remaining_output(), std::sync::Arc::clone(&ctx.budget)))
            })?;
            let mut out = Vec::new();
            match serialize(&v, &mut out, max, &mut || budget.step()) {
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

/// The length of `urlencode(s)`.
fn urlencoded_len(s: &[u8]) -> usize {
    s.iter()
        .map(|&c| match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b' ' => 1,
            _ => 3,
        })
        .sum()
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
    for (n, (k, v)) in parse_pairs(s).enumerate() {
        if (n + 1).is_multiple_of(STEP_VALUES) {
            with_ctx(lua, |ctx| ctx.budget.step())?;
        }
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
///
/// `step` is called every [`STEP_VALUES`] values (and table entries collected); its error
/// ends the serialization.
pub(crate) fn serialize(
    v: &Value,
    out: &mut Vec<u8>,
    max: usize,
    step: &mut dyn FnMut() -> mlua::Result<()>,
) -> Result<(), SerializeError> {
    let mut w = Writer {
        out,
        max,
        path: Vec::new(),
        count: 0,
        step,
    };
    w.value(v)
}

struct Writer<'a> {
    out: &'a mut Vec<u8>,
    max: usize,
    path: Vec<*const c_void>,
    count: usize,
    step: &'a mut dyn FnMut() -> mlua::Result<()>,
}

impl Writer<'_> {
    /// Counts one value; every [`STEP_VALUES`] values, calls `step`.
    fn tick(&mut self) -> mlua::Result<()> {
        self.count += 1;
        if self.count.is_multiple_of(STEP_VALUES) {
            (self.step)()?;
        }
        Ok(())
    }

    fn value(&mut self, v: &Value) -> Result<(), SerializeError> {
        self.tick()?;
        write_value(v, self)
    }
}

fn write_value(v: &Value, w: &mut Writer<'_>) -> Result<(), SerializeError> {
    let out = &mut *w.out;
    match v {
        Value::Nil => out.extend_from_slice(b"nil"),
        Value::Boolean(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Integer(i) if *i == i64::MIN => out.extend_from_slice(b"(-9223372036854775807-1)"),
        Value::Integer(i) => out.extend_from_slice(i.to_string().as_bytes()),
        Value::Number(n) => write_float(*n, out),
        Value::String(s) => quote(&s.as_bytes(), out),
        Value::Table(t) => write_table(t, w)?,
        other => {
            let name = crate::request::type_name(other);
            return Err(fail(&format!("cannot serialize a {name}")));
        }
    }
    if w.out.len() > w.max {
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

/// Sorts `entries` by key (stable), calling `step` every [`STEP_VALUES`] entries sorted or
/// merged: a bottom-up merge sort of runs sorted by `sort_by`.
fn sort_entries(
    entries: &mut Vec<(Value, Value)>,
    step: &mut dyn FnMut() -> mlua::Result<()>,
) -> mlua::Result<()> {
    use std::cmp::Ordering;
    let n = entries.len();
    for run in entries.chunks_mut(STEP_VALUES) {
        run.sort_by(|(a, _), (b, _)| key_cmp(a, b));
        step()?;
    }
    let mut width = STEP_VALUES;
    while width < n {
        let mut out = Vec::with_capacity(n);
        let mut items = std::mem::take(entries).into_iter();
        let mut start = 0;
        while start < n {
            let mid = (start + width).min(n);
            let end = (start + 2 * width).min(n);
            let mut left = items
                .by_ref()
                .take(mid - start)
                .collect::<Vec<_>>()
                .into_iter()
                .peekable();
            let mut right = items
                .by_ref()
                .take(end - mid)
                .collect::<Vec<_>>()
                .into_iter()
                .peekable();
            loop {
                let from_left = match (left.peek(), right.peek()) {
                    (Some(a), Some(b)) => key_cmp(&a.0, &b.0) != Ordering::Greater,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (None, None) => break,
                };
                out.extend(if from_left { left.next() } else { right.next() });
                if out.len().is_multiple_of(STEP_VALUES) {
                    step()?;
                }
            }
            start = end;
        }
        *entries = out;
        width *= 2;
    }
    Ok(())
}

fn write_table(t: &Table, w: &mut Writer<'_>) -> Result<(), SerializeError> {
    let ptr = t.to_pointer();
    if w.path.contains(&ptr) {
        return Err(fail("cycle in table"));
    }
    if w.path.len() >= MAX_SERIALIZE_DEPTH {
        return Err(fail(&format!(
            "tables nested deeper than {MAX_SERIALIZE_DEPTH}"
        )));
    }
    w.path.push(ptr);
    w.out.push(b'{');
    let len = t.raw_len();
    let mut first = true;
    for i in 1..=len {
        if !first {
            w.out.push(b',');
        }
        first = false;
        w.value(&t.raw_get::<Value>(i)?)?;
    }
    // Every other entry takes at least 4 bytes (`k=v,`): stop collecting them once they
    // cannot fit the remaining output.
    let room = w.max.saturating_sub(w.out.len()) / 4;
    let mut rest = Vec::new();
    let mut too_long = false;
    t.for_each::<Value, Value>(|k, v| {
        let in_sequence = matches!(k, Value::Integer(i) if i >= 1 && (i as u64) <= len as u64);
        if !in_sequence {
            if rest.len() >= room {
                too_long = true;
                return Err(Error::runtime("stop"));
            }
            rest.push((k, v));
            w.tick()?;
        }
        Ok(())
    })
    .or_else(|e| if too_long { Ok(()) } else { Err(e) })?;
    if too_long {
        return Err(SerializeError::TooLong);
    }
    sort_entries(&mut rest, w.step)?;
    for (k, v) in &rest {
        if !first {
            w.out.push(b',');
        }
        first = false;
        match k {
            Value::String(s) if is_identifier(&s.as_bytes()) => {
                w.out.extend_from_slice(&s.as_bytes());
            }
            _ => {
                w.out.push(b'[');
                w.value(k)?;
                w.out.push(b']');
            }
        }
        w.out.push(b'=');
        w.value(v)?;
        if w.out.len() > w.max {
            return Err(SerializeError::TooLong);
        }
    }
    w.out.push(b'}');
    w.path.pop();
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
