//! `limit-accuracy`: how late the daemon's time limit fires for every runaway script of
//! the sandbox corpus, with the daemon otherwise idle and under load from other requests.
//!
//! It starts the real daemon (`luafcgid serve`) as a child process on a unix socket in a
//! fresh temporary directory, with a config it writes: an instruction budget so high
//! (10^10, for the init run too) that every runaway script ends on the wall-clock limit,
//! `timeout_ms` and `init_timeout_ms` from `--timeout-ms`, 64 MiB of memory, 1 MiB of
//! output, one clone per script, and two document roots: the corpus (`sandbox-tests/`)
//! and a directory holding a hello-world script in a tenant directory of its own (`load/`).
//! It picks the corpus scripts whose header
//! says `-- expect: limit_time` or `-- expect: limit_cpu`, sends each one `--repeat` times,
//! one request at a time, each on a new connection, and measures the wall time from
//! connecting to the complete response (`END_REQUEST`). The audit log, a file in the
//! temporary directory, gives each request's `outcome` and `duration_us` (requests are
//! matched by a marker in their URI). Overrun is the measured time minus the limit; the
//! bound is the larger of 10% of the limit and 50 ms. A first pass runs with the daemon
//! otherwise idle; a second (skipped with `--no-load`) while `--connections` keep-alive
//! connections send hello-world requests in a closed loop from a thread of this program,
//! whose throughput and latency over the pass are reported too. For each request it also
//! reads from `/proc/PID/task/*/schedstat` how long the daemon's busiest thread during the
//! request (normally the one running the script) and the measuring thread were runnable
//! but waiting for a CPU: an overrun larger than that wait is not explained by a machine
//! busy with other work.
//!
//! It does not check outcomes other than the time limit (the corpus harness in
//! `cargo test` does that), does not measure the instruction budget, and never sends two
//! corpus requests at once. Scripts that end otherwise (say `limit_memory` before the clock
//! runs out) are listed but left out of the accuracy figure. A request not answered within
//! the client timeout (10 times the limit unless `--client-timeout-ms` says otherwise) is
//! reported as an escape and its connection dropped, so the run always ends by itself.
//! The daemon is killed through its child handle (its PID) and the temporary directory
//! removed on every way out. Linux, unix sockets only.
//!
//! Run: `limit-accuracy --daemon target/release/luafcgid` (exit status 0 when every pass
//! passes, 1 when one fails, 2 when the run could not be made).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use fastcgi_protocol::client::{decode_reply, Reply};
use fastcgi_protocol::Status;
use luafcgid_bench::daemon::{
    build_request, cgi_status, daemon_binary, drain_replies, find, load_average, toml_path, Daemon,
    TempDir, HEAD_KEEP, START_PATIENCE,
};
use luafcgid_bench::epoll::{self, Epoll, Ready};
use luafcgid_bench::{read_schedstat, sched_counters, Address, Stream};

/// Measures how late the time limit fires for the corpus' runaway scripts.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The daemon binary (default: `luafcgid` next to this program).
    #[arg(long, value_name = "PATH")]
    daemon: Option<PathBuf>,
    /// The corpus directory (default: the repository's `sandbox-tests/`).
    #[arg(long, value_name = "DIR")]
    corpus: Option<PathBuf>,
    /// The time limit given to every script (`timeout_ms` and `init_timeout_ms`).
    #[arg(long, default_value_t = 250)]
    timeout_ms: u64,
    /// Background keep-alive connections sending hello-world requests in the loaded pass.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Requests per script and pass.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Run only the pass without background load.
    #[arg(long)]
    no_load: bool,
    /// Give up on a corpus request after this long (default: 10 times the limit).
    #[arg(long, value_name = "MS")]
    client_timeout_ms: Option<u64>,
    /// Lua worker threads of the daemon (default: the daemon's, one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Only scripts whose file name contains this text (repeatable).
    #[arg(long, value_name = "TEXT")]
    only: Vec<String>,
}

/// Marks the URIs of corpus requests, so their audit lines can be found among the load's.
const MARKER: &str = "limit-accuracy=";
/// How long an audit line may lag behind its response.
const AUDIT_PATIENCE: Duration = Duration::from_secs(3);
/// Background load runs this long before the first corpus request of a pass.
const LOAD_WARMUP: Duration = Duration::from_millis(500);

fn main() {
    let args = Args::parse();
    let code = match run(&args) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("limit-accuracy: {e}");
            2
        }
    };
    std::process::exit(code);
}

