//! Lua 5.4's pattern matching, ported to Rust so that a long match can be stopped: the
//! `string.find`, `string.match`, `string.gmatch` and `string.gsub` every state gets (and, as
//! the string metatable's `__index` is the `string` table, `("x"):find(...)` too).
//!
//! What it does: the matcher of `lstrlib.c` (Lua 5.4.9) line for line — classes (with the
//! deprecated `%z`), sets, anchors, `%b`, `%f`, captures, position captures,
//! back-references, the 200-level recursion limit and the 32-capture limit, with the same
//! error messages — and the four
//! functions with the same arguments, `init` rules, results and errors; `find` searches
//! plainly when asked to or when the pattern has no special character, as Lua does. It
//! counts its work in steps (one per call of the core match function, per subject character
//! tried by a repetition or `%b`, per 64 bytes compared or copied) and every [`CHECK_EVERY`]
//! steps charges them to the state's [`Budget`] as instructions and checks the deadline and
//! the abort flag, tripping the budget as the budget hook does: a pathological pattern, a
//! plain search of a long needle or a huge `gsub` ends as `limit_time` (or `limit_cpu`) within
//! a fraction of a millisecond of the limit. A `gsub` result is built in chunks that are Lua
//! strings, so it stays under the state's memory limit. Errors are raised as Lua strings
//! (through a small Lua wrapper), with the caller's position as `luaL_error` adds it; an error
//! raised by a `gsub` replacement function or `__index` passes through unchanged.
//!
//! Calls whose worst-case work is provably small (a bound from the subject's length, the
//! pattern's length and its count of repetitions, `%b` and back-references, at most
//! [`FAST_PATH_LIMIT`] byte steps, a few milliseconds) still go to Lua's C functions, which
//! are several times faster on short subjects than a call through mlua; everything else, and
//! every call whose arguments are not plain strings and integers, runs here.
//!
//! What it does not do: argument errors always name the function `find`, `match`, `gmatch`
//! or `gsub` and count arguments from the first (C Lua says "calling 'find' on bad self" or
//! shifts the number for method calls), and a missing `gsub` replacement reads "got nil"
//! rather than "got no value". Character classes are those of the C locale. `string.format`,
//! `string.rep` and the rest of the string library are Lua's own.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;

use mlua::{Function, Lua, LuaString, MultiValue, Table, Value};

use crate::limits::Budget;

/// Steps between two checks of the budget (a few tens of microseconds of matching).
pub(crate) const CHECK_EVERY: u32 = 4096;
/// Calls whose worst case is at most this many byte steps (a few milliseconds) go to Lua's
/// own C functions, which are faster on short subjects (no mlua call overhead).
const FAST_PATH_LIMIT: f64 = 2e6;
/// Most captures in one pattern (`LUA_MAXCAPTURES`).
const MAX_CAPTURES: usize = 32;
/// Most nested calls of the core match function (`MAXCCALLS` of `lstrlib.c`).
const MAX_DEPTH: u32 = 200;
const L_ESC: u8 = b'%';
const SPECIALS: &[u8] = b"^$*+?.([%-";
const CAP_UNFINISHED: isize = -1;
const CAP_POSITION: isize = -2;
/// A `gsub` result grows in Rust up to this size, then moves into a Lua string.
const FLUSH_AT: usize = 64 * 1024;

/// Why a matching function stopped early.
enum Fail {
    /// An error Lua raises with this message (a pattern or argument error).
    Raise(String),
    /// An error value raised by a replacement function or `__index`, passed through as is.
    Value(Value),
    /// An error from mlua or the budget (a limit, memory), returned to mlua as is.
    Lua(mlua::Error),
}

impl From<mlua::Error> for Fail {
    fn from(e: mlua::Error) -> Fail {
        Fail::Lua(e)
    }
}

type MResult<T> = Result<T, Fail>;

fn raise<T>(msg: impl Into<String>) -> MResult<T> {
    Err(Fail::Raise(msg.into()))
}

/// Turns a result into what the Lua wrappers expect: the values, or the `raise` marker and
/// the error value for them to raise.
fn finish(result: MResult<MultiValue>, marker: &Table, lua: &Lua) -> mlua::Result<MultiValue> {
    match result {
        Ok(values) => Ok(values),
        Err(Fail::Raise(msg)) => Ok(MultiValue::from_vec(vec![
            Value::Table(marker.clone()),
            Value::String(lua.create_string(msg)?),
        ])),
        Err(Fail::Value(v)) => Ok(MultiValue::from_vec(vec![
            Value::Table(marker.clone()),
            v,
            Value::Boolean(true),
        ])),
        Err(Fail::Lua(e)) => Err(e),
    }
}

/// State shared by the four functions of one Lua state.
#[derive(Debug)]
struct Shared {
    budget: Arc<Budget>,
    /// Steps left before the next check, carried from call to call so that many short
    /// matches are charged too.
    left: AtomicU32,
}

