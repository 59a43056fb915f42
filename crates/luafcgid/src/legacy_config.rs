//! The original luafcgid's `config.lua`, read as data: a file given to `--config` whose name
//! ends in `.lua` is evaluated as a Lua chunk in a fresh state whose environment is an empty
//! table (no library at all: no `string`, `os`, `io`, `require`, `print`), under a memory
//! limit ([`MEMORY_LIMIT`]), an instruction limit ([`INSTRUCTION_LIMIT`]) and a time limit
//! ([`TIME_LIMIT`]). The globals it assigned are then mapped onto a [`RawConfig`], so the
//! validation of `luafcgid.toml` applies to them unchanged.
//!
//! What the original's samples do still works: arithmetic and references to keys set before
//! (`states = workers * 2`, `clones = states`, `maxpost = 1024 * 1024`), comments, `\r\n` in
//! strings. What it does not do: call anything (the original ran the file with every library
//! open; here a call of `os.getenv` or `require` is an error naming the line), keep the state
//! (it is closed after the read), or accept bytecode. Keys of the original this daemon has
//! no use for ([`IGNORED`]) and keys it does not know become warnings, not errors; a known
//! key with a value of the wrong type is an error naming the key and the type expected.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use luafcgid_policy::{PolicyFields, SizeValue};
use mlua::{HookTriggers, Lua, LuaOptions, StdLib, Table, Value, VmState};

use crate::config::{ConfigError, RawConfig};

/// The file name extension that makes `--config` read a file as an original `config.lua`
/// (any other name is read as `luafcgid.toml`).
pub const EXTENSION: &str = "lua";

/// The largest `config.lua` read; the original's samples are about 1 KiB.
pub const MAX_FILE_BYTES: u64 = 256 << 10;

/// Lua heap the evaluation may use, compiling the chunk included.
pub const MEMORY_LIMIT: usize = 4 << 20;

/// VM instructions the chunk may execute; the original's samples execute a few dozen.
pub const INSTRUCTION_LIMIT: u64 = 10_000_000;

/// Wall-clock time the chunk may run, checked with the instruction count.
pub const TIME_LIMIT: Duration = Duration::from_secs(1);

/// Instructions between two checks of the limits.
const CHECK_EVERY: u32 = 1000;

/// Unknown keys named one by one in warnings; the rest are counted in one more.
const MAX_UNKNOWN_WARNINGS: usize = 32;

/// Entries of a list value (`headers`, `listen`, `docroot` as tables) read at most.
const MAX_LIST_ENTRIES: usize = 1024;

/// Keys of the original that are accepted and ignored, each with the reason given in its
/// warning.
pub const IGNORED: &[(&str, &str)] = &[
    (
        "watchdog",
        "a run is stopped by the policy's `timeout_ms` (and `instructions`) instead",
    ),
    (
        "retries",
        "a request waits for a state in the admission queue (`queue_timeout_ms`) instead of retrying",
    ),
    (
        "buffering",
        "responses are always buffered (the policy's `output` bounds them)",
    ),
    (
        "daemonize",
        "the daemon stays in the foreground: run it under systemd or a supervisor",
    ),
    (
        "backlog",
        "the listen backlog is fixed by the daemon",
    ),
    (
        "headersize",
        "header buffers grow as needed (the policy's `output` bounds them)",
    ),
    (
        "bodysize",
        "body buffers grow as needed (the policy's `output` bounds them)",
    ),
];

/// The keys of the original mapped onto this daemon's, as (original, ours).
pub const MAPPED: &[(&str, &str)] = &[
    ("listen", "listen"),
    ("workers", "workers"),
    ("states", "states"),
    ("clones", "defaults.clones"),
    ("sweep", "sweep_ms"),
    ("showerrors", "defaults.show_errors"),
    ("maxpost", "defaults.body"),
    ("headers", "headers"),
    ("httpstatus", "default_status"),
    ("contenttype", "default_content_type"),
    ("handler", "defaults.entry"),
    ("logfile", "log"),
    ("maxcount", "defaults.state_max_requests"),
    ("docroot", "docroot"),
];

