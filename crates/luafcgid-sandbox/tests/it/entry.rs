//! Entry functions, return values, persistence, load failures.

use std::sync::atomic::AtomicBool;

use luafcgid_sandbox::{Failure, ScriptState};

use crate::support::*;

#[test]
fn hello_world() {
    let mut s = load(r#"function handler() return "Hello World" end"#);
    let report = request(&mut s.state);
    let response = ok(report);
    assert_eq!(response.body, b"Hello World");
    assert_eq!(response.status, None);
    assert_eq!(response.content_type, None);
    assert!(response.headers.is_empty());
    assert_eq!(s.state.requests(), 1);
    assert_eq!(s.state.entry(), "handler");
}

#[test]
fn globals_persist_across_requests() {
    let mut s = load("count = 0\nfunction handler() count = count + 1 return count end");
    assert_eq!(body(request(&mut s.state)), "1");
    assert_eq!(body(request(&mut s.state)), "2");
    assert_eq!(body(request(&mut s.state)), "3");
    assert_eq!(s.state.requests(), 3);
}

#[test]
fn main_form_gets_env_and_con() {
    let mut s = load(
        r#"
        function main(env, con)
            con:write(env.QUERY_STRING, "|", env.LUAFCGID_VERSION)
            con:write("|", tostring(con.env == env))
            return "ignored"
        end
        function handler() return "not me" end
        "#,
    );
    assert_eq!(s.state.entry(), "main");
    let report = Req::default()
        .param("QUERY_STRING", "a=1")
        .run(&mut s.state, &limits());
    assert_eq!(body(report), "a=1|1|true");
}

#[test]
fn configured_entry() {
    let dir = TempDir::new();
    let script = dir.write(
        "s.lua",
        "function run(r) return 'run' end function handler() return 'h' end",
    );
    let mut opts = options(&dir, &script);
    opts.entry = Some("run".into());
    let mut state = ScriptState::load(&opts, &AtomicBool::new(false)).unwrap();
    assert_eq!(body(request(&mut state)), "run");

    opts.entry = Some("missing".into());
    match ScriptState::load(&opts, &AtomicBool::new(false)) {
        Err(Failure::Script { message }) => assert!(message.contains("missing"), "{message}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn missing_entry_is_a_script_error_at_load() {
    let (_dir, result) = try_load("x = 1");
    match result {
        Err(Failure::Script { message }) => assert!(message.contains("handler"), "{message}"),
        other => panic!("unexpected {other:?}"),
    }
    let (_dir, result) = try_load("handler = 42");
    assert!(matches!(result, Err(Failure::Script { .. })));
}

#[test]
fn entry_removed_at_runtime() {
    let mut s = load("function handler() handler = nil return 'once' end");
    assert_eq!(body(request(&mut s.state)), "once");
    let message = script_error(request(&mut s.state));
    assert!(message.contains("handler"), "{message}");
}

#[test]
fn syntax_and_runtime_errors_at_load() {
    let (_dir, result) = try_load("function handler( return end");
    match result {
        Err(Failure::Script { message }) => assert!(message.contains("script.lua:1"), "{message}"),
        other => panic!("unexpected {other:?}"),
    }
    let (_dir, result) = try_load("error('boom')\nfunction handler() end");
    match result {
        Err(Failure::Script { message }) => {
            assert!(message.contains("script.lua:1: boom"), "{message}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn missing_file_is_io() {
    let dir = TempDir::new();
    let opts = options(&dir, &dir.path().join("nope.lua"));
    assert!(matches!(
        ScriptState::load(&opts, &AtomicBool::new(false)),
        Err(Failure::Io(_))
    ));
}

#[test]
fn bytecode_file_is_refused() {
    let (_dir, result) =
        try_load(b"\x1bLua\x54\x00\x19\x93\r\n\x1a\nfunction handler() end".as_slice());
    match result {
        Err(Failure::Script { message }) => assert!(message.contains("bytecode"), "{message}"),
        other => panic!("unexpected {other:?}"),
    }
    // Also after a shebang line and a BOM.
    let (_dir, result) = try_load(b"\xEF\xBB\xBF#!/usr/bin/lua\n\x1bLua\x54".as_slice());
    assert!(matches!(result, Err(Failure::Script { .. })));
}

#[test]
fn shebang_line_is_skipped() {
    let mut s = load("#!/usr/bin/env lua\nfunction handler() return debug_line() end\nfunction debug_line() return 'ok' end");
    assert_eq!(body(request(&mut s.state)), "ok");
}

#[test]
fn return_values() {
    let cases = [
        ("return 'text'", Some("text")),
        ("return 42", Some("42")),
        ("return 1.5", Some("1.5")),
        ("return 2^53", Some("9.007199254741e+15")),
        ("return nil", Some("")),
        ("", Some("")),
        ("return 'a', 'b'", Some("a")),
        ("return {}", None),
        ("return true", None),
        ("return false", None),
        ("return print", None),
        ("return r", None),
        ("return coroutine.create(print)", None),
    ];
    for (ret, expected) in cases {
        let mut s = load(format!("function handler(r) {ret} end"));
        let report = request(&mut s.state);
        match expected {
            Some(text) => assert_eq!(body(report), text, "{ret}"),
            None => {
                let message = script_error(report);
                assert!(
                    message.contains("expected a string, a number or nil"),
                    "{ret}: {message}"
                );
            }
        }
    }
}

#[test]
fn bad_return_never_runs_tostring() {
    let mut s = load(
        r#"
        called = false
        n = 0
        local mt = { __tostring = function() called = true return "x" end,
                     __concat = function() called = true return "x" end,
                     __name = "thing" }
        function handler(r)
            n = n + 1
            if n == 2 then return tostring(called) end
            return setmetatable({}, mt)
        end
        "#,
    );
    script_error(request(&mut s.state));
    assert_eq!(body(request(&mut s.state)), "false");
}

#[test]
fn script_error_keeps_state() {
    let mut s =
        load("n = 0 function handler() n = n + 1 if n == 1 then error('first') end return n end");
    let report = request(&mut s.state);
    let failure = report.result.unwrap_err();
    assert!(failure.keeps_state());
    assert!(failure.to_string().contains("first"), "{failure}");
    assert_eq!(body(request(&mut s.state)), "2");
}

#[test]
fn error_message_has_traceback() {
    let mut s = load("local function inner() error('deep') end\nfunction handler() inner() end");
    let message = script_error(request(&mut s.state));
    assert!(message.contains("script.lua:1: deep"), "{message}");
    assert!(message.contains("stack traceback"), "{message}");
}

#[test]
fn files_lists_the_script() {
    let s = load("function handler() end");
    assert_eq!(s.state.files(), &[s.dir.path().join("app/script.lua")]);
    assert!(s.state.used_memory() > 1000);
}

#[test]
fn script_state_moves_between_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<ScriptState>();
    let s = load("n = 0 function handler() n = n + 1 return n end");
    let mut state = s.state;
    assert_eq!(body(request(&mut state)), "1");
    let mut state = std::thread::spawn(move || {
        assert_eq!(body(request(&mut state)), "2");
        state
    })
    .join()
    .unwrap();
    assert_eq!(body(request(&mut state)), "3");
}

#[test]
fn errors_read_the_same_from_both_entry_forms() {
    // The handler form is called through the VM module, the main form through mlua's
    // `Function::call`: their messages (and tracebacks) must not differ.
    let bodies = [
        "error('plain')",
        "error(42)",
        "error()",
        "error(setmetatable({}, {__tostring = function() return 'shown' end}))",
        "r:puts({})",
        "r:header(nil)",
        "local t = nil; return t.x",
    ];
    for body in bodies {
        let mut handler = load(format!("function handler(r) {body} end"));
        let mut main = load(format!("function main(env, r) {body} end"));
        let from_handler = script_error(request(&mut handler.state));
        let from_main = script_error(request(&mut main.state)).replace("'main'", "'handler'");
        assert_eq!(from_handler, from_main, "{body}");
        assert!(!from_handler.is_empty(), "{body}");
    }
}