/// Counts steps of one call and charges them to the budget every [`CHECK_EVERY`].
struct Meter<'a> {
    lua: &'a Lua,
    shared: &'a Shared,
    left: u32,
}

impl<'a> Meter<'a> {
    fn new(lua: &'a Lua, shared: &'a Shared) -> Meter<'a> {
        let left = shared.left.load(Relaxed).clamp(1, CHECK_EVERY);
        Meter { lua, shared, left }
    }

    #[inline(always)]
    fn tick(&mut self) -> MResult<()> {
        self.left -= 1;
        if self.left == 0 {
            self.charge(u64::from(CHECK_EVERY))?;
        }
        Ok(())
    }

    /// Counts `n` steps at once (bulk work: comparing or copying bytes).
    #[inline]
    fn add(&mut self, n: usize) -> MResult<()> {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        if n < u64::from(self.left) {
            self.left -= n as u32;
            Ok(())
        } else {
            let used = u64::from(CHECK_EVERY - self.left).saturating_add(n);
            self.charge(used)
        }
    }

    #[cold]
    #[inline(never)]
    fn charge(&mut self, steps: u64) -> MResult<()> {
        self.left = CHECK_EVERY;
        self.shared.budget.charge(self.lua, steps)?;
        Ok(())
    }
}

impl Drop for Meter<'_> {
    fn drop(&mut self) {
        self.shared.left.store(self.left, Relaxed);
    }
}

#[derive(Clone, Copy)]
struct Capture {
    init: usize,
    len: isize,
}

/// A capture's value: a slice of the subject, or a position (1-based).
enum Cap {
    Str(usize, usize),
    Pos(usize),
}

/// `MatchState` of `lstrlib.c`, with indices for pointers.
struct MatchState<'a> {
    src: &'a [u8],
    pat: &'a [u8],
    depth: u32,
    level: usize,
    capture: [Capture; MAX_CAPTURES],
    meter: Meter<'a>,
}

