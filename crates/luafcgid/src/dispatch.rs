//! From an assembled request to its reply: the checks that answer before Lua runs
//! (bad request, not found, forbidden, rate limited, body too large), admission, and the run
//! itself: check a state out, run the entry function under the policy's limits, check the
//! state back in, render, audit.
//!
//! Admission takes three permits: one of the tenant's workers, one of the script's
//! `clones` and one of the `workers` Lua slots. When all are free at once the request runs
//! right away on the calling thread (the common, fast path: no hand-off between threads).
//! Otherwise the request waits for them at most `queue_timeout` (in its connection's task
//! when the connection has nothing else to do, else in a small task of its own), with at
//! most `queue_max` requests waiting in all, and is answered 503 `shed` beyond either. The
//! runtime has one thread more than there are Lua slots, so however many requests are in
//! Lua, a thread is always left to accept connections, answer management records and
//! reject requests. A script whose runs take long (see [`SLOW_WINDOW`]) never runs inline:
//! its requests wait for their permits in a task of their own and run on a blocking
//! thread, away from the threads that serve connections.
//!
//! Both front ends (FastCGI and the development HTTP listener) come through here, so every
//! request gets exactly one reply and one audit line, whatever happens to it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fastcgi_protocol::{encode_end_request, frame_response, Params, ProtocolStatus, HEADER_LEN};
use luafcgid_policy::{Effective, Resolution};
use luafcgid_pool::{Retire, Version};
use luafcgid_sandbox::{
    ClientProbe, Failure, Limits, RequestData, RequestInput, ScriptState, StateOptions,
    PROBE_INTERVAL,
};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::Semaphore;

use crate::admission::Full;
use crate::audit::{truncate, PolicyFiles, RequestEvent, RequestLine, AUDIT_TEXT_MAX};
use crate::metrics::{Eviction, ShedReason};
use crate::outcome::Outcome;
use crate::probe::SocketProbe;
use crate::ratelimit::Verdict;
use crate::render::{error_page, render};
use crate::request_id::{RequestId, RequestIds};
use crate::resolve::{Refusal, Script};
use crate::server::Shared;

/// How a reply is framed for its front end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// FastCGI records for this request id.
    FastCgi { id: u16 },
    /// Plain CGI output (the HTTP listener converts it).
    Cgi,
}

/// A finished reply, ready to write.
#[derive(Debug)]
pub struct Reply {
    pub framing: Framing,
    /// FastCGI records, or CGI output.
    pub bytes: Vec<u8>,
    pub keep_conn: bool,
    /// How the request ended (as in its audit line).
    pub outcome: Outcome,
}

/// Where a front end receives its replies.
pub type ReplyTx = UnboundedSender<Reply>;

/// A request as a front end assembled it.
#[derive(Debug)]
pub struct Incoming {
    pub framing: Framing,
    pub keep_conn: bool,
    pub params: Params,
    pub body: Vec<u8>,
    pub body_len: u64,
    pub body_exceeded: bool,
    /// The peer, for the audit log when the client key param is absent.
    pub peer: Arc<str>,
    /// Set when the client went away.
    pub abort: Arc<AtomicBool>,
    pub received: Instant,
    /// What the rate limits said, when the front end checked them before the body.
    pub rate: Verdict,
    /// The script's policy, when the front end resolved it already (else `dispatch` does).
    pub policy: Option<Resolution>,
}

/// How a request ended, for its audit line.
struct Audit {
    request_id: RequestId,
    script: Option<Arc<Script>>,
    /// The script's effective policy, when it was resolved.
    effective: Option<Arc<Effective>>,
    status: Option<u16>,
    outcome: Outcome,
    instructions: Option<u64>,
    memory: Option<u64>,
    bytes_out: Option<u64>,
    state: Option<&'static str>,
    error: Option<String>,
}

/// A param's value as log text, invalid UTF-8 replaced (a client cannot keep its URI out of
/// the log by making it invalid UTF-8).
fn log_text(v: &[u8]) -> std::borrow::Cow<'_, str> {
    // Valid UTF-8 (nearly always) is checked by the faster test first.
    match std::str::from_utf8(v) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(v),
    }
}

