//! Admission across tenants and scripts: a tenant never holds every worker, and one script
//! cannot take every place in the queue.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::support::*;

/// Busy for `secs` of wall-clock time as the script sees it (os.time has whole seconds, so
/// this spins on os.clock, CPU time of the process; with several spinning it ends sooner,
/// which only makes the tests below finish faster).
fn spin(secs: f64) -> String {
    format!("function handler() local t = os.clock() while os.clock() - t < {secs} do end return 'slow' end")
}

#[test]
fn a_flooding_tenant_never_holds_every_worker() {
    // Two workers, so one per tenant. Without the tenant cap, two slow requests of `flood`
    // would hold both and `good` would wait until one of them ended.
    let slow = spin(1.0);
    let d = Daemon::start(
        "queue_timeout_ms = 20000",
        &[
            (
                "flood/policy.toml",
                "clones = 4\ntimeout_ms = 20000\ninstructions = 100_000_000_000",
            ),
            ("flood/slow.lua", &slow),
            ("good/hello.lua", HELLO),
        ],
    );
    let finished = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                let r = d.get("flood/slow.lua");
                finished.fetch_add(1, Ordering::SeqCst);
                r
            });
        }
        d.wait_leased(1);
        let r = d.get("good/hello.lua");
        assert_eq!(r.status, 200);
        assert_eq!(
            finished.load(Ordering::SeqCst),
            0,
            "the other tenant was served while the flood still ran"
        );
        assert_eq!(
            d.shared.pool.stats().states - d.shared.pool.stats().idle,
            1,
            "the flooding tenant holds one worker"
        );
    });
}

#[test]
fn one_script_cannot_take_every_place_in_the_queue() {
    // queue_max = 4: one script may have one request waiting; the rest are shed at once,
    // while another script can still wait.
    let slow = spin(1.0);
    let mut d = Daemon::start(
        "queue_max = 4\nqueue_timeout_ms = 20000\ntenant_workers = 2",
        &[
            (
                "t/policy.toml",
                "clones = 1\ntimeout_ms = 20000\ninstructions = 100_000_000_000",
            ),
            ("t/slow.lua", &slow),
            ("t/other.lua", &slow),
        ],
    );
    std::thread::scope(|s| {
        let running = s.spawn(|| d.get("t/slow.lua"));
        d.wait_leased(1);
        let waiting = s.spawn(|| d.get("t/slow.lua"));
        d.wait_queued(1);
        let shed = d.get("t/slow.lua");
        assert_eq!(shed.status, 503);
        assert!(shed.header("Retry-After").is_some());
        let other = d.get("t/other.lua");
        assert_eq!(other.status, 200, "another script still had room");
        assert_eq!(running.join().unwrap().status, 200);
        assert_eq!(waiting.join().unwrap().status, 200);
    });
    let lines = d.stop();
    let shed: Vec<_> = requests(&lines)
        .into_iter()
        .filter(|l| l["outcome"] == "shed")
        .collect();
    assert_eq!(shed.len(), 1);
    assert_eq!(
        shed[0]["error"],
        "too many requests for this script waiting"
    );
}

/// A daemon with two workers, so the tenant `t` may hold one: `t/slow.lua` (a second of
/// spinning) holds it while `t/hello.lua` waits.
fn one_worker_tenant() -> Daemon {
    Daemon::start(
        "queue_timeout_ms = 20000",
        &[
            (
                "t/policy.toml",
                "timeout_ms = 20000\ninstructions = 100_000_000_000",
            ),
            ("t/slow.lua", &spin(1.0)),
            ("t/hello.lua", HELLO),
        ],
    )
}

#[test]
fn a_request_whose_client_left_while_it_waited_is_not_run() {
    // The tenant's only worker is busy, so a second request of the tenant waits on its
    // connection. Its client hangs up meanwhile: when the worker is free, that request ends
    // `aborted` without running (hello would otherwise run, and end `ok`, at once).
    let mut d = one_worker_tenant();
    std::thread::scope(|s| {
        let running = s.spawn(|| d.get("t/slow.lua"));
        d.wait_leased(1);
        let c = d.sent_get("t/hello.lua");
        d.wait_queued(1);
        drop(c);
        assert_eq!(running.join().unwrap().status, 200);
    });
    let lines = d.stop();
    let outcome_of = |script: &str| -> Vec<serde_json::Value> {
        requests(&lines)
            .into_iter()
            .filter(|l| l["script"] == script)
            .map(|l| l["outcome"].clone())
            .collect()
    };
    assert_eq!(outcome_of("t/slow.lua"), ["ok"]);
    assert_eq!(outcome_of("t/hello.lua"), ["aborted"]);
}

#[test]
fn a_waiting_request_dropped_before_its_turn_gives_its_place_back() {
    // A request waiting in its connection's task holds a place in the queue; if that task
    // ends before the request's turn (the runtime shutting down), the place is freed.
    use luafcgid::dispatch::{dispatch, Dispatched, Framing, Incoming};
    let d = one_worker_tenant();
    std::thread::scope(|s| {
        let running = s.spawn(|| d.get("t/slow.lua"));
        d.wait_leased(1);
        let script = d.script("t/hello.lua");
        let mut raw = Vec::new();
        for (k, v) in params_for(&script, "GET", &[]) {
            fastcgi_protocol::encode_pair(k.as_bytes(), v.as_bytes(), &mut raw);
        }
        let inc = Incoming {
            framing: Framing::FastCgi { id: 1 },
            keep_conn: true,
            params: fastcgi_protocol::Params::decode(raw).unwrap(),
            body: Vec::new(),
            body_len: 0,
            body_exceeded: false,
            peer: std::sync::Arc::from("127.0.0.1"),
            abort: Default::default(),
            received: std::time::Instant::now(),
            rate: luafcgid::ratelimit::Verdict::Unchecked,
            policy: None,
        };
        let resolved = d
            .shared
            .resolver
            .resolve(Some(script.as_bytes()), std::time::Instant::now());
        let Dispatched::Queued(queued) = dispatch(&d.shared, inc, resolved, None) else {
            panic!("the tenant's worker is busy: the request must wait")
        };
        assert_eq!(d.shared.waiting.waiting(), 1);
        drop(queued);
        assert_eq!(
            d.shared.waiting.waiting(),
            0,
            "the place was not given back"
        );
        assert_eq!(running.join().unwrap().status, 200);
    });
}