impl<'a> MatchState<'a> {
    fn new(src: &'a [u8], pat: &'a [u8], meter: Meter<'a>) -> MatchState<'a> {
        MatchState {
            src,
            pat,
            depth: MAX_DEPTH,
            level: 0,
            capture: [Capture { init: 0, len: 0 }; MAX_CAPTURES],
            meter,
        }
    }

    fn reprep(&mut self) {
        self.depth = MAX_DEPTH;
        self.level = 0;
    }

    /// The pattern byte at `i`, or 0 past the end (C reads the terminating NUL).
    #[inline(always)]
    fn p(&self, i: usize) -> u8 {
        self.pat.get(i).copied().unwrap_or(0)
    }

    /// The subject byte at `i`, or 0 past the end.
    #[inline(always)]
    fn s(&self, i: usize) -> u8 {
        self.src.get(i).copied().unwrap_or(0)
    }

    fn check_capture(&self, l: u8) -> MResult<usize> {
        let l = i32::from(l) - i32::from(b'1');
        if l < 0 || l as usize >= self.level || self.capture[l as usize].len == CAP_UNFINISHED {
            return raise(format!("invalid capture index %{}", l + 1));
        }
        Ok(l as usize)
    }

    fn capture_to_close(&self) -> MResult<usize> {
        match (0..self.level)
            .rev()
            .find(|&l| self.capture[l].len == CAP_UNFINISHED)
        {
            Some(l) => Ok(l),
            None => raise("invalid pattern capture"),
        }
    }

    fn class_end(&self, mut p: usize) -> MResult<usize> {
        let c = self.p(p);
        p += 1;
        match c {
            L_ESC => {
                if p >= self.pat.len() {
                    return raise("malformed pattern (ends with '%')");
                }
                Ok(p + 1)
            }
            b'[' => {
                if self.p(p) == b'^' {
                    p += 1;
                }
                loop {
                    if p >= self.pat.len() {
                        return raise("malformed pattern (missing ']')");
                    }
                    let c = self.pat[p];
                    p += 1;
                    if c == L_ESC && p < self.pat.len() {
                        p += 1;
                    }
                    if self.p(p) == b']' {
                        break;
                    }
                }
                Ok(p + 1)
            }
            _ => Ok(p),
        }
    }

    /// `p` is the index of `[`, `ec` of the closing `]`.
    fn match_bracket_class(&self, c: u8, mut p: usize, ec: usize) -> bool {
        let mut sig = true;
        if self.p(p + 1) == b'^' {
            sig = false;
            p += 1;
        }
        loop {
            p += 1;
            if p >= ec {
                break;
            }
            let pc = self.pat[p];
            if pc == L_ESC {
                p += 1;
                if match_class(c, self.p(p)) {
                    return sig;
                }
            } else if self.p(p + 1) == b'-' && p + 2 < ec {
                p += 2;
                if self.pat[p - 2] <= c && c <= self.pat[p] {
                    return sig;
                }
            } else if pc == c {
                return sig;
            }
        }
        !sig
    }

    #[inline]
    fn single_match(&self, s: usize, p: usize, ep: usize) -> bool {
        let Some(&c) = self.src.get(s) else {
            return false;
        };
        match self.pat[p] {
            b'.' => true,
            L_ESC => match_class(c, self.p(p + 1)),
            b'[' => self.match_bracket_class(c, p, ep - 1),
            pc => pc == c,
        }
    }

    fn match_balance(&mut self, s: usize, p: usize) -> MResult<Option<usize>> {
        if p + 1 >= self.pat.len() {
            return raise("malformed pattern (missing arguments to '%b')");
        }
        if self.s(s) != self.pat[p] {
            return Ok(None);
        }
        let (b, e) = (self.pat[p], self.pat[p + 1]);
        let mut cont = 1u32;
        let mut s = s + 1;
        while s < self.src.len() {
            self.meter.tick()?;
            let c = self.src[s];
            if c == e {
                cont -= 1;
                if cont == 0 {
                    return Ok(Some(s + 1));
                }
            } else if c == b {
                cont += 1;
            }
            s += 1;
        }
        Ok(None)
    }

    fn max_expand(&mut self, s: usize, p: usize, ep: usize) -> MResult<Option<usize>> {
        let mut i = 0usize;
        while self.single_match(s + i, p, ep) {
            i += 1;
            self.meter.tick()?;
        }
        loop {
            if let Some(res) = self.do_match(s + i, ep + 1)? {
                return Ok(Some(res));
            }
            if i == 0 {
                return Ok(None);
            }
            i -= 1;
        }
    }

    fn min_expand(&mut self, mut s: usize, p: usize, ep: usize) -> MResult<Option<usize>> {
        loop {
            if let Some(res) = self.do_match(s, ep + 1)? {
                return Ok(Some(res));
            } else if self.single_match(s, p, ep) {
                s += 1;
            } else {
                return Ok(None);
            }
        }
    }

    fn start_capture(&mut self, s: usize, p: usize, what: isize) -> MResult<Option<usize>> {
        let level = self.level;
        if level >= MAX_CAPTURES {
            return raise("too many captures");
        }
        self.capture[level] = Capture { init: s, len: what };
        self.level = level + 1;
        let res = self.do_match(s, p)?;
        if res.is_none() {
            self.level -= 1;
        }
        Ok(res)
    }

    fn end_capture(&mut self, s: usize, p: usize) -> MResult<Option<usize>> {
        let l = self.capture_to_close()?;
        self.capture[l].len = (s - self.capture[l].init) as isize;
        let res = self.do_match(s, p)?;
        if res.is_none() {
            self.capture[l].len = CAP_UNFINISHED;
        }
        Ok(res)
    }

    fn match_capture(&mut self, s: usize, l: u8) -> MResult<Option<usize>> {
        let l = self.check_capture(l)?;
        let cap = self.capture[l];
        // A position capture never matches (C compares against its length cast to size_t).
        if cap.len < 0 {
            return Ok(None);
        }
        let len = cap.len as usize;
        if self.src.len() - s >= len {
            self.meter.add(len >> 6)?;
            if self.src[cap.init..cap.init + len] == self.src[s..s + len] {
                return Ok(Some(s + len));
            }
        }
        Ok(None)
    }

    /// `match` of `lstrlib.c`: the end of the match of `pat[p..]` at `s`, if any.
    fn do_match(&mut self, mut s: usize, mut p: usize) -> MResult<Option<usize>> {
        if self.depth == 0 {
            return raise("pattern too complex");
        }
        self.depth -= 1;
        let res = loop {
            self.meter.tick()?;
            if p == self.pat.len() {
                break Some(s);
            }
            match self.pat[p] {
                b'(' => {
                    break if self.p(p + 1) == b')' {
                        self.start_capture(s, p + 2, CAP_POSITION)?
                    } else {
                        self.start_capture(s, p + 1, CAP_UNFINISHED)?
                    };
                }
                b')' => break self.end_capture(s, p + 1)?,
                b'$' if p + 1 == self.pat.len() => {
                    break (s == self.src.len()).then_some(s);
                }
                L_ESC if self.p(p + 1) == b'b' => match self.match_balance(s, p + 2)? {
                    Some(e) => {
                        s = e;
                        p += 4;
                    }
                    None => break None,
                },
                L_ESC if self.p(p + 1) == b'f' => {
                    p += 2;
                    if self.p(p) != b'[' {
                        return raise("missing '[' after '%f' in pattern");
                    }
                    let ep = self.class_end(p)?;
                    let previous = if s == 0 { 0 } else { self.src[s - 1] };
                    if !self.match_bracket_class(previous, p, ep - 1)
                        && self.match_bracket_class(self.s(s), p, ep - 1)
                    {
                        p = ep;
                    } else {
                        break None;
                    }
                }
                L_ESC if self.p(p + 1).is_ascii_digit() => {
                    match self.match_capture(s, self.p(p + 1))? {
                        Some(e) => {
                            s = e;
                            p += 2;
                        }
                        None => break None,
                    }
                }
                _ => {
                    let ep = self.class_end(p)?;
                    let epc = self.p(ep);
                    if !self.single_match(s, p, ep) {
                        if epc == b'*' || epc == b'?' || epc == b'-' {
                            p = ep + 1;
                        } else {
                            break None;
                        }
                    } else {
                        match epc {
                            b'?' => {
                                if let Some(res) = self.do_match(s + 1, ep + 1)? {
                                    break Some(res);
                                }
                                p = ep + 1;
                            }
                            b'+' => break self.max_expand(s + 1, p, ep)?,
                            b'*' => break self.max_expand(s, p, ep)?,
                            b'-' => break self.min_expand(s, p, ep)?,
                            _ => {
                                s += 1;
                                p = ep;
                            }
                        }
                    }
                }
            }
        };
        self.depth += 1;
        Ok(res)
    }

    fn get_capture(&self, i: usize, s: usize, e: usize) -> MResult<Cap> {
        if i >= self.level {
            if i != 0 {
                return raise(format!("invalid capture index %{}", i + 1));
            }
            return Ok(Cap::Str(s, e));
        }
        let cap = self.capture[i];
        match cap.len {
            CAP_UNFINISHED => raise("unfinished capture"),
            CAP_POSITION => Ok(Cap::Pos(cap.init + 1)),
            len => Ok(Cap::Str(cap.init, cap.init + len as usize)),
        }
    }

    fn capture_value(&self, lua: &Lua, i: usize, s: usize, e: usize) -> MResult<Value> {
        Ok(match self.get_capture(i, s, e)? {
            Cap::Str(a, b) => Value::String(lua.create_string(&self.src[a..b])?),
            Cap::Pos(n) => Value::Integer(n as i64),
        })
    }

    /// Appends the captures to `out`; the whole match `whole` when there are none.
    fn push_captures(
        &self,
        lua: &Lua,
        whole: Option<(usize, usize)>,
        out: &mut Vec<Value>,
    ) -> MResult<()> {
        let n = if self.level == 0 && whole.is_some() {
            1
        } else {
            self.level
        };
        let (s, e) = whole.unwrap_or((0, 0));
        for i in 0..n {
            out.push(self.capture_value(lua, i, s, e)?);
        }
        Ok(())
    }
}

/// `match_class` of `lstrlib.c` in the C locale.
fn match_class(c: u8, cl: u8) -> bool {
    let res = match cl.to_ascii_lowercase() {
        b'a' => c.is_ascii_alphabetic(),
        b'c' => c.is_ascii_control(),
        b'd' => c.is_ascii_digit(),
        b'g' => c.is_ascii_graphic(),
        b'l' => c.is_ascii_lowercase(),
        b'p' => c.is_ascii_punctuation(),
        b's' => matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'),
        b'u' => c.is_ascii_uppercase(),
        b'w' => c.is_ascii_alphanumeric(),
        b'x' => c.is_ascii_hexdigit(),
        b'z' => c == 0, // deprecated, still in 5.4
        _ => return cl == c,
    };
    if cl.is_ascii_uppercase() {
        !res
    } else {
        res
    }
}

fn no_specials(p: &[u8]) -> bool {
    !p.iter().any(|c| SPECIALS.contains(c))
}

/// `lmemfind`: where `needle` first occurs in `hay`.
fn find_plain(hay: &[u8], needle: &[u8], meter: &mut Meter<'_>) -> MResult<Option<usize>> {
    let Some((&first, rest)) = needle.split_first() else {
        return Ok(Some(0));
    };
    if needle.len() > hay.len() {
        return Ok(None);
    }
    let last = hay.len() - needle.len();
    let mut i = 0;
    while i <= last {
        let Some(k) = hay[i..=last].iter().position(|&b| b == first) else {
            meter.add((last - i) >> 6)?;
            return Ok(None);
        };
        i += k;
        meter.add(1 + ((k + rest.len()) >> 6))?;
        if &hay[i + 1..i + needle.len()] == rest {
            return Ok(Some(i));
        }
        i += 1;
    }
    Ok(None)
}

/// `posrelatI` of `lstrlib.c`.
fn posrelat(pos: i64, len: usize) -> usize {
    if pos > 0 {
        pos as usize
    } else if pos == 0 || pos < -(len as i64) {
        1
    } else {
        (len as i64 + pos + 1) as usize
    }
}

/// `luaL_typename`, with `luaL_typeerror`'s "light userdata".
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "boolean",
        Value::LightUserData(_) => "light userdata",
        Value::Integer(_) | Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Table(_) => "table",
        Value::Function(_) => "function",
        Value::Thread(_) => "thread",
        _ => "userdata",
    }
}

