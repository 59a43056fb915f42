//! Policy files through the real daemon: every field enforced at runtime (a script over a
//! lowered limit gets the outcome, one under it does not), inheritance, ceilings, `deny`,
//! a broken policy confined to its subtree, and live reload while requests flow.

use std::time::{Duration, Instant};

use crate::support::*;

/// Outcome of the audit line of the request with `request_id`.
fn outcome_of(lines: &[serde_json::Value], request_id: &str) -> String {
    requests(lines)
        .into_iter()
        .find(|l| l["request_id"] == request_id)
        .map(|l| l["outcome"].as_str().unwrap_or_default().to_string())
        .unwrap_or_else(|| panic!("no audit line for {request_id}"))
}

/// (script, policy.toml of its directory, script text, expected status, expected outcome)
type Case = (&'static str, &'static str, &'static str, u16, &'static str);

const SPIN: &str =
    "function handler() local n = 0 for i = 1, 1000000 do n = n + i end return n end";
const SMALL: &str = "function handler() local n = 0 for i = 1, 1000 do n = n + i end return n end";

const CASES: &[Case] = &[
    ("instructions/over.lua", "instructions = 100_000", SPIN, 500, "limit_cpu"),
    ("instructions/under.lua", "instructions = 100_000", SMALL, 200, "ok"),
    (
        "timeout/over.lua",
        "timeout_ms = \"100ms\"\ninstructions = 10_000_000_000",
        "function handler() while true do end end",
        500,
        "limit_time",
    ),
    (
        "timeout/under.lua",
        "timeout_ms = \"100ms\"\ninstructions = 10_000_000_000",
        SMALL,
        200,
        "ok",
    ),
    (
        "memory/over.lua",
        "memory = \"1MiB\"",
        "function handler() local t = {} for i = 1, 100 do t[i] = string.rep('x', 20000) .. i end return #t end",
        500,
        "limit_memory",
    ),
    (
        "memory/under.lua",
        "memory = \"1MiB\"",
        "function handler() return #string.rep('x', 100000) end",
        200,
        "ok",
    ),
    (
        "output/over.lua",
        "output = \"1KiB\"",
        "function handler() return string.rep('x', 2000) end",
        500,
        "limit_output",
    ),
    (
        "output/under.lua",
        "output = \"1KiB\"",
        "function handler() return string.rep('x', 500) end",
        200,
        "ok",
    ),
    (
        "init/over.lua",
        "init_instructions = 100_000",
        "for i = 1, 1000000 do end\nfunction handler() return 'x' end",
        500,
        "limit_cpu",
    ),
    (
        "init/under.lua",
        "init_instructions = 100_000",
        "for i = 1, 1000 do end\nfunction handler() return 'x' end",
        200,
        "ok",
    ),
    (
        "inittime/over.lua",
        "init_timeout_ms = 100\ninit_instructions = 10_000_000_000",
        "while true do end\nfunction handler() return 'x' end",
        500,
        "limit_time",
    ),
    (
        "inittime/under.lua",
        "init_timeout_ms = 100\ninit_instructions = 10_000_000_000",
        "local t = 0 for i = 1, 1000 do t = t + i end\nfunction handler() return 'x' end",
        200,
        "ok",
    ),
    (
        "libs/over.lua",
        "libs = [\"string\"]",
        "function handler() return table.concat({'a', 'b'}) end",
        500,
        "script_error",
    ),
    (
        "libs/under.lua",
        "libs = [\"string\"]",
        "function handler() return ('ab'):upper() end",
        200,
        "ok",
    ),
    (
        "functions/over.lua",
        "libs = [\"string.format\", \"os.date\"]",
        "function handler() return ('x'):upper() end",
        500,
        "script_error",
    ),
    (
        "functions/under.lua",
        "libs = [\"string.format\", \"os.date\"]",
        "function handler() return string.format('%d', 7) .. type(os.date) .. type(os.time) end",
        200,
        "ok",
    ),
    (
        "modules/over.lua",
        "modules = false",
        "local m = require('helper')\nfunction handler() return m end",
        500,
        "script_error",
    ),
    (
        "modules/under.lua",
        "modules = false",
        "local l = require('luafcgid')\nfunction handler() return l.urlencode('a b') end",
        200,
        "ok",
    ),
    (
        "deny/x.lua",
        "deny = true",
        "function handler() return 'never' end",
        403,
        "forbidden",
    ),
];

