//! Operating the daemon from its binary: SIGHUP reloads the configuration and SIGTERM
//! drains, both while clients keep sending requests; accept errors when descriptors run
//! out are waited out and served through afterwards.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::{
    audit_lines, params_for, requests, wait_for_event, write, Client, Health, Load, Process, BOUND,
};

/// Runs `luafcgid serve` with `config` until it exits by itself (it must refuse to start).
fn serve_to_the_end(sock: &Path, docroot: &Path, config: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_luafcgid"))
        .args(["serve", "--listen"])
        .arg(sock)
        .arg("--docroot")
        .arg(docroot)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn hello_path(p: &Process) -> String {
    p.root.join("hello.lua").display().to_string()
}

#[test]
fn sighup_reloads_the_config_under_load_without_dropping_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let config: PathBuf = dir.path().join("luafcgid.toml");
    write(&config, "headers = [\"X-Generation: one\"]\n");
    let p = Process::start_with_config(dir.path(), &log, &config);
    let load = Load::start(&p.sock, &hello_path(&p), 4, 1);
    load.wait_for("answers", |r| r.iter().flatten().count() >= 50);

    write(&config, "headers = [\"X-Generation: two\"]\n");
    p.signal("HUP");
    load.wait_for("the reloaded header on every keep-alive connection", |r| {
        r.iter().all(|c| {
            c.last()
                .and_then(|s| s.answer.as_ref())
                .is_some_and(|a| a.2.as_deref() == Some("two"))
        })
    });
    wait_for_event(&log, "config_loaded");

    // A config that does not validate is refused; the running one stays.
    write(&config, "workers = \"many\"\n");
    p.signal("HUP");
    wait_for_event(&log, "config_rejected");
    let before = load.answered();
    load.wait_for("answers after the refused reload", |r| {
        r.iter().flatten().filter(|s| s.answer.is_some()).count() >= before + 50
    });

    let sent = load.finish();
    for (i, conn) in sent.iter().enumerate() {
        let mut seen_two = false;
        for s in conn {
            let (status, body, generation) = s.answer.as_ref().unwrap_or_else(|| {
                panic!("client {i}: a request went unanswered across the reload")
            });
            assert_eq!((*status, body.as_str()), (200, "Hello World"));
            match generation.as_deref() {
                Some("one") => assert!(!seen_two, "client {i}: back to the old config"),
                Some("two") => seen_two = true,
                other => panic!("client {i}: X-Generation {other:?}"),
            }
        }
        assert!(seen_two, "client {i} never saw the reloaded config");
    }
    let answered: usize = sent.iter().map(Vec::len).sum();
    let stderr = p.stop();
    assert!(stderr.contains("reload refused"), "{stderr}");
    // Every line, the reload's events among them, as docs/audit-log.md documents them.
    let lines = crate::audit::check_file(&crate::audit::schema(), &log);
    assert_eq!(
        requests(&lines).len(),
        answered,
        "one audit line per request"
    );
    let rejected = lines
        .iter()
        .find(|l| l["event"] == "config_rejected")
        .unwrap();
    assert!(
        rejected["message"]
            .as_str()
            .unwrap()
            .contains("luafcgid.toml:1: invalid type"),
        "{rejected}"
    );
}

#[test]
fn sighup_keeps_keys_that_need_a_restart_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let config: PathBuf = dir.path().join("luafcgid.toml");
    write(&config, "max_connections = 100\n");
    let p = Process::start_with_config(dir.path(), &log, &config);
    p.hello();
    write(&config, "max_connections = 50\n");
    p.signal("HUP");
    wait_for_event(&log, "config_loaded");
    p.hello();
    let lines = audit_lines(&log);
    let loaded = lines
        .iter()
        .find(|l| l["event"] == "config_loaded")
        .unwrap();
    assert_eq!(
        loaded["restart_needed"],
        serde_json::json!(["max_connections"])
    );
    let stderr = p.stop();
    assert!(stderr.contains("`max_connections` changed"), "{stderr}");
}

#[test]
fn sigterm_under_load_answers_every_request_sent_before_it() {
    // Each round is a fresh daemon signalled at a different moment of its load.
    for _ in 0..4 {
        sigterm_round();
    }
}

