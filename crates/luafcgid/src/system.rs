//! What the daemon asks of the operating system around its start, for the service manager
//! and the operator: listening sockets handed over by systemd (`LISTEN_FDS`), readiness
//! and state changes told to it (`sd_notify`), and giving up root for the configured
//! `user` and `group` once the sockets are bound and the log is open.
//!
//! It does not bind, serve or read configuration. One of three modules with `unsafe` in the
//! daemon: adopting inherited descriptors and the libc calls that read the user database
//! and switch identity.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::os::fd::{FromRawFd, RawFd};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Most descriptors taken from `LISTEN_FDS` (a larger count is refused as malformed).
const LISTEN_FDS_MAX: usize = 64;

/// A listening socket the daemon was started with.
#[derive(Debug)]
pub enum Inherited {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// The listening sockets passed by a service manager (`LISTEN_PID` naming this process,
/// `LISTEN_FDS` counting descriptors from 3), made non-blocking and close-on-exec. None
/// when the variables are absent or meant for another process. The variables are
/// removed, so nothing started later takes them for its own. A descriptor that is not a
/// listening TCP or unix stream socket is an error.
pub fn inherited_listeners() -> Result<Vec<Inherited>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(Vec::new());
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(Vec::new());
    }
    let n: usize = fds
        .trim()
        .parse()
        .ok()
        .filter(|n| *n <= LISTEN_FDS_MAX)
        .ok_or_else(|| format!("LISTEN_FDS={fds:?} is not a count of descriptors"))?;
    (0..n)
        .map(|i| adopt(LISTEN_FDS_START + i as RawFd))
        .collect()
}

/// Takes ownership of the listening socket `fd`.
fn adopt(fd: RawFd) -> Result<Inherited, String> {
    let int_opt = |level, name| -> Option<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid for writes of the sizes given.
        let r = unsafe {
            libc::getsockopt(
                fd,
                level,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(v)
    };
    let listening = int_opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1);
    let stream = int_opt(libc::SOL_SOCKET, libc::SO_TYPE) == Some(libc::SOCK_STREAM);
    let domain = int_opt(libc::SOL_SOCKET, libc::SO_DOMAIN);
    if !listening || !stream {
        return Err(format!(
            "descriptor {fd} from LISTEN_FDS is not a listening stream socket"
        ));
    }
    // SAFETY: `fd` was passed to this process to own (LISTEN_PID names it), is a
    // listening stream socket (checked above), and is adopted once.
    let inherited = match domain {
        Some(libc::AF_INET | libc::AF_INET6) => {
            Inherited::Tcp(unsafe { std::net::TcpListener::from_raw_fd(fd) })
        }
        Some(libc::AF_UNIX) => {
            Inherited::Unix(unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) })
        }
        _ => {
            return Err(format!(
                "descriptor {fd} from LISTEN_FDS is neither a TCP nor a unix socket"
            ))
        }
    };
    // SAFETY: plain fcntl on a descriptor this process now owns.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    match &inherited {
        Inherited::Tcp(l) => l.set_nonblocking(true),
        Inherited::Unix(l) => l.set_nonblocking(true),
    }
    .map_err(|e| format!("descriptor {fd} from LISTEN_FDS: {e}"))?;
    Ok(inherited)
}

/// Tells the service manager of a state change (`READY=1`, `RELOADING=1`, `STOPPING=1`)
/// when it asked to be told (`NOTIFY_SOCKET`); otherwise does nothing. Failures are
/// reported once on stderr and otherwise ignored: serving never depends on them.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = sent {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| tracing::warn!("cannot notify the service manager: {e}"));
    }
}

/// The `user` and `group` the daemon runs as after start, looked up before anything is
/// bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// Looks up a passwd or group entry by name with the reentrant call `f`, growing the
/// buffer while it says ERANGE. Only the entry's numbers may be read: its strings point
/// into a buffer gone on return.
fn lookup<T: Copy>(
    name: &str,
    what: &str,
    f: impl Fn(&CStr, *mut T, *mut libc::c_char, usize, *mut *mut T) -> libc::c_int,
) -> Result<T, String> {
    let c = CString::new(name).map_err(|_| format!("{what} {name:?}: contains NUL"))?;
    let mut buf = vec![0 as libc::c_char; 1024];
    loop {
        // SAFETY: an all-zero passwd/group is a valid value to be overwritten.
        let mut entry: T = unsafe { std::mem::zeroed() };
        let mut found: *mut T = std::ptr::null_mut();
        let r = f(&c, &mut entry, buf.as_mut_ptr(), buf.len(), &mut found);
        if r == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if r != 0 {
            return Err(format!(
                "{what} {name:?}: {}",
                std::io::Error::from_raw_os_error(r)
            ));
        }
        if found.is_null() {
            return Err(format!("no {what} named {name:?}"));
        }
        return Ok(entry);
    }
}

