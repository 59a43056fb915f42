//! The VM's instruction budget, the watchdog that interrupts long runs, and the call of a
//! handler-form entry function: the only module of this crate that touches Lua's C API
//! directly.
//!
//! The vendored Lua carries a small patch (`vendor/lua-src/PATCHES.md`): the VM charges units
//! to a budget at function entries, returns and backward jumps, and when the budget is spent
//! or an interrupt flag is set it calls the state's budget hook once, at the next
//! instruction. Nothing runs per instruction, so, unlike a Lua count hook (which sends every
//! instruction down the VM's slow path and doubles the run time of tight loops), an armed
//! budget costs a few percent. The budget's two integers live in a [`Slot`] of the thread
//! running the state: one per thread, in a static table, so the watchdog may write to any of
//! them at any time without a lock and without a pointer that could dangle.
//!
//! The watchdog is one thread per process. While any slot is active it sets every active
//! slot's interrupt flag every [`TICK`], so the hook (which checks the deadline and the abort
//! flag) runs at least that often even in code that charges the budget rarely, such as a
//! loop of expensive C calls. It parks when no run has been active for a while and a run
//! start wakes it.
//!
//! It also sets threads' scheduling policies: a long run's thread goes under `SCHED_IDLE`
//! and back, and a daemon may put its threads under `SCHED_BATCH`, which the watchdog (and
//! any thread that calls [`leave_batch_scheduling`]) leaves.
//!
//! What it does not do: decide anything. The hook (in `limits`) counts, compares and raises;
//! this module only moves units and flags between the VM and the hook.

#![allow(unsafe_code)]

use std::cell::Cell;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use mlua::{ffi, HookTriggers, LightUserData, Lua, Table, Value};

unsafe extern "C-unwind" {
    /// Points the VM's budget at `budget` (two integers: units left, interrupt flag) and
    /// names the hook to call when it is spent; NULL `budget` detaches it. Part of the patch
    /// to the vendored Lua.
    fn lua_setbudget(l: *mut ffi::lua_State, f: Option<ffi::lua_Hook>, budget: *mut i64);
}

/// How often the watchdog interrupts every active run.
pub(crate) const TICK: Duration = Duration::from_millis(2);

/// How many idle ticks the watchdog waits before it parks.
const IDLE_TICKS: u32 = 500;

/// Slots in the static table; threads beyond that get a private slot the watchdog does not
/// see (their runs still stop at the instruction budget and, at every refill, the deadline).
const SLOTS: usize = 1024;

/// One thread's budget: the two integers the VM reads and writes (`left`, `interrupt`, in
/// this order, as the patch expects), and whether a run is active on the thread.
#[repr(C, align(128))]
pub(crate) struct Slot {
    left: AtomicI64,
    interrupt: AtomicI64,
    active: AtomicBool,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            left: AtomicI64::new(i64::MAX),
            interrupt: AtomicI64::new(0),
            active: AtomicBool::new(false),
        }
    }

    /// Units left in the current grant (zero or less when spent).
    pub(crate) fn left(&self) -> i64 {
        self.left.load(Ordering::Relaxed)
    }

    /// Grants `units` more and clears the interrupt flag.
    pub(crate) fn grant(&self, units: i64) {
        self.interrupt.store(0, Ordering::Relaxed);
        self.left.store(units, Ordering::Relaxed);
    }

    fn as_budget(&self) -> *mut i64 {
        // `AtomicI64` has the layout of `i64`; the VM accesses both words atomically.
        self.left.as_ptr()
    }
}

static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
/// Slots ever handed out: the watchdog scans `TABLE[..HIGH]`.
static HIGH: AtomicUsize = AtomicUsize::new(0);
/// Slots released by threads that ended.
static FREE: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// A thread's claim on a slot, given back when the thread ends.
struct Claim(&'static Slot, Option<usize>);

impl Claim {
    fn new() -> Claim {
        let reused = FREE.lock().map(|mut free| free.pop()).unwrap_or(None);
        let index = reused.or_else(|| {
            HIGH.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < SLOTS).then_some(n + 1)
            })
            .ok()
        });
        match index {
            Some(i) => Claim(&TABLE[i], Some(i)),
            None => Claim(Box::leak(Box::new(Slot::new())), None),
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.active.store(false, Ordering::SeqCst);
        if let (Some(i), Ok(mut free)) = (self.1, FREE.lock()) {
            free.push(i);
        }
    }
}