fn sigterm_round() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let p = Process::start(dir.path(), &log);
    // Slow enough that requests are in Lua and queued when the signal comes.
    let slow = p.root.join("slow.lua");
    write(
        &slow,
        "function handler() local x = 0 for i = 1, 100000 do x = x + i end return 'done' end",
    );
    let load = Load::start(&p.sock, &slow.display().to_string(), 8, 8);
    load.wait_for("answers", |r| {
        r.iter().flatten().filter(|s| s.answer.is_some()).count() >= 30
    });
    let signalled = Instant::now();
    let sock = p.sock.clone();
    let stderr = p.stop();
    let sent = load.finish();
    let mut before = 0;
    for s in sent.iter().flatten() {
        if s.written < signalled {
            before += 1;
            let (status, body, _) = s
                .answer
                .as_ref()
                .expect("a request sent before SIGTERM went unanswered");
            assert_eq!((*status, body.as_str()), (200, "done"));
        }
    }
    assert!(before >= 30);
    assert!(!sock.exists(), "{stderr}");
    let answered = sent.iter().flatten().filter(|s| s.answer.is_some()).count();
    let lines = audit_lines(&log);
    let logged = requests(&lines);
    let ok = logged.iter().filter(|l| l["outcome"] == "ok").count();
    assert_eq!(ok, answered, "every answered request has its line");
    assert_eq!(lines.last().unwrap()["event"], "stop");
}

#[test]
fn sigterm_closes_an_idle_keep_alive_connection_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let config: PathBuf = dir.path().join("luafcgid.toml");
    // Far beyond the test's bound: only a connection that ends by itself lets it pass.
    write(
        &config,
        "shutdown_timeout_ms = 120000\nidle_timeout_ms = 120000\n",
    );
    let p = Process::start_with_config(dir.path(), &log, &config);
    let hello = p.root.join("hello.lua");
    write(&hello, "function handler() return 'hi' end");
    let idle = UnixStream::connect(&p.sock).unwrap();
    let mut client = Client::new(Box::new(idle.try_clone().unwrap()));
    let params = params_for(&hello.display().to_string(), "GET", &[]);
    client.send(&Client::encode(1, true, &params, b""));
    assert_eq!(client.response(1).status, 200);
    let signalled = Instant::now();
    p.stop();
    assert!(signalled.elapsed() < BOUND / 2, "{:?}", signalled.elapsed());
    idle.set_read_timeout(Some(BOUND)).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut &idle, &mut byte).unwrap(),
        0,
        "closed"
    );
}

#[test]
fn accept_errors_when_descriptors_run_out_back_off_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    // A hard limit the daemon cannot raise.
    let p = Process::start_with(dir.path(), &log, |argv| {
        let mut c = std::process::Command::new("sh");
        c.arg("-c")
            .arg("ulimit -n 64 && exec \"$@\"")
            .arg("sh")
            .args(argv);
        c
    });
    p.hello();
    let before = Health::of(&p);
    let base_ticks = p.cpu_ticks();
    // Far more connections than descriptors: the daemon takes what it can, the rest wait
    // in its backlog while its accepts fail.
    let mut held: Vec<Client> = (0..120)
        .map(|_| Client::new(Box::new(UnixStream::connect(&p.sock).unwrap())))
        .collect();
    let t = Instant::now();
    while !std::fs::read_to_string(&p.stderr)
        .unwrap()
        .contains("accept on")
    {
        assert!(t.elapsed() < BOUND, "no accept error was reported");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A second of exhaustion: back-off, not a busy loop (which would take ~100 ticks).
    std::thread::sleep(Duration::from_secs(1));
    let spent = p.cpu_ticks() - base_ticks;
    assert!(spent < 30, "{spent} ticks while descriptors were exhausted");
    let warnings = std::fs::read_to_string(&p.stderr)
        .unwrap()
        .matches("accept on")
        .count();
    assert!(
        warnings < 100,
        "{warnings} accept warnings in about a second"
    );

    // A connection it took is answered: 503 with Retry-After while the script cannot be
    // opened (a passing shortage, not a 403 that would be cached); once the other
    // connections go, new ones are served.
    let hello = hello_path(&p);
    let r = held[0].get(&hello);
    assert_eq!((r.status, r.header("Retry-After")), (503, Some("1")));
    held.truncate(1);
    drop(held);
    let t = Instant::now();
    loop {
        let mut c = Client::new(Box::new(UnixStream::connect(&p.sock).unwrap()));
        c.try_send(&Client::encode(
            1,
            false,
            &params_for(&hello, "GET", &[]),
            b"",
        ))
        .unwrap();
        if let Some(r) = c.try_response(1) {
            assert_eq!(r.text(), "Hello World");
            break;
        }
        assert!(t.elapsed() < BOUND, "the daemon did not recover");
    }
    before.assert_recovered(&p, 16 * 1024);
    p.stop();
}

