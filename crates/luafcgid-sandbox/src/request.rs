//! The request object (`r`, also `con`) and the response it builds.
//!
//! The object is a userdata created with `Lua::scope` for each request, so it dies when the
//! request ends: a script that keeps it in a global gets an error when it uses it later.
//! It carries no data itself; what it writes goes to [`Ctx`], the state's app data, which
//! `print` also writes to, and what it reads comes from a request-scoped input function (see
//! [`input`]) that borrows the [`RequestInput`] for the duration of the request. Neither
//! copies the params or the body unless the script asks for them.
//!
//! It does not render the response (the binary adds the default status, the global headers,
//! `X-Request-Id` and `Content-Length`) and does not interpret params.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, TryLockError};
use std::time::Duration;

use mlua::{
    Error, FromLuaMulti, Function, IntoLuaMulti, LightUserData, Lua, Table, Value, Variadic,
};

use crate::limits::{Budget, Stop};
use crate::{
    LimitKind, RequestInput, Response, MAX_LOG_MESSAGES, MAX_LOG_MESSAGE_BYTES, MAX_PAUSE,
};

/// `input(OP_ABORT)`: whether the abort flag is set.
pub(crate) const OP_ABORT: u8 = 0;
/// `input(OP_BODY)`: the body as a string, nil when empty.
const OP_BODY: u8 = 1;
/// `input(OP_CONFIG, name)`: a `[vars]` value, nil when absent.
const OP_CONFIG: u8 = 2;
/// `input(OP_ENV)`: a new table of every param plus `LUAFCGID_VERSION`.
pub(crate) const OP_ENV: u8 = 3;
/// `input(OP_PAUSE_ABORT)`: as `OP_ABORT`, after the pause the client probe asks of a long
/// run ([`crate::ClientProbe::pause`]).
pub(crate) const OP_PAUSE_ABORT: u8 = 4;

/// Longest header name accepted.
const MAX_HEADER_NAME: usize = 256;

/// Per-state context of the current run, stored as the state's app data.
pub(crate) struct Ctx {
    pub(crate) budget: Arc<Budget>,
    /// A request is running: `print` and the request object write to `response`. False
    /// during the init run, whose output is discarded.
    pub(crate) active: bool,
    pub(crate) response: Response,
    /// Messages of `r:log` in this run (see [`crate::Report::logs`]).
    pub(crate) logs: Vec<String>,
    /// Messages of `r:log` beyond [`MAX_LOG_MESSAGES`] in this run.
    pub(crate) logs_dropped: usize,
    /// Bytes of `response.headers` as `name: value\r\n` lines.
    header_bytes: usize,
    /// Output limit of the current run; 0 = none.
    pub(crate) output_limit: usize,
    /// The running request (see [`input`]); `None` between requests and in the init run.
    pub(crate) request: Option<RequestInput>,
    /// The number of the running request in this state (0: none), which its request
    /// object carries: one a script kept answers only to its own request.
    pub(crate) run: u64,
    /// `r.env` once built.
    pub(crate) env: Option<Table>,
    /// Module files loaded since the owner last collected them.
    pub(crate) new_files: Vec<PathBuf>,
}

impl Ctx {
    pub(crate) fn new(budget: Arc<Budget>) -> Ctx {
        Ctx {
            budget,
            active: false,
            response: Response::default(),
            logs: Vec::new(),
            logs_dropped: 0,
            header_bytes: 0,
            output_limit: 0,
            request: None,
            run: 0,
            env: None,
            new_files: Vec::new(),
        }
    }

    /// Starts a run: an empty response, the run's output limit.
    pub(crate) fn begin(&mut self, output_limit: usize, active: bool) {
        self.active = active;
        self.output_limit = output_limit;
        self.header_bytes = 0;
        self.response.status = None;
        self.response.content_type = None;
        self.response.headers.clear();
        self.response.body.clear();
        self.logs.clear();
        self.logs_dropped = 0;
    }

    /// Ends a run, handing out its response and dropping request-scoped values.
    pub(crate) fn finish(&mut self) -> Response {
        self.active = false;
        self.request = None;
        self.run = 0;
        self.env = None;
        std::mem::take(&mut self.response)
    }

    fn output_used(&self) -> usize {
        let content_type = self
            .response
            .content_type
            .as_ref()
            .map_or(0, |t| "Content-Type: \r\n".len() + t.len());
        self.header_bytes + content_type + self.response.body.len()
    }

    /// Output bytes the run may still produce (`usize::MAX` without a limit).
    pub(crate) fn remaining_output(&self) -> usize {
        match self.output_limit {
            0 => usize::MAX,
            limit => limit.saturating_sub(self.output_used()),
        }
    }

