//! The audit log through the real daemon: one line per request for every outcome, each
//! line checked against the schema tables of docs/audit-log.md; script and client text that
//! tries to forge or flood lines; the file reopened on SIGUSR1 (the real binary); a writer
//! blocked on a pipe (requests still answered, the lost lines counted); a full disk.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fastcgi_protocol::client::{encode_abort, encode_begin_request, encode_params, encode_stdin};
use fastcgi_protocol::{FLAG_KEEP_CONN, ROLE_RESPONDER};
use serde_json::Value;

use crate::support::*;

// ---------------------------------------------------------------------------------------
// The schema, read from the documentation.

/// A JSON type as docs/audit-log.md names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    String,
    Integer,
    Strings,
    True,
    Null,
    Absent,
}

impl Ty {
    fn parse(word: &str) -> Ty {
        match word {
            "string" => Ty::String,
            "integer" => Ty::Integer,
            "array of strings" => Ty::Strings,
            "true" => Ty::True,
            "null" => Ty::Null,
            "absent" => Ty::Absent,
            other => panic!("docs/audit-log.md: unknown type {other:?}"),
        }
    }

    fn admits(self, v: &Value) -> bool {
        match self {
            Ty::String => v.is_string(),
            Ty::Integer => v.is_u64() || v.is_i64(),
            Ty::Strings => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
            Ty::True => *v == Value::Bool(true),
            Ty::Null => v.is_null(),
            Ty::Absent => false,
        }
    }
}

#[derive(Debug)]
struct Field {
    name: String,
    types: Vec<Ty>,
}

/// The tables of docs/audit-log.md.
#[derive(Debug, Default)]
pub(crate) struct Schema {
    common: Vec<Field>,
    request: Vec<Field>,
    lifecycle: BTreeMap<String, Vec<Field>>,
}

fn unquote(cell: &str) -> Option<&str> {
    cell.strip_prefix('`')?.strip_suffix('`')
}

fn field(name: &str, types: &str) -> Field {
    Field {
        name: name.to_string(),
        types: types.split(" or ").map(Ty::parse).collect(),
    }
}

pub(crate) fn schema() -> Schema {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/audit-log.md");
    let text = std::fs::read_to_string(path).unwrap();
    let mut schema = Schema::default();
    let mut section = String::new();
    let mut event = String::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            section = h.to_string();
            continue;
        }
        if !line.starts_with('|') || line.starts_with("|---") {
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let cells = &cells[1..cells.len() - 1];
        if section == "Every line" || section.starts_with("`request`") {
            let Some(name) = unquote(cells[0]) else {
                continue; // the header row
            };
            let f = field(name, cells[1]);
            if section == "Every line" {
                schema.common.push(f);
            } else {
                schema.request.push(f);
            }
        } else if section == "Lifecycle events" {
            if let Some(e) = unquote(cells[0]) {
                event = e.to_string();
            } else if !cells[0].is_empty() {
                continue; // the header row
            }
            let fields = schema.lifecycle.entry(event.clone()).or_default();
            if let Some(name) = unquote(cells[1]) {
                fields.push(field(name, cells[2]));
            }
        }
    }
    assert!(
        schema.common.len() == 2 && schema.request.len() > 10,
        "{schema:?}"
    );
    schema
}

/// The outcomes of DESIGN.md section 4 and their status (`None`: no answer).
const OUTCOMES: &[(&str, Option<u16>)] = &[
    ("ok", Some(200)),
    ("script_error", Some(500)),
    ("limit_cpu", Some(500)),
    ("limit_time", Some(500)),
    ("limit_memory", Some(500)),
    ("limit_output", Some(500)),
    ("body_too_large", Some(413)),
    ("rate_limited", Some(429)),
    ("shed", Some(503)),
    ("bad_request", Some(400)),
    ("not_found", Some(404)),
    ("forbidden", Some(403)),
    ("policy_error", Some(500)),
    ("aborted", None),
];

/// Outcomes that answer before Lua runs.
const BEFORE_LUA: &[&str] = &[
    "body_too_large",
    "rate_limited",
    "shed",
    "bad_request",
    "not_found",
    "forbidden",
    "policy_error",
];

