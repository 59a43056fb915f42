//! `fcgi-load`: a FastCGI load generator. It speaks to a responder directly,
//! as nginx would (the same ~20 params, `FCGI_KEEP_CONN`, request id 1, one
//! request in flight per connection), and reports throughput, latency
//! percentiles (p50, p99, p99.9) and, given the server's pid, the server's CPU time per
//! request and its resident memory before and after (`/proc/PID/stat`, `/proc/PID/status`).
//!
//! Each thread owns a share of the connections and drives them with
//! non-blocking sockets and one epoll loop. A response counts as an error
//! unless it ends with `END_REQUEST`/`RequestComplete` and its headers have no
//! `Status` or `Status: 200`.
//!
//! Run: `fcgi-load --connect /tmp/fcgi.sock --requests 200000 --script /srv/www/hello.lua`

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use fastcgi_protocol::client::{self, decode_reply, Reply};
use fastcgi_protocol::{ProtocolStatus, Status};
use luafcgid_bench::epoll::{self, Epoll, Ready};
use luafcgid_bench::{process_cpu_time, process_memory, Address, Stream};

/// A FastCGI load generator.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Unix socket path (contains a '/') or host:port.
    #[arg(long)]
    connect: String,
    /// Concurrent connections, one request in flight on each.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Requests to send in total.
    #[arg(long, default_value_t = 100_000)]
    requests: u64,
    /// SCRIPT_FILENAME to request.
    #[arg(long, default_value = "/srv/www/hello.lua")]
    script: String,
    /// Extra or replacing param NAME=VALUE (repeatable).
    #[arg(long = "param", value_name = "K=V")]
    params: Vec<String>,
    /// Request body size in bytes; > 0 makes it a POST.
    #[arg(long, default_value_t = 0)]
    body_bytes: usize,
    /// Threads, each owning a share of the connections.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Keep connections open between requests (the default).
    #[arg(long, overrides_with = "no_keep_alive")]
    keep_alive: bool,
    /// A new connection per request (KEEP_CONN unset).
    #[arg(long, overrides_with = "keep_alive")]
    no_keep_alive: bool,
    /// Server process whose CPU time per request to report.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Give up when no response arrives for this many seconds.
    #[arg(long, default_value_t = 10)]
    stall_secs: u64,
}

/// Most STDOUT bytes kept per response: enough for the header block.
const HEAD_KEEP: usize = 4096;
/// Read buffer per connection.
const READ_BUF: usize = 256 * 1024;
/// Kinds of error listed at the end.
const ERROR_KINDS_SHOWN: usize = 10;

fn main() {
    let args = Args::parse();
    if args.connections == 0 || args.threads == 0 {
        eprintln!("fcgi-load: --connections and --threads must be at least 1");
        std::process::exit(64);
    }
    let keep_alive = !args.no_keep_alive;
    let address = Address::parse(&args.connect);
    let request = match build_request(&args, keep_alive) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fcgi-load: {e}");
            std::process::exit(64);
        }
    };
    let threads = args.threads.min(args.connections);
    let server_pid = args.server_pid.map(|p| p.to_string());
    let server_before = server_pid.as_deref().map(process_cpu_time);
    let server_memory_before = server_pid.as_deref().and_then(|p| process_memory(p).ok());
    let client_before = process_cpu_time("self");
    let started = Instant::now();

    let stall = Duration::from_secs(args.stall_secs.max(1));
    let results: Vec<io::Result<ThreadResult>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let conns = share(args.connections as u64, threads, t) as usize;
                let requests = share(args.requests, threads, t);
                let (address, request) = (&address, &request[..]);
                scope.spawn(move || {
                    Worker::new(address, request, keep_alive, conns, requests, stall)?.run()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("thread panicked")))
            })
            .collect()
    });
    let elapsed = started.elapsed();
    let client_cpu = client_before
        .and_then(|b| process_cpu_time("self").map(|a| a.saturating_sub(b)))
        .ok();
    let server_cpu = match (server_before, server_pid.as_deref()) {
        (Some(Ok(b)), Some(pid)) => process_cpu_time(pid).ok().map(|a| a.saturating_sub(b)),
        _ => None,
    };

    let mut total = ThreadResult::default();
    for r in results {
        match r {
            Ok(r) => total.merge(r),
            Err(e) => {
                eprintln!("fcgi-load: {e}");
                *total
                    .errors
                    .entry(format!("worker failed: {e}"))
                    .or_default() += 1;
            }
        }
    }
    let server_memory = server_pid
        .as_deref()
        .and_then(|p| process_memory(p).ok())
        .and_then(|after| server_memory_before.map(|before| (before, after)));
    report(&args, &total, elapsed, server_cpu, client_cpu);
    if let Some((before, after)) = server_memory {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        println!(
            "server rss  {:.1} MiB before, {:.1} MiB after (peak {:.1} MiB)",
            mib(before.rss),
            mib(after.rss),
            mib(after.peak)
        );
    }
    if total.error_count() > 0 || total.latencies.is_empty() {
        std::process::exit(1);
    }
}