/// Bytes of the params a request line shows kept in the line itself; longer ones (a long
/// URI) are kept in an allocation of their own.
const LOGGED_INLINE: usize = 128;

/// The params a request line shows (the client key's, `REQUEST_METHOD` and `REQUEST_URI`),
/// copied out of the request: the first [`AUDIT_TEXT_MAX`] bytes of each, one after another.
/// The params themselves stay with the thread that decoded them, which frees them and soon
/// reuses their memory for the next request's, still in its cache.
struct LoggedParams {
    inline: [u8; LOGGED_INLINE],
    /// The values when they do not fit in `inline`, else empty.
    heap: Vec<u8>,
    /// Where each value ends; `None` for a param the request did not send.
    ends: [Option<u16>; 3],
}

impl LoggedParams {
    fn of(params: &Params, client_key: &str) -> LoggedParams {
        let found = params
            .first_of([client_key.as_bytes(), b"REQUEST_METHOD", b"REQUEST_URI"])
            .map(|v| v.map(|v| &v[..v.len().min(AUDIT_TEXT_MAX)]));
        let total: usize = found.iter().flatten().map(|v| v.len()).sum();
        let mut logged = LoggedParams {
            inline: [0; LOGGED_INLINE],
            heap: Vec::new(),
            ends: [None; 3],
        };
        if total > LOGGED_INLINE {
            logged.heap.reserve_exact(total);
        }
        let mut end = 0;
        for (slot, value) in logged.ends.iter_mut().zip(found) {
            let Some(value) = value else { continue };
            if total <= LOGGED_INLINE {
                logged.inline[end..end + value.len()].copy_from_slice(value);
            } else {
                logged.heap.extend_from_slice(value);
            }
            end += value.len();
            // At most three values of at most AUDIT_TEXT_MAX bytes each: it fits.
            *slot = u16::try_from(end).ok();
        }
        logged
    }

    /// Whether the request's method is `HEAD` (its reply then has headers only).
    fn is_head(&self) -> bool {
        self.values()[1] == Some(b"HEAD")
    }

    /// The client key's, the method's and the URI's values, as sent (cut).
    fn values(&self) -> [Option<&[u8]>; 3] {
        let bytes: &[u8] = if self.heap.is_empty() {
            &self.inline
        } else {
            &self.heap
        };
        let mut start = 0;
        self.ends.map(|end| {
            end.map(|end| {
                let end = usize::from(end);
                let v = &bytes[start..end];
                start = end;
                v
            })
        })
    }
}

/// A request's audit line as queued: what it is made of, moved or copied out of the
/// request, written as JSON by the audit log's writer thread.
struct Line {
    at: Duration,
    /// The request's client key, method and URI.
    params: LoggedParams,
    peer: Arc<str>,
    duration_us: u64,
    bytes_in: u64,
    audit: Audit,
}

impl RequestLine for Line {
    fn write(&self, out: &mut Vec<u8>) {
        let [client, method, uri] = self.params.values().map(|v| v.map(log_text));
        let a = &self.audit;
        let effective = a.effective.as_deref();
        let script = a.script.as_deref();
        RequestEvent {
            at: self.at,
            event: "request",
            request_id: &a.request_id,
            client: Some(client.as_deref().map_or(&*self.peer, truncate)),
            method: method.as_deref().map(truncate),
            uri: uri.as_deref().map(truncate),
            script: script.map(|s| truncate(&s.relative)),
            tenant: effective
                .map(|e| e.tenant.as_str())
                .or(script.map(|s| s.tenant.as_str()))
                .filter(|t| !t.is_empty()),
            policy: effective.map(|e| PolicyFiles(&e.files)),
            status: a.status,
            outcome: a.outcome.as_str(),
            duration_us: self.duration_us,
            instructions: a.instructions,
            memory: a.memory,
            bytes_in: Some(self.bytes_in),
            bytes_out: a.bytes_out,
            state: a.state,
            error: a.error.as_deref(),
        }
        .write_line(out);
    }

