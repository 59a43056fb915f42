//! End to end through each front end's recipe in `examples/` (nginx, lighttpd, Apache
//! mod_proxy_fcgi, Caddy), read from the repository with only paths and ports substituted
//! (for the TCP variant, the recipe's commented TCP line takes the unix socket line's place),
//! each run privately on a loopback port in front of an in-process daemon. It checks what the
//! recipes promise: scripts run (GET, POST with a body, PATH_INFO), script errors and missing
//! scripts answer the daemon's generic pages, static files are served, and neither a
//! `policy.toml` nor a script's source ever is. It also runs the scale-out recipe: two
//! daemons behind one nginx upstream that hashes by script. It does not measure throughput
//! (that is `luafcgid-bench`'s job) and does not test TLS or HTTP/2 on the client side.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;

use crate::support::*;

/// Text in a script's source and in the policy files that no response may contain.
const SOURCE_MARK: &str = "source-7c1e";
const POLICY_MARK: &str = "policy-7c1e";

const SITE: &[(&str, &str)] = &[
    (
        "hello.lua",
        "-- source-7c1e: a script's source is never sent as a file\n\
         s = \"Hello World\"\nfunction handler() return s end\n",
    ),
    (
        "post.lua",
        "function handler(r) local b = r:body() or '' local sum = 0 \
         for i = 1, #b, 7 do sum = sum + b:byte(i) end \
         return r.env.REQUEST_METHOD .. ' ' .. #b .. ' ' .. sum end\n",
    ),
    (
        "pathinfo.lua",
        "function handler(r) return (r.env.PATH_INFO or '') .. '?' .. (r.env.QUERY_STRING or '') end\n",
    ),
    ("error.lua", "function handler() error('boom-7c1e') end\n"),
    ("static.txt", "static file\n"),
    (
        "policy.toml",
        "# policy-7c1e: a policy file is never sent\n[vars]\ngreeting = \"hi\"\n",
    ),
    (
        "sub/policy.toml",
        "# policy-7c1e: nor one further down\n[vars]\ngreeting = \"hey\"\n",
    ),
    ("sub/page.lua", "function handler() return 'sub page' end\n"),
];

/// The example file `rel` under the repository's `examples/`.
fn example(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Replaces every `from`, which the example must hold.
fn substitute(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "the example no longer holds `{from}`");
    text.replace(from, to)
}

/// Replaces the one `from` the example must hold.
fn substitute_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "the example should hold `{from}` exactly once"
    );
    text.replacen(from, to, 1)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Via {
    Unix,
    Tcp,
}

/// A recipe made concrete for `d`: for TCP each `(unix line, TCP line)` pair has its unix
/// line commented out and its commented TCP line (`# ` + TCP line) made live on the
/// daemon's port; then the document root and socket path are the daemon's.
fn concrete(text: &str, d: &Daemon, via: Via, tcp: &[(&str, &str)]) -> String {
    let mut t = text.to_string();
    if via == Via::Tcp {
        for (unix, tcp) in tcp {
            let live = tcp.replace("9000", &d.tcp.port().to_string());
            t = substitute_once(&t, &format!("# {tcp}"), &live);
            t = substitute_once(&t, unix, &format!("# {unix}"));
        }
    }
    t = substitute(&t, "/srv/www", &d.root.display().to_string());
    substitute(&t, "/run/luafcgid.sock", &d.unix.display().to_string())
}

/// What the daemon must have logged for a request a front end passed on.
struct Expect {
    request_id: String,
    outcome: &'static str,
}