fn arg_error<T>(n: usize, fname: &str, msg: impl std::fmt::Display) -> MResult<T> {
    raise(format!("bad argument #{n} to '{fname}' ({msg})"))
}

fn type_error<T>(args: &[Value], n: usize, fname: &str, expected: &str) -> MResult<T> {
    let got = args.get(n - 1).map_or("no value", type_name);
    arg_error(n, fname, format!("{expected} expected, got {got}"))
}

/// `luaL_checklstring`: a string, or a number converted to one.
fn check_string<'v>(
    lua: &Lua,
    args: &'v [Value],
    n: usize,
    fname: &str,
) -> MResult<Cow<'v, LuaString>> {
    match args.get(n - 1) {
        Some(Value::String(s)) => Ok(Cow::Borrowed(s)),
        Some(v @ (Value::Integer(_) | Value::Number(_))) => match lua.coerce_string(v.clone())? {
            Some(s) => Ok(Cow::Owned(s)),
            None => type_error(args, n, fname, "string"),
        },
        _ => type_error(args, n, fname, "string"),
    }
}

/// `luaL_optinteger`.
fn opt_integer(lua: &Lua, args: &[Value], n: usize, default: i64, fname: &str) -> MResult<i64> {
    match args.get(n - 1) {
        None | Some(Value::Nil) => Ok(default),
        Some(Value::Integer(i)) => Ok(*i),
        Some(v) => match lua.coerce_integer(v.clone())? {
            Some(i) => Ok(i),
            None if lua.coerce_number(v.clone())?.is_some() => {
                arg_error(n, fname, "number has no integer representation")
            }
            None => type_error(args, n, fname, "number"),
        },
    }
}

