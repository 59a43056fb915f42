//! Routes around the count hook: `__gc` finalizers, `xpcall` handlers and closing coroutines
//! (code Lua runs with hooks off), long single C calls, and deep recursion. Each must end the
//! request quickly, with a limit or an error, never hang or crash.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use luafcgid_sandbox::{Failure, LimitKind, Limits};

use crate::support::*;

/// A time limit of `ms` and no instruction budget: only the wall clock can end a loop.
fn time_only(ms: u64) -> Limits {
    Limits {
        instructions: 0,
        timeout: Duration::from_millis(ms),
        output: 1 << 20,
    }
}

/// Loads `src` and runs one request under `limits`, on a worker-sized stack; then drops the
/// state (which closes it). Gives up after 10 s. Returns the outcome, how long the request
/// took and how long closing the state took.
fn run_src(src: String, limits: Limits) -> (Result<String, Failure>, Duration, Duration) {
    let (tx, rx) = mpsc::channel();
    let shown = src.clone();
    std::thread::Builder::new()
        .stack_size(4 << 20)
        .spawn(move || {
            let (dir, state) = try_load(src);
            let mut state = match state {
                Ok(state) => state,
                Err(e) => {
                    let _ = tx.send((Err(e), Duration::ZERO, Duration::ZERO));
                    return;
                }
            };
            let start = Instant::now();
            let report = Req::default().run(&mut state, &limits);
            let elapsed = start.elapsed();
            let start = Instant::now();
            drop(state);
            let closed = start.elapsed();
            drop(dir);
            let result = report
                .result
                .map(|r| String::from_utf8_lossy(&r.body).into_owned());
            let _ = tx.send((result, elapsed, closed));
        })
        .unwrap();
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{shown}: still running after 10 s"))
}

fn handler(body: &str) -> String {
    format!("function handler(r)\n{body}\nend")
}

/// The handler body ends with `kind` within the time limit plus max(10%, 50 ms) (or, for
/// other limits, well before the time limit).
fn stops(body: &str, kind: LimitKind, limits: Limits) -> Duration {
    let timeout = limits.timeout;
    let (result, elapsed, closed) = run_src(handler(body), limits);
    match &result {
        Err(Failure::Limit { kind: k, .. }) if *k == kind => {}
        other => panic!("{body}: expected the {kind} limit, got {other:?}"),
    }
    // Late by at most a tenth (50 ms at least, 100 ms at least for short limits: this runs
    // beside the other tests on two CPUs); never running on is what it guards against.
    // How late it fires on a quiet machine: docs/performance.md, "Time-limit accuracy".
    let bound = timeout + (timeout / 10).max(Duration::from_millis(100));
    assert!(elapsed <= bound, "{body}: took {elapsed:?}");
    assert!(
        closed < Duration::from_millis(500),
        "{body}: close took {closed:?}"
    );
    eprintln!("{body:.60}: {kind} after {elapsed:?}");
    elapsed
}

/// The handler body fails with a script error whose message contains `needle`, quickly.
fn fails_with(body: &str, needle: &str) {
    let (result, elapsed, _) = run_src(handler(body), time_only(1000));
    match &result {
        Err(Failure::Script { message }) if message.contains(needle) => {}
        other => panic!("{body}: expected a script error with {needle:?}, got {other:?}"),
    }
    assert!(
        elapsed < Duration::from_millis(500),
        "{body}: took {elapsed:?}"
    );
}

/// The handler body returns `expected`, quickly.
fn returns(body: &str, expected: &str) {
    let (result, elapsed, closed) = run_src(handler(body), time_only(2000));
    match &result {
        Ok(b) if b == expected => {}
        other => panic!("{body}: expected {expected:?}, got {other:?}"),
    }
    assert!(
        elapsed < Duration::from_millis(1500),
        "{body}: took {elapsed:?}"
    );
    assert!(
        closed < Duration::from_millis(500),
        "{body}: close took {closed:?}"
    );
}

// --- 1. __gc finalizers -------------------------------------------------------------------