    fn cost(&self) -> usize {
        std::mem::size_of::<Line>()
            + self.params.heap.capacity()
            + self.audit.error.as_ref().map_or(0, String::len)
    }
}

/// Counts the request in the metrics and queues its audit line, with a copy of the params
/// it shows.
fn emit(shared: &Shared, inc: &Incoming, params: LoggedParams, mut audit: Audit) {
    let elapsed = inc.received.elapsed();
    shared.metrics.request(audit.outcome, audit.status, elapsed);
    if let Some(error) = &mut audit.error {
        let kept = truncate(error).len();
        error.truncate(kept);
    }
    shared.audit.emit_request(Box::new(Line {
        at: crate::audit::now(),
        params,
        peer: inc.peer.clone(),
        duration_us: elapsed.as_micros() as u64,
        bytes_in: inc.body_len,
        audit,
    }));
}

/// A reply's buffer, empty but for room in front for its record header: the CGI output is
/// written after it, then [`frame`] frames it in place (not copied into records).
fn reply_buffer(framing: Framing, capacity: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(capacity);
    if let Framing::FastCgi { .. } = framing {
        bytes.resize(HEADER_LEN, 0);
    }
    bytes
}

/// Frames the CGI output written into a [`reply_buffer`].
fn frame(framing: Framing, bytes: &mut Vec<u8>) {
    if let Framing::FastCgi { id } = framing {
        frame_response(id, bytes, 0);
    }
}

/// Answers `inc` with an error page without running Lua.
pub fn answer_early(
    shared: &Shared,
    inc: &mut Incoming,
    script: Option<&Arc<Script>>,
    effective: Option<&Arc<Effective>>,
    outcome: Outcome,
    retry_after: Option<u64>,
    detail: Option<&str>,
) -> Reply {
    let request_id = shared.ids.next_id();
    let status = outcome.status();
    let logged = LoggedParams::of(&inc.params, &shared.config.client_key);
    let mut bytes = reply_buffer(inc.framing, 512);
    error_page(
        status,
        &request_id,
        None,
        retry_after,
        logged.is_head(),
        &mut bytes,
    );
    frame(inc.framing, &mut bytes);
    emit(
        shared,
        inc,
        logged,
        Audit {
            request_id,
            script: script.cloned(),
            effective: effective.cloned(),
            status: Some(status),
            outcome,
            instructions: None,
            memory: None,
            bytes_out: Some(0),
            state: None,
            error: detail.map(str::to_owned),
        },
    );
    Reply {
        framing: inc.framing,
        bytes,
        keep_conn: inc.keep_conn,
        outcome,
    }
}

/// How long a script counts as slow after one of its runs took long (more than a couple of
/// milliseconds). Meanwhile its requests never run inline on the threads that serve
/// connections but wait for their permits and run on a thread of their own, so a tenant's
/// slow script cannot hold those threads while other tenants' requests wait. Each long run
/// renews the mark; a script that runs long once in a while is caught by its first such run
/// (which the probe's hand-off covers) and then stays apart for the whole window.
pub const SLOW_WINDOW: Duration = Duration::from_secs(10);

/// How long a slow script's run pauses, at each probe of the hook (about every 2 ms of
/// running), while the daemon is serving other requests.
pub const APART_PAUSE: Duration = Duration::from_millis(2);

/// The probe of a slow script's run on a blocking thread. It watches no socket (the
/// connection task does) and, when requests came in since it last looked, pauses the run
/// for [`APART_PAUSE`], so the run's thread leaves its CPU idle now and then. A long run
/// already gives up its priority (`SCHED_IDLE`), but a CPU kept busy by it still looks busy
/// to the kernel when it places woken threads: they then queue behind one another on the
/// other CPUs instead of taking this one. The pauses let them take it.
struct Apart {
    ids: Arc<RequestIds>,
    /// Requests issued when it last looked (`u64::MAX`: it has not looked yet).
    seen: AtomicU64,
}

impl Apart {
    fn new(ids: Arc<RequestIds>) -> Apart {
        Apart {
            ids,
            seen: AtomicU64::new(u64::MAX),
        }
    }
}

