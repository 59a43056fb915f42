//! Running the real daemon from a benchmark: a temporary directory removed on drop, the
//! daemon (`luafcgid serve --config FILE --log FILE`) as a child process killed by its PID
//! and reaped on drop, and the pieces of FastCGI a benchmark client needs (a GET request
//! as nginx sends it, the CGI status of a reply).
//!
//! Used by `limit-accuracy` and `fairness`. Each writes its own config; nothing here
//! chooses a limit or a setting of the daemon.

use std::fs::File;
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

/// The daemon child process, killed (by its PID) and reaped on drop. Declare it after the
/// [`TempDir`] holding its files, so it is dropped first.
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
        let err_file = File::create(stderr).map_err(|e| format!("{}: {e}", stderr.display()))?;
        let child = Command::new(binary)
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

/// The first position of `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
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
    fn temp_dirs_are_removed_on_drop() {
        let dir = TempDir::create("luafcgid-bench-test").unwrap();
        let path = dir.path().to_path_buf();
        std::fs::write(path.join("f"), "x").unwrap();
        assert!(path.is_dir());
        drop(dir);
        assert!(!path.exists());
    }
}