#[test]
fn gc_metamethods_are_refused() {
    fails_with(
        "setmetatable({}, {__gc = function() while true do end end}) return 'escaped'",
        "__gc metamethods are not allowed",
    );
    fails_with(
        "setmetatable({}, {__gc = false}) return 'x'",
        "__gc metamethods are not allowed",
    );
    returns(
        "local ok, e = pcall(setmetatable, {}, {__gc = print}) return tostring(ok) .. ' ' .. e",
        "false __gc metamethods are not allowed",
    );
    // At load time too, and through load()ed code.
    let (_dir, result) = try_load("setmetatable({}, {__gc = function() end})");
    assert!(
        matches!(&result, Err(Failure::Script { message }) if message.contains("__gc")),
        "{result:?}"
    );
    fails_with(
        "load('setmetatable({}, {__gc = function() end})')()",
        "__gc metamethods are not allowed",
    );
    // Other metatables still work, and setmetatable returns its table.
    returns(
        "local t = {} return tostring(setmetatable(t, {__index = {x = 1}}) == t and t.x)",
        "1",
    );
}

#[test]
fn gc_added_later_is_refused() {
    // Lua would never run a __gc added after setmetatable; the sandbox refuses it outright,
    // and a state whose chunk tried it closes at once.
    fails_with(
        "local mt = {} setmetatable({}, mt) mt.__gc = function() while true do end end",
        "__gc metamethods are not allowed",
    );
    let (result, _, closed) = run_src(
        r#"
        keep = {}
        for i = 1, 100 do
            local mt = {}
            keep[i] = setmetatable({}, mt)
            pcall(function() mt.__gc = function() while true do end end end)
        end
        function handler() keep = nil return "ok" end
        "#
        .into(),
        time_only(1000),
    );
    assert_eq!(result.unwrap(), "ok");
    assert!(closed < Duration::from_millis(500), "close took {closed:?}");
}

#[test]
fn string_metatable_is_protected() {
    returns(
        "local m = getmetatable('') return tostring(m.__index == string)",
        "true",
    );
    fails_with(
        "getmetatable('').__index = {upper = function() while true do end end}",
        "read-only",
    );
    fails_with("getmetatable('').__gc = function() end", "read-only");
    returns(
        r#"
        local m = getmetatable('')
        rawset(m, '__index', {upper = function() return 'hijacked' end})
        rawset(m, '__gc', function() while true do end end)
        return ('abc'):upper()
        "#,
        "ABC",
    );
    // The real metatable's __index is the state's string table, as in Lua.
    returns("string.shout = string.upper return ('abc'):shout()", "ABC");
}

// --- 2. xpcall message handlers -----------------------------------------------------------

#[test]
fn xpcall_semantics() {
    returns(
        r#"
        local ok, a, b = xpcall(function(x, y) return x + y, 'z' end, error, 1, 2)
        return tostring(ok) .. ' ' .. a .. ' ' .. b
        "#,
        "true 3 z",
    );
    returns(
        r#"
        local t = table.pack(xpcall(function(c) error({code = c}) end,
            function(e) return e.code * 2, 'dropped' end, 21))
        return t.n .. ' ' .. tostring(t[1]) .. ' ' .. t[2]
        "#,
        "2 false 42",
    );
    returns(
        r#"
        local ok, e = xpcall(function() error('boom', 0) end, function(e) error('handler: ' .. e, 0) end)
        return tostring(ok) .. ' ' .. e
        "#,
        "false handler: boom",
    );
    fails_with("xpcall(print)", "bad argument #2 to 'xpcall'");
    // The handler runs after the error, in normal context: it may even yield.
    returns(
        r#"
        local co = coroutine.wrap(function()
            return xpcall(error, function(e) return coroutine.yield('in handler') .. e end, 'boom')
        end)
        local a = co()
        local ok, m = co('got ')
        return a .. '|' .. tostring(ok) .. '|' .. m
        "#,
        "in handler|false|got boom",
    );
}

#[test]
fn xpcall_handler_cannot_outlive_a_limit() {
    let attack = "xpcall(function() while true do end end, function() while true do end end) return 'escaped'";
    stops(attack, LimitKind::Time, time_only(100));
    stops(
        attack,
        LimitKind::Instructions,
        Limits {
            instructions: 1_000_000,
            ..time_only(5000)
        },
    );
    stops(
        "while true do xpcall(error, function() while true do end end) end",
        LimitKind::Time,
        time_only(100),
    );
    stops(
        "local function f() return xpcall(f, f) end while true do f() end",
        LimitKind::Time,
        time_only(100),
    );
}

