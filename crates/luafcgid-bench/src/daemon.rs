//! Running the real daemon from a benchmark: a temporary directory removed on drop, the
//! daemon (`luafcgid serve --config FILE --log FILE`) as a child process killed by its PID
//! and reaped on drop, and the pieces of FastCGI a benchmark client needs (a GET request
//! as nginx sends it, the CGI status of a reply).
//!
//! Also: a tree of distinct hello-world scripts spread over tenant directories, a blocking
//! request/reply exchange on one keep-alive connection, and counting the audit log's
//! `request` lines by their `state` (`warm`/`new`).
//!
//! Used by `limit-accuracy`, `fairness`, `scale` and `memory`. Each writes its own config;
//! nothing here chooses a limit or a setting of the daemon.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fastcgi_protocol::client;

/// How long the daemon may take to accept its first connection.
pub const START_PATIENCE: Duration = Duration::from_secs(10);

/// The daemon binary: `explicit` if given, else `luafcgid` next to the running program.
/// `Err` when there is no file there.
pub fn daemon_binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this program's path: {e}"))?
            .with_file_name("luafcgid"),
    };
    if !path.is_file() {
        return Err(format!(
            "no daemon binary at {} (build it, or pass --daemon)",
            path.display()
        ));
    }
    Ok(path)
}

/// `p` as a TOML basic string (a JSON string is one). `Err` when it is not UTF-8.
pub fn toml_path(p: &Path) -> Result<String, String> {
    let s = p
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8", p.display()))?;
    serde_json::to_string(s).map_err(|e| e.to_string())
}

/// A directory under the system's temporary directory, removed (with its contents) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `PREFIX-PID-NANOS` under the system's temporary directory.
    pub fn create(prefix: &str) -> Result<TempDir, String> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos:09}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The daemon child process, killed (by its PID) and reaped on drop, and killed by the
/// kernel if the thread that started it ends first. Declare it after the [`TempDir`]
/// holding its files, so it is dropped first.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    stderr: PathBuf,
}

impl Daemon {
    /// Starts `BINARY serve --config CONFIG --log LOG`, its stderr to the file `stderr`,
    /// stdin and stdout to `/dev/null`.
    pub fn start(
        binary: &Path,
        config: &Path,
        log: &Path,
        stderr: &Path,
    ) -> Result<Daemon, String> {
        Daemon::start_on(binary, config, log, stderr, None)
    }

    /// [`Daemon::start`], the daemon confined to `cpus` when given.
    pub fn start_on(
        binary: &Path,
        config: &Path,
        log: &Path,
        stderr: &Path,
        cpus: Option<&[usize]>,
    ) -> Result<Daemon, String> {
        let err_file = File::create(stderr).map_err(|e| format!("{}: {e}", stderr.display()))?;
        let mut command = Command::new(binary);
        crate::epoll::kill_with_parent(&mut command);
        if let Some(cpus) = cpus {
            crate::epoll::pin_command(&mut command, cpus);
        }
        let child = command
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--log")
            .arg(log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        Ok(Daemon {
            child,
            stderr: stderr.to_path_buf(),
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the unix socket accepts a connection, at most [`START_PATIENCE`].
    pub fn wait_ready(&mut self, socket: &Path) -> Result<(), String> {
        let started = Instant::now();
        loop {
            self.check_alive()?;
            if UnixStream::connect(socket).is_ok() {
                return Ok(());
            }
            if started.elapsed() > START_PATIENCE {
                return Err(format!(
                    "the daemon did not listen on {} within {:?}{}",
                    socket.display(),
                    START_PATIENCE,
                    self.stderr_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `Err` (with the end of its stderr) when the daemon has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("daemon exited: {status}{}", self.stderr_tail())),
            Err(e) => Err(format!("cannot query the daemon: {e}")),
        }
    }

    /// The last 10 lines of the daemon's stderr as `"; its stderr ends:\n  ..."`, or `""`.
    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(10)..].join("\n  ");
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its stderr ends:\n  {tail}")
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `/proc/loadavg`'s first three fields, or `?`.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

/// A GET request (request id 1) as nginx would send it for `script` under `docroot`,
/// with `query` as its query string (also in `REQUEST_URI`) and `FCGI_KEEP_CONN` as asked.
pub fn build_request(script: &Path, docroot: &Path, query: &str, keep_conn: bool) -> Vec<u8> {
    let script_s = script.to_string_lossy();
    let rel = script.strip_prefix(docroot).map_or_else(
        |_| script_s.to_string(),
        |p| p.to_string_lossy().into_owned(),
    );
    let path = format!("/{rel}");
    let uri = if query.is_empty() {
        path.clone()
    } else {
        format!("{path}?{query}")
    };
    let root = docroot.to_string_lossy();
    let params: [(&str, &str); 17] = [
        ("SCRIPT_FILENAME", &script_s),
        ("QUERY_STRING", query),
        ("REQUEST_METHOD", "GET"),
        ("CONTENT_TYPE", ""),
        ("CONTENT_LENGTH", ""),
        ("SCRIPT_NAME", &path),
        ("REQUEST_URI", &uri),
        ("DOCUMENT_URI", &path),
        ("DOCUMENT_ROOT", &root),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("REMOTE_ADDR", "127.0.0.1"),
        ("REMOTE_PORT", "54321"),
        ("SERVER_ADDR", "127.0.0.1"),
        ("SERVER_PORT", "80"),
        ("SERVER_NAME", "localhost"),
        ("HTTP_HOST", "localhost"),
    ];
    let mut out = Vec::new();
    client::encode_request(
        1,
        keep_conn,
        params.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())),
        b"",
        &mut out,
    );
    out
}

/// Most STDOUT bytes kept per response: enough for the header block.
pub const HEAD_KEEP: usize = 4096;

/// Decodes the complete records at the front of `buf` (and removes them), keeping the
/// first [`HEAD_KEEP`] bytes of STDOUT in `head`. Returns the response's end when an
/// `END_REQUEST` arrived: its CGI status, or why the response is broken (a protocol status,
/// an unexpected record, a protocol error).
pub fn drain_replies(buf: &mut Vec<u8>, head: &mut Vec<u8>) -> Option<Result<u16, String>> {
    use fastcgi_protocol::client::{decode_reply, Reply};
    use fastcgi_protocol::Status;
    let mut pos = 0;
    let mut ended = None;
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
                        ended = Some(if status != 0 {
                            Err(format!("END_REQUEST protocol status {status}"))
                        } else {
                            Ok(cgi_status(head))
                        });
                        break;
                    }
                    other => {
                        ended = Some(Err(format!("unexpected record {other:?}")));
                        break;
                    }
                }
            }
            Err(e) => {
                ended = Some(Err(format!("protocol error: {e}")));
                break;
            }
        }
    }
    buf.drain(..pos);
    ended
}

