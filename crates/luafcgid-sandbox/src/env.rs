//! The restricted environment of a new state: which libraries are opened, which functions are
//! removed, and the limit-aware replacements of `pcall`, `xpcall`, `load`, the coroutine
//! functions, `print` and `collectgarbage` (written in Lua, in `bootstrap.lua`, so that
//! yields through them keep working).
//!
//! The environment is built from a list of library names ([`DEFAULT_LIBS`]), so that a
//! policy-driven allow-list can later narrow it; the base functions kept are a fixed
//! allow-list ([`BASE_GLOBALS`]) and every other global is removed, whatever the Lua build
//! adds. It does not decide limits (see `limits`) nor build the request object.

use std::sync::Arc;

use mlua::{Lua, LuaOptions, StdLib, Table, Value, Variadic};

use crate::limits::{is_memory_error_value, Budget, Stop};
use crate::request::with_ctx;
use crate::LimitKind;

/// The libraries a state gets: the DESIGN's default `libs`. `os.NAME` entries open the `os`
/// table holding only those functions.
pub(crate) const DEFAULT_LIBS: &[&str] = &[
    "string",
    "table",
    "math",
    "utf8",
    "coroutine",
    "os.time",
    "os.clock",
    "os.date",
    "os.difftime",
];

/// Base-library globals (and our additions) every state keeps.
pub(crate) const BASE_GLOBALS: &[&str] = &[
    "_G",
    "_VERSION",
    "assert",
    "collectgarbage",
    "error",
    "getmetatable",
    "ipairs",
    "load",
    "loadstring",
    "next",
    "pairs",
    "pcall",
    "print",
    "rawequal",
    "rawget",
    "rawlen",
    "rawset",
    "require",
    "select",
    "setmetatable",
    "tonumber",
    "tostring",
    "type",
    "unpack",
    "warn",
    "xpcall",
];

const BOOTSTRAP: &str = include_str!("bootstrap.lua");

fn std_lib(name: &str) -> Option<StdLib> {
    Some(match name {
        "string" => StdLib::STRING,
        "table" => StdLib::TABLE,
        "math" => StdLib::MATH,
        "utf8" => StdLib::UTF8,
        "coroutine" => StdLib::COROUTINE,
        n if n.starts_with("os.") => StdLib::OS,
        _ => return None,
    })
}

/// Creates a state with the libraries in `libs` and the restricted base library. `require`
/// is not set here (see `modules`).
pub(crate) fn new_state(libs: &[&str], budget: &Arc<Budget>) -> mlua::Result<Lua> {
    let flags = libs
        .iter()
        .filter_map(|name| std_lib(name))
        .fold(StdLib::NONE, |acc, lib| acc | lib);
    let lua = Lua::new_with(flags, LuaOptions::default())?;

    let check = {
        let budget = Arc::clone(budget);
        lua.create_function(move |_, (ok, err): (Value, Value)| {
            budget.check()?;
            let failed = matches!(ok, Value::Nil | Value::Boolean(false));
            if failed && is_memory_error_value(&err) {
                return Err(budget.trip(Stop::Limit(LimitKind::Memory)));
            }
            Ok(())
        })?
    };
    let emit = lua.create_function(|lua, parts: Variadic<mlua::LuaString>| {
        with_ctx(lua, |ctx| {
            ctx.budget.check()?;
            if !ctx.active {
                return Ok(());
            }
            let len = parts.iter().map(|s| s.as_bytes().len() + 1).sum::<usize>();
            ctx.reserve_output(len.max(1))?;
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    ctx.response.body.push(b'\t');
                }
                ctx.response.body.extend_from_slice(&part.as_bytes());
            }
            ctx.response.body.push(b'\n');
            Ok(())
        })
    })?;
    let step = {
        let budget = Arc::clone(budget);
        lua.create_function(move |_, ()| budget.step())?
    };
    crate::pattern::install(&lua, budget)?;
    lua.load(BOOTSTRAP)
        .set_name("=[luafcgid]")
        .set_mode(mlua::chunk::ChunkMode::Text)
        .call::<()>((check, emit, lua.globals(), step))?;

    let globals = lua.globals();
    if let Ok(os) = globals.raw_get::<Table>("os") {
        let mut remove = Vec::new();
        os.for_each::<Value, Value>(|k, _| {
            let keep = match &k {
                Value::String(s) => libs
                    .iter()
                    .any(|lib| lib.strip_prefix("os.").is_some_and(|f| s == f)),
                _ => false,
            };
            if !keep {
                remove.push(k);
            }
            Ok(())
        })?;
        for k in remove {
            os.raw_set(k, Value::Nil)?;
        }
    }
    let mut remove = Vec::new();
    globals.for_each::<Value, Value>(|k, _| {
        let keep = match &k {
            Value::String(s) => {
                let s = s.as_bytes();
                let s = &*s;
                BASE_GLOBALS.iter().any(|g| g.as_bytes() == s)
                    || libs
                        .iter()
                        .any(|lib| lib.split('.').next().is_some_and(|l| l.as_bytes() == s))
            }
            _ => false,
        };
        if !keep {
            remove.push(k);
        }
        Ok(())
    })?;
    for k in remove {
        globals.raw_set(k, Value::Nil)?;
    }
    Ok(lua)
}
