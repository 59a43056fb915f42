//! The metrics listener: requests of several outcomes, then `/metrics` scraped over TCP and
//! parsed as the Prometheus text format; `/healthz`; what the listener does with requests it
//! does not serve (wrong path, method, garbage, too long, silent, too many at once).

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::support::*;

/// One sample line: `name{labels} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape, parsed. Panics on any line that is not a comment or a well-formed sample, and
/// on a sample whose family has no `# HELP` or `# TYPE`.
#[derive(Debug)]
struct Scrape {
    samples: Vec<Sample>,
    types: HashMap<String, String>,
}

/// A quoted label value, unescaped; returns it and the rest after its closing quote.
fn label_value(s: &str) -> (String, &str) {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (out, &s[i + 1..]),
            '\\' => match chars.next() {
                Some((_, '\\')) => out.push('\\'),
                Some((_, '"')) => out.push('"'),
                Some((_, 'n')) => out.push('\n'),
                other => panic!("bad escape {other:?} in {s}"),
            },
            '\n' => panic!("raw line feed in a label value"),
            c => out.push(c),
        }
    }
    panic!("unterminated label value: {s}")
}

fn parse(text: &str) -> Scrape {
    let mut help = HashMap::new();
    let mut types = HashMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, h) = rest.split_once(' ').expect("help text");
            assert!(!h.is_empty());
            assert!(
                help.insert(name.to_string(), h.to_string()).is_none(),
                "{line}"
            );
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest.split_once(' ').expect("type");
            assert!(
                ["counter", "gauge", "histogram"].contains(&t),
                "type {t} of {name}"
            );
            assert!(
                types.insert(name.to_string(), t.to_string()).is_none(),
                "{line}"
            );
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "line `{line}`");
        let name_end = line.find(['{', ' ']).expect("name");
        let name = &line[..name_end];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{name}"
        );
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(mut l) = rest.strip_prefix('{') {
            loop {
                if let Some(after) = l.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let (key, after) = l.split_once("=\"").expect("label");
                let (value, after) = label_value(after);
                assert!(labels.insert(key.to_string(), value).is_none(), "{line}");
                l = after.strip_prefix(',').unwrap_or(after);
            }
        }
        let value: f64 = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no value: {line}"))
            .parse()
            .unwrap_or_else(|e| panic!("{e}: {line}"));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(help.contains_key(family), "no HELP for {name}");
        assert!(types.contains_key(family), "no TYPE for {name}");
        if types[family] == "counter" {
            assert!(name.ends_with("_total"), "{name}");
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    // One series per name and label set.
    let mut seen = std::collections::HashSet::new();
    for s in &samples {
        assert!(
            seen.insert((s.name.clone(), format!("{:?}", s.labels))),
            "{s:?} twice"
        );
    }
    Scrape { samples, types }
}

impl Scrape {
    /// The value of the series `name` with exactly `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?}"))
    }

    /// The sum of every series of `name`.
    fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| s.name == name)
    }
}

/// Sends `request` as is on a fresh connection and reads until the listener closes it:
/// the status (0 when it closed without answering) and the whole response.
fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The listener may have closed already (at its connection cap).
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8(out).unwrap();
    let status = out.get(9..12).map_or(0, |s| s.parse().unwrap());
    (status, out)
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").expect("a head").1
}

fn scrape(addr: SocketAddr) -> Scrape {
    let (status, response) = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200, "{response}");
    assert!(
        response.contains("Content-Type: text/plain; version=0.0.4"),
        "{response}"
    );
    parse(body(&response))
}

/// The table of docs/metrics.md: metric, type, label names.
fn documented() -> BTreeMap<String, (String, Vec<String>)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/metrics.md");
    let text = std::fs::read_to_string(path).unwrap();
    let mut table = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `luafcgid_")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`').to_string();
        let labels = cells[3]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_string())
            .filter(|l| !l.is_empty())
            .collect();
        assert!(
            table.insert(name, (cells[2].to_string(), labels)).is_none(),
            "{line}"
        );
    }
    assert!(table.len() > 10, "docs/metrics.md: no table");
    table
}

/// Every metric served is in docs/metrics.md with its type and labels, and every one
/// documented is served.
fn check_documented(m: &Scrape) {
    let docs = documented();
    let served: std::collections::BTreeSet<&String> = m.types.keys().collect();
    let listed: std::collections::BTreeSet<&String> = docs.keys().collect();
    assert_eq!(served, listed, "metrics served vs docs/metrics.md");
    for s in &m.samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|x| s.name.strip_suffix(x).filter(|f| docs.contains_key(*f)))
            .unwrap_or(&s.name);
        let (kind, labels) = &docs[family];
        assert_eq!(&m.types[family], kind, "type of {family}");
        let names: Vec<&String> = s.labels.keys().collect();
        let mut want: Vec<&String> = labels.iter().collect();
        want.sort();
        if kind == "histogram" && s.name != format!("{family}_bucket") {
            want.clear();
        }
        assert_eq!(names, want, "labels of {}", s.name);
    }
}

