//! `memory`: what a warm hello-world state costs the daemon in resident memory, against a
//! bare Lua state.
//!
//! The daemon: it writes `--states` distinct hello-world scripts (default 1,000) spread
//! over `--tenants` first-level directories (10) of a document root in a fresh temporary
//! directory, plus `base.lua`, and starts the real daemon (`luafcgid serve`) on a unix socket
//! there with `states` large enough that none is evicted, `clones = 1` (so each script has
//! exactly one state), the default policy otherwise and the audit log to a file in the same
//! directory. It reads the daemon's `VmRSS` idle (started, no request yet), after one
//! request to `base.lua` (the runtime's first-request allocations done), after one request
//! to each of the scripts (each now holds a warm state), and after each further pass over
//! them all (`--passes`, default 2 in all; the audit log must show those served `warm`, by
//! the states of the first pass). Per warm state: (RSS after the first pass − RSS after
//! `base.lua`) / scripts, and the same after the last pass, when each state has served
//! `--passes` requests and holds their garbage until Lua's collector frees it. The audit
//! log's `memory` (the state's peak Lua heap during a request) of the second and of the
//! last pass is reported too.
//!
//! A bare Lua state, in this process: `mlua::Lua::new()` (all safe standard libraries) and
//! a state with the daemon's default libraries (string, table, math, utf8, coroutine, os)
//! and nothing else: the Lua heap of one (`used_memory`), and this process's RSS growth
//! per state over as many of each, all kept alive. The difference between the daemon's RSS
//! per warm state and the bare state's RSS per state is what the sandbox, the script and
//! the daemon's bookkeeping add; it is printed against the target of 64 KiB.
//!
//! It does not measure states under load, request garbage over many requests (the scale
//! benchmark does), or other scripts than hello world. Requests go one at a time on one
//! connection; reads time out after 30 s. SIGINT, SIGTERM and SIGHUP end the run between
//! two requests. The daemon is killed by its PID (through its child handle) and the
//! temporary directory removed on every way out; if this program is killed outright, the
//! kernel kills the daemon (`PR_SET_PDEATHSIG`). Exit status 0 when
//! every request was answered 200 and every pass after the first all warm, 1 otherwise, 2 when the
//! run could not be set up.
//!
//! Run: `memory --daemon target/release/luafcgid`

use std::fmt::Write as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use luafcgid_bench::daemon::{
    build_request, count_states, daemon_binary, exchange, hello_scripts, load_average, toml_path,
    wait_for_requests, Daemon, TempDir,
};
use luafcgid_bench::epoll::{catch_interrupts, interrupted};
use luafcgid_bench::{process_memory, Resident};

/// Resident memory of the daemon idle and per warm hello-world state, against a bare Lua state.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The daemon binary (default: `luafcgid` next to this program).
    #[arg(long, value_name = "PATH")]
    daemon: Option<PathBuf>,
    /// Distinct scripts, hence warm states (and bare states in this process).
    #[arg(long, default_value_t = 1000)]
    states: usize,
    /// First-level directories (tenants) the scripts are spread over.
    #[arg(long, default_value_t = 10)]
    tenants: usize,
    /// Requests to each script, one per pass over them all (at least 2).
    #[arg(long, default_value_t = 2)]
    passes: usize,
    /// Lua worker threads of the daemon (default: the daemon's, one per CPU).
    #[arg(long)]
    workers: Option<usize>,
}

/// Most states one run may ask for.
const MAX_STATES: usize = 100_000;
/// How long a read or write on the connection may block.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const KIB: f64 = 1024.0;
const MIB: f64 = 1024.0 * 1024.0;
/// The target: a warm hello-world state may cost this much beyond a bare Lua state.
const TARGET_BEYOND_BARE: f64 = 64.0 * KIB;

fn main() {
    let args = Args::parse();
    if !(1..=MAX_STATES).contains(&args.states) {
        eprintln!("memory: --states must be between 1 and {MAX_STATES}");
        std::process::exit(64);
    }
    if !(2..=10_000).contains(&args.passes) {
        eprintln!("memory: --passes must be between 2 and 10000");
        std::process::exit(64);
    }
    if !(1..=10_000).contains(&args.tenants) {
        eprintln!("memory: --tenants must be between 1 and 10000");
        std::process::exit(64);
    }
    luafcgid_bench::daemon::exit_with("memory", run(&args));
}

