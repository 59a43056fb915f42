//! Scripts: resolution and confinement, the state pool (persistence, clones, reload,
//! eviction), the script API and outcomes.

use std::time::{Duration, Instant};

use crate::support::*;

const COUNTER: &str = "n = 0\nfunction handler() n = n + 1 return n end\n";

#[test]
fn globals_persist_in_a_state() {
    let d = Daemon::start("[defaults]\nclones = 1\n", &[("count.lua", COUNTER)]);
    let mut c = d.client();
    let got: Vec<String> = (0..4)
        .map(|_| c.get(&d.script("count.lua")).text())
        .collect();
    assert_eq!(got, ["1", "2", "3", "4"]);
}

#[test]
fn not_persistent_policy_gives_a_fresh_state_each_time() {
    let d = Daemon::start(
        "[defaults]\npersistent = false\n",
        &[("count.lua", COUNTER)],
    );
    for _ in 0..3 {
        assert_eq!(d.get("count.lua").text(), "1");
    }
}

#[test]
fn clones_bound_states_per_script_and_queue_then_shed() {
    // The first request holds the only clone until its wall-clock limit ends it.
    let d = Daemon::start(
        "queue_timeout_ms = 100\ntenant_workers = 2\n[defaults]\nclones = 1\ntimeout_ms = 1500\ninstructions = 100000000000\n",
        &[("slow.lua", "function handler() while true do end end"), ("hello.lua", HELLO)],
    );
    let mut first = d.client();
    first.send(&Client::encode(
        1,
        true,
        &params_for(&d.script("slow.lua"), "GET", &[]),
        b"",
    ));
    d.wait_leased(1);
    let t = Instant::now();
    let r = d.get("slow.lua");
    assert_eq!(
        r.status, 503,
        "the only clone is busy and the wait is bounded"
    );
    assert!(r.header("Retry-After").is_some());
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
    // Another script still runs meanwhile (the second worker).
    assert_eq!(d.get("hello.lua").text(), "Hello World");
    assert_eq!(first.response(1).status, 500);
}

#[test]
fn changed_script_is_reloaded_within_sweep() {
    let d = Daemon::start_with(
        "",
        &[("v.lua", "function handler() return 'one' end")],
        |o| o.sweep_ms = Some(50),
    );
    assert_eq!(d.get("v.lua").text(), "one");
    d.write("v.lua", "function handler() return 'two!' end");
    let t = Instant::now();
    loop {
        let got = d.get("v.lua").text();
        if got == "two!" {
            break;
        }
        assert_eq!(got, "one");
        assert!(t.elapsed() < Duration::from_secs(3), "not reloaded");
        std::thread::yield_now();
    }
}

#[test]
fn changed_module_rebuilds_the_state() {
    let d = Daemon::start_with(
        "",
        &[
            (
                "t/main.lua",
                "local m = require('lib.m')\nfunction handler() return m.v end",
            ),
            ("t/lib/m.lua", "return {v = 'old'}"),
        ],
        |o| o.sweep_ms = Some(50),
    );
    assert_eq!(d.get("t/main.lua").text(), "old");
    d.write("t/lib/m.lua", "return {v = 'newer'}");
    let t = Instant::now();
    while d.get("t/main.lua").text() != "newer" {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "module change not seen"
        );
        std::thread::yield_now();
    }
}

#[test]
fn deleted_script_is_404_and_its_states_go() {
    let d = Daemon::start_with("", &[("gone.lua", COUNTER)], |o| o.sweep_ms = Some(50));
    assert_eq!(d.get("gone.lua").status, 200);
    let real = std::fs::canonicalize(d.path("gone.lua")).unwrap();
    std::fs::remove_file(d.path("gone.lua")).unwrap();
    let t = Instant::now();
    loop {
        let r = d.get("gone.lua");
        if r.status == 404 && d.shared.pool.idle_states(&real) == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "still served: {}",
            r.status
        );
        std::thread::yield_now();
    }
}