/// Whether `path` names an original `config.lua` (its extension is [`EXTENSION`]).
pub fn is_legacy(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == EXTENSION)
}

/// A `config.lua` read: the settings as `luafcgid.toml` would hold them, and one warning per
/// key accepted but ignored or not known.
#[derive(Debug, Default)]
pub struct LegacyConfig {
    pub raw: RawConfig,
    pub warnings: Vec<String>,
}

/// Why an evaluation was stopped by a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Instructions,
    Time,
}

/// Reads and evaluates the `config.lua` at `path`.
pub fn read(path: &Path) -> Result<LegacyConfig, ConfigError> {
    let io = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut text = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_FILE_BYTES + 1),
        &mut text,
    )
    .map_err(io)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(ConfigError::Legacy {
            path: path.to_path_buf(),
            message: format!(
                "larger than {} KiB: not a config file",
                MAX_FILE_BYTES >> 10
            ),
        });
    }
    parse(&text, path)
}

/// Evaluates `config.lua` text; `path` names it in errors.
pub fn parse(text: &[u8], path: &Path) -> Result<LegacyConfig, ConfigError> {
    let globals = evaluate(text, path)?;
    map(globals, path)
}

/// A value the chunk left in its environment, copied out of the Lua state.
#[derive(Debug, Clone, PartialEq)]
enum Setting {
    Bool(bool),
    Integer(i64),
    Float(f64),
    Text(Vec<u8>),
    /// A table's sequence part, up to [`MAX_LIST_ENTRIES`], strings only; `Err` holds the
    /// type name of the first entry that is not a string.
    List(Result<Vec<Vec<u8>>, &'static str>),
    /// Any other type (function, table with holes, ...), by its type name.
    Other(&'static str),
}

impl Setting {
    fn type_name(&self) -> &'static str {
        match self {
            Setting::Bool(_) => "a boolean",
            Setting::Integer(_) | Setting::Float(_) => "a number",
            Setting::Text(_) => "a string",
            Setting::List(_) => "a table",
            Setting::Other(t) => t,
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) | Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Table(_) => "a table",
        Value::Function(_) => "a function",
        Value::Thread(_) => "a coroutine",
        _ => "a userdata",
    }
}

fn setting(v: &Value) -> Setting {
    match v {
        Value::Boolean(b) => Setting::Bool(*b),
        Value::Integer(i) => Setting::Integer(*i),
        Value::Number(f) => Setting::Float(*f),
        Value::String(s) => Setting::Text(s.as_bytes().to_vec()),
        Value::Table(t) => Setting::List(list(t)),
        other => Setting::Other(type_name(other)),
    }
}

fn list(t: &Table) -> Result<Vec<Vec<u8>>, &'static str> {
    let mut out = Vec::new();
    for i in 1..=MAX_LIST_ENTRIES as i64 {
        match t.raw_get::<Value>(i) {
            Ok(Value::Nil) => break,
            Ok(Value::String(s)) => out.push(s.as_bytes().to_vec()),
            Ok(other) => return Err(type_name(&other)),
            Err(_) => return Err("an unreadable value"),
        }
    }
    Ok(out)
}

/// A key of the environment as text, for warnings (cut, control characters escaped).
fn shown_key(k: &Value) -> String {
    match k {
        Value::String(s) => {
            let b = s.as_bytes();
            let cut = &b[..b.len().min(64)];
            let mut t = String::from_utf8_lossy(cut).escape_debug().to_string();
            if b.len() > 64 {
                t.push_str("...");
            }
            t
        }
        Value::Integer(i) => format!("[{i}]"),
        other => format!("[{}]", type_name(other)),
    }
}

