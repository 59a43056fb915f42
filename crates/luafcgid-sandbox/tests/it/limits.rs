//! Each limit, during a request and during the init run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use luafcgid_sandbox::{Failure, LimitKind, Limits, ScriptState};

use crate::support::*;

#[test]
fn instruction_limit() {
    let mut s = load("function handler() while true do end end");
    let report = request(&mut s.state);
    let instructions = report.instructions;
    // The run stops at the first charge past the budget: here one loop iteration.
    assert!(
        (10_000_000..=10_000_010).contains(&instructions),
        "{instructions}"
    );
    let failure = report.result.unwrap_err();
    assert!(!failure.keeps_state());
    match failure {
        Failure::Limit {
            kind: LimitKind::Instructions,
            message,
        } => {
            assert!(message.contains("10000000"), "{message}")
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn instruction_budget_is_per_request() {
    // Each request runs ~60% of the budget (one instruction per iteration): never a limit,
    // however many requests.
    let mut s = load("function handler() for i = 1, 3000000 do end return 'ok' end");
    let limits = Limits {
        instructions: 5_000_000,
        ..limits()
    };
    for _ in 0..3 {
        let report = Req::default().run(&mut s.state, &limits);
        assert!(report.instructions > 2_000_000, "{}", report.instructions);
        assert_eq!(body(report), "ok");
    }
}

#[test]
fn time_limit() {
    let mut s = load("function handler() while true do end end");
    // DESIGN: within 10% or 50 ms; typically a few ms over. The margin of the helper (300
    // ms) is wider so a busy test machine does not make the test flaky.
    let elapsed = ends_at_the_time_limit(&mut s.state);
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
}

#[test]
fn memory_limit() {
    for src in [
        "function handler() local s = string.rep('x', 100 * 1024 * 1024) return #s end",
        "function handler() local t = {} for i = 1, 1e9 do t[i] = i end end",
        "function handler() local s = 'x' while true do s = s .. s end end",
        "function handler() local t = {} while true do t[#t + 1] = {} end end",
    ] {
        let mut s = load(src);
        expect_limit(request(&mut s.state), LimitKind::Memory);
    }
}

#[test]
fn output_limit() {
    let limits = Limits {
        output: 10_000,
        ..limits()
    };
    for src in [
        "function handler(r) while true do r:puts('xxxxxxxxxx') end end",
        "function handler(r) while true do print('xxxxxxxxxx') end end",
        "function handler(r) while true do r:header('X-A', 'yyyyyyyyyy') end end",
        "function handler(r) return string.rep('z', 10001) end",
        "function handler(r) r:write(string.rep('z', 9990), 'abcdefghijkl') end",
    ] {
        let mut s = load(src);
        let report = Req::default().run(&mut s.state, &limits);
        expect_limit(report, LimitKind::Output);
    }
    // Exactly at the limit is fine; headers count too.
    let mut s =
        load("function handler(r) r:header('X-A', 'b') return string.rep('z', 10000 - 10) end");
    let response = ok(Req::default().run(&mut s.state, &limits));
    assert_eq!(response.body.len(), 9990);
}

#[test]
fn init_limits_apply_to_the_chunk() {
    for (src, kind) in [
        ("while true do end", LimitKind::Instructions),
        (
            "local t = {} while true do t[#t + 1] = 'x' .. #t end",
            LimitKind::Memory,
        ),
    ] {
        let (_dir, result) = try_load(format!("{src}\nfunction handler() end"));
        match result {
            Err(Failure::Limit { kind: k, .. }) => assert_eq!(k, kind, "{src}"),
            other => panic!("{src}: unexpected {other:?}"),
        }
    }
    let dir = TempDir::new();
    let script = dir.write("s.lua", "while true do end");
    let mut opts = options(&dir, &script);
    opts.init = time_only(Duration::from_millis(100));
    match ScriptState::load(&opts, &AtomicBool::new(false)) {
        Err(Failure::Limit {
            kind: LimitKind::Time,
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn init_output_is_discarded() {
    let mut s = load("print('from init')\nfunction handler() print('from request') end");
    assert_eq!(body(request(&mut s.state)), "from request\n");
}

#[test]
fn abort_flag_stops_a_running_request() {
    let mut s = load("function handler() while true do end end");
    let req = Arc::new(Req::default());
    let limits = time_only(Duration::from_secs(10));
    let start = Instant::now();
    let report = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            req.abort.store(true, Ordering::Relaxed);
        });
        req.run(&mut s.state, &limits)
    });
    assert!(
        matches!(report.result, Err(Failure::Aborted)),
        "{:?}",
        report.result
    );
    assert!(start.elapsed() < Duration::from_millis(500));
    assert!(!Failure::Aborted.keeps_state());
}

#[test]
fn abort_flag_set_before_the_request() {
    let mut s = load("n = 0 function handler() n = n + 1 return n end");
    let req = Req::default();
    req.abort.store(true, Ordering::Relaxed);
    assert!(matches!(
        req.run(&mut s.state, &limits()).result,
        Err(Failure::Aborted)
    ));
    // The handler never ran.
    assert_eq!(body(request(&mut s.state)), "1");
}

#[test]
fn abort_flag_stops_the_init_run() {
    let dir = TempDir::new();
    let script = dir.write("s.lua", "while true do end");
    let mut opts = options(&dir, &script);
    opts.init = time_only(Duration::from_secs(10));
    let abort = AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(30));
            abort.store(true, Ordering::Relaxed);
        });
        ScriptState::load(&opts, &abort)
    });
    assert!(matches!(result, Err(Failure::Aborted)), "{result:?}");
}

