//! `scale`: many scripts, fewer states. How often a request finds its script's state warm,
//! the throughput, and the daemon's resident memory when a skewed stream of requests goes
//! to far more distinct scripts than the daemon keeps states for.
//!
//! It writes `--scripts` distinct hello-world scripts (default 10,000) spread over
//! `--tenants` first-level directories (100) of a document root in a fresh temporary
//! directory, starts the real daemon (`luafcgid serve`) on a unix socket there with
//! `states = --states` (1,000), the default policy and the audit log to a file in the same
//! directory, and drives it directly over FastCGI: `--connections` keep-alive connections
//! (8), one thread and one request in flight each, taking turns through one request
//! sequence. The sequence is drawn before the run from a Zipf distribution of exponent
//! `--zipf` (1.0) over the scripts, with the scripts' popularity ranks shuffled so that the
//! popular ones are spread over the tenants; `--seed` makes it the same sequence every run.
//! First `--warmup` requests (1,000,000), then `--requests` measured ones (1,000,000). The
//! warm-up is that long because the pool ranks scripts by a popularity that halves every
//! 60 s (the daemon's `server::POPULARITY_HALF_LIFE`): until about one half-life of
//! requests has gone by, it is still learning which scripts to keep, the states of the
//! popular ones are young and their heaps still growing, and RSS climbs with them. The
//! report says when the warm-up was shorter than a half-life.
//!
//! Reported: the daemon's `VmRSS` when idle (before the first request), after the warm-up
//! and after every tenth of the measured requests (`--samples`), with `VmHWM` (peak) beside
//! it; the measured requests' rate, latency (p50/p99/p99.9, from writing a request to its
//! `END_REQUEST`) and the daemon's CPU time per request (`/proc/PID/stat`); and from the
//! audit log the warm-state hit rate (`state` `warm` against `new`, measured requests
//! only, and over the whole run) and the `state_evicted` events. Beside the hit rate, the
//! share of measured requests that went to the `states` most requested scripts: what a
//! pool keeping exactly those warm would hit. Each target of the memory budget is printed
//! with the figure measured against it; the exit status says only whether the run worked.
//!
//! It does not measure TCP, request bodies, scripts that change during the run, or a front
//! end. Bounded: at most 20 million requests (the sequence and the latencies are held in
//! memory), `--max-secs` (900) of load, after which the connections stop; every read times
//! out after 30 s. SIGINT, SIGTERM and SIGHUP stop the load the same way. The daemon is
//! killed by its PID (through its child handle) and the temporary directory removed on
//! every way out; if this program is killed outright, the kernel kills the daemon
//! (`PR_SET_PDEATHSIG`). Exit status 0 when every request was
//! answered 200, 1 when some were not or the run was cut short, 2 when it could not be set
//! up.
//!
//! Run: `scale --daemon target/release/luafcgid --requests 200000`

use std::fmt::Write as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Parser;
use luafcgid_bench::daemon::{
    build_request, count_states, daemon_binary, exchange, hello_scripts, load_average, toml_path,
    wait_for_requests, Daemon, StateCounts, TempDir,
};
use luafcgid_bench::epoll::{catch_interrupts, interrupted};
use luafcgid_bench::{process_cpu_time, process_memory, Resident};

/// Many distinct scripts, a skewed request stream, fewer states: hit rate, req/s, RSS.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The daemon binary (default: `luafcgid` next to this program).
    #[arg(long, value_name = "PATH")]
    daemon: Option<PathBuf>,
    /// Distinct hello-world scripts.
    #[arg(long, default_value_t = 10_000)]
    scripts: usize,
    /// First-level directories (tenants) the scripts are spread over.
    #[arg(long, default_value_t = 100)]
    tenants: usize,
    /// The daemon's `states`: all states, all scripts.
    #[arg(long, default_value_t = 1000)]
    states: usize,
    /// Measured requests, after the warm-up.
    #[arg(long, default_value_t = 1_000_000)]
    requests: u64,
    /// Requests before the measurement (not counted in req/s, latency or hit rate); best
    /// at least one popularity half-life (60 s) of them.
    #[arg(long, default_value_t = 1_000_000)]
    warmup: u64,
    /// Exponent of the Zipf distribution over the scripts (0: uniform).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Seed of the request sequence and of the popularity ranks.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep-alive connections, one thread and one request in flight each.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// RSS samples over the measured requests (one after each equal share).
    #[arg(long, default_value_t = 10)]
    samples: usize,
    /// Longest the load may run, in seconds; the connections stop then.
    #[arg(long, default_value_t = 900.0)]
    max_secs: f64,
    /// Lua worker threads of the daemon (default: the daemon's, one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// A top-level line added to the daemon's config, e.g. "memory_total = \"1GiB\""
    /// (repeatable).
    #[arg(long, value_name = "TOML")]
    config_line: Vec<String>,
}

