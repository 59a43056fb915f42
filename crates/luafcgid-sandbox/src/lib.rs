//! Lua state factory for luafcgid: one [`ScriptState`] is one Lua 5.4 state loaded with one
//! script, in a restricted environment, run under limits that a script cannot escape.
//!
//! What it does: builds a state with only the safe parts of the standard library (see
//! [`ScriptState::load`] for the exact list), runs the script's top-level chunk once under the
//! init [`Limits`], then serves requests through [`ScriptState::handle`]: a request object
//! (`r`/`con`) scoped to the request, the entry function (`handler(r)` or `main(env, con)`), an
//! instruction budget and a wall-clock deadline enforced by one budget hook, a per-state memory
//! limit, an output limit, an abort flag, and `require` confined to the tenant's tree. Every
//! outcome is typed ([`Failure`], [`LimitKind`]); nothing is classified by matching error text
//! except Lua's own "not enough memory" (see [`LimitKind::Memory`]).
//!
//! What it does not do: it opens no sockets, reads no policy files and knows nothing of
//! FastCGI; it does not pool states, decide when a state is retired, or render error pages
//! (the pool and the binary do). Pattern matching (`string.find`, `match`, `gmatch`, `gsub`)
//! is a metered Rust port that the limits interrupt; the other C functions that can run long
//! in one call (`table.move`, `insert`, `remove`, `sort`, `load`, `string.rep`, `os.date`, the
//! `luafcgid` helpers) are wrapped to work in slices with a deadline check between two, or to
//! refuse at once. `setmetatable` refuses `__gc` (Lua runs finalizers with hooks off), and
//! `xpcall` runs its message handler after the error, with hooks on. Known gap: when the hook
//! stops a run, mlua's hook error path closes the running function's to-be-closed variables
//! inside the hook, with hooks off, so a looping `__close` handler there is not interrupted.

#![deny(unsafe_code)]

mod env;
mod helpers;
mod limits;
mod modules;
mod pattern;
mod request;
mod state;
mod status;
mod vm;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

pub use env::{default_libs, DEFAULT_LIBS, LIB_TABLES, OS_FUNCTIONS};
pub use limits::PROBE_INTERVAL;
pub use state::ScriptState;
pub use status::status_reason;
pub use vm::{leave_batch_scheduling, set_batch_scheduling};

/// The most instruction units the VM runs between two calls of the budget hook (which
/// counts them, checks the instruction budget, the deadline and, at most once a millisecond,
/// the abort flag). The watchdog also interrupts every run every 2 ms, so the deadline is
/// checked at least that often whatever the script does between two charges.
///
/// Units are charged by the patched VM (`vendor/lua-src/PATCHES.md`): one per function call,
/// the instructions from a function's start to its return, and a loop body's length at every
/// backward jump. That equals the instructions executed except that instructions skipped by
/// a forward jump (an `if` branch not taken) are counted too.
pub const BUDGET_PERIOD: u64 = 100_000;

/// Limits for one run of Lua code: a request, or the first run of a script's chunk.
///
/// A value of zero means "no limit" for every field. Pattern matching is metered (its steps count
/// as instructions and the deadline is checked every few thousand of them); otherwise the
/// limits do not cover time spent inside one C function (`table.concat` of a huge table): the
/// hook runs only between VM instructions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// VM instruction budget, in the units of [`BUDGET_PERIOD`]; a run stops at the first
    /// charge past it (at most one loop body or one function's length more).
    pub instructions: u64,
    /// Wall-clock time, checked at every hook call.
    pub timeout: Duration,
    /// Response bytes: the body plus the headers the script set (`name: value\r\n` each).
    pub output: usize,
}

