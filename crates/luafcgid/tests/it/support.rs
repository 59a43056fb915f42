//! Test support: a daemon started in-process on `127.0.0.1:0`, a unix socket and an HTTP
//! port in a temporary document root, and a blocking FastCGI client built on the
//! workspace's codec.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fastcgi_protocol::client::{
    decode_reply, encode_begin_request, encode_params, encode_stdin, Reply,
};
use fastcgi_protocol::{Status, FLAG_KEEP_CONN, ROLE_RESPONDER};
use luafcgid::config::{ListenAddr, Overrides, RawConfig};
use luafcgid::server::Server;

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub tcp: SocketAddr,
    pub unix: PathBuf,
    pub http: SocketAddr,
    /// The metrics listener, when the overrides asked for one.
    pub metrics: Option<SocketAddr>,
    pub log: PathBuf,
    pub shared: std::sync::Arc<luafcgid::server::Shared>,
    pub bound: Vec<ListenAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub const HELLO: &str = "s = \"Hello World\"\nfunction handler() return s end\n";

impl Daemon {
    /// Starts a daemon whose root holds `files`; `config` is extra TOML.
    pub fn start(config: &str, files: &[(&str, &str)]) -> Daemon {
        Self::start_with(config, files, |_| {})
    }

    pub fn start_with(
        config: &str,
        files: &[(&str, &str)],
        tweak: impl FnOnce(&mut Overrides),
    ) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("www");
        std::fs::create_dir_all(&root).unwrap();
        for (name, text) in files {
            let p = root.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let unix = dir.path().join("fcgi.sock");
        let log = dir.path().join("audit.jsonl");
        let raw = RawConfig::parse(config, Path::new("test.toml")).unwrap();
        let mut o = Overrides {
            listen: vec!["127.0.0.1:0".into(), unix.display().to_string()],
            docroot: vec![root.clone()],
            http: Some("127.0.0.1:0".into()),
            log: Some(log.clone()),
            workers: Some(2),
            ..Overrides::default()
        };
        tweak(&mut o);
        let unix = o
            .listen
            .iter()
            .find(|l| l.contains('/'))
            .map(PathBuf::from)
            .unwrap_or(unix);
        let config = raw.validate("test.toml", &o).unwrap();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(luafcgid::server::runtime_threads(2))
                .thread_stack_size(luafcgid::server::THREAD_STACK)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let server = Server::bind(config).await.unwrap();
                addr_tx
                    .send((
                        server.local_addrs(),
                        server.http_addr(),
                        server.metrics_addr(),
                        server.shared(),
                    ))
                    .unwrap();
                server
                    .run(async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let (addrs, http, metrics, shared): (Vec<ListenAddr>, _, _, _) = addr_rx.recv().unwrap();
        let tcp = addrs
            .iter()
            .filter(|a| matches!(a, ListenAddr::Tcp(t) if t.is_ipv4()))
            .find_map(|a| match a {
                ListenAddr::Tcp(t) => Some(*t),
                _ => None,
            })
            .unwrap();
        Daemon {
            dir,
            root,
            tcp,
            unix,
            http: http.unwrap(),
            metrics,
            log,
            shared,
            bound: addrs,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn script(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }

    /// Replaces a file under the root atomically (a temporary file renamed over it), so the
    /// daemon's sweeper never reads it half written.
    pub fn write(&self, rel: &str, text: &str) {
        write(&self.path(rel), text);
    }

    pub fn client(&self) -> Client {
        Client::new(Box::new(TcpStream::connect(self.tcp).unwrap()))
    }

    pub fn unix_client(&self) -> Client {
        Client::new(Box::new(UnixStream::connect(&self.unix).unwrap()))
    }

    /// GET of one script on a fresh TCP connection.
    pub fn get(&self, rel: &str) -> Response {
        self.client().get(&self.script(rel))
    }

    /// A fresh TCP connection on which a GET of one script (id 1, keep-alive) was sent and
    /// not read.
    pub fn sent_get(&self, rel: &str) -> Client {
        let mut c = self.client();
        c.send(&Client::encode(
            1,
            true,
            &params_for(&self.script(rel), "GET", &[]),
            b"",
        ));
        c
    }

    /// Waits (bounded) until at least `n` requests wait for a state.
    pub fn wait_queued(&self, n: usize) {
        let t = std::time::Instant::now();
        while self.shared.waiting.waiting() < n {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "never saw {n} waiting"
            );
            std::thread::yield_now();
        }
    }

    /// Waits (bounded) until `n` states are leased to running requests.
    pub fn wait_leased(&self, n: usize) {
        self.wait_for_leased(|leased| leased >= n, &format!("never saw {n} busy states"));
    }

    /// Waits (bounded) until at most `n` states are leased.
    pub fn wait_leased_at_most(&self, n: usize) {
        self.wait_for_leased(|leased| leased <= n, "states stay busy");
    }

    fn wait_for_leased(&self, done: impl Fn(usize) -> bool, what: &str) {
        let t = std::time::Instant::now();
        loop {
            let s = self.shared.pool.stats();
            if done(s.states - s.idle) {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{what}: {s:?}");
            std::thread::yield_now();
        }
    }

    /// Stops the daemon and returns the audit log lines, parsed.
    pub fn stop(&mut self) -> Vec<serde_json::Value> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub trait Stream: Read + Write + Send {
    fn set_timeout(&self, d: Option<Duration>);
}
impl Stream for TcpStream {
    fn set_timeout(&self, d: Option<Duration>) {
        self.set_read_timeout(d).unwrap();
    }
}
impl Stream for UnixStream {
    fn set_timeout(&self, d: Option<Duration>) {
        self.set_read_timeout(d).unwrap();
    }
}

#[derive(Debug, Default, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub stdout_records: usize,
    pub largest_record: usize,
    pub app_status: u32,
    pub protocol_status: u8,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Parses CGI output.
pub fn parse_cgi(out: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let Some(i) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, vec![], out.to_vec());
    };
    let head = String::from_utf8_lossy(&out[..i]).into_owned();
    let mut status = 200;
    let mut headers = Vec::new();
    for line in head.split("\r\n") {
        let (n, v) = line.split_once(':').unwrap();
        let v = v.trim().to_string();
        if n.eq_ignore_ascii_case("status") {
            status = v[..3].parse().unwrap();
        }
        headers.push((n.to_string(), v));
    }
    (status, headers, out[i + 4..].to_vec())
}

pub struct Client {
    pub stream: Box<dyn Stream>,
    buf: Vec<u8>,
}

pub fn params_for(script: &str, method: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = vec![
        ("SCRIPT_FILENAME".into(), script.into()),
        ("REQUEST_METHOD".into(), method.into()),
        ("REQUEST_URI".into(), "/test".into()),
        ("QUERY_STRING".into(), "".into()),
        ("REMOTE_ADDR".into(), "127.0.0.1".into()),
    ];
    for (k, v) in extra {
        p.retain(|(n, _)| n != k);
        p.push((k.to_string(), v.to_string()));
    }
    p
}

impl Client {
    pub fn new(stream: Box<dyn Stream>) -> Client {
        stream.set_timeout(Some(Duration::from_secs(20)));
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Encodes a whole request.
    pub fn encode(id: u16, keep: bool, params: &[(String, String)], body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_begin_request(
            id,
            ROLE_RESPONDER,
            if keep { FLAG_KEEP_CONN } else { 0 },
            &mut out,
        );
        encode_params(
            id,
            params.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())),
            &mut out,
        );
        encode_stdin(id, body, &mut out);
        out
    }

    pub fn request(
        &mut self,
        id: u16,
        keep: bool,
        params: &[(String, String)],
        body: &[u8],
    ) -> Response {
        let bytes = Self::encode(id, keep, params, body);
        self.send(&bytes);
        self.response(id)
    }

    pub fn get(&mut self, script: &str) -> Response {
        self.request(1, true, &params_for(script, "GET", &[]), b"")
    }

    /// Reads one record; None at EOF.
    pub fn reply(&mut self) -> Option<Reply> {
        loop {
            match decode_reply(&self.buf).unwrap() {
                Status::Complete((used, reply)) => {
                    self.buf.drain(..used);
                    return Some(reply);
                }
                Status::Partial => {
                    let mut chunk = [0u8; 65536];
                    let n = match self.stream.read(&mut chunk) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
                        Err(e) => panic!("read: {e}"),
                    };
                    if n == 0 {
                        return None;
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    /// Sends `bytes`; an error (the peer closed) is given, not a panic.
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads records until END_REQUEST of `id`; records of other ids are an error.
    pub fn response(&mut self, id: u16) -> Response {
        self.try_response(id)
            .expect("connection closed before END_REQUEST")
    }

    /// [`Client::response`], or `None` when the connection ends before END_REQUEST.
    pub fn try_response(&mut self, id: u16) -> Option<Response> {
        let mut stdout = Vec::new();
        let mut r = Response::default();
        loop {
            match self.reply()? {
                Reply::Stdout { id: rid, data } => {
                    assert_eq!(rid, id);
                    if !data.is_empty() {
                        r.stdout_records += 1;
                        r.largest_record = r.largest_record.max(data.len());
                    }
                    stdout.extend_from_slice(&data);
                }
                Reply::Stderr { .. } => {}
                Reply::End {
                    id: rid,
                    app_status,
                    status,
                } => {
                    assert_eq!(rid, id);
                    r.app_status = app_status;
                    r.protocol_status = status;
                    break;
                }
                other => panic!("unexpected record {other:?}"),
            }
        }
        let (status, headers, body) = parse_cgi(&stdout);
        r.status = status;
        r.headers = headers;
        r.body = body;
        Some(r)
    }

    /// True when the peer closed the connection (EOF or reset) within the read timeout.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0))
            || matches!(self.stream.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    }
}

/// A raw HTTP/1.1 exchange with the development listener.
pub fn http_get(addr: SocketAddr, target: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    (status, out)
}

/// The `request` events of an audit log.
pub fn requests(lines: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    lines.iter().filter(|l| l["event"] == "request").collect()
}

/// The outcome of each request line, in order.
pub fn outcomes(lines: &[serde_json::Value]) -> Vec<serde_json::Value> {
    requests(lines)
        .iter()
        .map(|r| r["outcome"].clone())
        .collect()
}

/// The request id a client got.
pub fn id_of(r: &Response) -> String {
    r.header("X-Request-Id")
        .unwrap_or_else(|| panic!("no X-Request-Id: {r:?}"))
        .to_string()
}

/// Replaces the file at `p` atomically (a temporary file renamed over it), so a daemon
/// never reads it half written.
pub fn write(p: &Path, text: &str) {
    let dir = p.parent().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let tmp = dir.join(".luafcgid-test-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, p).unwrap();
}

/// The command that runs `argv` as it is.
pub fn command_of(argv: Vec<std::ffi::OsString>) -> Command {
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    c
}

/// A daemon run from its binary on a unix socket in `dir`, its stderr in `dir/stderr`.
pub struct Process {
    pub child: Child,
    pub sock: PathBuf,
    pub root: PathBuf,
    pub stderr: PathBuf,
}

impl Process {
    pub fn start(dir: &Path, log: &Path) -> Process {
        Self::start_with(dir, log, command_of)
    }

    /// [`Process::start`] with `--config config`.
    pub fn start_with_config(dir: &Path, log: &Path, config: &Path) -> Process {
        let config = config.to_path_buf();
        Self::start_with(dir, log, move |mut argv| {
            argv.push("--config".into());
            argv.push(config.into());
            command_of(argv)
        })
    }

    /// [`Process::start`], the command built by `wrap` from the daemon's argv (which it may
    /// extend, or run under another program); stdout and stderr are set afterwards.
    pub fn start_with(
        dir: &Path,
        log: &Path,
        wrap: impl FnOnce(Vec<std::ffi::OsString>) -> Command,
    ) -> Process {
        let root = std::fs::canonicalize(dir).unwrap().join("www");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("hello.lua"), HELLO).unwrap();
        let sock = dir.join("fcgi.sock");
        let stderr = dir.join("stderr");
        let argv: Vec<std::ffi::OsString> = [
            env!("CARGO_BIN_EXE_luafcgid").as_ref(),
            "serve".as_ref(),
            "--workers".as_ref(),
            "2".as_ref(),
            "--docroot".as_ref(),
            root.as_os_str(),
            "--listen".as_ref(),
            sock.as_os_str(),
            "--log".as_ref(),
            log.as_os_str(),
        ]
        .iter()
        .map(|a: &&std::ffi::OsStr| a.to_os_string())
        .collect();
        let mut command = wrap(argv);
        command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let child = command.spawn().unwrap();
        let mut p = Process {
            child,
            sock,
            root,
            stderr,
        };
        // Ready when the socket accepts: the file exists a moment before it listens.
        let t = Instant::now();
        while UnixStream::connect(&p.sock).is_err() {
            if t.elapsed() > Duration::from_secs(10) || p.child.try_wait().unwrap().is_some() {
                p.kill();
                panic!("the daemon never listened on its socket");
            }
            std::thread::yield_now();
        }
        p
    }

    /// GETs hello.lua; gives the request id.
    pub fn hello(&self) -> String {
        let mut c = Client::new(Box::new(UnixStream::connect(&self.sock).unwrap()));
        let r = c.get(&self.root.join("hello.lua").display().to_string());
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "Hello World");
        id_of(&r)
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM, then waits (bounded) for exit 0.
    pub fn stop(mut self) -> String {
        self.signal("TERM");
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if t.elapsed() > Duration::from_secs(20) {
                self.kill();
                panic!("the daemon did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(0));
        std::fs::read_to_string(&self.stderr).unwrap()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// CPU time (user + system) used so far, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after_name.split(' ').collect();
        // Fields 14 and 15 of stat(5), counted from the state (field 3).
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
}

/// Most time any wait of the tests on a daemon binary may take.
pub const BOUND: Duration = Duration::from_secs(30);

/// What one request of the load got.
#[derive(Debug, Clone)]
pub struct Sent {
    /// When its last byte was written.
    pub written: Instant,
    /// The response, if one came whole.
    pub answer: Option<(u16, String, Option<String>)>,
}

/// Clients sending `script` over their own unix connections until `stop` (or a bound on
/// count and time); `fresh` clients open a connection per request, the others keep theirs.
/// A client whose connection ends opens a new one; it stops when the socket is gone.
pub struct Load {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<Vec<Sent>>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(sock: &Path, script: &str, keep: usize, fresh: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(vec![Vec::new(); keep + fresh]));
        let threads = (0..keep + fresh)
            .map(|i| {
                let (sock, stop, results) = (sock.to_path_buf(), stop.clone(), results.clone());
                let params = params_for(script, "GET", &[]);
                let keep_conn = i < keep;
                std::thread::spawn(move || {
                    let bytes = Client::encode(1, keep_conn, &params, b"");
                    let started = Instant::now();
                    let mut client: Option<Client> = None;
                    for _ in 0..200_000 {
                        if stop.load(Ordering::Relaxed) || started.elapsed() > BOUND {
                            return;
                        }
                        if client.is_none() {
                            match UnixStream::connect(&sock) {
                                Ok(s) => client = Some(Client::new(Box::new(s))),
                                Err(_) => return,
                            }
                        }
                        let c = client.as_mut().unwrap();
                        if c.try_send(&bytes).is_err() {
                            client = None;
                            continue;
                        }
                        let written = Instant::now();
                        let answer = c.try_response(1).map(|r| {
                            let generation = r.header("X-Generation").map(str::to_string);
                            (r.status, r.text(), generation)
                        });
                        if answer.is_none() || !keep_conn {
                            client = None;
                        }
                        results.lock().unwrap()[i].push(Sent { written, answer });
                    }
                })
            })
            .collect();
        Load {
            stop,
            results,
            threads,
        }
    }

    /// Requests answered so far.
    pub fn answered(&self) -> usize {
        let r = self.results.lock().unwrap();
        r.iter().flatten().filter(|s| s.answer.is_some()).count()
    }

    /// Waits (bounded) until `done` holds of the results.
    pub fn wait_for(&self, what: &str, done: impl Fn(&[Vec<Sent>]) -> bool) {
        let t = Instant::now();
        while !done(&self.results.lock().unwrap()) {
            assert!(t.elapsed() < BOUND, "the load never saw {what}");
            std::thread::yield_now();
        }
    }

    /// Stops the clients and gives what each sent.
    pub fn finish(self) -> Vec<Vec<Sent>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        Arc::try_unwrap(self.results).unwrap().into_inner().unwrap()
    }
}

/// The audit log's whole lines so far, parsed. Read while the daemon writes, the file may
/// end inside a batch the writer has not finished copying in: that unterminated tail is
/// left for the next read, while every line that ends in a newline must parse.
pub fn audit_lines(log: &Path) -> Vec<serde_json::Value> {
    let bytes = std::fs::read(log).unwrap_or_default();
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    std::str::from_utf8(&bytes[..end])
        .expect("the audit log is UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

pub fn has_event(log: &Path, event: &str) -> bool {
    audit_lines(log).iter().any(|l| l["event"] == event)
}

/// Waits (bounded) until the audit log holds `event`.
pub fn wait_for_event(log: &Path, event: &str) {
    let t = Instant::now();
    while !has_event(log, event) {
        assert!(t.elapsed() < BOUND, "no {event} event in the audit log");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A web server in front of the daemon, run in the foreground on a loopback port with a
/// private config; killed (by its PID) when dropped.
pub struct FrontEnd {
    child: Child,
    pub port: u16,
}

impl Drop for FrontEnd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The first of `candidates` that exists; a missing front end fails the test.
pub fn front_end_binary(name: &str, candidates: &[&str]) -> PathBuf {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("{name} is required for the end-to-end tests (`.ci/run` installs it)")
        })
}

impl FrontEnd {
    /// Starts the command `command(port)` gives, on a fresh port, until one accepts
    /// connections (bounded); a server that exits (its port was taken) is retried. `log`
    /// is the server's error log (its stderr goes next to it), shown when it fails.
    pub fn start(log: &Path, mut command: impl FnMut(u16) -> Command) -> FrontEnd {
        for attempt in 0..5 {
            let port = free_port();
            let stderr = std::fs::File::create(log.with_extension("stderr")).unwrap();
            let mut child = command(port)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap();
            let t = Instant::now();
            loop {
                // Ours only if it is still running once the port answers (a server that
                // lost the port to another exits).
                if TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && matches!(child.try_wait(), Ok(None))
                {
                    return FrontEnd { child, port };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if t.elapsed() > Duration::from_secs(15) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let stderr = std::fs::read_to_string(log.with_extension("stderr")).unwrap_or_default();
            eprintln!("front end attempt {attempt} on port {port} failed: {text}{stderr}");
        }
        panic!("the front end could not start; see {}", log.display());
    }

    /// One HTTP exchange with this front end.
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> HttpReply {
        http_exchange(self.port, method, path, body)
    }
}

/// Starts a private nginx in `dir` whose `http` block is `http_block(port)` (the port it
/// must listen on); `fastcgi_params` is next to its config.
pub fn start_nginx(dir: &Path, http_block: impl Fn(u16) -> String) -> FrontEnd {
    let binary = front_end_binary(
        "nginx",
        &["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"],
    );
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let params = [
        "/etc/nginx/fastcgi_params",
        "/usr/local/nginx/conf/fastcgi_params",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("nginx's fastcgi_params");
    std::fs::copy(params, dir.join("fastcgi_params")).unwrap();
    let log = dir.join("logs/error.log");
    let conf_path = dir.join("nginx.conf");
    FrontEnd::start(&log, |port| {
        let conf = format!(
            r#"
daemon off;
master_process off;
worker_processes 1;
error_log {prefix}/logs/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_max_body_size 4m;
{block}
}}
"#,
            prefix = dir.display(),
            block = http_block(port),
        );
        std::fs::write(&conf_path, conf).unwrap();
        let mut c = Command::new(&binary);
        c.arg("-p").arg(dir).arg("-c").arg(&conf_path);
        c
    })
}

/// An HTTP response: status, header block, body.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.split("\r\n").skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP/1.0 request on a fresh connection (so no server answers chunked), read to EOF.
pub fn http_exchange(port: u16, method: &str, path: &str, body: &[u8]) -> HttpReply {
    try_http_exchange(port, method, path, body).unwrap()
}

/// [`http_exchange`], or the error when the server is gone or the answer is cut short.
pub fn try_http_exchange(
    port: u16,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<HttpReply> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let cut = || {
        std::io::Error::other(format!(
            "no HTTP response: {:?}",
            String::from_utf8_lossy(&out)
        ))
    };
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(cut)?;
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(cut)?;
    Ok(HttpReply {
        status,
        head,
        body: out[split + 4..].to_vec(),
    })
}

/// What the daemon holds, from /proc.
#[derive(Debug, Clone, Copy)]
pub struct Health {
    pub fds: usize,
    pub threads: usize,
    pub rss_kib: u64,
}

impl Health {
    pub fn of(p: &Process) -> Health {
        let pid = p.child.id();
        let count = |dir: String| std::fs::read_dir(dir).unwrap().count();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        Health {
            fds: count(format!("/proc/{pid}/fd")),
            threads: count(format!("/proc/{pid}/task")),
            rss_kib,
        }
    }

    /// Waits (bounded) until the daemon is back to `self`: no more descriptors once its
    /// connections have closed, no fewer threads (the runtime's blocking pool may have
    /// grown), a control request answered, and memory within `slack_kib` of where it was.
    pub fn assert_recovered(&self, p: &Process, slack_kib: u64) {
        p.hello();
        let t = Instant::now();
        loop {
            let now = Health::of(p);
            if now.fds <= self.fds && now.threads >= self.threads {
                assert!(
                    now.rss_kib <= self.rss_kib + slack_kib,
                    "memory grew from {} KiB to {} KiB",
                    self.rss_kib,
                    now.rss_kib
                );
                return;
            }
            assert!(t.elapsed() < BOUND, "before {self:?}, after {now:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