fn truthy(v: Option<&Value>) -> bool {
    !matches!(v, None | Some(Value::Nil) | Some(Value::Boolean(false)))
}

fn nil() -> MultiValue {
    MultiValue::from_vec(vec![Value::Nil])
}

/// `str_find_aux`: `string.find` (`find`) or `string.match`.
fn find_aux(lua: &Lua, shared: &Shared, args: &[Value], find: bool) -> MResult<MultiValue> {
    let fname = if find { "find" } else { "match" };
    let s = check_string(lua, args, 1, fname)?;
    let p = check_string(lua, args, 2, fname)?;
    let (src, pat) = (s.as_bytes(), p.as_bytes());
    let init = posrelat(opt_integer(lua, args, 3, 1, fname)?, src.len()) - 1;
    if init > src.len() {
        return Ok(nil());
    }
    let mut meter = Meter::new(lua, shared);
    if find && (truthy(args.get(3)) || no_specials(&pat)) {
        if let Some(i) = find_plain(&src[init..], &pat, &mut meter)? {
            let start = init + i;
            return Ok(MultiValue::from_vec(vec![
                Value::Integer(start as i64 + 1),
                Value::Integer((start + pat.len()) as i64),
            ]));
        }
        return Ok(nil());
    }
    let (pat, anchor) = match pat.split_first() {
        Some((b'^', rest)) => (rest, true),
        _ => (&pat[..], false),
    };
    let mut ms = MatchState::new(&src, pat, meter);
    let mut s1 = init;
    loop {
        ms.reprep();
        if let Some(e) = ms.do_match(s1, 0)? {
            let mut out = Vec::with_capacity(2 + ms.level);
            if find {
                out.push(Value::Integer(s1 as i64 + 1));
                out.push(Value::Integer(e as i64));
                ms.push_captures(lua, None, &mut out)?;
            } else {
                ms.push_captures(lua, Some((s1, e)), &mut out)?;
            }
            return Ok(MultiValue::from_vec(out));
        }
        let more = s1 < src.len() && !anchor;
        s1 += 1;
        if !more {
            return Ok(nil());
        }
    }
}