fn is_hex_id(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS.ffffffZ`, or why it is not that.
fn parse_ts(ts: &str) -> Result<i64, String> {
    let b = ts.as_bytes();
    let shape = b.len() == 27
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b'T',
            13 | 16 => c == b':',
            19 => c == b'.',
            26 => c == b'Z',
            _ => c.is_ascii_digit(),
        });
    if !shape {
        return Err(format!("not RFC 3339 UTC with microseconds: {ts}"));
    }
    let n = |r: std::ops::Range<usize>| ts[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || n(11..13) > 23 || n(14..16) > 59 {
        return Err(format!("not a valid time: {ts}"));
    }
    // Days from civil (Howard Hinnant), as an independent check of the daemon's formatter.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19))
}

/// Parses one raw line of the log and checks it against the schema: documented event,
/// exactly the documented fields, each of a documented type, and the values the doc
/// promises (timestamps, ids, outcomes and their status, nulls before Lua runs).
fn check_line(schema: &Schema, raw: &str) -> Value {
    let v: Value = serde_json::from_str(raw).unwrap_or_else(|e| panic!("{e}: {raw}"));
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {raw}"));
    let kind = obj
        .get("event")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no event: {raw}"));
    let own = match kind {
        "request" => &schema.request,
        other => schema
            .lifecycle
            .get(other)
            .unwrap_or_else(|| panic!("event {other:?} is not documented: {raw}")),
    };
    let fields: Vec<&Field> = schema.common.iter().chain(own).collect();
    for f in &fields {
        match obj.get(&f.name) {
            None => assert!(
                f.types.contains(&Ty::Absent),
                "{kind}: `{}` missing: {raw}",
                f.name
            ),
            Some(val) => assert!(
                f.types.iter().any(|t| t.admits(val)),
                "{kind}: `{}` = {val} is not {:?}: {raw}",
                f.name,
                f.types
            ),
        }
    }
    for k in obj.keys() {
        assert!(
            fields.iter().any(|f| &f.name == k),
            "{kind}: field `{k}` is not documented: {raw}"
        );
    }
    let ts = parse_ts(obj["ts"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {raw}"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((ts - now).abs() < 600, "ts is not now (UTC): {raw}");
    if let Some(id) = obj.get("request_id").and_then(Value::as_str) {
        assert!(is_hex_id(id), "request_id: {raw}");
    }
    if kind == "request" {
        let outcome = obj["outcome"].as_str().unwrap();
        let (_, status) = OUTCOMES
            .iter()
            .find(|(o, _)| *o == outcome)
            .unwrap_or_else(|| panic!("unknown outcome: {raw}"));
        match status {
            Some(200) => assert!(obj["status"].is_u64(), "{raw}"),
            Some(s) => assert_eq!(obj["status"], *s, "{raw}"),
            None => assert!(obj["status"].is_null(), "{raw}"),
        }
        if BEFORE_LUA.contains(&outcome) {
            for k in ["instructions", "memory", "state"] {
                assert!(obj[k].is_null(), "{k} before Lua: {raw}");
            }
            assert_eq!(obj["bytes_out"], 0, "{raw}");
        }
        if outcome == "ok" {
            assert!(obj["error"].is_null(), "{raw}");
            for k in ["instructions", "memory"] {
                assert!(obj[k].is_u64(), "{raw}");
            }
        } else {
            assert!(obj["error"].is_string(), "{outcome} needs an error: {raw}");
        }
        if let Some(s) = obj["state"].as_str() {
            assert!(s == "new" || s == "warm", "{raw}");
        }
        if obj["script"].is_null() {
            assert!(obj["tenant"].is_null() && obj["policy"].is_null(), "{raw}");
        }
    }
    v
}

/// Every line of a log file, each checked.
pub(crate) fn check_file(schema: &Schema, path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'), "a cut last line");
    text.lines().map(|l| check_line(schema, l)).collect()
}

/// The lines of one event kind.
fn of_kind<'a>(lines: &'a [Value], kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["event"] == kind).collect()
}

/// Waits (bounded) until the log file holds a line containing `needle`.
fn wait_for_line(path: &Path, needle: &str) {
    let t = Instant::now();
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains(needle))
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "never logged {needle}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn the_documented_schema_is_well_formed() {
    let s = schema();
    let names: Vec<&str> = s.request.iter().map(|f| f.name.as_str()).collect();
    for required in ["request_id", "outcome", "status", "error", "duration_us"] {
        assert!(names.contains(&required), "{names:?}");
    }
    let events: Vec<&str> = s.lifecycle.keys().map(String::as_str).collect();
    for e in [
        "start",
        "stop",
        "state_evicted",
        "script_log",
        "log_dropped",
        "policy_loaded",
        "policy_rejected",
        "config_loaded",
        "config_rejected",
    ] {
        assert!(events.contains(&e), "{events:?}");
    }
    assert!(s.lifecycle["stop"].is_empty());
    // The checker takes what the doc says and refuses anything else.
    let now = |rest: &str| {
        let ts = luafcgid::audit::timestamp();
        format!(r#"{{"ts":"{ts}","event":"stop"{rest}}}"#)
    };
    check_line(&s, &now(""));
    for bad in [
        now(r#","x":1"#),
        now(r#","event":"nothing""#),
        r#"{"ts":"2026-01-01T00:00:00.000000Z","event":"stop"}"#.to_string(),
    ] {
        assert!(
            std::panic::catch_unwind(|| check_line(&s, &bad)).is_err(),
            "{bad}"
        );
    }
    assert!(parse_ts("2026-01-01T00:00:00.000000Z").is_ok());
    assert!(parse_ts("2026-01-01T00:00:00.000Z").is_err());
    assert!(parse_ts("2026-01-01T00:00:00.000000+01:00").is_err());
    assert_eq!(parse_ts("1970-01-02T00:00:01.000000Z"), Ok(86_401));
}

// ---------------------------------------------------------------------------------------
// Every outcome.

const SPIN: &str = "function handler() while true do end end";

/// Sends a request with raw params (bytes, not necessarily UTF-8) and reads its answer.
fn raw_request(c: &mut Client, params: &[(&[u8], &[u8])], body: &[u8]) -> Response {
    let mut out = Vec::new();
    encode_begin_request(1, ROLE_RESPONDER, FLAG_KEEP_CONN, &mut out);
    encode_params(1, params.iter().copied(), &mut out);
    encode_stdin(1, body, &mut out);
    c.send(&out);
    c.response(1)
}

#[test]
fn every_outcome_writes_one_line_with_the_documented_fields() {
    let schema = schema();
    let mut d = Daemon::start_with(
        "queue_timeout_ms = 100\n",
        &[
            ("hello.lua", HELLO),
            ("acme/policy.toml", "tenant = \"acme\"\n"),
            (
                "acme/ok.lua",
                "function handler(r) r:log('hello from ok') return 'ok' end",
            ),
            (
                "acme/chatty.lua",
                "function handler(r) for i = 1, 101 do r:log('m' .. i) end return 'chatty' end",
            ),
            (
                "acme/err.lua",
                "local function inner() error('boom') end\nfunction handler(r) r:log('before the error') inner() end",
            ),
            ("cpu/policy.toml", "instructions = 100_000"),
            ("cpu/spin.lua", SPIN),
            (
                "time/policy.toml",
                "timeout_ms = \"100ms\"\ninstructions = 10_000_000_000",
            ),
            ("time/spin.lua", SPIN),
            ("mem/policy.toml", "memory = \"1MiB\""),
            (
                "mem/big.lua",
                "function handler() local t = {} for i = 1, 100 do t[i] = string.rep('x', 20000) .. i end return #t end",
            ),
            ("out/policy.toml", "output = \"1KiB\""),
            ("out/big.lua", "function handler() return string.rep('x', 2000) end"),
            ("body/policy.toml", "body = \"16B\""),
            ("body/echo.lua", "function handler(r) return r:body() end"),
            (
                "slow/policy.toml",
                "clones = 1\ntimeout_ms = 20000\ninstructions = 10_000_000_000",
            ),
            ("slow/spin.lua", SPIN),
            ("denied/policy.toml", "deny = true"),
            ("denied/x.lua", HELLO),
            ("broken/policy.toml", "timeout_ms = \"soon\"\n"),
            ("broken/x.lua", HELLO),
            ("notes.txt", "not a script"),
            ("rated/policy.toml", "[rate]\nper_script = \"1/h\"\n"),
            ("rated/x.lua", HELLO),
        ],
        |o| o.sweep_ms = Some(50),
    );
    // (request id from the answer, outcome expected)
    let mut expected: Vec<(String, &str)> = Vec::new();

    // shed and aborted: a slow request holds the only clone of its script.
    let mut slow = d.client();
    slow.send(&Client::encode(
        1,
        true,
        &params_for(&d.script("slow/spin.lua"), "GET", &[]),
        b"",
    ));
    d.wait_leased(1);
    let r = d.get("slow/spin.lua");
    assert_eq!(r.status, 503);
    expected.push((id_of(&r), "shed"));
    let mut abort = Vec::new();
    encode_abort(1, &mut abort);
    slow.send(&abort);
    assert!(slow.reply().is_some(), "END_REQUEST after the abort");
    drop(slow);
    d.wait_leased_at_most(0);

    for (rel, status, outcome) in [
        ("hello.lua", 200, "ok"),
        ("acme/ok.lua", 200, "ok"),
        ("acme/chatty.lua", 200, "ok"),
        ("acme/err.lua", 500, "script_error"),
        ("cpu/spin.lua", 500, "limit_cpu"),
        ("time/spin.lua", 500, "limit_time"),
        ("mem/big.lua", 500, "limit_memory"),
        ("out/big.lua", 500, "limit_output"),
        ("missing.lua", 404, "not_found"),
        ("notes.txt", 403, "forbidden"),
        ("denied/x.lua", 403, "forbidden"),
        ("broken/x.lua", 500, "policy_error"),
        ("rated/x.lua", 200, "ok"),
        ("rated/x.lua", 429, "rate_limited"),
    ] {
        let r = d.get(rel);
        assert_eq!(r.status, status, "{rel}: {}", r.text());
        expected.push((id_of(&r), outcome));
    }
    let mut c = d.client();
    let r = c.request(
        1,
        true,
        &params_for(&d.script("body/echo.lua"), "POST", &[]),
        &[b'b'; 100],
    );
    assert_eq!(r.status, 413);
    expected.push((id_of(&r), "body_too_large"));
    let r = raw_request(
        &mut c,
        &[(b"REQUEST_METHOD", b"GET"), (b"REQUEST_URI", b"/nothing")],
        b"",
    );
    assert_eq!(r.status, 400);
    expected.push((id_of(&r), "bad_request"));
    drop(c);

    // state_evicted (changed) and policy_loaded come from the sweeper.
    d.write(
        "acme/ok.lua",
        "function handler(r) r:log('changed') return 'ok, changed' end",
    );
    wait_for_line(&d.log, "\"event\":\"state_evicted\"");
    wait_for_line(&d.log, "\"event\":\"policy_loaded\"");
    let _ = d.stop();
    let lines = check_file(&schema, &d.log);

    // One line per request, matched by the id the client got.
    let requests = of_kind(&lines, "request");
    assert_eq!(
        requests.len(),
        expected.len() + 1,
        "one more: the aborted one"
    );
    let by_id = |id: &str| -> &Value {
        let found: Vec<_> = requests.iter().filter(|l| l["request_id"] == id).collect();
        assert_eq!(found.len(), 1, "{id}: {found:?}");
        found[0]
    };
    for (id, outcome) in &expected {
        assert_eq!(by_id(id)["outcome"], *outcome, "{id}");
    }
    let aborted: Vec<_> = requests
        .iter()
        .filter(|l| {
            !expected
                .iter()
                .any(|(id, _)| l["request_id"] == id.as_str())
        })
        .collect();
    assert_eq!(aborted.len(), 1);
    assert_eq!(aborted[0]["outcome"], "aborted");
    assert_eq!(aborted[0]["script"], "slow/spin.lua");
    let seen: Vec<&str> = requests
        .iter()
        .map(|l| l["outcome"].as_str().unwrap())
        .collect();
    for (outcome, _) in OUTCOMES {
        assert!(seen.contains(outcome), "no {outcome} in {seen:?}");
    }

    // Fields as the doc describes them.
    let line = |rel: &str| -> &Value {
        let (id, _) = expected
            .iter()
            .find(|(id, _)| by_id(id)["script"] == rel)
            .unwrap_or_else(|| panic!("no line for {rel}"));
        by_id(id)
    };
    let hello = line("hello.lua");
    assert_eq!(hello["tenant"], Value::Null);
    assert_eq!(hello["policy"], serde_json::json!([]));
    assert_eq!(hello["method"], "GET");
    assert_eq!(hello["uri"], "/test");
    assert_eq!(hello["client"], "127.0.0.1");
    assert_eq!(hello["bytes_out"], 11);
    assert!(hello["state"] == "new" || hello["state"] == "warm");
    let ok = line("acme/ok.lua");
    assert_eq!(ok["tenant"], "acme");
    assert_eq!(ok["policy"], serde_json::json!(["acme/policy.toml"]));
    let err = line("acme/err.lua");
    let message = err["error"].as_str().unwrap();
    assert!(
        message.contains("boom") && message.contains("stack traceback"),
        "{message}"
    );
    for (rel, word) in [
        ("cpu/spin.lua", "instructions"),
        ("time/spin.lua", "time"),
        ("mem/big.lua", "memory"),
        ("out/big.lua", "output"),
    ] {
        let l = line(rel);
        assert!(l["error"].as_str().unwrap().contains(word), "{l}");
        assert!(l["instructions"].is_u64(), "{l}");
    }
    let broken = line("broken/x.lua");
    assert_eq!(broken["policy"], Value::Null);
    assert!(broken["error"].as_str().unwrap().contains("policy.toml"));
    let denied = line("denied/x.lua");
    assert_eq!(denied["policy"], serde_json::json!(["denied/policy.toml"]));
    assert_eq!(line("body/echo.lua")["bytes_in"], 100);
    let limited = by_id(&expected.iter().find(|e| e.1 == "rate_limited").unwrap().0);
    assert_eq!(limited["script"], "rated/x.lua");
    assert_eq!(limited["policy"], serde_json::json!(["rated/policy.toml"]));
    let bad = by_id(&expected.iter().find(|e| e.1 == "bad_request").unwrap().0);
    assert_eq!(bad["script"], Value::Null);
    assert_eq!(bad["uri"], "/nothing");
    let path_refused = expected
        .iter()
        .map(|(id, _)| by_id(id))
        .find(|l| l["outcome"] == "forbidden" && l["script"].is_null())
        .expect("a forbidden path");
    assert_eq!(path_refused["policy"], Value::Null);

    // Lifecycle events.
    assert_eq!(lines[0]["event"], "start");
    assert_eq!(lines.last().unwrap()["event"], "stop");
    assert_eq!(lines[0]["workers"], 2);
    let logs = of_kind(&lines, "script_log");
    let by_ok = |id: &str| logs.iter().filter(|l| l["request_id"] == id).count();
    assert_eq!(by_ok(ok["request_id"].as_str().unwrap()), 1);
    assert!(logs
        .iter()
        .any(|l| l["message"] == "hello from ok" && l["script"] == "acme/ok.lua"));
    // A failed request keeps what it logged before failing, ahead of its request line.
    let at = |f: &dyn Fn(&Value) -> bool| lines.iter().position(f).unwrap();
    let logged =
        at(&|l| l["message"] == "before the error" && l["request_id"] == err["request_id"]);
    let answered = at(&|l| l["event"] == "request" && l["request_id"] == err["request_id"]);
    assert!(logged < answered);
    let chatty = line("acme/chatty.lua");
    assert_eq!(by_ok(chatty["request_id"].as_str().unwrap()), 100);
    let dropped = of_kind(&lines, "log_dropped");
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert_eq!(dropped[0]["count"], 1);
    assert_eq!(dropped[0]["request_id"], chatty["request_id"]);
    assert_eq!(dropped[0]["script"], "acme/chatty.lua");
    let rejected = of_kind(&lines, "policy_rejected");
    assert!(
        rejected
            .iter()
            .any(|l| l["file"] == "broken/policy.toml" && l["line"] == 1),
        "{rejected:?}"
    );
    assert!(of_kind(&lines, "policy_loaded")
        .iter()
        .any(|l| l["file"] == "acme/policy.toml"));
    assert!(of_kind(&lines, "state_evicted")
        .iter()
        .any(|l| l["script"] == "acme/ok.lua" && l["reason"] == "changed"));
}

// ---------------------------------------------------------------------------------------
// Forging and flooding.

#[test]
fn script_and_client_text_cannot_forge_or_flood_lines() {
    let schema = schema();
    let forge = r#"
local inject = '"},{"ts":"x","event":"request","outcome":"ok"}' .. "\n" .. '{"event":"stop"}'
function handler(r)
  r:log("line one\nline two\r\n")
  r:log('quote " backslash \\ and "}')
  r:log(inject)
  r:log("bad utf8 \xff\xfe end")
  r:log(string.rep("y", 10000))
  r:log(string.rep("\u{20AC}", 3000))
  for i = 1, 200 do r:log("n" .. i) end
  return "ok"
end
"#;
    let err = r#"
function handler(r)
  error('bad "}' .. "\n" .. '{"event":"request","outcome":"ok"}' .. "\n\xff" .. string.rep("z", 10000), 0)
end
"#;
    let mut d = Daemon::start(
        "",
        &[("forge.lua", forge), ("err.lua", err), ("hello.lua", HELLO)],
    );
    let r = d.get("forge.lua");
    assert_eq!(r.status, 200);
    let forge_id = id_of(&r);
    let r = d.get("err.lua");
    assert_eq!(r.status, 500);
    let err_id = id_of(&r);
    let mut c = d.client();
    let script = d.script("hello.lua");
    let uri: &[u8] = b"/x\"}\n{\"event\":\"stop\"}\xff";
    let r = raw_request(
        &mut c,
        &[
            (b"SCRIPT_FILENAME", script.as_bytes()),
            (b"REQUEST_METHOD", b"GET"),
            (b"REQUEST_URI", uri),
        ],
        b"",
    );
    assert_eq!(r.status, 200);
    let uri_id = id_of(&r);
    drop(c);
    let _ = d.stop();
    let raw = std::fs::read_to_string(&d.log).unwrap();
    let lines = check_file(&schema, &d.log);
    assert_eq!(raw.lines().count(), lines.len());

    // Exactly 100 script_log lines for the forging request, in order, escaped and cut.
    let logs: Vec<&str> = of_kind(&lines, "script_log")
        .into_iter()
        .filter(|l| l["request_id"] == forge_id.as_str())
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert_eq!(logs.len(), 100);
    assert_eq!(logs[0], "line one\nline two\r\n");
    assert_eq!(logs[1], "quote \" backslash \\ and \"}");
    assert_eq!(
        logs[2],
        "\"},{\"ts\":\"x\",\"event\":\"request\",\"outcome\":\"ok\"}\n{\"event\":\"stop\"}"
    );
    assert_eq!(logs[3], "bad utf8 \u{FFFD}\u{FFFD} end");
    assert_eq!(logs[4], "y".repeat(4096));
    // 4,096 bytes would cut a 3-byte character: the whole ones that fit remain.
    assert_eq!(logs[5], "\u{20AC}".repeat(1365));
    assert_eq!(logs[6], "n1");
    assert_eq!(logs[99], "n94");
    assert!(logs.iter().all(|m| m.len() <= 4096));
    let dropped = of_kind(&lines, "log_dropped");
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0]["count"], 106);
    assert_eq!(dropped[0]["request_id"], forge_id.as_str());
    assert_eq!(dropped[0]["script"], "forge.lua");

    // The injected text forged nothing: three requests, one stop.
    let requests = of_kind(&lines, "request");
    assert_eq!(requests.len(), 3);
    let outcomes: Vec<&Value> = requests.iter().map(|l| &l["outcome"]).collect();
    assert_eq!(outcomes, ["ok", "script_error", "ok"]);
    assert_eq!(of_kind(&lines, "stop").len(), 1);
    assert_eq!(lines.last().unwrap()["event"], "stop");
    let err_line = requests
        .iter()
        .find(|l| l["request_id"] == err_id.as_str())
        .unwrap();
    assert_eq!(err_line["outcome"], "script_error");
    let message = err_line["error"].as_str().unwrap();
    assert!(
        message.contains("bad \"}\n{\"event\":\"request\",\"outcome\":\"ok\"}\n"),
        "{message}"
    );
    assert!(
        message.len() <= 4096 && message.ends_with('z'),
        "{}",
        message.len()
    );
    let uri_line = requests
        .iter()
        .find(|l| l["request_id"] == uri_id.as_str())
        .unwrap();
    assert_eq!(uri_line["uri"], "/x\"}\n{\"event\":\"stop\"}\u{FFFD}");
}

// ---------------------------------------------------------------------------------------
// The real binary: SIGUSR1, a full disk.

#[test]
fn sigusr1_reopens_the_log_file_between_two_lines() {
    let schema = schema();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");
    let p = Process::start(dir.path(), &log);
    let before: Vec<String> = (0..20).map(|_| p.hello()).collect();
    std::fs::rename(&log, &rotated).unwrap();
    p.signal("USR1");
    let t = Instant::now();
    while !log.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "never reopened");
        std::thread::yield_now();
    }
    let after: Vec<String> = (0..20).map(|_| p.hello()).collect();
    // A second rotation without any line in between.
    p.signal("USR1");
    let stderr = p.stop();
    assert!(stderr.contains("reopened"), "{stderr}");

    let old = check_file(&schema, &rotated);
    let new = check_file(&schema, &log);
    let ids = |lines: &[Value]| -> Vec<String> {
        of_kind(lines, "request")
            .iter()
            .map(|l| l["request_id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ids(&old),
        before,
        "the first requests, in the old file only"
    );
    assert_eq!(ids(&new), after, "the later ones, in the new file only");
    assert_eq!(old[0]["event"], "start");
    assert_eq!(old.len(), 21);
    assert_eq!(new.last().unwrap()["event"], "stop");
    assert_eq!(new.len(), 21);
}

#[test]
fn a_log_that_cannot_be_opened_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for log in [
        "/nonexistent/luafcgid/audit.jsonl",
        "unix:/nonexistent/luafcgid.sock",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_luafcgid"))
            .args(["serve", "--docroot"])
            .arg(dir.path())
            .arg("--listen")
            .arg(dir.path().join("s.sock"))
            .args(["--log", log])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.matches(&format!("audit log {log}:")).count(),
            1,
            "{stderr}"
        );
    }
}

#[test]
fn a_full_disk_is_reported_and_requests_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let p = Process::start(dir.path(), Path::new("/dev/full"));
    p.hello();
    let before = crate::support::Health::of(&p);
    for _ in 0..50 {
        let t = Instant::now();
        p.hello();
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    // Idle now: a writer retrying in a loop would burn a core; allow a tenth of it.
    let ticks = p.cpu_ticks();
    let window = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let used = p.cpu_ticks() - ticks;
    let hz = 100.0; // USER_HZ on Linux
    let share = used as f64 / hz / window.elapsed().as_secs_f64();
    assert!(share < 0.1, "{used} ticks in {:?}", window.elapsed());
    before.assert_recovered(&p, 16 * 1024);
    let stderr = p.stop();
    let said = stderr
        .lines()
        .filter(|l| l.contains("audit log /dev/full"))
        .collect::<Vec<_>>();
    assert_eq!(said.len(), 1, "said once, not per line: {stderr}");
    assert!(
        said[0].contains("No space left on device") && said[0].contains("dropped"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// A writer that cannot keep up.

#[test]
fn a_blocked_writer_drops_and_counts_lines_without_blocking_requests() {
    let schema = schema();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    // A reader that reads nothing yet: the daemon can open the pipe, and its writes block
    // once the pipe buffer is full.
    let idle_reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    // 101 short lines per request: 800 requests are more lines than the queue (65,536)
    // and the pipe can hold.
    let flood = "function handler(r) for i = 1, 100 do r:log('flood') end return 'flooded' end";
    let log = fifo.clone();
    let d = Daemon::start_with("", &[("flood.lua", flood)], move |o| o.log = Some(log));
    const REQUESTS: usize = 800;
    let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut slowest = Duration::ZERO;
        let mut c = d.client();
        let script = d.script("flood.lua");
        for _ in 0..REQUESTS {
            let t = Instant::now();
            assert_eq!(c.get(&script).text(), "flooded");
            slowest = slowest.max(t.elapsed());
        }
        slowest
    }));
    let slowest = match answered {
        Ok(s) => s,
        Err(panic) => {
            // A request blocked on the log: the daemon cannot stop either; leave it.
            std::mem::forget(d);
            std::panic::resume_unwind(panic)
        }
    };
    assert!(slowest < Duration::from_secs(5), "{slowest:?}");
    // Now read: the writer catches up, writes what it kept and reports what it lost.
    let path = fifo.clone();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::fs::File::open(path)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text
    });
    drop(d);
    let text = reader.join().unwrap();
    drop(idle_reader);
    assert!(text.ends_with('\n'));
    let lines: Vec<Value> = text.lines().map(|l| check_line(&schema, l)).collect();
    let lost: u64 = of_kind(&lines, "log_dropped")
        .iter()
        .map(|l| {
            assert!(l["request_id"].is_null(), "{l}");
            l["count"].as_u64().unwrap()
        })
        .sum();
    assert!(lost > 0, "nothing dropped: the test did not fill the queue");
    let count = |kind: &str| of_kind(&lines, kind).len() as u64;
    let written = count("request") + count("script_log") + count("start") + count("stop");
    let other = lines.len() as u64 - written - count("log_dropped");
    // Every event emitted is either in the log or counted.
    let emitted = 2 + REQUESTS as u64 * 101 + other;
    assert_eq!(
        written + other + lost,
        emitted,
        "written {written}, lost {lost}"
    );
}

// ---------------------------------------------------------------------------------------
// A unix datagram socket as the log.

/// Receives datagrams until one is a line of `kind`; all of them, each checked.
fn receive_until(schema: &Schema, s: &std::os::unix::net::UnixDatagram, kind: &str) -> Vec<Value> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = s.recv(&mut buf).expect("a datagram within the timeout");
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(!text.contains('\n'), "one line per datagram: {text}");
        let line = check_line(schema, text);
        let done = line["event"] == kind;
        got.push(line);
        if done {
            return got;
        }
    }
}

#[test]
fn lines_go_to_a_unix_datagram_socket_one_per_datagram() {
    let schema = schema();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("collector.sock");
    let bind = || {
        let s = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    let first = bind();
    let target = format!("unix:{}", path.display());
    let mut d = Daemon::start_with("", &[("hello.lua", HELLO)], |o| {
        o.log = Some(PathBuf::from(target))
    });
    let one = id_of(&d.get("hello.lua"));
    let lines = receive_until(&schema, &first, "request");
    assert_eq!(lines[0]["event"], "start");
    assert_eq!(lines.last().unwrap()["request_id"], one.as_str());
    // The collector restarts: a new socket at the same path.
    drop(first);
    std::fs::remove_file(&path).unwrap();
    let second = bind();
    let two = id_of(&d.get("hello.lua"));
    let _ = d.stop();
    let lines = receive_until(&schema, &second, "stop");
    let ids: Vec<&Value> = of_kind(&lines, "request")
        .iter()
        .map(|l| &l["request_id"])
        .collect();
    assert_eq!(ids, [two.as_str()]);
    assert!(of_kind(&lines, "log_dropped").is_empty(), "{lines:?}");
}
