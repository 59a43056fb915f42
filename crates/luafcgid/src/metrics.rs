//! The daemon's counters and the metrics listener (`--metrics ADDR`): `/healthz` and the
//! Prometheus text format on `/metrics`.
//!
//! [`Metrics`] is a set of fixed arrays of atomic counters: requests by outcome and status,
//! a latency histogram with fixed buckets, state evictions by reason, rate-limited requests
//! by limit, shed requests by reason, reloads. Counting a request is a few relaxed atomic
//! additions and no allocation, to counters of the counting thread's own shard (threads
//! adding to the same counters moved their cache line between CPUs at every request); the
//! text sums the shards. The text is built only when scraped, where the gauges
//! (requests in Lua, the queue, the states, refused connections, lost audit lines) are read
//! from the [`Shared`] the counters are attached to. The counters outlive a `Shared`: a new
//! one built [`Shared::with_metrics`] the same counters carries them on and becomes what the
//! listener reports.
//!
//! Every label set is bounded: outcomes and reasons are fixed lists, statuses are exact for a
//! fixed list of common ones and by class (`2xx`, ...) otherwise, and the per-script gauge
//! shows the [`TOP_SCRIPTS`] scripts with the most states, their paths (tenants' text) cut
//! to [`SCRIPT_LABEL_MAX`] bytes and escaped. The listener is deliberately tiny: one
//! `GET`/`HEAD` of the two paths per connection, a small request, a read timeout and a
//! connection cap of its own. It does not push metrics anywhere, nor keep history.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::admission::Full;
use crate::outcome::Outcome;
use crate::ratelimit::Limit;
use crate::server::Shared;

/// Every outcome, in the order of its discriminant (its row in the request counters).
pub const OUTCOMES: [Outcome; 14] = [
    Outcome::Ok,
    Outcome::ScriptError,
    Outcome::LimitCpu,
    Outcome::LimitTime,
    Outcome::LimitMemory,
    Outcome::LimitOutput,
    Outcome::BodyTooLarge,
    Outcome::RateLimited,
    Outcome::Shed,
    Outcome::BadRequest,
    Outcome::NotFound,
    Outcome::Forbidden,
    Outcome::PolicyError,
    Outcome::Aborted,
];

/// Statuses counted exactly (sorted); any other from 100 to 999 is counted by its class.
pub const EXACT_STATUSES: [(u16, &str); 30] = [
    (200, "200"),
    (201, "201"),
    (202, "202"),
    (204, "204"),
    (206, "206"),
    (301, "301"),
    (302, "302"),
    (303, "303"),
    (304, "304"),
    (307, "307"),
    (308, "308"),
    (400, "400"),
    (401, "401"),
    (403, "403"),
    (404, "404"),
    (405, "405"),
    (409, "409"),
    (410, "410"),
    (413, "413"),
    (415, "415"),
    (422, "422"),
    (429, "429"),
    (451, "451"),
    (499, "499"),
    (500, "500"),
    (501, "501"),
    (502, "502"),
    (503, "503"),
    (504, "504"),
    (507, "507"),
];

const CLASSES: [&str; 9] = [
    "1xx", "2xx", "3xx", "4xx", "5xx", "6xx", "7xx", "8xx", "9xx",
];
const CLASS_SLOT: usize = EXACT_STATUSES.len();
/// A status outside 100–999 (scripts cannot set one; counted rather than lost).
const OTHER_SLOT: usize = CLASS_SLOT + CLASSES.len();
/// No status: the client went away (`aborted`) and nothing was sent.
const NONE_SLOT: usize = OTHER_SLOT + 1;
const STATUS_SLOTS: usize = NONE_SLOT + 1;

/// Upper bounds of the latency buckets, in microseconds, with their `le` labels (seconds).
const LATENCY_BUCKETS: [(u64, &str); 14] = [
    (500, "0.0005"),
    (1_000, "0.001"),
    (2_500, "0.0025"),
    (5_000, "0.005"),
    (10_000, "0.01"),
    (25_000, "0.025"),
    (50_000, "0.05"),
    (100_000, "0.1"),
    (250_000, "0.25"),
    (500_000, "0.5"),
    (1_000_000, "1"),
    (2_500_000, "2.5"),
    (5_000_000, "5"),
    (10_000_000, "10"),
];