#[test]
fn eviction_keeps_popular_scripts_warm() {
    let mut d = Daemon::start_with(
        "[defaults]\nclones = 1\n",
        &[
            ("hot.lua", COUNTER),
            ("cold.lua", COUNTER),
            ("third.lua", COUNTER),
        ],
        |o| o.states = Some(2),
    );
    let mut c = d.client();
    for _ in 0..10 {
        c.get(&d.script("hot.lua"));
    }
    assert_eq!(c.get(&d.script("cold.lua")).text(), "1");
    // Room for two states: the third evicts the less popular `cold`, though `hot` is older.
    assert_eq!(c.get(&d.script("third.lua")).text(), "1");
    assert_eq!(c.get(&d.script("hot.lua")).text(), "11", "hot stayed warm");
    assert_eq!(c.get(&d.script("cold.lua")).text(), "1", "cold was rebuilt");
    drop(c);
    let lines = d.stop();
    let evicted: Vec<_> = lines
        .iter()
        .filter(|l| l["event"] == "state_evicted")
        .collect();
    assert_eq!(evicted[0]["script"], "cold.lua");
    assert_eq!(evicted[0]["reason"], "capacity");
}

#[test]
fn state_max_requests_retires_states() {
    let d = Daemon::start(
        "[defaults]\nclones = 1\nstate_max_requests = 2\n",
        &[("count.lua", COUNTER)],
    );
    let mut c = d.client();
    let got: Vec<String> = (0..5)
        .map(|_| c.get(&d.script("count.lua")).text())
        .collect();
    assert_eq!(got, ["1", "2", "1", "2", "1"]);
}

#[test]
fn traversal_and_confinement() {
    let d = Daemon::start(
        "",
        &[
            ("a/ok.lua", HELLO),
            ("b/secret.lua", "function handler() return 'secret' end"),
        ],
    );
    let outside = d.dir.path().join("outside.lua");
    std::fs::write(&outside, HELLO).unwrap();
    std::os::unix::fs::symlink(&outside, d.path("a/escape.lua")).unwrap();
    std::os::unix::fs::symlink(d.path("b/secret.lua"), d.path("a/cross.lua")).unwrap();
    std::os::unix::fs::symlink(d.path("a/ok.lua"), d.path("a/alias.lua")).unwrap();
    std::fs::write(d.path("a/readme.txt"), "text").unwrap();
    std::os::unix::fs::symlink(d.path("a/readme.txt"), d.path("a/txt.lua")).unwrap();
    std::fs::create_dir_all(d.path("a/dir.lua")).unwrap();
    let status = |p: &str| d.client().get(p).status;
    assert_eq!(status(&d.script("a/ok.lua")), 200);
    assert_eq!(
        status(&d.script("a/alias.lua")),
        200,
        "a symlink within the tenant"
    );
    assert_eq!(status(&d.script("a/../b/secret.lua")), 403, "dot-dot");
    assert_eq!(
        status(&d.script("a/escape.lua")),
        403,
        "symlink out of the root"
    );
    assert_eq!(
        status(&d.script("a/cross.lua")),
        403,
        "symlink into another tenant"
    );
    assert_eq!(status(&d.script("a/readme.txt")), 403, "extension");
    assert_eq!(
        status(&d.script("a/txt.lua")),
        403,
        "extension of the target"
    );
    assert_eq!(status(&d.script("a/missing.lua")), 404);
    assert_eq!(status(&d.script("a/dir.lua")), 404, "not a regular file");
    assert_eq!(
        status(&outside.display().to_string()),
        403,
        "outside the roots"
    );
    assert_eq!(status("relative/x.lua"), 400);
    let apache = format!("proxy:fcgi://127.0.0.1:9000{}", d.script("a/ok.lua"));
    assert_eq!(status(&apache), 200, "Apache's prefix is stripped");
}