/// Thread `t`'s share of `n` split over `threads`.
fn share(n: u64, threads: usize, t: usize) -> u64 {
    let threads = threads as u64;
    let t = t as u64;
    n / threads + u64::from(t < n % threads)
}

/// The request every connection sends: nginx's usual params, the script, the
/// extra params, the body.
fn build_request(args: &Args, keep_alive: bool) -> Result<Vec<u8>, String> {
    let script = Path::new(&args.script);
    let name = script
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let root = script
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let uri = format!("/{name}");
    let post = args.body_bytes > 0;
    let mut params: Vec<(String, String)> = [
        ("SCRIPT_FILENAME", args.script.as_str()),
        ("QUERY_STRING", ""),
        ("REQUEST_METHOD", if post { "POST" } else { "GET" }),
        (
            "CONTENT_TYPE",
            if post {
                "application/x-www-form-urlencoded"
            } else {
                ""
            },
        ),
        ("CONTENT_LENGTH", ""),
        ("SCRIPT_NAME", &uri),
        ("REQUEST_URI", &uri),
        ("DOCUMENT_URI", &uri),
        ("DOCUMENT_ROOT", &root),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("REQUEST_SCHEME", "http"),
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("SERVER_SOFTWARE", "nginx/1.22.1"),
        ("REMOTE_ADDR", "127.0.0.1"),
        ("REMOTE_PORT", "54321"),
        ("SERVER_ADDR", "127.0.0.1"),
        ("SERVER_PORT", "80"),
        ("SERVER_NAME", "localhost"),
        ("HTTP_HOST", "localhost"),
        ("HTTP_USER_AGENT", "fcgi-load/0.1"),
        ("HTTP_ACCEPT", "*/*"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    if post {
        set_param(&mut params, "CONTENT_LENGTH", &args.body_bytes.to_string());
    }
    for p in &args.params {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| format!("--param {p:?}: expected NAME=VALUE"))?;
        set_param(&mut params, k, v);
    }
    let body = vec![b'x'; args.body_bytes];
    let mut out = Vec::new();
    client::encode_request(
        1,
        keep_alive,
        params.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())),
        &body,
        &mut out,
    );
    Ok(out)
}

fn set_param(params: &mut Vec<(String, String)>, name: &str, value: &str) {
    match params.iter_mut().find(|(k, _)| k == name) {
        Some(p) => p.1 = value.to_owned(),
        None => params.push((name.to_owned(), value.to_owned())),
    }
}

/// What one thread measured.
#[derive(Debug, Default)]
struct ThreadResult {
    /// Latency of every completed request (errors included), in nanoseconds.
    latencies: Vec<u64>,
    /// Error kind → count.
    errors: HashMap<String, u64>,
    /// Requests that got an answer judged OK.
    ok: u64,
}

impl ThreadResult {
    fn merge(&mut self, other: ThreadResult) {
        self.latencies.extend(other.latencies);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.ok += other.ok;
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }
}

/// One connection's state.
#[derive(Debug)]
struct Conn {
    stream: Option<Stream>,
    /// Bytes of the request written so far; `None` when no request is in flight.
    written: Option<usize>,
    /// Waiting for writability.
    want_write: bool,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    head: Vec<u8>,
    sent_at: Instant,
}