/// Everything a pass needs that does not change between passes.
#[derive(Debug)]
struct Setup {
    cases: Vec<Case>,
    corpus: PathBuf,
    socket: PathBuf,
    hello: PathBuf,
    limit: Duration,
    bound: Duration,
    client_timeout: Duration,
    repeat: usize,
    connections: usize,
}

/// One corpus script under test.
#[derive(Debug)]
struct Case {
    /// File name, relative to the corpus.
    name: String,
    path: PathBuf,
    /// The outcome its header names.
    expect: String,
}

fn run(args: &Args) -> Result<bool, String> {
    if args.repeat == 0 || args.timeout_ms == 0 {
        return Err("--repeat and --timeout-ms must be at least 1".into());
    }
    let daemon_path = daemon_binary(args.daemon.as_deref())?;
    let corpus_arg = args.corpus.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("..")
            .join("sandbox-tests")
    });
    let corpus = corpus_arg
        .canonicalize()
        .map_err(|e| format!("corpus {}: {e} (pass --corpus)", corpus_arg.display()))?;
    let cases = select_cases(&corpus, &args.only)?;
    if cases.is_empty() {
        return Err(format!(
            "no script in {} expects limit_time or limit_cpu",
            corpus.display()
        ));
    }
    let limit = Duration::from_millis(args.timeout_ms);

    let dir = TempDir::create("limit-accuracy")?;
    let www = dir.path().join("www");
    std::fs::create_dir(&www).map_err(|e| format!("{}: {e}", www.display()))?;
    // In a directory of its own: another tenant than the corpus scripts (which sit in their
    // document root, tenant ""), as the load of other tenants' requests is what is measured.
    let hello = www.join("load/hello.lua");
    std::fs::create_dir_all(www.join("load")).map_err(|e| format!("{}: {e}", www.display()))?;
    std::fs::write(&hello, "function handler() return \"Hello World\" end\n")
        .map_err(|e| format!("{}: {e}", hello.display()))?;
    let socket = dir.path().join("luafcgid.sock");
    let log = dir.path().join("audit.jsonl");
    let config = dir.path().join("luafcgid.toml");
    std::fs::write(&config, config_text(&socket, &corpus, &www, args)?)
        .map_err(|e| format!("{}: {e}", config.display()))?;
    // Dropped before `dir`: the daemon is killed before its directory goes.
    let mut daemon = Daemon::start(
        &daemon_path,
        &config,
        &log,
        &dir.path().join("daemon.stderr"),
    )?;
    daemon.wait_ready(&socket)?;
    let mut audit = AuditTail::open(&log)?;

    let setup = Setup {
        cases,
        corpus,
        socket,
        hello,
        limit,
        bound: (limit / 10).max(Duration::from_millis(50)),
        client_timeout: args
            .client_timeout_ms
            .map_or(limit * 10, Duration::from_millis),
        repeat: args.repeat,
        connections: args.connections,
    };
    check_hello(&setup)?;

    println!(
        "limit-accuracy: daemon {} (pid {}), {} scripts × {} requests, time limit {} ms, \
         bound {} ms, client timeout {} ms",
        daemon_path.display(),
        daemon.pid(),
        setup.cases.len(),
        setup.repeat,
        setup.limit.as_millis(),
        setup.bound.as_millis(),
        setup.client_timeout.as_millis()
    );
    println!("load average at start: {}", load_average());
    let mut passes = vec![false];
    if !args.no_load && args.connections > 0 {
        passes.push(true);
    }
    let mut all_pass = true;
    let mut seq = 0u64;
    for loaded in passes {
        let report = run_pass(&setup, &mut daemon, &mut audit, loaded, &mut seq)?;
        print_pass(&setup, &report);
        all_pass &= report.pass();
        if report.daemon_died.is_some() {
            break;
        }
    }
    if audit.dropped > 0 {
        println!(
            "note: the daemon dropped {} audit lines (log_dropped)",
            audit.dropped
        );
    }
    println!("load average at end: {}", load_average());
    println!("\noverall: {}", if all_pass { "PASS" } else { "FAIL" });
    Ok(all_pass)
}

/// The corpus scripts whose header expects `limit_time` or `limit_cpu`, by name.
fn select_cases(corpus: &Path, only: &[String]) -> Result<Vec<Case>, String> {
    let entries = std::fs::read_dir(corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
    let mut cases = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", corpus.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".lua") || !entry.path().is_file() {
            continue;
        }
        if !only.is_empty() && !only.iter().any(|o| name.contains(o.as_str())) {
            continue;
        }
        let text = std::fs::read_to_string(entry.path())
            .map_err(|e| format!("{}: {e}", entry.path().display()))?;
        match expected_outcome(&text) {
            Some(expect) if expect == "limit_time" || expect == "limit_cpu" => cases.push(Case {
                name,
                path: entry.path(),
                expect: expect.to_owned(),
            }),
            _ => {}
        }
    }
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(cases)
}