fn with_metrics(o: &mut luafcgid::config::Overrides) {
    o.metrics = Some("127.0.0.1:0".into());
}

#[test]
fn counters_match_the_requests_sent_and_the_audit_log() {
    let mut d = Daemon::start_with(
        "states = 1",
        &[
            ("hello.lua", HELLO),
            (
                "created.lua",
                "function handler(r) r:status(201) return 'made' end",
            ),
            ("teapot.lua", "function handler(r) r:status(418) end"),
            ("err.lua", "function handler() error('boom') end"),
            ("cpu/policy.toml", "instructions = 100_000"),
            ("cpu/loop.lua", "function handler() while true do end end"),
            ("r/policy.toml", "[rate]\nper_client = \"1/h\"\n"),
            ("r/hello.lua", HELLO),
        ],
        with_metrics,
    );
    let addr = d.metrics.expect("a metrics listener");
    let before = scrape(addr);
    assert_eq!(before.sum("luafcgid_requests_total"), 0.0);
    assert_eq!(
        before.value(
            "luafcgid_requests_total",
            &[("outcome", "shed"), ("status", "503")]
        ),
        0.0,
        "every outcome's series exists from the start"
    );
    let sent: [(&str, u16, usize); 8] = [
        ("hello.lua", 200, 3),
        ("created.lua", 201, 2),
        ("teapot.lua", 418, 1),
        ("err.lua", 500, 1),
        ("cpu/loop.lua", 500, 1),
        ("missing.lua", 404, 2),
        ("r/hello.lua", 200, 1),
        ("r/hello.lua", 429, 2),
    ];
    for (script, status, times) in sent {
        for _ in 0..times {
            assert_eq!(d.get(script).status, status, "{script}");
        }
    }
    let total: usize = sent.iter().map(|s| s.2).sum();
    let m = scrape(addr);
    check_documented(&m);
    let counted_as = |outcome: &str, status: &str| {
        m.value(
            "luafcgid_requests_total",
            &[("outcome", outcome), ("status", status)],
        )
    };
    assert_eq!(counted_as("ok", "200"), 4.0);
    assert_eq!(counted_as("ok", "201"), 2.0);
    assert_eq!(counted_as("ok", "4xx"), 1.0, "418 is counted by its class");
    assert_eq!(counted_as("script_error", "500"), 1.0);
    assert_eq!(counted_as("limit_cpu", "500"), 1.0);
    assert_eq!(counted_as("not_found", "404"), 2.0);
    assert_eq!(counted_as("rate_limited", "429"), 2.0);
    assert_eq!(m.sum("luafcgid_requests_total"), total as f64);
    assert_eq!(
        m.value("luafcgid_limit_hits_total", &[("kind", "instructions")]),
        1.0
    );
    assert_eq!(m.sum("luafcgid_limit_hits_total"), 1.0);
    assert_eq!(
        m.value("luafcgid_rate_limited_total", &[("limit", "per_client")]),
        2.0
    );
    assert_eq!(m.sum("luafcgid_rate_limited_total"), 2.0);
    assert_eq!(m.sum("luafcgid_shed_total"), 0.0);

    // The histogram: cumulative buckets in increasing `le`, ending at +Inf = _count.
    assert_eq!(m.types["luafcgid_request_duration_seconds"], "histogram");
    let buckets: Vec<(f64, f64)> = m
        .series("luafcgid_request_duration_seconds_bucket")
        .map(|s| {
            let le = &s.labels["le"];
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            (le, s.value)
        })
        .collect();
    assert!(buckets.len() > 5);
    assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0), "{buckets:?}");
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
    assert_eq!(buckets.last().unwrap().0, f64::INFINITY);
    let count = m.value("luafcgid_request_duration_seconds_count", &[]);
    assert_eq!(buckets.last().unwrap().1, count);
    assert_eq!(count, total as f64, "_count is the requests counted");
    assert!(m.value("luafcgid_request_duration_seconds_sum", &[]) > 0.0);

    // Gauges, read from the daemon now that it is idle.
    let stats = d.shared.pool.stats();
    assert_eq!(m.value("luafcgid_lua_in_flight", &[]), 0.0);
    assert_eq!(m.value("luafcgid_lua_workers", &[]), 2.0);
    assert_eq!(m.value("luafcgid_queue_depth", &[]), 0.0);
    assert_eq!(m.value("luafcgid_states", &[]), stats.states as f64);
    assert_eq!(m.value("luafcgid_states_max", &[]), 1.0);
    assert_eq!(m.value("luafcgid_states", &[]), 1.0, "states = 1");
    assert_eq!(m.sum("luafcgid_script_states"), 1.0);
    assert_eq!(m.value("luafcgid_audit_lines_dropped_total", &[]), 0.0);
    assert_eq!(m.value("luafcgid_connections_refused_total", &[]), 0.0);
    assert_eq!(m.value("luafcgid_reloads_total", &[]), 0.0);
    d.shared.metrics.reloaded();
    assert_eq!(
        scrape(addr).value("luafcgid_reloads_total", &[]),
        1.0,
        "the counter the reload bumps"
    );

    // The audit log agrees, outcome by outcome and status by status.
    let lines = d.stop();
    let mut logged: HashMap<(String, String), f64> = HashMap::new();
    for l in requests(&lines) {
        let status = l["status"].as_u64().map_or("none".into(), |s| {
            if [200, 201, 404, 429, 500].contains(&s) {
                s.to_string()
            } else {
                format!("{}xx", s / 100)
            }
        });
        *logged
            .entry((l["outcome"].as_str().unwrap().to_string(), status))
            .or_default() += 1.0;
    }
    let counted: HashMap<(String, String), f64> = m
        .series("luafcgid_requests_total")
        .filter(|s| s.value > 0.0)
        .map(|s| {
            (
                (s.labels["outcome"].clone(), s.labels["status"].clone()),
                s.value,
            )
        })
        .collect();
    assert_eq!(counted, logged);
    let evicted = lines
        .iter()
        .filter(|l| l["event"] == "state_evicted" && l["reason"] == "capacity")
        .count();
    assert!(evicted > 0, "states = 1 with several scripts evicts");
    assert_eq!(
        m.value("luafcgid_state_evictions_total", &[("reason", "capacity")]),
        evicted as f64
    );
}