/// A user's uid and primary gid, by name or number.
fn user_ids(name: &str) -> Result<(libc::uid_t, libc::gid_t), String> {
    if let Ok(uid) = name.parse::<libc::uid_t>() {
        let entry = lookup::<libc::passwd>(
            name,
            "user",
            // SAFETY: every pointer is valid for the call; `buf` is `len` bytes long.
            |_, e, buf, len, found| unsafe { libc::getpwuid_r(uid, e, buf, len, found) },
        );
        // A uid with no passwd entry: its group is the same number.
        return Ok((uid, entry.map_or(uid, |e| e.pw_gid)));
    }
    let e = lookup::<libc::passwd>(
        name,
        "user",
        // SAFETY: every pointer is valid for the call; `buf` is `len` bytes long.
        |c, e, buf, len, found| unsafe { libc::getpwnam_r(c.as_ptr(), e, buf, len, found) },
    )?;
    Ok((e.pw_uid, e.pw_gid))
}

/// A group's gid, by name or number.
fn group_id(name: &str) -> Result<libc::gid_t, String> {
    if let Ok(gid) = name.parse::<libc::gid_t>() {
        return Ok(gid);
    }
    lookup::<libc::group>(
        name,
        "group",
        // SAFETY: every pointer is valid for the call; `buf` is `len` bytes long.
        |c, e, buf, len, found| unsafe { libc::getgrnam_r(c.as_ptr(), e, buf, len, found) },
    )
    .map(|e| e.gr_gid)
}

impl Identity {
    /// The identity `user` (and `group`, else the user's primary group) name; `None` when
    /// neither is set. Names or numbers.
    pub fn lookup(user: Option<&str>, group: Option<&str>) -> Result<Option<Identity>, String> {
        let (uid, primary, name) = match user {
            Some(u) => {
                let (uid, gid) = user_ids(u)?;
                (uid, gid, u.to_string())
            }
            None if group.is_some() => {
                // SAFETY: plain getters.
                let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
                (uid, gid, uid.to_string())
            }
            None => return Ok(None),
        };
        let gid = match group {
            Some(g) => group_id(g)?,
            None => primary,
        };
        Ok(Some(Identity {
            user: name,
            uid,
            gid,
        }))
    }

    /// Gives ownership of a socket file the daemon created to this identity, so it can
    /// still remove it at exit.
    pub fn own(&self, path: &std::path::Path) -> std::io::Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
    }

    /// Switches the whole process (every thread) to this identity: supplementary groups
    /// dropped, then the group, then the user; checked afterwards. Without root, only
    /// the identity the process already has is accepted.
    pub fn assume(&self) -> Result<(), String> {
        // SAFETY: plain getters.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if euid != 0 {
            if (euid, egid) == (self.uid, self.gid) {
                return Ok(());
            }
            return Err(format!(
                "cannot switch to user {} (uid {}, gid {}): not started as root",
                self.user, self.uid, self.gid
            ));
        }
        let gid = self.gid;
        // SAFETY: setgroups with one valid gid; setgid/setuid are process-wide in glibc
        // (applied to every thread).
        let failed = unsafe {
            libc::setgroups(1, &gid) != 0
                || libc::setgid(self.gid) != 0
                || libc::setuid(self.uid) != 0
        };
        if failed {
            return Err(format!(
                "cannot switch to user {}: {}",
                self.user,
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: plain getters.
        let now = unsafe {
            (
                libc::getuid(),
                libc::geteuid(),
                libc::getgid(),
                libc::getegid(),
            )
        };
        if now != (self.uid, self.uid, self.gid, self.gid) {
            return Err(format!("switching to user {} did not take", self.user));
        }
        if self.uid != 0 && unsafe { libc::setuid(0) } == 0 {
            return Err("root could be regained after dropping it".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_names_and_numbers() {
        let root = Identity::lookup(Some("root"), None).unwrap().unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        let by_number = Identity::lookup(Some("0"), Some("0")).unwrap().unwrap();
        assert_eq!((by_number.uid, by_number.gid), (0, 0));
        assert_eq!(Identity::lookup(None, None).unwrap(), None);
        let e = Identity::lookup(Some("no-such-user-here"), None).unwrap_err();
        assert!(e.contains("no user named"), "{e}");
        let e = Identity::lookup(Some("root"), Some("no-such-group-here")).unwrap_err();
        assert!(e.contains("no group named"), "{e}");
        assert!(Identity::lookup(Some("a\0b"), None).is_err());
    }
}