/// The outcome named by a `-- expect: X` line among the first lines of a script.
fn expected_outcome(text: &str) -> Option<&str> {
    text.lines()
        .take(5)
        .find_map(|l| l.trim().strip_prefix("-- expect:"))
        .and_then(|rest| rest.split_whitespace().next())
}

/// The daemon's config: everything the run depends on is set here, not left to defaults.
fn config_text(socket: &Path, corpus: &Path, www: &Path, args: &Args) -> Result<String, String> {
    let quote = toml_path;
    let mut text = String::new();
    let _ = writeln!(text, "listen = [{}]", quote(socket)?);
    let _ = writeln!(text, "docroot = [{}, {}]", quote(corpus)?, quote(www)?);
    if let Some(w) = args.workers {
        let _ = writeln!(text, "workers = {w}");
    }
    let _ = writeln!(text, "\n[defaults]");
    let _ = writeln!(text, "timeout_ms = {}", args.timeout_ms);
    let _ = writeln!(text, "init_timeout_ms = {}", args.timeout_ms);
    let _ = writeln!(text, "instructions = 10_000_000_000");
    let _ = writeln!(text, "init_instructions = 10_000_000_000");
    let _ = writeln!(text, "memory = \"64MiB\"");
    let _ = writeln!(text, "output = \"1MiB\"");
    let _ = writeln!(text, "clones = 1");
    Ok(text)
}

/// The fields of a `request` audit line this program reads.
#[derive(Debug, Clone)]
struct AuditRecord {
    outcome: String,
    duration_us: Option<u64>,
    error: Option<String>,
}

/// Follows the audit log file as it grows, keeping only the lines of corpus requests.
#[derive(Debug)]
struct AuditTail {
    file: File,
    partial: Vec<u8>,
    /// `uri` → its request line.
    requests: HashMap<String, AuditRecord>,
    /// Sum of `log_dropped` counts seen.
    dropped: u64,
}