/// Scripts shown by the per-script state gauge.
pub const TOP_SCRIPTS: usize = 10;
/// Longest script path in a label, in bytes (cut at a character boundary).
pub const SCRIPT_LABEL_MAX: usize = 200;

/// Longest request the metrics listener reads.
pub const MAX_REQUEST: usize = 4096;
/// Time a metrics client has to send its request, and then to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections the metrics listener serves at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 8;

/// Why an idle state was dropped before its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// The `states` cap was reached and another script needed a state.
    Capacity,
    /// The states held more than `memory_total`.
    Memory,
    /// The script or one of its modules changed or vanished.
    Changed,
}

impl Eviction {
    const ALL: [Eviction; 3] = [Eviction::Capacity, Eviction::Memory, Eviction::Changed];

    /// The `reason` of the `state_evicted` event and of the metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Eviction::Capacity => "capacity",
            Eviction::Memory => "memory",
            Eviction::Changed => "changed",
        }
    }
}

/// Why a request was shed (answered 503).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// `queue_max` requests were waiting.
    QueueFull,
    /// A quarter of `queue_max` requests of the same script were waiting.
    ScriptQueueFull,
    /// It waited `queue_timeout_ms` without getting a state.
    QueueTimeout,
}

impl ShedReason {
    const ALL: [ShedReason; 3] = [
        ShedReason::QueueFull,
        ShedReason::ScriptQueueFull,
        ShedReason::QueueTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::QueueFull => "queue_full",
            ShedReason::ScriptQueueFull => "script_queue_full",
            ShedReason::QueueTimeout => "queue_timeout",
        }
    }
}

impl From<Full> for ShedReason {
    fn from(full: Full) -> ShedReason {
        match full {
            Full::All => ShedReason::QueueFull,
            Full::Script => ShedReason::ScriptQueueFull,
        }
    }
}

const LIMITS: [Limit; 4] = [
    Limit::PerClient,
    Limit::PerScript,
    Limit::PerTenant,
    Limit::Global,
];

fn limit_name(limit: Limit) -> &'static str {
    match limit {
        Limit::PerClient => "per_client",
        Limit::PerScript => "per_script",
        Limit::PerTenant => "per_tenant",
        Limit::Global => "rate_global",
    }
}

fn limit_index(limit: Limit) -> usize {
    match limit {
        Limit::PerClient => 0,
        Limit::PerScript => 1,
        Limit::PerTenant => 2,
        Limit::Global => 3,
    }
}

/// The row of a status in the request counters.
fn status_slot(status: Option<u16>) -> usize {
    match status {
        None => NONE_SLOT,
        Some(s) => match EXACT_STATUSES.binary_search_by_key(&s, |e| e.0) {
            Ok(i) => i,
            Err(_) if (100..=999).contains(&s) => CLASS_SLOT + usize::from(s / 100) - 1,
            Err(_) => OTHER_SLOT,
        },
    }
}

fn status_label(slot: usize) -> &'static str {
    match slot {
        s if s < CLASS_SLOT => EXACT_STATUSES[s].1,
        s if s < OTHER_SLOT => CLASSES[s - CLASS_SLOT],
        OTHER_SLOT => "other",
        _ => "none",
    }
}

/// The bucket of a duration: the first whose bound it does not exceed, else `+Inf`.
fn latency_slot(us: u64) -> usize {
    LATENCY_BUCKETS.partition_point(|b| b.0 < us)
}

fn counters<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

/// Shards of the per-request counters: a thread counts in shard `its number % SHARDS`.
const SHARDS: usize = 8;

/// The counters every answered request adds to, one set per shard, each on cache lines of
/// its own.
#[derive(Debug)]
#[repr(align(128))]
struct RequestCounts {
    requests: [[AtomicU64; STATUS_SLOTS]; OUTCOMES.len()],
    /// Requests per latency bucket (not cumulative; the text makes them so).
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
}

impl Default for RequestCounts {
    fn default() -> RequestCounts {
        RequestCounts {
            requests: std::array::from_fn(|_| counters()),
            latency: counters(),
            latency_sum_us: AtomicU64::new(0),
        }
    }
}

/// The calling thread's shard: threads are numbered as they first count.
fn shard() -> usize {
    static THREADS: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static SHARD: usize = (THREADS.fetch_add(1, Relaxed) % SHARDS as u64) as usize;
    }
    SHARD.try_with(|s| *s).unwrap_or(0)
}