#[test]
fn limits_reset_between_requests() {
    // A state that hit a limit should be discarded, but if it is reused the next run starts
    // with a fresh budget.
    let mut s = load("n = 0 function handler() n = n + 1 if n == 1 then while true do end end return 'fresh' end");
    expect_limit(request(&mut s.state), LimitKind::Instructions);
    assert_eq!(body(request(&mut s.state)), "fresh");
}

#[test]
fn limit_in_a_coroutine() {
    let mut s = load(
        "function handler() local co = coroutine.wrap(function() while true do end end) co() end",
    );
    expect_limit(request(&mut s.state), LimitKind::Instructions);
}

#[test]
fn report_counts_instructions_and_memory() {
    let mut s =
        load("function handler() local t = {} for i = 1, 100000 do t[i] = i end return #t end");
    let report = request(&mut s.state);
    // Two VM instructions per iteration.
    assert!(report.instructions >= 199_000, "{}", report.instructions);
    assert!(report.memory >= 1 << 20, "{}", report.memory);
    assert_eq!(body(report), "100000");
}

struct GoneAfter(std::sync::atomic::AtomicU32);

impl luafcgid_sandbox::ClientProbe for GoneAfter {
    fn gone(&self) -> bool {
        self.0.fetch_sub(1, Ordering::Relaxed) <= 1
    }
}

#[test]
fn client_probe_stops_a_running_request() {
    let mut s = load("function handler() while true do end end");
    let req = Req::default();
    let probe = std::sync::Arc::new(GoneAfter(std::sync::atomic::AtomicU32::new(5)));
    let input = luafcgid_sandbox::RequestInput {
        data: std::sync::Arc::new(luafcgid_sandbox::OwnedRequest::default()),
        abort: req.abort.clone(),
        client: Some(probe),
    };
    let limits = time_only(Duration::from_secs(10));
    let start = Instant::now();
    let report = s.state.handle(&input, &limits);
    assert!(
        matches!(report.result, Err(Failure::Aborted)),
        "{:?}",
        report.result
    );
    assert!(start.elapsed() < Duration::from_millis(500));
    assert!(req.abort.load(Ordering::Relaxed), "the flag records it");
}

#[test]
fn time_limit_stops_a_loop_of_expensive_c_calls() {
    // Each iteration is a few instructions around one C call of several milliseconds, so
    // the instruction budget would come due only after minutes: the watchdog's interrupt
    // makes the hook check the deadline every few milliseconds anyway.
    let mut s = load(
        "local s = string.rep('x', 4 * 1024 * 1024)
         function handler() while true do local u = s:upper() end end",
    );
    ends_at_the_time_limit(&mut s.state);
}

#[test]
fn instructions_are_counted_as_executed() {
    // A loop body of `n` instructions is charged `n` units per iteration (the backward
    // jump's length), plus the few instructions around the loop.
    for (body, per_iteration) in [("", 1), ("local x = i * 2 local y = x + 1", 5)] {
        let mut s = load(format!(
            "function handler() for i = 1, 1000000 do {body} end end"
        ));
        let report = request(&mut s.state);
        let n = report.instructions;
        let expected = 1_000_000 * per_iteration;
        assert!((expected..expected + 40).contains(&n), "{body}: {n}");
    }
}

