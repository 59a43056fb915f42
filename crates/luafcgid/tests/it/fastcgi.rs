//! The FastCGI front end: framing, keep-alive, multiplexing, management records, abort,
//! malformed input, limits and timeouts.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use fastcgi_protocol::client::{
    encode_abort, encode_begin_request, encode_get_values, encode_params, Reply,
};
use fastcgi_protocol::{encode_record, record_type, FLAG_KEEP_CONN, ROLE_RESPONDER};

use crate::support::*;

#[test]
fn hello_over_tcp_and_unix() {
    let d = Daemon::start("", &[("hello.lua", HELLO)]);
    let r = d.get("hello.lua");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "Hello World");
    assert_eq!(r.header("Content-Type"), Some("text/html"));
    assert_eq!(r.header("Content-Length"), Some("11"));
    assert_eq!(r.header("X-Request-Id").map(str::len), Some(16));
    let r = d.unix_client().get(&d.script("hello.lua"));
    assert_eq!(r.text(), "Hello World");
}

#[test]
fn keep_conn_reuses_the_connection_and_its_absence_closes_it() {
    let d = Daemon::start("", &[("hello.lua", HELLO)]);
    let mut c = d.client();
    for _ in 0..5 {
        assert_eq!(c.get(&d.script("hello.lua")).text(), "Hello World");
    }
    let p = params_for(&d.script("hello.lua"), "GET", &[]);
    let r = c.request(1, false, &p, b"");
    assert_eq!(r.text(), "Hello World");
    assert!(
        c.closed(),
        "connection must close after a request without KEEP_CONN"
    );
}

#[test]
fn params_split_at_every_record_boundary_and_padding() {
    let d = Daemon::start("", &[("hello.lua", HELLO)]);
    let p = params_for(
        &d.script("hello.lua"),
        "GET",
        &[("HTTP_COOKIE", &"c".repeat(300))],
    );
    let mut stream = Vec::new();
    for (k, v) in &p {
        fastcgi_protocol::encode_pair(k.as_bytes(), v.as_bytes(), &mut stream);
    }
    let mut c = d.client();
    for split in [1usize, 3, 7, 64] {
        let mut out = Vec::new();
        encode_begin_request(1, ROLE_RESPONDER, FLAG_KEEP_CONN, &mut out);
        for chunk in stream.chunks(split) {
            encode_record(record_type::PARAMS, 1, chunk, &mut out);
        }
        encode_record(record_type::PARAMS, 1, &[], &mut out);
        encode_record(record_type::STDIN, 1, &[], &mut out);
        // Repeated empty STDIN and a trailing empty DATA record are tolerated.
        encode_record(record_type::STDIN, 1, &[], &mut out);
        encode_record(record_type::DATA, 1, &[], &mut out);
        c.send(&out);
        assert_eq!(c.response(1).text(), "Hello World", "split {split}");
    }
}

#[test]
fn four_byte_lengths_and_large_params() {
    let d = Daemon::start(
        "",
        &[(
            "env.lua",
            "function handler(r) return #r.env.HTTP_COOKIE end",
        )],
    );
    let big = "x".repeat(200_000);
    let p = params_for(&d.script("env.lua"), "GET", &[("HTTP_COOKIE", &big)]);
    let r = d.client().request(1, true, &p, b"");
    assert_eq!(r.text(), "200000");
}

#[test]
fn params_over_the_limit_close_the_connection() {
    let d = Daemon::start("max_params = \"4KiB\"", &[("hello.lua", HELLO)]);
    let p = params_for(
        &d.script("hello.lua"),
        "GET",
        &[("HTTP_COOKIE", &"x".repeat(8000))],
    );
    let mut c = d.client();
    c.send(&crate::support::Client::encode(1, true, &p, b""));
    assert!(c.reply().is_none(), "no reply, the connection closes");
    // Others are still served.
    assert_eq!(d.get("hello.lua").text(), "Hello World");
}