thread_local! {
    static CLAIM: Claim = Claim::new();
    static CLAIMED: Cell<Option<&'static Slot>> = const { Cell::new(None) };
}

/// The calling thread's slot.
pub(crate) fn thread_slot() -> &'static Slot {
    if let Some(slot) = CLAIMED.with(Cell::get) {
        return slot;
    }
    let slot = CLAIM.with(|c| c.0);
    CLAIMED.with(|c| c.set(Some(slot)));
    slot
}

/// The slot behind `ptr`, a pointer made from a `&'static Slot` (or null).
pub(crate) fn slot_ref(ptr: *mut Slot) -> Option<&'static Slot> {
    // SAFETY: callers store only null or pointers obtained from `&'static Slot`.
    unsafe { ptr.cast_const().as_ref() }
}

/// The budget side of one Lua state: its main thread and the hook the VM calls.
#[derive(Debug)]
pub(crate) struct VmBudget {
    state: *mut ffi::lua_State,
    hook: Option<ffi::lua_Hook>,
}

// SAFETY: the pointers are used only by the thread that holds the state's `ScriptState`
// (`&mut`), one thread at a time; they are never dereferenced by this crate.
unsafe impl Send for VmBudget {}
unsafe impl Sync for VmBudget {}

impl VmBudget {
    /// Registers `callback` as the state's budget hook. The hook stays detached until
    /// [`VmBudget::attach`].
    pub(crate) fn install<F>(lua: &Lua, callback: F) -> mlua::Result<VmBudget>
    where
        F: Fn(&Lua, &mlua::debug::Debug) -> mlua::Result<mlua::VmState> + Send + 'static,
    {
        // Let mlua store the callback and install its global hook procedure (which finds the
        // callback from any coroutine of the state and turns its errors into Lua errors),
        // then take that procedure off the count hook and hand it to the budget instead.
        lua.set_global_hook(HookTriggers::new().every_nth_instruction(1), callback)?;
        let mut state = std::ptr::null_mut();
        let mut hook = None;
        // SAFETY: runs on the state's own thread, inside mlua's protected call; reads and
        // clears the main thread's hook.
        unsafe {
            lua.exec_raw::<()>((), |l| {
                hook = ffi::lua_gethook(l);
                ffi::lua_sethook(l, None, 0, 0);
                state = l;
            })?;
        }
        if hook.is_none() {
            return Err(mlua::Error::runtime("the budget hook was not installed"));
        }
        Ok(VmBudget { state, hook })
    }

    /// Points the VM's budget at `slot` for a run and wakes the watchdog.
    pub(crate) fn attach(&self, slot: &'static Slot) {
        // SAFETY: `state` is this state's main thread, alive as long as `self` (owned by the
        // state's budget); the VM is not running (we are between two calls into it on the
        // thread that owns it); `slot` is 'static.
        unsafe { lua_setbudget(self.state, self.hook, slot.as_budget()) };
        slot.active.store(true, Ordering::SeqCst);
        watchdog().wake_if_parked();
    }

    /// Detaches the VM's budget from `slot` at the end of a run.
    pub(crate) fn detach(&self, slot: &'static Slot) {
        slot.active.store(false, Ordering::Relaxed);
        // SAFETY: as in `attach`.
        unsafe { lua_setbudget(self.state, None, std::ptr::null_mut()) };
    }
}

/// What calling a script's entry function gave.
pub(crate) enum Called {
    /// It returned this (its first result; nil when it returned none). A string result was
    /// handed to the caller's sink instead and shows here as nil.
    Returned(Value),
    /// It raised this error, as `Function::call` would have given it.
    Raised(mlua::Error),
    /// The entry name is not bound to a function.
    Missing,
}

/// Puts a Lua stack back to its height when dropped, even when a panic unwinds.
struct StackTop(*mut ffi::lua_State, c_int);

impl Drop for StackTop {
    fn drop(&mut self) {
        // SAFETY: the state is alive (its `Lua` is borrowed by the caller) and the height
        // was read from it on this thread.
        unsafe { ffi::lua_settop(self.0, self.1) };
    }
}

