//! The restricted environment of a new state: which libraries are opened, which functions are
//! removed, and the limit-aware replacements of `pcall`, `xpcall`, `load`, the coroutine
//! functions, `print` and `collectgarbage` (written in Lua, in `bootstrap.lua`, so that
//! yields through them keep working).
//!
//! The environment is built from the policy's allow-list of libraries and functions
//! ([`DEFAULT_LIBS`] by default): a name is a whole library (`"string"`) or one function of
//! it (`"string.format"`, `"os.date"`); libraries outside [`LIB_TABLES`] and `os` functions
//! outside [`OS_FUNCTIONS`] are never opened, whatever the list says. The base functions
//! kept are a fixed allow-list ([`BASE_GLOBALS`]) and every other global is removed, whatever
//! the Lua build adds. It does not decide limits (see `limits`) nor build the request
//! object.

use std::sync::Arc;

use mlua::{Lua, LuaOptions, StdLib, Table, Value, Variadic};

use crate::limits::{is_memory_error_value, Budget, Stop};
use crate::request::with_ctx;
use crate::LimitKind;

/// The libraries a state gets unless its policy says otherwise: the DESIGN's default `libs`.
/// `os.NAME` entries open the `os` table holding only those functions.
pub const DEFAULT_LIBS: &[&str] = &[
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

/// [`DEFAULT_LIBS`] as an owned allow-list, for [`crate::StateOptions::libs`].
pub fn default_libs() -> Vec<String> {
    DEFAULT_LIBS.iter().map(|s| s.to_string()).collect()
}

/// The library tables a policy may allow, whole or function by function.
pub const LIB_TABLES: &[&str] = &["string", "table", "math", "utf8", "coroutine", "os"];

/// The only `os` functions a state may have (`"os"` in an allow-list means these).
pub const OS_FUNCTIONS: &[&str] = &["time", "clock", "date", "difftime"];

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
        "os" => StdLib::OS,
        _ => return None,
    })
}

/// Creates a state with the libraries in `libs` and the restricted base library. `require`
/// is not set here (see `modules`).
pub(crate) fn new_state<S: AsRef<str>>(libs: &[S], budget: &Arc<Budget>) -> mlua::Result<Lua> {
    let libs: Vec<&str> = libs.iter().map(AsRef::as_ref).collect();
    let flags = libs
        .iter()
        .filter_map(|name| std_lib(name.split('.').next().unwrap_or_default()))
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
    let rep = {
        let budget = Arc::clone(budget);
        lua.create_function(
            move |lua, (s, n, sep): (mlua::LuaString, i64, mlua::LuaString)| {
                long_rep(lua, &budget, &s.as_bytes(), n, &sep.as_bytes())
            },
        )?
    };
    crate::pattern::install(&lua, budget)?;
    lua.load(BOOTSTRAP)
        .set_name("=[luafcgid]")
        .set_mode(mlua::chunk::ChunkMode::Text)
        .call::<()>((check, emit, lua.globals(), step, rep))?;

    let globals = lua.globals();
    for lib in LIB_TABLES {
        if let Ok(table) = globals.raw_get::<Table>(*lib) {
            narrow(&table, lib, &libs)?;
            if table.is_empty() {
                globals.raw_set(*lib, Value::Nil)?;
            }
        }
    }
    // Lua 5.1's name goes with the function it stands for.
    let unpack_kept = globals
        .raw_get::<Table>("table")
        .and_then(|t| t.raw_get::<Value>("unpack"))
        .is_ok_and(|v| !v.is_nil());
    if !unpack_kept {
        globals.raw_set("unpack", Value::Nil)?;
    }
    let mut remove = Vec::new();
    globals.for_each::<Value, Value>(|k, _| {
        let keep = match &k {
            Value::String(s) => {
                let s = s.as_bytes();
                let s = &*s;
                BASE_GLOBALS.iter().any(|g| g.as_bytes() == s)
                    || libs.iter().any(|lib| {
                        let table = lib.split('.').next().unwrap_or_default();
                        table.as_bytes() == s && LIB_TABLES.contains(&table)
                    })
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

/// Removes from the library table `table` (named `lib`) every function the allow-list does
/// not name: all of it is kept when `lib` itself is listed, except that `os` never keeps more
/// than [`OS_FUNCTIONS`].
fn narrow(table: &Table, lib: &str, libs: &[&str]) -> mlua::Result<()> {
    let whole = libs.contains(&lib);
    let mut remove = Vec::new();
    table.for_each::<Value, Value>(|k, _| {
        let keep = match &k {
            Value::String(name) => {
                let name = name.to_str()?;
                let listed = whole
                    || libs.iter().any(|entry| {
                        entry
                            .strip_prefix(lib)
                            .and_then(|rest| rest.strip_prefix('.'))
                            .is_some_and(|f| f == &*name)
                    });
                listed && (lib != "os" || OS_FUNCTIONS.contains(&&*name))
            }
            _ => false,
        };
        if !keep {
            remove.push(k);
        }
        Ok(())
    })?;
    for k in remove {
        table.raw_set(k, Value::Nil)?;
    }
    Ok(())
}

/// Bytes `long_rep` copies between two deadline checks.
const REP_SLICE: usize = 8 << 20;

/// `string.rep(s, n, sep)` for long results: refuses a result larger than the state's
/// memory limit at once (`limit_memory`, as Lua would after allocating it), then builds it
/// by doubling, with a deadline check after each slice of at most [`REP_SLICE`] bytes.
/// Lua's own `string.rep` copies the pieces one at a time in one C call (60 MiB of `"x"`
/// took over 100 ms); this takes a few milliseconds and stops at the deadline. The buffer
/// lives outside the Lua heap until the result is made a Lua string (which the memory
/// limit then counts); it is never larger than the memory limit.
fn long_rep(
    lua: &Lua,
    budget: &Budget,
    s: &[u8],
    n: i64,
    sep: &[u8],
) -> mlua::Result<mlua::LuaString> {
    let memory_error = || budget.trip(Stop::Limit(LimitKind::Memory));
    let k = usize::try_from(n).unwrap_or(0);
    if k == 0 {
        return lua.create_string("");
    }
    let unit = s.len() + sep.len();
    let total = unit
        .checked_mul(k)
        .and_then(|t| t.checked_sub(sep.len()))
        .ok_or_else(memory_error)?;
    let limit = budget.memory_limit();
    if limit > 0 && total > limit {
        return Err(memory_error());
    }
    budget.step()?;
    let mut out: Vec<u8> = Vec::new();
    out.try_reserve_exact(total + sep.len())
        .map_err(|_| memory_error())?;
    out.extend_from_slice(s);
    out.extend_from_slice(sep);
    let full = unit * k;
    while out.len() < full {
        let whole_units = (out.len().min(full - out.len()).min(REP_SLICE) / unit).max(1);
        out.extend_from_within(..whole_units * unit);
        budget.step()?;
    }
    out.truncate(total);
    lua.create_string(&out)
}