/// How to build one [`ScriptState`].
#[derive(Debug, Clone)]
pub struct StateOptions {
    /// Real path of the script (already resolved and checked by the caller).
    pub script: PathBuf,
    /// Name used in error messages and tracebacks, e.g. `hello.lua` (never an absolute path).
    pub chunk_name: String,
    /// The tenant's root (a real path): `require` never loads a file outside it.
    pub module_root: PathBuf,
    /// Whether `require` may load `.lua` files (`require("luafcgid")` always works).
    pub modules: bool,
    /// Name of the entry function. `None`: `main` if the script defines it, else `handler`.
    /// An entry named `main` is called as `main(env, con)`; any other as `name(r)`.
    pub entry: Option<String>,
    /// Memory limit of the state in bytes, Lua heap only (0 = none).
    pub memory: usize,
    /// The libraries and functions the state gets: library names (`"string"`) or single
    /// functions (`"string.format"`, `"os.date"`); see [`DEFAULT_LIBS`], [`LIB_TABLES`] and
    /// [`OS_FUNCTIONS`]. Names outside those are ignored (the policy refuses them).
    pub libs: Vec<String>,
    /// Limits for the first run of the chunk; its output (`print`) is discarded.
    pub init: Limits,
}

/// A cheap, non-blocking check the hook makes (at most about once a millisecond while Lua
/// runs) of whether the client is still there, for front ends that cannot set
/// [`RequestInput::abort`] while Lua runs on their own thread.
pub trait ClientProbe: Sync {
    /// True when the client has gone away.
    fn gone(&self) -> bool;

    /// How long a long run (one that has lasted a couple of milliseconds and done the work
    /// of one: see [`Report::long`]) should stop now to give the CPU back, asked before
    /// [`ClientProbe::gone`] each time the hook probes such a run. The pause counts against
    /// the run's time limit; it is cut to [`MAX_PAUSE`]. The default: none.
    fn pause(&self) -> Duration {
        Duration::ZERO
    }

    /// True when the client is known to have gone away; unlike [`ClientProbe::gone`],
    /// asked by the daemon (before it runs a request that waited for a state), never by
    /// the hook, and with no side effect. The default: no.
    fn left(&self) -> bool {
        false
    }
}

/// The longest pause [`ClientProbe::pause`] may ask for at a time.
pub const MAX_PAUSE: Duration = Duration::from_millis(10);

impl std::fmt::Debug for dyn ClientProbe + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientProbe")
    }
}

impl std::fmt::Debug for dyn ClientProbe + Send + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientProbe")
    }
}

/// What a request brings to its run: its params, body and `[vars]`, held by the front end
/// and shared with the state for the run (never copied). Everything is fully assembled
/// before Lua runs.
pub trait RequestData: Send + Sync {
    /// Every param, in order, duplicates included (`r.env`, the `env` of `main(env, con)`).
    fn params(&self) -> Box<dyn Iterator<Item = (&[u8], &[u8])> + '_>;
    /// How many params [`RequestData::params`] gives.
    fn param_count(&self) -> usize;
    /// The request body (`r:gets()`, `r:body()`).
    fn body(&self) -> &[u8];
    /// The policy's `[vars]` value named `name` (`r:config(name)`).
    fn var(&self, name: &[u8]) -> Option<&str>;
}

impl std::fmt::Debug for dyn RequestData + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestData")
            .field("params", &self.param_count())
            .field("body", &self.body().len())
            .finish_non_exhaustive()
    }
}

/// [`RequestData`] held in plain vectors.
#[derive(Debug, Clone, Default)]
pub struct OwnedRequest {
    pub params: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
    pub vars: Vec<(String, String)>,
}

impl RequestData for OwnedRequest {
    fn params(&self) -> Box<dyn Iterator<Item = (&[u8], &[u8])> + '_> {
        Box::new(
            self.params
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice())),
        )
    }

    fn param_count(&self) -> usize {
        self.params.len()
    }

    fn body(&self) -> &[u8] {
        &self.body
    }

    fn var(&self, name: &[u8]) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| k.as_bytes() == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One request as the script sees it, shared with the state for the length of its run.
/// The state holds no part of it once the run is over.
#[derive(Debug, Clone)]
pub struct RequestInput {
    /// Params, body and `[vars]`.
    pub data: Arc<dyn RequestData>,
    /// Set by the front end when the client went away: Lua stops at its next hook (within
    /// about a millisecond of running Lua code) and the request ends as [`Failure::Aborted`].
    pub abort: Arc<AtomicBool>,
    /// Asked along with `abort`; when it answers true, `abort` is set and Lua stops.
    pub client: Option<Arc<dyn ClientProbe + Send>>,
}

