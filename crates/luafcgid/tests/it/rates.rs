//! Rate limits through the real daemon: per client (IPv6 grouped per /64, `client_key`),
//! per script, per tenant and global; 429 with `Retry-After` before the body is read and
//! before Lua; each request counted once on every front end; key memory bounded under a
//! flood of distinct client addresses.

use std::time::{Duration, Instant};

use fastcgi_protocol::client::{encode_begin_request, encode_params};
use fastcgi_protocol::{encode_record, record_type, FLAG_KEEP_CONN, ROLE_RESPONDER};

use crate::support::*;

/// A GET of `rel` from the client `addr` (its `REMOTE_ADDR`) on connection `c`.
fn get_from(d: &Daemon, c: &mut Client, rel: &str, addr: &str) -> Response {
    let p = params_for(&d.script(rel), "GET", &[("REMOTE_ADDR", addr)]);
    c.request(1, true, &p, b"")
}

/// Statuses of GETs of `rel`, one per client address, in order.
fn statuses(d: &Daemon, rel: &str, addrs: &[&str]) -> Vec<u16> {
    let mut c = d.client();
    addrs
        .iter()
        .map(|a| get_from(d, &mut c, rel, a).status)
        .collect()
}

/// The `request` audit line whose `error` names `what`.
fn limited_lines<'a>(lines: &'a [serde_json::Value], what: &str) -> Vec<&'a serde_json::Value> {
    requests(lines)
        .into_iter()
        .filter(|l| l["error"] == what)
        .collect()
}

fn retry_after(r: &Response) -> u64 {
    r.header("Retry-After")
        .unwrap_or_else(|| panic!("no Retry-After in {:?}", r.headers))
        .parse()
        .unwrap()
}

#[test]
fn per_client_limits_each_client_and_groups_ipv6_per_64() {
    let mut d = Daemon::start(
        "",
        &[
            ("c/policy.toml", "[rate]\nper_client = \"2/s\"\nburst = 2\n"),
            ("c/hello.lua", HELLO),
            ("v6/policy.toml", "[rate]\nper_client = \"2/h\"\n"),
            ("v6/hello.lua", HELLO),
        ],
    );
    // Three requests within a second from one client: the third is over (and the first
    // two show each request is counted once, not once per front-end stage).
    let mut c = d.client();
    let one = "192.0.2.1";
    assert_eq!(get_from(&d, &mut c, "c/hello.lua", one).status, 200);
    assert_eq!(get_from(&d, &mut c, "c/hello.lua", one).status, 200);
    let r = get_from(&d, &mut c, "c/hello.lua", one);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(retry_after(&r) >= 1);
    assert!(r.header("X-Request-Id").is_some());
    assert_eq!(get_from(&d, &mut c, "c/hello.lua", "192.0.2.2").status, 200);

    // IPv6: one bucket per /64.
    let same_64 = [
        "2001:db8:1:2::1",
        "2001:db8:1:2:aaaa:bbbb:cccc:dddd",
        "2001:db8:1:2::ffff",
    ];
    assert_eq!(statuses(&d, "v6/hello.lua", &same_64), [200, 200, 429]);
    assert_eq!(statuses(&d, "v6/hello.lua", &["2001:db8:1:3::1"]), [200]);
    // An IPv4-mapped address is its IPv4 address.
    assert_eq!(
        statuses(
            &d,
            "v6/hello.lua",
            &["198.51.100.7", "::ffff:198.51.100.7", "198.51.100.7"]
        ),
        [200, 200, 429]
    );

    let lines = d.stop();
    let limited = limited_lines(&lines, "rate limit per_client");
    assert_eq!(limited.len(), 3, "{limited:?}");
    for l in limited {
        assert_eq!(l["outcome"], "rate_limited");
        assert_eq!(l["status"], 429);
    }
}

#[test]
fn client_key_names_the_param_and_falls_back_to_the_peer() {
    let d = Daemon::start(
        "client_key = \"HTTP_X_CLIENT\"",
        &[
            ("policy.toml", "[rate]\nper_client = \"1/h\"\n"),
            ("hello.lua", HELLO),
        ],
    );
    let script = d.script("hello.lua");
    let mut c = d.client();
    let mut get = |pairs: &[(&str, &str)]| {
        c.request(1, true, &params_for(&script, "GET", pairs), b"")
            .status
    };
    // Same REMOTE_ADDR, different keys: separate buckets.
    assert_eq!(get(&[("HTTP_X_CLIENT", "alice")]), 200);
    assert_eq!(get(&[("HTTP_X_CLIENT", "bob")]), 200);
    // Same key from another REMOTE_ADDR: the same bucket.
    assert_eq!(
        get(&[("HTTP_X_CLIENT", "alice"), ("REMOTE_ADDR", "203.0.113.9")]),
        429
    );
    // Without the param: the peer address (127.0.0.1 here), whatever REMOTE_ADDR says.
    assert_eq!(get(&[("REMOTE_ADDR", "203.0.113.1")]), 200);
    assert_eq!(get(&[("REMOTE_ADDR", "203.0.113.2")]), 429);
}