/// `gmatch`: the iterator over the matches.
fn gmatch(lua: &Lua, shared: &Arc<Shared>, marker: &Table, args: &[Value]) -> MResult<Function> {
    let s = check_string(lua, args, 1, "gmatch")?.into_owned();
    let p = check_string(lua, args, 2, "gmatch")?.into_owned();
    let len = s.as_bytes().len();
    let mut pos = posrelat(opt_integer(lua, args, 3, 1, "gmatch")?, len) - 1;
    if pos > len {
        pos = len + 1;
    }
    let mut last: Option<usize> = None;
    let shared = Arc::clone(shared);
    let marker = marker.clone();
    let f = lua.create_function_mut(move |lua, _: MultiValue| {
        let result = (|| {
            let (src, pat) = (s.as_bytes(), p.as_bytes());
            let mut ms = MatchState::new(&src, &pat, Meter::new(lua, &shared));
            let mut from = pos;
            while from <= src.len() {
                ms.reprep();
                if let Some(e) = ms.do_match(from, 0)? {
                    if Some(e) != last {
                        pos = e;
                        last = Some(e);
                        let mut out = Vec::with_capacity(ms.level.max(1));
                        ms.push_captures(lua, Some((from, e)), &mut out)?;
                        return Ok(MultiValue::from_vec(out));
                    }
                }
                from += 1;
            }
            Ok(MultiValue::new())
        })();
        finish(result, &marker, lua)
    })?;
    Ok(f)
}

/// The result of `gsub`, built in Rust and moved into Lua strings every [`FLUSH_AT`] bytes
/// (so the memory limit sees it).
struct Output {
    buf: Vec<u8>,
    chunks: Vec<LuaString>,
}

impl Output {
    fn extend(&mut self, lua: &Lua, meter: &mut Meter<'_>, bytes: &[u8]) -> MResult<()> {
        meter.add(bytes.len() >> 6)?;
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= FLUSH_AT {
            self.chunks.push(lua.create_string(&self.buf)?);
            self.buf.clear();
        }
        Ok(())
    }

    fn push(&mut self, lua: &Lua, byte: u8) -> MResult<()> {
        self.buf.push(byte);
        if self.buf.len() >= FLUSH_AT {
            self.chunks.push(lua.create_string(&self.buf)?);
            self.buf.clear();
        }
        Ok(())
    }

    fn finish(self, lua: &Lua) -> MResult<LuaString> {
        if self.chunks.is_empty() {
            return Ok(lua.create_string(&self.buf)?);
        }
        let total = self
            .chunks
            .iter()
            .map(|c| c.as_bytes().len())
            .sum::<usize>()
            + self.buf.len();
        let mut all = Vec::with_capacity(total);
        for chunk in &self.chunks {
            all.extend_from_slice(&chunk.as_bytes());
        }
        all.extend_from_slice(&self.buf);
        drop(self.chunks);
        Ok(lua.create_string(&all)?)
    }
}

/// What `gsub` replaces matches with.
enum Repl {
    /// A string (or number) with `%0`-`%9` and `%%`.
    Text(LuaString),
    /// A function or (when true) a table, reached through a Lua wrapper that returns
    /// `pcall`'s results. A table gets only the first capture.
    Call(Function, bool),
}

/// `str_gsub`. `args` are `(kind, s, pattern, repl, n)`: `kind` is 1 (a function) or 2 (a
/// table) when the Lua wrapper replaced `repl` by a caller returning `pcall`'s results, false
/// otherwise.
fn gsub(lua: &Lua, shared: &Shared, args: &[Value]) -> MResult<MultiValue> {
    let kind = match args.first() {
        Some(Value::Integer(1)) => Some(false),
        Some(Value::Integer(2)) => Some(true),
        _ => None,
    };
    let args = args.get(1..).unwrap_or(&[]);
    let s = check_string(lua, args, 1, "gsub")?;
    let p = check_string(lua, args, 2, "gsub")?;
    let (src, pat) = (s.as_bytes(), p.as_bytes());
    let max_s = opt_integer(lua, args, 4, src.len() as i64 + 1, "gsub")?;
    let repl = match args.get(2) {
        Some(Value::Function(f)) if kind.is_some() => Repl::Call(f.clone(), kind == Some(true)),
        Some(v @ (Value::String(_) | Value::Integer(_) | Value::Number(_))) => {
            match lua.coerce_string(v.clone())? {
                Some(s) => Repl::Text(s),
                None => return type_error(args, 3, "gsub", "string/function/table"),
            }
        }
        _ => return type_error(args, 3, "gsub", "string/function/table"),
    };
    let (pat, anchor) = match pat.split_first() {
        Some((b'^', rest)) => (rest, true),
        _ => (&pat[..], false),
    };
    let mut ms = MatchState::new(&src, pat, Meter::new(lua, shared));
    let mut out = Output {
        buf: Vec::new(),
        chunks: Vec::new(),
    };
    let mut at = 0usize;
    let mut last: Option<usize> = None;
    let mut n: i64 = 0;
    let mut changed = false;
    while n < max_s {
        ms.reprep();
        match ms.do_match(at, 0)? {
            Some(e) if Some(e) != last => {
                n += 1;
                changed |= add_value(lua, &mut ms, &mut out, at, e, &repl, shared)?;
                at = e;
                last = Some(e);
            }
            _ if at < src.len() => {
                out.push(lua, src[at])?;
                at += 1;
            }
            _ => break,
        }
        if anchor {
            break;
        }
    }
    let result = if changed {
        out.extend(lua, &mut ms.meter, &src[at..])?;
        Value::String(out.finish(lua)?)
    } else {
        // luaL_checklstring turned a number subject into a string in place.
        Value::String(s.into_owned())
    };
    Ok(MultiValue::from_vec(vec![result, Value::Integer(n)]))
}

