//! What the armed sandbox costs on CPU-bound scripts: each workload runs as a request in a
//! `ScriptState` with every limit armed, and the same Lua code runs in a plain `mlua::Lua`
//! with the same standard libraries and no hook, in the same run. Prints the best of
//! several runs of each and the ratio.
//!
//! Run: `cargo run --release -p luafcgid-sandbox --example sandbox_cost`

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use luafcgid_sandbox::{Limits, OwnedRequest, RequestInput, ScriptState, StateOptions};

include!("support/workloads.rs");

const RUNS: u32 = 5;

fn best_of(mut f: impl FnMut()) -> Duration {
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .expect("at least one run")
}

fn main() {
    let dir = std::env::temp_dir().join(format!("luafcgid-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dir = std::fs::canonicalize(&dir).unwrap();
    let limits = Limits {
        instructions: 10_000_000_000,
        timeout: Duration::from_secs(60),
        output: 64 << 20,
    };
    println!(
        "{:<34} {:>12} {:>12} {:>7}",
        "workload", "plain Lua", "sandbox", "ratio"
    );
    for (name, src) in WORKLOADS {
        // Plain Lua, no hook, the same libraries the sandbox starts from.
        let lua = mlua::Lua::new();
        lua.load(*src).exec().unwrap();
        let work: mlua::Function = lua.globals().get("work").unwrap();
        let plain_value: mlua::Value = work.call(()).unwrap();
        let plain = best_of(|| {
            std::hint::black_box(work.call::<mlua::Value>(()).unwrap());
        });

        // The sandbox, every limit armed, one request per run.
        let script = dir.join("work.lua");
        std::fs::write(
            &script,
            format!("{src}\nfunction handler() return tostring(work()) end\n"),
        )
        .unwrap();
        let opts = StateOptions {
            script,
            chunk_name: "work.lua".into(),
            module_root: dir.clone(),
            modules: false,
            entry: None,
            memory: 1 << 30,
            libs: luafcgid_sandbox::default_libs(),
            init: limits.clone(),
        };
        let abort = AtomicBool::new(false);
        let mut state = ScriptState::load(&opts, &abort).unwrap();
        let input = RequestInput::new(OwnedRequest::default());
        let body = state.handle(&input, &limits).result.unwrap().body;
        assert_eq!(
            String::from_utf8_lossy(&body),
            plain_value.to_string().unwrap(),
            "{name}: same result"
        );
        let sandboxed = best_of(|| {
            std::hint::black_box(state.handle(&input, &limits).result.unwrap());
        });
        println!(
            "{:<34} {:>9.1} ms {:>9.1} ms {:>6.2}x",
            name,
            plain.as_secs_f64() * 1e3,
            sandboxed.as_secs_f64() * 1e3,
            sandboxed.as_secs_f64() / plain.as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