/// The daemon's counters, shared by every request and the metrics listener.
#[derive(Debug)]
pub struct Metrics {
    counts: Box<[RequestCounts; SHARDS]>,
    evictions: [AtomicU64; Eviction::ALL.len()],
    rate_limited: [AtomicU64; LIMITS.len()],
    shed: [AtomicU64; ShedReason::ALL.len()],
    reloads: AtomicU64,
    runs_apart: AtomicU64,
    /// The `Shared` whose gauges the text reports: the latest attached.
    source: Mutex<Weak<Shared>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            counts: Box::new(std::array::from_fn(|_| RequestCounts::default())),
            evictions: counters(),
            rate_limited: counters(),
            shed: counters(),
            reloads: AtomicU64::new(0),
            runs_apart: AtomicU64::new(0),
            source: Mutex::new(Weak::new()),
        }
    }
}

impl Metrics {
    /// Counts one answered request: its outcome, its status (`None`: nothing was sent) and
    /// how long it took from its arrival.
    pub fn request(&self, outcome: Outcome, status: Option<u16>, elapsed: Duration) {
        let counts = &self.counts[shard()];
        counts.requests[outcome as usize][status_slot(status)].fetch_add(1, Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        counts.latency[latency_slot(us)].fetch_add(1, Relaxed);
        counts.latency_sum_us.fetch_add(us, Relaxed);
    }

    /// The sum over the shards of the counter `pick` chooses.
    fn total(&self, pick: impl Fn(&RequestCounts) -> &AtomicU64) -> u64 {
        self.counts.iter().map(|c| pick(c).load(Relaxed)).sum()
    }

    /// Counts one evicted state (or one script whose states were retired, for `Changed`).
    pub fn evicted(&self, reason: Eviction) {
        self.evictions[reason as usize].fetch_add(1, Relaxed);
    }

    /// Counts one request over a rate limit.
    pub fn rate_limited(&self, limit: Limit) {
        self.rate_limited[limit_index(limit)].fetch_add(1, Relaxed);
    }

    /// Counts one shed request.
    pub fn shed(&self, reason: ShedReason) {
        self.shed[reason as usize].fetch_add(1, Relaxed);
    }

    /// Counts one configuration reload.
    pub fn reloaded(&self) {
        self.reloads.fetch_add(1, Relaxed);
    }

    /// Counts one run of a slow script on a blocking thread.
    pub fn ran_apart(&self) {
        self.runs_apart.fetch_add(1, Relaxed);
    }

    /// Reloads counted so far.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Relaxed)
    }

    /// Requests counted so far with `outcome`, whatever their status.
    pub fn requests(&self, outcome: Outcome) -> u64 {
        (0..STATUS_SLOTS)
            .map(|slot| self.total(|c| &c.requests[outcome as usize][slot]))
            .sum()
    }

    /// Makes `shared` the source of the gauges (a `Shared` built with these counters).
    pub fn attach(&self, shared: &Arc<Shared>) {
        *self.source.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(shared);
    }

    fn source(&self) -> Option<Arc<Shared>> {
        self.source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade()
    }

    /// Whether the daemon serves: its `Shared` is alive and not shutting down.
    pub fn healthy(&self) -> bool {
        self.source()
            .is_some_and(|s| !*s.shutdown_signal().borrow())
    }

