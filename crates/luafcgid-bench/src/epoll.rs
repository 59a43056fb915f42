//! A minimal, level-triggered epoll wrapper, a one-shot monotonic timer (`timerfd`) to
//! wake an epoll loop at a precise time, the calling thread's timer slack,
//! `sysconf(_SC_CLK_TCK)`, a child process that gets SIGKILL when its parent dies, and
//! SIGINT/SIGTERM/SIGHUP turned into a flag: the only `unsafe` code of the bench tools,
//! each call a thin FFI wrapper.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Readable.
pub const IN: u32 = libc::EPOLLIN as u32;
/// Writable.
pub const OUT: u32 = libc::EPOLLOUT as u32;
/// Hang-up.
pub const HUP: u32 = libc::EPOLLHUP as u32;
/// Error.
pub const ERR: u32 = libc::EPOLLERR as u32;

/// One readiness report: the token given at registration and the event bits.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    /// Token passed to [`Epoll::add`].
    pub token: u64,
    /// `EPOLLIN`, `EPOLLOUT`, `EPOLLHUP`, ... bits.
    pub events: u32,
}

/// An epoll instance.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
    buf: Vec<libc::epoll_event>,
}

impl Epoll {
    /// Creates an instance able to report up to `capacity` events per wait.
    pub fn new(capacity: usize) -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let empty = libc::epoll_event { events: 0, u64: 0 };
        Ok(Epoll {
            fd,
            buf: vec![empty; capacity.max(1)],
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers `fd` for `events`, reported with `token`.
    pub fn add(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, events)
    }

    /// Changes the events (and token) of a registered `fd`.
    pub fn modify(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, events)
    }

    /// Unregisters `fd` (closing it does that too).
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits up to `timeout_ms` (-1: forever) and appends the ready events to
    /// `out` (cleared first). Retries on `EINTR`.
    pub fn wait(&mut self, timeout_ms: i32, out: &mut Vec<Ready>) -> io::Result<()> {
        out.clear();
        let cap = libc::c_int::try_from(self.buf.len()).unwrap_or(libc::c_int::MAX);
        let n = loop {
            // SAFETY: `buf` holds `cap` initialised epoll_events the kernel may overwrite.
            let n = unsafe {
                libc::epoll_wait(self.fd.as_raw_fd(), self.buf.as_mut_ptr(), cap, timeout_ms)
            };
            if n >= 0 {
                break n as usize;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        };
        out.extend(self.buf[..n].iter().map(|e| Ready {
            token: e.u64,
            events: e.events,
        }));
        Ok(())
    }
}

/// A one-shot `CLOCK_MONOTONIC` timer descriptor (non-blocking): readable once it has
/// expired. Register it with [`Epoll::add`] for [`IN`] to wake a loop at a precise time
/// (epoll's own timeout counts whole milliseconds).
#[derive(Debug)]
pub struct Timer {
    fd: OwnedFd,
}

impl Timer {
    /// Creates a disarmed timer.
    pub fn new() -> io::Result<Timer> {
        // SAFETY: timerfd_create takes no pointers; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Timer { fd })
    }

    /// Arms the timer to expire once, `after` from now (`None`: disarms it). Either way a
    /// pending expiry is cleared, so the descriptor is no longer readable until the next.
    pub fn set(&self, after: Option<Duration>) -> io::Result<()> {
        let value = match after {
            // A zero it_value would disarm: expire after 1 ns instead.
            Some(d) => libc::timespec {
                tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
                // Below 10^9: fits a c_long everywhere.
                tv_nsec: d.subsec_nanos().max(u32::from(d.is_zero())) as libc::c_long,
            },
            None => libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: `spec` is a valid itimerspec for the call; the old value is not asked for.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Sets the calling thread's timer slack (how late the kernel may fire its timers to
/// batch wake-ups; 50 µs by default) to `slack`, at least 1 ns.
pub fn set_timer_slack(slack: Duration) -> io::Result<()> {
    let ns = libc::c_ulong::try_from(slack.as_nanos().max(1)).unwrap_or(libc::c_ulong::MAX);
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns, 0, 0, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the child that `command` starts get SIGKILL when the thread that starts it ends
/// (`PR_SET_PDEATHSIG`): a benchmark killed before it can stop its daemon takes the daemon
/// with it.
/// The CPU set of `cpus` (those past `CPU_SETSIZE` are left out).
fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c < libc::CPU_SETSIZE as usize {
            // SAFETY: `c` is within the set's size.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
    }
    set
}

/// Makes `command`'s process (and every thread it starts) run only on `cpus`.
pub fn pin_command<'a>(command: &'a mut Command, cpus: &[usize]) -> &'a mut Command {
    let set = cpu_set(cpus);
    // SAFETY: the closure runs in the child between fork and exec and only makes the
    // sched_setaffinity system call on a set prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Makes the calling thread (and the threads it starts afterwards) run only on `cpus`.
pub fn pin_this_thread(cpus: &[usize]) -> io::Result<()> {
    let set = cpu_set(cpus);
    // SAFETY: `set` is a valid cpu_set_t of the size given.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn kill_with_parent(command: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl,
    // which is async-signal-safe, with integer arguments.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT, SIGTERM and SIGHUP set a flag ([`interrupted`]) instead of ending
/// the process, so that a benchmark can stop its load, its daemon and remove its files
/// first. Interrupted system calls are restarted.
pub fn catch_interrupts() -> io::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic,
        // which is async-signal-safe; no old action is read back.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = note_interrupt as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether one of the signals [`catch_interrupts`] catches has arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// `sysconf(_SC_CLK_TCK)`: the unit of `/proc/PID/stat` CPU times.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf takes no pointers and has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_timer_wakes_epoll_and_rearming_clears_it() {
        let mut ep = Epoll::new(4).unwrap();
        let timer = Timer::new().unwrap();
        ep.add(timer.as_raw_fd(), 7, IN).unwrap();
        set_timer_slack(Duration::from_micros(1)).unwrap();
        let mut out = Vec::new();
        let started = Instant::now();
        timer.set(Some(Duration::from_millis(3))).unwrap();
        ep.wait(1000, &mut out).unwrap();
        let waited = started.elapsed();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].token, 7);
        assert!(waited >= Duration::from_millis(3), "{waited:?}");
        assert!(waited < Duration::from_millis(500), "{waited:?}");
        // Level-triggered: still readable until re-armed or disarmed.
        ep.wait(0, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        timer.set(None).unwrap();
        ep.wait(0, &mut out).unwrap();
        assert!(out.is_empty());
        timer.set(Some(Duration::ZERO)).unwrap();
        ep.wait(1000, &mut out).unwrap();
        assert_eq!(out.len(), 1);
    }
}
