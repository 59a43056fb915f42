//! The request object's methods and fields.

use crate::support::*;

fn run_handler(handler_body: &str, req: Req) -> luafcgid_sandbox::Report {
    let mut s = load(format!("function handler(r)\n{handler_body}\nend"));
    req.run(&mut s.state, &limits())
}

fn handler_error(handler_body: &str) -> String {
    script_error(run_handler(handler_body, Req::default()))
}

#[test]
fn puts_and_write() {
    let response = ok(run_handler(
        "r:puts('a') r:puts(1) r:puts(2.5) r:write('b', 3, 'c') r:write() return 'd'",
        Req::default(),
    ));
    assert_eq!(response.body, b"a12.5b3cd");
    for bad in [
        "r:puts({})",
        "r:puts(nil)",
        "r:puts(true)",
        "r:write('a', {})",
        "r:puts(setmetatable({}, {__tostring = function() return 'x' end}))",
    ] {
        let message = handler_error(bad);
        assert!(
            message.contains("expected a string or a number"),
            "{bad}: {message}"
        );
    }
}

#[test]
fn headers() {
    let response = ok(run_handler(
        r#"
        r:header("X-One", "1")
        r:header("X-Two: two words ")
        r:header("Set-Cookie", "a=b")
        r:header("Set-Cookie", "c=d")
        r:header("status", "404 Not Found")
        r:header("content-TYPE: text/plain")
        r:header("X-Num", 5)
        "#,
        Req::default(),
    ));
    assert_eq!(response.status, Some(404));
    assert_eq!(response.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        response.headers,
        vec![
            ("X-One".to_string(), "1".to_string()),
            ("X-Two".to_string(), "two words".to_string()),
            ("Set-Cookie".to_string(), "a=b".to_string()),
            ("Set-Cookie".to_string(), "c=d".to_string()),
            ("X-Num".to_string(), "5".to_string()),
        ]
    );
}

#[test]
fn header_injection_is_refused() {
    for bad in [
        r#"r:header("X-A", "b\r\nSet-Cookie: evil=1")"#,
        r#"r:header("X-A", "b\nc")"#,
        r#"r:header("X-A", "b\0c")"#,
        r#"r:header("X-A\r\nX-B", "c")"#,
        r#"r:header("X-A: b\r\nX-B: c")"#,
        r#"r:header("X A", "c")"#,
        r#"r:header("", "c")"#,
        r#"r:header("X-A\0", "c")"#,
        r#"r:header("no colon")"#,
        r#"r:header("Status", "abc")"#,
        r#"r:header("Status", "700 Weird")"#,
        r#"r:header("Content-Length", "5")"#,
        r#"r:content_type("text/html\r\nX-Evil: 1")"#,
        r#"r:header({}, "x")"#,
    ] {
        handler_error(bad);
    }
}

#[test]
fn header_injection_leaves_no_trace() {
    let response = ok(run_handler(
        r#"pcall(r.header, r, "X-A", "b\r\nX-B: c") return "ok""#,
        Req::default(),
    ));
    assert!(response.headers.is_empty());
    assert_eq!(response.body, b"ok");
}

#[test]
fn status() {
    assert_eq!(
        ok(run_handler("r:status(201)", Req::default())).status,
        Some(201)
    );
    assert_eq!(
        ok(run_handler("r:status(599) r:status(100)", Req::default())).status,
        Some(100)
    );
    for bad in [
        "r:status(99)",
        "r:status(600)",
        "r:status(-1)",
        "r:status('abc')",
        "r:status(200.5)",
        "r:status()",
    ] {
        handler_error(bad);
    }
}

#[test]
fn content_type() {
    let response = ok(run_handler(
        "r:content_type('application/json')",
        Req::default(),
    ));
    assert_eq!(response.content_type.as_deref(), Some("application/json"));
}

#[test]
fn body_access() {
    let req = Req::default().body("a=1&b=2");
    assert_eq!(
        body(run_handler("return r:gets() .. '|' .. r:body()", req)),
        "a=1&b=2|a=1&b=2"
    );
    assert_eq!(
        body(run_handler(
            "return tostring(r:gets()) .. tostring(r:body())",
            Req::default()
        )),
        "nilnil"
    );
}

#[test]
fn reset_and_flush() {
    let response = ok(run_handler(
        "r:puts('gone') print('gone too') r:flush() r:reset() r:header('X-Kept', '1') r:puts('kept')",
        Req::default(),
    ));
    assert_eq!(response.body, b"kept");
    assert_eq!(response.headers.len(), 1);
}