/// Runs the chunk under the limits; gives what it assigned, by key (keys that are not
/// strings are shown in brackets).
fn evaluate(text: &[u8], path: &Path) -> Result<BTreeMap<String, Setting>, ConfigError> {
    let legacy = |message: String| ConfigError::Legacy {
        path: path.to_path_buf(),
        message,
    };
    let lua = Lua::new_with(StdLib::NONE, LuaOptions::new())
        .map_err(|e| legacy(format!("cannot start Lua: {e}")))?;
    lua.set_memory_limit(MEMORY_LIMIT)
        .map_err(|e| legacy(format!("cannot limit Lua's memory: {e}")))?;
    let stop: Arc<Mutex<Option<(Stop, usize)>>> = Arc::new(Mutex::new(None));
    let seen = stop.clone();
    let started = Instant::now();
    let checks = Cell::new(0u64);
    lua.set_hook(
        HookTriggers::new().every_nth_instruction(CHECK_EVERY),
        move |_, debug| {
            checks.set(checks.get() + 1);
            let why = if checks.get() * u64::from(CHECK_EVERY) > INSTRUCTION_LIMIT {
                Stop::Instructions
            } else if started.elapsed() > TIME_LIMIT {
                Stop::Time
            } else {
                return Ok(VmState::Continue);
            };
            let line = debug.current_line().unwrap_or(0);
            if let Ok(mut s) = seen.lock() {
                *s = Some((why, line));
            }
            Err(mlua::Error::runtime("limit reached"))
        },
    )
    .map_err(|e| legacy(format!("cannot limit Lua's run time: {e}")))?;
    let env = lua
        .create_table()
        .map_err(|e| legacy(format!("cannot start Lua: {e}")))?;
    let run = lua
        .load(text)
        .set_name(format!("={CHUNK}"))
        .set_mode(mlua::chunk::ChunkMode::Text)
        .set_environment(env.clone())
        .exec();
    lua.remove_hook();
    if let Err(e) = run {
        let stopped = stop.lock().ok().and_then(|s| *s);
        return Err(match (stopped, e) {
            (Some((why, line)), _) => ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                message: match why {
                    Stop::Instructions => format!(
                        "evaluation stopped after {INSTRUCTION_LIMIT} instructions: a config file only assigns values"
                    ),
                    Stop::Time => format!(
                        "evaluation stopped after {TIME_LIMIT:?}: a config file only assigns values"
                    ),
                },
            },
            (None, mlua::Error::MemoryError(_)) => legacy(format!(
                "evaluation stopped: more than {} MiB of memory used: a config file only assigns values",
                MEMORY_LIMIT >> 20
            )),
            (None, mlua::Error::SyntaxError { message, .. }) => lua_error(&message, path),
            (None, mlua::Error::RuntimeError(message)) => lua_error(&message, path),
            (None, other) => lua_error(&other.to_string(), path),
        });
    }
    let mut globals = BTreeMap::new();
    for pair in env.pairs::<Value, Value>() {
        let (k, v) = pair.map_err(|e| legacy(format!("cannot read the settings: {e}")))?;
        let key = match &k {
            Value::String(s) => match s.to_str() {
                Ok(t) => t.to_string(),
                Err(_) => shown_key(&k),
            },
            _ => shown_key(&k),
        };
        globals.insert(key, setting(&v));
    }
    Ok(globals)
}

/// The chunk name Lua puts before a line number; replaced by the file's path in errors.
const CHUNK: &str = "config.lua";

/// A Lua error message (`config.lua:3: message`, maybe followed by a traceback) as an error
/// naming the file and line.
fn lua_error(message: &str, path: &Path) -> ConfigError {
    let first = message.lines().next().unwrap_or("").trim();
    let prefix = format!("{CHUNK}:");
    if let Some(rest) = first.strip_prefix(&prefix) {
        if let Some((line, text)) = rest.split_once(':') {
            if let Ok(line) = line.parse::<usize>() {
                return ConfigError::Parse {
                    path: path.to_path_buf(),
                    line,
                    message: text.trim().to_string(),
                };
            }
        }
    }
    ConfigError::Legacy {
        path: path.to_path_buf(),
        message: first.to_string(),
    }
}