/// Requests every kind of page through `fe`; gives the requests the daemon answered.
/// `front_end_404`: the front end answers a missing script itself (lighttpd's
/// `check-local`); the others pass it on to the daemon.
fn check_site(fe: &FrontEnd, what: &str, front_end_404: bool) -> Vec<Expect> {
    let mut expect = Vec::new();
    let mut answered = |r: &HttpReply, outcome: &'static str| {
        let id = r
            .header("X-Request-Id")
            .unwrap_or_else(|| panic!("{what}: no X-Request-Id: {r:?}"));
        assert_eq!(id.len(), 16, "{what}: {id}");
        expect.push(Expect {
            request_id: id.to_string(),
            outcome,
        });
    };
    for _ in 0..3 {
        let r = fe.http("GET", "/hello.lua", b"");
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "Hello World"),
            "{what}: {r:?}"
        );
        answered(&r, "ok");
    }
    let r = fe.http("GET", "/sub/page.lua", b"");
    assert_eq!((r.status, r.text().as_str()), (200, "sub page"), "{what}");
    answered(&r, "ok");

    // Several FastCGI STDIN records with every front end (8 KB to 64 KB each).
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let sum: u64 = body.iter().step_by(7).map(|&b| b as u64).sum();
    let r = fe.http("POST", "/post.lua", &body);
    assert_eq!(r.status, 200, "{what} POST: {}", r.text());
    assert_eq!(r.text(), format!("POST 300000 {sum}"), "{what}");
    answered(&r, "ok");

    let r = fe.http("GET", "/pathinfo.lua/a/b?q=1", b"");
    assert_eq!((r.status, r.text().as_str()), (200, "/a/b?q=1"), "{what}");
    answered(&r, "ok");

    // The daemon's generic error page: status and request id, never the message.
    let r = fe.http("GET", "/error.lua", b"");
    assert_eq!(r.status, 500, "{what}");
    assert!(
        r.text().contains("500 Internal Server Error"),
        "{what}: {r:?}"
    );
    assert!(!r.text().contains("boom-7c1e"), "{what}: {r:?}");
    answered(&r, "script_error");

    let r = fe.http("GET", "/missing.lua", b"");
    assert_eq!(r.status, 404, "{what}: {r:?}");
    if front_end_404 {
        assert_eq!(r.header("X-Request-Id"), None, "{what}: {r:?}");
    } else {
        answered(&r, "not_found");
    }

    let r = fe.http("GET", "/static.txt", b"");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "static file\n"),
        "{what}"
    );

    for path in ["/policy.toml", "/sub/policy.toml", "/sub//policy.toml"] {
        let r = fe.http("GET", path, b"");
        assert!(
            r.status == 403 || r.status == 404,
            "{what}: {path} answered {r:?}"
        );
        assert!(!r.text().contains(POLICY_MARK), "{what}: {path} was served");
    }
    for path in [
        "/hello.lua",
        "/hello.lua/",
        "/hello.lua/x",
        "/hello.lu%61",
        "/",
        "/sub/",
    ] {
        let r = fe.http("GET", path, b"");
        assert!(
            !r.text().contains(SOURCE_MARK),
            "{what}: {path} sent the script's source: {r:?}"
        );
    }
    expect
}

/// Runs `recipe` over the unix socket and over TCP in front of one daemon, then checks
/// that the daemon logged every request the front end said it answered.
fn run_recipe(
    name: &str,
    recipe: &str,
    tcp: &[(&str, &str)],
    front_end_404: bool,
    start: impl Fn(&Path, &str) -> FrontEnd,
) {
    let mut d = Daemon::start("", SITE);
    let text = example(recipe);
    let mut expect = Vec::new();
    for via in [Via::Unix, Via::Tcp] {
        let site = concrete(&text, &d, via, tcp);
        let fe = start(&d.dir.path().join(format!("{name}-{via:?}")), &site);
        expect.extend(check_site(
            &fe,
            &format!("{name} via {via:?}"),
            front_end_404,
        ));
    }
    let lines = d.stop();
    let logged: HashMap<&str, &serde_json::Value> = requests(&lines)
        .into_iter()
        .map(|l| (l["request_id"].as_str().unwrap(), l))
        .collect();
    for e in &expect {
        let line = logged
            .get(e.request_id.as_str())
            .unwrap_or_else(|| panic!("{name}: request {} not in the audit log", e.request_id));
        assert_eq!(line["outcome"], e.outcome, "{name}: {line}");
    }
}

fn start_nginx_recipe(dir: &Path, site: &str) -> FrontEnd {
    start_nginx(dir, |port| {
        substitute_once(site, "listen 80;", &format!("listen 127.0.0.1:{port};"))
    })
}

#[test]
fn nginx_recipe_over_unix_and_tcp() {
    run_recipe(
        "nginx",
        "nginx/luafcgid.conf",
        &[("server unix:/run/luafcgid.sock;", "server 127.0.0.1:9000;")],
        false,
        start_nginx_recipe,
    );
}

#[test]
fn lighttpd_recipe_over_unix_and_tcp() {
    run_recipe(
        "lighttpd",
        "lighttpd/luafcgid.conf",
        &[(
            "\"socket\" => \"/run/luafcgid.sock\",",
            "\"host\" => \"127.0.0.1\", \"port\" => 9000,",
        )],
        true,
        |dir, site| {
            let binary = front_end_binary("lighttpd", &["/usr/sbin/lighttpd", "/usr/bin/lighttpd"]);
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("site.conf"), site).unwrap();
            let conf = dir.join("lighttpd.conf");
            FrontEnd::start(&dir.join("error.log"), |port| {
                std::fs::write(
                    &conf,
                    format!(
                        "server.bind = \"127.0.0.1\"\nserver.port = {port}\n\
                         server.pid-file = \"{d}/lighttpd.pid\"\n\
                         server.errorlog = \"{d}/error.log\"\n\
                         server.upload-dirs = ( \"{d}\" )\n\
                         include \"{d}/site.conf\"\n",
                        d = dir.display()
                    ),
                )
                .unwrap();
                let mut c = Command::new(&binary);
                c.arg("-D").arg("-f").arg(&conf);
                c
            })
        },
    );
}