/// Most requests (warm-up and measured) one run may send.
const MAX_REQUESTS: u64 = 20_000_000;
/// Most scripts one run may write.
const MAX_SCRIPTS: usize = 1_000_000;
/// How long a read or write on a connection may block.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the main thread looks at the progress, the daemon and the clock.
const POLL: Duration = Duration::from_millis(5);

fn main() {
    let args = Args::parse();
    if let Err(e) = validate(&args) {
        eprintln!("scale: {e}");
        std::process::exit(64);
    }
    luafcgid_bench::daemon::exit_with("scale", run(&args));
}

fn validate(args: &Args) -> Result<(), String> {
    if !(1..=MAX_SCRIPTS).contains(&args.scripts) {
        return Err(format!("--scripts must be between 1 and {MAX_SCRIPTS}"));
    }
    if !(1..=10_000).contains(&args.tenants) {
        return Err("--tenants must be between 1 and 10000".into());
    }
    if args.states == 0 {
        return Err("--states must be at least 1".into());
    }
    if args.requests == 0 || args.requests.saturating_add(args.warmup) > MAX_REQUESTS {
        return Err(format!(
            "--requests must be at least 1 and --warmup + --requests at most {MAX_REQUESTS}"
        ));
    }
    if !args.zipf.is_finite() || !(0.0..=10.0).contains(&args.zipf) {
        return Err("--zipf must be between 0 and 10".into());
    }
    if !(1..=256).contains(&args.connections) {
        return Err("--connections must be between 1 and 256".into());
    }
    if !(1..=1000).contains(&args.samples) {
        return Err("--samples must be between 1 and 1000".into());
    }
    if !args.max_secs.is_finite() || args.max_secs <= 0.0 || args.max_secs > 86_400.0 {
        return Err("--max-secs must be above 0 and at most 86400".into());
    }
    Ok(())
}

/// splitmix64: a small, fast generator; the same seed gives the same numbers everywhere.
#[derive(Debug)]
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }
}

/// The request sequence (script indexes) and, per script, its probability.
#[derive(Debug)]
struct Workload {
    sequence: Vec<u32>,
    probability: Vec<f64>,
}

/// Draws `len` script indexes from Zipf(`s`) over `scripts` ranks; rank `r` (0 the most
/// popular) is script `order[r]`, `order` a seeded shuffle.
fn workload(scripts: usize, s: f64, len: u64, seed: u64) -> Workload {
    let mut rng = SplitMix(seed);
    let mut order: Vec<usize> = (0..scripts).collect();
    for i in (1..scripts).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let weights: Vec<f64> = (1..=scripts).map(|r| (r as f64).powf(-s)).collect();
    let total: f64 = weights.iter().sum();
    let mut cumulative = Vec::with_capacity(scripts);
    let mut acc = 0.0;
    for w in &weights {
        acc += w / total;
        cumulative.push(acc);
    }
    let mut probability = vec![0.0; scripts];
    for (rank, w) in weights.iter().enumerate() {
        probability[order[rank]] = w / total;
    }
    let sequence = (0..len)
        .map(|_| {
            let u = rng.unit();
            let rank = cumulative.partition_point(|&c| c <= u).min(scripts - 1);
            order[rank] as u32
        })
        .collect();
    Workload {
        sequence,
        probability,
    }
}

/// The share of `sequence` that went to its `k` most frequent scripts.
fn top_share(sequence: &[u32], scripts: usize, k: usize) -> f64 {
    if sequence.is_empty() {
        return 0.0;
    }
    let mut counts = vec![0u64; scripts];
    for &s in sequence {
        counts[s as usize] += 1;
    }
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let top: u64 = counts.iter().take(k).sum();
    top as f64 / sequence.len() as f64
}