#[test]
fn listens_on_a_socket_handed_over_by_systemd_and_leaves_it_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    // systemd's own tool binds the daemon's `--listen` path itself, then runs the daemon
    // with it as descriptor 3 (LISTEN_FDS=1) on the first connection. Were the daemon to
    // bind `--listen` too, it would find the path in use and refuse to start.
    let p = Process::start_with(dir.path(), &log, |argv| {
        let mut c = std::process::Command::new("systemd-socket-activate");
        let sock = argv
            .iter()
            .skip_while(|a| *a != "--listen")
            .nth(1)
            .unwrap()
            .clone();
        c.arg("-l").arg(sock).args(argv);
        c
    });
    p.hello();
    let r = Client::new(Box::new(UnixStream::connect(&p.sock).unwrap())).get(&hello_path(&p));
    assert_eq!((r.status, r.text().as_str()), (200, "Hello World"));
    let sock = p.sock.clone();
    let stderr = p.stop();
    assert!(
        sock.exists(),
        "an inherited socket is not the daemon's to remove: {stderr}"
    );
    let lines = audit_lines(&log);
    let start = lines.iter().find(|l| l["event"] == "start").unwrap();
    assert_eq!(
        start["listen"],
        serde_json::json!([sock.display().to_string()])
    );
    assert_eq!(requests(&lines).len(), 2);
}

#[test]
fn tells_the_service_manager_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let notify_path = dir.path().join("notify");
    let manager = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    manager.set_read_timeout(Some(BOUND)).unwrap();
    let given = notify_path.clone();
    let p = Process::start_with(dir.path(), &log, move |argv| {
        let mut c = crate::support::command_of(argv);
        c.env("NOTIFY_SOCKET", &given);
        c
    });
    let next = || {
        let mut buf = [0u8; 256];
        let n = manager
            .recv(&mut buf)
            .expect("a notification within the bound");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1");
    p.hello();
    p.signal("HUP");
    assert_eq!(next(), "RELOADING=1");
    assert_eq!(next(), "READY=1");
    p.hello();
    let sock = p.sock.clone();
    p.stop();
    assert_eq!(next(), "STOPPING=1");
    assert!(!sock.exists());
}

/// The uid and gid lines of /proc/PID/status: (real, effective, saved, fs) each.
fn ids_of(pid: u32) -> (Vec<u32>, Vec<u32>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<u32> {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    };
    (field("Uid:"), field("Gid:"))
}

