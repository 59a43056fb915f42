//! The `luafcgid` binary's command line: version, help, config validation and exit codes.

use std::process::Command;

use crate::support::Process;

fn luafcgid() -> Command {
    Command::new(env!("CARGO_BIN_EXE_luafcgid"))
}

#[test]
fn version_and_help() {
    let out = luafcgid().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = luafcgid().args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--check",
        "--listen",
        "--docroot",
        "--http",
        "--workers",
        "--sched",
        "--states",
        "--clones",
        "--sweep-ms",
        "--log",
        "--metrics",
        "SIGHUP",
        "SIGUSR1",
        "LISTEN_FDS",
        "NOTIFY_SOCKET",
        "Exit codes",
    ] {
        assert!(help.contains(flag), "help lacks {flag}");
    }
}

#[test]
fn usage_and_config_errors_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let out = luafcgid()
        .args(["serve", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "workers = 2\nlisten = \"not a list\"\n").unwrap();
    let out = luafcgid()
        .args(["serve", "--check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:2"), "{err}");
    // A config that is fine but names a docroot that does not exist.
    let out = luafcgid()
        .args([
            "serve",
            "--check",
            "--docroot",
            "/nonexistent/luafcgid-root",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    // A scheduling policy the daemon does not know, from the flag and from the file.
    let out = luafcgid()
        .args(["serve", "--check", "--docroot"])
        .arg(dir.path())
        .args(["--listen", ":9000", "--sched", "fifo"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sched") && err.contains("fifo"), "{err}");
    let bad = dir.path().join("sched.toml");
    std::fs::write(&bad, "sched = \"idle\"\n").unwrap();
    let out = luafcgid()
        .args(["serve", "--check", "--listen", ":9000", "--docroot"])
        .arg(dir.path())
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sched") && err.contains("idle"), "{err}");
}

#[test]
fn check_validates_the_shipped_example_config() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = luafcgid()
        .current_dir(root)
        .args(["serve", "--check", "--config", "examples/luafcgid.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_socket_in_use_is_not_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("busy.sock");
    let _holder = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut child = luafcgid()
        .args(["serve", "--docroot"])
        .arg(dir.path())
        .arg("--listen")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a daemon that took the socket over would run on; stop it and fail.
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > std::time::Duration::from_secs(10) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the daemon started on a socket in use");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already listening"));
}

#[test]
fn sigterm_stops_the_daemon_and_removes_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let p = Process::start(dir.path(), &dir.path().join("audit.jsonl"));
    let sock = p.sock.clone();
    assert!(sock.exists());
    p.stop(); // SIGTERM, then exit code 0 within a bound
    assert!(!sock.exists(), "the socket it created is removed");
}

#[test]
fn run_prints_the_cgi_response_and_the_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    std::fs::write(
        root.join("echo.lua"),
        "function handler(r)
           r:header('X-Method', r.env.REQUEST_METHOD)
           r:header('X-Type', r.env.CONTENT_TYPE or '-')
           r:header('X-Agent', r.env.HTTP_USER_AGENT or '-')
           return (r.env.QUERY_STRING or '') .. '|' .. (r:gets() or '')
         end",
    )
    .unwrap();
    std::fs::write(root.join("body.txt"), "a=1&b=2").unwrap();
    let config = root.join("luafcgid.toml");
    std::fs::write(&config, "[defaults]\ninstructions = 100000\n").unwrap();
    let out = luafcgid()
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--docroot")
        .arg(&root)
        .arg(root.join("echo.lua"))
        .args(["--method", "POST", "--query", "x=y", "--body"])
        .arg(root.join("body.txt"))
        .args([
            "--header",
            "Content-Type: application/x-www-form-urlencoded",
            "--header",
            "User-Agent: test",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.starts_with("Status: 200 OK\r\n"), "{stdout}");
    for line in [
        "X-Method: POST\r\n",
        "X-Type: application/x-www-form-urlencoded\r\n",
        "X-Agent: test\r\n",
    ] {
        assert!(stdout.contains(line), "{line} in {stdout}");
    }
    assert!(stdout.ends_with("\r\n\r\nx=y|a=1&b=2"), "{stdout}");
    assert!(stderr.contains("\"outcome\":\"ok\""), "{stderr}");
    assert!(stderr.ends_with("outcome: ok\n"), "{stderr}");

    // The config's limits apply: this loop outruns 100,000 instructions.
    std::fs::write(
        root.join("spin.lua"),
        "function handler() while true do end end",
    )
    .unwrap();
    let out = luafcgid()
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--docroot")
        .arg(&root)
        .arg(root.join("spin.lua"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Status: 500"));
    assert!(stderr.ends_with("outcome: limit_cpu\n"), "{stderr}");

    // Outside the document roots, and a malformed header.
    let out = luafcgid()
        .args(["run", "--docroot"])
        .arg(&root)
        .arg("/etc/hostname")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).ends_with("outcome: forbidden\n"));
    let out = luafcgid()
        .args(["run", "--docroot"])
        .arg(&root)
        .arg(root.join("echo.lua"))
        .args(["--header", "no colon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn policy_check_explain_and_serve_check() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let write = |rel: &str, text: &str| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write("policy.toml", "[ceiling]\ntimeout_ms = 500\n");
    write("a/policy.toml", "tenant = \"alpha\"\ntimeout_ms = 400\n");
    write("a/x.lua", "function handler() return 'x' end");

    // Clean: exit 0, nothing printed.
    let out = luafcgid()
        .args(["policy", "check", "--docroot"])
        .arg(&root)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stdout.is_empty());

    // Explain: each value with what set it.
    let out = luafcgid()
        .args(["policy", "explain", "--docroot"])
        .arg(&root)
        .arg(root.join("a/x.lua"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"alpha\""), "{text}");
    let timeout = text
        .lines()
        .find(|l| l.trim_start().starts_with("timeout_ms"))
        .unwrap();
    assert!(
        timeout.contains("400ms") && timeout.contains("a/policy.toml"),
        "{timeout}"
    );

    // A value over the inherited ceiling and an unknown key: file:line for each, exit 1.
    write("b/policy.toml", "# b\ntimeout_ms = 900\n");
    write("c/d/policy.toml", "clones = 2\ntimeout = 3\n");
    let out = luafcgid()
        .args(["policy", "check", "--docroot"])
        .arg(&root)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let b = format!("{}:2:", root.join("b/policy.toml").display());
    let c = format!("{}:2:", root.join("c/d/policy.toml").display());
    assert!(text.contains(&b) && text.contains("timeout_ms"), "{text}");
    assert!(text.contains(&c) && text.contains("timeout"), "{text}");
    // Only one directory.
    let out = luafcgid()
        .args(["policy", "check", "--docroot"])
        .arg(&root)
        .arg(root.join("a"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // serve --check validates the policies too.
    let out = luafcgid()
        .args(["serve", "--check", "--docroot"])
        .arg(&root)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&b));

    // Usage errors exit 64.
    let out = luafcgid().args(["policy", "explain"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn process_limits_are_set_at_start() {
    // Core dumps off (they would hold tenants' data), open files raised to the hard limit,
    // both reported in the `start` event.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let p = Process::start(dir.path(), &log);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", p.child.id())).unwrap();
    p.stop();
    let row = |name: &str| -> Vec<String> {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let core = row("Max core file size");
    let nofile = row("Max open files");
    assert_eq!((core[0].as_str(), core[1].as_str()), ("0", "0"), "{core:?}");
    assert_eq!(
        nofile[0], nofile[1],
        "soft open-file limit raised to the hard one"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let start_event: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["event"] == "start")
        .unwrap();
    assert_eq!(start_event["core"], 0);
    assert_eq!(start_event["nofile"].to_string(), nofile[0]);
}