#[test]
fn each_field_is_enforced_at_runtime() {
    let mut files: Vec<(&str, &str)> = Vec::new();
    for (script, policy, text, _, _) in CASES {
        let dir = script.split('/').next().unwrap();
        files.push((script, text));
        files.push((
            Box::leak(format!("{dir}/policy.toml").into_boxed_str()),
            policy,
        ));
    }
    files.push(("modules/helper.lua", "return 'helper'"));
    let mut d = Daemon::start("", &files);
    let mut ids = Vec::new();
    for (script, _, _, status, _) in CASES {
        let r = d.get(script);
        assert_eq!(r.status, *status, "{script}: {}", r.text());
        ids.push(r.header("X-Request-Id").unwrap().to_string());
    }
    // The body limit is checked before Lua runs: 413 above it, 200 below.
    d.write("body/policy.toml", "body = \"1KiB\"");
    d.write(
        "body/echo.lua",
        "function handler(r) return #(r:gets() or '') end",
    );
    let params = params_for(&d.script("body/echo.lua"), "POST", &[]);
    let mut c = d.client();
    let over = c.request(1, true, &params, &[b'x'; 2000]);
    assert_eq!(over.status, 413);
    let under = c.request(1, true, &params, &[b'x'; 500]);
    assert_eq!((under.status, under.text()), (200, "500".to_string()));
    let lines = d.stop();
    for ((script, _, _, _, outcome), id) in CASES.iter().zip(&ids) {
        assert_eq!(outcome_of(&lines, id), *outcome, "{script}");
    }
}

#[test]
fn persistence_retirement_entry_vars_and_show_errors() {
    let counter = "function handler() n = (n or 0) + 1 return n end";
    let mut d = Daemon::start(
        "",
        &[
            ("kept/c.lua", counter),
            ("fresh/policy.toml", "persistent = false"),
            ("fresh/c.lua", counter),
            ("retire/policy.toml", "state_max_requests = 2"),
            ("retire/c.lua", counter),
            ("aged/policy.toml", "state_max_age = \"10ms\""),
            (
                "aged/c.lua",
                // Each request outlives the age limit (200 ms of process CPU time is at least
                // 10 ms of wall time on up to 20 cores), so its state is retired after it.
                "function handler() local t = os.clock() while os.clock() - t < 0.2 do end n = (n or 0) + 1 return n end",
            ),
            ("entry/policy.toml", "entry = \"go\""),
            (
                "entry/e.lua",
                "function handler() return 'handler' end\nfunction go(r) return 'go' end",
            ),
            ("errors/policy.toml", "show_errors = true"),
            (
                "errors/boom.lua",
                "function handler() error('kaboom <b>') end",
            ),
            (
                "quiet/boom.lua",
                "function handler() error('kaboom <b>') end",
            ),
        ],
    );
    let seq = |script: &str| -> Vec<String> { (0..3).map(|_| d.get(script).text()).collect() };
    assert_eq!(seq("kept/c.lua"), ["1", "2", "3"]);
    assert_eq!(seq("fresh/c.lua"), ["1", "1", "1"]);
    assert_eq!(seq("retire/c.lua"), ["1", "2", "1"]);
    assert_eq!(seq("aged/c.lua"), ["1", "1", "1"]);
    assert_eq!(d.get("entry/e.lua").text(), "go");
    let shown = d.get("errors/boom.lua");
    assert_eq!(shown.status, 500);
    assert!(
        shown.text().contains("kaboom &lt;b&gt;"),
        "{}",
        shown.text()
    );
    let hidden = d.get("quiet/boom.lua");
    assert_eq!(hidden.status, 500);
    assert!(!hidden.text().contains("kaboom"), "{}", hidden.text());
    d.stop();
}