    /// Checks that `n` more output bytes fit; if not, stops the run with the output limit.
    pub(crate) fn reserve_output(&self, n: usize) -> mlua::Result<()> {
        if n > self.remaining_output() {
            return Err(self.budget.trip(Stop::Limit(LimitKind::Output)));
        }
        Ok(())
    }

    /// Appends to the body, within the output limit.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> mlua::Result<()> {
        self.reserve_output(bytes.len())?;
        self.response.body.extend_from_slice(bytes);
        Ok(())
    }

    fn add_header(&mut self, name: &[u8], value: &[u8]) -> mlua::Result<()> {
        let name = header_name(name)?;
        let value = header_value(value)?;
        if name.eq_ignore_ascii_case("Status") {
            self.response.status = Some(parse_status_value(value)?);
        } else if name.eq_ignore_ascii_case("Content-Type") {
            self.set_content_type(value)?;
        } else if name.eq_ignore_ascii_case("Content-Length")
            || name.eq_ignore_ascii_case("Transfer-Encoding")
        {
            return Err(Error::runtime(format!(
                "r:header: {name} is set by the server"
            )));
        } else {
            let line = name.len() + value.len() + ": \r\n".len();
            self.reserve_output(line)?;
            self.header_bytes += line;
            self.response
                .headers
                .push((name.to_owned(), value.to_owned()));
        }
        Ok(())
    }

    fn set_content_type(&mut self, value: &str) -> mlua::Result<()> {
        let old = self.response.content_type.as_ref().map_or(0, |t| t.len());
        let grow = ("Content-Type: \r\n".len() + value.len()).saturating_sub(old);
        self.reserve_output(grow)?;
        self.response.content_type = Some(value.to_owned());
        Ok(())
    }

    fn log(&mut self, message: &[u8]) {
        if self.logs.len() >= MAX_LOG_MESSAGES {
            self.logs_dropped += 1;
            return;
        }
        let cut = &message[..message.len().min(MAX_LOG_MESSAGE_BYTES)];
        let mut text = String::from_utf8_lossy(cut).into_owned();
        if text.len() > MAX_LOG_MESSAGE_BYTES {
            let mut end = MAX_LOG_MESSAGE_BYTES;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        self.logs.push(text);
    }
}

/// A state's [`Ctx`], held by its [`crate::ScriptState`] (which reaches it directly, without
/// the app-data lookup) and in its app data (where its callbacks find it).
pub(crate) type SharedCtx = Arc<Mutex<Ctx>>;

/// Runs `f` with the [`Ctx`] in `cell`. It is only ever used by the thread running the
/// state, so the lock is never contended; a lock already held (a callback reaching it while
/// it is in use) is an error, as a second mutable borrow would be.
pub(crate) fn lock_ctx<R>(
    cell: &Mutex<Ctx>,
    f: impl FnOnce(&mut Ctx) -> mlua::Result<R>,
) -> mlua::Result<R> {
    let mut ctx = match cell.try_lock() {
        Ok(ctx) => ctx,
        // A panic in a callback while it held the context: what it holds is still whole.
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => {
            return Err(Error::runtime("internal error: request context busy"))
        }
    };
    f(&mut ctx)
}

/// Runs `f` with the state's [`Ctx`], found in its app data (for callbacks, which have only
/// the state).
pub(crate) fn with_ctx<R>(
    lua: &Lua,
    f: impl FnOnce(&mut Ctx) -> mlua::Result<R>,
) -> mlua::Result<R> {
    let cell = lua
        .try_app_data_ref::<SharedCtx>()
        .map_err(|_| Error::runtime("internal error: request context busy"))?
        .ok_or_else(|| Error::runtime("internal error: no request context"))?;
    lock_ctx(&cell, f)
}

