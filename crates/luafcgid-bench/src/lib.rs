//! Support for the benchmark tools `fcgi-load` (a FastCGI load generator),
//! `fcgi-const` (a constant-answer FastCGI responder, the ceiling of the
//! FastCGI path), `limit-accuracy`, `fairness`, `scale` and `memory` (all four
//! run the real daemon):
//! socket addresses that are either a unix path or `host:port`, a minimal
//! epoll wrapper and timer, running the daemon in a temporary directory
//! ([`daemon`]), and CPU time, resident memory and scheduler waits from `/proc`.
//!
//! Linux only. It is measurement tooling, not part of the daemon: no limits,
//! no timeouts beyond what the tools need, no graceful shutdown.

pub mod daemon;
pub mod epoll;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

/// Where to connect or listen: a unix socket when the address contains a `/`
/// (an optional `unix:` prefix is stripped), else TCP `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A unix socket path.
    Unix(String),
    /// A TCP `host:port`.
    Tcp(String),
}

impl Address {
    /// Classifies `s` as described on [`Address`].
    pub fn parse(s: &str) -> Address {
        let path = s.strip_prefix("unix:").unwrap_or(s);
        if path.contains('/') {
            Address::Unix(path.to_owned())
        } else {
            Address::Tcp(s.to_owned())
        }
    }

    /// Opens a blocking connection (`TCP_NODELAY` set on TCP).
    pub fn connect(&self) -> io::Result<Stream> {
        match self {
            Address::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
            Address::Tcp(addr) => {
                let s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }

    /// Binds a listener. A stale unix socket file at the path is removed first
    /// (any other kind of file is left alone and binding fails).
    pub fn listen(&self) -> io::Result<Listener> {
        match self {
            Address::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if meta.file_type().is_socket() {
                        std::fs::remove_file(path)?;
                    }
                }
                UnixListener::bind(path).map(Listener::Unix)
            }
            Address::Tcp(addr) => TcpListener::bind(addr).map(Listener::Tcp),
        }
    }
}

/// A connected socket of either kind.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain.
    Unix(UnixStream),
}

impl Stream {
    /// Switches non-blocking mode.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// A listening socket of either kind.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix domain.
    Unix(UnixListener),
}

impl Listener {
    /// Accepts one connection (`TCP_NODELAY` set on TCP).
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }

    /// Switches non-blocking mode.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(on),
            Listener::Unix(l) => l.set_nonblocking(on),
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }
}

/// CPU time (user + system, all threads) a process has used so far, from
/// `/proc/PID/stat` (`"self"` for this process). Resolution is one clock tick.
pub fn process_cpu_time(pid: &str) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc stat format");
    // The command name (field 2) is in parentheses and may contain spaces.
    let after = &stat[stat.rfind(')').ok_or_else(bad)? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // after ')' : field 3 (state) is index 0, so utime (14) is 11, stime (15) is 12.
    let ticks: u64 = [11, 12]
        .iter()
        .map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum::<Option<u64>>()
        .ok_or_else(bad)?;
    let hz = epoll::clock_ticks_per_second().max(1);
    Ok(Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000) / hz,
    ))
}

/// Resident memory of a process, from `/proc/PID/status` (`"self"` for this process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resident {
    /// `VmRSS`: resident now, in bytes.
    pub rss: u64,
    /// `VmHWM`: the most it has been resident, in bytes.
    pub peak: u64,
}

/// `VmRSS` and `VmHWM` of a process (`"self"` for this process).
pub fn process_memory(pid: &str) -> io::Result<Resident> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> io::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("no {name} in /proc/{pid}/status"),
                )
            })
    };
    Ok(Resident {
        rss: field("VmRSS:")?,
        peak: field("VmHWM:")?,
    })
}

/// Scheduler counters of every thread of a process: thread id → (nanoseconds on a CPU,
/// nanoseconds runnable but waiting for one), from `/proc/PID/task/*/schedstat`. Empty
/// when the kernel does not keep them.
pub fn sched_counters(pid: u32) -> HashMap<u32, (u64, u64)> {
    let mut out = HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        if let Some(c) = read_schedstat(&task.path().join("schedstat")) {
            out.insert(tid, c);
        }
    }
    out
}

/// One `schedstat` file (`/proc/PID/task/TID/schedstat`, `/proc/thread-self/schedstat`):
/// (nanoseconds on a CPU, nanoseconds runnable but waiting for one).
pub fn read_schedstat(path: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some((fields.next()??, fields.next()??))
}

/// The machine's CPU time so far, from the first line of `/proc/stat`: (busy, all), both
/// summed over every CPU; busy is all but `idle` and `iowait`.
pub fn machine_cpu_time() -> io::Result<(Duration, Duration)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/stat format");
    let line = stat.lines().next().ok_or_else(bad)?;
    let mut fields = line.split_whitespace();
    if fields.next() != Some("cpu") {
        return Err(bad());
    }
    // user nice system idle iowait irq softirq steal (guest times are within user).
    let ticks: Vec<u64> = fields.take(8).map(|f| f.parse().unwrap_or(0)).collect();
    if ticks.len() < 5 {
        return Err(bad());
    }
    let all: u64 = ticks.iter().sum();
    let busy = all - ticks[3] - ticks[4];
    let hz = epoll::clock_ticks_per_second().max(1);
    let time = |t: u64| Duration::from_nanos(t.saturating_mul(1_000_000_000) / hz);
    Ok((time(busy), time(all)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_a_slash_are_unix_sockets() {
        assert_eq!(
            Address::parse("/tmp/x.sock"),
            Address::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            Address::parse("unix:/tmp/x.sock"),
            Address::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            Address::parse("127.0.0.1:9000"),
            Address::Tcp("127.0.0.1:9000".into())
        );
    }

    #[test]
    fn own_resident_memory_grows_with_a_touched_allocation() {
        let before = process_memory("self").unwrap();
        assert!(before.rss > 0 && before.peak >= before.rss, "{before:?}");
        let block = vec![1u8; 64 << 20];
        let after = process_memory("self").unwrap();
        std::hint::black_box(&block);
        assert!(
            after.rss >= before.rss + (32 << 20),
            "{before:?} -> {after:?}"
        );
        assert!(process_memory("0").is_err());
    }

    #[test]
    fn own_cpu_time_is_readable_and_grows() {
        let before = process_cpu_time("self").unwrap();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(60) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = process_cpu_time("self").unwrap();
        assert!(after > before, "{before:?} -> {after:?}");
    }
}