#[test]
fn apache_recipe_over_unix_and_tcp() {
    run_recipe(
        "apache",
        "apache/luafcgid.conf",
        &[
            (
                "SetHandler \"proxy:unix:/run/luafcgid.sock|fcgi://localhost\"",
                "SetHandler \"proxy:fcgi://127.0.0.1:9000\"",
            ),
            (
                "<Proxy \"fcgi://localhost\">",
                "<Proxy \"fcgi://127.0.0.1:9000\">",
            ),
        ],
        false,
        |dir, site| {
            let binary = front_end_binary("apache2", &["/usr/sbin/apache2", "/usr/sbin/httpd"]);
            let modules = ["/usr/lib/apache2/modules", "/usr/lib64/httpd/modules"]
                .into_iter()
                .find(|p| Path::new(p).join("mod_proxy_fcgi.so").exists())
                .expect("Apache's mod_proxy_fcgi");
            std::fs::create_dir_all(dir).unwrap();
            let conf = dir.join("httpd.conf");
            FrontEnd::start(&dir.join("error.log"), |port| {
                let site = substitute_once(
                    site,
                    "<VirtualHost *:80>",
                    &format!("<VirtualHost 127.0.0.1:{port}>"),
                );
                std::fs::write(dir.join("site.conf"), site).unwrap();
                let mut main = format!(
                    "ServerRoot \"{d}\"\nServerName 127.0.0.1\nDefaultRuntimeDir \"{d}\"\n\
                     PidFile \"{d}/httpd.pid\"\nErrorLog \"{d}/error.log\"\nLogLevel warn\n\
                     Listen 127.0.0.1:{port}\n",
                    d = dir.display()
                );
                for m in ["mpm_event", "authz_core", "proxy", "proxy_fcgi"] {
                    main += &format!("LoadModule {m}_module \"{modules}/mod_{m}.so\"\n");
                }
                main += &format!("Include \"{}/site.conf\"\n", dir.display());
                std::fs::write(&conf, main).unwrap();
                // -X: one process in the foreground, no detaching children.
                let mut c = Command::new(&binary);
                c.arg("-X").arg("-f").arg(&conf);
                c
            })
        },
    );
}

#[test]
fn caddy_recipe_over_unix_and_tcp() {
    run_recipe(
        "caddy",
        "caddy/Caddyfile",
        &[(
            "reverse_proxy @lua unix//run/luafcgid.sock {",
            "reverse_proxy @lua 127.0.0.1:9000 {",
        )],
        false,
        |dir, site| {
            let binary = front_end_binary("caddy", &["/usr/bin/caddy", "/usr/local/bin/caddy"]);
            std::fs::create_dir_all(dir).unwrap();
            let conf = dir.join("Caddyfile");
            FrontEnd::start(&dir.join("error.log"), |port| {
                // Any host name, as the recipe; bound to loopback. No admin endpoint, no
                // certificates; its state stays in `dir`.
                let site =
                    substitute_once(site, "\n:80 {", &format!("\n:{port} {{\n\tbind 127.0.0.1"));
                std::fs::write(
                    &conf,
                    format!("{{\n\tadmin off\n\tauto_https off\n}}\n{site}"),
                )
                .unwrap();
                let mut c = Command::new(&binary);
                c.args(["run", "--adapter", "caddyfile", "--config"])
                    .arg(&conf)
                    .env("HOME", dir)
                    .env("XDG_DATA_HOME", dir.join("data"))
                    .env("XDG_CONFIG_HOME", dir.join("config"));
                c
            })
        },
    );
}

/// How the second instance goes away in the scale-out test.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Loss {
    /// SIGTERM: it drains, removes its socket and exits.
    Stopped,
    /// SIGKILL: its socket file stays behind, refusing connections.
    Killed,
}

