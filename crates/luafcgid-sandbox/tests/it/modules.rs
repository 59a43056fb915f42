//! `require` of `.lua` modules.

use std::sync::atomic::AtomicBool;

use luafcgid_sandbox::{Failure, LimitKind, ScriptState};

use crate::support::*;

fn load_in(dir: &TempDir, rel: &str, src: &str, modules: bool) -> Result<ScriptState, Failure> {
    let script = dir.write(rel, src);
    let mut opts = options(dir, &script);
    opts.modules = modules;
    ScriptState::load(&opts, &AtomicBool::new(false))
}

#[test]
fn relative_to_script_then_root() {
    let dir = TempDir::new();
    dir.write("app/lib/near.lua", "return { name = 'near' }");
    dir.write("lib/far.lua", "return { name = 'far' }");
    dir.write("app/both.lua", "return 'app'");
    dir.write("both.lua", "return 'root'");
    let mut state = load_in(
        &dir,
        "app/main.lua",
        "local near, far = require('lib.near'), require('lib.far')\n\
         function handler() return near.name .. far.name .. require('both') end",
        true,
    )
    .unwrap();
    assert_eq!(body(request(&mut state)), "nearfarapp");
    let files: Vec<_> = state
        .files()
        .iter()
        .map(|p| p.strip_prefix(dir.path()).unwrap().to_owned())
        .collect();
    assert_eq!(
        files,
        [
            "app/main.lua",
            "app/lib/near.lua",
            "lib/far.lua",
            "app/both.lua"
        ]
        .map(std::path::PathBuf::from)
    );
}

#[test]
fn cached_per_state() {
    let dir = TempDir::new();
    dir.write("counter.lua", "loads = (loads or 0) + 1 return {}");
    let mut state = load_in(
        &dir,
        "s.lua",
        "local a = require('counter')\n\
         function handler() local b = require('counter') return tostring(a == b) .. loads end",
        true,
    )
    .unwrap();
    assert_eq!(body(request(&mut state)), "true1");
    assert_eq!(body(request(&mut state)), "true1");
}

#[test]
fn loaded_during_a_request() {
    let dir = TempDir::new();
    dir.write("late.lua", "local name = ... return name .. ' loaded'");
    let mut state = load_in(
        &dir,
        "s.lua",
        "function handler() return require('late') end",
        true,
    )
    .unwrap();
    assert_eq!(state.files().len(), 1);
    assert_eq!(body(request(&mut state)), "late loaded");
    assert_eq!(state.files().len(), 2);
    assert!(state.files()[1].ends_with("late.lua"));
}

#[test]
fn module_without_return_value_is_true() {
    let dir = TempDir::new();
    dir.write("m.lua", "x = 1");
    let mut state = load_in(
        &dir,
        "s.lua",
        "function handler() return tostring(require('m')) end",
        true,
    )
    .unwrap();
    assert_eq!(body(request(&mut state)), "true");
}

#[test]
fn bad_names_are_refused() {
    let dir = TempDir::new();
    dir.write("ok.lua", "return 1");
    let mut state = load_in(
        &dir,
        "s.lua",
        "function handler(r) local ok, e = pcall(require, r:config('name')) return tostring(ok) .. ' ' .. tostring(e) end",
        true,
    )
    .unwrap();
    for name in [
        "..",
        "../x",
        "a..b",
        "/etc/passwd",
        ".ok",
        "ok.",
        "a/b",
        "a b",
        "ok\0",
    ] {
        let out = body(Req::default().var("name", name).run(&mut state, &limits()));
        assert!(out.starts_with("false"), "{name}: {out}");
        assert!(out.contains("invalid module name"), "{name}: {out}");
    }
    let out = body(
        Req::default()
            .var("name", "missing")
            .run(&mut state, &limits()),
    );
    assert!(out.contains("not found"), "{out}");
    assert!(
        !out.contains(dir.path().to_str().unwrap()),
        "absolute path leaked: {out}"
    );
}