#[test]
fn outcomes_and_generic_error_pages() {
    let mut d = Daemon::start(
        "[defaults]\ninstructions = 1000000\ntimeout_ms = 200\nmemory = \"2MiB\"\noutput = \"64KiB\"\n",
        &[
            ("err.lua", "function handler() error('secret detail /etc/passwd') end"),
            ("syntax.lua", "function handler( return end"),
            ("cpu.lua", "function handler() local i = 0 while true do i = i + 1 end end"),
            ("time.lua", "function handler() while true do os.clock() end end"),
            ("mem.lua", "function handler() local t = {} for i = 1, 1e8 do t[i] = i end end"),
            ("out.lua", "function handler(r) for i = 1, 1e6 do r:puts(string.rep('x', 1000)) end end"),
            ("table.lua", "function handler() return {} end"),
            ("noentry.lua", "x = 1"),
        ],
    );
    let cases = [
        ("err.lua", 500, "script_error"),
        ("syntax.lua", 500, "script_error"),
        ("cpu.lua", 500, "limit_cpu"),
        ("mem.lua", 500, "limit_memory"),
        ("out.lua", 500, "limit_output"),
        ("table.lua", 500, "script_error"),
        ("noentry.lua", 500, "script_error"),
    ];
    for (script, status, _) in cases {
        let r = d.get(script);
        assert_eq!(r.status, status, "{script}");
        let id = r.header("X-Request-Id").unwrap().to_string();
        assert!(r.text().contains(&id), "error page shows the request id");
        assert!(!r.text().contains("secret"), "no message on the page");
        assert!(
            !r.text().contains(&d.root.display().to_string()),
            "no path on the page"
        );
    }
    let lines = d.stop();
    let reqs = requests(&lines);
    for (script, _, outcome) in cases {
        let line = reqs.iter().find(|l| l["script"] == script).unwrap();
        assert_eq!(line["outcome"], outcome, "{script}");
    }
    let err = reqs.iter().find(|l| l["script"] == "err.lua").unwrap();
    assert!(
        err["error"].as_str().unwrap().contains("secret detail"),
        "the log has the message"
    );
}

#[test]
fn time_limit_ends_the_request() {
    let mut d = Daemon::start(
        "[defaults]\ninstructions = 100000000000\ntimeout_ms = 200\n",
        &[("time.lua", "function handler() while true do end end")],
    );
    let t = Instant::now();
    assert_eq!(d.get("time.lua").status, 500);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    let lines = d.stop();
    assert_eq!(requests(&lines)[0]["outcome"], "limit_time");
}

#[test]
fn show_errors_shows_the_message_escaped() {
    let d = Daemon::start(
        "[defaults]\nshow_errors = true\n",
        &[("err.lua", "function handler() error('<b>bad</b>') end")],
    );
    let r = d.get("err.lua");
    assert_eq!(r.status, 500);
    assert!(r.text().contains("&lt;b&gt;bad&lt;/b&gt;"), "{}", r.text());
    assert!(!r.text().contains("<b>bad"));
}

#[test]
fn state_with_an_error_is_kept_and_one_over_a_limit_is_not() {
    let d = Daemon::start(
        "[defaults]\nclones = 1\ninstructions = 1000000\n",
        &[(
            "mixed.lua",
            "n = 0\nfunction handler(r)\n n = n + 1\n local q = r.env.QUERY_STRING\n if q == 'err' then error('x') end\n if q == 'spin' then while true do end end\n return n\nend",
        )],
    );
    let mut c = d.client();
    let get = |c: &mut Client, q: &str| {
        c.request(
            1,
            true,
            &params_for(&d.script("mixed.lua"), "GET", &[("QUERY_STRING", q)]),
            b"",
        )
    };
    assert_eq!(get(&mut c, "").text(), "1");
    assert_eq!(get(&mut c, "err").status, 500);
    assert_eq!(get(&mut c, "").text(), "3", "kept after an error");
    assert_eq!(get(&mut c, "spin").status, 500);
    assert_eq!(get(&mut c, "").text(), "1", "discarded after a limit");
}