/// Reads the running request `req`: `op` is one of the `OP_*` constants.
pub(crate) fn input(
    lua: &Lua,
    req: &RequestInput,
    op: u8,
    name: Option<mlua::LuaString>,
) -> mlua::Result<Value> {
    match op {
        OP_ABORT | OP_PAUSE_ABORT => {
            if op == OP_PAUSE_ABORT {
                let pause = req.client.as_ref().map_or(Duration::ZERO, |c| c.pause());
                if !pause.is_zero() {
                    std::thread::sleep(pause.min(MAX_PAUSE));
                }
            }
            let gone = req.abort.load(Relaxed) || req.client.as_ref().is_some_and(|c| c.gone());
            if gone {
                req.abort.store(true, Relaxed);
            }
            Ok(Value::Boolean(gone))
        }
        OP_BODY if req.data.body().is_empty() => Ok(Value::Nil),
        OP_BODY => Ok(Value::String(lua.create_string(req.data.body())?)),
        OP_CONFIG => {
            let Some(name) = name else {
                return Ok(Value::Nil);
            };
            match req.data.var(&name.as_bytes()) {
                Some(v) => Ok(Value::String(lua.create_string(v)?)),
                None => Ok(Value::Nil),
            }
        }
        OP_ENV => {
            let env = lua.create_table_with_capacity(0, req.data.param_count() + 1)?;
            for (k, v) in req.data.params() {
                env.raw_set(lua.create_string(k)?, lua.create_string(v)?)?;
            }
            env.raw_set("LUAFCGID_VERSION", 1)?;
            Ok(Value::Table(env))
        }
        _ => Err(Error::runtime("internal error: unknown input operation")),
    }
}

/// The request object as scripts see it: a light userdata whose value is the number of the
/// run it was made for ([`Ctx::run`]). Its methods act on the state's [`Ctx`], and only
/// while that run lasts: one a script keeps is dead afterwards. Being a plain value, it costs
/// nothing to make and nothing to collect (a full userdata per request cost a ninth of a
/// hello-world request, half of it in the collector's finaliser); light userdata share one
/// metatable per state, set by [`install_request_object`], and scripts meet no other light
/// userdata (no library they can load makes any).
pub(crate) fn request_object(run: u64) -> LightUserData {
    LightUserData(std::ptr::without_provenance_mut(run as usize))
}

/// A value's type as Lua's `type` names it (the request object is a light userdata, which
/// mlua names apart).
pub(crate) fn type_name(value: &Value) -> &'static str {
    match value {
        Value::LightUserData(_) => "userdata",
        other => other.type_name(),
    }
}

impl Ctx {
    /// Fails unless `object` belongs to the running request, or the run is over a limit.
    fn check(&self, object: LightUserData) -> mlua::Result<()> {
        let run = object.0 as usize as u64;
        if run == 0 || run != self.run {
            return Err(Error::runtime(
                "the request object was used after its request ended",
            ));
        }
        self.budget.check()
    }
}

/// Fails unless `object` belongs to the running request (see [`Ctx::check`]).
fn alive(lua: &Lua, object: LightUserData) -> mlua::Result<()> {
    with_ctx(lua, |ctx| ctx.check(object))
}

/// Reads the running request ([`input`]); an error between requests.
fn read_input(lua: &Lua, op: u8, name: Option<mlua::LuaString>) -> mlua::Result<Value> {
    let request = with_ctx(lua, |ctx| {
        ctx.budget.check()?;
        ctx.request
            .clone()
            .ok_or_else(|| Error::runtime("the request has ended"))
    })?;
    input(lua, &request, op, name)
}

/// `r.env` (and the `env` of `main(env, con)`): built on first use, then kept for the request.
pub(crate) fn request_env(lua: &Lua) -> mlua::Result<Table> {
    if let Some(env) = with_ctx(lua, |ctx| Ok(ctx.env.clone()))? {
        return Ok(env);
    }
    let env = match read_input(lua, OP_ENV, None)? {
        Value::Table(env) => env,
        _ => return Err(Error::runtime("internal error: env is not a table")),
    };
    with_ctx(lua, |ctx| {
        ctx.env = Some(env.clone());
        Ok(())
    })?;
    Ok(env)
}

/// The bytes of a string or number argument (numbers formatted as Lua's `tostring` does);
/// anything else is an error naming `what`.
pub(crate) fn text_arg(lua: &Lua, value: &Value, what: &str) -> mlua::Result<Vec<u8>> {
    match value {
        Value::String(s) => Ok(s.as_bytes().to_vec()),
        Value::Integer(_) | Value::Number(_) => match lua.coerce_string(value.clone())? {
            Some(s) => Ok(s.as_bytes().to_vec()),
            None => Err(Error::runtime(format!("{what}: cannot format a number"))),
        },
        other => Err(Error::runtime(format!(
            "{what}: expected a string or a number, got {}",
            type_name(other)
        ))),
    }
}

/// Appends a string or number value to the body.
pub(crate) fn append_value(lua: &Lua, value: &Value, what: &str) -> mlua::Result<()> {
    if let Value::String(s) = value {
        return with_ctx(lua, |ctx| ctx.append(&s.as_bytes()));
    }
    let bytes = text_arg(lua, value, what)?;
    with_ctx(lua, |ctx| ctx.append(&bytes))
}