/// `add_value` of `lstrlib.c`: appends the replacement of the match `s..e`; true when it
/// differs from the match.
fn add_value(
    lua: &Lua,
    ms: &mut MatchState<'_>,
    out: &mut Output,
    s: usize,
    e: usize,
    repl: &Repl,
    shared: &Shared,
) -> MResult<bool> {
    let src = ms.src;
    let func = match repl {
        Repl::Text(text) => {
            add_string(lua, ms, out, s, e, &text.as_bytes())?;
            return Ok(true);
        }
        Repl::Call(f, table) => (f, *table),
    };
    let (func, table) = func;
    let mut argv = Vec::with_capacity(ms.level.max(1));
    if table {
        argv.push(ms.capture_value(lua, 0, s, e)?);
    } else {
        ms.push_captures(lua, Some((s, e)), &mut argv)?;
    }
    let (ok, value): (bool, Value) = func.call(MultiValue::from_vec(argv))?;
    shared.budget.check()?;
    if !ok {
        return Err(Fail::Value(value));
    }
    match value {
        Value::Nil | Value::Boolean(false) => {
            out.extend(lua, &mut ms.meter, &src[s..e])?;
            Ok(false)
        }
        Value::String(text) => {
            out.extend(lua, &mut ms.meter, &text.as_bytes())?;
            Ok(true)
        }
        v @ (Value::Integer(_) | Value::Number(_)) => {
            if let Some(text) = lua.coerce_string(v)? {
                out.extend(lua, &mut ms.meter, &text.as_bytes())?;
            }
            Ok(true)
        }
        other => raise(format!(
            "invalid replacement value (a {})",
            type_name(&other)
        )),
    }
}

/// `add_s` of `lstrlib.c`: a replacement string with `%0`-`%9` and `%%`.
fn add_string(
    lua: &Lua,
    ms: &mut MatchState<'_>,
    out: &mut Output,
    s: usize,
    e: usize,
    mut text: &[u8],
) -> MResult<()> {
    let src = ms.src;
    while let Some(i) = text.iter().position(|&c| c == L_ESC) {
        out.extend(lua, &mut ms.meter, &text[..i])?;
        let c = text.get(i + 1).copied().unwrap_or(0);
        if c == L_ESC {
            out.push(lua, L_ESC)?;
        } else if c == b'0' {
            out.extend(lua, &mut ms.meter, &src[s..e])?;
        } else if c.is_ascii_digit() {
            match ms.get_capture(usize::from(c - b'1'), s, e)? {
                Cap::Str(a, b) => out.extend(lua, &mut ms.meter, &src[a..b])?,
                Cap::Pos(n) => out.extend(lua, &mut ms.meter, n.to_string().as_bytes())?,
            }
        } else {
            return raise("invalid use of '%' in replacement string");
        }
        text = &text[i + 2..];
    }
    out.extend(lua, &mut ms.meter, text)
}

/// Lua side: raises the errors the Rust functions return (as strings, like the C functions),
/// and wraps a function or table replacement of `gsub` in `pcall` so that its own error value
/// passes through unchanged.
const WRAPPERS: &str = r#"
local E, find, match, gmatch, gsub, pcall, string, LIMIT = ...
local error, type, select = error, type, select
local mtype = math and math.type
local cfind, cmatch, cgmatch, cgsub = string.find, string.match, string.gmatch, string.gsub
local ssub = string.sub

-- Called in tail position, so level 2 is the caller of string.find & co.: "chunk:line:" is
-- prepended when that is a Lua function, as luaL_error does for C functions; an error value
-- of a replacement function (third value true) passes through untouched.
local function r(a, ...)
	if a == E then
		local e, passthrough = ...
		error(e, passthrough and 0 or 2)
	end
	return a, ...
end

