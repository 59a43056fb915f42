//! `fcgi-const`: a FastCGI responder that answers every request with the same
//! small page, built on `fastcgi-protocol`. It measures the ceiling of the
//! FastCGI path (front end + codec + socket) with no script behind it.
//!
//! Two modes: `epoll` (default), one thread and one level-triggered epoll loop
//! for all connections, like an async runtime's worker; and `threads`, one
//! thread per connection with blocking IO. Responses to requests that arrived
//! together are written together. Honours `FCGI_KEEP_CONN`, answers
//! `GET_VALUES`, `ABORT_REQUEST`, unknown roles and unknown record types.
//! Runs until killed (a unix socket file is left behind; it is replaced on the
//! next start).
//!
//! Run: `fcgi-const --listen /tmp/fcgi-const.sock`

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::thread;

use clap::{Parser, ValueEnum};
use fastcgi_protocol::{
    encode_end_request, encode_get_values_result, encode_response, encode_unknown_type, Decoder,
    Event, Limits, ProtocolStatus, Status,
};
use luafcgid_bench::epoll::{self, Epoll, Ready};
use luafcgid_bench::{Address, Listener, Stream};

const RESPONSE: &[u8] =
    b"Status: 200 OK\r\nContent-Type: text/html\r\nContent-Length: 11\r\n\r\nHello World";

/// Initial size of a connection's read buffer; it grows (to about twice the
/// largest record, 65,798 bytes) only when a record needs it.
const READ_BUF: usize = 16 * 1024;

/// A constant-answer FastCGI responder (benchmark ceiling).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Unix socket path (contains a '/') or host:port.
    #[arg(long)]
    listen: String,
    /// How connections are served.
    #[arg(long, value_enum, default_value_t = Mode::Epoll)]
    mode: Mode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// One thread, one epoll loop for every connection.
    Epoll,
    /// One thread per connection, blocking IO.
    Threads,
}

fn main() {
    let args = Args::parse();
    let address = Address::parse(&args.listen);
    let listener = match address.listen() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fcgi-const: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    eprintln!(
        "fcgi-const: listening on {} ({:?} mode)",
        args.listen, args.mode
    );
    let result = match args.mode {
        Mode::Epoll => run_epoll(&listener),
        Mode::Threads => run_threads(&listener),
    };
    if let Err(e) = result {
        eprintln!("fcgi-const: {e}");
        std::process::exit(1);
    }
}

/// One connection's protocol state: read buffer, decoder, pending output.
struct Session {
    decoder: Decoder,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    out: Vec<u8>,
    /// A request without `FCGI_KEEP_CONN` was answered: close once `out` is sent.
    close: bool,
}

impl Session {
    fn new() -> Session {
        Session {
            decoder: Decoder::new(Limits {
                max_body_bytes: 1 << 20,
                ..Limits::default()
            }),
            buf: vec![0; READ_BUF],
            start: 0,
            end: 0,
            out: Vec::with_capacity(4096),
            close: false,
        }
    }