/// The message handler of an entry call: what mlua's own handler does for
/// `Function::call`, so that messages read the same. A full userdata is one of mlua's
/// wrapped Rust errors (scripts cannot make full userdata) and is kept as it is; anything
/// else becomes its string with a traceback.
unsafe extern "C-unwind" fn entry_traceback(state: *mut ffi::lua_State) -> c_int {
    if ffi::lua_checkstack(state, 2) == 0 || ffi::lua_type(state, -1) == ffi::LUA_TUSERDATA {
        return 1;
    }
    let s = ffi::luaL_tolstring(state, -1, std::ptr::null_mut());
    if ffi::lua_checkstack(state, ffi::LUA_TRACEBACK_STACK) != 0 {
        ffi::luaL_traceback(state, state, s, 0);
        ffi::lua_remove(state, -2);
    }
    1
}

/// Calls `globals[name](arg)`, the entry function of the handler form, and hands a string
/// result to `sink` without making a Lua reference of it.
///
/// It does what `globals.raw_get(name)` and `Function::call` would, without the two
/// references to the function and to the result that mlua makes and drops again, nor the
/// stack guards of two calls: about 1,150 instructions of the 2,950 a hello-world run took.
/// Only `lua_pcall` runs Lua code here; the other calls neither raise nor allocate, so no
/// outer protected call is needed.
pub(crate) fn call_entry(
    lua: &Lua,
    globals: &Table,
    name: &mlua::LuaString,
    arg: LightUserData,
    sink: impl FnOnce(&[u8]) -> mlua::Result<()>,
) -> mlua::Result<Called> {
    lua.exec_raw_lua(|raw| {
        let state = raw.state();
        // SAFETY: the state is locked for this thread by `exec_raw_lua`; every index used is
        // above `top`, pushed here; the guard drops what is left, on every path.
        unsafe {
            let top = StackTop(state, ffi::lua_gettop(state));
            if ffi::lua_checkstack(state, 5) == 0 {
                return Err(mlua::Error::StackError);
            }
            raw.push(globals)?;
            raw.push(name)?;
            if ffi::lua_rawget(state, -2) != ffi::LUA_TFUNCTION {
                return Ok(Called::Missing);
            }
            ffi::lua_pushcfunction(state, entry_traceback);
            ffi::lua_rotate(state, -2, 1);
            ffi::lua_pushlightuserdata(state, arg.0);
            let code = ffi::lua_pcall(state, 1, 1, top.1 + 2);
            if code == ffi::LUA_OK {
                if ffi::lua_type(state, -1) == ffi::LUA_TSTRING {
                    let mut len = 0;
                    let ptr = ffi::lua_tolstring(state, -1, &mut len);
                    // The string stays on the stack (so alive) until the guard drops it.
                    sink(std::slice::from_raw_parts(ptr.cast::<u8>(), len))?;
                    return Ok(Called::Returned(Value::Nil));
                }
                return Ok(Called::Returned(raw.pop_value()));
            }
            // What mlua's `pop_error` makes of the error on the stack; a wrapped Rust error
            // comes back as it was raised (and a wrapped panic resumes, in `pop_value`).
            let error = match raw.pop_value() {
                Value::Error(e) => *e,
                value => {
                    let message = match value {
                        Value::String(s) => s.to_string_lossy(),
                        Value::Integer(i) => i.to_string(),
                        Value::Number(n) => n.to_string(),
                        other => format!("<{}>", other.type_name()),
                    };
                    if code == ffi::LUA_ERRMEM {
                        mlua::Error::MemoryError(message)
                    } else {
                        mlua::Error::RuntimeError(message)
                    }
                }
            };
            Ok(Called::Raised(error))
        }
    })
}

/// The process's watchdog thread (`None` if it could not be started: runs then still stop
/// at the instruction budget, and check the deadline at every refill).
struct Watchdog {
    thread: Option<Thread>,
    parked: AtomicBool,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| Watchdog {
        thread: std::thread::Builder::new()
            .name("luafcgid-watchdog".into())
            .spawn(watch)
            .ok()
            .map(|handle| handle.thread().clone()),
        parked: AtomicBool::new(false),
    })
}

impl Watchdog {
    fn wake_if_parked(&self) {
        if self.parked.load(Ordering::SeqCst) {
            if let Some(thread) = &self.thread {
                thread.unpark();
            }
        }
    }
}

fn any_active() -> bool {
    let high = HIGH.load(Ordering::Acquire);
    TABLE[..high]
        .iter()
        .any(|s| s.active.load(Ordering::SeqCst))
}