impl ClientProbe for Apart {
    fn gone(&self) -> bool {
        false
    }

    fn pause(&self) -> Duration {
        let now = self.ids.issued();
        match self.seen.swap(now, Ordering::Relaxed) {
            before if before != u64::MAX && before != now => APART_PAUSE,
            _ => Duration::ZERO,
        }
    }
}

/// Seconds a shed client should wait before retrying.
const SHED_RETRY_AFTER: u64 = 1;

/// Runs a request: answers it early when it cannot run, runs it at once on this thread
/// when `inline` is given (the caller's connection has nothing else to do meanwhile; the
/// probe watches its socket) and a state and a Lua slot are free, else gives it back
/// queued, holding its place in the waiting room.
pub fn dispatch(
    shared: &Arc<Shared>,
    mut inc: Incoming,
    resolved: Result<Arc<Script>, Refusal>,
    inline: Option<Arc<dyn ClientProbe + Send>>,
) -> Dispatched {
    let script = match resolved {
        Ok(s) => s,
        Err(refusal) => {
            let (outcome, why) = match refusal {
                Refusal::BadRequest(w) => (Outcome::BadRequest, w),
                Refusal::NotFound => (Outcome::NotFound, "no such script"),
                Refusal::Forbidden(w) => (Outcome::Forbidden, w),
                Refusal::Unavailable(w) => (Outcome::Shed, w),
            };
            let retry_after = (outcome == Outcome::Shed).then_some(SHED_RETRY_AFTER);
            return Dispatched::Now(answer_early(
                shared,
                &mut inc,
                None,
                None,
                outcome,
                retry_after,
                Some(why),
            ));
        }
    };
    let resolution = match inc.policy.take() {
        Some(r) => r,
        None => shared.policy_for(&script),
    };
    let effective = match resolution {
        Resolution::Allowed(e) => e,
        Resolution::Denied(e) => {
            let why = "denied by policy";
            let e = Some(&e);
            return Dispatched::Now(answer_early(
                shared,
                &mut inc,
                Some(&script),
                e,
                Outcome::Forbidden,
                None,
                Some(why),
            ));
        }
        Resolution::Invalid(problem) => {
            let why = problem.to_string();
            return Dispatched::Now(answer_early(
                shared,
                &mut inc,
                Some(&script),
                None,
                Outcome::PolicyError,
                None,
                Some(&why),
            ));
        }
        Resolution::Outside => {
            let why = "outside the document roots";
            return Dispatched::Now(answer_early(
                shared,
                &mut inc,
                Some(&script),
                None,
                Outcome::Forbidden,
                None,
                Some(why),
            ));
        }
    };
    let policy = &effective.policy;
    let rate = match inc.rate {
        Verdict::Unchecked => shared.rate_check(&script, &effective, Some(&inc.params), &inc.peer),
        checked => checked,
    };
    if let Verdict::Limited { limit, retry_after } = rate {
        shared.metrics.rate_limited(limit);
        return Dispatched::Now(answer_early(
            shared,
            &mut inc,
            Some(&script),
            Some(&effective),
            Outcome::RateLimited,
            Some(retry_after),
            Some(limit.detail()),
        ));
    }
    if inc.body_exceeded || inc.body_len > policy.body {
        return Dispatched::Now(answer_early(
            shared,
            &mut inc,
            Some(&script),
            Some(&effective),
            Outcome::BodyTooLarge,
            None,
            Some("request body over the limit"),
        ));
    }
    let admission = shared.pool.admission(&script.key, policy.clones);
    let (clones, slow) = (admission.permits, admission.slow);
    let tenant = shared.tenants.of_cached(&effective.tenant);
    let mut probe = inline;
    if let Some(p) = probe.take_if(|_| !slow) {
        // Borrowed permits: the run ends before this function returns.
        if let Ok(own) = tenant.try_acquire() {
            if let Ok(clone) = clones.try_acquire() {
                if let Ok(slot) = shared.lua_slots.try_acquire() {
                    shared.driver_watch.run_started();
                    return Dispatched::Now(run(
                        shared,
                        &mut inc,
                        script,
                        effective,
                        Some(p),
                        (slot, clone, own),
                    ));
                }
            }
        }
        probe = Some(p);
    }
    if let Err(full) = shared.waiting.enter(&script.key) {
        shared.metrics.shed(ShedReason::from(full));
        let why = match full {
            Full::All => "too many requests waiting",
            Full::Script => "too many requests for this script waiting",
        };
        return Dispatched::Now(answer_early(
            shared,
            &mut inc,
            Some(&script),
            Some(&effective),
            Outcome::Shed,
            Some(SHED_RETRY_AFTER),
            Some(why),
        ));
    }
    Dispatched::Queued(Queued {
        inc,
        effective,
        tenant,
        clones,
        slow,
        probe,
        place: Place {
            shared: shared.clone(),
            script,
        },
    })
}