/// One reading of the daemon.
/// The daemon's `server::POPULARITY_HALF_LIFE`, in seconds.
const POPULARITY_HALF_LIFE_SECS: f64 = 60.0;

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Requests completed when it was taken.
    done: u64,
    at: Duration,
    memory: Resident,
    cpu: Duration,
}

/// What the connection threads share.
#[derive(Debug)]
struct Shared {
    next: AtomicU64,
    done: AtomicU64,
    stop: AtomicBool,
    finished: AtomicUsize,
    errors: Mutex<Vec<String>>,
    error_count: AtomicU64,
}

/// Most error messages kept (the count is kept in full).
const ERRORS_KEPT: usize = 20;

impl Shared {
    fn error(&self, message: String) {
        self.error_count.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.errors.lock() {
            if e.len() < ERRORS_KEPT {
                e.push(message);
            }
        }
    }
}

/// One connection's loop: takes the next request of the sequence until none is left or
/// the run stops. Returns the latencies (µs) of its measured requests.
fn connection(
    socket: &Path,
    requests: &[Vec<u8>],
    sequence: &[u32],
    warmup: u64,
    shared: &Shared,
) -> Vec<u32> {
    let mut latencies = Vec::new();
    let connect = || -> Result<UnixStream, String> {
        let s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| format!("socket: {e}"))?;
        Ok(s)
    };
    let mut stream = match connect() {
        Ok(s) => s,
        Err(e) => {
            shared.error(e);
            return latencies;
        }
    };
    let (mut buf, mut head) = (Vec::new(), Vec::new());
    while !shared.stop.load(Ordering::Relaxed) {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        let Some(&script) = sequence.get(i as usize) else {
            break;
        };
        let started = Instant::now();
        let outcome = exchange(&mut stream, &requests[script as usize], &mut buf, &mut head);
        let took = started.elapsed();
        shared.done.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(200) => {
                if i >= warmup {
                    latencies.push(took.as_micros().min(u128::from(u32::MAX)) as u32);
                }
            }
            Ok(status) => shared.error(format!("script {script}: status {status}")),
            Err(e) => {
                shared.error(format!("script {script}: {e}"));
                buf.clear();
                match connect() {
                    Ok(s) => stream = s,
                    Err(e) => {
                        shared.error(e);
                        break;
                    }
                }
            }
        }
    }
    latencies
}