/// Maps the settings onto `luafcgid.toml`'s keys.
fn map(mut globals: BTreeMap<String, Setting>, path: &Path) -> Result<LegacyConfig, ConfigError> {
    let origin = path.display().to_string();
    let wrong = |key: &str, expected: &str, got: &Setting| ConfigError::Invalid {
        origin: origin.clone(),
        key: key.to_string(),
        message: format!("expected {expected}, got {}", got.type_name()),
    };
    let bad = |key: &str, message: String| ConfigError::Invalid {
        origin: origin.clone(),
        key: key.to_string(),
        message,
    };
    // Integers: numbers with no fraction, or numeric strings (the original read them with
    // `lua_isnumber`, which takes both).
    let integer = |key: &str, v: &Setting| -> Result<i64, ConfigError> {
        match v {
            Setting::Integer(i) => Ok(*i),
            Setting::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(*f as i64),
            Setting::Float(f) => Err(bad(key, format!("expected an integer, got {f}"))),
            Setting::Text(t) => std::str::from_utf8(t)
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .ok_or_else(|| wrong(key, "an integer", v)),
            other => Err(wrong(key, "an integer", other)),
        }
    };
    let count = |key: &str, v: &Setting| -> Result<u64, ConfigError> {
        let i = integer(key, v)?;
        u64::try_from(i).map_err(|_| bad(key, format!("must not be negative, got {i}")))
    };
    // Strings: an empty one leaves the default, as in the original.
    let text = |key: &str, v: &Setting| -> Result<Option<String>, ConfigError> {
        match v {
            Setting::Text(t) => String::from_utf8(t.clone())
                .map(|s| Some(s).filter(|s| !s.is_empty()))
                .map_err(|_| bad(key, "is not valid UTF-8".into())),
            other => Err(wrong(key, "a string", other)),
        }
    };
    let texts = |key: &str, v: &Setting| -> Result<Vec<String>, ConfigError> {
        match v {
            Setting::Text(_) => Ok(text(key, v)?.into_iter().collect()),
            Setting::List(Ok(items)) => items
                .iter()
                .map(|t| {
                    String::from_utf8(t.clone())
                        .map_err(|_| bad(key, "holds a string that is not valid UTF-8".into()))
                })
                .collect(),
            Setting::List(Err(t)) => Err(bad(
                key,
                format!("expected a string or a list of strings, got a list holding {t}"),
            )),
            other => Err(wrong(key, "a string or a list of strings", other)),
        }
    };
    let boolean = |key: &str, v: &Setting| -> Result<bool, ConfigError> {
        match v {
            Setting::Bool(b) => Ok(*b),
            other => Err(wrong(key, "a boolean (true or false)", other)),
        }
    };

    let mut raw = RawConfig::default();
    let mut defaults = PolicyFields::default();
    let mut warnings = Vec::new();
    if let Some(v) = globals.remove("listen") {
        let list: Vec<String> = texts("listen", &v)?
            .into_iter()
            .map(|a| original_listen(&a))
            .collect();
        if !list.is_empty() {
            raw.listen = Some(list);
        }
    }
    if let Some(v) = globals.remove("docroot") {
        let list = texts("docroot", &v)?;
        if !list.is_empty() {
            raw.docroot = Some(list.into_iter().map(PathBuf::from).collect());
        }
    }
    if let Some(v) = globals.remove("workers") {
        raw.workers = Some(usize::try_from(count("workers", &v)?).unwrap_or(usize::MAX));
    }
    if let Some(v) = globals.remove("states") {
        raw.states = Some(usize::try_from(count("states", &v)?).unwrap_or(usize::MAX));
    }
    if let Some(v) = globals.remove("clones") {
        let n = count("clones", &v)?;
        defaults.clones = Some(u32::try_from(n).unwrap_or(u32::MAX));
    }
    if let Some(v) = globals.remove("sweep") {
        raw.sweep_ms = Some(count("sweep", &v)?);
    }
    if let Some(v) = globals.remove("showerrors") {
        defaults.show_errors = Some(boolean("showerrors", &v)?);
    }
    if let Some(v) = globals.remove("maxpost") {
        defaults.body = Some(SizeValue::Bytes(count("maxpost", &v)?));
    }
    if let Some(v) = globals.remove("headers") {
        let mut lines = Vec::new();
        for block in texts("headers", &v)? {
            lines.extend(
                block
                    .split('\n')
                    .map(|l| l.trim_end_matches('\r').trim())
                    .filter(|l| !l.is_empty())
                    .map(str::to_string),
            );
        }
        raw.headers = Some(lines);
    }
    if let Some(v) = globals.remove("httpstatus") {
        raw.default_status = text("httpstatus", &v)?;
    }
    if let Some(v) = globals.remove("contenttype") {
        raw.default_content_type = text("contenttype", &v)?;
    }
    if let Some(v) = globals.remove("handler") {
        defaults.entry = text("handler", &v)?;
    }
    if let Some(v) = globals.remove("logfile") {
        raw.log = text("logfile", &v)?.map(PathBuf::from);
    }
    if let Some(v) = globals.remove("maxcount") {
        // 0 was the original's "no limit".
        defaults.state_max_requests = Some(count("maxcount", &v)?).filter(|n| *n > 0);
    }
    for (key, why) in IGNORED {
        if globals.remove(*key).is_some() {
            warnings.push(format!("`{key}` is accepted and ignored: {why}"));
        }
    }
    let unknown: Vec<(String, Setting)> = globals.into_iter().collect();
    for (key, v) in unknown.iter().take(MAX_UNKNOWN_WARNINGS) {
        warnings.push(format!(
            "`{key}` ({}) is not a setting of luafcgid; ignored",
            v.type_name()
        ));
    }
    if unknown.len() > MAX_UNKNOWN_WARNINGS {
        warnings.push(format!(
            "{} more keys that are not settings of luafcgid; ignored",
            unknown.len() - MAX_UNKNOWN_WARNINGS
        ));
    }
    if defaults != PolicyFields::default() {
        raw.defaults = Some(defaults);
    }
    Ok(LegacyConfig { raw, warnings })
}

