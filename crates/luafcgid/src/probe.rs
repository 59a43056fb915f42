//! Whether a client is still there, asked from inside Lua's hook while a request runs on a
//! runtime thread (so the connection task cannot watch the socket), and the one thing a
//! long run must do for the runtime.
//!
//! The runtime polls its IO driver only from an idle thread; a thread that took the driver's
//! last events and then runs Lua leaves the other threads asleep, so no connection would be
//! served until it returns. The first time the hook asks (after about a millisecond of Lua),
//! the probe spawns two empty tasks on this thread, which makes the runtime wake an idle
//! thread; that thread takes over the driver. Requests that finish sooner never pay for it.
//!
//! A non-blocking `poll` says whether the peer hung up; for FastCGI, bytes waiting on the
//! socket are peeked (never consumed) and scanned for an `FCGI_ABORT_REQUEST` of the running
//! request. The scan starts at a record boundary because requests only run inline when
//! nothing else was buffered after them. One of three modules with `unsafe` in the daemon:
//! libc calls on a descriptor the caller keeps open for the whole check.
#![allow(unsafe_code)]

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fastcgi_protocol::{parse_header, record_type, Status};
use luafcgid_sandbox::ClientProbe;

/// Most bytes peeked when looking for an abort.
const PEEK_BYTES: usize = 4096;

/// Watches one connection's socket (if any) during one run.
#[derive(Debug)]
pub struct SocketProbe {
    fd: Option<RawFd>,
    /// The FastCGI request id to look for an abort of; `None` for HTTP.
    request_id: Option<u16>,
    handed_off: AtomicBool,
}

impl SocketProbe {
    /// A probe of `fd`, which must stay open while the probe is used.
    pub fn new(fd: RawFd, request_id: Option<u16>) -> SocketProbe {
        SocketProbe {
            fd: Some(fd),
            request_id,
            handed_off: AtomicBool::new(false),
        }
    }

    /// `probe` again for a run of `request_id` on its socket, when nothing else holds it any
    /// more (the run it was made for ended); else a new probe of `fd`, kept in `probe`.
    /// Spares a connection an allocation per request.
    pub fn reuse(probe: &mut Arc<SocketProbe>, fd: RawFd, request_id: Option<u16>) -> Arc<Self> {
        match Arc::get_mut(probe) {
            Some(p) if p.fd == Some(fd) => {
                p.request_id = request_id;
                *p.handed_off.get_mut() = false;
            }
            _ => *probe = Arc::new(SocketProbe::new(fd, request_id)),
        }
        probe.clone()
    }

    /// A probe that watches no socket (the connection task watches it) and only hands the
    /// runtime's driver off during long runs.
    pub fn runtime_only() -> SocketProbe {
        SocketProbe {
            fd: None,
            request_id: None,
            handed_off: AtomicBool::new(false),
        }
    }
}

/// Makes the runtime wake an idle thread: the second task spawned on a busy thread
/// displaces the first from the thread's next-task slot into its stealable queue, and the
/// runtime notifies an idle thread to steal it.
fn wake_an_idle_thread() {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async {});
        handle.spawn(async {});
    }
}

impl ClientProbe for SocketProbe {
    fn gone(&self) -> bool {
        if !self.handed_off.swap(true, Ordering::Relaxed) {
            wake_an_idle_thread();
        }
        self.left()
    }

    fn left(&self) -> bool {
        let Some(fd) = self.fd else {
            return false;
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call; timeout 0 never blocks.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n <= 0 {
            return false;
        }
        if pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            return true;
        }
        if pfd.revents & libc::POLLIN == 0 {
            return false;
        }
        let mut buf = [0u8; PEEK_BYTES];
        // SAFETY: `buf` is writable for its whole length; MSG_PEEK leaves the bytes queued
        // and MSG_DONTWAIT never blocks.
        let got = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match got {
            0 => true,
            n if n < 0 => false,
            n => match self.request_id {
                Some(id) => has_abort(&buf[..n as usize], id),
                None => false,
            },
        }
    }
}

/// Whether the peer of `fd` has sent bytes not read yet (peeked, never consumed; never
/// blocks). A connection uses it at shutdown so a request already sent is still answered.
pub fn bytes_waiting(fd: RawFd) -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: `byte` is writable for its length; MSG_PEEK leaves the bytes queued and
    // MSG_DONTWAIT never blocks. A closed or invalid descriptor gives an error, read as no.
    let got = unsafe {
        libc::recv(
            fd,
            byte.as_mut_ptr().cast(),
            byte.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    got > 0
}

/// Whether `bytes`, starting at a record boundary, hold an ABORT_REQUEST for `id`.
pub fn has_abort(bytes: &[u8], id: u16) -> bool {
    let mut at = 0;
    while let Status::Complete(h) = parse_header(&bytes[at..]) {
        if h.kind == record_type::ABORT_REQUEST && h.request_id == id {
            return true;
        }
        at += h.record_len();
        if at >= bytes.len() {
            break;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastcgi_protocol::client::{encode_abort, encode_get_values};

    #[test]
    fn finds_an_abort_behind_other_records() {
        let mut b = Vec::new();
        encode_get_values(&[b"FCGI_MAX_CONNS"], &mut b);
        encode_abort(7, &mut b);
        assert!(has_abort(&b, 7));
        assert!(!has_abort(&b, 8));
        assert!(
            !has_abort(&b[..b.len() - 3], 7),
            "a cut header is not an abort"
        );
    }

    #[test]
    fn a_probe_is_reused_only_once_no_run_holds_it() {
        use std::os::fd::AsRawFd;
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        let mut spare = Arc::new(SocketProbe::new(fd, None));
        let first = SocketProbe::reuse(&mut spare, fd, Some(1));
        assert!(Arc::ptr_eq(&first, &spare), "nothing held it: reused");
        first.gone();
        let second = SocketProbe::reuse(&mut spare, fd, Some(2));
        assert!(
            !Arc::ptr_eq(&first, &second),
            "the first run still holds its probe"
        );
        assert_eq!(first.request_id, Some(1), "and it is left as it was");
        assert!(first.handed_off.load(Ordering::Relaxed));
        drop((first, second));
        let third = SocketProbe::reuse(&mut spare, fd, Some(3));
        assert!(Arc::ptr_eq(&third, &spare));
        assert_eq!(third.request_id, Some(3));
        assert!(
            !third.handed_off.load(Ordering::Relaxed),
            "a new run hands off anew"
        );
    }

    #[test]
    fn hang_up_is_seen() {
        use std::os::fd::AsRawFd;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let probe = SocketProbe::new(a.as_raw_fd(), Some(1));
        assert!(!probe.gone());
        drop(b);
        assert!(probe.gone());
    }
}
