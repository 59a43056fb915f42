//! A FastCGI connection's socket as the runtime sees it: watched for reading only, and for
//! writing only while a reply does not fit in the socket's buffer.
//!
//! The runtime's own streams are registered for both directions, edge-triggered. On a unix
//! socket the kernel signals "writable" every time the peer reads: each reply nginx takes
//! from us woke a runtime thread for nothing, a second wake-up per request beside the one for
//! the request itself (at one connection it also delayed the client's own wake-up on that
//! CPU). Here the connection is registered for readability alone; a write goes straight to
//! the socket, and only when the socket is full does a duplicate of its descriptor get
//! registered for writability, until the reply has been written. Listening sockets are
//! watched here too, so that an accepted connection is registered once, as a connection
//! (taken from the runtime's own listener it was registered, deregistered and registered
//! again: two extra system calls per connection, per request for front ends that do not
//! keep connections open).
//!
//! It does not buffer: each read and write is one system call, as with the runtime's
//! streams. One of three modules with `unsafe` in the daemon: registering a descriptor with
//! the runtime (`unsafe` only because the runtime cannot see that its owner keeps it open),
//! and reading into the spare capacity of the connection's buffer without zeroing it first
//! (zeroing its spare room, 16 KiB or more, on every read cost time and made every
//! connection's buffer resident). Reads are `recv(2)`, not `read(2)`, which goes through
//! the file layer first (a position lock and permission hooks a socket does not need).
#![allow(unsafe_code)]

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// A connected stream socket of the standard library (unix or TCP).
pub trait StreamSocket: AsRawFd + std::fmt::Debug + Sized + Send + Sync + Unpin + 'static {
    /// One `write(2)`.
    fn send(&self, buf: &[u8]) -> io::Result<usize>;
    /// A second descriptor for the same socket.
    fn duplicate(&self) -> io::Result<Self>;
    /// Ends the sending direction.
    fn shut_down_writes(&self) -> io::Result<()>;
}

/// The standard library's unix and TCP streams have the same methods for these.
macro_rules! stream_socket {
    ($($socket:ty),*) => {$(
        impl StreamSocket for $socket {
            fn send(&self, buf: &[u8]) -> io::Result<usize> {
                (&mut &*self).write(buf)
            }
            fn duplicate(&self) -> io::Result<Self> {
                self.try_clone()
            }
            fn shut_down_writes(&self) -> io::Result<()> {
                self.shutdown(std::net::Shutdown::Write)
            }
        }
    )*};
}

stream_socket!(std::os::unix::net::UnixStream, std::net::TcpStream);

/// A listening socket of the standard library (unix or TCP).
pub trait StreamListener: AsRawFd + std::fmt::Debug + Send + Sync + Unpin + 'static {
    type Stream: StreamSocket;
    type Peer;
    /// One `accept(2)`: the new connection, non-blocking, and its peer.
    fn accept_one(&self) -> io::Result<(Self::Stream, Self::Peer)>;
}

/// The standard library's unix and TCP listeners have the same method for this.
macro_rules! stream_listener {
    ($($listener:ty => $stream:ty, $peer:ty);*) => {$(
        impl StreamListener for $listener {
            type Stream = $stream;
            type Peer = $peer;
            fn accept_one(&self) -> io::Result<($stream, $peer)> {
                let (stream, peer) = self.accept()?;
                stream.set_nonblocking(true)?;
                Ok((stream, peer))
            }
        }
    )*};
}

stream_listener!(
    std::os::unix::net::UnixListener => std::os::unix::net::UnixStream,
        std::os::unix::net::SocketAddr;
    std::net::TcpListener => std::net::TcpStream, std::net::SocketAddr
);

/// A non-blocking listening socket registered for readability. Its connections are not
/// registered by it: each becomes a [`Connection`] (one registration per connection, where
/// taking them from the runtime's own listener would register, deregister and register
/// again).
#[derive(Debug)]
pub struct Listener<L: StreamListener> {
    socket: AsyncFd<L>,
}

impl<L: StreamListener> Listener<L> {
    /// Registers `listener` (which must be non-blocking) with the current runtime.
    pub fn new(listener: L) -> io::Result<Listener<L>> {
        Ok(Listener {
            socket: register(listener, Interest::READABLE)?,
        })
    }