#[test]
fn script_api_methods() {
    let script = r#"
local luafcgid = require("luafcgid")
function handler(r)
  r:status(201)
  r:content_type("text/plain")
  r:header("X-One", "1")
  r:header("X-Two: 2")
  r:puts("dropped")
  r:reset()
  r:write("a", 1, "b")
  r:puts(" body=", r:gets() or "nil")
  r:flush()
  r:log("hello log")
  print("", "p")
  local q = luafcgid.parse(r.env.QUERY_STRING)
  return " q=" .. q.x .. " var=" .. tostring(r:config("greeting"))
end
"#;
    let mut d = Daemon::start(
        "[defaults.vars]\ngreeting = \"hi\"\n",
        &[("api.lua", script)],
    );
    let r = d.client().request(
        1,
        true,
        &params_for(&d.script("api.lua"), "POST", &[("QUERY_STRING", "x=%41+b")]),
        b"payload",
    );
    assert_eq!(r.status, 201);
    assert_eq!(r.header("Content-Type"), Some("text/plain"));
    assert_eq!(r.header("X-One"), Some("1"));
    assert_eq!(r.header("X-Two"), Some("2"));
    assert_eq!(r.text(), "a1b body=payload\tp\n q=A b var=hi");
    let lines = d.stop();
    let log = lines.iter().find(|l| l["event"] == "script_log").unwrap();
    assert_eq!(log["message"], "hello log");
}

#[test]
fn header_injection_is_refused() {
    let d = Daemon::start(
        "",
        &[(
            "inj.lua",
            "function handler(r) r:header('X-A', 'v\\r\\nSet-Cookie: x=1') return 'no' end",
        )],
    );
    let r = d.get("inj.lua");
    assert_eq!(r.status, 500);
    assert!(r.header("Set-Cookie").is_none());
}

#[test]
fn classic_main_form_and_entry_policy() {
    let classic = "function main(env, con)\n con:header('X-V', tostring(env.LUAFCGID_VERSION))\n con:puts('method=', env.REQUEST_METHOD)\n return 'ignored'\nend";
    let d = Daemon::start(
        "",
        &[
            ("classic.lua", classic),
            (
                "both.lua",
                "function handler() return 'h' end\nfunction main(e, c) c:puts('m') end",
            ),
        ],
    );
    let r = d.get("classic.lua");
    assert_eq!(r.text(), "method=GET");
    assert_eq!(r.header("X-V"), Some("1"));
    assert_eq!(d.get("both.lua").text(), "m", "main wins by default");
    let d2 = Daemon::start(
        "[defaults]\nentry = \"handler\"\n",
        &[(
            "both.lua",
            "function handler() return 'h' end\nfunction main(e, c) c:puts('m') end",
        )],
    );
    assert_eq!(d2.get("both.lua").text(), "h");
}

#[test]
fn head_has_no_body() {
    let d = Daemon::start("", &[("hello.lua", HELLO)]);
    let r = d.client().request(
        1,
        true,
        &params_for(&d.script("hello.lua"), "HEAD", &[]),
        b"",
    );
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert_eq!(r.header("Content-Length"), Some("11"));
}

#[test]
fn head_of_an_error_page_has_no_body() {
    let d = Daemon::start("", &[("hello.lua", HELLO)]);
    let r = d.client().request(
        1,
        true,
        &params_for(&d.script("missing.lua"), "HEAD", &[]),
        b"",
    );
    assert_eq!(r.status, 404);
    assert!(r.body.is_empty(), "{:?}", r.body);
    let length: usize = r.header("Content-Length").unwrap().parse().unwrap();
    assert!(length > 0, "the length of the page a GET would get");
}

#[test]
fn global_headers_and_defaults() {
    let d = Daemon::start(
        "headers = [\"X-Powered-By: Lua\"]\ndefault_content_type = \"text/plain\"\n",
        &[("hello.lua", HELLO)],
    );
    let r = d.get("hello.lua");
    assert_eq!(r.header("X-Powered-By"), Some("Lua"));
    assert_eq!(r.header("Content-Type"), Some("text/plain"));
}