#[test]
fn clones_from_the_policy_bound_the_states_of_a_script() {
    // Two slow requests at once: with `clones = 1` they share one state (the second waits);
    // with the default of 2 each gets its own.
    let slow =
        "function handler() local t = os.clock() while os.clock() - t < 0.2 do end return 'ok' end";
    let d = Daemon::start(
        "queue_timeout_ms = 5000\ntenant_workers = 2",
        &[
            ("one/policy.toml", "clones = 1"),
            ("one/slow.lua", slow),
            ("two/slow.lua", slow),
        ],
    );
    for (dir, states) in [("one", 1), ("two", 2)] {
        let script = format!("{dir}/slow.lua");
        std::thread::scope(|s| {
            let a = s.spawn(|| d.get(&script));
            let b = s.spawn(|| d.get(&script));
            assert_eq!(a.join().unwrap().status, 200);
            assert_eq!(b.join().unwrap().status, 200);
        });
        let key = std::fs::canonicalize(d.path(&script)).unwrap();
        assert_eq!(d.shared.pool.idle_states(&key), states, "{dir}");
    }
}

#[test]
fn inheritance_order_and_audit_fields() {
    let mut d = Daemon::start(
        "[defaults]\n[defaults.vars]\na = \"config\"\nb = \"config\"\nc = \"config\"\nd = \"config\"\n",
        &[
            ("policy.toml", "[vars]\nb = \"root\"\nc = \"root\"\nd = \"root\"\n"),
            (
                "t/policy.toml",
                "tenant = \"team\"\n[vars]\nc = \"dir\"\nd = \"dir\"\n[script.\"v.lua\"]\n[script.\"v.lua\".vars]\nd = \"script\"\n",
            ),
            (
                "t/v.lua",
                "function handler(r) return r:config('a') .. ' ' .. r:config('b') .. ' ' .. r:config('c') .. ' ' .. r:config('d') end",
            ),
            (
                "t/w.lua",
                "function handler(r) return r:config('d') end",
            ),
        ],
    );
    assert_eq!(d.get("t/v.lua").text(), "config root dir script");
    assert_eq!(d.get("t/w.lua").text(), "dir");
    let lines = d.stop();
    let line = requests(&lines)
        .into_iter()
        .find(|l| l["script"] == "t/v.lua")
        .unwrap()
        .clone();
    assert_eq!(line["tenant"], "team");
    assert_eq!(
        line["policy"],
        serde_json::json!(["policy.toml", "t/policy.toml"])
    );
}

#[test]
fn a_broken_policy_answers_policy_error_for_its_subtree_only() {
    let mut d = Daemon::start(
        "[ceiling]\ntimeout_ms = 500\n[defaults]\ntimeout_ms = 300\n",
        &[
            ("good/x.lua", HELLO),
            ("over/policy.toml", "# too generous\ntimeout_ms = 1000\n"),
            ("over/x.lua", HELLO),
            ("over/deeper/x.lua", HELLO),
            ("syntax/policy.toml", "timeout_ms = = 3\n"),
            ("syntax/x.lua", HELLO),
            ("unknown/policy.toml", "timeout = 3\n"),
            ("unknown/x.lua", HELLO),
        ],
    );
    assert_eq!(d.get("good/x.lua").status, 200);
    for script in [
        "over/x.lua",
        "over/deeper/x.lua",
        "syntax/x.lua",
        "unknown/x.lua",
    ] {
        let r = d.get(script);
        assert_eq!(r.status, 500, "{script}");
        assert!(!r.text().contains("policy.toml"), "no detail to the client");
    }
    assert_eq!(d.get("good/x.lua").status, 200);
    let lines = d.stop();
    let errors: Vec<_> = requests(&lines)
        .into_iter()
        .filter(|l| l["outcome"] == "policy_error")
        .collect();
    assert_eq!(errors.len(), 4);
    let over = errors.iter().find(|l| l["script"] == "over/x.lua").unwrap();
    let message = over["error"].as_str().unwrap();
    assert!(
        message.contains("over/policy.toml:2:") && message.contains("timeout_ms"),
        "{message}"
    );
    // Reported at start too, with file and line.
    let rejected: Vec<_> = lines
        .iter()
        .filter(|l| l["event"] == "policy_rejected")
        .collect();
    assert!(
        rejected
            .iter()
            .any(|l| l["file"] == "over/policy.toml" && l["line"] == 2),
        "{rejected:?}"
    );
}

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Polls `script` until its body is `want` (bounded), counting every response that was
/// not a 200.
fn until_body(d: &Daemon, script: &str, want: &str, failures: &mut Vec<String>) {
    let t = Instant::now();
    loop {
        let r = d.get(script);
        if r.status != 200 {
            failures.push(format!("{script}: {} {}", r.status, r.text()));
        }
        if r.text() == want {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{script} never answered {want:?} (last {:?})",
            r.text()
        );
    }
}

