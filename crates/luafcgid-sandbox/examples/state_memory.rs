//! Memory of a warm hello-world state, against a bare Lua state with the same libraries.
//!
//! Run: `cargo run --release -p luafcgid-sandbox --example state_memory`

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use luafcgid_sandbox::{Limits, OwnedRequest, RequestInput, ScriptState, StateOptions};

fn main() {
    let dir = std::env::temp_dir().join(format!("luafcgid-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dir = std::fs::canonicalize(&dir).unwrap();
    let script = dir.join("hello.lua");
    std::fs::write(
        &script,
        "s = \"Hello World\"\nfunction handler() return s end\n",
    )
    .unwrap();
    let limits = Limits {
        instructions: 1_000_000,
        timeout: Duration::from_secs(1),
        output: 1 << 20,
    };
    let opts = StateOptions {
        script,
        chunk_name: "hello.lua".into(),
        module_root: dir.clone(),
        modules: true,
        entry: None,
        memory: 64 << 20,
        libs: luafcgid_sandbox::default_libs(),
        init: limits.clone(),
    };
    let abort = AtomicBool::new(false);
    let mut state = ScriptState::load(&opts, &abort).unwrap();
    let after_load = state.used_memory();
    let input = RequestInput::new(OwnedRequest::default());
    let mut peak = 0;
    for _ in 0..100 {
        peak = state.handle(&input, &limits).memory;
    }
    let bare = mlua::Lua::new_with(
        mlua::StdLib::STRING
            | mlua::StdLib::TABLE
            | mlua::StdLib::MATH
            | mlua::StdLib::UTF8
            | mlua::StdLib::COROUTINE
            | mlua::StdLib::OS,
        mlua::LuaOptions::default(),
    )
    .unwrap();
    println!(
        "bare Lua state with the same libraries: {} bytes",
        bare.used_memory()
    );
    println!("hello state after load: {after_load} bytes");
    println!(
        "hello state after 100 requests: {} bytes (last request's peak {peak})",
        state.used_memory()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