#[test]
fn every_request_has_one_audit_line() {
    let mut d = Daemon::start("", &[("hello.lua", HELLO)]);
    let mut ids = Vec::new();
    for p in ["hello.lua", "missing.lua", "hello.lua"] {
        ids.push(d.get(p).header("X-Request-Id").unwrap().to_string());
    }
    let lines = d.stop();
    let reqs = requests(&lines);
    assert_eq!(reqs.len(), 3);
    for (line, id) in reqs.iter().zip(&ids) {
        assert_eq!(line["request_id"], id.as_str());
        assert!(line["ts"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(reqs[0]["state"], "new");
    assert_eq!(reqs[2]["state"], "warm");
    assert_eq!(reqs[1]["outcome"], "not_found");
    assert!(lines.iter().any(|l| l["event"] == "start"));
    assert!(lines.iter().any(|l| l["event"] == "stop"));
}

#[test]
fn memory_total_bounds_the_sum_of_states() {
    // Each state holds a 300 KB string: the budget fits two of them, not three.
    let fat = "blob = string.rep('x', 300000)\nfunction handler() return #blob end";
    let mut d = Daemon::start(
        "memory_total = \"800KiB\"\n[defaults]\nclones = 1\n",
        &[("a.lua", fat), ("b.lua", fat), ("c.lua", fat)],
    );
    let mut c = d.client();
    for _ in 0..3 {
        assert_eq!(c.get(&d.script("a.lua")).text(), "300000");
    }
    assert_eq!(c.get(&d.script("b.lua")).text(), "300000");
    assert_eq!(c.get(&d.script("c.lua")).text(), "300000");
    let stats = d.shared.pool.stats();
    assert!(stats.memory <= 800 << 10, "{stats:?}");
    assert_eq!(stats.states, 2, "{stats:?}");
    drop(c);
    let lines = d.stop();
    let evicted: Vec<_> = lines
        .iter()
        .filter(|l| l["event"] == "state_evicted" && l["reason"] == "memory")
        .collect();
    assert_eq!(evicted.len(), 1);
    assert_eq!(
        evicted[0]["script"], "b.lua",
        "the least popular idle state goes"
    );
}

#[test]
fn poisoning_harms_only_the_poisoner() {
    let poison = r#"
string.upper = function() return "pwned" end
string.rep = nil
table.concat = function() return "pwned" end
rawset(_G, "shared_secret", "leaked")
math.huge = 0
function handler() return string.upper("a") end
"#;
    let victim = r#"
function handler()
  return string.upper("a") .. ":" .. tostring(rawget(_G, "shared_secret")) .. ":" ..
    table.concat({"x", "y"}) .. ":" .. tostring(string.rep ~= nil) .. ":" .. tostring(math.huge > 0)
end
"#;
    let d = Daemon::start("", &[("a/poison.lua", poison), ("b/victim.lua", victim)]);
    assert_eq!(
        d.get("a/poison.lua").text(),
        "pwned",
        "the poisoner sees its own poison"
    );
    assert_eq!(d.get("b/victim.lua").text(), "A:nil:xy:true:true");
    assert_eq!(d.get("a/poison.lua").text(), "pwned");
    assert_eq!(d.get("b/victim.lua").text(), "A:nil:xy:true:true");
}

#[test]
fn a_warm_state_does_not_pile_up_the_garbage_of_its_requests() {
    // Each request leaves its params, strings and request object behind; a state serving
    // many must keep its heap near its live size, not several times it (a thousand warm
    // states share the daemon's memory).
    let mut d = Daemon::start("", &[("hello.lua", HELLO)]);
    let mut c = d.unix_client();
    let script = d.script("hello.lua");
    for _ in 0..5000 {
        assert_eq!(c.get(&script).status, 200);
    }
    let lines = d.stop();
    let memory: Vec<u64> = requests(&lines)
        .iter()
        .map(|l| l["memory"].as_u64().unwrap())
        .collect();
    let (first, peak) = (memory[0], *memory.iter().max().unwrap());
    assert!(
        peak < 3 * first,
        "heap peak {peak} bytes over 5,000 requests, {first} in the first"
    );
}