    /// Room to read into (at least `READ_BUF / 2` bytes), compacting the buffer
    /// when it runs low and growing it when compacting is not enough. What stays
    /// unconsumed is less than one record, so the buffer stays below 2 × (65,798 +
    /// `READ_BUF`).
    fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end < READ_BUF / 2 {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.buf.len() - self.end < READ_BUF / 2 {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// Answers every whole record read so far into `out`. An error means the
    /// peer broke the protocol: send `out` and close.
    fn process(&mut self, read: usize) -> Result<(), fastcgi_protocol::Error> {
        self.end += read;
        while !self.close {
            let (used, event) = match self.decoder.decode(&self.buf[self.start..self.end])? {
                Status::Partial => break,
                Status::Complete(c) => c,
            };
            self.start += used;
            match event {
                Some(Event::Request(request)) => {
                    encode_response(request.id, RESPONSE, &mut self.out);
                    self.decoder.finish(request.id);
                    self.close = !request.keep_conn;
                }
                Some(Event::Abort { id }) => {
                    encode_end_request(id, 0, ProtocolStatus::RequestComplete, &mut self.out);
                    self.decoder.finish(id);
                }
                Some(Event::Rejected { id, status }) => {
                    encode_end_request(id, 0, status, &mut self.out);
                }
                Some(Event::GetValues { names }) => {
                    let known: [(&[u8], &[u8]); 3] = [
                        (b"FCGI_MAX_CONNS", b"10000"),
                        (b"FCGI_MAX_REQS", b"64"),
                        (b"FCGI_MPXS_CONNS", b"1"),
                    ];
                    let pairs: Vec<(&[u8], &[u8])> = known
                        .into_iter()
                        .filter(|(n, _)| names.iter().any(|m| m == n))
                        .collect();
                    encode_get_values_result(&pairs, &mut self.out);
                }
                Some(Event::UnknownType { kind }) => encode_unknown_type(kind, &mut self.out),
                Some(Event::ParamsComplete { .. }) | None => {}
            }
        }
        Ok(())
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

fn run_threads(listener: &Listener) -> io::Result<()> {
    loop {
        match listener.accept() {
            Ok(stream) => {
                thread::spawn(move || {
                    if let Err(e) = serve_blocking(stream) {
                        if !is_disconnect(&e) {
                            eprintln!("fcgi-const: connection: {e}");
                        }
                    }
                });
            }
            Err(e) => {
                eprintln!("fcgi-const: accept: {e}");
                thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// Serves one connection with blocking IO until the peer closes, a request
/// without `FCGI_KEEP_CONN` is answered, or a protocol error.
fn serve_blocking(mut stream: Stream) -> io::Result<()> {
    let mut session = Session::new();
    loop {
        let n = stream.read(session.spare())?;
        if n == 0 {
            return Ok(());
        }
        let result = session.process(n);
        stream.write_all(&session.out)?;
        session.out.clear();
        if let Err(e) = result {
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        if session.close {
            return Ok(());
        }
    }
}

/// A connection in the epoll loop.
struct Conn {
    stream: Stream,
    session: Session,
    /// Bytes of `session.out` already written.
    sent: usize,
    /// Registered for writability (output backed up).
    want_write: bool,
    /// Stop reading: protocol error or close requested; close once flushed.
    closing: bool,
}

const LISTENER: u64 = u64::MAX;

fn run_epoll(listener: &Listener) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut epoll = Epoll::new(256)?;
    epoll.add(listener.as_raw_fd(), LISTENER, epoll::IN)?;
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut ready: Vec<Ready> = Vec::with_capacity(256);
    loop {
        epoll.wait(-1, &mut ready)?;
        for r in &ready {
            if r.token == LISTENER {
                accept_all(listener, &epoll, &mut conns, &mut free);
                continue;
            }
            let i = r.token as usize;
            let Some(conn) = conns.get_mut(i).and_then(Option::as_mut) else {
                continue;
            };
            let keep = match on_ready(conn, r.events) {
                Ok(keep) => keep,
                Err(e) => {
                    if !is_disconnect(&e) {
                        eprintln!("fcgi-const: connection: {e}");
                    }
                    false
                }
            };
            if keep {
                if let Err(e) = update_interest(&epoll, i, conn) {
                    eprintln!("fcgi-const: epoll: {e}");
                    conns[i] = None;
                    free.push(i);
                }
            } else {
                // Dropping the stream closes it and removes it from epoll.
                conns[i] = None;
                free.push(i);
            }
        }
    }
}

fn accept_all(
    listener: &Listener,
    epoll: &Epoll,
    conns: &mut Vec<Option<Conn>>,
    free: &mut Vec<usize>,
) {
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                eprintln!("fcgi-const: accept: {e}");
                return;
            }
        };
        let i = free.pop().unwrap_or_else(|| {
            conns.push(None);
            conns.len() - 1
        });
        let registered = stream
            .set_nonblocking(true)
            .and_then(|()| epoll.add(stream.as_raw_fd(), i as u64, epoll::IN));
        if let Err(e) = registered {
            eprintln!("fcgi-const: new connection: {e}");
            free.push(i);
            continue;
        }
        conns[i] = Some(Conn {
            stream,
            session: Session::new(),
            sent: 0,
            want_write: false,
            closing: false,
        });
    }
}

/// Reads and answers what is ready; `Ok(false)` when the connection is done.
fn on_ready(conn: &mut Conn, events: u32) -> io::Result<bool> {
    if !conn.closing && events & (epoll::IN | epoll::HUP | epoll::ERR) != 0 {
        match conn.stream.read(conn.session.spare()) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                if let Err(e) = conn.session.process(n) {
                    eprintln!("fcgi-const: protocol error: {e}");
                    conn.closing = true;
                }
                conn.closing |= conn.session.close;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    let out = &conn.session.out;
    while conn.sent < out.len() {
        match conn.stream.write(&out[conn.sent..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => conn.sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if conn.sent == conn.session.out.len() {
        conn.session.out.clear();
        conn.sent = 0;
        if conn.closing {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Watches for writability only while output is backed up (and stops reading
/// while closing).
fn update_interest(epoll: &Epoll, i: usize, conn: &mut Conn) -> io::Result<()> {
    let backed_up = conn.sent < conn.session.out.len();
    if backed_up != conn.want_write || conn.closing {
        conn.want_write = backed_up;
        let read = if conn.closing { 0 } else { epoll::IN };
        let events = if backed_up { read | epoll::OUT } else { read };
        epoll.modify(conn.stream.as_raw_fd(), i as u64, events)?;
    }
    Ok(())
}
