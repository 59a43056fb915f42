//! [`ScriptState`]: one restricted Lua state loaded with one script, and the two runs it
//! knows, the init run of the chunk and a request.
//!
//! Every run follows the same steps: arm the [`Budget`] with the run's limits, start the
//! response in [`Ctx`] (which holds the running request, if any, until the run ends), run
//! Lua (a request's object carries the run's number, so it is dead after its request; the
//! init run's abort probe lives in a `Lua::scope` and dies with that run), then classify
//! the result: a stop recorded in the budget wins over whatever error Lua reported, then
//! Lua's out-of-memory error, then everything else is the script's error.

use std::cell::Cell;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use mlua::{Error, Function, Lua, Table, Value};

use crate::env::new_state;
use crate::limits::{install_hook, is_memory_error, AbortProbe, Budget, Stop};
use crate::modules::{install_require, source_text, ModuleSpace};
use crate::request::{
    install_request_object, lock_ctx, request_env, request_object, Ctx, SharedCtx,
};
use crate::vm::{self, Called};
use crate::{Failure, LimitKind, Limits, Report, RequestInput, Response, StateOptions};

/// How the entry function is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryForm {
    /// `handler(r)`: a string or number result is appended to the body.
    Handler,
    /// `main(env, con)`: the result is ignored.
    Main,
}

/// One Lua state loaded with one script: the unit the pool keeps, hands to a worker thread
/// for one request at a time, and discards when a run hit a limit.
///
/// `Send` (it moves between worker threads) but not `Sync`. Globals the script sets persist
/// across the requests this state serves.
pub struct ScriptState {
    /// The request context, also in the state's app data for its callbacks.
    ctx: SharedCtx,
    lua: Lua,
    globals: Table,
    budget: Arc<Budget>,
    entry_name: String,
    entry_key: mlua::LuaString,
    entry_form: EntryForm,
    memory_limit: usize,
    files: Vec<PathBuf>,
    requests: u64,
    _not_sync: PhantomData<Cell<()>>,
}

impl std::fmt::Debug for ScriptState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptState")
            .field("entry", &self.entry_name)
            .field("files", &self.files)
            .field("requests", &self.requests)
            .field("memory", &self.lua.used_memory())
            .finish_non_exhaustive()
    }
}

impl ScriptState {
    /// Creates a restricted state, reads `opts.script` (Lua source only: a bytecode file is
    /// [`Failure::Script`]), runs its chunk under `opts.init` and `opts.memory`, and checks
    /// that the entry function exists. `abort` stops the init run like a request's flag.
    ///
    /// The state has the base functions `assert`, `error`, `getmetatable`, `ipairs`, `next`,
    /// `pairs`, `rawequal`, `rawget`, `rawlen`, `rawset`, `select`, `setmetatable`,
    /// `tonumber`, `tostring`, `type`, `_G`, `_VERSION`; limit-aware `pcall`, `xpcall`,
    /// `load` (text only; the state's globals unless an environment is given) and its alias
    /// `loadstring`; `print` (to the response), `collectgarbage` (only `"count"`, anything
    /// else returns 0), `unpack`, a no-op `warn`, `require`; the libraries `string` (without
    /// `dump`), `table`, `math`, `utf8`, `coroutine` (limit-aware `resume`, `wrap`, `close`)
    /// and `os` with only `time`, `clock`, `date`, `difftime`. There is no `io`, `debug`,
    /// `package`, `dofile` or `loadfile`. `setmetatable` refuses a metatable with `__gc`;
    /// `getmetatable("")` gives a read-only stand-in; `table.move`, `insert`, `remove`, `sort`,
    /// `string.rep`, `os.date` and `load` are wrapped so that no single call of them runs long
    /// between two deadline checks.
    pub fn load(opts: &StateOptions, abort: &AtomicBool) -> Result<ScriptState, Failure> {
        let src = std::fs::read(&opts.script)?;
        let src = source_text(src).map_err(|m| Failure::Script {
            message: format!("{}: {m}", opts.chunk_name),
        })?;
        let mut state = ScriptState::new(opts).map_err(|e| Failure::Script {
            message: format!("cannot create the Lua state: {e}"),
        })?;
        state.run_init(opts, &src, abort)?;
        state.find_entry(opts)?;
        // The bootstrap and the chunk leave garbage behind (sources, compiled prototypes of
        // run-once code): collect it once, so an idle state holds only what it uses.
        let _ = state.lua.gc_collect();
        Ok(state)
    }