#[test]
fn per_script_and_per_tenant() {
    let mut d = Daemon::start(
        "",
        &[
            ("s/policy.toml", "[rate]\nper_script = \"2/h\"\n"),
            ("s/x.lua", HELLO),
            ("s/y.lua", HELLO),
            ("a/policy.toml", "[rate]\nper_tenant = \"3/h\"\n"),
            ("a/x.lua", HELLO),
            ("a/sub/y.lua", HELLO),
            ("b/policy.toml", "[rate]\nper_tenant = \"3/h\"\n"),
            ("b/z.lua", HELLO),
        ],
    );
    // Per script: whoever asks.
    assert_eq!(
        statuses(&d, "s/x.lua", &["192.0.2.1", "192.0.2.2", "192.0.2.3"]),
        [200, 200, 429]
    );
    assert_eq!(statuses(&d, "s/y.lua", &["192.0.2.4"]), [200]);

    // Per tenant: two scripts of tenant `a` share its bucket; tenant `b`, with the same
    // rate, has its own.
    let mut c = d.client();
    let mut get = |rel: &str| get_from(&d, &mut c, rel, "198.51.100.1").status;
    assert_eq!(get("a/x.lua"), 200);
    assert_eq!(get("a/sub/y.lua"), 200);
    assert_eq!(get("a/x.lua"), 200);
    assert_eq!(get("a/sub/y.lua"), 429);
    assert_eq!(get("a/x.lua"), 429);
    assert_eq!(get("b/z.lua"), 200);

    let lines = d.stop();
    assert_eq!(limited_lines(&lines, "rate limit per_script").len(), 1);
    let tenant = limited_lines(&lines, "rate limit per_tenant");
    assert_eq!(tenant.len(), 2);
    assert!(tenant.iter().all(|l| l["tenant"] == "a"), "{tenant:?}");
}

#[test]
fn rate_global_from_the_config() {
    let mut d = Daemon::start(
        "rate_global = \"3/h\"",
        &[("a/x.lua", HELLO), ("b/y.lua", HELLO)],
    );
    assert_eq!(
        statuses(&d, "a/x.lua", &["192.0.2.1", "192.0.2.2"]),
        [200, 200]
    );
    let r = d.get("b/y.lua");
    assert_eq!(r.status, 200);
    let r = d.get("b/y.lua");
    assert_eq!(r.status, 429);
    assert!(retry_after(&r) >= 1000, "{:?}", r.headers);
    // Requests refused before their policy is known are not counted (nor limited).
    assert_eq!(d.get("missing.lua").status, 404);
    let lines = d.stop();
    assert_eq!(limited_lines(&lines, "rate limit rate_global").len(), 1);
}

#[test]
fn zero_rate_global_is_off() {
    let d = Daemon::start("rate_global = \"0/s\"", &[("hello.lua", HELLO)]);
    for _ in 0..20 {
        assert_eq!(d.get("hello.lua").status, 200);
    }
}

#[test]
fn a_limited_request_touches_no_lua() {
    let mut d = Daemon::start(
        "",
        &[
            ("policy.toml", "[rate]\nper_client = \"1/h\"\n"),
            ("x.lua", HELLO),
            // Loading this script would leave a state in the pool.
            (
                "y.lua",
                "loads = (loads or 0) + 1\nfunction handler() return loads end",
            ),
        ],
    );
    let mut c = d.client();
    assert_eq!(get_from(&d, &mut c, "x.lua", "192.0.2.1").status, 200);
    let r = get_from(&d, &mut c, "y.lua", "192.0.2.1");
    assert_eq!(r.status, 429);
    assert_eq!(d.shared.pool.stats().states, 1, "y.lua was loaded");
    assert_eq!(d.shared.pool.idle_states(&d.path("y.lua")), 0);
    let id = r.header("X-Request-Id").unwrap().to_string();
    let lines = d.stop();
    let line = requests(&lines)
        .into_iter()
        .find(|l| l["request_id"] == id)
        .unwrap();
    assert_eq!(line["outcome"], "rate_limited");
    assert_eq!(line["status"], 429);
    assert_eq!(line["error"], "rate limit per_client");
    assert_eq!(line["script"], "y.lua");
    assert!(line["instructions"].is_null(), "{line}");
    assert!(line["memory"].is_null(), "{line}");
    assert!(line["state"].is_null(), "{line}");
}