#[test]
fn stdin_in_records_of_any_size_and_body_reaches_the_script() {
    let d = Daemon::start(
        "",
        &[(
            "echo.lua",
            "function handler(r) return r:body() or 'nil' end",
        )],
    );
    let body: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let p = params_for(
        &d.script("echo.lua"),
        "POST",
        &[("CONTENT_LENGTH", "100000")],
    );
    let mut c = d.client();
    for size in [1usize, 1000, 65535] {
        let mut out = Vec::new();
        encode_begin_request(1, ROLE_RESPONDER, FLAG_KEEP_CONN, &mut out);
        encode_params(
            1,
            p.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())),
            &mut out,
        );
        for chunk in body.chunks(size) {
            encode_record(record_type::STDIN, 1, chunk, &mut out);
        }
        encode_record(record_type::STDIN, 1, &[], &mut out);
        c.send(&out);
        assert_eq!(c.response(1).body, body, "records of {size}");
    }
    let r = c.request(1, true, &params_for(&d.script("echo.lua"), "GET", &[]), b"");
    assert_eq!(r.text(), "nil");
}

#[test]
fn body_over_the_limit_is_413_before_lua() {
    let d = Daemon::start(
        "[defaults]\nbody = 1000\n",
        &[(
            "count.lua",
            "n = 0\nfunction handler(r) n = n + 1 return n end",
        )],
    );
    let p = params_for(&d.script("count.lua"), "POST", &[]);
    let mut c = d.client();
    let r = c.request(1, true, &p, &vec![b'x'; 5000]);
    assert_eq!(r.status, 413);
    let r = c.request(1, true, &p, &vec![b'x'; 1000]);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "1", "the 413 request never ran the script");
}

#[test]
fn responses_use_records_of_at_most_65535_bytes() {
    let d = Daemon::start(
        "",
        &[(
            "big.lua",
            "function handler() return string.rep('z', 300000) end",
        )],
    );
    let r = d.get("big.lua");
    assert_eq!(r.body.len(), 300_000);
    assert!(r.largest_record <= 65535);
    assert!(r.stdout_records >= 5);
    assert_eq!(r.protocol_status, 0);
}