fn run(args: &Args) -> Result<bool, String> {
    catch_interrupts().map_err(|e| format!("cannot catch signals: {e}"))?;
    let binary = daemon_binary(args.daemon.as_deref())?;
    let dir = TempDir::create("luafcgid-scale")?;
    let www = dir.path().join("www");
    std::fs::create_dir(&www).map_err(|e| format!("{}: {e}", www.display()))?;
    let written = Instant::now();
    let scripts = hello_scripts(&www, args.scripts, args.tenants)?;
    let written = written.elapsed();
    let socket = dir.path().join("luafcgid.sock");
    let log = dir.path().join("audit.jsonl");
    let config = dir.path().join("luafcgid.toml");
    let mut text = String::new();
    let _ = writeln!(text, "listen = [{}]", toml_path(&socket)?);
    let _ = writeln!(text, "docroot = [{}]", toml_path(&www)?);
    let _ = writeln!(text, "states = {}", args.states);
    if let Some(w) = args.workers {
        let _ = writeln!(text, "workers = {w}");
    }
    for line in &args.config_line {
        let _ = writeln!(text, "{line}");
    }
    std::fs::write(&config, &text).map_err(|e| format!("{}: {e}", config.display()))?;

    let total = args.warmup + args.requests;
    let drawn = Instant::now();
    let load = workload(args.scripts, args.zipf, total, args.seed);
    let requests: Vec<Vec<u8>> = scripts
        .iter()
        .map(|p| build_request(p, &www, "", true))
        .collect();
    let drawn = drawn.elapsed();
    let measured_seq = &load.sequence[args.warmup as usize..];
    let ideal = top_share(measured_seq, args.scripts, args.states);
    let mut by_probability = load.probability.clone();
    by_probability.sort_unstable_by(|a, b| b.total_cmp(a));
    let expected_ideal: f64 = by_probability.iter().take(args.states).sum();

    let mut daemon = Daemon::start(&binary, &config, &log, &dir.path().join("stderr.log"))?;
    daemon.wait_ready(&socket)?;
    let pid = daemon.pid().to_string();
    let read = |done: u64, at: Duration| -> Result<Sample, String> {
        Ok(Sample {
            done,
            at,
            memory: process_memory(&pid).map_err(|e| format!("daemon memory: {e}"))?,
            cpu: process_cpu_time(&pid).map_err(|e| format!("daemon CPU time: {e}"))?,
        })
    };

    println!(
        "scale: {} scripts in {} tenant directories (written in {:.1} s), states = {}, Zipf s = {:.2}, seed {}, {} keep-alive connections on a unix socket",
        args.scripts,
        args.tenants.min(args.scripts),
        written.as_secs_f64(),
        args.states,
        args.zipf,
        args.seed,
        args.connections
    );
    println!(
        "requests: {} warm-up + {} measured (sequence drawn in {:.1} s); daemon pid {}, {}; load average {}",
        args.warmup,
        args.requests,
        drawn.as_secs_f64(),
        pid,
        args.workers
            .map_or_else(|| "default workers".to_string(), |w| format!("workers = {w}")),
        load_average()
    );

    let started = Instant::now();
    let idle = read(0, Duration::ZERO)?;
    print_sample_head(&idle);
    let shared = Shared {
        next: AtomicU64::new(0),
        done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        finished: AtomicUsize::new(0),
        errors: Mutex::new(Vec::new()),
        error_count: AtomicU64::new(0),
    };
    let checkpoints: Vec<u64> = std::iter::once(args.warmup)
        .chain(
            (1..=args.samples as u64)
                .map(|k| args.warmup + args.requests * k / args.samples as u64),
        )
        .collect();
    let mut samples: Vec<Sample> = Vec::new();
    let mut cut_short = None;
    let latencies: Vec<u32> = std::thread::scope(|scope| -> Result<Vec<u32>, String> {
        let handles: Vec<_> = (0..args.connections)
            .map(|_| {
                let (socket, requests, sequence, shared) =
                    (&socket, &requests[..], &load.sequence[..], &shared);
                scope.spawn(move || {
                    let l = connection(socket, requests, sequence, args.warmup, shared);
                    shared.finished.fetch_add(1, Ordering::Relaxed);
                    l
                })
            })
            .collect();
        let limit = Duration::from_secs_f64(args.max_secs);
        let mut next_check = 0;
        let mut last_alive = Instant::now();
        loop {
            let done = shared.done.load(Ordering::Relaxed);
            while next_check < checkpoints.len() && done >= checkpoints[next_check] {
                let sample = read(done, started.elapsed())?;
                print_sample(
                    &sample,
                    samples.last().unwrap_or(&idle),
                    args.warmup,
                    samples.is_empty(),
                );
                samples.push(sample);
                next_check += 1;
            }
            if shared.finished.load(Ordering::Relaxed) == args.connections {
                break;
            }
            if interrupted() && cut_short.is_none() {
                cut_short = Some("interrupted by a signal".to_string());
                shared.stop.store(true, Ordering::Relaxed);
            }
            if started.elapsed() > limit && cut_short.is_none() {
                cut_short = Some(format!("stopped after --max-secs {}", args.max_secs));
                shared.stop.store(true, Ordering::Relaxed);
            }
            if last_alive.elapsed() > Duration::from_millis(200) {
                last_alive = Instant::now();
                if let Err(e) = daemon.check_alive() {
                    cut_short = Some(e);
                    shared.stop.store(true, Ordering::Relaxed);
                }
            }
            std::thread::sleep(POLL);
        }
        let mut all = Vec::new();
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| "a connection thread panicked".to_string())?,
            );
        }
        Ok(all)
    })?;
    let done = shared.done.load(Ordering::Relaxed);
    let end = read(done, started.elapsed())?;
    if samples.last().is_none_or(|s| s.done < done) {
        print_sample(
            &end,
            samples.last().unwrap_or(&idle),
            args.warmup,
            samples.is_empty(),
        );
        samples.push(end);
    }

    let logged = wait_for_requests(&log, done, Duration::from_secs(10))?;
    let measured_states = count_states(&log, args.warmup)?;
    let all_states = count_states(&log, 0)?;

    let errors = shared.error_count.load(Ordering::Relaxed);
    let report = Report {
        args,
        idle,
        samples: &samples,
        end,
        latencies,
        errors,
        error_examples: shared.errors.lock().map(|e| e.clone()).unwrap_or_default(),
        logged,
        done,
        measured_states,
        all_states,
        ideal,
        expected_ideal,
    };
    report.print();
    if let Some(why) = &cut_short {
        println!("run cut short: {why}");
    }
    println!("load average at end: {}", load_average());
    Ok(cut_short.is_none() && errors == 0 && done == total)
}