/// The epoll loop of one thread.
struct Worker<'a> {
    address: &'a Address,
    request: &'a [u8],
    keep_alive: bool,
    epoll: Epoll,
    conns: Vec<Conn>,
    /// Requests this thread still has to start.
    to_start: u64,
    /// Requests started and not yet finished.
    in_flight: u64,
    stall: Duration,
    result: ThreadResult,
    /// Connections to start a new request on (after a failure or idle close);
    /// handled by the loop so failures never recurse.
    restart: Vec<usize>,
}

impl<'a> Worker<'a> {
    fn new(
        address: &'a Address,
        request: &'a [u8],
        keep_alive: bool,
        conns: usize,
        requests: u64,
        stall: Duration,
    ) -> io::Result<Worker<'a>> {
        let conns = (0..conns)
            .map(|_| Conn {
                stream: None,
                written: None,
                want_write: false,
                rbuf: vec![0; READ_BUF],
                rstart: 0,
                rend: 0,
                head: Vec::with_capacity(HEAD_KEEP),
                sent_at: Instant::now(),
            })
            .collect();
        Ok(Worker {
            address,
            request,
            keep_alive,
            epoll: Epoll::new(256)?,
            conns,
            to_start: requests,
            in_flight: 0,
            stall,
            restart: Vec::new(),
            result: ThreadResult {
                latencies: Vec::with_capacity(usize::try_from(requests).unwrap_or(0)),
                ..ThreadResult::default()
            },
        })
    }

    fn run(mut self) -> io::Result<ThreadResult> {
        for i in 0..self.conns.len() {
            self.start_request(i);
        }
        self.restart_failed();
        let mut ready: Vec<Ready> = Vec::with_capacity(256);
        let mut last_progress = Instant::now();
        while self.in_flight > 0 {
            self.epoll.wait(1000, &mut ready)?;
            if ready.is_empty() {
                if last_progress.elapsed() >= self.stall {
                    let stuck = self.in_flight;
                    for _ in 0..stuck {
                        self.result.error("no response (stalled)".into());
                    }
                    break;
                }
                continue;
            }
            last_progress = Instant::now();
            for r in &ready {
                let i = r.token as usize;
                if r.events & epoll::OUT != 0 {
                    self.write_more(i);
                }
                if r.events & (epoll::IN | epoll::HUP | epoll::ERR) != 0 {
                    self.read_more(i);
                }
            }
            self.restart_failed();
        }
        Ok(self.result)
    }

    fn restart_failed(&mut self) {
        while let Some(i) = self.restart.pop() {
            self.start_request(i);
        }
    }

    /// Starts the next request on connection `i` if any remain, connecting first
    /// when needed. A failed connect counts the request as an error.
    fn start_request(&mut self, i: usize) {
        while self.to_start > 0 {
            self.to_start -= 1;
            if self.conns[i].stream.is_none() {
                if let Err(e) = self.open(i) {
                    self.result.error(format!("connect: {e}"));
                    continue;
                }
            }
            let conn = &mut self.conns[i];
            conn.written = Some(0);
            conn.head.clear();
            conn.sent_at = Instant::now();
            self.in_flight += 1;
            self.write_more(i);
            return;
        }
        // Nothing left for this connection: close it.
        self.close(i);
    }

    fn open(&mut self, i: usize) -> io::Result<()> {
        let stream = self.address.connect()?;
        stream.set_nonblocking(true)?;
        self.epoll.add(stream.as_raw_fd(), i as u64, epoll::IN)?;
        let conn = &mut self.conns[i];
        conn.stream = Some(stream);
        conn.want_write = false;
        conn.rstart = 0;
        conn.rend = 0;
        Ok(())
    }

    fn close(&mut self, i: usize) {
        // Dropping the stream closes it, which also removes it from epoll.
        self.conns[i].stream = None;
        self.conns[i].written = None;
    }

    /// Fails the request in flight on `i` (if any), drops the connection and
    /// queues the next request on a new one.
    fn fail(&mut self, i: usize, kind: String) {
        if self.conns[i].written.is_some() {
            self.in_flight -= 1;
            self.result.error(kind);
        }
        self.close(i);
        self.restart.push(i);
    }

    fn write_more(&mut self, i: usize) {
        let request = self.request;
        let conn = &mut self.conns[i];
        let (Some(stream), Some(written)) = (conn.stream.as_mut(), conn.written) else {
            return;
        };
        let mut pos = written;
        let outcome = loop {
            if pos == request.len() {
                break Ok(true);
            }
            match stream.write(&request[pos..]) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        conn.written = Some(pos);
        let fd = stream.as_raw_fd();
        match outcome {
            Ok(done) => {
                // Watch for writability only while part of the request is unsent.
                if done == conn.want_write {
                    conn.want_write = !done;
                    let events = if done {
                        epoll::IN
                    } else {
                        epoll::IN | epoll::OUT
                    };
                    if let Err(e) = self.epoll.modify(fd, i as u64, events) {
                        self.fail(i, format!("epoll: {e}"));
                    }
                }
            }
            Err(e) => self.fail(i, format!("write: {e}")),
        }
    }

    fn read_more(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        let Some(stream) = conn.stream.as_mut() else {
            return;
        };
        if conn.rend == conn.rbuf.len() {
            // A full buffer holds at least one whole record; parse drains it.
            conn.rbuf.copy_within(conn.rstart..conn.rend, 0);
            conn.rend -= conn.rstart;
            conn.rstart = 0;
        }
        let n = match stream.read(&mut conn.rbuf[conn.rend..]) {
            Ok(0) => {
                let kind = if conn.written.is_some() {
                    "connection closed before END_REQUEST"
                } else {
                    "connection closed while idle"
                };
                // An idle close (server timeout) is not a failed request.
                if conn.written.is_none() {
                    self.close(i);
                    self.restart.push(i);
                } else {
                    self.fail(i, kind.into());
                }
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                self.fail(i, format!("read: {e}"));
                return;
            }
        };
        conn.rend += n;
        self.parse(i);
    }

    /// Handles every whole record in connection `i`'s buffer.
    fn parse(&mut self, i: usize) {
        loop {
            let conn = &mut self.conns[i];
            let reply = match decode_reply(&conn.rbuf[conn.rstart..conn.rend]) {
                Ok(Status::Partial) => break,
                Ok(Status::Complete((used, reply))) => {
                    conn.rstart += used;
                    reply
                }
                Err(e) => {
                    self.fail(i, format!("protocol error: {e}"));
                    return;
                }
            };
            if conn.written.is_none() {
                self.fail(i, "record while no request was in flight".into());
                return;
            }
            match reply {
                Reply::Stdout { data, .. } => {
                    let room = HEAD_KEEP - conn.head.len();
                    conn.head.extend_from_slice(&data[..data.len().min(room)]);
                }
                Reply::Stderr { .. } => {}
                Reply::End { status, .. } => {
                    let latency = conn.sent_at.elapsed();
                    self.result
                        .latencies
                        .push(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
                    self.in_flight -= 1;
                    conn.written = None;
                    let verdict = if status != ProtocolStatus::RequestComplete.as_u8() {
                        Err(format!("END_REQUEST protocol status {status}"))
                    } else {
                        check_status(&conn.head)
                    };
                    match verdict {
                        Ok(()) => self.result.ok += 1,
                        Err(kind) => self.result.error(kind),
                    }
                    if conn.rstart == conn.rend {
                        conn.rstart = 0;
                        conn.rend = 0;
                    }
                    if !self.keep_alive {
                        self.close(i);
                    }
                    self.start_request(i);
                    return;
                }
                Reply::GetValuesResult(_) | Reply::UnknownType(_) => {
                    self.fail(i, "unexpected management record".into());
                    return;
                }
            }
        }
        let conn = &mut self.conns[i];
        if conn.rstart == conn.rend {
            conn.rstart = 0;
            conn.rend = 0;
        }
    }
}

/// `Ok` when the CGI header block has no `Status` line or a 200 one; else the
/// offending line as the error kind.
fn check_status(stdout: &[u8]) -> Result<(), String> {
    let end = find(stdout, b"\r\n\r\n")
        .or_else(|| find(stdout, b"\n\n"))
        .unwrap_or(stdout.len());
    for line in stdout[..end].split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if line[..colon].eq_ignore_ascii_case(b"status") {
            let value = String::from_utf8_lossy(&line[colon + 1..])
                .trim()
                .to_owned();
            return if value.starts_with("200") {
                Ok(())
            } else {
                Err(format!("Status: {value}"))
            };
        }
    }
    if stdout.is_empty() {
        return Err("empty response".into());
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest rank; the epsilon keeps 99.9% of 1000 at rank 999 despite rounding.
    let rank = (p / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

fn report(
    args: &Args,
    total: &ThreadResult,
    elapsed: Duration,
    server_cpu: Option<Duration>,
    client_cpu: Option<Duration>,
) {
    let mut lat = total.latencies.clone();
    lat.sort_unstable();
    let done = total.ok + total.error_count();
    let secs = elapsed.as_secs_f64();
    println!(
        "target      {} ({} connections, {} threads, {})",
        args.connect,
        args.connections,
        args.threads,
        if args.no_keep_alive {
            "connection per request"
        } else {
            "keep-alive"
        }
    );
    println!("requests    {done}");
    println!("errors      {}", total.error_count());
    println!("elapsed     {secs:.3} s");
    println!("throughput  {:.0} req/s", done as f64 / secs.max(1e-9));
    println!(
        "latency µs  p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        percentile(&lat, 99.9),
        percentile(&lat, 100.0)
    );
    let per_request = |cpu: Duration| cpu.as_secs_f64() * 1e6 / (done.max(1) as f64);
    if let Some(cpu) = server_cpu {
        println!(
            "server cpu  {:.2} µs/request ({:.3} s total, pid {})",
            per_request(cpu),
            cpu.as_secs_f64(),
            args.server_pid.unwrap_or(0)
        );
    } else if args.server_pid.is_some() {
        println!("server cpu  unavailable (could not read /proc/PID/stat)");
    }
    if let Some(cpu) = client_cpu {
        println!(
            "client cpu  {:.2} µs/request ({:.3} s total, {:.0}% of one core)",
            per_request(cpu),
            cpu.as_secs_f64(),
            100.0 * cpu.as_secs_f64() / secs.max(1e-9)
        );
    }
    if !total.errors.is_empty() {
        let mut kinds: Vec<_> = total.errors.iter().collect();
        kinds.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        println!("error kinds:");
        for (kind, count) in kinds.iter().take(ERROR_KINDS_SHOWN) {
            println!("  {count:>10}  {kind}");
        }
        if kinds.len() > ERROR_KINDS_SHOWN {
            println!("  ... and {} more kinds", kinds.len() - ERROR_KINDS_SHOWN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_check_accepts_200_or_none() {
        assert_eq!(
            check_status(b"Status: 200 OK\r\nContent-Type: text/html\r\n\r\nhi"),
            Ok(())
        );
        assert_eq!(check_status(b"Content-Type: text/html\r\n\r\nhi"), Ok(()));
        assert_eq!(check_status(b"status:200\n\nx"), Ok(()));
        assert_eq!(
            check_status(b"Content-Type: text/html\r\nStatus: 503 Service Unavailable\r\n\r\n"),
            Err("Status: 503 Service Unavailable".into())
        );
        // A "Status:" in the body does not count.
        assert_eq!(check_status(b"X: y\r\n\r\nStatus: 500"), Ok(()));
        assert!(check_status(b"").is_err());
    }

    #[test]
    fn shares_add_up() {
        for threads in 1..5 {
            let total: u64 = (0..threads).map(|t| share(100_003, threads, t)).sum();
            assert_eq!(total, 100_003);
        }
    }

    #[test]
    fn percentiles_pick_ranks() {
        let v: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
        assert_eq!(percentile(&v, 50.0), 500.0);
        assert_eq!(percentile(&v, 99.0), 990.0);
        assert_eq!(percentile(&v, 99.9), 999.0);
        assert_eq!(percentile(&v, 100.0), 1000.0);
    }
}