    /// The next connection, non-blocking, and its peer; errors of `accept(2)` (descriptors
    /// exhausted, ...) as they come.
    pub async fn accept(&self) -> io::Result<(L::Stream, L::Peer)> {
        loop {
            let mut guard = self.socket.readable().await?;
            match guard.try_io(|l| l.get_ref().accept_one()) {
                Ok(accepted) => return accepted,
                // No connection after all: readiness was cleared, wait for the next edge.
                Err(_would_block) => continue,
            }
        }
    }

    /// Deregisters the listener and gives it back (still non-blocking).
    pub fn into_inner(self) -> L {
        self.socket.into_inner()
    }
}

/// Registers `socket`, a standard-library socket, with the current runtime for `interest`.
fn register<S: AsRawFd>(socket: S, interest: Interest) -> io::Result<AsyncFd<S>> {
    // SAFETY: every caller passes a standard-library socket or listener, which owns its
    // descriptor (it closes it only when dropped), and the `AsyncFd` owns it until it is
    // dropped, so the descriptor stays open and the same for the registration's whole life.
    unsafe { AsyncFd::register_with_interest(socket, interest) }.map_err(io::Error::from)
}

/// A non-blocking connection registered for readability, and for writability only while a
/// write is waiting for room.
#[derive(Debug)]
pub struct Connection<S: StreamSocket> {
    socket: AsyncFd<S>,
    /// The duplicate registered for writability while the socket is full.
    writable: Option<AsyncFd<S>>,
}

impl<S: StreamSocket> Connection<S> {
    /// Registers `socket` (which must be non-blocking) with the current runtime.
    pub fn new(socket: S) -> io::Result<Connection<S>> {
        Ok(Connection {
            socket: register(socket, Interest::READABLE)?,
            writable: None,
        })
    }
}

impl<S: StreamSocket> AsRawFd for Connection<S> {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl<S: StreamSocket> AsyncRead for Connection<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let fd = this.socket.as_raw_fd();
        loop {
            let mut guard = ready!(this.socket.poll_read_ready(cx))?;
            // SAFETY: only bytes `recv(2)` wrote are marked initialised below; nothing is
            // read from the uninitialised part.
            let unfilled = unsafe { buf.unfilled_mut() };
            let room = unfilled.len();
            let got = guard.try_io(|_| {
                // SAFETY: `unfilled` is writable for `room` bytes; `fd` is the open socket
                // the `AsyncFd` owns.
                let n = unsafe { libc::recv(fd, unfilled.as_mut_ptr().cast(), room, 0) };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            });
            match got {
                Ok(Ok(n)) => {
                    if n > 0 && n < room {
                        // A short read emptied the socket: wait for the next edge instead of
                        // asking again and getting `EAGAIN` (as the runtime's streams do).
                        guard.clear_ready();
                    }
                    // SAFETY: `recv(2)` initialised the first `n` bytes of `unfilled`.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Not readable after all: readiness was cleared, wait for the next edge.
                Err(_would_block) => continue,
            }
        }
    }
}