fn header_name(name: &[u8]) -> mlua::Result<&str> {
    let is_tchar = |c: &u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || name.len() > MAX_HEADER_NAME || !name.iter().all(is_tchar) {
        return Err(Error::runtime(format!(
            "r:header: invalid header name {:?}",
            String::from_utf8_lossy(&name[..name.len().min(64)])
        )));
    }
    // All bytes are ASCII.
    std::str::from_utf8(name).map_err(Error::external)
}

fn header_value(value: &[u8]) -> mlua::Result<&str> {
    if value.iter().any(|c| matches!(c, b'\r' | b'\n' | 0)) {
        return Err(Error::runtime("r:header: CR, LF or NUL in a header value"));
    }
    std::str::from_utf8(value)
        .map_err(|_| Error::runtime("r:header: header value is not valid UTF-8"))
}

/// The code of a `Status` header value: its leading three digits, 100 to 599.
fn parse_status_value(value: &str) -> mlua::Result<u16> {
    let value = value.trim_start();
    let digits = value
        .as_bytes()
        .get(..3)
        .filter(|d| d.iter().all(u8::is_ascii_digit));
    let followed_ok = value.as_bytes().get(3).is_none_or(|c| !c.is_ascii_digit());
    match digits {
        Some(d) if followed_ok => {
            let code = d.iter().fold(0u16, |acc, c| acc * 10 + u16::from(c - b'0'));
            check_status(code.into())
        }
        _ => Err(Error::runtime(format!(
            "r:header: Status must start with a 3-digit code, got {value:?}"
        ))),
    }
}

fn check_status(code: i64) -> mlua::Result<u16> {
    if (100..=599).contains(&code) {
        Ok(code as u16)
    } else {
        Err(Error::runtime(format!(
            "status code must be from 100 to 599, got {code}"
        )))
    }
}

fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|c| !matches!(c, b' ' | b'\t'))
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|c| !matches!(c, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &s[start..end.max(start)]
}

/// Adds the method `name` to `methods`: `f` gets the object the method was called on (an
/// error when it is not a request object, as in `r.puts("x")`) and the other arguments.
fn method<A, R>(
    lua: &Lua,
    methods: &Table,
    name: &str,
    f: impl Fn(&Lua, LightUserData, A) -> mlua::Result<R> + Send + 'static,
) -> mlua::Result<()>
where
    A: FromLuaMulti,
    R: IntoLuaMulti,
{
    let function =
        lua.create_function(move |lua, (this, args): (LightUserData, A)| f(lua, this, args))?;
    methods.raw_set(name, function)
}

/// What `r.name` finds: a method, or for `env` the request's variables; nil otherwise.
const REQUEST_INDEX: &str = r#"
local methods, env = ...
return function(r, key)
    local m = methods[key]
    if m ~= nil then
        return m
    end
    if key == "env" then
        return env(r)
    end
end
"#;

