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
        // Wait (bounded) until that request is in the queue.
        let t = std::time::Instant::now();
        while d.shared.waiting.waiting() < 1 {
            assert!(t.elapsed() < std::time::Duration::from_secs(10));
            std::thread::yield_now();
        }
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