impl<S: StreamSocket> AsyncWrite for Connection<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match this.socket.get_ref().send(buf) {
                Ok(n) => {
                    if n == buf.len() {
                        // Everything fitted: stop watching for room.
                        this.writable = None;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            let watch = match &mut this.writable {
                Some(watch) => watch,
                None => {
                    let dup = this.socket.get_ref().duplicate()?;
                    this.writable.insert(register(dup, Interest::WRITABLE)?)
                }
            };
            // Ready at once when room appeared since the write failed (registering reports
            // the current state, and an edge after that is kept until cleared here).
            let mut guard = ready!(watch.poll_write_ready(cx))?;
            guard.clear_ready();
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.writable = None;
        Poll::Ready(this.socket.get_ref().shut_down_writes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const EPOLLIN: u32 = libc::EPOLLIN as u32;
    const EPOLLOUT: u32 = libc::EPOLLOUT as u32;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    /// The events every epoll set of this process watches for on `fd` (as the kernel lists
    /// them in `/proc/self/fdinfo`), matched by descriptor and inode.
    fn watched_events(fd: RawFd) -> Vec<u32> {
        let ino = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .expect("the descriptor is open")
            .ino();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc/self/fdinfo").expect("procfs") {
            let Ok(text) = std::fs::read_to_string(entry.expect("an entry").path()) else {
                continue;
            };
            for line in text.lines().filter(|l| l.starts_with("tfd:")) {
                let words: Vec<&str> = line.split_whitespace().collect();
                let field = |name: &str| {
                    let at = words.iter().position(|w| *w == name)?;
                    words.get(at + 1).copied()
                };
                let tfd = field("tfd:").and_then(|v| v.parse::<RawFd>().ok());
                let events = field("events:").and_then(|v| u32::from_str_radix(v, 16).ok());
                let inode = words
                    .iter()
                    .find_map(|w| w.strip_prefix("ino:"))
                    .and_then(|v| u64::from_str_radix(v, 16).ok());
                if let (Some(tfd), Some(events), Some(inode)) = (tfd, events, inode) {
                    if tfd == fd && inode == ino {
                        found.push(events);
                    }
                }
            }
        }
        found
    }

    #[test]
    fn a_connection_is_watched_for_reading_only() {
        runtime().block_on(async {
            let (ours, mut peer) = UnixStream::pair().expect("a socket pair");
            ours.set_nonblocking(true).expect("non-blocking");
            let mut conn = Connection::new(ours).expect("registered");
            let fd = conn.as_raw_fd();
            std::io::Write::write_all(&mut peer, b"request").expect("sent");
            let mut got = [0u8; 7];
            conn.read_exact(&mut got).await.expect("read");
            assert_eq!(&got, b"request");
            conn.write_all(b"reply").await.expect("written");
            let mut back = [0u8; 5];
            std::io::Read::read_exact(&mut peer, &mut back).expect("received");
            assert_eq!(&back, b"reply");
            // (The runtime's epoll set may be listed under two descriptors.)
            let events = watched_events(fd);
            assert!(!events.is_empty(), "registered");
            for e in events {
                assert_ne!(e & EPOLLIN, 0, "watched for reading: {e:x}");
                assert_eq!(e & EPOLLOUT, 0, "not for writing: {e:x}");
            }
        });
    }

    #[test]
    fn a_reply_larger_than_the_socket_buffer_waits_for_room_then_stops_watching() {
        runtime().block_on(async {
            let (ours, peer) = UnixStream::pair().expect("a socket pair");
            ours.set_nonblocking(true).expect("non-blocking");
            let mut conn = Connection::new(ours).expect("registered");
            let reply: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
            let expected = reply.clone();
            // The peer starts reading only once the socket has filled up.
            let (full_tx, full_rx) = std::sync::mpsc::channel::<()>();
            let reader = std::thread::spawn(move || {
                full_rx.recv().expect("told");
                let mut got = Vec::new();
                std::io::Read::read_to_end(&mut &peer, &mut got).expect("read");
                got
            });
            let mut written = 0;
            let mut told = Some(full_tx);
            while written < reply.len() {
                let step = conn.write(&reply[written..]);
                match tokio::time::timeout(Duration::from_millis(50), step).await {
                    Ok(n) => written += n.expect("written"),
                    Err(_) => {
                        // Blocked: the socket is full and a duplicate watches for room.
                        assert!(conn.writable.is_some(), "waiting for room");
                        let dup = conn.writable.as_ref().map(AsRawFd::as_raw_fd);
                        let events = watched_events(dup.expect("a duplicate"));
                        assert!(!events.is_empty(), "registered");
                        for e in events {
                            assert_ne!(e & EPOLLOUT, 0, "watched for room: {e:x}");
                        }
                        if let Some(tx) = told.take() {
                            tx.send(()).expect("reader waits");
                        }
                    }
                }
            }
            assert!(told.is_none(), "the reply never filled the socket");
            assert!(conn.writable.is_none(), "still watching for room");
            conn.shutdown().await.expect("shut down");
            let got = reader.join().expect("reader");
            assert!(got == expected, "the reply arrived intact");
        });
    }
}