#[test]
fn the_listener_answers_only_its_two_paths_and_stays_bounded() {
    let d = Daemon::start_with("", &[("hello.lua", HELLO)], with_metrics);
    let addr = d.metrics.unwrap();
    let (status, r) = exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!((status, body(&r)), (200, "ok\n"));
    let (status, r) = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200);
    assert_eq!(body(&r), "", "HEAD has no body");
    let length: usize = r
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(length > 1000, "the length of the text a GET gets");
    assert_eq!(exchange(addr, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n").0, 200);
    assert_eq!(exchange(addr, b"GET / HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(exchange(addr, b"GET /hello.lua HTTP/1.1\r\n\r\n").0, 404);
    let (status, r) = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, 405);
    assert!(r.contains("Allow: GET, HEAD"), "{r}");
    assert_eq!(exchange(addr, b"DELETE /healthz HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(exchange(addr, b"\x00\x01 garbage\r\n\r\n").0, 400);
    // A head longer than the listener reads.
    let mut long = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', luafcgid::metrics::MAX_REQUEST));
    assert_eq!(exchange(addr, &long).0, 431);
    // A client that sends nothing is answered 408 after the timeout.
    let t = Instant::now();
    let mut silent = TcpStream::connect(addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut out = String::new();
    let _ = silent.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(t.elapsed() >= luafcgid::metrics::IO_TIMEOUT);
    assert!(t.elapsed() < luafcgid::metrics::IO_TIMEOUT * 5);

    // At the connection cap, one more connection is closed at once, unanswered.
    let held: Vec<TcpStream> = (0..luafcgid::metrics::MAX_CONNECTIONS)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let t = Instant::now();
    let (status, r) = exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n");
    assert_eq!((status, r.as_str()), (0, ""), "closed unanswered");
    assert!(
        t.elapsed() < luafcgid::metrics::IO_TIMEOUT,
        "not left waiting for the held connections to time out"
    );
    // FastCGI is served meanwhile, and so are scrapes once the held connections go.
    assert_eq!(d.get("hello.lua").status, 200);
    drop(held);
    let t = Instant::now();
    loop {
        let (status, _) = exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n");
        if status == 200 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "never served again");
        std::thread::yield_now();
    }
    let m = scrape(addr);
    assert_eq!(m.sum("luafcgid_requests_total"), 1.0, "only FastCGI counts");
}

fn spin(secs: f64) -> String {
    format!("function handler() local t = os.clock() while os.clock() - t < {secs} do end return 'slow' end")
}

#[test]
fn queue_depth_in_flight_and_shed_reasons() {
    // One clone: a second request waits (the queue), a third finds its script's share of
    // the queue taken (shed at once), the second gives up after queue_timeout_ms (shed).
    let slow = spin(3.0);
    let d = Daemon::start_with(
        "queue_max = 4\nqueue_timeout_ms = 1500\ntenant_workers = 2",
        &[
            (
                "t/policy.toml",
                "clones = 1\ntimeout_ms = 20000\ninstructions = 100_000_000_000",
            ),
            ("t/slow.lua", &slow),
        ],
        with_metrics,
    );
    let addr = d.metrics.unwrap();
    std::thread::scope(|s| {
        let running = s.spawn(|| d.get("t/slow.lua"));
        d.wait_leased(1);
        let waiting = s.spawn(|| d.get("t/slow.lua"));
        d.wait_queued(1);
        let m = scrape(addr);
        assert_eq!(m.value("luafcgid_lua_in_flight", &[]), 1.0);
        assert_eq!(m.value("luafcgid_queue_depth", &[]), 1.0);
        assert_eq!(
            m.value("luafcgid_script_states", &[("script", "t/slow.lua")]),
            1.0
        );
        assert_eq!(d.get("t/slow.lua").status, 503);
        assert_eq!(waiting.join().unwrap().status, 503);
        assert_eq!(running.join().unwrap().status, 200);
    });
    let m = scrape(addr);
    assert_eq!(
        m.value("luafcgid_shed_total", &[("reason", "script_queue_full")]),
        1.0
    );
    assert_eq!(
        m.value("luafcgid_shed_total", &[("reason", "queue_timeout")]),
        1.0
    );
    assert_eq!(
        m.value("luafcgid_shed_total", &[("reason", "queue_full")]),
        0.0
    );
    assert_eq!(
        m.value(
            "luafcgid_requests_total",
            &[("outcome", "shed"), ("status", "503")]
        ),
        2.0
    );
    assert_eq!(m.value("luafcgid_queue_depth", &[]), 0.0);
    assert_eq!(m.value("luafcgid_lua_in_flight", &[]), 0.0);
}

#[test]
fn script_paths_in_labels_are_escaped() {
    let name = "we\"ird\nna\\me.lua";
    let d = Daemon::start_with("", &[(name, HELLO)], with_metrics);
    assert_eq!(d.get(name).status, 200);
    let (status, response) = exchange(d.metrics.unwrap(), b"GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200);
    assert!(
        response.contains("luafcgid_script_states{script=\"we\\\"ird\\nna\\\\me.lua\"} 1\n"),
        "{response}"
    );
    let m = parse(body(&response));
    assert_eq!(m.value("luafcgid_script_states", &[("script", name)]), 1.0);
}

#[test]
fn the_binary_serves_metrics_on_the_address_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap().join("www");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("hello.lua"), HELLO).unwrap();
    let stderr = dir.path().join("stderr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_luafcgid"))
        .args([
            "serve",
            "--workers",
            "1",
            "--metrics",
            "127.0.0.1:0",
            "--docroot",
        ])
        .arg(&root)
        .arg("--listen")
        .arg(dir.path().join("fcgi.sock"))
        .arg("--log")
        .arg(dir.path().join("audit.jsonl"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let addr: Option<SocketAddr> = loop {
        let text = std::fs::read_to_string(&stderr).unwrap_or_default();
        if let Some(rest) = text.split("metrics on http://").nth(1) {
            break rest.split_once("/metrics").and_then(|a| a.0.parse().ok());
        }
        if t.elapsed() > Duration::from_secs(10) || child.try_wait().unwrap().is_some() {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let healthz = addr.map(|a| exchange(a, b"GET /healthz HTTP/1.1\r\n\r\n").0);
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&stderr).unwrap();
    let addr = addr.unwrap_or_else(|| panic!("no metrics address in\n{text}"));
    assert!(addr.ip().is_loopback());
    assert_eq!(healthz, Some(200));
    assert!(!text.contains("not enforced"), "{text}");
}

#[test]
fn runs_of_a_slow_script_after_its_first_long_one_run_apart() {
    let d = Daemon::start_with(
        "",
        &[("slow.lua", &spin(0.02)), ("hello.lua", HELLO)],
        with_metrics,
    );
    let addr = d.metrics.unwrap();
    for _ in 0..3 {
        assert_eq!(d.get("hello.lua").status, 200);
    }
    assert_eq!(
        scrape(addr).value("luafcgid_runs_apart_total", &[]),
        0.0,
        "short runs stay inline"
    );
    for _ in 0..3 {
        let r = d.get("slow.lua");
        assert_eq!((r.status, r.body.as_slice()), (200, b"slow".as_slice()));
    }
    assert_eq!(
        scrape(addr).value("luafcgid_runs_apart_total", &[]),
        2.0,
        "the first long run marks the script; the next two run apart"
    );
    assert_eq!(d.get("hello.lua").status, 200);
    assert_eq!(scrape(addr).value("luafcgid_runs_apart_total", &[]), 2.0);
}