/// Prints the head of the table of samples.
fn print_sample_head(idle: &Sample) {
    println!();
    println!(
        "daemon memory, idle (before any request): RSS {:.1} MiB",
        idle.memory.rss as f64 / MIB
    );
    println!(
        "{:>22} {:>11} {:>9} {:>9} {:>10} {:>12}",
        "after", "requests", "RSS MiB", "peak MiB", "req/s", "CPU µs/req"
    );
}

/// Prints one sample, as it is taken: figures since `prev`.
fn print_sample(s: &Sample, prev: &Sample, warmup: u64, first: bool) {
    let label = if first && warmup > 0 && s.done >= warmup {
        "warm-up".to_string()
    } else {
        format!("{} measured", s.done.saturating_sub(warmup))
    };
    let n = s.done.saturating_sub(prev.done);
    let secs = s.at.saturating_sub(prev.at).as_secs_f64();
    let cpu = s.cpu.saturating_sub(prev.cpu).as_secs_f64();
    println!(
        "{:>22} {:>11} {:>9.1} {:>9.1} {:>10.0} {:>12.2}",
        label,
        s.done,
        s.memory.rss as f64 / MIB,
        s.memory.peak as f64 / MIB,
        n as f64 / secs.max(1e-9),
        cpu * 1e6 / (n.max(1) as f64)
    );
}

/// Everything measured, for printing.
#[derive(Debug)]
struct Report<'a> {
    args: &'a Args,
    idle: Sample,
    samples: &'a [Sample],
    end: Sample,
    latencies: Vec<u32>,
    errors: u64,
    error_examples: Vec<String>,
    logged: u64,
    done: u64,
    measured_states: StateCounts,
    all_states: StateCounts,
    ideal: f64,
    expected_ideal: f64,
}

const MIB: f64 = 1024.0 * 1024.0;

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1])
}