/// Makes light userdata request objects in `lua` ([`request_object`]): their methods, `env`
/// and a metatable scripts can neither read nor change.
pub(crate) fn install_request_object(lua: &Lua) -> mlua::Result<()> {
    let methods = lua.create_table()?;
    {
        let methods = &methods;
        // `puts` takes several arguments too, as scripts for the original often pass them.
        method(
            lua,
            methods,
            "puts",
            |lua, this, values: Variadic<Value>| {
                alive(lua, this)?;
                for value in values.iter() {
                    append_value(lua, value, "r:puts")?;
                }
                Ok(())
            },
        )?;
        method(
            lua,
            methods,
            "write",
            |lua, this, values: Variadic<Value>| {
                alive(lua, this)?;
                for value in values.iter() {
                    append_value(lua, value, "r:write")?;
                }
                Ok(())
            },
        )?;
        method(
            lua,
            methods,
            "header",
            |lua, this, (name, value): (Value, Value)| {
                let name = text_arg(lua, &name, "r:header")?;
                with_ctx(lua, |ctx| {
                    ctx.check(this)?;
                    if value.is_nil() {
                        let line = &*name;
                        let Some(colon) = line.iter().position(|&c| c == b':') else {
                            return Err(Error::runtime(
                                "r:header: expected \"Name: value\" or (name, value)",
                            ));
                        };
                        ctx.add_header(&line[..colon], trim_ows(&line[colon + 1..]))
                    } else {
                        let value = text_arg(lua, &value, "r:header")?;
                        ctx.add_header(&name, &value)
                    }
                })
            },
        )?;
        method(lua, methods, "status", |lua, this, code: Value| {
            let code = match code {
                Value::Integer(i) => i,
                Value::Number(n) if n.fract() == 0.0 && n.abs() < 1e6 => n as i64,
                other => {
                    return Err(Error::runtime(format!(
                        "r:status: expected an integer, got {}",
                        type_name(&other)
                    )))
                }
            };
            let code = check_status(code)?;
            with_ctx(lua, |ctx| {
                ctx.check(this)?;
                ctx.response.status = Some(code);
                Ok(())
            })
        })?;
        method(lua, methods, "content_type", |lua, this, value: Value| {
            let value = text_arg(lua, &value, "r:content_type")?;
            with_ctx(lua, |ctx| {
                ctx.check(this)?;
                let value = header_value(&value)?;
                ctx.set_content_type(value)
            })
        })?;
        method(lua, methods, "gets", |lua, this, ()| {
            alive(lua, this)?;
            read_input(lua, OP_BODY, None)
        })?;
        method(lua, methods, "body", |lua, this, ()| {
            alive(lua, this)?;
            read_input(lua, OP_BODY, None)
        })?;
        method(lua, methods, "reset", |lua, this, ()| {
            with_ctx(lua, |ctx| {
                ctx.check(this)?;
                ctx.response.body.clear();
                Ok(())
            })
        })?;
        method(lua, methods, "flush", |lua, this, ()| alive(lua, this))?;
        method(lua, methods, "log", |lua, this, message: Value| {
            let message = text_arg(lua, &message, "r:log")?;
            with_ctx(lua, |ctx| {
                ctx.check(this)?;
                ctx.log(&message);
                Ok(())
            })
        })?;
        method(
            lua,
            methods,
            "config",
            |lua, this, name: Value| match name {
                Value::String(name) => {
                    alive(lua, this)?;
                    read_input(lua, OP_CONFIG, Some(name))
                }
                other => Err(Error::runtime(format!(
                    "r:config: expected a string, got {}",
                    type_name(&other)
                ))),
            },
        )?;
    }
    let env = lua.create_function(|lua, this: LightUserData| {
        alive(lua, this)?;
        request_env(lua)
    })?;
    let index: Function = lua
        .load(REQUEST_INDEX)
        .set_name("=[luafcgid request]")
        .set_mode(mlua::chunk::ChunkMode::Text)
        .call((methods, env))?;
    let metatable = lua.create_table()?;
    metatable.raw_set("__index", index)?;
    metatable.raw_set("__name", "request")?;
    metatable.raw_set("__metatable", false)?;
    lua.set_type_metatable::<LightUserData>(Some(metatable));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_values() {
        assert_eq!(parse_status_value("404 Not Found").unwrap(), 404);
        assert_eq!(parse_status_value("201").unwrap(), 201);
        assert!(parse_status_value("2010").is_err());
        assert!(parse_status_value("99 x").is_err());
        assert!(parse_status_value("600").is_err());
        assert!(parse_status_value("OK").is_err());
    }

    #[test]
    fn header_names_and_values() {
        assert!(header_name(b"X-Foo").is_ok());
        assert!(header_name(b"X Foo").is_err());
        assert!(header_name(b"").is_err());
        assert!(header_name(b"X:Foo").is_err());
        assert!(header_value(b"a\r\nb").is_err());
        assert!(header_value(b"a\0b").is_err());
        assert!(header_value(b"text/html; charset=utf-8").is_ok());
        assert_eq!(trim_ows(b"  a b \t"), b"a b");
        assert_eq!(trim_ows(b"   "), b"");
    }

    #[test]
    fn log_messages_are_capped() {
        let mut ctx = Ctx::new(Arc::new(Budget::new()));
        for _ in 0..MAX_LOG_MESSAGES + 5 {
            ctx.log(&[b'x'; MAX_LOG_MESSAGE_BYTES + 10]);
        }
        assert_eq!(ctx.logs.len(), MAX_LOG_MESSAGES);
        assert_eq!(ctx.logs_dropped, 5);
        assert!(ctx.logs.iter().all(|m| m.len() == MAX_LOG_MESSAGE_BYTES));
        let mut ctx = Ctx::new(Arc::new(Budget::new()));
        // A 2-byte character cut in half becomes a replacement character, still within bounds.
        let mut msg = vec![b'a'; MAX_LOG_MESSAGE_BYTES - 1];
        msg.extend_from_slice("é".as_bytes());
        ctx.log(&msg);
        assert!(ctx.logs[0].len() <= MAX_LOG_MESSAGE_BYTES);
    }
}
