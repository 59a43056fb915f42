//! What a policy resolution costs on the request path.
//!
//! Run: `cargo run --release -p luafcgid-policy --example resolve_bench [-- --explain]`
//!
//! Builds a document root in a temporary directory (a root policy with a ceiling, a
//! reseller, a tenant with a per-script table, 1000 tenant directories), then prints
//! nanoseconds per warm `resolve` (one thread, then every thread at once, then with a
//! sweeper thread sweeping without pause), and what a cold resolve and a sweep cost.
//! Warm costs are the resolving thread's own CPU time (Linux `/proc/thread-self/schedstat`),
//! so other load on the machine does not inflate them; wall time is shown beside.
//! `--explain` also prints the explanation of one script.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use luafcgid_policy::{OperatorPolicy, PolicyTree, Resolution};

const WARM: u32 = 2_000_000;
const DIRS: usize = 1000;

fn write(path: PathBuf, text: &str) {
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

/// Nanoseconds this thread has spent on a CPU, if the kernel says.
fn cpu_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Warm resolves of `script`: (CPU ns, wall ns) per resolve.
fn warm(tree: &PolicyTree, script: &Path, n: u32) -> (f64, f64) {
    let cpu = cpu_ns();
    let start = Instant::now();
    for _ in 0..n {
        match tree.resolve(std::hint::black_box(script)) {
            Resolution::Allowed(e) => {
                std::hint::black_box(e.generation);
            }
            other => panic!("{other:?}"),
        }
    }
    let wall = start.elapsed().as_nanos() as f64 / f64::from(n);
    let cpu = match (cpu, cpu_ns()) {
        (Some(a), Some(b)) => (b - a) as f64 / f64::from(n),
        _ => f64::NAN,
    };
    (cpu, wall)
}

fn show((cpu, wall): (f64, f64)) -> String {
    format!("{cpu:.1} ns CPU ({wall:.1} ns wall)")
}

fn parallel(tree: &Arc<PolicyTree>, scripts: &[PathBuf], threads: usize) -> (f64, f64) {
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let tree = tree.clone();
            let script = scripts[i % scripts.len()].clone();
            std::thread::spawn(move || warm(&tree, &script, WARM / 2))
        })
        .collect();
    let per: Vec<(f64, f64)> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let n = per.len() as f64;
    (
        per.iter().map(|p| p.0).sum::<f64>() / n,
        per.iter().map(|p| p.1).sum::<f64>() / n,
    )
}

fn main() {
    let explain = std::env::args().any(|a| a == "--explain");
    let base = std::env::temp_dir().join(format!("luafcgid-resolve-bench-{}", std::process::id()));
    let root = base.join("www");
    write(root.join("policy.toml"), "[ceiling]\ntimeout_ms = \"5s\"\n");
    write(
        root.join("reseller/policy.toml"),
        "timeout_ms = \"3s\"\n[ceiling]\ntimeout_ms = \"2s\"\nlibs = [\"string\", \"table\", \"math\"]\n",
    );
    write(
        root.join("reseller/acme/policy.toml"),
        "tenant = \"acme\"\nmemory = \"16MiB\"\n[script.\"admin.lua\"]\ntimeout_ms = 200\n[vars]\ngreeting = \"hello\"\n",
    );
    write(root.join("reseller/acme/app/v1/index.lua"), "");
    for i in 0..DIRS {
        write(
            root.join(format!("t{i}/policy.toml")),
            &format!("clones = {}\n", 1 + i % 4),
        );
    }
    let config = "[ceiling]\ntimeout_ms = \"10s\"\n[defaults]\nmemory = \"32MiB\"\n";
    let operator = OperatorPolicy::from_config(Path::new("luafcgid.toml"), config).expect("config");
    let tree = Arc::new(PolicyTree::new(operator, vec![root.clone()]));
    let root = tree.roots()[0].clone();
    let deep = root.join("reseller/acme/app/v1/index.lua");
    let table = root.join("reseller/acme/admin.lua");

    let start = Instant::now();
    for i in 0..DIRS {
        let _ = tree.resolve(&root.join(format!("t{i}/index.lua")));
    }
    let cold = start.elapsed().as_nanos() as f64 / DIRS as f64;
    let _ = tree.resolve(&deep);
    let _ = tree.resolve(&table);
    let _ = tree.sweep();
    let start = Instant::now();
    let report = tree.sweep();
    let sweep = start.elapsed();
    assert!(report.is_empty());

    println!(
        "warm resolve, 1 thread, directory 4 levels down: {}",
        show(warm(&tree, &deep, WARM))
    );
    println!(
        "warm resolve, 1 thread, script with its own table: {}",
        show(warm(&tree, &table, WARM))
    );
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let scripts = [deep.clone(), table.clone()];
    println!(
        "warm resolve, {threads} threads at once, each its own script: {} per resolve per thread",
        show(parallel(&tree, &scripts, threads))
    );
    println!(
        "warm resolve, {threads} threads at once, all the same script: {} per resolve per thread",
        show(parallel(&tree, &scripts[..1], threads))
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sweeper = {
        let (tree, stop) = (tree.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = tree.sweep();
                n += 1;
            }
            n
        })
    };
    let during = warm(&tree, &deep, WARM);
    stop.store(true, Ordering::Relaxed);
    let sweeps = sweeper.join().expect("sweeper");
    println!(
        "warm resolve, 1 thread, while another thread sweeps nonstop ({sweeps} sweeps): {}",
        show(during)
    );
    println!(
        "cold resolve (reads the directory's policy.toml): {:.1} µs",
        cold / 1000.0
    );
    println!(
        "sweep of {} directories, nothing changed: {:.2} ms",
        DIRS + 4,
        sweep.as_secs_f64() * 1000.0
    );
    if explain {
        println!("\n{}", tree.explain(&table));
    }
    let _ = std::fs::remove_dir_all(base);
}
