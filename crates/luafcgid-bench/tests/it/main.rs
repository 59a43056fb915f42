//! Runs the two bench binaries against each other on a unix socket in the
//! temp directory: fcgi-const must answer what real clients send, and
//! fcgi-load must count every request and report no errors. Then `scale` and
//! `memory`, small, against the real daemon (the `luafcgid` binary that
//! `cargo test --workspace` builds next to this package's binaries): every
//! request answered, the audit log's states counted.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fastcgi_protocol::client::{self, decode_reply, Reply};
use fastcgi_protocol::{encode_record, Status, FLAG_KEEP_CONN, ROLE_AUTHORIZER, ROLE_RESPONDER};

/// A running fcgi-const, killed and its socket removed on drop.
struct ConstServer {
    child: Child,
    path: PathBuf,
}

impl ConstServer {
    /// `tag` keeps the socket paths of tests running in parallel apart.
    fn start(mode: &str, tag: &str) -> ConstServer {
        let path = std::env::temp_dir().join(format!(
            "fcgi-const-it-{}-{tag}-{mode}.sock",
            std::process::id()
        ));
        let child = Command::new(env!("CARGO_BIN_EXE_fcgi-const"))
            .arg("--listen")
            .arg(&path)
            .args(["--mode", mode])
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fcgi-const");
        let server = ConstServer { child, path };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&server.path).is_err() {
            assert!(Instant::now() < deadline, "fcgi-const did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

impl Drop for ConstServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads replies until `n` END_REQUEST/management replies have arrived.
fn read_replies(stream: &mut UnixStream, n: usize) -> Vec<Reply> {
    let mut buf = Vec::new();
    let mut replies = Vec::new();
    let mut chunk = [0u8; 4096];
    let finals = |rs: &[Reply]| {
        rs.iter()
            .filter(|r| !matches!(r, Reply::Stdout { .. } | Reply::Stderr { .. }))
            .count()
    };
    while finals(&replies) < n {
        let got = stream.read(&mut chunk).unwrap();
        assert!(got > 0, "server closed early; got {replies:?}");
        buf.extend_from_slice(&chunk[..got]);
        while let Status::Complete((used, reply)) = decode_reply(&buf).unwrap() {
            buf.drain(..used);
            replies.push(reply);
        }
    }
    replies
}

fn params() -> Vec<(&'static [u8], &'static [u8])> {
    vec![
        (b"SCRIPT_FILENAME", b"/srv/www/hello.lua"),
        (b"REQUEST_METHOD", b"GET"),
    ]
}

#[test]
fn const_server_answers_what_clients_send() {
    for mode in ["epoll", "threads"] {
        let server = ConstServer::start(mode, "answers");
        let mut s = server.connect();
        let mut out = Vec::new();
        client::encode_get_values(&[b"FCGI_MPXS_CONNS", b"FCGI_MAX_REQS", b"OTHER"], &mut out);
        client::encode_request(1, true, params(), b"body", &mut out);
        client::encode_begin_request(2, ROLE_AUTHORIZER, FLAG_KEEP_CONN, &mut out);
        client::encode_begin_request(3, ROLE_RESPONDER, FLAG_KEEP_CONN, &mut out);
        client::encode_abort(3, &mut out);
        encode_record(99, 0, &[], &mut out);
        s.write_all(&out).unwrap();
        let replies = read_replies(&mut s, 5);

        let stdout: Vec<u8> = replies
            .iter()
            .filter_map(|r| match r {
                Reply::Stdout { id: 1, data } => Some(data.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert!(stdout.starts_with(b"Status: 200 OK\r\n"), "{mode}");
        assert!(stdout.ends_with(b"\r\n\r\nHello World"), "{mode}");
        let finals: Vec<&Reply> = replies
            .iter()
            .filter(|r| !matches!(r, Reply::Stdout { .. }))
            .collect();
        assert_eq!(
            finals,
            vec![
                &Reply::GetValuesResult(vec![
                    (b"FCGI_MAX_REQS".to_vec(), b"64".to_vec()),
                    (b"FCGI_MPXS_CONNS".to_vec(), b"1".to_vec()),
                ]),
                &Reply::End {
                    id: 1,
                    app_status: 0,
                    status: 0
                },
                &Reply::End {
                    id: 2,
                    app_status: 0,
                    status: 3
                },
                &Reply::End {
                    id: 3,
                    app_status: 0,
                    status: 0
                },
                &Reply::UnknownType(99),
            ],
            "{mode}"
        );

        // Without KEEP_CONN the server closes after answering.
        let mut out = Vec::new();
        client::encode_request(1, false, params(), b"", &mut out);
        s.write_all(&out).unwrap();
        let replies = read_replies(&mut s, 1);
        assert!(matches!(replies.last(), Some(Reply::End { id: 1, .. })));
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{mode}: data after END_REQUEST");
    }
}

fn run_load(server: &ConstServer, extra: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_fcgi-load"))
        .arg("--connect")
        .arg(&server.path)
        .args(["--requests", "3000", "--connections", "7"])
        .args(["--server-pid", &server.child.id().to_string()])
        .args(extra)
        .output()
        .expect("run fcgi-load");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "fcgi-load failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn load_generator_counts_every_request() {
    let server = ConstServer::start("epoll", "load");
    for extra in [
        &[][..],
        &["--threads", "2"][..],
        &["--no-keep-alive"][..],
        &["--body-bytes", "70000", "--param", "HTTP_COOKIE=x=1"][..],
    ] {
        let out = run_load(&server, extra);
        assert!(out.contains("requests    3000\n"), "{extra:?}: {out}");
        assert!(out.contains("errors      0\n"), "{extra:?}: {out}");
        assert!(out.contains("server cpu "), "{extra:?}: {out}");
        assert!(out.contains("server rss "), "{extra:?}: {out}");
        assert!(out.contains("latency µs  p50 "), "{extra:?}: {out}");
        assert!(out.contains(" p99.9 "), "{extra:?}: {out}");
    }
}

#[test]
fn load_generator_reports_a_dead_server_as_errors() {
    let path = std::env::temp_dir().join(format!("fcgi-load-it-none-{}.sock", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_fcgi-load"))
        .arg("--connect")
        .arg(&path)
        .args(["--requests", "10", "--connections", "2"])
        .output()
        .expect("run fcgi-load");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(stdout.contains("errors      10\n"), "{stdout}");
    assert!(stdout.contains("connect:"), "{stdout}");
}

/// The daemon binary next to this package's binaries.
fn daemon_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_scale")).with_file_name("luafcgid");
    assert!(
        path.is_file(),
        "{} missing: build it (cargo build -p luafcgid) or run cargo test --workspace",
        path.display()
    );
    path
}

/// Runs a bench binary with `args`; its stdout, and whether it exited 0.
fn run_bench(binary: &str, args: &[&str]) -> (String, bool) {
    let output = Command::new(binary)
        .arg("--daemon")
        .arg(daemon_binary())
        .args(args)
        .output()
        .expect("run the bench binary");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    (format!("{stdout}{stderr}"), output.status.success())
}

/// The number after `label` in `text` (`label` followed by digits).
fn number_after(text: &str, label: &str) -> u64 {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("no '{label}' in {text}"));
    text[at + label.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no number after '{label}' in {text}"))
}

#[test]
fn scale_counts_warm_and_new_states_of_every_measured_request() {
    // 60 scripts, 12 states: the Zipf stream must miss sometimes and hit mostly.
    let (out, ok) = run_bench(
        env!("CARGO_BIN_EXE_scale"),
        &[
            "--scripts",
            "60",
            "--tenants",
            "6",
            "--states",
            "12",
            "--warmup",
            "300",
            "--requests",
            "1500",
            "--connections",
            "3",
            "--samples",
            "3",
            "--max-secs",
            "120",
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("errors: 0 (requests sent 1800, audit log request lines 1800)"),
        "{out}"
    );
    let measured = out
        .split("measured requests: ")
        .nth(1)
        .unwrap_or_else(|| panic!("no hit rate in {out}"));
    let (warm, new) = (
        number_after(measured, "(warm "),
        number_after(measured, "new "),
    );
    assert_eq!(warm + new, 1500, "{out}");
    assert!(warm > 0 && new > 0, "{out}");
    assert!(
        number_after(&out, "state_evicted during the measurement: ") > 0,
        "{out}"
    );
    let sample_rows = out
        .lines()
        .filter(|l| {
            let mut words = l.split_whitespace();
            words.next().is_some_and(|w| w.parse::<u64>().is_ok())
                && words.next() == Some("measured")
        })
        .count();
    assert_eq!(sample_rows, 3, "{out}");
    assert!(out.contains("target RSS ≤ 256 MiB"), "{out}");
}

#[test]
fn scale_refuses_bad_flags_before_starting_anything() {
    let (out, ok) = run_bench(env!("CARGO_BIN_EXE_scale"), &["--states", "0"]);
    assert!(!ok);
    assert!(out.contains("--states must be at least 1"), "{out}");
}

#[test]
fn memory_keeps_every_state_warm_and_reports_it_per_state() {
    let (out, ok) = run_bench(
        env!("CARGO_BIN_EXE_memory"),
        &["--states", "40", "--tenants", "4", "--passes", "3"],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("passes after the first: 80 of 80 requests served by a warm state"),
        "{out}"
    );
    assert!(
        out.contains("requests sent 121, audit log request lines 121, failures 0"),
        "{out}"
    );
    assert!(
        out.contains("per warm state after 3 requests each: "),
        "{out}"
    );
    assert!(out.contains("per warm state: "), "{out}");
    assert!(out.contains("beyond a bare Lua state: "), "{out}");
}

/// A running `scale` with a long run ahead, its stdout read line by line on a thread.
struct LongScale {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: String,
}

impl LongScale {
    /// Starts it and waits (at most 60 s) for the line naming the daemon's pid.
    fn start() -> (LongScale, u32) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_scale"))
            .arg("--daemon")
            .arg(daemon_binary())
            .args(["--scripts", "100", "--tenants", "4", "--states", "20"])
            .args([
                "--warmup",
                "0",
                "--requests",
                "10000000",
                "--max-secs",
                "120",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start scale");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut run = LongScale {
            child,
            lines,
            seen: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = run
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no daemon pid from scale: {}", run.seen));
            run.seen.push_str(&line);
            run.seen.push('\n');
            if line.contains("daemon pid ") {
                let pid = number_after(&line, "daemon pid ") as u32;
                return (run, pid);
            }
        }
    }

    /// Sends `signal` to scale (with the shell's `kill`, which every system has).
    fn signal(&self, signal: &str) {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(format!("kill {signal} {}", self.child.id()))
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {signal} failed");
    }

    /// Waits (at most 60 s) for scale to exit; its exit code and everything it printed.
    fn wait(&mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                }
                return (status.code(), self.seen.clone());
            }
            assert!(
                Instant::now() < deadline,
                "scale did not exit: {}",
                self.seen
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Temporary directories this scale created (`luafcgid-scale-PID-...`).
    fn temp_dirs(&self) -> Vec<PathBuf> {
        let prefix = format!("luafcgid-scale-{}-", self.child.id());
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect()
    }
}

impl Drop for LongScale {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for dir in self.temp_dirs() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Whether process `pid` is gone (or a zombie nobody has reaped yet), polled for at most
/// 10 s.
fn process_ends(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(") ").next().map(|r| r.chars().next()));
        if matches!(state, None | Some(Some('Z'))) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn scale_stops_its_daemon_and_removes_its_files_on_sigint() {
    let (mut run, daemon) = LongScale::start();
    run.signal("-INT");
    let (code, out) = run.wait();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("run cut short: interrupted by a signal"),
        "{out}"
    );
    assert!(process_ends(daemon), "daemon {daemon} still running");
    assert!(run.temp_dirs().is_empty(), "{:?}", run.temp_dirs());
}

#[test]
fn the_daemon_dies_with_a_killed_benchmark() {
    let (mut run, daemon) = LongScale::start();
    run.signal("-KILL");
    let (code, out) = run.wait();
    assert_eq!(code, None, "{out}");
    assert!(process_ends(daemon), "daemon {daemon} outlived scale");
}

#[test]
fn fairness_alternates_its_phases_and_pools_each_phases_requests() {
    let output = Command::new(env!("CARGO_BIN_EXE_fairness"))
        .arg("--daemon")
        .arg(daemon_binary())
        .args([
            "--rounds",
            "2",
            "--duration",
            "0.3",
            "--rate",
            "2000",
            "--calibrate-secs",
            "0.3",
            "--flood-connections",
            "4",
            "--flood-timeout-ms",
            "200",
            "--flood-warmup-ms",
            "100",
            "--drain-secs",
            "2",
        ])
        .output()
        .expect("run fairness");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // PASS or FAIL (a verdict was reached), not 2 (the run could not be made).
    assert!(matches!(output.status.code(), Some(0 | 1)), "{out}");
    assert!(out.contains("phase B (round 1 of 2)"), "{out}");
    assert!(out.contains("phase C (round 2 of 2)"), "{out}");
    assert_eq!(
        out.matches("  p99 B ").count(),
        2,
        "a line per round: {out}"
    );
    assert!(out.contains("2 rounds of B then C"), "{out}");
    // 2,000 req/s for 0.3 s is 600 requests a round: each phase's table row counts both.
    assert!(out.contains("| B: alone | 1200 |"), "{out}");
    assert!(out.contains("| C: with flood | 1200 |"), "{out}");
}

#[test]
fn fairness_refuses_zero_rounds() {
    let output = Command::new(env!("CARGO_BIN_EXE_fairness"))
        .arg("--daemon")
        .arg(daemon_binary())
        .args(["--rounds", "0"])
        .output()
        .expect("run fairness");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--rounds must be at least 1"));
}