#[test]
fn log() {
    let report = run_handler(
        "r:log('first') r:log(2) for i = 1, 200 do r:log(string.rep('x', 5000)) end",
        Req::default(),
    );
    assert_eq!(report.logs.len(), 100);
    assert_eq!(report.logs[0], "first");
    assert_eq!(report.logs[1], "2");
    assert_eq!(report.logs[2].len(), 4096);
    assert_eq!(report.logs_dropped, 102);
    ok(report);
    // A request that fails keeps what it logged before.
    let report = run_handler("r:log('before') error('boom')", Req::default());
    assert_eq!(report.logs, ["before"]);
    assert!(report.result.is_err());
    handler_error("r:log({})");
}

#[test]
fn config() {
    let req = Req::default().var("greeting", "hello").var("empty", "");
    assert_eq!(
        body(run_handler(
            "return r:config('greeting') .. '|' .. r:config('empty') .. '|' .. tostring(r:config('missing'))",
            req
        )),
        "hello||nil"
    );
    handler_error("r:config(1)");
}

#[test]
fn env() {
    let req = Req::default()
        .param("SCRIPT_FILENAME", "/srv/www/x.lua")
        .param("QUERY_STRING", "")
        .param("HTTP_X", "\0bin");
    assert_eq!(
        body(run_handler(
            r#"
            local e = r.env
            assert(e == r.env, "cached per request")
            local n = 0 for _ in pairs(e) do n = n + 1 end
            return table.concat({e.SCRIPT_FILENAME, e.QUERY_STRING, #e.HTTP_X, e.LUAFCGID_VERSION, n, math.type(e.LUAFCGID_VERSION)}, ",")
            "#,
            req
        )),
        "/srv/www/x.lua,,4,1,4,integer"
    );
}

#[test]
fn env_is_fresh_per_request() {
    let mut s = load(
        "function handler(r) local old = r.env.X r.env.X = 'changed' return tostring(old) end",
    );
    let req = Req::default().param("X", "orig");
    assert_eq!(body(req.run(&mut s.state, &limits())), "orig");
    assert_eq!(body(req.run(&mut s.state, &limits())), "orig");
}

#[test]
fn dead_request_object() {
    for use_it in [
        "saved:puts('x')",
        "return saved.env",
        "saved:header('X-A', 'b')",
        "return saved:gets()",
        "return saved:config('a')",
    ] {
        let mut s = load(format!(
            "n = 0 function handler(r) n = n + 1 if n == 1 then saved = r return 'saved' end {use_it} end"
        ));
        assert_eq!(body(request(&mut s.state)), "saved");
        let message = script_error(request(&mut s.state));
        assert!(
            message.contains("after its request ended"),
            "{use_it}: {message}"
        );
    }
}

#[test]
fn dead_request_object_in_a_coroutine() {
    let mut s = load(
        r#"
        n = 0
        function handler(r)
            n = n + 1
            if n == 1 then
                co = coroutine.wrap(function() while true do coroutine.yield() r:puts("late") end end)
                co()
                return "first"
            end
            co()
        end
        "#,
    );
    assert_eq!(body(request(&mut s.state)), "first");
    let message = script_error(request(&mut s.state));
    assert!(message.contains("after its request ended"), "{message}");
}

#[test]
fn a_handler_gets_the_object_when_it_can_reach_it() {
    for (script, expected) in [
        ("function handler(r) return type(r) end", "userdata"),
        (
            "function handler(...) return select('#', ...) .. type(...) end",
            "1userdata",
        ),
        ("function handler() return select('#') end", "0"),
        ("handler = type", "userdata"),
    ] {
        let mut s = load(script);
        let text = body(request(&mut s.state));
        assert!(text.starts_with(expected), "{script}: {text}");
    }
    // A handler that replaces itself with one that takes the object gets it next time.
    let mut s =
        load("function handler() handler = function(r) r:puts(type(r)) end return 'first' end");
    assert_eq!(body(request(&mut s.state)), "first");
    for _ in 0..3 {
        assert_eq!(body(request(&mut s.state)), "userdata");
    }
}

#[test]
fn the_objects_metatable_is_out_of_reach() {
    let response = ok(run_handler(
        "return tostring(getmetatable(r)) .. ' ' .. tostring(r == r) .. ' ' .. type(r.puts)",
        Req::default(),
    ));
    assert_eq!(response.body, b"false true function");
    for bad in ["r.x = 1", "setmetatable(r, {})", "r.puts = print"] {
        assert!(!handler_error(bad).is_empty(), "{bad}");
    }
    let message = handler_error("return r");
    assert!(message.contains("userdata"), "{message}");
}

#[test]
fn methods_need_the_object() {
    handler_error("r.puts('x')");
}

#[test]
fn unknown_fields_are_nil() {
    assert_eq!(
        body(run_handler("return tostring(r.nothing)", Req::default())),
        "nil"
    );
}