#[test]
fn gives_up_root_for_the_configured_user_after_binding() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let config: PathBuf = dir.path().join("luafcgid.toml");
    write(&config, "user = \"nobody\"\ngroup = \"nogroup\"\n");
    // SAFETY-free way to know who runs the tests: the owner of a file just made.
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata(&config).unwrap().uid();
    if me != 0 {
        // Without root the daemon refuses to start rather than run as someone unexpected.
        let out = serve_to_the_end(&dir.path().join("s.sock"), dir.path(), &config);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("not started as root"));
        return;
    }
    // The daemon must be able to read its scripts and remove its socket as nobody.
    use std::os::unix::fs::PermissionsExt;
    let nobody = std::process::Command::new("id")
        .args(["-u", "nobody"])
        .output()
        .unwrap();
    let nobody: u32 = String::from_utf8_lossy(&nobody.stdout)
        .trim()
        .parse()
        .unwrap();
    std::os::unix::fs::chown(dir.path(), Some(nobody), None).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = Process::start_with_config(dir.path(), &log, &config);
    std::fs::set_permissions(&p.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        p.root.join("hello.lua"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    // Bound as root first: the socket exists; then the identity switches.
    let t = Instant::now();
    loop {
        let (uid, _) = ids_of(p.child.id());
        if uid.iter().all(|u| *u == nobody) {
            break;
        }
        assert!(t.elapsed() < BOUND, "still {uid:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (_, gid) = ids_of(p.child.id());
    assert!(gid.iter().all(|g| *g == gid[0] && *g != 0), "{gid:?}");
    p.hello();
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).unwrap();
    let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
    assert!(!groups.split_whitespace().any(|g| g == "0"), "{groups}");
    let sock = p.sock.clone();
    let stderr = p.stop();
    assert!(!sock.exists(), "removed as the unprivileged user: {stderr}");
}

#[test]
fn an_unknown_user_is_a_config_error_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("luafcgid.toml");
    write(&config, "user = \"no-such-user-here\"\n");
    let sock = dir.path().join("s.sock");
    let out = serve_to_the_end(&sock, dir.path(), &config);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no user named \"no-such-user-here\""),
        "{stderr}"
    );
    assert!(!sock.exists());
}