impl AuditTail {
    fn open(path: &Path) -> Result<AuditTail, String> {
        let started = Instant::now();
        // The daemon creates the file before it listens; allow for a slow file system.
        let file = loop {
            match File::open(path) {
                Ok(f) => break f,
                Err(e) if started.elapsed() > START_PATIENCE => {
                    return Err(format!("audit log {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        Ok(AuditTail {
            file,
            partial: Vec::new(),
            requests: HashMap::new(),
            dropped: 0,
        })
    }

    /// Reads what the daemon appended since the last call.
    fn poll(&mut self) -> io::Result<()> {
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = match self.file.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.partial.extend_from_slice(&chunk[..n]);
            let Some(last_newline) = self.partial.iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            let rest = self.partial.split_off(last_newline + 1);
            let complete = std::mem::replace(&mut self.partial, rest);
            for line in complete.split(|&b| b == b'\n') {
                self.take_line(line);
            }
        }
    }

    fn take_line(&mut self, line: &[u8]) {
        let wanted =
            find(line, MARKER.as_bytes()).is_some() || find(line, b"log_dropped").is_some();
        if !wanted {
            return;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            return;
        };
        match v.get("event").and_then(|e| e.as_str()) {
            Some("log_dropped") => {
                self.dropped += v.get("count").and_then(|c| c.as_u64()).unwrap_or(0);
            }
            Some("request") => {
                let (Some(uri), Some(outcome)) = (
                    v.get("uri").and_then(|u| u.as_str()),
                    v.get("outcome").and_then(|o| o.as_str()),
                ) else {
                    return;
                };
                self.requests.insert(
                    uri.to_owned(),
                    AuditRecord {
                        outcome: outcome.to_owned(),
                        duration_us: v.get("duration_us").and_then(|d| d.as_u64()),
                        error: v.get("error").and_then(|e| e.as_str()).map(str::to_owned),
                    },
                );
            }
            _ => {}
        }
    }

    /// The audit line of the request with this URI, waiting up to `patience` for it.
    fn wait_for(&mut self, uri: &str, patience: Duration) -> Option<AuditRecord> {
        let started = Instant::now();
        loop {
            if self.poll().is_err() {
                return None;
            }
            if let Some(r) = self.requests.remove(uri) {
                return Some(r);
            }
            if started.elapsed() >= patience {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// How one request ended, client side.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// `END_REQUEST` arrived: the CGI status (200 when none was sent), the protocol
    /// status and the STDOUT bytes kept.
    Complete {
        status: u16,
        protocol_status: u8,
        head: Vec<u8>,
    },
    /// Nothing complete within the client timeout.
    Escape,
    /// The connection failed or the reply was malformed.
    Failed(String),
}

/// Sends `request` on a new connection and waits for the whole reply, at most `timeout`.
/// The time runs from before connecting to the `END_REQUEST` record.
fn timed_request(socket: &Path, request: &[u8], timeout: Duration) -> (Duration, Answer) {
    let started = Instant::now();
    let deadline = started + timeout;
    let answer = exchange(socket, request, deadline, timeout)
        .unwrap_or_else(|e| Answer::Failed(e.to_string()));
    (started.elapsed(), answer)
}

fn exchange(
    socket: &Path,
    request: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> io::Result<Answer> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(request)?;
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut pos = 0;
    let mut head = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        loop {
            match decode_reply(&buf[pos..]) {
                Ok(Status::Partial) => break,
                Ok(Status::Complete((used, reply))) => {
                    pos += used;
                    match reply {
                        Reply::Stdout { data, .. } => {
                            let room = HEAD_KEEP.saturating_sub(head.len());
                            head.extend_from_slice(&data[..data.len().min(room)]);
                        }
                        Reply::Stderr { .. } => {}
                        Reply::End { status, .. } => {
                            return Ok(Answer::Complete {
                                status: cgi_status(&head),
                                protocol_status: status,
                                head,
                            })
                        }
                        other => return Ok(Answer::Failed(format!("unexpected record {other:?}"))),
                    }
                }
                Err(e) => return Ok(Answer::Failed(format!("protocol error: {e}"))),
            }
        }
        buf.drain(..pos);
        pos = 0;
        let now = Instant::now();
        if now >= deadline {
            return Ok(Answer::Escape);
        }
        stream.set_read_timeout(Some(deadline - now))?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Ok(Answer::Failed(
                    "connection closed before END_REQUEST".into(),
                ))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Answer::Escape)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Checks that the hello-world script answers before anything is measured.
fn check_hello(setup: &Setup) -> Result<(), String> {
    let www = setup.hello.parent().unwrap_or(Path::new("/"));
    let request = build_request(&setup.hello, www, "", false);
    match timed_request(&setup.socket, &request, Duration::from_secs(5)).1 {
        Answer::Complete {
            status: 200,
            protocol_status: 0,
            head,
        } if find(&head, b"Hello World").is_some() => Ok(()),
        other => Err(format!(
            "the hello-world script did not answer 200 Hello World: {other:?}"
        )),
    }
}

/// How much CPU the daemon's busiest thread during a request got and how long it waited
/// for one: the thread that ran the script, whose waiting shows in the overrun.
fn busiest_thread(
    before: &HashMap<u32, (u64, u64)>,
    after: &HashMap<u32, (u64, u64)>,
) -> Option<(Duration, Duration)> {
    after
        .iter()
        .map(|(tid, &(cpu, wait))| {
            let (cpu0, wait0) = before.get(tid).copied().unwrap_or((0, 0));
            (cpu.saturating_sub(cpu0), wait.saturating_sub(wait0))
        })
        .max_by_key(|&(cpu, _)| cpu)
        .map(|(cpu, wait)| (Duration::from_nanos(cpu), Duration::from_nanos(wait)))
}

/// One corpus request, measured.
#[derive(Debug)]
struct Trial {
    elapsed: Duration,
    answer: Answer,
    audit: Option<AuditRecord>,
    /// CPU time and CPU wait of the daemon's busiest thread during the request.
    runner: Option<(Duration, Duration)>,
    /// CPU wait of this program's measuring thread during the request.
    client_wait: Option<Duration>,
}

impl Trial {
    fn outcome(&self) -> String {
        match (&self.answer, &self.audit) {
            (Answer::Escape, _) => "ESCAPE".into(),
            (Answer::Failed(_), _) => "FAILED".into(),
            (_, Some(a)) => a.outcome.clone(),
            (_, None) => "no audit line".into(),
        }
    }

    /// Ended on the time limit as expected: counts toward the accuracy figure.
    fn counts(&self) -> bool {
        matches!(self.answer, Answer::Complete { .. })
            && self
                .audit
                .as_ref()
                .is_some_and(|a| a.outcome == "limit_time")
    }

    /// Something the sandbox promises against: no answer, a broken one, or a time-limit
    /// outcome with a status other than 500.
    fn problem(&self) -> Option<String> {
        match &self.answer {
            Answer::Escape => Some(format!(
                "no answer after {:.0} ms (escape)",
                ms(self.elapsed)
            )),
            Answer::Failed(why) => Some(format!("failed after {:.0} ms: {why}", ms(self.elapsed))),
            Answer::Complete {
                status,
                protocol_status,
                ..
            } => {
                if *protocol_status != 0 {
                    Some(format!("END_REQUEST protocol status {protocol_status}"))
                } else if self.counts() && *status != 500 {
                    Some(format!("limit_time answered with status {status}"))
                } else if self.audit.is_none() {
                    Some("no audit line for the request".into())
                } else {
                    None
                }
            }
        }
    }

    fn server_ms(&self) -> Option<f64> {
        self.audit
            .as_ref()
            .and_then(|a| a.duration_us)
            .map(|us| us as f64 / 1000.0)
    }
}

/// What a pass measured.
#[derive(Debug)]
struct PassReport {
    loaded: bool,
    /// Per case (same order as `Setup::cases`), its trials.
    trials: Vec<Vec<Trial>>,
    load: Option<LoadSummary>,
    daemon_died: Option<String>,
    bound: Duration,
    limit: Duration,
}

impl PassReport {
    /// The largest client-side overrun among counted trials and its case.
    fn worst_client(&self) -> Option<(f64, usize)> {
        let mut worst: Option<(f64, usize)> = None;
        for (i, trials) in self.trials.iter().enumerate() {
            for t in trials.iter().filter(|t| t.counts()) {
                let over = ms(t.elapsed) - ms(self.limit);
                if worst.is_none_or(|(w, _)| over > w) {
                    worst = Some((over, i));
                }
            }
        }
        worst
    }

    /// The largest server-side overrun (`duration_us` − limit) among counted trials.
    fn worst_server(&self) -> Option<(f64, usize)> {
        let mut worst: Option<(f64, usize)> = None;
        for (i, trials) in self.trials.iter().enumerate() {
            for t in trials.iter().filter(|t| t.counts()) {
                if let Some(s) = t.server_ms() {
                    let over = s - ms(self.limit);
                    if worst.is_none_or(|(w, _)| over > w) {
                        worst = Some((over, i));
                    }
                }
            }
        }
        worst
    }

    fn problems(&self) -> usize {
        self.trials
            .iter()
            .flatten()
            .filter(|t| t.problem().is_some())
            .count()
    }

    fn pass(&self) -> bool {
        self.daemon_died.is_none()
            && self.problems() == 0
            && self
                .worst_client()
                .is_some_and(|(w, _)| w <= ms(self.bound))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Sets a flag when dropped, so the load thread stops however a pass ends.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn run_pass(
    setup: &Setup,
    daemon: &mut Daemon,
    audit: &mut AuditTail,
    loaded: bool,
    seq: &mut u64,
) -> Result<PassReport, String> {
    let stop = AtomicBool::new(false);
    let www = setup.hello.parent().unwrap_or(Path::new("/"));
    let hello_request = build_request(&setup.hello, www, "", true);
    let pass_no = u8::from(loaded) + 1;
    eprintln!(
        "pass {pass_no}: {} background load",
        if loaded { "with" } else { "without" }
    );
    std::thread::scope(|scope| {
        let loader = loaded.then(|| {
            let (stop, request, socket) = (&stop, &hello_request[..], &setup.socket);
            scope.spawn(move || run_load(socket, request, setup.connections, stop))
        });
        let stop_guard = SetOnDrop(&stop);
        let load_started = Instant::now();
        if loaded {
            std::thread::sleep(LOAD_WARMUP);
        }
        let window_start = load_started.elapsed();
        let mut trials = Vec::with_capacity(setup.cases.len());
        let mut daemon_died = None;
        'cases: for case in &setup.cases {
            let mut case_trials = Vec::with_capacity(setup.repeat);
            for _ in 0..setup.repeat {
                *seq += 1;
                let query = format!("{MARKER}{pass_no}.{seq}");
                let request = build_request(&case.path, &setup.corpus, &query, false);
                let uri = format!("/{}?{query}", case.name);
                let daemon_before = sched_counters(daemon.pid());
                let client_before = read_schedstat(Path::new("/proc/thread-self/schedstat"));
                let (elapsed, answer) =
                    timed_request(&setup.socket, &request, setup.client_timeout);
                let client_after = read_schedstat(Path::new("/proc/thread-self/schedstat"));
                let runner = busiest_thread(&daemon_before, &sched_counters(daemon.pid()));
                let client_wait = client_before
                    .zip(client_after)
                    .map(|((_, w0), (_, w1))| Duration::from_nanos(w1.saturating_sub(w0)));
                let patience = if matches!(answer, Answer::Complete { .. }) {
                    AUDIT_PATIENCE
                } else {
                    Duration::from_secs(1)
                };
                let record = audit.wait_for(&uri, patience);
                case_trials.push(Trial {
                    elapsed,
                    answer,
                    audit: record,
                    runner,
                    client_wait,
                });
                if let Err(why) = daemon.check_alive() {
                    daemon_died = Some(format!("after a request to {}: {why}", case.name));
                    trials.push(case_trials);
                    break 'cases;
                }
            }
            let line: Vec<String> = case_trials
                .iter()
                .map(|t| format!("{:.0}", ms(t.elapsed)))
                .collect();
            eprintln!(
                "  {:<32} {:<14} {} ms",
                case.name,
                case_trials.last().map(Trial::outcome).unwrap_or_default(),
                line.join(" ")
            );
            trials.push(case_trials);
        }
        let window_end = load_started.elapsed();
        drop(stop_guard);
        let load = match loader.map(|h| h.join()) {
            None => None,
            Some(Ok(Ok(log))) => Some(log.summary(setup.connections, window_start, window_end)),
            Some(Ok(Err(e))) => return Err(format!("background load failed: {e}")),
            Some(Err(_)) => return Err("the background load thread panicked".into()),
        };
        Ok(PassReport {
            loaded,
            trials,
            load,
            daemon_died,
            bound: setup.bound,
            limit: setup.limit,
        })
    })
}

fn print_pass(setup: &Setup, r: &PassReport) {
    let limit = ms(setup.limit);
    println!(
        "\n## {} background load{}\n",
        if r.loaded { "With" } else { "Without" },
        r.load
            .as_ref()
            .map(|l| format!(" ({} keep-alive hello-world connections)", l.connections))
            .unwrap_or_default()
    );
    println!(
        "| script | header | outcome | status | overrun min / median / max (client, ms) | max overrun (server, ms) | max CPU wait, daemon / client (ms) | within bound |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut notes = Vec::new();
    for (case, trials) in setup.cases.iter().zip(&r.trials) {
        let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
        let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
        for t in trials {
            *outcomes.entry(t.outcome()).or_default() += 1;
            let s = match &t.answer {
                Answer::Complete { status, .. } => status.to_string(),
                _ => "–".into(),
            };
            *statuses.entry(s).or_default() += 1;
        }
        let mut over: Vec<f64> = trials
            .iter()
            .filter(|t| matches!(t.answer, Answer::Complete { .. }))
            .map(|t| ms(t.elapsed) - limit)
            .collect();
        over.sort_by(f64::total_cmp);
        let client = if over.is_empty() {
            "–".into()
        } else {
            format!(
                "{:+.1} / {:+.1} / {:+.1}",
                over[0],
                median(&over),
                over[over.len() - 1]
            )
        };
        let server = trials
            .iter()
            .filter_map(Trial::server_ms)
            .map(|s| s - limit)
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
            .map_or("–".into(), |s| format!("{s:+.1}"));
        let wait_max = |f: fn(&Trial) -> Option<Duration>| {
            trials
                .iter()
                .filter_map(f)
                .map(ms)
                .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
                .map_or("?".into(), |w| format!("{w:.0}"))
        };
        let waits = format!(
            "{} / {}",
            wait_max(|t| t.runner.map(|r| r.1)),
            wait_max(|t| t.client_wait)
        );
        let counted: Vec<&Trial> = trials.iter().filter(|t| t.counts()).collect();
        let problems: Vec<String> = trials.iter().filter_map(Trial::problem).collect();
        let verdict = if !problems.is_empty() {
            "NO (see below)".to_string()
        } else if counted.is_empty() {
            "excluded".to_string()
        } else {
            let worst = counted
                .iter()
                .map(|t| ms(t.elapsed) - limit)
                .fold(f64::MIN, f64::max);
            let mut v = if worst <= ms(setup.bound) {
                "yes"
            } else {
                "NO"
            }
            .to_string();
            if counted.len() < trials.len() {
                let _ = write!(v, " ({} of {} counted)", counted.len(), trials.len());
            }
            v
        };
        println!(
            "| {} | {} | {} | {} | {client} | {server} | {waits} | {verdict} |",
            case.name,
            case.expect,
            counts_text(&outcomes),
            counts_text(&statuses),
        );
        for p in problems {
            notes.push(format!("{}: {p}", case.name));
        }
        for t in counted
            .iter()
            .filter(|t| ms(t.elapsed) - limit > ms(setup.bound))
        {
            notes.push(format!(
                "{}: over the bound: {:.1} ms to the answer ({:+.1} ms), duration_us {}; \
                 meanwhile the daemon's busiest thread ran {} ms and waited {} ms for a CPU, \
                 the measuring thread waited {} ms",
                case.name,
                ms(t.elapsed),
                ms(t.elapsed) - limit,
                t.audit
                    .as_ref()
                    .and_then(|a| a.duration_us)
                    .map_or("?".into(), |d| d.to_string()),
                t.runner.map_or("?".into(), |r| format!("{:.0}", ms(r.0))),
                t.runner.map_or("?".into(), |r| format!("{:.0}", ms(r.1))),
                t.client_wait
                    .map_or("?".into(), |w| format!("{:.0}", ms(w))),
            ));
        }
        for t in trials.iter().filter(|t| {
            !t.counts() && matches!(t.answer, Answer::Complete { .. }) && t.audit.is_some()
        }) {
            let error = t
                .audit
                .as_ref()
                .and_then(|a| a.error.as_deref())
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(120)
                .collect::<String>();
            notes.push(format!(
                "{}: ended {} after {:.1} ms, not on the time limit ({error}); excluded",
                case.name,
                t.outcome(),
                ms(t.elapsed)
            ));
        }
    }
    println!();
    let bound = ms(setup.bound);
    match r.worst_client() {
        Some((w, i)) => println!(
            "worst overrun (client): {w:+.1} ms ({}); bound {bound:.0} ms (max(10% of {limit:.0} ms, 50 ms)): {}",
            setup.cases[i].name,
            if w <= bound { "within" } else { "OVER" }
        ),
        None => println!("worst overrun (client): no request ended on the time limit"),
    }
    if let Some((w, i)) = r.worst_server() {
        println!(
            "worst overrun (server, duration_us): {w:+.1} ms ({})",
            setup.cases[i].name
        );
    }
    if let Some(l) = &r.load {
        println!(
            "background load: {} connections, {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, {} errors{}",
            l.connections,
            l.rate,
            l.p50_ms,
            l.p99_ms,
            l.max_ms,
            l.errors.values().sum::<u64>(),
            if l.errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", counts_text(&l.errors))
            }
        );
    }
    let excluded: Vec<&str> = setup
        .cases
        .iter()
        .zip(&r.trials)
        .filter(|(_, t)| !t.is_empty() && t.iter().all(|t| !t.counts()))
        .map(|(c, _)| c.name.as_str())
        .collect();
    if !excluded.is_empty() {
        println!(
            "excluded (never ended on the time limit): {}",
            excluded.join(", ")
        );
    }
    for n in &notes {
        println!("note: {n}");
    }
    if let Some(why) = &r.daemon_died {
        println!("the daemon died: {why}");
    }
    println!(
        "pass {}: {}",
        if r.loaded {
            "with load"
        } else {
            "without load"
        },
        if r.pass() { "PASS" } else { "FAIL" }
    );
}

fn counts_text<T: std::fmt::Display>(counts: &BTreeMap<String, T>) -> String {
    if counts.len() == 1 {
        return counts.keys().next().cloned().unwrap_or_default();
    }
    counts
        .iter()
        .map(|(k, n)| format!("{k} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The median of sorted values.
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile of sorted nanoseconds, in milliseconds.
fn percentile_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1e6
}

/// What the background load recorded: each completed request's end (since the load
/// started) and latency, both in nanoseconds, and error kinds with their times.
#[derive(Debug, Default)]
struct LoadLog {
    done: Vec<(u64, u64)>,
    errors: Vec<(u64, String)>,
}

/// The background load over a pass's measuring window.
#[derive(Debug)]
struct LoadSummary {
    connections: usize,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: BTreeMap<String, u64>,
}

impl LoadLog {
    fn summary(&self, connections: usize, from: Duration, to: Duration) -> LoadSummary {
        let (from, to) = (from.as_nanos() as u64, to.as_nanos() as u64);
        let mut lat: Vec<u64> = self
            .done
            .iter()
            .filter(|(at, _)| (from..=to).contains(at))
            .map(|&(_, l)| l)
            .collect();
        lat.sort_unstable();
        let mut errors = BTreeMap::new();
        for (_, kind) in self
            .errors
            .iter()
            .filter(|(at, _)| (from..=to).contains(at))
        {
            *errors.entry(kind.clone()).or_default() += 1;
        }
        let secs = (to.saturating_sub(from)) as f64 / 1e9;
        LoadSummary {
            connections,
            rate: lat.len() as f64 / secs.max(1e-9),
            p50_ms: percentile_ms(&lat, 50.0),
            p99_ms: percentile_ms(&lat, 99.0),
            max_ms: percentile_ms(&lat, 100.0),
            errors,
        }
    }
}

/// One background connection.
#[derive(Debug)]
struct LoadConn {
    stream: Option<Stream>,
    sent_at: Instant,
    buf: Vec<u8>,
    head: Vec<u8>,
}

/// Keeps `connections` keep-alive connections busy with `request` until `stop` is set:
/// one request in flight on each, the next sent when the previous is answered; a failed
/// connection is replaced.
fn run_load(
    socket: &Path,
    request: &[u8],
    connections: usize,
    stop: &AtomicBool,
) -> io::Result<LoadLog> {
    let address = Address::Unix(socket.to_string_lossy().into_owned());
    let started = Instant::now();
    let since = |t: Instant| t.duration_since(started).as_nanos() as u64;
    let mut ep = Epoll::new(connections.max(1))?;
    let mut conns: Vec<LoadConn> = (0..connections)
        .map(|_| LoadConn {
            stream: None,
            sent_at: started,
            buf: Vec::with_capacity(16 * 1024),
            head: Vec::with_capacity(HEAD_KEEP),
        })
        .collect();
    let mut log = LoadLog::default();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut ready: Vec<Ready> = Vec::with_capacity(connections.max(1));
    // Sends the request on connection `i`, connecting first when needed.
    let send = |i: usize, c: &mut LoadConn, ep: &Epoll| -> io::Result<()> {
        if c.stream.is_none() {
            let s = address.connect()?;
            s.set_nonblocking(true)?;
            ep.add(s.as_raw_fd(), i as u64, epoll::IN)?;
            c.stream = Some(s);
            c.buf.clear();
        }
        c.head.clear();
        c.sent_at = Instant::now();
        let s = c
            .stream
            .as_mut()
            .ok_or_else(|| io::Error::other("no stream"))?;
        // A request of a few hundred bytes fits an empty socket buffer; not writing it
        // whole at once is treated as a failure of the connection.
        match s.write(request)? {
            n if n == request.len() => Ok(()),
            n => Err(io::Error::other(format!("short write ({n} bytes)"))),
        }
    };
    let mut broken: Vec<usize> = (0..connections).collect();
    while !stop.load(Ordering::SeqCst) {
        for i in std::mem::take(&mut broken) {
            if let Err(e) = send(i, &mut conns[i], &ep) {
                log.errors
                    .push((since(Instant::now()), format!("send: {e}")));
                conns[i].stream = None;
                broken.push(i);
            }
        }
        let timeout = if broken.is_empty() { 50 } else { 10 };
        ep.wait(timeout, &mut ready)?;
        for r in &ready {
            let i = r.token as usize;
            let c = &mut conns[i];
            let Some(s) = c.stream.as_mut() else { continue };
            let n = match s.read(&mut chunk) {
                Ok(0) => {
                    log.errors
                        .push((since(Instant::now()), "connection closed".into()));
                    c.stream = None;
                    broken.push(i);
                    continue;
                }
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    log.errors
                        .push((since(Instant::now()), format!("read: {e}")));
                    c.stream = None;
                    broken.push(i);
                    continue;
                }
            };
            c.buf.extend_from_slice(&chunk[..n]);
            let finished = drain_replies(&mut c.buf, &mut c.head).map(|end| match end {
                Ok(200) => Ok(()),
                Ok(s) => Err(format!("status {s}")),
                Err(why) => Err(why),
            });
            let Some(verdict) = finished else { continue };
            let now = Instant::now();
            let at = since(now);
            log.done
                .push((at, now.duration_since(c.sent_at).as_nanos() as u64));
            if let Err(kind) = verdict {
                log.errors.push((at, kind));
            }
            if !c.buf.is_empty() {
                log.errors.push((at, "bytes after END_REQUEST".into()));
                c.stream = None;
                broken.push(i);
            } else if let Err(e) = send(i, c, &ep) {
                log.errors.push((at, format!("send: {e}")));
                c.stream = None;
                broken.push(i);
            }
        }
    }
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_name_the_expected_outcome() {
        assert_eq!(
            expected_outcome("-- expect: limit_cpu\nfunction handler() end"),
            Some("limit_cpu")
        );
        assert_eq!(
            expected_outcome("-- expect: ok   -- with a note\n"),
            Some("ok")
        );
        assert_eq!(expected_outcome("function handler() end\n"), None);
    }

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
        let v: Vec<u64> = (1..=100).map(|i| i * 1_000_000).collect();
        assert_eq!(percentile_ms(&v, 99.0), 99.0);
        assert_eq!(percentile_ms(&v, 100.0), 100.0);
    }
}