#[test]
fn long_string_rep_is_exact_bounded_and_interruptible() {
    // Results over 1 MiB are built by the sliced version: same bytes as Lua's.
    let mut s = load(
        "function handler()
           local a = string.rep('ab', 700000, ',')
           local b = string.rep(7, 400000)
           local c = string.rep('xyz', 500000)
           assert(#a == 700000 * 3 - 1 and a:sub(1, 8) == 'ab,ab,ab' and a:sub(-5) == 'ab,ab')
           assert(not a:find('ab,,') and not a:find(',,'))
           assert(#b == 400000 and b:sub(1, 3) == '777')
           assert(#c == 1500000 and c:sub(-6) == 'xyzxyz')
           return 'ok'
         end",
    );
    assert_eq!(body(request(&mut s.state)), "ok");
    // Larger than the memory limit (16 MiB here): refused at once, as a memory limit.
    let mut s = load("function handler() return #string.rep('x', 32 * 1024 * 1024) end");
    expect_limit(request(&mut s.state), LimitKind::Memory);
    let mut s = load("function handler() return #string.rep('x', 1 << 62, 'y') end");
    expect_limit(request(&mut s.state), LimitKind::Memory);
    // A loop of long reps stops at the deadline.
    let mut s =
        load("function handler() while true do local x = string.rep('x', 6 * 1024 * 1024) end end");
    ends_at_the_time_limit(&mut s.state);
}

/// The scheduling policy of thread `tid` of this process, from /proc; `None` once the
/// thread has exited.
fn try_policy_of(tid: i64) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // Fields after the command (which ends with ')'): state is field 3; policy is field 41.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    Some(rest.split(' ').nth(38).unwrap().parse().unwrap())
}

/// The scheduling policy of thread `tid`, which is running.
fn policy_of(tid: i64) -> i64 {
    try_policy_of(tid).expect("the thread is running")
}

#[test]
fn a_long_run_gives_up_cpu_priority_until_it_ends() {
    long_run_gives_up_priority(false);
}

#[test]
fn a_batch_thread_gives_up_cpu_priority_and_gets_batch_back() {
    long_run_gives_up_priority(true);
}

#[test]
fn batch_scheduling_is_set_and_left_on_the_calling_thread_only() {
    std::thread::spawn(|| {
        let tid = current_tid();
        assert_eq!(policy_of(tid), i64::from(libc::SCHED_OTHER));
        luafcgid_sandbox::set_batch_scheduling().unwrap();
        assert_eq!(policy_of(tid), i64::from(libc::SCHED_BATCH));
        // A thread started now inherits it.
        let inherited = std::thread::spawn(|| policy_of(current_tid()))
            .join()
            .unwrap();
        assert_eq!(inherited, i64::from(libc::SCHED_BATCH));
        luafcgid_sandbox::leave_batch_scheduling();
        assert_eq!(policy_of(tid), i64::from(libc::SCHED_OTHER));
    })
    .join()
    .unwrap();
    // The test's own thread was never touched.
    assert_eq!(policy_of(current_tid()), i64::from(libc::SCHED_OTHER));
}

/// The calling thread's id.
fn current_tid() -> i64 {
    let tid = std::fs::read_link("/proc/thread-self").unwrap();
    tid.file_name().unwrap().to_str().unwrap().parse().unwrap()
}

/// Runs a 300 ms request on a thread of its own (under `SCHED_BATCH` first when `batch`):
/// the thread goes under `SCHED_IDLE` while the run lasts, where the process may undo it,
/// and gets its policy back at the end.
fn long_run_gives_up_priority(batch: bool) {
    // Only where the process may take a thread out of SCHED_IDLE again (root, or
    // RLIMIT_NICE): otherwise the daemon leaves priorities alone, and so does this check.
    let probe = std::thread::spawn(|| {
        // SAFETY: changes this thread's own policy and puts it back.
        #[allow(unsafe_code)]
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::pid_t;
            let param = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) == 0
                && libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param) == 0
        }
    })
    .join()
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        if batch {
            luafcgid_sandbox::set_batch_scheduling().unwrap();
        }
        let tid = current_tid();
        let before = policy_of(tid);
        tx.send(tid).unwrap();
        let mut s = load("function handler() local t = os.clock() while os.clock() - t < 0.3 do end return 'done' end");
        let limits = time_only(Duration::from_secs(5));
        let report = Req::default().run(&mut s.state, &limits);
        assert_eq!(body(report), "done");
        (before, policy_of(tid))
    });
    let tid = rx.recv().unwrap();
    // While the run lasts, its thread's policy becomes SCHED_IDLE (checked until it ends).
    let mut seen = vec![policy_of(tid)];
    // The thread may exit between a look at the handle and one at /proc.
    while !runner.is_finished() {
        let Some(p) = try_policy_of(tid) else { break };
        if !seen.contains(&p) {
            seen.push(p);
        }
        std::thread::yield_now();
    }
    let (before, after) = runner.join().unwrap();
    let expected = if batch {
        libc::SCHED_BATCH
    } else {
        libc::SCHED_OTHER
    };
    assert_eq!(before, i64::from(expected));
    assert_eq!(
        after, before,
        "the policy is given back at the end of the run"
    );
    if probe {
        assert!(
            seen.contains(&i64::from(libc::SCHED_IDLE)),
            "policies seen during the run: {seen:?}"
        );
    } else {
        assert_eq!(
            seen,
            [before],
            "nothing changes where it could not be undone"
        );
    }
}