#[test]
fn the_example_systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/systemd");
    let mut units = Vec::new();
    for name in ["luafcgid.socket", "luafcgid.service"] {
        let text = std::fs::read_to_string(examples.join(name)).unwrap();
        // The unit names the installed binary; this build's stands in for it.
        let text = text.replace("/usr/local/bin/luafcgid", env!("CARGO_BIN_EXE_luafcgid"));
        let unit = dir.path().join(name);
        std::fs::write(&unit, text).unwrap();
        units.push(unit);
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn on_one_cpu_two_workers_keep_a_flooding_tenant_from_holding_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    // Confined to one CPU, with no `workers` given: the default must still be two, so
    // that a tenant at its cap (workers - 1) leaves a worker to the others.
    let p = Process::start_with(dir.path(), &log, |argv| {
        let mut c = std::process::Command::new("taskset");
        c.args(["-c", "0"]);
        let mut skip = false;
        for a in argv {
            if skip {
                skip = false;
            } else if a == "--workers" {
                skip = true;
            } else {
                c.arg(a);
            }
        }
        c
    });
    let burn = p.root.join("flood/burn.lua");
    write(&burn, "function handler() while true do end end");
    write(&p.root.join("flood/policy.toml"), "timeout_ms = 3000\n");
    p.hello();
    let idle_ticks = p.cpu_ticks();
    let flooding: Vec<_> = (0..3)
        .map(|_| {
            let (sock, burn) = (p.sock.clone(), burn.display().to_string());
            std::thread::spawn(move || {
                let mut c = Client::new(Box::new(UnixStream::connect(&sock).unwrap()));
                c.get(&burn).status
            })
        })
        .collect();
    // Once the flood burns (the daemon has used a tenth of a second of CPU since), another
    // tenant is answered at once.
    let t = Instant::now();
    while p.cpu_ticks() < idle_ticks + 10 {
        assert!(t.elapsed() < BOUND, "the flood never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    p.hello();
    let waited = t.elapsed();
    for f in flooding {
        assert_eq!(f.join().unwrap(), 500);
    }
    p.stop();
    let lines = audit_lines(&log);
    let start = lines.iter().find(|l| l["event"] == "start").unwrap();
    assert_eq!(start["workers"], 2, "{start}");
    assert!(
        waited < Duration::from_secs(2),
        "the hello waited {waited:?}"
    );
}

/// Voluntary context switches of the thread of `pid` named `name`, once it is there (a
/// thread takes its name from inside, just after it starts).
fn switches_of_thread(pid: u32, name: &str) -> u64 {
    let t = Instant::now();
    loop {
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let task = task.unwrap().path();
            let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            if comm.trim_end() == name {
                let status = std::fs::read_to_string(task.join("status")).unwrap();
                let line = status
                    .lines()
                    .find(|l| l.starts_with("voluntary_ctxt_switches:"))
                    .unwrap();
                return line.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
        assert!(t.elapsed() < BOUND, "no thread {name} in process {pid}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_idle_daemon_lets_its_driver_watch_sleep() {
    // While Lua runs, a thread looks every 5 ms whether the runtime's IO driver needs a
    // nudge; once nothing has run for a while it parks instead of waking 200 times a second.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let p = Process::start(dir.path(), &log);
    p.hello();
    let pid = p.child.id();
    let t = Instant::now();
    loop {
        let before = switches_of_thread(pid, "driver-watch");
        std::thread::sleep(Duration::from_millis(200));
        let woke = switches_of_thread(pid, "driver-watch") - before;
        if woke <= 5 {
            break;
        }
        assert!(
            t.elapsed() < BOUND,
            "the driver watch still wakes {woke} times in 200 ms while the daemon idles"
        );
    }
    // Parked, it still serves.
    assert_eq!(p.hello().len(), 16);
}

/// The scheduling policy (field 41 of stat(5)) of each of `pid`'s threads, with its name.
fn policies_of(pid: u32) -> Vec<(String, i64)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        // A thread may end between the listing and the read.
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("stat")),
        ) else {
            continue;
        };
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let policy = rest.split(' ').nth(38).unwrap().parse().unwrap();
        threads.push((comm.trim_end().to_string(), policy));
    }
    threads
}

/// Waits (bounded) until every thread of `pid` has the policy `expected` gives its name,
/// and the watchdog is among them; the policies seen last otherwise.
fn wait_for_policies(pid: u32, expected: impl Fn(&str) -> i64) {
    let t = Instant::now();
    loop {
        let threads = policies_of(pid);
        let watchdog = threads.iter().any(|(name, _)| name == "luafcgid-watchd");
        if watchdog && threads.iter().all(|(name, p)| *p == expected(name)) {
            return;
        }
        assert!(t.elapsed() < BOUND, "threads and policies: {threads:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The policy each thread of a daemon with `sched = "batch"` should have, by its name.
fn batch_but_the_watchers(name: &str) -> i64 {
    match name {
        "luafcgid-watchd" | "driver-watch" | "audit" => i64::from(libc::SCHED_OTHER),
        _ => i64::from(libc::SCHED_BATCH),
    }
}

#[test]
fn the_daemons_threads_run_as_a_batch_but_the_watchdog_the_driver_watch_and_the_audit_writer() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let p = Process::start(dir.path(), &log);
    // A request starts the sandbox's watchdog.
    p.hello();
    wait_for_policies(p.child.id(), batch_but_the_watchers);
    let names: Vec<String> = policies_of(p.child.id()).into_iter().map(|t| t.0).collect();
    for name in ["luafcgid", "audit", "driver-watch"] {
        assert!(
            names.iter().any(|n| n == name),
            "no {name} thread: {names:?}"
        );
    }
    // A long run goes under SCHED_IDLE and comes back to the batch.
    write(&p.root.join("spin.lua"), SPIN);
    let mut c = Client::new(Box::new(UnixStream::connect(&p.sock).unwrap()));
    let r = c.get(&p.root.join("spin.lua").display().to_string());
    assert_eq!(r.text(), "spun");
    wait_for_policies(p.child.id(), batch_but_the_watchers);
    p.stop();
    let start = audit_lines(&log)
        .into_iter()
        .find(|l| l["event"] == "start");
    assert_eq!(start.unwrap()["sched"], "batch");
}

#[test]
fn sched_normal_leaves_every_thread_under_the_normal_policy() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let p = Process::start_with(dir.path(), &log, |mut argv| {
        argv.push("--sched".into());
        argv.push("normal".into());
        crate::support::command_of(argv)
    });
    p.hello();
    wait_for_policies(p.child.id(), |_| i64::from(libc::SCHED_OTHER));
    p.stop();
    let start = audit_lines(&log)
        .into_iter()
        .find(|l| l["event"] == "start");
    assert_eq!(start.unwrap()["sched"], "normal");
}

/// A run of 50 ms of CPU: long enough to give up its priority (after 2 ms).
const SPIN: &str =
    "function handler() local t = os.clock() while os.clock() - t < 0.05 do end return 'spun' end";