impl RequestInput {
    /// A request of `data`, not aborted, with no client to ask.
    pub fn new(data: impl RequestData + 'static) -> RequestInput {
        RequestInput {
            data: Arc::new(data),
            abort: Arc::new(AtomicBool::new(false)),
            client: None,
        }
    }
}

/// What a request (or a load) cost and how it ended.
#[derive(Debug)]
pub struct Report {
    /// The response, or why there is none.
    pub result: Result<Response, Failure>,
    /// VM instructions executed, in the units of [`BUDGET_PERIOD`], plus the steps of the
    /// metered Rust functions (the pattern matcher).
    pub instructions: u64,
    /// Peak Lua heap bytes of the state seen during the request (sampled at every hook call
    /// and at the end).
    pub memory: usize,
    /// Messages of `r:log(msg)`, whatever the result: at most [`MAX_LOG_MESSAGES`], each cut
    /// to [`MAX_LOG_MESSAGE_BYTES`] bytes (invalid UTF-8 replaced).
    pub logs: Vec<String>,
    /// Messages of `r:log(msg)` dropped beyond [`MAX_LOG_MESSAGES`].
    pub logs_dropped: usize,
    /// The run went on for more than a couple of milliseconds *and* executed 100,000
    /// instructions or more by then (as the hook saw it: the hook runs at least every couple
    /// of milliseconds, so such a run is always seen, except while a single metered C call
    /// works). A run that only waited for a CPU is not long. The daemon runs the scripts of
    /// long runs away from the threads that serve connections.
    pub long: bool,
}

/// The response a script produced. Status and Content-Type are `None` when the script left
/// the configured defaults alone.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Response {
    /// `None`: the configured default status.
    pub status: Option<u16>,
    /// `None`: the configured default content type.
    pub content_type: Option<String>,
    /// Headers in call order, `Status` and `Content-Type` excluded. Names are valid header
    /// tokens; neither names nor values contain CR, LF or NUL.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// Most `r:log` messages kept per request.
pub const MAX_LOG_MESSAGES: usize = 100;
/// Longest `r:log` message kept, in bytes; longer ones are cut.
pub const MAX_LOG_MESSAGE_BYTES: usize = 4096;

/// Which limit a run hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// The instruction budget is spent.
    Instructions,
    /// The wall-clock deadline passed.
    Time,
    /// The state's memory limit refused an allocation. Lua reports this as the error
    /// "not enough memory", which a script can catch with `pcall`; a caught error with exactly
    /// that message also counts as this limit (a script faking it only ends its own request).
    Memory,
    /// The response grew past the output limit.
    Output,
}

impl LimitKind {
    /// The audit log's `outcome` for this limit: `limit_cpu`, `limit_time`, `limit_memory`,
    /// `limit_output`.
    pub fn outcome(self) -> &'static str {
        match self {
            LimitKind::Instructions => "limit_cpu",
            LimitKind::Time => "limit_time",
            LimitKind::Memory => "limit_memory",
            LimitKind::Output => "limit_output",
        }
    }

    /// A short lowercase name: `instructions`, `time`, `memory`, `output`.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Instructions => "instructions",
            LimitKind::Time => "time",
            LimitKind::Memory => "memory",
            LimitKind::Output => "output",
        }
    }
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a load or a request produced no response.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The script is at fault: a runtime or syntax error (message and traceback), a bytecode
    /// file, a bad return type, a missing entry function.
    #[error("script error: {message}")]
    Script {
        /// What went wrong, with a Lua traceback where there is one.
        message: String,
    },
    /// A limit ended the run. It cannot be caught by the script.
    #[error("{kind} limit: {message}")]
    Limit {
        /// Which limit.
        kind: LimitKind,
        /// The limit and where the script was.
        message: String,
    },
    /// The request's abort flag was set (the client went away).
    #[error("aborted: the client went away")]
    Aborted,
    /// The script file could not be read at load.
    #[error("cannot read the script: {0}")]
    Io(#[from] std::io::Error),
}

impl Failure {
    /// Whether the state may serve further requests: true only for [`Failure::Script`] (an
    /// ordinary error leaves the state consistent, as in the original luafcgid). A state that
    /// hit a limit or was aborted mid-run may hold half-updated globals and is discarded.
    pub fn keeps_state(&self) -> bool {
        matches!(self, Failure::Script { .. })
    }
}