/// A bare state's figures: its Lua heap, and this process's RSS growth per state.
#[derive(Debug, Clone, Copy)]
struct Bare {
    heap: usize,
    rss_per_state: f64,
}

/// Creates `n` states with `make` and measures them. They are returned so that they stay
/// alive while the next ones are measured (freed memory would be reused and hide growth).
fn bare_states(n: usize, make: impl Fn() -> mlua::Lua) -> Result<(Bare, Vec<mlua::Lua>), String> {
    let own = || process_memory("self").map_err(|e| format!("own memory: {e}"));
    let heap = make().used_memory();
    let before = own()?;
    let states: Vec<mlua::Lua> = (0..n).map(|_| make()).collect();
    let after = own()?;
    Ok((
        Bare {
            heap,
            rss_per_state: after.rss.saturating_sub(before.rss) as f64 / n as f64,
        },
        states,
    ))
}

fn default_libs_state() -> mlua::Lua {
    mlua::Lua::new_with(
        mlua::StdLib::STRING
            | mlua::StdLib::TABLE
            | mlua::StdLib::MATH
            | mlua::StdLib::UTF8
            | mlua::StdLib::COROUTINE
            | mlua::StdLib::OS,
        mlua::LuaOptions::default(),
    )
    .expect("a Lua state with the standard libraries")
}

/// The median of the audit log's `memory` field over `take` `request` lines after the
/// first `skip`.
fn median_request_memory(
    log: &std::path::Path,
    skip: usize,
    take: usize,
) -> Result<Option<u64>, String> {
    let text = std::fs::read_to_string(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut values: Vec<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "request")
        .skip(skip)
        .take(take)
        .filter_map(|v| v["memory"].as_u64())
        .collect();
    values.sort_unstable();
    Ok(values.get(values.len() / 2).copied())
}