/// An address as the original's `listen` meant it: the original's FastCGI library took a
/// string with a `:` as TCP (`host:port`, `:port`) and anything else as a unix socket path,
/// so a bare name (`luafcgid.sock`) is a socket in the working directory.
fn original_listen(addr: &str) -> String {
    let a = addr.trim();
    if a.contains(':') || a.contains('/') {
        a.to_string()
    } else {
        format!("./{a}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    fn read_text(text: &str) -> Result<LegacyConfig, ConfigError> {
        parse(text.as_bytes(), Path::new("/etc/luafcgid/config.lua"))
    }

    fn ok(text: &str) -> LegacyConfig {
        read_text(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn err(text: &str) -> String {
        match read_text(text) {
            Ok(c) => panic!("{text}: accepted as {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn validated(text: &str) -> crate::config::Config {
        ok(text)
            .raw
            .validate(
                "config.lua",
                &Overrides {
                    docroot: vec![std::env::temp_dir()],
                    ..Overrides::default()
                },
            )
            .unwrap()
    }

    /// The shape of the original's `scripts/etc/config.lua` (and of the packages' copies).
    const SAMPLE: &str = r#"--[[ configuration script for luafcgid ]]--

-- port or socket path to listen to
-- listen = "127.0.0.1:9000"
listen = "/var/tmp/luafcgid.sock"

-- number of worker threads
workers = 4

-- max number of Lua VM states (NOTE: value needs to be larger then or equal to "workers")
states = workers * 2

-- max number of instances of an individual script allowed
clones = states

-- housekeeping sweep cycle in milliseconds
sweep = 5000

-- number of search cycles before creating
-- a new Lua VM state for a requested script
retries = 1

-- do we show errors in browser?
showerrors = true

-- do we perform output buffering?
buffering = true

-- starting buffer size for custom HTTP headers
headersize = 64

-- starting buffer size for HTTP body
bodysize = 1024

-- custom headers to add to all requests
headers = "X-Powered-By: Lua\r\n"

-- handler function name
handler = "main"

-- default HTTP status
httpstatus = "200 OK"

-- default HTTP content type
contenttype = "text/html"

-- max POST size allowed
maxpost = 1024 * 1024

-- full or relative path to logfile
logfile = "/var/log/luafcgid/luafcgid.log"
"#;

    #[test]
    fn the_original_sample_maps_every_key() {
        let c = validated(SAMPLE);
        assert_eq!(
            c.listen,
            vec![crate::config::ListenAddr::Unix(
                "/var/tmp/luafcgid.sock".into()
            )]
        );
        assert_eq!(c.workers, 4);
        assert_eq!(c.states, 8);
        assert_eq!(c.defaults.clones, 8);
        assert_eq!(c.sweep, Duration::from_millis(5000));
        assert!(c.defaults.show_errors);
        assert_eq!(c.headers, vec![("X-Powered-By".into(), "Lua".into())]);
        assert_eq!(c.defaults.entry.as_deref(), Some("main"));
        assert_eq!(c.default_status, 200);
        assert_eq!(c.default_content_type, "text/html");
        assert_eq!(c.defaults.body, 1 << 20);
        assert_eq!(
            c.log.as_deref(),
            Some(Path::new("/var/log/luafcgid/luafcgid.log"))
        );
    }

    #[test]
    fn the_first_sample_warns_about_retries_only() {
        // The original's first `config.lua`: four keys, tabs, trailing comments.
        let l = ok("-- configuration script for luafcgid\nworkers = 5 \t-- number of worker threads\nstates = 10\t\t-- number of Lua VM states\nsweep = 10000\t-- housekeeping sweep cycle in milliseconds\nretries = 3\t\t-- number of search cycles before creating\n\t\t\t\t-- a new Lua VM state for a requested script\n");
        assert_eq!(l.raw.workers, Some(5));
        assert_eq!(l.raw.states, Some(10));
        assert_eq!(l.raw.sweep_ms, Some(10000));
        assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
        assert!(l.warnings[0].contains("`retries`"), "{:?}", l.warnings);
    }

    #[test]
    fn each_mapped_key_lands_on_ours() {
        let c = validated(
            "listen = ':9001'\nworkers = 3\nstates = 7\nclones = 2\nsweep = 250\nshowerrors = false\nmaxpost = 4096\nheaders = 'X-A: 1\\r\\nX-B: two\\r\\n'\nhttpstatus = '404 Not Found'\ncontenttype = 'text/plain'\nhandler = 'serve'\nlogfile = 'audit.jsonl'\nmaxcount = 100\n",
        );
        assert_eq!(
            c.listen,
            vec![crate::config::ListenAddr::Tcp(
                "0.0.0.0:9001".parse().unwrap()
            )]
        );
        assert_eq!((c.workers, c.states, c.defaults.clones), (3, 7, 2));
        assert_eq!(c.sweep, Duration::from_millis(250));
        assert!(!c.defaults.show_errors);
        assert_eq!(c.defaults.body, 4096);
        assert_eq!(
            c.headers,
            vec![
                ("X-A".to_string(), "1".to_string()),
                ("X-B".to_string(), "two".to_string())
            ]
        );
        assert_eq!(c.default_status, 404);
        assert_eq!(c.default_content_type, "text/plain");
        assert_eq!(c.defaults.entry.as_deref(), Some("serve"));
        assert_eq!(c.log.as_deref(), Some(Path::new("audit.jsonl")));
        assert_eq!(c.defaults.state_max_requests, 100);
    }

    #[test]
    fn listen_and_docroot_forms() {
        let l = ok("listen = 'luafcgid.sock'\ndocroot = {'/srv/a', '/srv/b'}\n");
        assert_eq!(l.raw.listen, Some(vec!["./luafcgid.sock".to_string()]));
        assert_eq!(
            l.raw.docroot,
            Some(vec![PathBuf::from("/srv/a"), PathBuf::from("/srv/b")])
        );
        let l = ok("listen = {'127.0.0.1:9000', '/run/l.sock'}\ndocroot = '/srv'\n");
        assert_eq!(
            l.raw.listen,
            Some(vec![
                "127.0.0.1:9000".to_string(),
                "/run/l.sock".to_string()
            ])
        );
        assert_eq!(l.raw.docroot, Some(vec![PathBuf::from("/srv")]));
    }

    #[test]
    fn original_value_forms() {
        // `lua_isnumber` took numeric strings; a float with no fraction is an integer;
        // an empty string left the default; `maxcount = 0` was "no limit".
        let l = ok("workers = '6'\nstates = 2^4\nhandler = ''\nmaxcount = 0\nheaders = ''\n");
        assert_eq!(l.raw.workers, Some(6));
        assert_eq!(l.raw.states, Some(16));
        assert_eq!(l.raw.defaults, None);
        assert_eq!(l.raw.headers, Some(vec![]));
    }

    #[test]
    fn ignored_keys_warn_once_each_with_the_reason() {
        let l = ok("watchdog = 60\nretries = 2\nbuffering = true\ndaemonize = true\nbacklog = 128\nheadersize = 64\nbodysize = 1024\n");
        assert_eq!(l.warnings.len(), IGNORED.len(), "{:?}", l.warnings);
        for (key, why) in IGNORED {
            let w = l
                .warnings
                .iter()
                .find(|w| w.starts_with(&format!("`{key}`")))
                .unwrap_or_else(|| panic!("no warning for {key}: {:?}", l.warnings));
            assert!(w.contains(why), "{w}");
        }
        assert!(l.warnings.iter().any(|w| w.contains("systemd")));
    }

    #[test]
    fn unknown_keys_warn_and_are_bounded() {
        let l = ok("wrokers = 3\nfunction on_start() end\n_ENV[1] = true\n");
        assert_eq!(l.raw.workers, None);
        assert!(
            l.warnings
                .iter()
                .any(|w| w.contains("`wrokers` (a number)")),
            "{:?}",
            l.warnings
        );
        assert!(l
            .warnings
            .iter()
            .any(|w| w.contains("`on_start` (a function)")));
        let l = ok("for i = 1, 1000 do _ENV['k' .. i] = i end\n");
        assert_eq!(l.warnings.len(), MAX_UNKNOWN_WARNINGS + 1);
        assert!(l.warnings.last().unwrap().contains("968 more keys"));
    }

    #[test]
    fn wrong_types_name_the_key_and_what_was_expected() {
        for (text, key, expected) in [
            (
                "workers = 'four'",
                "`workers`",
                "expected an integer, got a string",
            ),
            (
                "states = true",
                "`states`",
                "expected an integer, got a boolean",
            ),
            ("clones = 2.5", "`clones`", "expected an integer, got 2.5"),
            ("sweep = -1", "`sweep`", "must not be negative"),
            ("showerrors = 1", "`showerrors`", "expected a boolean"),
            ("maxpost = '1M'", "`maxpost`", "expected an integer"),
            (
                "headers = 5",
                "`headers`",
                "expected a string or a list of strings, got a number",
            ),
            ("headers = {1}", "`headers`", "a list holding a number"),
            (
                "httpstatus = 200",
                "`httpstatus`",
                "expected a string, got a number",
            ),
            (
                "contenttype = {}",
                "`contenttype`",
                "expected a string, got a table",
            ),
            (
                "handler = function() end",
                "`handler`",
                "expected a string, got a function",
            ),
            (
                "logfile = false",
                "`logfile`",
                "expected a string, got a boolean",
            ),
            ("maxcount = 'x'", "`maxcount`", "expected an integer"),
            (
                "listen = 9000",
                "`listen`",
                "expected a string or a list of strings",
            ),
            ("workers = 1e300", "`workers`", "expected an integer"),
        ] {
            let e = err(text);
            assert!(e.starts_with("/etc/luafcgid/config.lua: "), "{text}: {e}");
            assert!(e.contains(key), "{text}: {e}");
            assert!(e.contains(expected), "{text}: {e}");
        }
    }

    #[test]
    fn values_out_of_range_fail_our_validation() {
        for text in [
            "workers = 0",
            "sweep = 5",
            "clones = 0",
            "httpstatus = 'OK'",
        ] {
            let raw = ok(text).raw;
            let o = Overrides {
                docroot: vec![std::env::temp_dir()],
                ..Overrides::default()
            };
            assert!(raw.validate("config.lua", &o).is_err(), "{text}");
        }
    }

    #[test]
    fn the_environment_is_empty() {
        for (text, what) in [
            ("os.exit(1)", "global 'os'"),
            ("require('socket')", "global 'require'"),
            ("x = io.open('/etc/passwd'):read('a')", "global 'io'"),
            ("x = string.rep('a', 10)", "global 'string'"),
            ("print('hi')", "global 'print'"),
            ("x = ('a'):rep(10)", "attempt to index"),
            ("x = load('return 1')", "global 'load'"),
            ("x = _G.os", "global '_G'"),
        ] {
            let e = err(&format!("workers = 2\n{text}\n"));
            assert!(e.starts_with("/etc/luafcgid/config.lua:2: "), "{text}: {e}");
            assert!(e.contains(what), "{text}: {e}");
        }
    }

    #[test]
    fn syntax_and_runtime_errors_name_the_line() {
        let e = err("workers = 4\nstates = = 2\n");
        assert!(e.starts_with("/etc/luafcgid/config.lua:2: "), "{e}");
        assert!(e.contains("unexpected symbol"), "{e}");
        let e = err("workers = 4\n\n\nerror('no')\n");
        assert!(e.starts_with("/etc/luafcgid/config.lua:4: "), "{e}");
        assert!(!e.contains("traceback"), "{e}");
        let e = err("x = 1 + {}\n");
        assert!(e.starts_with("/etc/luafcgid/config.lua:1: "), "{e}");
        assert!(e.contains("arithmetic"), "{e}");
    }

    #[test]
    fn bytecode_is_refused() {
        let e = parse(b"\x1bLua\x54\x00junk", Path::new("c.lua"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("binary"), "{e}");
    }

    #[test]
    fn a_looping_chunk_is_stopped_quickly() {
        let t = Instant::now();
        let e = err("workers = 2\nwhile true do end\n");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert!(e.starts_with("/etc/luafcgid/config.lua:2: "), "{e}");
        assert!(e.contains("evaluation stopped"), "{e}");
        // A loop that calls a function: stopped the same way.
        let e = err("local function f() end\nwhile true do f() end\n");
        assert!(e.contains("evaluation stopped"), "{e}");
    }

    #[test]
    fn a_memory_hungry_chunk_is_stopped() {
        let e = err("t = {}\nfor i = 1, 1e9 do t[i] = i end\n");
        assert!(e.contains("memory"), "{e}");
        let e = err("s = 'x'\nfor i = 1, 40 do s = s .. s end\n");
        assert!(e.contains("memory"), "{e}");
    }

    #[test]
    fn an_oversized_file_is_refused_before_it_runs() {
        let dir = std::env::temp_dir().join(format!("luafcgid-legacy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("big.lua");
        let mut text = String::from("workers = 2\n");
        while text.len() as u64 <= MAX_FILE_BYTES {
            text.push_str("-- padding padding padding padding padding padding\n");
        }
        std::fs::write(&path, &text).unwrap();
        let e = read(&path).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains("larger than 256 KiB"), "{e}");
    }

    #[test]
    fn extension_decides() {
        assert!(is_legacy(Path::new("/etc/luafcgid/config.lua")));
        assert!(!is_legacy(Path::new("luafcgid.toml")));
        assert!(!is_legacy(Path::new("config.lua.toml")));
        assert!(!is_legacy(Path::new("lua")));
    }
}