    /// A restricted state with the hook, the memory limit and `require`, before any script.
    fn new(opts: &StateOptions) -> mlua::Result<ScriptState> {
        let budget = Arc::new(Budget::new());
        budget.set_memory_limit(opts.memory);
        let lua = new_state(&opts.libs, &budget)?;
        install_request_object(&lua)?;
        // Generational collection: a request's garbage (its params, strings, tables) dies
        // young and is collected in minor cycles soon after, instead of piling up to several
        // times the state's live size between the incremental collector's full cycles.
        lua.gc_set_mode(mlua::prelude::LuaGcMode::Generational(
            mlua::prelude::LuaGcGenParams::default(),
        ));
        let ctx = Arc::new(std::sync::Mutex::new(Ctx::new(Arc::clone(&budget))));
        lua.set_app_data(Arc::clone(&ctx));
        lua.set_app_data(AbortProbe::default());
        let root =
            std::fs::canonicalize(&opts.module_root).unwrap_or_else(|_| opts.module_root.clone());
        let script_dir = opts
            .script
            .parent()
            .map_or_else(|| root.clone(), |p| p.to_path_buf());
        install_require(&lua, ModuleSpace::new(script_dir, root, opts.modules))?;
        install_hook(&lua, Arc::clone(&budget))?;
        if opts.memory > 0 {
            lua.set_memory_limit(opts.memory)?;
        }
        let globals = lua.globals();
        let entry_key = lua.create_string("handler")?;
        Ok(ScriptState {
            ctx,
            lua,
            globals,
            budget,
            entry_name: String::new(),
            entry_key,
            entry_form: EntryForm::Handler,
            memory_limit: opts.memory,
            files: vec![opts.script.clone()],
            requests: 0,
            _not_sync: PhantomData,
        })
    }

    fn run_init(
        &mut self,
        opts: &StateOptions,
        src: &[u8],
        abort: &AtomicBool,
    ) -> Result<(), Failure> {
        let lua = &self.lua;
        self.budget.arm(&opts.init, lua.used_memory());
        self.begin(opts.init.output, false);
        let result = lua.scope(|scope| {
            let probe =
                scope.create_function(move |_, _: mlua::MultiValue| Ok(abort.load(Relaxed)))?;
            set_probe(lua, Some(probe));
            let chunk = lua
                .load(src)
                .set_name(format!("@{}", opts.chunk_name))
                .set_mode(mlua::chunk::ChunkMode::Text)
                .into_function()?;
            chunk.call::<()>(())
        });
        // Only this run has a probe function; requests are probed through the context.
        set_probe(lua, None);
        self.end();
        self.classify(result, &opts.init).map(drop)
    }

    fn find_entry(&mut self, opts: &StateOptions) -> Result<(), Failure> {
        let is_function =
            |name: &str| matches!(self.globals.raw_get::<Value>(name), Ok(Value::Function(_)));
        let (name, form) = match &opts.entry {
            Some(name) if name == "main" => (name.clone(), EntryForm::Main),
            Some(name) => (name.clone(), EntryForm::Handler),
            None if is_function("main") => ("main".to_owned(), EntryForm::Main),
            None => ("handler".to_owned(), EntryForm::Handler),
        };
        if !is_function(&name) {
            let message = match &opts.entry {
                Some(_) => format!(
                    "{}: entry function '{name}' is not defined",
                    opts.chunk_name
                ),
                None => format!(
                    "{}: the script defines neither main(env, con) nor handler(r)",
                    opts.chunk_name
                ),
            };
            return Err(Failure::Script { message });
        }
        self.entry_key = self.lua.create_string(&name).map_err(|e| Failure::Script {
            message: e.to_string(),
        })?;
        self.entry_name = name;
        self.entry_form = form;
        Ok(())
    }