-- Fast path: Lua's own C function, when the work it can do is provably small. A match
-- tries at most #s + 1 starts; each repetition, %b or back-reference (q of them, counted
-- generously) multiplies the paths by at most #s + 1; a path costs at most
-- (#p + 1) * (#s + 2) * (q + 1) byte steps. Anything over LIMIT, anything that is not a
-- string, and any init or count that is not an integer goes to the metered Rust matcher.
local qcache, qcount = {}, 0
local function cheap(s, p, i, plain)
	if type(s) ~= "string" or type(p) ~= "string" or (i ~= nil and (not mtype or mtype(i) ~= "integer")) then
		return false
	end
	local n = #s + 1
	if plain then
		return n * (#p + 1) <= LIMIT
	end
	local q = qcache[p]
	if q == nil then
		if #p > 256 then
			return false
		end
		q = select(2, cgsub(p, "[%*%+%-%?]", "")) + select(2, cgsub(p, "%%[b1-9]", ""))
		if qcount >= 256 then
			qcache, qcount = {}, 0
		end
		qcache[p], qcount = q, qcount + 1
	end
	return n ^ (q + 1) * (#p + 1) * (n + 1) * (q + 1) <= LIMIT
end

-- The C functions run under pcall so that their own errors can be raised again with the
-- position of the caller (as a direct call gives) rather than of this chunk; any other error
-- (from a gsub replacement function, a limit) passes through unchanged.
local PREFIX = "[luafcgid-pattern]:"
local function fast(ok, ...)
	if ok then
		return ...
	end
	local e = ...
	if type(e) == "string" and ssub(e, 1, #PREFIX) == PREFIX then
		error((cgsub(e, "^[^:]*:%d+: ", "")), 2)
	end
	error(e, 0)
end

string.find = function(...)
	local s, p, i, plain = ...
	if cheap(s, p, i, plain) then
		return fast(pcall(cfind, ...))
	end
	return r(find(...))
end
string.match = function(...)
	local s, p, i = ...
	if cheap(s, p, i) then
		return fast(pcall(cmatch, ...))
	end
	return r(match(...))
end
string.gmatch = function(...)
	local s, p, i = ...
	if cheap(s, p, i) then
		return cgmatch(...)
	end
	local it, e = gmatch(...)
	if it == E then
		error(e, 2)
	end
	return function()
		return r(it())
	end
end
local function index(t, k)
	return t[k]
end
local repls = {string = true, number = true, ["function"] = true, table = true}
string.gsub = function(s, p, repl, ...)
	local t = type(repl)
	if repls[t] and cheap(s, p, (...)) then
		return fast(pcall(cgsub, s, p, repl, ...))
	end
	if t == "function" then
		return r(gsub(1, s, p, function(...)
			return pcall(repl, ...)
		end, ...))
	elseif t == "table" then
		return r(gsub(2, s, p, function(k)
			return pcall(index, repl, k)
		end, ...))
	end
	return r(gsub(false, s, p, repl, ...))
end
"#;

/// Replaces `find`, `match`, `gmatch` and `gsub` of the state's `string` table (if it has
/// one) with the metered ones, charging `budget`. Call it before the bootstrap wraps `pcall`:
/// the wrappers use Lua's own `pcall` (a stop inside a replacement function is re-raised by
/// the Rust side's budget check, or passed through by the fast path).
pub(crate) fn install(lua: &Lua, budget: &Arc<Budget>) -> mlua::Result<()> {
    let Value::Table(string_table) = lua.globals().raw_get::<Value>("string")? else {
        return Ok(());
    };
    let shared = Arc::new(Shared {
        budget: Arc::clone(budget),
        left: AtomicU32::new(CHECK_EVERY),
    });
    let marker = lua.create_table()?;
    let find = {
        let (shared, marker) = (Arc::clone(&shared), marker.clone());
        lua.create_function(move |lua, mut args: MultiValue| {
            finish(
                find_aux(lua, &shared, args.make_contiguous(), true),
                &marker,
                lua,
            )
        })?
    };
    let match_ = {
        let (shared, marker) = (Arc::clone(&shared), marker.clone());
        lua.create_function(move |lua, mut args: MultiValue| {
            finish(
                find_aux(lua, &shared, args.make_contiguous(), false),
                &marker,
                lua,
            )
        })?
    };
    let gmatch_ = {
        let (shared, marker) = (Arc::clone(&shared), marker.clone());
        lua.create_function(move |lua, mut args: MultiValue| {
            let result = gmatch(lua, &shared, &marker, args.make_contiguous())
                .map(|f| MultiValue::from_vec(vec![Value::Function(f)]));
            finish(result, &marker, lua)
        })?
    };
    let gsub_ = {
        let (shared, marker) = (Arc::clone(&shared), marker.clone());
        lua.create_function(move |lua, mut args: MultiValue| {
            finish(gsub(lua, &shared, args.make_contiguous()), &marker, lua)
        })?
    };
    let pcall: Value = lua.globals().raw_get("pcall")?;
    // Tests set LUAFCGID_PATTERN_RUST_ONLY to send every call to the Rust matcher.
    let limit = if std::env::var_os("LUAFCGID_PATTERN_RUST_ONLY").is_some() {
        -1.0
    } else {
        FAST_PATH_LIMIT
    };
    lua.load(WRAPPERS)
        .set_name("=[luafcgid-pattern]")
        .set_mode(mlua::chunk::ChunkMode::Text)
        .call::<()>((
            marker,
            find,
            match_,
            gmatch_,
            gsub_,
            pcall,
            string_table.clone(),
            limit,
        ))
}
