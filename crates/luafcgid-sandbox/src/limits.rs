//! The per-state budget behind the instruction, time, memory and output limits, and the
//! budget hook that enforces the first two.
//!
//! One [`Budget`] is shared (through an `Arc`) by the state's budget hook, the Rust functions
//! exposed to scripts and the limit-aware wrappers of `pcall` and friends. It is re-armed
//! before every run. The VM charges instructions to it (see `vm`) and calls the hook when a
//! grant of at most [`BUDGET_PERIOD`] units is spent or the watchdog interrupts the run (every
//! `vm::TICK`); the hook counts, checks the instruction budget, the deadline and the abort
//! flag, and grants more. Once something trips the budget, the trip is sticky until the next
//! arm: no unit is granted any more, so the hook raises at the next call, return or loop
//! iteration, and every wrapper re-raises, so a script cannot catch its way past a limit.
//! Classification is by the tripped flag, never by error text.
//!
//! The hook does not see the request's abort flag directly (the hook must be `'static`, the
//! flag is borrowed); it asks a request-scoped probe function, at most once per
//! [`PROBE_INTERVAL`] of wall-clock time.

use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed,
};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mlua::{Function, Lua, VmState};

use crate::vm::{thread_slot, Slot, VmBudget};
use crate::{LimitKind, Limits, BUDGET_PERIOD};

/// A run longer than this gives up CPU priority (its thread goes under `SCHED_IDLE` until
/// the run ends, where the process may restore it): short requests on other threads then
/// win the CPU when they wake up, so one tenant's long runs cannot slow down everyone
/// else's short ones. Short, because every millisecond a long run spends at normal
/// priority delays whatever shares its CPU (two system calls per long run are the cost).
pub(crate) const LONG_RUN: Duration = Duration::from_millis(2);

/// Instructions a run must have counted, beyond lasting [`LONG_RUN`], to be reported long
/// ([`crate::Report::long`]): about what a millisecond of plain Lua executes on a slow CPU,
/// so a short run whose thread was only waiting for a CPU is not taken for a long one.
pub(crate) const LONG_RUN_INSTRUCTIONS: u64 = 100_000;

/// How often, at most, the hook asks whether the request was aborted (and so about how
/// much of a run a client that left before it started can cost).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(1);

/// Why a run was stopped: a limit, or the abort flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Limit(LimitKind),
    Aborted,
}

impl Stop {
    fn code(self) -> u8 {
        match self {
            Stop::Limit(LimitKind::Instructions) => 1,
            Stop::Limit(LimitKind::Time) => 2,
            Stop::Limit(LimitKind::Memory) => 3,
            Stop::Limit(LimitKind::Output) => 4,
            Stop::Aborted => 5,
        }
    }

    fn from_code(code: u8) -> Option<Stop> {
        Some(match code {
            1 => Stop::Limit(LimitKind::Instructions),
            2 => Stop::Limit(LimitKind::Time),
            3 => Stop::Limit(LimitKind::Memory),
            4 => Stop::Limit(LimitKind::Output),
            5 => Stop::Aborted,
            _ => return None,
        })
    }

    /// The error raised into Lua when a run is stopped.
    pub(crate) fn error(self) -> mlua::Error {
        mlua::Error::external(self)
    }
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stop::Limit(LimitKind::Instructions) => "instruction limit reached",
            Stop::Limit(LimitKind::Time) => "time limit reached",
            Stop::Limit(LimitKind::Memory) => "memory limit reached",
            Stop::Limit(LimitKind::Output) => "output limit reached",
            Stop::Aborted => "request aborted",
        })
    }
}

impl std::error::Error for Stop {}

/// The function the hook calls to read the abort flag during a script's first run (a request
/// is asked directly, see `probe_abort`). Stored as app data of the state while that run
/// is armed, `None` otherwise.
#[derive(Default)]
pub(crate) struct AbortProbe(pub(crate) Option<Function>);