/// What [`dispatch`] did with a request.
#[derive(Debug)]
pub enum Dispatched {
    /// Answered now: early, or run at once.
    Now(Reply),
    /// It must wait for a state: the caller awaits [`Queued::wait`] (a caller that gave a
    /// probe, whose connection has nothing else to do meanwhile, when
    /// [`Queued::may_wait_in_place`]) or hands it to [`Queued::spawn`].
    Queued(Queued),
}

/// A request waiting for its permits. Its place in the waiting room is held until it has
/// them or gives up, and given back if it is dropped.
#[derive(Debug)]
pub struct Queued {
    inc: Incoming,
    effective: Arc<Effective>,
    tenant: Arc<Semaphore>,
    clones: Arc<Semaphore>,
    slow: bool,
    /// The caller's probe of its client, for a wait in place.
    probe: Option<Arc<dyn ClientProbe + Send>>,
    place: Place,
}

/// A request's place in the waiting room.
#[derive(Debug)]
struct Place {
    shared: Arc<Shared>,
    script: Arc<Script>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.shared.waiting.leave(&self.script.key);
    }
}

impl Queued {
    /// Whether the caller may await [`Queued::wait`] in its connection's task. Not for a
    /// slow script: its run goes apart, where nothing but the connection task (then busy
    /// awaiting it) would notice that the client left.
    pub fn may_wait_in_place(&self) -> bool {
        !self.slow
    }

    /// Waits for the permits (at most `queue_timeout`), then runs the request, or answers
    /// it `shed`. `None` only when a run apart panicked (a bug: as on a runtime thread, only
    /// its request ends).
    pub async fn wait(self) -> Option<Reply> {
        let Queued {
            mut inc,
            effective,
            tenant,
            clones,
            slow,
            probe,
            place,
        } = self;
        let (shared, script) = (place.shared.clone(), place.script.clone());
        // The tenant's permit first: the requests of a tenant at its cap wait there, not in
        // the queue for a Lua slot, where they would be ahead of other tenants' requests.
        let permits = tokio::time::timeout(shared.config.queue_timeout, async {
            let own = tenant.acquire_owned().await.ok()?;
            let clone = clones.acquire_owned().await.ok()?;
            let slot = shared.lua_slots.clone().acquire_owned().await.ok()?;
            shared.driver_watch.run_started();
            Some((slot, clone, own))
        })
        .await;
        drop(place);
        if !matches!(permits, Ok(Some(_))) {
            shared.metrics.shed(ShedReason::QueueTimeout);
        }
        Some(match permits {
            Ok(Some(permits)) if slow => {
                // Away from the threads that serve connections: a run of a slow script
                // there would hold one of them for as long as it runs.
                shared.metrics.ran_apart();
                let apart = shared.clone();
                let reply = tokio::task::spawn_blocking(move || {
                    let probe = Arc::new(Apart::new(apart.ids.clone()));
                    run(&apart, &mut inc, script, effective, Some(probe), permits)
                })
                .await;
                reply.ok()?
            }
            Ok(Some(permits)) => {
                // A client that left while its request waited is not run for. A short wait
                // is not worth the system call: a run that lasts is probed within
                // `PROBE_INTERVAL` anyway, so at most that much Lua runs for a client that
                // left during it (a third of the requests wait, briefly, when one tenant's
                // connections are many).
                let probe = match probe {
                    Some(p) => {
                        if inc.received.elapsed() >= PROBE_INTERVAL && p.left() {
                            inc.abort.store(true, Ordering::Relaxed);
                        }
                        p
                    }
                    None => Arc::new(SocketProbe::runtime_only()),
                };
                run(&shared, &mut inc, script, effective, Some(probe), permits)
            }
            _ => answer_early(
                &shared,
                &mut inc,
                Some(&script),
                Some(&effective),
                Outcome::Shed,
                Some(SHED_RETRY_AFTER),
                Some("waited too long for a state"),
            ),
        })
    }