impl Report<'_> {
    fn print(mut self) {
        let args = self.args;
        self.latencies.sort_unstable();
        let measured = self.latencies.len() as u64;
        let after_warmup = self
            .samples
            .iter()
            .find(|s| s.done >= args.warmup)
            .copied()
            .unwrap_or(self.idle);
        let secs = self.end.at.saturating_sub(after_warmup.at).as_secs_f64();
        let n = self.end.done.saturating_sub(after_warmup.done);
        let cpu = self.end.cpu.saturating_sub(after_warmup.cpu).as_secs_f64();
        println!();
        println!(
            "measured: {} requests answered 200 in {:.1} s: {:.0} req/s; latency µs p50 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}; daemon CPU {:.2} µs/request",
            measured,
            secs,
            n as f64 / secs.max(1e-9),
            percentile(&self.latencies, 50.0),
            percentile(&self.latencies, 99.0),
            percentile(&self.latencies, 99.9),
            percentile(&self.latencies, 100.0),
            cpu * 1e6 / (n.max(1) as f64)
        );
        println!(
            "errors: {} (requests sent {}, audit log request lines {})",
            self.errors, self.done, self.logged
        );
        for e in &self.error_examples {
            println!("    {e}");
        }
        let m = self.measured_states;
        let a = self.all_states;
        println!(
            "warm-state hit rate (audit log `state`), measured requests: {:.2}% (warm {}, new {}); whole run: {:.2}% (warm {}, new {}); state_evicted during the measurement: {}",
            100.0 * m.hit_rate(),
            m.warm,
            m.new,
            100.0 * a.hit_rate(),
            a.warm,
            a.new,
            m.evicted
        );
        println!(
            "share of the measured requests to the {} most requested scripts: {:.2}% (the distribution's: {:.2}%)",
            args.states,
            100.0 * self.ideal,
            100.0 * self.expected_ideal
        );
        let warm_secs = after_warmup.at.saturating_sub(self.idle.at).as_secs_f64();
        println!(
            "warm-up: {} requests in {:.1} s{}",
            after_warmup.done,
            warm_secs,
            if warm_secs < POPULARITY_HALF_LIFE_SECS {
                format!(
                    ", less than the pool's popularity half-life ({POPULARITY_HALF_LIFE_SECS:.0} s): it may still be learning which scripts to keep, and RSS still growing with their states (a longer `--warmup` gives the steady state)"
                )
            } else {
                String::new()
            }
        );
        let base = after_warmup.memory.rss as f64;
        let change = if base > 0.0 {
            100.0 * (self.end.memory.rss as f64 - base) / base
        } else {
            0.0
        };
        let (lo, hi) = self
            .samples
            .iter()
            .filter(|s| s.done >= args.warmup)
            .fold((u64::MAX, 0u64), |(lo, hi), s| {
                (lo.min(s.memory.rss), hi.max(s.memory.rss))
            });
        println!(
            "target RSS flat (±5%) after warm-up: {:.1} MiB after warm-up, {:.1} MiB at the end ({:+.1}%), range {:.1}–{:.1} MiB over {} measured requests: {}",
            base / MIB,
            self.end.memory.rss as f64 / MIB,
            change,
            lo as f64 / MIB,
            hi as f64 / MIB,
            measured,
            if change.abs() <= 5.0 { "within" } else { "outside" }
        );
        println!(
            "target RSS ≤ 256 MiB with {} scripts, states = {}: peak (VmHWM) {:.1} MiB, at the end {:.1} MiB: {}",
            args.scripts,
            args.states,
            self.end.memory.peak as f64 / MIB,
            self.end.memory.rss as f64 / MIB,
            if self.end.memory.peak as f64 <= 256.0 * MIB {
                "within"
            } else {
                "over"
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_depends_only_on_the_seed() {
        let a = workload(1000, 1.0, 5000, 7);
        let b = workload(1000, 1.0, 5000, 7);
        let c = workload(1000, 1.0, 5000, 8);
        assert_eq!(a.sequence, b.sequence);
        assert_ne!(a.sequence, c.sequence);
        assert!(a.sequence.iter().all(|&s| s < 1000));
    }

    #[test]
    fn zipf_skews_and_zero_is_uniform() {
        // Zipf(1) over 1000 ranks: the top 100 carry H(100)/H(1000) = 69.3% of the mass.
        let skewed = workload(1000, 1.0, 200_000, 1);
        let share = top_share(&skewed.sequence, 1000, 100);
        assert!((share - 0.693).abs() < 0.01, "{share}");
        let expected: f64 = {
            let mut p = skewed.probability.clone();
            p.sort_unstable_by(|a, b| b.total_cmp(a));
            p.iter().take(100).sum()
        };
        assert!((expected - 0.693).abs() < 0.001, "{expected}");
        let uniform = workload(1000, 0.0, 200_000, 1);
        let share = top_share(&uniform.sequence, 1000, 100);
        assert!(share < 0.12, "{share}");
    }

    #[test]
    fn bad_flags_are_refused_with_their_name() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["scale"];
            argv.extend_from_slice(extra);
            validate(&Args::parse_from(argv))
        };
        assert!(parse(&[]).is_ok());
        assert!(parse(&["--scripts", "0"])
            .unwrap_err()
            .contains("--scripts"));
        assert!(parse(&["--connections", "0"])
            .unwrap_err()
            .contains("--connections"));
        assert!(parse(&["--zipf", "NaN"]).unwrap_err().contains("--zipf"));
        assert!(parse(&["--requests", "30000000"])
            .unwrap_err()
            .contains("--requests"));
        assert!(parse(&["--max-secs", "0"])
            .unwrap_err()
            .contains("--max-secs"));
    }
}