#[test]
fn symlink_escape_is_refused() {
    let outside = TempDir::new();
    outside.write("secret.lua", "return 'secret'");
    let dir = TempDir::new();
    std::os::unix::fs::symlink(
        outside.path().join("secret.lua"),
        dir.path().join("leak.lua"),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("outdir")).unwrap();
    let mut state = load_in(
        &dir,
        "s.lua",
        "function handler(r) local ok, e = pcall(require, r:config('name')) return tostring(ok) .. ' ' .. tostring(e) end",
        true,
    )
    .unwrap();
    for name in ["leak", "outdir.secret"] {
        let out = body(Req::default().var("name", name).run(&mut state, &limits()));
        assert!(out.starts_with("false"), "{name}: {out}");
        assert!(out.contains("outside the tenant's tree"), "{name}: {out}");
    }
    // A symlink that stays inside the tree is fine.
    dir.write("real/inside.lua", "return 'inside'");
    std::os::unix::fs::symlink(
        dir.path().join("real/inside.lua"),
        dir.path().join("alias.lua"),
    )
    .unwrap();
    let out = body(
        Req::default()
            .var("name", "alias")
            .run(&mut state, &limits()),
    );
    assert_eq!(out, "true inside");
}

#[test]
fn script_outside_the_root_cannot_use_its_directory() {
    let root = TempDir::new();
    let elsewhere = TempDir::new();
    elsewhere.write("near.lua", "return 'near'");
    let script = elsewhere.write("s.lua", "function handler() return require('near') end");
    let mut opts = options(&elsewhere, &script);
    opts.module_root = root.path().to_path_buf();
    let mut state = ScriptState::load(&opts, &AtomicBool::new(false)).unwrap();
    let message = script_error(request(&mut state));
    assert!(message.contains("outside the tenant's tree"), "{message}");
}

#[test]
fn modules_disabled() {
    let dir = TempDir::new();
    dir.write("m.lua", "return 1");
    let mut state = load_in(
        &dir,
        "s.lua",
        "function handler() local lf = require('luafcgid') return require('m') end",
        false,
    )
    .unwrap();
    let message = script_error(request(&mut state));
    assert!(message.contains("modules are disabled"), "{message}");
}

#[test]
fn bytecode_module_is_refused() {
    let dir = TempDir::new();
    dir.write("bc.lua", b"\x1bLua\x54\x00\x19\x93");
    let mut state = load_in(
        &dir,
        "s.lua",
        "function handler() return require('bc') end",
        true,
    )
    .unwrap();
    let message = script_error(request(&mut state));
    assert!(message.contains("bytecode"), "{message}");
}

#[test]
fn self_require_is_an_error() {
    let dir = TempDir::new();
    dir.write("a.lua", "return require('b')");
    dir.write("b.lua", "return require('a')");
    let result = on_worker_stack(move || {
        let r = load_in(&dir, "s.lua", "require('a') function handler() end", true).map(drop);
        drop(dir);
        r
    });
    match result {
        Err(Failure::Script { message }) => {
            assert!(message.contains("requires itself"), "{message}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn modules_run_under_the_current_limits() {
    let dir = TempDir::new();
    dir.write("spin.lua", "while true do end");
    let mut state = load_in(
        &dir,
        "s.lua",
        "function handler() pcall(require, 'spin') return 'escaped' end",
        true,
    )
    .unwrap();
    expect_limit(request(&mut state), LimitKind::Instructions);
    let result = load_in(
        &dir,
        "t.lua",
        "require('spin') function handler() end",
        true,
    );
    assert!(
        matches!(
            result,
            Err(Failure::Limit {
                kind: LimitKind::Instructions,
                ..
            })
        ),
        "{result:?}"
    );
}

#[test]
fn module_errors_name_relative_paths() {
    let dir = TempDir::new();
    dir.write("lib/bad.lua", "error('broken')");
    let mut state = load_in(
        &dir,
        "s.lua",
        "function handler() require('lib.bad') end",
        true,
    )
    .unwrap();
    let message = script_error(request(&mut state));
    assert!(message.contains("lib/bad.lua:1: broken"), "{message}");
    // A failed module is not cached: requiring it again runs it again.
    let message = script_error(request(&mut state));
    assert!(message.contains("broken"), "{message}");
}

#[test]
fn deep_module_chains_end_in_an_error_not_a_crash() {
    let dir = TempDir::new();
    for i in 0..300 {
        dir.write(
            &format!("chain/m{i}.lua"),
            format!("return require('chain.m{}')", i + 1),
        );
    }
    dir.write("chain/m300.lua", "return 'bottom'");
    let result = on_worker_stack(move || {
        let mut state = load_in(
            &dir,
            "s.lua",
            "function handler() return require('chain.m0') end",
            true,
        )
        .unwrap();
        let report = request(&mut state);
        drop(dir);
        report.result.map(|r| r.body)
    });
    match result {
        Err(Failure::Script { message }) => {
            assert!(message.contains("stack overflow"), "{message}")
        }
        other => panic!("unexpected {other:?}"),
    }
}
