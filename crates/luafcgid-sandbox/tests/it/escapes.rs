//! Attempts to run on past a limit. Each must end the request with the limit, quickly.

use std::time::{Duration, Instant};

use luafcgid_sandbox::{Failure, LimitKind, Limits};

use crate::support::*;

fn small() -> Limits {
    Limits {
        instructions: 1_000_000,
        timeout: Duration::from_secs(5),
        output: 10_000,
    }
}

/// Runs `handler_body` as a handler under `small()` limits, on a worker-sized stack, and
/// checks it ends with `kind` well before the 5 s timeout. A script that escapes would run
/// forever: the test gives up on it after 10 s.
fn assert_stops(handler_body: &str, kind: LimitKind) {
    assert_stops_within(handler_body, kind, small(), Duration::from_secs(2));
}

fn assert_stops_within(handler_body: &str, kind: LimitKind, limits: Limits, max: Duration) {
    let src = format!("function handler(r)\n{handler_body}\nend");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .stack_size(4 << 20)
        .spawn(move || {
            let mut s = load(src);
            let start = Instant::now();
            let report = Req::default().run(&mut s.state, &limits);
            let _ = tx.send((report.result.map(drop), start.elapsed()));
        })
        .unwrap();
    let (result, elapsed) = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{handler_body}: escaped every limit (still running)"));
    match &result {
        Err(Failure::Limit { kind: k, .. }) if *k == kind => {}
        other => panic!("{handler_body}: expected the {kind} limit, got {other:?}"),
    }
    assert!(elapsed < max, "{handler_body}: took {elapsed:?}");
}

#[test]
fn pcall_loop() {
    assert_stops(
        "while true do pcall(function() while true do end end) end",
        LimitKind::Instructions,
    );
    assert_stops("while true do pcall(error) end", LimitKind::Instructions);
    assert_stops(
        "local function f() return pcall(f) end while true do f() end",
        LimitKind::Instructions,
    );
}

#[test]
fn nested_pcall_cannot_swallow() {
    assert_stops(
        "local ok, e = pcall(function() while true do end end)\n r:puts('escaped') return 'escaped'",
        LimitKind::Instructions,
    );
    assert_stops(
        "for i = 1, 100 do pcall(pcall, pcall, function() while true do end end) end return 'escaped'",
        LimitKind::Instructions,
    );
}

#[test]
fn xpcall_loop_and_handler() {
    assert_stops(
        "while true do xpcall(function() while true do end end, function(e) return e end) end",
        LimitKind::Instructions,
    );
    // The message handler of a hook error runs with hooks off: it must not run at all.
    assert_stops(
        "xpcall(function() while true do end end, function() while true do end end) return 'escaped'",
        LimitKind::Instructions,
    );
    assert_stops(
        "while true do xpcall(error, function() while true do end end) end",
        LimitKind::Instructions,
    );
}

#[test]
fn coroutine_loops() {
    assert_stops(
        "while true do coroutine.resume(coroutine.create(function() while true do end end)) end",
        LimitKind::Instructions,
    );
    assert_stops(
        "while true do pcall(coroutine.wrap(function() while true do end end)) end",
        LimitKind::Instructions,
    );
    assert_stops(
        "local co = coroutine.wrap(function() while true do coroutine.yield() end end) while true do co() end",
        LimitKind::Instructions,
    );
    assert_stops(
        r#"
        while true do
            local co = coroutine.create(function()
                local x <close> = setmetatable({}, {__close = function() end})
                coroutine.yield()
                while true do end
            end)
            coroutine.resume(co)
            coroutine.resume(co)
            coroutine.close(co)
        end
        "#,
        LimitKind::Instructions,
    );
}

#[test]
fn load_reader_loop() {
    assert_stops(
        "while true do load(function() while true do end end) end",
        LimitKind::Instructions,
    );
    assert_stops(
        "while true do pcall(load('while true do end')) end",
        LimitKind::Instructions,
    );
}

#[test]
fn metamethods() {
    assert_stops(
        r#"local t = setmetatable({}, {__index = function() while true do end end})
           while true do pcall(function() return t.x end) end"#,
        LimitKind::Instructions,
    );
    assert_stops(
        r#"local t = setmetatable({}, {__tostring = function() while true do end end})
           while true do pcall(tostring, t) end"#,
        LimitKind::Instructions,
    );
    assert_stops(
        "while true do pcall(string.gsub, 'aaa', 'a', function() while true do end end) end",
        LimitKind::Instructions,
    );
    assert_stops(
        "while true do pcall(table.sort, {3, 2, 1}, function() while true do end end) end",
        LimitKind::Instructions,
    );
}

#[test]
fn error_objects_with_tostring() {
    assert_stops(
        r#"error(setmetatable({}, {__tostring = function() while true do end end}))"#,
        LimitKind::Instructions,
    );
}

#[test]
fn memory_error_caught_by_pcall() {
    assert_stops(
        "while true do pcall(string.rep, 'x', 1 << 30) end",
        LimitKind::Memory,
    );
    assert_stops(
        "local ok = pcall(function() local t = {} while true do t[#t + 1] = string.rep('x', 100000) .. #t end end) return 'escaped'",
        LimitKind::Memory,
    );
    assert_stops(
        "local co = coroutine.wrap(function() local s = 'x' while true do s = s .. s end end) pcall(co) return 'escaped'",
        LimitKind::Memory,
    );
    assert_stops(
        "coroutine.wrap(function() local s = 'x' while true do s = s .. s end end)()",
        LimitKind::Memory,
    );
}

#[test]
fn output_error_caught_by_pcall() {
    assert_stops(
        "while true do pcall(r.puts, r, string.rep('x', 1000)) end",
        LimitKind::Output,
    );
    assert_stops(
        "pcall(function() while true do print('flood') end end) return 'escaped'",
        LimitKind::Output,
    );
    assert_stops(
        "local luafcgid = require('luafcgid') pcall(luafcgid.serialize, {string.rep('x', 20000)}) return 'escaped'",
        LimitKind::Output,
    );
}

#[test]
fn time_limit_through_pcall() {
    let limits = Limits {
        instructions: 0,
        timeout: Duration::from_millis(100),
        output: 0,
    };
    assert_stops_within(
        "while true do pcall(function() while true do end end) end",
        LimitKind::Time,
        limits,
        Duration::from_millis(150),
    );
}