/// Shared, per-state budget of the current run. All fields are atomics only so that the hook
/// closure is `Send`; one thread at a time uses a state, so `Relaxed` is enough.
#[derive(Debug)]
pub(crate) struct Budget {
    epoch: Instant,
    /// Instructions counted so far, up to the current grant.
    counted: AtomicU64,
    /// The slot the VM charges during a run (null between runs).
    slot: AtomicPtr<Slot>,
    /// Units in the current grant.
    granted: AtomicI64,
    /// The state's side of the VM budget, set once the state exists.
    vm: OnceLock<VmBudget>,
    /// When the current run started, in nanoseconds since `epoch`.
    started: AtomicU64,
    /// The scheduling policy to give the thread back at the end of the run, plus 100 (0:
    /// the thread's priority was not lowered).
    lowered: AtomicI64,
    /// The hook saw this run go on past [`LONG_RUN`] with the work of a long run ([`is_long`]).
    long: AtomicBool,
    /// Instruction budget; `u64::MAX` = none.
    instructions: AtomicU64,
    /// Deadline in nanoseconds since `epoch`; `u64::MAX` = none.
    deadline: AtomicU64,
    /// When the hook next asks the abort probe, in nanoseconds since `epoch`.
    next_probe: AtomicU64,
    /// `Stop::code` of the first stop of this run, 0 while running.
    tripped: AtomicU8,
    /// Highest Lua heap size seen during this run.
    peak: AtomicUsize,
    /// The state's memory limit in bytes; 0 = none. Bounds the work single C calls may do.
    memory_limit: AtomicUsize,
}