    /// The Prometheus text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        let text = &mut out;
        family(
            text,
            "luafcgid_build_info",
            "gauge",
            "Always 1; the version is a label.",
        );
        let _ = writeln!(
            text,
            "luafcgid_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );

        family(
            text,
            "luafcgid_requests_total",
            "counter",
            "Requests answered, by outcome (as in the audit log) and status (exact for common statuses, else its class; none when the client went away).",
        );
        for outcome in OUTCOMES {
            // Each outcome's own status is always shown, so the series exist from the start.
            let own = if outcome == Outcome::Aborted {
                NONE_SLOT
            } else {
                status_slot(Some(outcome.status()))
            };
            for slot in 0..STATUS_SLOTS {
                let n = self.total(|c| &c.requests[outcome as usize][slot]);
                if n > 0 || slot == own {
                    let _ = writeln!(
                        text,
                        "luafcgid_requests_total{{outcome=\"{}\",status=\"{}\"}} {n}",
                        outcome.as_str(),
                        status_label(slot)
                    );
                }
            }
        }

        family(
            text,
            "luafcgid_request_duration_seconds",
            "histogram",
            "Time from a request being complete to its reply being ready.",
        );
        let mut cumulative = 0;
        for i in 0..=LATENCY_BUCKETS.len() {
            cumulative += self.total(|c| &c.latency[i]);
            let le = LATENCY_BUCKETS.get(i).map_or("+Inf", |b| b.1);
            let _ = writeln!(
                text,
                "luafcgid_request_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.total(|c| &c.latency_sum_us) as f64 / 1e6;
        let _ = writeln!(text, "luafcgid_request_duration_seconds_sum {sum}");
        let _ = writeln!(text, "luafcgid_request_duration_seconds_count {cumulative}");

        family(
            text,
            "luafcgid_limit_hits_total",
            "counter",
            "Requests stopped by a limit, by kind: instructions, time, memory, output (sandbox limits) and body (request body over the policy's body).",
        );
        for (kind, outcome) in [
            ("instructions", Outcome::LimitCpu),
            ("time", Outcome::LimitTime),
            ("memory", Outcome::LimitMemory),
            ("output", Outcome::LimitOutput),
            ("body", Outcome::BodyTooLarge),
        ] {
            let _ = writeln!(
                text,
                "luafcgid_limit_hits_total{{kind=\"{kind}\"}} {}",
                self.requests(outcome)
            );
        }

        family(
            text,
            "luafcgid_rate_limited_total",
            "counter",
            "Requests answered 429, by the rate limit they were over.",
        );
        for limit in LIMITS {
            let _ = writeln!(
                text,
                "luafcgid_rate_limited_total{{limit=\"{}\"}} {}",
                limit_name(limit),
                self.rate_limited[limit_index(limit)].load(Relaxed)
            );
        }

        family(
            text,
            "luafcgid_shed_total",
            "counter",
            "Requests answered 503 because they could not wait for a state, by reason.",
        );
        for reason in ShedReason::ALL {
            let _ = writeln!(
                text,
                "luafcgid_shed_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                self.shed[reason as usize].load(Relaxed)
            );
        }

        family(
            text,
            "luafcgid_state_evictions_total",
            "counter",
            "Idle states dropped before their time, by reason (changed: scripts whose states were retired because a file changed).",
        );
        for reason in Eviction::ALL {
            let _ = writeln!(
                text,
                "luafcgid_state_evictions_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                self.evictions[reason as usize].load(Relaxed)
            );
        }

        family(
            text,
            "luafcgid_reloads_total",
            "counter",
            "Configuration reloads.",
        );
        let _ = writeln!(text, "luafcgid_reloads_total {}", self.reloads());

        family(
            text,
            "luafcgid_runs_apart_total",
            "counter",
            "Requests of slow scripts run on a blocking thread, away from the connections' threads.",
        );
        let _ = writeln!(
            text,
            "luafcgid_runs_apart_total {}",
            self.runs_apart.load(Relaxed)
        );

        if let Some(shared) = self.source() {
            render_gauges(&shared, text);
        }
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// A label value: cut to [`SCRIPT_LABEL_MAX`] bytes at a character boundary, then with
/// backslash, double quote and line feed escaped as the text format requires.
pub fn label_value(text: &str) -> String {
    let mut end = text.len().min(SCRIPT_LABEL_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + 8);
    for c in text[..end].chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn render_gauges(shared: &Shared, out: &mut String) {
    let config = &shared.config;
    let workers = config.workers as u64;
    let in_lua = workers.saturating_sub(shared.lua_slots.available_permits() as u64);
    gauge(
        out,
        "luafcgid_lua_in_flight",
        "gauge",
        "Requests running in Lua now.",
        in_lua,
    );
    gauge(
        out,
        "luafcgid_lua_workers",
        "gauge",
        "Requests that may run in Lua at once (workers).",
        workers,
    );
    gauge(
        out,
        "luafcgid_queue_depth",
        "gauge",
        "Requests waiting for a state now.",
        shared.waiting.waiting() as u64,
    );
    gauge(
        out,
        "luafcgid_queue_max",
        "gauge",
        "Requests that may wait at once (queue_max).",
        config.queue_max as u64,
    );
    let stats = shared.pool.stats();
    gauge(
        out,
        "luafcgid_states",
        "gauge",
        "Lua states retained now, idle or in use.",
        stats.states as u64,
    );
    gauge(
        out,
        "luafcgid_states_idle",
        "gauge",
        "Lua states retained and idle now.",
        stats.idle as u64,
    );
    gauge(
        out,
        "luafcgid_states_max",
        "gauge",
        "Lua states that may be retained (states).",
        config.states as u64,
    );
    gauge(
        out,
        "luafcgid_states_memory_bytes",
        "gauge",
        "Memory of the retained states, as measured when each was last checked in.",
        stats.memory as u64,
    );
    family(
        out,
        "luafcgid_script_states",
        "gauge",
        "Lua states of a script (path relative to its document root), idle or in use: the scripts with the most, at most 10.",
    );
    let mut shown: Vec<String> = Vec::with_capacity(TOP_SCRIPTS);
    for (key, count) in shared.pool.states_per_script(TOP_SCRIPTS) {
        let label = label_value(&shared.resolver.relative(&key));
        // Two paths cut to the same label would make one series twice: the first stays.
        if shown.contains(&label) {
            continue;
        }
        let _ = writeln!(out, "luafcgid_script_states{{script=\"{label}\"}} {count}");
        shown.push(label);
    }
    gauge(
        out,
        "luafcgid_connections_refused_total",
        "counter",
        "Connections closed at once because max_connections were open.",
        shared
            .refused_connections
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    gauge(
        out,
        "luafcgid_audit_lines_dropped_total",
        "counter",
        "Audit log lines lost (queue full or write failed).",
        shared.audit.dropped(),
    );
}

/// Serves `/healthz` and `/metrics` on `listener` until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    drop(stream);
                    continue;
                };
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    answer(stream, &metrics).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!("accept on the metrics listener: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads a request head: `Ok(len)` of the head, `Err(status)` when there is none to read.
async fn read_head(stream: &mut TcpStream, buf: &mut [u8]) -> Result<usize, &'static str> {
    let mut len = 0;
    loop {
        if let Some(i) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(i + 4);
        }
        if len == buf.len() {
            return Err("431 Request Header Fields Too Large");
        }
        match stream.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return Err(""),
            Ok(n) => len += n,
        }
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) {
    let mut buf = [0u8; MAX_REQUEST];
    let head = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut stream, &mut buf)).await {
        Ok(Ok(len)) => Ok(len),
        Ok(Err("")) => return,
        Ok(Err(status)) => Err(status),
        Err(_) => Err("408 Request Timeout"),
    };
    let (status, content_type, body, head_only, allow) = match head {
        Err(status) => (status, "text/plain", format!("{status}\n"), false, false),
        Ok(len) => {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf[..len]) {
                Ok(httparse::Status::Complete(_)) => {
                    let method = req.method.unwrap_or("");
                    let path = req.path.unwrap_or("");
                    let path = path.split_once('?').map_or(path, |p| p.0);
                    let head_only = method == "HEAD";
                    if method != "GET" && !head_only {
                        let s = "405 Method Not Allowed";
                        (s, "text/plain", format!("{s}\n"), false, true)
                    } else if path == "/metrics" {
                        let text = metrics.render();
                        let t = "text/plain; version=0.0.4; charset=utf-8";
                        ("200 OK", t, text, head_only, false)
                    } else if path == "/healthz" {
                        if metrics.healthy() {
                            ("200 OK", "text/plain", "ok\n".into(), head_only, false)
                        } else {
                            let s = "503 Service Unavailable";
                            (s, "text/plain", "stopping\n".into(), head_only, false)
                        }
                    } else {
                        let s = "404 Not Found";
                        (s, "text/plain", format!("{s}\n"), head_only, false)
                    }
                }
                _ => {
                    let s = "400 Bad Request";
                    (s, "text/plain", format!("{s}\n"), false, false)
                }
            }
        }
    };
    let mut reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if allow {
        reply.push_str("Allow: GET, HEAD\r\n");
    }
    reply.push_str("\r\n");
    if !head_only {
        reply.push_str(&body);
    }
    let _ = tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(reply.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_listed_in_discriminant_order() {
        for (i, o) in OUTCOMES.iter().enumerate() {
            assert_eq!(*o as usize, i, "{o:?}");
        }
        for (i, r) in Eviction::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, r) in ShedReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, l) in LIMITS.iter().enumerate() {
            assert_eq!(limit_index(*l), i);
        }
    }

