//! The sandbox corpus (`sandbox-tests/*.lua`) through the real daemon over FastCGI: every
//! script answers with its expected outcome (checked in the audit log) within three times
//! the time limit (3 s: ample beside the 10M-instruction budget, so a loaded machine cannot
//! turn an instruction limit into a time limit), and after each one a control script still answers and every Lua slot is
//! free again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::*;

const LIMITS: &str = "[defaults]\ninstructions = 10_000_000\ntimeout_ms = 3000\nmemory = \"16MiB\"\noutput = \"1MiB\"\ninit_instructions = 10_000_000\ninit_timeout_ms = 3000\nclones = 1\n";

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sandbox-tests")
}

fn expected(src: &str) -> (String, Option<String>) {
    let mut lines = src.lines();
    let outcome = lines
        .next()
        .and_then(|l| l.strip_prefix("-- expect: "))
        .expect("first line `-- expect: OUTCOME`")
        .trim()
        .to_string();
    let body = lines
        .next()
        .and_then(|l| l.strip_prefix("-- body: "))
        .map(str::to_string);
    (outcome, body)
}

#[test]
fn corpus_through_the_daemon() {
    let corpus = std::fs::canonicalize(corpus_dir()).unwrap();
    let mut d = Daemon::start_with(LIMITS, &[("control.lua", HELLO)], |o| {
        o.docroot.push(corpus.clone());
    });
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "lua"))
        .collect();
    scripts.sort();
    assert!(
        scripts.len() >= 40,
        "the corpus has {} cases",
        scripts.len()
    );
    let workers = d.shared.config.workers;
    let mut failures = Vec::new();
    let mut ids = Vec::new();
    for script in &scripts {
        let name = script.file_name().unwrap().to_string_lossy().into_owned();
        let (outcome, body) = expected(&std::fs::read_to_string(script).unwrap());
        let t = Instant::now();
        // The same params as the sandbox's own corpus harness.
        let params = params_for(
            &script.display().to_string(),
            "GET",
            &[("REQUEST_URI", "/corpus?x=1"), ("QUERY_STRING", "x=1")],
        );
        let r = d.client().request(1, true, &params, b"");
        let took = t.elapsed();
        if took > Duration::from_secs(9) {
            failures.push(format!("{name}: took {took:?}"));
        }
        let want_status = if outcome == "ok" { 200 } else { 500 };
        if r.status != want_status {
            failures.push(format!("{name}: status {} (expected {outcome})", r.status));
        }
        if let Some(b) = body {
            if r.text() != b {
                failures.push(format!("{name}: body {:?}", r.text()));
            }
        }
        ids.push((
            name.clone(),
            outcome,
            r.header("X-Request-Id").unwrap_or("").to_string(),
        ));
        // The daemon is whole again: a control script answers and every Lua slot is free.
        assert_eq!(d.get("control.lua").text(), "Hello World", "after {name}");
        let t = Instant::now();
        while d.shared.lua_slots.available_permits() < workers {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "a Lua slot stays taken after {name}"
            );
            std::thread::yield_now();
        }
    }
    let lines = d.stop();
    let reqs = requests(&lines);
    for (name, outcome, id) in ids {
        match reqs.iter().find(|l| l["request_id"] == id.as_str()) {
            Some(line) if line["outcome"] == outcome.as_str() => {}
            Some(line) => failures.push(format!(
                "{name}: outcome {} (expected {outcome}): {}",
                line["outcome"], line["error"]
            )),
            None => failures.push(format!("{name}: no audit line")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