impl Budget {
    pub(crate) fn new() -> Budget {
        Budget {
            epoch: Instant::now(),
            counted: AtomicU64::new(0),
            slot: AtomicPtr::new(std::ptr::null_mut()),
            granted: AtomicI64::new(0),
            vm: OnceLock::new(),
            started: AtomicU64::new(0),
            lowered: AtomicI64::new(0),
            long: AtomicBool::new(false),
            instructions: AtomicU64::new(u64::MAX),
            deadline: AtomicU64::new(u64::MAX),
            next_probe: AtomicU64::new(0),
            tripped: AtomicU8::new(0),
            peak: AtomicUsize::new(0),
            memory_limit: AtomicUsize::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Re-arms the budget for a new run under `limits`.
    pub(crate) fn arm(&self, limits: &Limits, memory_now: usize) {
        let now = self.now();
        let instructions = match limits.instructions {
            0 => u64::MAX,
            n => n,
        };
        let deadline = if limits.timeout.is_zero() {
            u64::MAX
        } else {
            let timeout = u64::try_from(limits.timeout.as_nanos()).unwrap_or(u64::MAX);
            now.saturating_add(timeout)
        };
        self.counted.store(0, Relaxed);
        self.instructions.store(instructions, Relaxed);
        self.deadline.store(deadline, Relaxed);
        self.next_probe
            .store(now + PROBE_INTERVAL.as_nanos() as u64, Relaxed);
        self.tripped.store(0, Relaxed);
        self.peak.store(memory_now, Relaxed);
        self.started.store(now, Relaxed);
        self.long.store(false, Relaxed);
        if let Some(vm) = self.vm.get() {
            let slot = thread_slot();
            let grant = self.next_grant(0);
            self.granted.store(grant, Relaxed);
            slot.grant(grant);
            self.slot
                .store(std::ptr::from_ref(slot).cast_mut(), Relaxed);
            vm.attach(slot);
        }
    }

    /// Ends a run: counts the rest of the grant and detaches the VM.
    pub(crate) fn disarm(&self) {
        let lowered = self.lowered.swap(0, Relaxed);
        if lowered != 0 {
            crate::vm::restore_thread_priority((lowered - 100) as i32);
        }
        if let (Some(vm), Some(slot)) = (self.vm.get(), self.current_slot()) {
            self.settle(slot);
            vm.detach(slot);
            self.slot.store(std::ptr::null_mut(), Relaxed);
        }
    }

    fn current_slot(&self) -> Option<&'static Slot> {
        // SAFETY-free: the pointer is null or comes from a `&'static Slot` (see `arm`).
        let ptr = self.slot.load(Relaxed);
        crate::vm::slot_ref(ptr)
    }

    /// Moves what the VM used of the current grant into `counted` and empties the grant.
    fn settle(&self, slot: &Slot) {
        let used = self.granted.load(Relaxed) - slot.left();
        let used = u64::try_from(used).unwrap_or(0);
        self.counted
            .store(self.counted.load(Relaxed).saturating_add(used), Relaxed);
        self.granted.store(0, Relaxed);
        slot.grant(0);
    }

    /// The next grant: the period, or what is left of the instruction budget if less (at
    /// least one unit, so the hook comes back and raises).
    fn next_grant(&self, counted: u64) -> i64 {
        let left = self
            .instructions
            .load(Relaxed)
            .saturating_sub(counted)
            .max(1);
        i64::try_from(left.min(BUDGET_PERIOD)).unwrap_or(i64::MAX)
    }

    /// The stop of the current run, if any.
    pub(crate) fn stopped(&self) -> Option<Stop> {
        Stop::from_code(self.tripped.load(Relaxed))
    }

    /// Errors if the run was stopped.
    #[inline]
    pub(crate) fn check(&self) -> mlua::Result<()> {
        match self.stopped() {
            None => Ok(()),
            Some(stop) => Err(stop.error()),
        }
    }

    /// Records `stop` (unless the run was already stopped, then the first cause stays) and
    /// returns the error to raise.
    pub(crate) fn trip(&self, stop: Stop) -> mlua::Error {
        let _ = self
            .tripped
            .compare_exchange(0, stop.code(), Relaxed, Relaxed);
        self.stopped().unwrap_or(stop).error()
    }

    /// Errors if the run was stopped or its deadline has passed (then records the time
    /// limit). For Rust code and wrappers that do long work between two hook calls.
    pub(crate) fn step(&self) -> mlua::Result<()> {
        self.check()?;
        if self.now() >= self.deadline.load(Relaxed) {
            return Err(self.trip(Stop::Limit(LimitKind::Time)));
        }
        Ok(())
    }

    pub(crate) fn set_memory_limit(&self, bytes: usize) {
        self.memory_limit.store(bytes, Relaxed);
    }

    /// The state's memory limit in bytes; 0 = none.
    pub(crate) fn memory_limit(&self) -> usize {
        self.memory_limit.load(Relaxed)
    }

    /// Instructions counted in this run so far.
    pub(crate) fn instructions(&self) -> u64 {
        let in_grant = self
            .current_slot()
            .map_or(0, |slot| self.granted.load(Relaxed) - slot.left());
        self.counted
            .load(Relaxed)
            .saturating_add(u64::try_from(in_grant).unwrap_or(0))
    }

    pub(crate) fn note_memory(&self, bytes: usize) {
        self.peak.fetch_max(bytes, Relaxed);
    }

    /// Whether the hook saw the last run be a long one ([`is_long`]).
    pub(crate) fn was_long(&self) -> bool {
        self.long.load(Relaxed)
    }

    pub(crate) fn peak_memory(&self) -> usize {
        self.peak.load(Relaxed)
    }

    /// The budget hook: runs when a grant is spent or the watchdog interrupts the run, in
    /// whichever coroutine is running. Grants nothing once the run is stopped.
    fn on_hook(&self, lua: &Lua) -> mlua::Result<VmState> {
        let Some(slot) = self.current_slot() else {
            return Ok(VmState::Continue);
        };
        self.settle(slot);
        let now = self.count(0)?;
        self.note_memory(lua.used_memory());
        let elapsed = now.saturating_sub(self.started.load(Relaxed));
        if self.lowered.load(Relaxed) == 0 && elapsed > LONG_RUN.as_nanos() as u64 {
            if let Some(policy) = crate::vm::lower_thread_priority() {
                self.lowered.store(i64::from(policy) + 100, Relaxed);
            }
        }
        if !self.long.load(Relaxed) && is_long(elapsed, self.counted.load(Relaxed)) {
            self.long.store(true, Relaxed);
        }
        self.probe(lua, now)?;
        let grant = self.next_grant(self.counted.load(Relaxed));
        self.granted.store(grant, Relaxed);
        slot.grant(grant);
        Ok(VmState::Continue)
    }

    /// Counts `n` instructions and checks the instruction budget and the deadline; returns
    /// the time it checked against.
    fn count(&self, n: u64) -> mlua::Result<u64> {
        self.check()?;
        if n > 0 {
            let counted = self.counted.load(Relaxed).saturating_add(n);
            self.counted.store(counted, Relaxed);
        }
        if self.instructions() > self.instructions.load(Relaxed) {
            return Err(self.trip(Stop::Limit(LimitKind::Instructions)));
        }
        let now = self.now();
        if now >= self.deadline.load(Relaxed) {
            return Err(self.trip(Stop::Limit(LimitKind::Time)));
        }
        Ok(now)
    }

    /// Asks the abort probe, at most once per [`PROBE_INTERVAL`]; in a long run, the probe
    /// may first pause the run ([`crate::ClientProbe::pause`]).
    fn probe(&self, lua: &Lua, now: u64) -> mlua::Result<()> {
        if now >= self.next_probe.load(Relaxed) {
            self.next_probe
                .store(now + PROBE_INTERVAL.as_nanos() as u64, Relaxed);
            if probe_abort(lua, self.long.load(Relaxed))? {
                return Err(self.trip(Stop::Aborted));
            }
        }
        Ok(())
    }
}

/// Whether a run that has lasted `elapsed_ns` and counted `instructions` is a long one. Long by
/// the clock alone may only mean that its thread waited for a CPU: it must also have done
/// the work of a long run.
fn is_long(elapsed_ns: u64, instructions: u64) -> bool {
    elapsed_ns > LONG_RUN.as_nanos() as u64 && instructions >= LONG_RUN_INSTRUCTIONS
}

/// Whether the run should stop because its client went away (in a `long` run, after the
/// pause the client probe asks for, if any): for a request, asked of the request itself;
/// for a script's first run, of the probe function that run installed.
fn probe_abort(lua: &Lua, long: bool) -> mlua::Result<bool> {
    let op = if long {
        crate::request::OP_PAUSE_ABORT
    } else {
        crate::request::OP_ABORT
    };
    // The context is only ever borrowed briefly; a borrow in progress (the hook firing
    // inside a helper that holds it) skips this probe, the next one asks.
    let request = match lua.try_app_data_ref::<crate::request::SharedCtx>() {
        Ok(Some(cell)) => match cell.try_lock() {
            Ok(ctx) => ctx.request.clone(),
            Err(_) => return Ok(false),
        },
        _ => return Ok(false),
    };
    if let Some(request) = request {
        return Ok(matches!(
            crate::request::input(lua, &request, op, None)?,
            mlua::Value::Boolean(true)
        ));
    }
    let probe = match lua.try_app_data_ref::<AbortProbe>() {
        Ok(Some(probe)) => probe.0.clone(),
        _ => None,
    };
    match probe {
        Some(probe) => probe.call::<bool>(op),
        None => Ok(false),
    }
}

/// Installs the budget hook of `budget` on `lua`: it runs in whichever coroutine is running
/// when the VM calls it.
pub(crate) fn install_hook(lua: &Lua, budget: std::sync::Arc<Budget>) -> mlua::Result<()> {
    let hooked = std::sync::Arc::clone(&budget);
    let vm = VmBudget::install(lua, move |lua, _debug| hooked.on_hook(lua))?;
    budget
        .vm
        .set(vm)
        .map_err(|_| mlua::Error::runtime("the budget hook is already installed"))
}

/// Whether `err` (a Lua error value) is Lua's out-of-memory error.
pub(crate) fn is_memory_error_value(err: &mlua::Value) -> bool {
    match err {
        mlua::Value::String(s) => s.as_bytes() == b"not enough memory".as_slice(),
        mlua::Value::Error(e) => is_memory_error(e),
        _ => false,
    }
}

/// Whether `err` is, or was caused by, an allocation refused by the memory limit.
pub(crate) fn is_memory_error(err: &mlua::Error) -> bool {
    match err {
        mlua::Error::MemoryError(_) => true,
        // Lua's own message, as it arrives after crossing `coroutine.wrap` (which re-raises it
        // as an ordinary error), possibly followed by a traceback.
        mlua::Error::RuntimeError(msg) => {
            msg == "not enough memory" || msg.starts_with("not enough memory\n")
        }
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        mlua::Error::BadArgument { cause, .. } => is_memory_error(cause),
        mlua::Error::WithContext { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}

impl Budget {
    /// Charges `n` instructions of work done inside one Rust function (the pattern matcher)
    /// and checks the limits as the hook does: the instruction budget, the deadline and, at
    /// most once per [`PROBE_INTERVAL`], the abort flag.
    pub(crate) fn charge(&self, lua: &Lua, n: u64) -> mlua::Result<()> {
        let now = self.count(n)?;
        self.probe(lua, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_long_by_the_clock_and_by_its_work_together() {
        let over = LONG_RUN.as_nanos() as u64 + 1_000_000;
        assert!(is_long(over, LONG_RUN_INSTRUCTIONS));
        assert!(
            !is_long(over, 500),
            "a short run whose thread waited for a CPU is not long"
        );
        assert!(
            !is_long(LONG_RUN.as_nanos() as u64 / 2, 10 * LONG_RUN_INSTRUCTIONS),
            "much work done quickly is not long either"
        );
    }
}
