//! The original luafcgid's `config.lua` given to the real binary: the samples' shapes pass
//! `serve --check` with a warning per ignored key, bad files exit 64 naming file, line and
//! key, and a daemon started from such a file serves an original-style script.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Client, Process};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/legacy")
        .join(name)
}

/// Runs the binary with `args`; kills it and fails if it has not ended within 20 s.
fn luafcgid(args: &[&std::ffi::OsStr]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_luafcgid"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("luafcgid {args:?} did not end");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn check(config: &Path, docroot: &Path) -> Output {
    luafcgid(&[
        "serve".as_ref(),
        "--check".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--docroot".as_ref(),
        docroot.as_os_str(),
    ])
}

#[test]
fn the_original_samples_pass_check_with_a_warning_per_ignored_key() {
    let dir = tempfile::tempdir().unwrap();
    for (name, ignored) in [
        (
            "packaged.lua",
            &["retries", "buffering", "headersize", "bodysize"][..],
        ),
        ("first.lua", &["retries"][..]),
        (
            "later.lua",
            &[
                "watchdog",
                "retries",
                "buffering",
                "daemonize",
                "headersize",
                "bodysize",
                "backlog",
            ][..],
        ),
    ] {
        let path = fixture(name);
        let out = check(&path, dir.path());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{name}: {stderr}");
        assert!(
            stdout.contains(&format!("{}: ok", path.display())),
            "{name}: {stdout}"
        );
        let warnings: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("is accepted and ignored"))
            .collect();
        assert_eq!(warnings.len(), ignored.len(), "{name}: {stderr}");
        for key in ignored {
            assert!(
                warnings
                    .iter()
                    .any(|w| w.contains(&format!("`{key}`"))
                        && w.contains(&path.display().to_string())),
                "{name}: no warning for {key}: {stderr}"
            );
        }
        assert!(!stderr.contains("not a setting"), "{name}: {stderr}");
    }
}

#[test]
fn bad_config_lua_files_exit_64_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, expected) in [
        (
            "workers = 4\nstates = 'eight'\n",
            "bad.lua: `states`: expected an integer, got a string",
        ),
        ("workers = 4\nstates = = 8\n", "bad.lua:2: "),
        ("workers = 4\nos.exit(0)\n", "bad.lua:2: "),
        ("listen = ':9000'\nrequire('posix')\n", "bad.lua:2: "),
        (
            "workers = 2\nwhile true do end\n",
            "bad.lua:2: evaluation stopped",
        ),
        (
            "t = {}\nfor i = 1, 1e9 do t[i] = i end\n",
            "bad.lua: evaluation stopped: more than",
        ),
        // Mapped, then refused by the same validation as luafcgid.toml.
        ("sweep = 5\n", "`sweep_ms`: must be at least 10"),
    ] {
        let path = dir.path().join("bad.lua");
        std::fs::write(&path, text).unwrap();
        let t = Instant::now();
        let out = check(&path, dir.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{text}: {stderr}");
        assert!(stderr.contains(expected), "{text}: {stderr}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{text}: took {:?}",
            t.elapsed()
        );
    }
}

#[test]
fn a_daemon_started_from_a_config_lua_serves_an_original_script() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let root = base.join("www");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        root.join("hello.lua"),
        "function main(env, con)\n  con:puts('Hello from ' .. env.REQUEST_METHOD)\nend\n",
    )
    .unwrap();
    let sock = base.join("fcgi.sock");
    let audit = base.join("audit.jsonl");
    let config = base.join("config.lua");
    std::fs::write(
        &config,
        format!(
            "listen = \"{}\"\ndocroot = \"{}\"\nworkers = 2\nstates = workers * 2\nclones = states\nsweep = 500\n\
             showerrors = false\nbuffering = true\ndaemonize = true\nheaders = \"X-Powered-By: Lua\\r\\n\"\n\
             handler = \"main\"\nhttpstatus = \"200 OK\"\ncontenttype = \"text/plain\"\nmaxpost = 1024\n\
             logfile = \"{}\"\n",
            sock.display(),
            root.display(),
            audit.display()
        ),
    )
    .unwrap();
    let stderr = base.join("stderr");
    let child = Command::new(env!("CARGO_BIN_EXE_luafcgid"))
        .args(["serve".as_ref(), "--config".as_ref(), config.as_os_str()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut p = Process {
        child,
        sock: sock.clone(),
        root: root.clone(),
        stderr,
    };
    let t = Instant::now();
    while !sock.exists() {
        if t.elapsed() > Duration::from_secs(10) || p.child.try_wait().unwrap().is_some() {
            p.kill();
            panic!(
                "the daemon never created its socket: {}",
                std::fs::read_to_string(&p.stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let script = root.join("hello.lua").display().to_string();
    let mut c = Client::new(Box::new(UnixStream::connect(&sock).unwrap()));
    let r = c.get(&script);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "Hello from GET");
    assert_eq!(r.header("X-Powered-By"), Some("Lua"));
    assert_eq!(r.header("Content-Type"), Some("text/plain"));
    // `maxpost = 1024`: a larger body is refused.
    let params = crate::support::params_for(&script, "POST", &[("CONTENT_LENGTH", "2048")]);
    let r = c.request(2, true, &params, &[b'x'; 2048]);
    assert_eq!(r.status, 413, "{r:?}");
    let stderr = p.stop();
    assert!(
        stderr.contains("`daemonize` is accepted and ignored") && stderr.contains("systemd"),
        "{stderr}"
    );
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(
        log.lines().any(|l| l.contains("\"outcome\":\"ok\"")),
        "the audit log is the config's `logfile`: {log}"
    );
}

#[test]
fn run_reads_a_config_lua() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    std::fs::write(
        root.join("page.lua"),
        "function serve(r)\n  return 'served'\nend\n",
    )
    .unwrap();
    let config = root.join("config.lua");
    std::fs::write(
        &config,
        "handler = 'serve'\nheaders = 'X-Powered-By: Lua\\r\\n'\ncontenttype = 'text/plain'\n",
    )
    .unwrap();
    let out = luafcgid(&[
        "run".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--docroot".as_ref(),
        root.as_os_str(),
        root.join("page.lua").as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("X-Powered-By: Lua\r\n"), "{stdout}");
    assert!(stdout.contains("Content-Type: text/plain\r\n"), "{stdout}");
    assert!(stdout.ends_with("served"), "{stdout}");
}
