//! The JSON audit log: one line per request and per lifecycle event, written by one
//! background thread so a slow disk never stalls a request. Lines are built by the caller
//! with serde_json (so script text is escaped by the encoder) and queued; when the queue is
//! full the line is counted as dropped and a `log_dropped` event reports the count later.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde::Serialize;

/// Lines that may wait for the writer.
pub const AUDIT_QUEUE_LINES: usize = 65_536;

/// After writing a batch the writer rests this long, so that under load lines are written
/// in batches and queueing a line rarely has to wake the writer thread.
pub const AUDIT_BATCH_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

/// Longest script-controlled text kept in a log field, in bytes.
pub const AUDIT_TEXT_MAX: usize = 4096;

/// Where lines go.
#[derive(Debug)]
pub struct AuditLog {
    tx: Mutex<Option<Sender<Vec<u8>>>>,
    sender: Sender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Writes `n` as exactly `width` decimal digits (zero-padded) into `out`.
fn push_digits(out: &mut [u8], n: u64) {
    let mut n = n;
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of a time in whole seconds since the epoch.
fn format_seconds(secs: i64) -> [u8; 19] {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut b = *b"0000-00-00T00:00:00";
    push_digits(&mut b[0..4], year.clamp(0, 9999) as u64);
    push_digits(&mut b[5..7], month as u64);
    push_digits(&mut b[8..10], day as u64);
    push_digits(&mut b[11..13], (sod / 3600) as u64);
    push_digits(&mut b[14..16], ((sod % 3600) / 60) as u64);
    push_digits(&mut b[17..19], (sod % 60) as u64);
    b
}

thread_local! {
    /// The last second formatted on this thread: most lines share it.
    static LAST_SECOND: std::cell::Cell<(i64, [u8; 19])> = const { std::cell::Cell::new((i64::MIN, [0; 19])) };
}

/// RFC 3339 UTC time with microseconds.
pub fn timestamp() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let prefix = LAST_SECOND.with(|last| {
        let (at, text) = last.get();
        if at == secs {
            text
        } else {
            let text = format_seconds(secs);
            last.set((secs, text));
            text
        }
    });
    let mut b = [0u8; 27];
    b[..19].copy_from_slice(&prefix);
    b[19] = b'.';
    push_digits(&mut b[20..26], u64::from(d.subsec_micros()));
    b[26] = b'Z';
    String::from_utf8_lossy(&b).into_owned()
}

/// Cuts script-controlled text to [`AUDIT_TEXT_MAX`] bytes at a character boundary.
pub fn truncate(text: &str) -> &str {
    if text.len() <= AUDIT_TEXT_MAX {
        return text;
    }
    let mut end = AUDIT_TEXT_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The policy files applied to a script (relative to its document root), serialized as an
/// array of strings without copying them first.
#[derive(Debug, Clone, Copy)]
pub struct PolicyFiles<'a>(pub &'a [std::path::PathBuf]);

impl Serialize for PolicyFiles<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|p| p.to_string_lossy()))
    }
}

/// One `request` event.
#[derive(Debug, Serialize)]
pub struct RequestEvent<'a> {
    pub ts: String,
    pub event: &'static str,
    pub request_id: &'a str,
    pub client: Option<&'a str>,
    pub method: Option<&'a str>,
    pub uri: Option<&'a str>,
    pub script: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub policy: Option<PolicyFiles<'a>>,
    pub status: Option<u16>,
    pub outcome: &'static str,
    pub duration_us: u64,
    pub instructions: Option<u64>,
    pub memory: Option<u64>,
    pub bytes_in: Option<u64>,
    pub bytes_out: Option<u64>,
    pub state: Option<&'static str>,
    pub error: Option<&'a str>,
}

impl AuditLog {
    /// Opens the log (`None`: stdout) and starts its writer thread.
    pub fn open(path: Option<&PathBuf>) -> std::io::Result<AuditLog> {
        let out: Box<dyn Write + Send> = match path {
            None => Box::new(std::io::stdout()),
            // The daemon's own streams, shared with what else writes to them (not a second,
            // independently positioned open of the same file).
            Some(p) if p.as_os_str() == "/dev/stdout" => Box::new(std::io::stdout()),
            Some(p) if p.as_os_str() == "/dev/stderr" => Box::new(std::io::stderr()),
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let (tx, rx) = crossbeam_channel::bounded::<Vec<u8>>(AUDIT_QUEUE_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let d = dropped.clone();
        let writer = std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || write_lines(rx, out, d))?;
        Ok(AuditLog {
            sender: tx.clone(),
            tx: Mutex::new(Some(tx)),
            dropped,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Queues one event.
    pub fn emit<T: Serialize>(&self, event: &T) {
        let mut line = Vec::with_capacity(512);
        if serde_json::to_writer(&mut line, event).is_err() {
            return;
        }
        line.push(b'\n');
        match self.sender.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queues a lifecycle event with extra fields.
    pub fn lifecycle(&self, event: &'static str, fields: serde_json::Value) {
        let mut obj = serde_json::Map::new();
        obj.insert("ts".into(), timestamp().into());
        obj.insert("event".into(), event.into());
        if let serde_json::Value::Object(m) = fields {
            obj.extend(m);
        }
        self.emit(&serde_json::Value::Object(obj));
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Writes everything queued and stops the writer.
    pub fn close(&self) {
        drop(self.tx.lock().map(|mut t| t.take()));
        // The writer ends when every sender is gone; ours is a clone kept for `emit`, so
        // send an empty line as the stop mark instead.
        let _ = self.sender.send(Vec::new());
        if let Some(h) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = h.join();
        }
    }
}

fn write_lines(rx: Receiver<Vec<u8>>, out: Box<dyn Write + Send>, dropped: Arc<AtomicU64>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut reported = 0u64;
    while let Ok(line) = rx.recv() {
        if line.is_empty() {
            break;
        }
        let _ = out.write_all(&line);
        while let Ok(line) = rx.try_recv() {
            if line.is_empty() {
                let _ = out.flush();
                return;
            }
            let _ = out.write_all(&line);
        }
        let now = dropped.load(Ordering::Relaxed);
        if now > reported {
            let ev = serde_json::json!({"ts": timestamp(), "event": "log_dropped", "count": now - reported});
            let _ = serde_json::to_writer(&mut out, &ev);
            let _ = out.write_all(b"\n");
            reported = now;
        }
        let _ = out.flush();
        std::thread::sleep(AUDIT_BATCH_PAUSE);
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates_format() {
        assert_eq!(&format_seconds(0), b"1970-01-01T00:00:00");
        assert_eq!(&format_seconds(951_782_400), b"2000-02-29T00:00:00");
        assert_eq!(&format_seconds(1_795_704_832), b"2026-11-26T14:53:52");
    }

    #[test]
    fn timestamp_is_rfc3339_micros() {
        let t = timestamp();
        assert_eq!(t.len(), 27, "{t}");
        assert!(t.ends_with('Z'));
        assert_eq!(&t[4..5], "-");
        assert_eq!(&t[10..11], "T");
        assert_eq!(&t[19..20], ".");
    }

    #[test]
    fn truncate_keeps_char_boundaries() {
        let s = "é".repeat(AUDIT_TEXT_MAX);
        let t = truncate(&s);
        assert!(t.len() <= AUDIT_TEXT_MAX);
        assert!(t.len() >= AUDIT_TEXT_MAX - 1);
    }
}