/// The watchdog's loop: interrupt every active run each tick; park when idle.
fn watch() {
    // Under the normal policy even in a daemon that runs its threads as a batch: a run must
    // be interrupted at its time limit, not when the task on the CPU ends its slice.
    leave_batch_scheduling();
    let mut idle = 0u32;
    loop {
        std::thread::sleep(TICK);
        let high = HIGH.load(Ordering::Acquire);
        let mut active = false;
        for slot in &TABLE[..high] {
            if slot.active.load(Ordering::Relaxed) {
                slot.interrupt.store(1, Ordering::Relaxed);
                active = true;
            }
        }
        idle = if active { 0 } else { idle + 1 };
        if idle >= IDLE_TICKS {
            let dog = watchdog();
            dog.parked.store(true, Ordering::SeqCst);
            // A run that started after the scan above either sees `parked` and unparks us,
            // or is seen here.
            if !any_active() {
                std::thread::park();
            }
            dog.parked.store(false, Ordering::SeqCst);
            idle = 0;
        }
    }
}

/// Whether this process can take a thread out of `SCHED_IDLE` again (root, or an
/// `RLIMIT_NICE` that allows its nice value), found once on a throwaway thread. Without it,
/// a long run keeps its priority: lowering it for good would slow every later request of
/// that thread.
fn can_restore_priority() -> bool {
    static CAN: OnceLock<bool> = OnceLock::new();
    *CAN.get_or_init(|| {
        std::thread::Builder::new()
            .name("luafcgid-sched-probe".into())
            .spawn(|| {
                let tid = current_tid();
                set_thread_policy(tid, libc::SCHED_IDLE)
                    && set_thread_policy(tid, libc::SCHED_OTHER)
            })
            .ok()
            .and_then(|h| h.join().ok())
            .unwrap_or(false)
    })
}

fn current_tid() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

fn set_thread_policy(tid: libc::pid_t, policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: changes the scheduling policy of one of this process's threads; `param` is
    // valid for the call.
    unsafe { libc::sched_setscheduler(tid, policy, &param) == 0 }
}

fn current_policy(tid: libc::pid_t) -> libc::c_int {
    // SAFETY: reads the policy of one of this process's threads.
    unsafe { libc::sched_getscheduler(tid) }
}

/// Puts the calling thread under `SCHED_BATCH`, which the threads it starts afterwards
/// inherit: when one of them wakes, it does not preempt the task running on its CPU but
/// waits for that task's slice to end (or for it to sleep). A thread under any policy but
/// the normal one is left as it is. Any thread may do this to itself without privilege.
pub fn set_batch_scheduling() -> std::io::Result<()> {
    let tid = current_tid();
    if current_policy(tid) != libc::SCHED_OTHER {
        return Ok(());
    }
    if set_thread_policy(tid, libc::SCHED_BATCH) {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Takes the calling thread from `SCHED_BATCH` back to the normal policy (any other policy
/// is left as it is): for the threads whose wake-ups must not wait, such as the watchdog.
pub fn leave_batch_scheduling() {
    let tid = current_tid();
    if current_policy(tid) == libc::SCHED_BATCH {
        let _ = set_thread_policy(tid, libc::SCHED_OTHER);
    }
}

/// Lowers the calling thread's CPU priority while it runs a long request: `SCHED_IDLE`, so
/// it runs only on a CPU nothing else wants, and any other thread that wakes up (another
/// tenant's short request, the front end, the web server) takes that CPU at once, where a
/// higher nice value would still leave it time slices of milliseconds. Returns the policy to
/// restore, or `None` when nothing was changed (a thread under neither the normal policy
/// nor `SCHED_BATCH` is left alone).
pub(crate) fn lower_thread_priority() -> Option<i32> {
    if !can_restore_priority() {
        return None;
    }
    let tid = current_tid();
    let policy = current_policy(tid);
    if policy != libc::SCHED_OTHER && policy != libc::SCHED_BATCH {
        return None;
    }
    set_thread_policy(tid, libc::SCHED_IDLE).then_some(policy)
}

/// Gives the calling thread back the policy `lower_thread_priority` returned.
pub(crate) fn restore_thread_priority(policy: i32) {
    let _ = set_thread_policy(current_tid(), policy);
}
