//! Measures `ScriptState::handle` for the hello-world handler (and two heavier ones).
//!
//! Run: `cargo run --release -p luafcgid-sandbox --example hello_bench`

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use luafcgid_sandbox::{Limits, OwnedRequest, RequestInput, ScriptState, StateOptions};

fn bench(name: &str, src: &str, iterations: u32) {
    let dir = std::env::temp_dir().join(format!("luafcgid-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dir = std::fs::canonicalize(&dir).unwrap();
    let script = dir.join("bench.lua");
    std::fs::write(&script, src).unwrap();
    let limits = Limits {
        instructions: 50_000_000,
        timeout: Duration::from_secs(1),
        output: 8 << 20,
    };
    let opts = StateOptions {
        script,
        chunk_name: "bench.lua".into(),
        module_root: dir.clone(),
        modules: true,
        entry: None,
        memory: 64 << 20,
        libs: luafcgid_sandbox::default_libs(),
        init: limits.clone(),
    };
    let abort = AtomicBool::new(false);
    let loads = 200;
    let start = Instant::now();
    for _ in 0..loads {
        std::hint::black_box(ScriptState::load(&opts, &abort).unwrap());
    }
    let load_time = start.elapsed() / loads;
    let mut state = ScriptState::load(&opts, &abort).unwrap();
    let params: Vec<(Vec<u8>, Vec<u8>)> = [
        ("SCRIPT_FILENAME", "/srv/www/bench.lua"),
        ("QUERY_STRING", "a=1&b=2"),
        ("REQUEST_METHOD", "GET"),
        ("REMOTE_ADDR", "127.0.0.1"),
    ]
    .iter()
    .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
    .collect();
    let input = RequestInput::new(OwnedRequest {
        params,
        ..OwnedRequest::default()
    });
    for _ in 0..1000 {
        state.handle(&input, &limits).result.unwrap();
    }
    let start = Instant::now();
    for _ in 0..iterations {
        let report = state.handle(&input, &limits);
        std::hint::black_box(report.result.unwrap());
    }
    let per = start.elapsed() / iterations;
    println!("{name:<24} load {load_time:>10.1?}   handle {per:>8.2?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    bench(
        "hello world",
        r#"function handler() return "Hello World" end"#,
        200_000,
    );
    bench(
        "main(env, con)",
        r#"function main(env, con) con:puts("Hello ") con:puts(env.QUERY_STRING) end"#,
        100_000,
    );
    bench(
        "headers + r.env",
        r#"function handler(r) r:header("X-A", "b") r:content_type("text/plain") return r.env.QUERY_STRING end"#,
        100_000,
    );
    bench(
        "loop 100k instructions",
        "function handler() local n = 0 for i = 1, 50000 do n = n + i end return n end",
        2_000,
    );
}