/// Limits with only a wall-clock timeout.
fn time_only(timeout: Duration) -> Limits {
    Limits {
        instructions: 0,
        timeout,
        output: 0,
    }
}

/// Runs one request under a 200 ms time limit alone: it must end as `limit_time` within
/// 300 ms. Returns how long it took.
fn ends_at_the_time_limit(state: &mut ScriptState) -> Duration {
    let start = Instant::now();
    let report = Req::default().run(state, &time_only(Duration::from_millis(200)));
    let elapsed = start.elapsed();
    expect_limit(report, LimitKind::Time);
    assert!(elapsed < Duration::from_millis(300), "{elapsed:?}");
    elapsed
}

/// Lua that works for 50 ms of the process's CPU time (`os.clock`) and at least 200,000
/// loop turns: a long run, twice over the instruction count that makes one, however many
/// other tests' threads advance the process's clock meanwhile.
const BUSY: &str =
    "local t, i = os.clock(), 0 while os.clock() - t < 0.05 or i < 200000 do i = i + 1 end";

#[test]
fn a_run_that_works_for_milliseconds_is_reported_long_and_a_short_one_is_not() {
    let mut s = load(format!("function handler() {BUSY} return 'done' end"));
    let report = Req::default().run(&mut s.state, &time_only(Duration::from_secs(5)));
    assert!(report.long, "50 ms of work is long");
    assert_eq!(body(report), "done");
    let mut s = load("function handler() return 'hi' end");
    let report = Req::default().run(&mut s.state, &time_only(Duration::from_secs(5)));
    assert!(!report.long);
    assert_eq!(body(report), "hi");
    // The flag belongs to one run: the next, short run of the same state is not long.
    let mut s = load(format!(
        "n = 0 function handler() n = n + 1 if n == 1 then {BUSY} end return 'x' end"
    ));
    assert!(
        Req::default()
            .run(&mut s.state, &time_only(Duration::from_secs(5)))
            .long
    );
    assert!(
        !Req::default()
            .run(&mut s.state, &time_only(Duration::from_secs(5)))
            .long
    );
}

/// Counts the pauses asked of it and asks for its `pause` each time.
struct Pausing {
    asked: std::sync::atomic::AtomicU32,
    pause: Duration,
}

impl luafcgid_sandbox::ClientProbe for Pausing {
    fn gone(&self) -> bool {
        false
    }
    fn pause(&self) -> Duration {
        self.asked.fetch_add(1, Ordering::Relaxed);
        self.pause
    }
}

fn run_with(
    s: &mut ScriptState,
    probe: &std::sync::Arc<Pausing>,
    limits: &Limits,
) -> luafcgid_sandbox::Report {
    let input = luafcgid_sandbox::RequestInput {
        client: Some(probe.clone()),
        ..luafcgid_sandbox::RequestInput::new(luafcgid_sandbox::OwnedRequest::default())
    };
    s.handle(&input, limits)
}

#[test]
fn only_long_runs_are_asked_to_pause_and_a_pause_counts_against_the_time_limit() {
    let probe = std::sync::Arc::new(Pausing {
        asked: Default::default(),
        pause: Duration::ZERO,
    });
    let mut busy = load(format!("function handler() {BUSY} return 'done' end"));
    let report = run_with(&mut busy.state, &probe, &time_only(Duration::from_secs(5)));
    assert_eq!(body(report), "done");
    let asked = probe.asked.load(Ordering::Relaxed);
    assert!(asked >= 1, "50 ms of work: the probe is asked ({asked})");
    // A short run is never asked, however many times it runs.
    let mut hello = load("function handler() return 'hi' end");
    for _ in 0..100 {
        assert_eq!(
            body(run_with(
                &mut hello.state,
                &probe,
                &time_only(Duration::from_secs(5))
            )),
            "hi"
        );
    }
    assert_eq!(probe.asked.load(Ordering::Relaxed), asked);
    // Pauses are wall-clock time of the run: a run that pauses 10 ms (the most) at every
    // probe ends by its time limit with little work done.
    let sleepy = std::sync::Arc::new(Pausing {
        asked: Default::default(),
        pause: Duration::from_secs(1),
    });
    let mut forever = load("function handler() while true do end end");
    let start = Instant::now();
    let report = run_with(
        &mut forever.state,
        &sleepy,
        &time_only(Duration::from_millis(300)),
    );
    let took = start.elapsed();
    assert!(
        matches!(
            report.result,
            Err(Failure::Limit {
                kind: LimitKind::Time,
                ..
            })
        ),
        "{:?}",
        report.result
    );
    assert!(
        took < Duration::from_millis(600),
        "each pause is cut to 10 ms: {took:?}"
    );
    let pauses = sleepy.asked.load(Ordering::Relaxed);
    assert!(pauses >= 10, "the run paused again and again ({pauses})");
}