/// Two daemons behind one nginx running `examples/nginx/scale-out.conf`: instance a
/// in-process, instance b from the binary (so it can be killed). 21 scripts, each counting
/// the requests its state served (an odd number, so that plain round robin would move
/// them), are asked in four rounds; then b goes away and every script is asked twice more.
fn scale_out(loss: Loss) {
    let names: Vec<String> = (0..21).map(|i| format!("s{i:02}.lua")).collect();
    let dir = tempfile::tempdir().unwrap();
    let b_log = dir.path().join("b.jsonl");
    let mut b = Process::start(dir.path(), &b_log);
    let root = b.root.clone();
    for n in &names {
        std::fs::write(
            root.join(n),
            format!("n = 0\nfunction handler() n = n + 1 return '{n} ' .. n end\n"),
        )
        .unwrap();
    }
    let mut a = Daemon::start_with("", &[], |o| o.docroot = vec![root.clone()]);
    let site = substitute(
        &example("nginx/scale-out.conf"),
        "/srv/www",
        &root.display().to_string(),
    );
    let site = substitute(&site, "/run/luafcgid-a.sock", &a.unix.display().to_string());
    let site = substitute(&site, "/run/luafcgid-b.sock", &b.sock.display().to_string());
    let nginx = start_nginx(&dir.path().join("nginx"), |port| {
        substitute_once(&site, "listen 80;", &format!("listen 127.0.0.1:{port};"))
    });
    // (script, request id, how many requests its state had served)
    let get = |name: &str| -> (String, String, usize) {
        let r = nginx.http("GET", &format!("/{name}"), b"");
        assert_eq!(r.status, 200, "{name}: {r:?}");
        let text = r.text();
        let count = text
            .strip_prefix(&format!("{name} "))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("{name}: {text}"));
        let id = r.header("X-Request-Id").unwrap().to_string();
        (name.to_string(), id, count)
    };

    const ROUNDS: usize = 4;
    let mut before = Vec::new();
    for round in 1..=ROUNDS {
        for n in &names {
            let (name, id, count) = get(n);
            assert_eq!(count, round, "{name}: its state went cold");
            before.push((name, id));
        }
    }
    match loss {
        Loss::Stopped => {
            b.stop();
        }
        Loss::Killed => b.kill(),
    }
    let mut after = Vec::new();
    for _ in 0..2 {
        for n in &names {
            after.push(get(n));
        }
    }
    drop(nginx);
    let a_lines = a.stop();
    let on_a: HashMap<&str, &serde_json::Value> = requests(&a_lines)
        .into_iter()
        .map(|l| (l["request_id"].as_str().unwrap(), l))
        .collect();

    // Before: each script on one instance, a new state on its first request, warm after.
    let mut moved: HashSet<&str> = HashSet::new();
    for n in &names {
        let ids: Vec<&str> = before
            .iter()
            .filter(|(name, _)| name == n)
            .map(|(_, id)| id.as_str())
            .collect();
        let here = ids.iter().filter(|id| on_a.contains_key(*id)).count();
        assert!(
            here == 0 || here == ROUNDS,
            "{n} was served by both instances"
        );
        if here == 0 {
            moved.insert(n);
        } else {
            for (i, id) in ids.iter().enumerate() {
                let state = if i == 0 { "new" } else { "warm" };
                assert_eq!(on_a[id]["state"], state, "{n}: {}", on_a[id]);
            }
        }
    }
    assert!(
        !moved.is_empty() && moved.len() < names.len(),
        "the hash sent every script to one instance ({} of {} to b)",
        moved.len(),
        names.len()
    );
    if loss == Loss::Stopped {
        // b drained and wrote its log: it served exactly the scripts a did not.
        let text = std::fs::read_to_string(&b_log).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let on_b: HashMap<&str, &serde_json::Value> = requests(&lines)
            .into_iter()
            .map(|l| (l["request_id"].as_str().unwrap(), l))
            .collect();
        let mut first = HashSet::new();
        for (name, id) in &before {
            if !moved.contains(name.as_str()) {
                continue;
            }
            let line = on_b
                .get(id.as_str())
                .unwrap_or_else(|| panic!("{name}: request {id} in neither audit log"));
            assert_eq!(line["script"], name.as_str());
            let state = if first.insert(name) { "new" } else { "warm" };
            assert_eq!(line["state"], state, "{name}: {line}");
        }
    }

    // After: all answered by a; b's scripts start a new state there, a's count on.
    let mut first = HashSet::new();
    for (name, id, count) in &after {
        let line = on_a
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{name}: {id} answered by the lost instance"));
        let is_first = first.insert(name);
        if moved.contains(name.as_str()) {
            assert_eq!(*count, if is_first { 1 } else { 2 }, "{name}");
            assert_eq!(line["state"], if is_first { "new" } else { "warm" });
        } else {
            assert_eq!(*count, ROUNDS + if is_first { 1 } else { 2 }, "{name}");
            assert_eq!(line["state"], "warm", "{name}: {line}");
        }
    }
}

#[test]
fn nginx_scale_out_keeps_each_script_on_one_instance() {
    scale_out(Loss::Stopped);
}

#[test]
fn nginx_scale_out_survives_a_killed_instance() {
    scale_out(Loss::Killed);
}