#[test]
fn get_values_reports_true_values() {
    let d = Daemon::start("max_connections = 77", &[]);
    let mut c = d.client();
    let mut out = Vec::new();
    encode_get_values(
        &[
            b"FCGI_MAX_CONNS",
            b"FCGI_MPXS_CONNS",
            b"FCGI_MAX_REQS",
            b"OTHER",
        ],
        &mut out,
    );
    c.send(&out);
    match c.reply().unwrap() {
        Reply::GetValuesResult(pairs) => {
            let get = |n: &[u8]| pairs.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
            assert_eq!(get(b"FCGI_MAX_CONNS"), Some(b"77".to_vec()));
            assert_eq!(get(b"FCGI_MPXS_CONNS"), Some(b"1".to_vec()));
            assert!(get(b"FCGI_MAX_REQS").is_some());
            assert_eq!(get(b"OTHER"), None);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_type_and_unknown_role() {
    let d = Daemon::start("", &[("hello.lua", HELLO)]);
    let mut c = d.client();
    let mut out = Vec::new();
    encode_record(42, 0, b"????????", &mut out);
    c.send(&out);
    match c.reply().unwrap() {
        Reply::UnknownType(t) => assert_eq!(t, 42),
        other => panic!("{other:?}"),
    }
    let mut out = Vec::new();
    encode_begin_request(3, 3 /* FILTER */, FLAG_KEEP_CONN, &mut out);
    c.send(&out);
    match c.reply().unwrap() {
        Reply::End { id, status, .. } => {
            assert_eq!(id, 3);
            assert_eq!(status, 3, "FCGI_UNKNOWN_ROLE");
        }
        other => panic!("{other:?}"),
    }
    // Records for ids not in use are ignored; the connection still works.
    let mut out = Vec::new();
    encode_record(record_type::STDIN, 9, b"stray", &mut out);
    c.send(&out);
    assert_eq!(c.get(&d.script("hello.lua")).text(), "Hello World");
}

#[test]
fn multiplexed_requests_complete_out_of_order() {
    // One tenant's two requests at once: let it use both workers.
    let d = Daemon::start(
        "tenant_workers = 2",
        &[
            ("slow.lua", "function handler() local t = os.clock() while os.clock() - t < 0.3 do end return 'slow' end"),
            ("hello.lua", HELLO),
        ],
    );
    let mut c = d.client();
    let mut out = Client::encode(1, true, &params_for(&d.script("slow.lua"), "GET", &[]), b"");
    out.extend(Client::encode(
        2,
        true,
        &params_for(&d.script("hello.lua"), "GET", &[]),
        b"",
    ));
    c.send(&out);
    let mut done = Vec::new();
    let mut bodies = std::collections::HashMap::<u16, Vec<u8>>::new();
    while done.len() < 2 {
        match c.reply().unwrap() {
            Reply::Stdout { id, data } => bodies.entry(id).or_default().extend(data),
            Reply::End { id, .. } => done.push(id),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(done, vec![2, 1], "the fast request finishes first");
    assert!(parse_cgi(&bodies[&1]).2 == b"slow");
    assert!(parse_cgi(&bodies[&2]).2 == b"Hello World");
}

#[test]
fn abort_request_stops_lua_and_is_logged() {
    let mut d = Daemon::start(
        "[defaults]\ntimeout_ms = 20000\ninstructions = 100000000000\n",
        &[("spin.lua", "function handler() while true do end end")],
    );
    let mut c = d.sent_get("spin.lua");
    // Whether Lua has started or not, the abort must end the request.
    let started = Instant::now();
    let mut out = Vec::new();
    encode_abort(1, &mut out);
    c.send(&out);
    match c.reply().unwrap() {
        Reply::End { id, .. } => assert_eq!(id, 1),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let lines = d.stop();
    let reqs = requests(&lines);
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0]["outcome"], "aborted");
}

#[test]
fn closed_connection_stops_lua() {
    let mut d = Daemon::start(
        "[defaults]\ntimeout_ms = 20000\ninstructions = 100000000000\n",
        &[
            ("spin.lua", "function handler() while true do end end"),
            ("hello.lua", HELLO),
        ],
    );
    let started = Instant::now();
    {
        let _hung_up = d.sent_get("spin.lua");
        d.wait_leased(1);
    }
    // The worker must be free again long before the 20 s timeout: then a second spin.
    d.wait_leased_at_most(0);
    let c2 = d.sent_get("spin.lua");
    d.wait_leased(1);
    drop(c2);
    assert_eq!(d.get("hello.lua").text(), "Hello World");
    assert!(started.elapsed() < Duration::from_secs(10));
    let lines = d.stop();
    let outcomes = outcomes(&lines);
    assert_eq!(
        outcomes.iter().filter(|o| *o == "aborted").count(),
        2,
        "{outcomes:?}"
    );
}

#[test]
fn closed_connection_stops_a_slow_script_run_apart() {
    // The first run is long, which marks the script slow: the next runs apart from the
    // connection threads, where only the connection task can see its client hang up.
    let mut d = Daemon::start(
        "[defaults]\ntimeout_ms = 20000\ninstructions = 100000000000\n",
        &[(
            "spin.lua",
            "n = 0\nfunction handler()\n  n = n + 1\n  local t = os.clock()\n  \
             while n > 1 or os.clock() - t < 0.05 do end\n  return 'warm'\nend\n",
        )],
    );
    assert_eq!(d.get("spin.lua").text(), "warm");
    let started = Instant::now();
    {
        let _hung_up = d.sent_get("spin.lua");
        d.wait_leased(1);
    }
    d.wait_leased_at_most(0);
    assert!(started.elapsed() < Duration::from_secs(10));
    let lines = d.stop();
    let outcomes = outcomes(&lines);
    assert_eq!(outcomes, ["ok", "aborted"]);
}

#[test]
fn malformed_records_close_only_that_connection() {
    let d = Daemon::start("", &[("hello.lua", HELLO)]);
    let cases: Vec<Vec<u8>> = vec![
        // Bad version.
        vec![2, 1, 0, 1, 0, 8, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0],
        // BEGIN_REQUEST with short content.
        vec![1, 1, 0, 1, 0, 2, 0, 0, 0, 1],
        // STDIN before the params ended.
        {
            let mut o = Vec::new();
            encode_begin_request(1, ROLE_RESPONDER, 0, &mut o);
            encode_record(record_type::STDIN, 1, b"x", &mut o);
            o
        },
        // Duplicate request id.
        {
            let mut o = Vec::new();
            encode_begin_request(1, ROLE_RESPONDER, 0, &mut o);
            encode_begin_request(1, ROLE_RESPONDER, 0, &mut o);
            o
        },
        // Random bytes.
        (0..64u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8 | 0x80)
            .collect(),
    ];
    for (i, bytes) in cases.iter().enumerate() {
        let mut c = d.client();
        c.send(bytes);
        assert!(c.reply().is_none(), "case {i}: connection closes");
        assert_eq!(d.get("hello.lua").text(), "Hello World", "case {i}");
    }
}

#[test]
fn malformed_pairs_are_400() {
    let d = Daemon::start("", &[("hello.lua", HELLO)]);
    let mut out = Vec::new();
    encode_begin_request(1, ROLE_RESPONDER, FLAG_KEEP_CONN, &mut out);
    // A name length running past the end of the stream.
    encode_record(record_type::PARAMS, 1, &[0x7f, 1, b'a'], &mut out);
    encode_record(record_type::PARAMS, 1, &[], &mut out);
    encode_record(record_type::STDIN, 1, &[], &mut out);
    let mut c = d.client();
    c.send(&out);
    assert_eq!(c.response(1).status, 400);
    assert_eq!(
        c.get(&d.script("hello.lua")).status,
        200,
        "the connection survives"
    );
}

#[test]
fn missing_script_filename_is_400() {
    let d = Daemon::start("", &[]);
    let p = vec![("REQUEST_METHOD".to_string(), "GET".to_string())];
    assert_eq!(d.client().request(1, true, &p, b"").status, 400);
}

#[test]
fn slow_client_times_out_without_a_worker() {
    let d = Daemon::start("read_timeout_ms = 300", &[("hello.lua", HELLO)]);
    let mut slow = d.client();
    let mut out = Vec::new();
    encode_begin_request(1, ROLE_RESPONDER, FLAG_KEEP_CONN, &mut out);
    slow.send(&out);
    // Meanwhile others are served.
    assert_eq!(d.get("hello.lua").text(), "Hello World");
    let t = Instant::now();
    assert!(
        slow.reply().is_none(),
        "the daemon closes a request that stalls"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_client_that_never_reads_its_reply_is_dropped_after_the_write_timeout() {
    // 4 MiB, far more than a socket buffer holds; one connection at a time, so the next one
    // is served only once the daemon has dropped the stuck one.
    let big = "function handler(r) local s = string.rep('x', 1024) \
               for i = 1, 4096 do r:puts(s) end end";
    let d = Daemon::start(
        "read_timeout_ms = 300\nmax_connections = 1\n",
        &[("big.lua", big), ("hello.lua", HELLO)],
    );
    let mut stuck = d.unix_client();
    let params = params_for(&d.script("big.lua"), "GET", &[]);
    stuck.send(&Client::encode(1, true, &params, b""));
    let t = Instant::now();
    loop {
        // Refused (closed at once, maybe before the request is even sent) while the stuck
        // connection holds the only slot.
        let mut c = d.unix_client();
        let hello = params_for(&d.script("hello.lua"), "GET", &[]);
        let sent = c
            .stream
            .write_all(&Client::encode(1, true, &hello, b""))
            .is_ok();
        if sent && c.reply().is_some() {
            break;
        }
        assert!(
            t.elapsed() < BOUND,
            "the daemon kept a connection nobody read from"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    // The stuck client gets what was in the socket's buffer, then the end.
    let mut got = Vec::new();
    let _ = stuck.stream.read_to_end(&mut got);
    assert!(got.len() < 4 << 20, "{} bytes", got.len());
}

#[test]
fn idle_keep_alive_connection_is_closed() {
    let d = Daemon::start("idle_timeout_ms = 200", &[("hello.lua", HELLO)]);
    let mut c = d.client();
    assert_eq!(c.get(&d.script("hello.lua")).status, 200);
    let t = Instant::now();
    assert!(c.reply().is_none());
    assert!(t.elapsed() >= Duration::from_millis(150));
}

#[test]
fn connection_cap_refuses_extra_connections() {
    let d = Daemon::start("max_connections = 2", &[("hello.lua", HELLO)]);
    let mut a = d.client();
    let mut b = d.client();
    assert_eq!(a.get(&d.script("hello.lua")).status, 200);
    assert_eq!(b.get(&d.script("hello.lua")).status, 200);
    let mut c = d.client();
    let mut buf = [0u8; 1];
    let n = c.stream.read(&mut buf);
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "third connection is closed at once"
    );
    drop(a);
    // A freed slot is reusable; the accept loop sees the close asynchronously, so retry.
    let mut ok = false;
    for _ in 0..100 {
        let mut c = d.sent_get("hello.lua");
        if let Some(Reply::Stdout { .. }) = c.reply() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ok);
}

#[test]
fn management_records_are_answered_while_every_worker_is_busy() {
    let d = Daemon::start(
        "tenant_workers = 2\n[defaults]\ntimeout_ms = 3000\ninstructions = 100000000000\nclones = 4\n",
        &[("spin.lua", "function handler() local t = os.clock() while os.clock() - t < 1.5 do end return 'x' end")],
    );
    let mut busy: Vec<Client> = (0..2).map(|_| d.sent_get("spin.lua")).collect();
    d.wait_leased(2);
    let t = Instant::now();
    let mut c = d.client();
    let mut out = Vec::new();
    encode_get_values(&[b"FCGI_MPXS_CONNS"], &mut out);
    c.send(&out);
    assert!(matches!(c.reply(), Some(Reply::GetValuesResult(_))));
    let missing = d.client().get(&d.script("missing.lua"));
    assert_eq!(missing.status, 404);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    for b in &mut busy {
        assert_eq!(b.response(1).text(), "x");
    }
}

#[test]
fn ipv6_listener_and_several_listeners_at_once() {
    let d = Daemon::start_with("", &[("hello.lua", HELLO)], |o| {
        o.listen.push("[::1]:0".into());
    });
    let v6 = d
        .shared
        .config
        .listen
        .iter()
        .any(|l| l.to_string().starts_with("[::1]"));
    assert!(v6);
    // The bound port of the v6 listener is not known from the config; the server reports it.
    let addrs = d.bound.clone();
    let v6 = addrs
        .iter()
        .find_map(|a| match a {
            luafcgid::config::ListenAddr::Tcp(t) if t.is_ipv6() => Some(*t),
            _ => None,
        })
        .unwrap();
    let mut c = Client::new(Box::new(std::net::TcpStream::connect(v6).unwrap()));
    assert_eq!(c.get(&d.script("hello.lua")).text(), "Hello World");
    assert_eq!(
        d.unix_client().get(&d.script("hello.lua")).text(),
        "Hello World"
    );
    assert_eq!(d.get("hello.lua").text(), "Hello World");
}

#[test]
fn stale_socket_file_is_replaced_and_mode_applied() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(
        stale.exists(),
        "a socket file left behind by a dead process"
    );
    let s = stale.clone();
    let d = Daemon::start_with(
        "socket_mode = \"0600\"",
        &[("hello.lua", HELLO)],
        move |o| {
            o.listen = vec!["127.0.0.1:0".into(), s.display().to_string()];
        },
    );
    let mode = std::fs::metadata(&stale).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut c = Client::new(Box::new(
        std::os::unix::net::UnixStream::connect(&stale).unwrap(),
    ));
    assert_eq!(c.get(&d.script("hello.lua")).text(), "Hello World");
}

#[test]
fn connections_are_served_during_a_long_c_call() {
    served_during_a_long_c_call(false);
}

#[test]
fn connections_are_served_during_a_long_c_call_that_starts_while_the_daemon_idles() {
    served_during_a_long_c_call(true);
}

fn served_during_a_long_c_call(from_idle: bool) {
    // One call into C that runs for a long time without a hook firing: the runtime must
    // still accept and serve other connections meanwhile.
    let long_c = "function handler() local s = string.rep('a', 28) return tostring(s:find('.-.-.-.-.-.-.-.-b')) end";
    let d = Daemon::start(
        "tenant_workers = 2\n[defaults]\ntimeout_ms = 20000\ninstructions = 100000000000\n",
        &[("pattern.lua", long_c), ("hello.lua", HELLO)],
    );
    if from_idle {
        // The thread that keeps the runtime's IO driver polled parks while nothing runs.
        let t = Instant::now();
        while !d.shared.driver_watch.is_parked() {
            assert!(t.elapsed() < BOUND, "the driver watch never parked");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let mut slow = d.sent_get("pattern.lua");
    d.wait_leased(1);
    let t = Instant::now();
    assert_eq!(d.get("hello.lua").text(), "Hello World");
    let fast = t.elapsed();
    let r = slow.response(1);
    let slow_took = t.elapsed();
    assert_eq!(r.text(), "nil");
    assert!(
        slow_took > Duration::from_millis(300),
        "the C call must be long for this test: {slow_took:?}"
    );
    assert!(
        fast < slow_took / 3,
        "hello waited for the C call: {fast:?} of {slow_took:?}"
    );
}
