//! What the armed sandbox costs on CPU-bound scripts: each workload runs as a request in a
//! `ScriptState` with every limit armed, and the same Lua code runs in a plain `mlua::Lua`
//! with the same standard libraries and no hook, in the same run. Prints the best of
//! several runs of each and the ratio.
//!
//! Run: `cargo run --release -p luafcgid-sandbox --example sandbox_cost`

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use luafcgid_sandbox::{Limits, RequestInput, ScriptState, StateOptions};

/// Workloads: each defines `work()`, returning a value that depends on all its work.
const WORKLOADS: &[(&str, &str)] = &[
    (
        "fib(27), recursive",
        "local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
         function work() return fib(27) end",
    ),
    (
        "string building, 200k pieces",
        "function work()
           local t = {}
           for i = 1, 200000 do t[#t + 1] = tostring(i) .. ',' end
           return #table.concat(t)
         end",
    ),
    (
        "table.sort, 200k numbers",
        "function work()
           local t, x = {}, 12345
           for i = 1, 200000 do x = (x * 1103515245 + 12345) % 2147483648 t[i] = x end
           table.sort(t)
           return t[1]
         end",
    ),
    (
        "JSON-like encoder, 20k records",
        "local function enc(v, out)
           local k = type(v)
           if k == 'table' then
             if #v > 0 then
               out[#out + 1] = '['
               for i = 1, #v do if i > 1 then out[#out + 1] = ',' end enc(v[i], out) end
               out[#out + 1] = ']'
             else
               out[#out + 1] = '{'
               local first = true
               for key, val in pairs(v) do
                 if not first then out[#out + 1] = ',' end
                 first = false
                 out[#out + 1] = string.format('%q', key) out[#out + 1] = ':'
                 enc(val, out)
               end
               out[#out + 1] = '}'
             end
           elseif k == 'string' then out[#out + 1] = string.format('%q', v)
           else out[#out + 1] = tostring(v) end
         end
         function work()
           local rows = {}
           for i = 1, 20000 do rows[i] = {id = i, name = 'user' .. i, tags = {'a', 'b', i}} end
           local out = {}
           enc(rows, out)
           return #table.concat(out)
         end",
    ),
];

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
            init: limits.clone(),
        };
        let abort = AtomicBool::new(false);
        let mut state = ScriptState::load(&opts, &abort).unwrap();
        let params: Vec<(&[u8], &[u8])> = Vec::new();
        let input = RequestInput {
            params: &params,
            body: b"",
            vars: &[],
            abort: &abort,
            client: None,
        };
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