    #[test]
    fn statuses_map_to_a_bounded_set_of_labels() {
        assert!(EXACT_STATUSES.windows(2).all(|w| w[0].0 < w[1].0), "sorted");
        for (s, label) in EXACT_STATUSES {
            assert_eq!(status_label(status_slot(Some(s))), label);
        }
        assert_eq!(status_label(status_slot(Some(299))), "2xx");
        assert_eq!(status_label(status_slot(Some(100))), "1xx");
        assert_eq!(status_label(status_slot(Some(999))), "9xx");
        assert_eq!(status_label(status_slot(Some(99))), "other");
        assert_eq!(status_label(status_slot(Some(1000))), "other");
        assert_eq!(status_label(status_slot(None)), "none");
        let mut labels: Vec<_> = (0..STATUS_SLOTS).map(status_label).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), STATUS_SLOTS, "one label per slot");
    }

    #[test]
    fn latency_buckets_hold_their_upper_bound() {
        assert_eq!(latency_slot(0), 0);
        assert_eq!(latency_slot(500), 0);
        assert_eq!(latency_slot(501), 1);
        assert_eq!(latency_slot(10_000_000), LATENCY_BUCKETS.len() - 1);
        assert_eq!(latency_slot(10_000_001), LATENCY_BUCKETS.len());
        assert_eq!(latency_slot(u64::MAX), LATENCY_BUCKETS.len());
    }

    #[test]
    fn label_values_are_escaped_and_cut() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let long = "é".repeat(SCRIPT_LABEL_MAX);
        let cut = label_value(&long);
        assert!(cut.len() <= SCRIPT_LABEL_MAX && cut.len() >= SCRIPT_LABEL_MAX - 1);
    }

    #[test]
    fn counters_render_without_a_daemon() {
        let m = Metrics::default();
        m.request(Outcome::Ok, Some(201), Duration::from_millis(3));
        m.request(Outcome::Aborted, None, Duration::from_secs(20));
        m.shed(ShedReason::from(Full::Script));
        m.rate_limited(Limit::Global);
        m.evicted(Eviction::Memory);
        m.reloaded();
        let text = m.render();
        for line in [
            "luafcgid_requests_total{outcome=\"ok\",status=\"201\"} 1",
            "luafcgid_requests_total{outcome=\"ok\",status=\"200\"} 0",
            "luafcgid_requests_total{outcome=\"aborted\",status=\"none\"} 1",
            "luafcgid_request_duration_seconds_bucket{le=\"0.0025\"} 0",
            "luafcgid_request_duration_seconds_bucket{le=\"0.005\"} 1",
            "luafcgid_request_duration_seconds_bucket{le=\"10\"} 1",
            "luafcgid_request_duration_seconds_bucket{le=\"+Inf\"} 2",
            "luafcgid_request_duration_seconds_count 2",
            "luafcgid_request_duration_seconds_sum 20.003",
            "luafcgid_shed_total{reason=\"script_queue_full\"} 1",
            "luafcgid_rate_limited_total{limit=\"rate_global\"} 1",
            "luafcgid_state_evictions_total{reason=\"memory\"} 1",
            "luafcgid_reloads_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(!m.healthy(), "no daemon attached");
    }

    #[test]
    fn requests_counted_on_many_threads_are_all_reported() {
        // More threads than shards, so some share one and every shard is used.
        let m = Metrics::default();
        std::thread::scope(|s| {
            for _ in 0..SHARDS + 3 {
                s.spawn(|| {
                    for _ in 0..10 {
                        m.request(Outcome::Ok, Some(200), Duration::from_millis(1));
                    }
                });
            }
        });
        let n = (SHARDS + 3) * 10;
        assert_eq!(m.requests(Outcome::Ok), n as u64);
        let text = m.render();
        for line in [
            format!("luafcgid_requests_total{{outcome=\"ok\",status=\"200\"}} {n}"),
            format!("luafcgid_request_duration_seconds_bucket{{le=\"+Inf\"}} {n}"),
            format!("luafcgid_request_duration_seconds_count {n}"),
            format!("luafcgid_request_duration_seconds_sum {}", n as f64 / 1e3),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}