// --- 3. __close and other metamethods -----------------------------------------------------

/// When the hook stops a run, mlua's error path closes the running frame's to-be-closed
/// variables with hooks off (Lua 5.4's `lua_settop` closes them), so a looping `__close`
/// would run forever. The sandbox therefore allows no `__close` metamethod at all: a
/// metatable with one is refused, and tables used as metatables are sealed against getting
/// one later, by assignment, `rawset` or through a metatable chain.
#[test]
fn close_metamethods_are_refused() {
    fails_with(
        "local x <close> = setmetatable({}, {__close = function() while true do end end})",
        "__close metamethods are not allowed",
    );
    fails_with(
        "local mt = {} local t = setmetatable({}, mt) mt.__close = function() while true do end end",
        "__close metamethods are not allowed",
    );
    fails_with(
        "local mt = {} local t = setmetatable({}, mt) rawset(mt, '__close', print)",
        "__close metamethods are not allowed",
    );
    fails_with(
        "local mt = {} local t = setmetatable({}, mt) mt.__gc = print",
        "__gc metamethods are not allowed",
    );
    // A metatable that has a metatable of its own (an inheritance chain).
    fails_with(
        "local Base = {} local Derived = setmetatable({}, {__index = Base}) local o = setmetatable({}, Derived) Derived.__close = print",
        "__close metamethods are not allowed",
    );
    // The guard itself is out of reach.
    fails_with(
        "local mt = {} setmetatable({}, mt) setmetatable(mt, nil)",
        "protected metatable",
    );
    returns(
        "local mt = {} setmetatable({}, mt) return tostring(getmetatable(mt))",
        "false",
    );
}

#[test]
fn the_close_escape_attempts_end_quickly() {
    for attack in [
        "pcall(function() local mt = {} local x <close> = setmetatable({}, mt) mt.__close = function() while true do end end while true do end end) return 'escaped'",
        "coroutine.wrap(function() local x <close> = setmetatable({}, {__close = function() while true do end end}) while true do end end)()",
        "local mt = setmetatable({}, {}) for k in next, {}, nil, setmetatable({}, mt) do end",
    ] {
        let (result, elapsed, closed) = run_src(handler(attack), time_only(100));
        // Refused, or failing to make a closable value: never a handler running on.
        assert!(
            !matches!(&result, Err(Failure::Limit { .. })),
            "{attack}: {result:?}"
        );
        assert!(elapsed < Duration::from_millis(200), "{attack}: {elapsed:?}");
        assert!(closed < Duration::from_millis(500), "{attack}: close took {closed:?}");
    }
}