#[test]
fn a_limited_post_is_answered_before_its_body() {
    let mut d = Daemon::start(
        "read_timeout_ms = 30000",
        &[
            (
                "policy.toml",
                "body = \"64MiB\"\n[rate]\nper_client = \"1/h\"\n",
            ),
            (
                "echo.lua",
                "function handler(r) return #(r:body() or '') end",
            ),
        ],
    );
    let script = d.script("echo.lua");
    let mut c = d.client();
    let from = |addr: &str, len: usize| {
        params_for(
            &script,
            "POST",
            &[("REMOTE_ADDR", addr), ("CONTENT_LENGTH", &len.to_string())],
        )
    };
    assert_eq!(
        c.request(1, true, &from("192.0.2.1", 3), b"abc").text(),
        "3"
    );

    // Over its limit: the params and the first 64 KiB of a 32 MiB body, then nothing.
    // The answer must come now; a daemon waiting for the body would wait 30 s.
    let total = 32 << 20;
    let chunk = vec![b'x'; 65535];
    let mut out = Vec::new();
    encode_begin_request(1, ROLE_RESPONDER, FLAG_KEEP_CONN, &mut out);
    let p = from("192.0.2.1", total);
    encode_params(
        1,
        p.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())),
        &mut out,
    );
    encode_record(record_type::STDIN, 1, &chunk, &mut out);
    c.send(&out);
    c.stream.set_timeout(Some(Duration::from_secs(10)));
    let started = Instant::now();
    let r = c.response(1);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(started.elapsed() < Duration::from_secs(10));
    let id = r.header("X-Request-Id").unwrap().to_string();

    // The rest of the body is ignored (the id ended with the answer); the connection and
    // the id serve the next request.
    let mut out = Vec::new();
    let mut sent = chunk.len();
    while sent < total {
        let n = chunk.len().min(total - sent);
        encode_record(record_type::STDIN, 1, &chunk[..n], &mut out);
        sent += n;
    }
    encode_record(record_type::STDIN, 1, &[], &mut out);
    c.send(&out);
    assert_eq!(
        c.request(1, true, &from("192.0.2.2", 3), b"def").text(),
        "3"
    );

    let lines = d.stop();
    let line = requests(&lines)
        .into_iter()
        .find(|l| l["request_id"] == id)
        .unwrap();
    assert_eq!(line["outcome"], "rate_limited");
    assert_eq!(line["bytes_in"], 0, "the body was not read: {line}");
}

#[test]
fn the_http_listener_counts_each_request_once() {
    let d = Daemon::start(
        "",
        &[
            ("policy.toml", "[rate]\nper_client = \"2/h\"\n"),
            ("hello.lua", HELLO),
        ],
    );
    let (a, _) = http_get(d.http, "/hello.lua");
    let (b, _) = http_get(d.http, "/hello.lua");
    let (c, text) = http_get(d.http, "/hello.lua");
    assert_eq!((a, b, c), (200, 200, 429), "{text}");
    assert!(text.contains("Retry-After: "), "{text}");
}

/// Sends `n` GETs of `rel` from distinct client addresses (`10.x.y.z` counting from
/// `first`) over a few connections; returns how many were answered 200 and 429.
fn flood(d: &Daemon, rel: &str, first: u32, n: u32) -> (u32, u32) {
    const THREADS: u32 = 4;
    let script = d.script(rel);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let script = script.clone();
                s.spawn(move || {
                    let mut c = d.client();
                    let (mut ok, mut limited) = (0, 0);
                    let mut i = t;
                    while i < n {
                        let addr = std::net::Ipv4Addr::from_bits((10 << 24) + first + i);
                        let p = params_for(&script, "GET", &[("REMOTE_ADDR", &addr.to_string())]);
                        match c.request(1, true, &p, b"").status {
                            200 => ok += 1,
                            429 => limited += 1,
                            s => panic!("status {s}"),
                        }
                        i += THREADS;
                    }
                    (ok, limited)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    })
}

#[test]
fn a_flood_of_client_addresses_holds_bounded_key_memory() {
    use luafcgid::ratelimit::MAX_KEYS;
    let d = Daemon::start(
        "",
        &[
            // Buckets that stay in use for an hour: only the cap bounds them.
            ("policy.toml", "[rate]\nper_client = \"2/h\"\n"),
            ("hello.lua", HELLO),
        ],
    );
    let n = 2 * MAX_KEYS as u32;
    let (ok, limited) = flood(&d, "hello.lua", 0, n);
    let keys = d.shared.rates.keys();
    assert!(keys.clients <= MAX_KEYS, "{keys:?}");
    assert!(keys.clients >= MAX_KEYS - 8, "{keys:?}");
    // The first MAX_KEYS clients got their own buckets; the rest share one overflow
    // bucket of this quota (2 requests), so nearly all of them were refused.
    assert!(
        ok >= MAX_KEYS as u32 && ok <= MAX_KEYS as u32 + 10,
        "{ok} {limited}"
    );
    assert_eq!(ok + limited, n);
    // A client known before the flood keeps its own bucket (its second request).
    let mut c = d.client();
    assert_eq!(get_from(&d, &mut c, "hello.lua", "10.0.0.0").status, 200);
    assert_eq!(get_from(&d, &mut c, "hello.lua", "10.0.0.0").status, 429);
}

#[test]
fn idle_client_keys_are_dropped_by_the_sweeper() {
    let d = Daemon::start(
        "sweep_ms = 20",
        &[
            // A bucket is full again 2 ms after its request: idle at the next sweep.
            ("policy.toml", "[rate]\nper_client = \"500/s\"\nburst = 1\n"),
            ("hello.lua", HELLO),
        ],
    );
    let (ok, _) = flood(&d, "hello.lua", 0, 20_000);
    assert!(ok > 0);
    let start = Instant::now();
    loop {
        let keys = d.shared.rates.keys();
        if keys.clients == 0 && keys.limiters == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{keys:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