/// The status of a CGI header block: its `Status` line (0 when unreadable), else 200.
pub fn cgi_status(stdout: &[u8]) -> u16 {
    let end = find(stdout, b"\r\n\r\n")
        .or_else(|| find(stdout, b"\n\n"))
        .unwrap_or(stdout.len());
    for line in stdout[..end].split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if line[..colon].eq_ignore_ascii_case(b"status") {
            return String::from_utf8_lossy(&line[colon + 1..])
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
        }
    }
    200
}

/// Writes `count` distinct hello-world scripts under `docroot`, spread evenly over `tenants`
/// first-level directories (`t000/s00000.lua`, `t001/s00001.lua`, ...: script `i` is in
/// directory `i % tenants`). Each answers `Hello World`; each differs from the others by a
/// constant naming it, so no two are the same chunk. Returns their paths, script `i` at `i`.
pub fn hello_scripts(docroot: &Path, count: usize, tenants: usize) -> Result<Vec<PathBuf>, String> {
    let tenants = tenants.max(1);
    for t in 0..tenants.min(count) {
        let dir = docroot.join(format!("t{t:03}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    (0..count)
        .map(|i| {
            let path = docroot.join(format!("t{:03}/s{i:05}.lua", i % tenants));
            let text =
                format!("local id = {i}\ns = \"Hello World\"\nfunction handler() return s end\n");
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(path)
        })
        .collect()
}

/// Sends one request on a blocking keep-alive connection and reads until its
/// `END_REQUEST`: the CGI status, or why there is none. `buf` holds bytes read past the
/// reply (none with one request in flight); `head` is cleared and gets the start of STDOUT.
pub fn exchange(
    stream: &mut UnixStream,
    request: &[u8],
    buf: &mut Vec<u8>,
    head: &mut Vec<u8>,
) -> Result<u16, String> {
    stream
        .write_all(request)
        .map_err(|e| format!("write: {e}"))?;
    head.clear();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = drain_replies(buf, head) {
            return end;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err("connection closed before END_REQUEST".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// The audit log's `request` lines, counted by their `state` field, and its
/// `state_evicted` events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts {
    /// `request` lines counted (after the skipped ones).
    pub requests: u64,
    /// Of those, `"state":"warm"`: served by a state that had served before.
    pub warm: u64,
    /// Of those, `"state":"new"`: a state created for the request.
    pub new: u64,
    /// `state_evicted` events after the skipped request lines.
    pub evicted: u64,
}

impl StateCounts {
    /// `warm / (warm + new)`, or 0 when there were none.
    pub fn hit_rate(&self) -> f64 {
        let served = self.warm + self.new;
        if served == 0 {
            0.0
        } else {
            self.warm as f64 / served as f64
        }
    }
}

/// Counts the audit log at `log` (see [`StateCounts`]), leaving out the first `skip`
/// `request` lines and the events before them.
pub fn count_states(log: &Path, skip: u64) -> Result<StateCounts, String> {
    let file = File::open(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut counts = StateCounts::default();
    let mut seen = 0u64;
    for line in BufReader::with_capacity(1 << 20, file).split(b'\n') {
        let line = line.map_err(|e| format!("{}: {e}", log.display()))?;
        if find(&line, b"\"event\":\"request\"").is_some() {
            seen += 1;
            if seen <= skip {
                continue;
            }
            counts.requests += 1;
            if find(&line, b"\"state\":\"warm\"").is_some() {
                counts.warm += 1;
            } else if find(&line, b"\"state\":\"new\"").is_some() {
                counts.new += 1;
            }
        } else if seen >= skip && find(&line, b"\"event\":\"state_evicted\"").is_some() {
            counts.evicted += 1;
        }
    }
    Ok(counts)
}

/// Waits until the audit log at `log` holds at least `want` `request` lines (the daemon
/// writes it from a thread of its own), at most `patience`. Returns how many it holds.
pub fn wait_for_requests(log: &Path, want: u64, patience: Duration) -> Result<u64, String> {
    let started = Instant::now();
    loop {
        let have = count_states(log, 0)?.requests;
        if have >= want || started.elapsed() > patience {
            return Ok(have);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first position of `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Ends a benchmark binary from its run's outcome: exit 0 when every target held, 1 when
/// one did not, 2 (with the message on stderr, after `tool: `) when the run failed.
pub fn exit_with(tool: &str, outcome: Result<bool, String>) -> ! {
    match outcome {
        Ok(true) => std::process::exit(0),
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("{tool}: {e}");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgi_status_defaults_to_200() {
        assert_eq!(
            cgi_status(b"Status: 500 Internal Server Error\r\n\r\nx"),
            500
        );
        assert_eq!(
            cgi_status(b"Content-Type: text/html\r\n\r\nStatus: 500"),
            200
        );
        assert_eq!(cgi_status(b"status:404\n\n"), 404);
    }

    #[test]
    fn requests_carry_the_query_in_their_uri() {
        let req = build_request(
            Path::new("/srv/corpus/loop.lua"),
            Path::new("/srv/corpus"),
            "limit-accuracy=1.7",
            false,
        );
        assert!(find(&req, b"/loop.lua?limit-accuracy=1.7").is_some());
        assert!(find(&req, b"/srv/corpus/loop.lua").is_some());
    }

    #[test]
    fn hello_scripts_are_distinct_and_spread_over_tenants() {
        let dir = TempDir::create("luafcgid-bench-hello").unwrap();
        let paths = hello_scripts(dir.path(), 25, 10).unwrap();
        assert_eq!(paths.len(), 25);
        assert_eq!(paths[13], dir.path().join("t003/s00013.lua"));
        let texts: std::collections::HashSet<String> = paths
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        assert_eq!(texts.len(), 25);
        assert!(texts.iter().all(|t| t.contains("\"Hello World\"")));
        let dirs = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(dirs, 10);
    }

    #[test]
    fn states_are_counted_after_the_skipped_requests() {
        let dir = TempDir::create("luafcgid-bench-audit").unwrap();
        let log = dir.path().join("audit.jsonl");
        std::fs::write(
            &log,
            concat!(
                "{\"event\":\"start\"}\n",
                "{\"event\":\"request\",\"state\":\"new\"}\n",
                "{\"event\":\"state_evicted\",\"reason\":\"states\"}\n",
                "{\"event\":\"request\",\"state\":\"new\"}\n",
                "{\"event\":\"request\",\"state\":\"warm\"}\n",
                "{\"event\":\"state_evicted\",\"reason\":\"states\"}\n",
                "{\"event\":\"request\",\"state\":\"warm\"}\n",
                "{\"event\":\"request\",\"state\":null}\n",
            ),
        )
        .unwrap();
        let all = count_states(&log, 0).unwrap();
        assert_eq!((all.requests, all.warm, all.new, all.evicted), (5, 2, 2, 2));
        assert!((all.hit_rate() - 0.5).abs() < 1e-9);
        let later = count_states(&log, 2).unwrap();
        assert_eq!(
            (later.requests, later.warm, later.new, later.evicted),
            (3, 2, 0, 1)
        );
        assert_eq!(
            wait_for_requests(&log, 5, Duration::from_secs(1)).unwrap(),
            5
        );
        assert_eq!(
            wait_for_requests(&log, 6, Duration::from_millis(100)).unwrap(),
            5
        );
    }

    #[test]
    fn temp_dirs_are_removed_on_drop() {
        let dir = TempDir::create("luafcgid-bench-test").unwrap();
        let path = dir.path().to_path_buf();
        std::fs::write(path.join("f"), "x").unwrap();
        assert!(path.is_dir());
        drop(dir);
        assert!(!path.exists());
    }
}