fn run(args: &Args) -> Result<bool, String> {
    catch_interrupts().map_err(|e| format!("cannot catch signals: {e}"))?;
    let binary = daemon_binary(args.daemon.as_deref())?;
    let n = args.states;

    // Bare states first, before this process holds anything else of size.
    let (bare_all, kept_all) = bare_states(n, mlua::Lua::new)?;
    let (bare, kept) = bare_states(n, default_libs_state)?;

    let dir = TempDir::create("luafcgid-memory")?;
    let www = dir.path().join("www");
    std::fs::create_dir(&www).map_err(|e| format!("{}: {e}", www.display()))?;
    let scripts = hello_scripts(&www, n, args.tenants)?;
    let base = www.join("base.lua");
    std::fs::write(
        &base,
        "s = \"Hello World\"\nfunction handler() return s end\n",
    )
    .map_err(|e| format!("{}: {e}", base.display()))?;
    let socket = dir.path().join("luafcgid.sock");
    let log = dir.path().join("audit.jsonl");
    let config = dir.path().join("luafcgid.toml");
    let mut text = String::new();
    let _ = writeln!(text, "listen = [{}]", toml_path(&socket)?);
    let _ = writeln!(text, "docroot = [{}]", toml_path(&www)?);
    let _ = writeln!(text, "states = {}", n + 16);
    if let Some(w) = args.workers {
        let _ = writeln!(text, "workers = {w}");
    }
    let _ = writeln!(text, "[defaults]\nclones = 1");
    std::fs::write(&config, &text).map_err(|e| format!("{}: {e}", config.display()))?;

    let mut daemon = Daemon::start(&binary, &config, &log, &dir.path().join("stderr.log"))?;
    daemon.wait_ready(&socket)?;
    let pid = daemon.pid().to_string();
    let read = || process_memory(&pid).map_err(|e| format!("daemon memory: {e}"));
    let idle = read()?;

    let mut stream = UnixStream::connect(&socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("socket: {e}"))?;
    let (mut buf, mut head) = (Vec::new(), Vec::new());
    let mut failures: Vec<String> = Vec::new();
    let mut ask = |path: &std::path::Path, failures: &mut Vec<String>| -> Result<(), String> {
        if interrupted() {
            return Err("interrupted by a signal".into());
        }
        let request = build_request(path, &www, "", true);
        match exchange(&mut stream, &request, &mut buf, &mut head) {
            Ok(200) => {}
            Ok(status) => failures.push(format!("{}: status {status}", path.display())),
            Err(e) => failures.push(format!("{}: {e}", path.display())),
        }
        Ok(())
    };
    ask(&base, &mut failures)?;
    let one = read()?;
    for s in &scripts {
        ask(s, &mut failures)?;
    }
    let first_pass = read()?;
    for s in &scripts {
        ask(s, &mut failures)?;
    }
    let second_pass = read()?;
    for _ in 2..args.passes {
        for s in &scripts {
            ask(s, &mut failures)?;
        }
    }
    let last_pass = read()?;
    daemon.check_alive()?;

    let sent = 1 + (args.passes * n) as u64;
    let logged = wait_for_requests(&log, sent, Duration::from_secs(10))?;
    let second = count_states(&log, 1 + n as u64)?;
    let heap = median_request_memory(&log, 1 + n, n)?;
    let heap_last = median_request_memory(&log, 1 + (args.passes - 1) * n, n)?;

    let per_state = first_pass.rss.saturating_sub(one.rss) as f64 / n as f64;
    let beyond = per_state - bare.rss_per_state;
    let show = |label: &str, m: Resident| {
        println!(
            "  {label:<44} RSS {:>7.1} MiB  (peak {:.1} MiB)",
            m.rss as f64 / MIB,
            m.peak as f64 / MIB
        );
    };
    println!(
        "memory: {n} distinct hello-world scripts in {} tenant directories, clones = 1, states = {}; daemon pid {pid}; load average {}",
        args.tenants.min(n),
        n + 16,
        load_average()
    );
    println!("daemon:");
    show("idle (started, no request)", idle);
    show("after one request (base.lua)", one);
    show(
        &format!("after one request to each of {n} scripts"),
        first_pass,
    );
    show("after a second pass over them", second_pass);
    if args.passes > 2 {
        show(&format!("after {} passes", args.passes), last_pass);
    }
    println!(
        "  per warm state: {:.1} KiB of RSS ((after the first pass − after one request) / {n})",
        per_state / KIB
    );
    println!(
        "  passes after the first: {} of {} requests served by a warm state (audit log `state`)",
        second.warm, second.requests,
    );
    let kib = |h: Option<u64>| h.map_or("-".to_string(), |h| format!("{:.1} KiB", h as f64 / KIB));
    println!(
        "  median Lua heap peak during a request (audit `memory`): {} in the second pass, {} in pass {}",
        kib(heap),
        kib(heap_last),
        args.passes
    );
    if args.passes > 2 {
        println!(
            "  per warm state after {} requests each: {:.1} KiB of RSS",
            args.passes,
            last_pass.rss.saturating_sub(one.rss) as f64 / n as f64 / KIB
        );
    }
    println!("bare Lua states in this process ({n} of each, kept alive):");
    println!(
        "  mlua::Lua::new() (all safe libraries):       heap {:.1} KiB, RSS {:.1} KiB per state",
        bare_all.heap as f64 / KIB,
        bare_all.rss_per_state / KIB
    );
    println!(
        "  the daemon's default libraries only:         heap {:.1} KiB, RSS {:.1} KiB per state",
        bare.heap as f64 / KIB,
        bare.rss_per_state / KIB
    );
    println!(
        "target ≤ 64 KiB per warm hello-world state beyond a bare Lua state: {:.1} KiB − {:.1} KiB = {:.1} KiB: {}",
        per_state / KIB,
        bare.rss_per_state / KIB,
        beyond / KIB,
        if beyond <= TARGET_BEYOND_BARE {
            "within"
        } else {
            "over"
        }
    );
    println!(
        "requests sent {sent}, audit log request lines {logged}, failures {}",
        failures.len()
    );
    for f in failures.iter().take(10) {
        println!("    {f}");
    }
    drop((kept_all, kept));
    Ok(failures.is_empty() && second.warm == ((args.passes - 1) * n) as u64 && logged >= sent)
}