    /// Waits in a task of its own; the reply comes on `tx`.
    pub fn spawn(mut self, tx: &ReplyTx) {
        // The caller's connection goes on meanwhile and watches its client itself.
        self.probe = None;
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Some(reply) = self.wait().await {
                let _ = tx.send(reply);
            }
        });
    }
}

/// Builds the sandbox options of a script under its effective policy.
pub fn state_options(script: &Script, effective: &Effective) -> StateOptions {
    let policy = &effective.policy;
    StateOptions {
        script: script.key.to_path_buf(),
        chunk_name: script.relative.clone(),
        module_root: effective.tenant_root.clone(),
        modules: policy.modules,
        entry: policy.entry.clone(),
        memory: policy.memory as usize,
        libs: policy.libs.clone(),
        init: Limits {
            instructions: policy.init_instructions,
            timeout: policy.init_timeout,
            output: policy.output as usize,
        },
    }
}

/// The `r:log` messages of a request (whatever its outcome), then how many were over the cap.
fn log_script_messages(
    shared: &Shared,
    request_id: &RequestId,
    script: &Script,
    (messages, dropped): (Vec<String>, usize),
) {
    if messages.is_empty() && dropped == 0 {
        return;
    }
    let request_id = request_id.as_str();
    let script = truncate(&script.relative);
    for message in &messages {
        shared.audit.lifecycle(
            "script_log",
            serde_json::json!({
                "request_id": request_id,
                "script": script,
                "message": truncate(message),
            }),
        );
    }
    if dropped > 0 {
        shared.audit.lifecycle(
            "log_dropped",
            serde_json::json!({"count": dropped, "request_id": request_id, "script": script}),
        );
    }
}

/// What the sandbox reads of a request during its run: its params and body, moved out of
/// the request for the run (the params come back for the audit line), and its policy's
/// `[vars]`.
struct RunData {
    params: Params,
    body: Vec<u8>,
    effective: Arc<Effective>,
}