#[test]
fn live_reload_of_changed_added_removed_and_broken_policies() {
    let script =
        "function handler(r) n = (n or 0) + 1 return (r:config('v') or '-') .. ' ' .. n end";
    let mut d = Daemon::start(
        "sweep_ms = 20",
        &[
            ("t/policy.toml", "[vars]\nv = \"one\"\n"),
            ("t/s.lua", script),
            ("t/sub/s.lua", script),
            ("t/c.lua", script),
            ("t/sub/c.lua", script),
        ],
    );
    // Requests flow all along, from another thread, to s.lua: none may fail because of a
    // reload. This thread watches c.lua (the same script), whose states only it uses, so
    // its counter shows when a state was retired.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (flowed, flow_failures) = std::thread::scope(|scope| {
        // Stops the flow however this thread leaves the scope (an assertion failing
        // included), so the scope's join cannot wait forever.
        let _stop_flow = SetOnDrop(&stop);
        let flow = scope.spawn(|| {
            let mut n = 0u64;
            let mut bad = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for script in ["t/s.lua", "t/sub/s.lua"] {
                    let r = d.get(script);
                    n += 1;
                    if r.status != 200 {
                        bad.push(format!("{script}: {} {}", r.status, r.text()));
                    }
                }
            }
            (n, bad)
        });
        let mut failures = Vec::new();
        until_body(&d, "t/c.lua", "one 1", &mut failures);
        until_body(&d, "t/c.lua", "one 2", &mut failures);
        // Changed: the new value applies and the state built under the old policy is retired
        // (its counter starts again).
        d.write("t/policy.toml", "[vars]\nv = \"two\"\n# changed\n");
        until_body(&d, "t/c.lua", "two 1", &mut failures);
        // Added below: applies to its subtree only.
        until_body(&d, "t/sub/c.lua", "two 1", &mut failures);
        d.write("t/sub/policy.toml", "[vars]\nv = \"sub\"\n");
        until_body(&d, "t/sub/c.lua", "sub 1", &mut failures);
        assert!(d.get("t/c.lua").text().starts_with("two "));
        // Removed: the parent's value again.
        std::fs::remove_file(d.path("t/sub/policy.toml")).unwrap();
        until_body(&d, "t/sub/c.lua", "two 1", &mut failures);
        // Broken: the last valid version stays in force; nothing fails.
        d.write(
            "t/policy.toml",
            "clones = \"many\"\n[vars]\nv = \"three\"\n",
        );
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(300) {
            let r = d.get("t/c.lua");
            assert_eq!(r.status, 200, "{}", r.text());
            assert!(r.text().starts_with("two "), "{}", r.text());
        }
        // Fixed again.
        d.write("t/policy.toml", "[vars]\nv = \"four\"\n");
        until_body(&d, "t/c.lua", "four 1", &mut failures);
        assert!(failures.is_empty(), "{failures:?}");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flow.join().unwrap()
    });
    assert!(flowed > 0);
    assert!(flow_failures.is_empty(), "{flow_failures:?}");
    let lines = d.stop();
    let events = |name: &str| {
        lines
            .iter()
            .filter(|l| l["event"] == name)
            .map(|l| l["file"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    assert!(events("policy_loaded").contains(&"t/sub/policy.toml".to_string()));
    assert!(
        events("policy_rejected").contains(&"t/policy.toml".to_string()),
        "{:?}",
        events("policy_rejected")
    );
    assert!(requests(&lines).iter().all(|l| l["outcome"] == "ok"));
}