    /// Serves one request under `limits`: calls the entry function with a fresh request
    /// object and collects the response. A [`Report`] is always returned; a limit or an abort
    /// also means the state should not be used again (see [`Failure::keeps_state`]).
    pub fn handle(&mut self, req: &RequestInput, limits: &Limits) -> Report {
        self.requests += 1;
        if req.abort.load(Relaxed) {
            return Report {
                result: Err(Failure::Aborted),
                instructions: 0,
                memory: self.lua.used_memory(),
                logs: Vec::new(),
                logs_dropped: 0,
                long: false,
            };
        }
        let lua = &self.lua;
        self.budget.arm(limits, lua.used_memory());
        let run = self.requests;
        let _ = lock_ctx(&self.ctx, |ctx| {
            ctx.begin(limits.output, true);
            ctx.request = Some(req.clone());
            ctx.run = run;
            Ok(())
        });
        let result = self.call_entry(run);
        let (response, logs, logs_dropped) = self.end();
        let result = self.classify(result, limits).map(|()| response);
        Report {
            result,
            instructions: self.budget.instructions(),
            memory: self.budget.peak_memory(),
            logs,
            logs_dropped,
            long: self.budget.was_long(),
        }
    }

    /// Calls the entry function with the request object of run `run` (which carries the
    /// run's number, so that one a script keeps is dead after its request; the request
    /// itself is in the context, cleared by `end`).
    /// Its result is appended to the response.
    fn call_entry(&self, run: u64) -> mlua::Result<()> {
        let r = request_object(run);
        let missing = || {
            Err(Error::runtime(format!(
                "entry function '{}' is not defined",
                self.entry_name
            )))
        };
        match self.entry_form {
            EntryForm::Handler => {
                let append = |text: &[u8]| lock_ctx(&self.ctx, |ctx| ctx.append(text));
                match vm::call_entry(&self.lua, &self.globals, &self.entry_key, r, append)? {
                    Called::Returned(value) => self.append_result(value),
                    Called::Raised(e) => Err(e),
                    Called::Missing => missing(),
                }
            }
            EntryForm::Main => {
                let Value::Function(entry) = self.globals.raw_get::<Value>(&self.entry_key)? else {
                    return missing();
                };
                let env = request_env(&self.lua)?;
                entry.call::<()>((env, r))
            }
        }
    }

    /// Appends the entry function's result when it is not a string (`vm::call_entry` hands
    /// a string to its sink): a number; nil adds nothing; anything else is an error.
    fn append_result(&self, value: Value) -> mlua::Result<()> {
        match value {
            Value::Nil => Ok(()),
            v @ (Value::Integer(_) | Value::Number(_)) => {
                crate::request::append_value(&self.lua, &v, "handler result")
            }
            other => Err(Error::external(BadResult(crate::request::type_name(
                &other,
            )))),
        }
    }

    fn begin(&self, output_limit: usize, active: bool) {
        let _ = lock_ctx(&self.ctx, |ctx| {
            ctx.begin(output_limit, active);
            Ok(())
        });
    }

    /// Ends a run: drops request-scoped values, records memory and newly loaded modules;
    /// gives the response and the `r:log` messages (and how many were dropped).
    fn end(&mut self) -> (Response, Vec<String>, usize) {
        self.budget.disarm();
        self.budget.note_memory(self.lua.used_memory());
        let (response, logs, logs_dropped, new_files) = lock_ctx(&self.ctx, |ctx| {
            Ok((
                ctx.finish(),
                std::mem::take(&mut ctx.logs),
                std::mem::take(&mut ctx.logs_dropped),
                std::mem::take(&mut ctx.new_files),
            ))
        })
        .unwrap_or_default();
        for file in new_files {
            if !self.files.contains(&file) {
                self.files.push(file);
            }
        }
        (response, logs, logs_dropped)
    }