impl RequestData for RunData {
    fn params(&self) -> Box<dyn Iterator<Item = (&[u8], &[u8])> + '_> {
        Box::new(self.params.iter())
    }

    fn param_count(&self) -> usize {
        self.params.len()
    }

    fn body(&self) -> &[u8] {
        &self.body
    }

    fn var(&self, name: &[u8]) -> Option<&str> {
        self.effective
            .policy
            .vars
            .iter()
            .find(|(k, _)| k.as_bytes() == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Runs the request on a state of its script and renders its reply. `permits` (the
/// tenant's, the clone's and the Lua slot's) are given back as soon as the state is back in
/// the pool, before the reply is rendered and the audit line queued.
fn run(
    shared: &Shared,
    inc: &mut Incoming,
    script: Arc<Script>,
    effective: Arc<Effective>,
    client: Option<Arc<dyn ClientProbe + Send>>,
    permits: impl Sized,
) -> Reply {
    let policy = &effective.policy;
    let request_id = shared.ids.next_id();
    let logged = LoggedParams::of(&inc.params, &shared.config.client_key);
    let head = logged.is_head();
    let limits = Limits {
        instructions: policy.instructions,
        timeout: policy.timeout,
        output: policy.output as usize,
    };
    let mut instructions = None;
    let mut memory = None;
    let mut state_kind = None;
    let mut logs = (Vec::new(), 0);
    let result: Result<luafcgid_sandbox::Response, Failure> = if inc.abort.load(Ordering::Relaxed) {
        Err(Failure::Aborted)
    } else {
        let version = Version {
            file: script.stamp,
            policy: effective.generation,
        };
        let lease = shared.pool.checkout(&script.key, version, || {
            ScriptState::load(&state_options(&script, &effective), &inc.abort).map(Box::new)
        });
        match lease {
            Err(f) => Err(f),
            Ok(mut lease) => {
                if let Some(victim) = &lease.evicted {
                    shared.metrics.evicted(Eviction::Capacity);
                    shared.audit.lifecycle(
                        "state_evicted",
                        serde_json::json!({"script": shared.resolver.relative(victim), "reason": "capacity"}),
                    );
                }
                state_kind = Some(if lease.fresh { "new" } else { "warm" });
                let data = Arc::new(RunData {
                    params: std::mem::take(&mut inc.params),
                    body: std::mem::take(&mut inc.body),
                    effective: effective.clone(),
                });
                let input = RequestInput {
                    data: data.clone(),
                    abort: inc.abort.clone(),
                    client,
                };
                let mut report = lease.state().handle(&input, &limits);
                drop(input);
                // The state let go of the request at the end of the run.
                inc.params = match Arc::try_unwrap(data) {
                    Ok(data) => data.params,
                    Err(data) => data.params.clone(),
                };
                if report.long {
                    shared.pool.mark_slow(&script.key, SLOW_WINDOW);
                }
                instructions = Some(report.instructions);
                memory = Some(report.memory as u64);
                logs = (std::mem::take(&mut report.logs), report.logs_dropped);
                let keep = match &report.result {
                    Ok(_) if policy.persistent => Retire::Keep,
                    Err(f) if f.keeps_state() && policy.persistent => Retire::Keep,
                    _ => Retire::Discard,
                };
                let evicted = shared.pool.checkin(
                    lease,
                    keep,
                    policy.state_max_requests,
                    policy.state_max_age,
                );
                for victim in evicted {
                    shared.metrics.evicted(Eviction::Memory);
                    shared.audit.lifecycle(
                        "state_evicted",
                        serde_json::json!({"script": shared.resolver.relative(&victim), "reason": "memory"}),
                    );
                }
                report.result
            }
        }
    };
    // The state is back in the pool: the script's and the tenant's next request may run
    // while this one's reply is rendered and its audit line queued.
    drop(permits);
    log_script_messages(shared, &request_id, &script, logs);
    let mut bytes = reply_buffer(inc.framing, 320);
    let (outcome, status, bytes_out, error) = match &result {
        Ok(resp) => {
            render(resp, &shared.defaults, &request_id, head, &mut bytes);
            (
                Outcome::Ok,
                resp.status.unwrap_or(shared.defaults.status),
                resp.body.len() as u64,
                None,
            )
        }
        Err(f) => {
            let outcome = Outcome::of_failure(f);
            let message = f.to_string();
            if outcome != Outcome::Aborted {
                let detail = policy.show_errors.then_some(message.as_str());
                let retry_after = (outcome == Outcome::Shed).then_some(SHED_RETRY_AFTER);
                error_page(
                    outcome.status(),
                    &request_id,
                    detail,
                    retry_after,
                    head,
                    &mut bytes,
                );
            }
            (outcome, outcome.status(), 0, Some(message))
        }
    };
    emit(
        shared,
        inc,
        logged,
        Audit {
            request_id,
            script: Some(script),
            effective: Some(effective),
            status: (outcome != Outcome::Aborted).then_some(status),
            outcome,
            instructions,
            memory,
            bytes_out: Some(bytes_out),
            state: state_kind,
            error,
        },
    );
    if outcome == Outcome::Aborted {
        // No output: the request ends with its END_REQUEST alone.
        bytes.clear();
        if let Framing::FastCgi { id } = inc.framing {
            encode_end_request(id, 1, ProtocolStatus::RequestComplete, &mut bytes);
        }
    } else {
        frame(inc.framing, &mut bytes);
    }
    Reply {
        framing: inc.framing,
        bytes,
        keep_conn: inc.keep_conn,
        outcome,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_line_holds_and_counts_only_the_params_it_shows_cut() {
        let mut raw = Vec::new();
        fastcgi_protocol::encode_pair(b"HTTP_COOKIE", &vec![b'c'; 50_000], &mut raw);
        fastcgi_protocol::encode_pair(b"REQUEST_URI", &vec![b'u'; 100_000], &mut raw);
        fastcgi_protocol::encode_pair(b"REQUEST_METHOD", b"GET", &mut raw);
        fastcgi_protocol::encode_pair(b"REQUEST_URI", b"/second", &mut raw);
        let params = Params::decode(raw).unwrap();
        let logged = LoggedParams::of(&params, "REMOTE_ADDR");
        assert_eq!(
            logged.heap.len(),
            AUDIT_TEXT_MAX + 3,
            "the cookie is not copied"
        );
        let held = logged.heap.capacity();
        let line = Line {
            at: Duration::ZERO,
            params: logged,
            peer: Arc::from("127.0.0.1"),
            duration_us: 0,
            bytes_in: 0,
            audit: Audit {
                request_id: RequestIds::default().next_id(),
                script: None,
                effective: None,
                status: Some(200),
                outcome: Outcome::Ok,
                instructions: None,
                memory: None,
                bytes_out: None,
                state: None,
                error: Some("e".repeat(5_000)),
            },
        };
        assert!(
            line.cost() >= held + 5_000,
            "{} < {}",
            line.cost(),
            held + 5_000
        );
        let mut out = Vec::new();
        line.write(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["uri"].as_str().unwrap(), "u".repeat(AUDIT_TEXT_MAX));
        assert_eq!(v["method"], "GET");
        assert_eq!(
            v["client"], "127.0.0.1",
            "the peer, without the client key's param"
        );
    }

    #[test]
    fn logged_params_read_back_as_sent_in_the_line_and_beyond_it() {
        for len in LOGGED_INLINE - 5..LOGGED_INLINE + 5 {
            let uri: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let mut raw = Vec::new();
            fastcgi_protocol::encode_pair(b"REQUEST_METHOD", b"GET", &mut raw);
            fastcgi_protocol::encode_pair(b"REQUEST_URI", &uri, &mut raw);
            let logged = LoggedParams::of(&Params::decode(raw).unwrap(), "REMOTE_ADDR");
            assert_eq!(logged.heap.is_empty(), len + 3 <= LOGGED_INLINE, "{len}");
            assert_eq!(logged.values(), [None, Some(&b"GET"[..]), Some(&uri[..])]);
        }
    }

    #[test]
    fn a_line_shows_the_client_keys_param_and_no_absent_param() {
        let mut raw = Vec::new();
        fastcgi_protocol::encode_pair(b"REQUEST_URI", b"/a?\xff", &mut raw);
        fastcgi_protocol::encode_pair(b"X_CLIENT", b"203.0.113.9", &mut raw);
        let params = Params::decode(raw).unwrap();
        let logged = LoggedParams::of(&params, "X_CLIENT");
        assert!(logged.heap.is_empty(), "short values are kept in the line");
        assert_eq!(
            logged.values(),
            [Some(&b"203.0.113.9"[..]), None, Some(&b"/a?\xff"[..])]
        );
    }

    #[test]
    fn a_run_apart_pauses_only_when_requests_came_in_since_it_last_looked() {
        let ids = Arc::new(RequestIds::default());
        let probe = Apart::new(ids.clone());
        assert_eq!(probe.pause(), Duration::ZERO, "the first look only counts");
        assert_eq!(probe.pause(), Duration::ZERO, "nothing came in");
        ids.next_id();
        assert_eq!(probe.pause(), APART_PAUSE);
        assert_eq!(probe.pause(), Duration::ZERO, "nothing more came in");
        ids.next_id();
        ids.next_id();
        assert_eq!(probe.pause(), APART_PAUSE);
        assert!(!probe.gone(), "the connection task watches the client");
    }
}