#[test]
fn sealed_metatables_keep_working() {
    // Classes: methods added to a metatable after use, inheritance, __index/__newindex.
    returns(
        r#"
        local Base = {} Base.__index = Base
        function Base.new(x) return setmetatable({x = x}, Base) end
        local b = Base.new(2)
        function Base:double() return self.x * 2 end
        local Derived = setmetatable({}, {__index = Base}) Derived.__index = Derived
        local d = setmetatable({x = 5}, Derived)
        function Derived:triple() return self.x * 3 end
        local log = {}
        local proxy = setmetatable({}, {__newindex = function(t, k, v) log[#log + 1] = k end})
        proxy.a = 1
        local x <close> = nil
        return b:double() .. d:double() .. d:triple() .. log[1] .. tostring(rawget(proxy, 'a'))
        "#,
        "41015anil",
    );
}

#[test]
fn wrap_semantics() {
    returns(
        r#"
        local gen = coroutine.wrap(function(a) local b = coroutine.yield(a + 1) return b * 2 end)
        return gen(1) .. ' ' .. gen(5)
        "#,
        "2 10",
    );
    returns(
        r#"
        local f = coroutine.wrap(function()
            error('inner', 0)
        end)
        local ok, e = pcall(f)
        local ok2, e2 = pcall(f)
        return e .. ' ' .. e2
        "#,
        "inner cannot resume dead coroutine",
    );
    returns(
        r#"
        local f = coroutine.wrap(function() error({code = 7}) end)
        local ok, e = pcall(f)
        return type(e) .. e.code
        "#,
        "table7",
    );
    fails_with("coroutine.wrap(42)", "bad argument #1 to 'wrap'");
}

#[test]
fn metamethods_run_under_the_hook() {
    let loop_fn = "function() while true do end end";
    for body in [
        format!("local t = setmetatable({{}}, {{__index = {loop_fn}}}) return t.x"),
        format!("local t = setmetatable({{}}, {{__newindex = {loop_fn}}}) t.x = 1"),
        format!("local mt = {{__eq = {loop_fn}}} return setmetatable({{}}, mt) == setmetatable({{}}, mt)"),
        format!("local mt = {{__lt = {loop_fn}}} return setmetatable({{}}, mt) < setmetatable({{}}, mt)"),
        format!("local mt = {{__le = {loop_fn}}} return setmetatable({{}}, mt) <= setmetatable({{}}, mt)"),
        format!("return setmetatable({{}}, {{__concat = {loop_fn}}}) .. 'x'"),
        format!("return #setmetatable({{}}, {{__len = {loop_fn}}})"),
        format!("return setmetatable({{}}, {{__call = {loop_fn}}})()"),
        format!("return -setmetatable({{}}, {{__unm = {loop_fn}}})"),
        format!("return tostring(setmetatable({{}}, {{__tostring = {loop_fn}}}))"),
        format!("for k in pairs(setmetatable({{}}, {{__pairs = {loop_fn}}})) do end"),
        format!("local t = setmetatable({{}}, {{__index = {loop_fn}}}) return table.concat(t, '', 1, 3)"),
        format!("local t = setmetatable({{}}, {{__len = {loop_fn}}}) table.insert(t, 1)"),
        format!("table.sort({{3, 2, 1}}, {loop_fn})"),
    ] {
        stops(&body, LimitKind::Time, time_only(100));
    }
}

// --- 4. Long single C calls ---------------------------------------------------------------

#[test]
fn table_move_is_chunked() {
    stops(
        "table.move({}, 1, 1e9, 1) return 'escaped'",
        LimitKind::Time,
        time_only(200),
    );
    stops(
        "table.move({}, 1, 1e9, 2) return 'escaped'",
        LimitKind::Time,
        time_only(200),
    );
    stops(
        "table.move({}, -1e9, 1e9, 1, {}) return 'escaped'",
        LimitKind::Time,
        time_only(200),
    );
    stops(
        "while true do pcall(table.move, {}, 1, 1e9, 1) end",
        LimitKind::Time,
        time_only(200),
    );
    fails_with("table.move({}, 0, math.maxinteger, 1)", "too many elements");
    fails_with("table.move({}, 1, 1e6, math.maxinteger)", "wrap around");
    fails_with("table.move({}, 1, 1e6, 1, 5)", "bad argument #5");
    // Same results as Lua's own loop, across many chunks, overlapping both ways.
    returns(
        r#"
        local function filled(n) local t = {} for i = 1, n do t[i] = i end return t end
        local function check(t, n, f)
            for i = 1, n do if t[i] ~= f(i) then return false end end return true
        end
        local n = 20000
        local a = filled(n)
        local r1 = table.move(a, 1, n - 10, 11) == a and check(a, n, function(i) return i <= 10 and i or i - 10 end)
        local b = filled(n)
        table.move(b, 11, n, 1)
        local r2 = check(b, n - 10, function(i) return i + 10 end) and b[n] == n
        local c, d = filled(n), {}
        local r3 = table.move(c, 1, n, 5, d) == d and d[5] == 1 and d[n + 4] == n and d[4] == nil
        local e = filled(n)
        table.move(e, 1, n - 1, 2)
        local r4 = e[1] == 1 and check(e, n, function(i) return i == 1 and 1 or i - 1 end)
        return tostring(r1 and r2 and r3 and r4)
        "#,
        "true",
    );
}

#[test]
fn table_insert_remove_sort_with_huge_lengths() {
    let huge = "setmetatable({}, {__len = function() return 1e15 end})";
    stops(
        &format!("table.insert({huge}, 1, 'x')"),
        LimitKind::Time,
        time_only(200),
    );
    stops(
        &format!("table.remove({huge}, 1)"),
        LimitKind::Time,
        time_only(200),
    );
    stops(
        "table.sort(setmetatable({}, {__len = function() return 2^31 - 2 end}), rawequal)",
        LimitKind::Time,
        time_only(200),
    );
    stops(
        "local t = {} for i = 1, 3e5 do t[i] = -i end while true do table.sort(t, function(a, b) return a < b end) end",
        LimitKind::Time,
        time_only(300),
    );
    fails_with(&format!("table.insert({huge}, 0, 'x')"), "out of bounds");
    fails_with("table.insert({}, 1, 2, 3)", "wrong number of arguments");
    fails_with("table.sort({1, 2}, 5)", "bad argument #2");
    // Ordinary results on long arrays, through the Lua paths.
    returns(
        r#"
        local n = 20000
        local t = {} for i = 1, n do t[i] = i end
        table.insert(t, 1, 0)
        local ok = #t == n + 1 and t[1] == 0 and t[2] == 1 and t[n + 1] == n
        local v = table.remove(t, 1)
        ok = ok and v == 0 and #t == n and t[1] == 1 and t[n] == n
        table.insert(t, 5000, 'x')
        ok = ok and t[5000] == 'x' and t[5001] == 5000 and #t == n + 1
        ok = ok and table.remove(t, 5000) == 'x' and t[5000] == 5000 and #t == n
        ok = ok and table.remove(t) == n and #t == n - 1
        local s = {} for i = 1, n do s[i] = (i * 7919) % n end
        table.sort(s)
        for i = 2, n do if s[i - 1] > s[i] then ok = false end end
        table.sort(s, function(a, b) return a > b end)
        for i = 2, n do if s[i - 1] < s[i] then ok = false end end
        return tostring(ok)
        "#,
        "true",
    );
}

#[test]
fn strings_and_ranges() {
    returns(
        "return #string.rep('', 1e18) .. #string.rep('', 1e18, '')",
        "00",
    );
    returns("return ('x'):rep(3, ', ') .. ('ab'):rep(2)", "x, x, xabab");
    stops(
        "return #string.rep('x', 1e9)",
        LimitKind::Memory,
        time_only(1000),
    );
    stops(
        "return #string.rep('x', 1e6, ('y'):rep(1e3))",
        LimitKind::Memory,
        time_only(1000),
    );
    fails_with("return table.concat({}, '', 1, 1e9)", "invalid value");
    stops(
        "return table.concat(setmetatable({}, {__index = function() return '' end}), '', 1, 1e12)",
        LimitKind::Time,
        time_only(200),
    );
    fails_with("return table.unpack({}, 1, 1e8)", "too many results");
    fails_with("return unpack({}, -1e18, 1e18)", "too many results");
    fails_with(
        "return string.byte(('x'):rep(2e6), 1, -1)",
        "string slice too long",
    );
    fails_with(
        "return string.char(table.unpack({}, 1, 1e7))",
        "too many results",
    );
    fails_with(
        "return utf8.char(table.unpack({}, 1, 1e7))",
        "too many results",
    );
    fails_with("return os.date(('%c'):rep(1e6))", "format longer than");
    fails_with("return string.format('%99999d', 1)", "invalid conversion");
    for body in [
        "local s = ('x'):rep(8e6) return utf8.len(s) + #string.format('%s', s) + select('#', string.byte(s, 1, 1e5))",
        "local s = ('\\0'):rep(2e6) return #string.format('%q', s)",
        "local t = {} for i = 1, 5e5 do t[i] = 0x10000 + i end return #utf8.char(table.unpack(t)) + select('#', string.byte(('x'):rep(9e5), 1, -1))",
    ] {
        let (result, elapsed, _) = run_src(handler(body), time_only(1000));
        assert!(
            matches!(&result, Ok(_) | Err(Failure::Limit { .. })),
            "{body}: {result:?}"
        );
        assert!(elapsed < Duration::from_millis(1100), "{body}: took {elapsed:?}");
    }
}

#[test]
fn load_is_fed_in_slices() {
    stops(
        "local s = ('x = 1 '):rep(1e5) while true do load(s) end",
        LimitKind::Time,
        time_only(200),
    );
    stops(
        r#"
        local s, first = ('x'):rep(4e6), true
        load(function() if first then first = false return '--[[' end return s end)
        "#,
        LimitKind::Time,
        time_only(200),
    );
    returns(
        r#"
        local f = load('return ' .. ('1 + '):rep(50000) .. '1')
        local parts = {}
        local g = load(function() local p = table.remove(parts, 1) return p end)
        return f() .. ' ' .. type(g)
        "#,
        "50001 function",
    );
}

#[test]
fn helper_module_is_bounded() {
    let unlimited = Limits {
        output: 0,
        ..time_only(200)
    };
    stops(
        r#"
        local luafcgid = require('luafcgid')
        local t = {} for i = 1, 1e5 do t['k' .. i] = i end
        while true do luafcgid.serialize(t) end
        "#,
        LimitKind::Time,
        unlimited,
    );
    stops(
        "local t = {} for i = 1, 1e5 do t['k' .. i] = i end return require('luafcgid').serialize(t)",
        LimitKind::Output,
        Limits {
            output: 100_000,
            ..time_only(1000)
        },
    );
    stops(
        "return require('luafcgid').urlencode(('/'):rep(8e6))",
        LimitKind::Memory,
        time_only(1000),
    );
    stops(
        "local q = ('a=1&'):rep(1e6) while true do require('luafcgid').parse(q) end",
        LimitKind::Time,
        time_only(200),
    );
}

// --- 5. Deep recursion ---------------------------------------------------------------------

#[test]
fn deep_recursion_is_an_error() {
    for body in [
        "local function f() return 1 + f() end return f()",
        "local t = setmetatable({}, {}) getmetatable(t).__index = function(s, k) return s[k .. 'x'] end return t.a",
        "local function f(s) return (s:gsub('.', f)) end return f('aa')",
        "local function f() local ok, e = pcall(f) if not ok then error(e, 0) end end f()",
        "local function f() local ok, e = pcall(f) error(e, 0) end f()",
        "local function f() local ok, e = xpcall(f, f) if not ok then error(e, 0) end end f()",
        "local function f() return coroutine.wrap(f)() end return f()",
        "local function f() local ok, e = coroutine.resume(coroutine.create(f)) if not ok then error(e, 0) end end f()",
        "local mt = {} mt.__eq = function(a, b) return a == b end local x, y = setmetatable({}, mt), setmetatable({}, mt) return x == y",
        "local mt = {} mt.__lt = function(a, b) return a < b end local x = setmetatable({}, mt) return x < x",
        "local mt = {} mt.__concat = function(a, b) return a .. b end local x = setmetatable({}, mt) return x .. 'y'",
        "local mt = {} mt.__len = function(a) return #a end return #setmetatable({}, mt)",
        "local mt = {} mt.__tostring = function(a) return tostring(a) end return tostring(setmetatable({}, mt))",
        "local mt = {} mt.__close = function(a) local x <close> = setmetatable({}, mt) end local x <close> = setmetatable({}, mt)",
        "local function f() table.sort({1, 2, 3}, function() return f() end) end f()",
        "local function f() local g, e = load(function() return f() end) if not g then error(e, 0) end end f()",
        "local s = 'return ' .. ('('):rep(1e5) .. '1' .. (')'):rep(1e5) return load(s)()",
        "local s = 'return ' .. ('{'):rep(1e5) .. ('}'):rep(1e5) return load(s)()",
        "local function f(n) if n > 0 then return require('luafcgid').serialize({f(n - 1)}) end return 1 end return f(1e5)",
    ] {
        let (result, elapsed, _) = run_src(handler(body), time_only(2000));
        assert!(
            matches!(&result, Err(Failure::Script { .. } | Failure::Limit { .. })),
            "{body}: {result:?}"
        );
        assert!(elapsed < Duration::from_millis(2200), "{body}: took {elapsed:?}");
    }
}

#[test]
fn recursive_require_is_an_error() {
    let dir = TempDir::new();
    dir.write("app/self.lua", "return require('self')");
    let script = dir.write(
        "app/script.lua",
        "function handler() return require('self') end",
    );
    let opts = options(&dir, &script);
    let report = on_worker_stack(move || {
        let mut state =
            luafcgid_sandbox::ScriptState::load(&opts, &AtomicBool::new(false)).unwrap();
        let report = request(&mut state);
        report.result.map(drop)
    });
    assert!(
        matches!(&report, Err(Failure::Script { .. } | Failure::Limit { .. })),
        "{report:?}"
    );
}