    /// Turns the outcome of a run into the crate's types: a recorded stop first, then Lua's
    /// out-of-memory error, then the script's error.
    fn classify<T>(&self, result: mlua::Result<T>, limits: &Limits) -> Result<T, Failure> {
        let stop = self.budget.stopped();
        let err = match (result, stop) {
            (Ok(value), None) => return Ok(value),
            (Ok(_), Some(_)) => None,
            (Err(e), _) => Some(e),
        };
        let stop = match (stop, &err) {
            (Some(stop), _) => stop,
            (None, Some(e)) if is_memory_error(e) => Stop::Limit(LimitKind::Memory),
            (None, Some(e)) => {
                return Err(Failure::Script {
                    message: script_message(e),
                })
            }
            (None, None) => unreachable!("an Ok result without a stop returned above"),
        };
        let kind = match stop {
            Stop::Aborted => return Err(Failure::Aborted),
            Stop::Limit(kind) => kind,
        };
        let mut message = match kind {
            LimitKind::Instructions => {
                format!("instruction budget of {} spent", limits.instructions)
            }
            LimitKind::Time => format!("time limit of {} ms exceeded", limits.timeout.as_millis()),
            LimitKind::Memory => format!("memory limit of {} bytes reached", self.memory_limit),
            LimitKind::Output => format!("output limit of {} bytes exceeded", limits.output),
        };
        if let Some(traceback) = err.as_ref().and_then(traceback_of) {
            message.push('\n');
            message.push_str(traceback);
        }
        Err(Failure::Limit { kind, message })
    }

    /// The script and every module file it has loaded (real paths), the script first.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Bytes of Lua heap the state uses now.
    pub fn used_memory(&self) -> usize {
        self.lua.used_memory()
    }

    /// Requests served by this state (every call of [`ScriptState::handle`]).
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The name of the entry function in use (`main`, `handler` or the configured one).
    pub fn entry(&self) -> &str {
        &self.entry_name
    }
}

fn set_probe(lua: &Lua, probe: Option<Function>) {
    if let Ok(Some(mut slot)) = lua.try_app_data_mut::<AbortProbe>() {
        slot.0 = probe;
    }
}

/// The entry function returned something that is not a string, a number or nil.
#[derive(Debug)]
struct BadResult(&'static str);

impl std::fmt::Display for BadResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the entry function returned a {} (expected a string, a number or nil)",
            self.0
        )
    }
}

impl std::error::Error for BadResult {}

/// The message of a script error, without mlua's "runtime error:" decoration, with the Lua
/// traceback where there is one.
fn script_message(e: &Error) -> String {
    match e {
        Error::RuntimeError(message) => message.clone(),
        Error::SyntaxError { message, .. } => message.clone(),
        Error::ExternalError(inner) => inner.to_string(),
        Error::CallbackError { cause, traceback } => {
            let mut cause = cause;
            let mut traceback = traceback;
            while let Error::CallbackError {
                cause: inner,
                traceback: inner_tb,
            } = &**cause
            {
                cause = inner;
                traceback = inner_tb;
            }
            let mut message = script_message(cause);
            if !traceback.is_empty() {
                message.push('\n');
                message.push_str(traceback);
            }
            message
        }
        Error::BadArgument { to, pos, cause, .. } => {
            let to = to.as_deref().unwrap_or("?");
            format!("bad argument #{pos} to '{to}': {}", script_message(cause))
        }
        Error::WithContext { context, cause } => format!("{context}: {}", script_message(cause)),
        other => other.to_string(),
    }
}

/// The innermost Lua traceback carried by `e`.
fn traceback_of(e: &Error) -> Option<&str> {
    match e {
        Error::CallbackError { cause, traceback } => {
            traceback_of(cause).or(Some(traceback.as_str()).filter(|t| !t.is_empty()))
        }
        Error::RuntimeError(message) => message.find("stack traceback:").map(|i| &message[i..]),
        _ => None,
    }
}
