//! Runs every `sandbox-tests/*.lua` script through the sandbox and checks its outcome.
//!
//! Each file starts with `-- expect: OUTCOME` (`ok`, `script_error`, `limit_cpu`,
//! `limit_time`, `limit_memory`, `limit_output`), optionally followed by `-- body: TEXT` (the
//! exact body expected with `ok`). A script is loaded and serves one request under small
//! limits: 10M instructions, 3 s, 16 MiB, 1 MiB of output. Load failures count as the
//! script's outcome. All mismatches are reported together.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use luafcgid_sandbox::{Failure, Limits, OwnedRequest, RequestInput, ScriptState, StateOptions};

const TIMEOUT: Duration = Duration::from_secs(3);

fn limits() -> Limits {
    Limits {
        instructions: 10_000_000,
        timeout: TIMEOUT,
        output: 1 << 20,
    }
}

struct Expectation {
    outcome: String,
    body: Option<String>,
}

fn expectation(src: &[u8]) -> Result<Expectation, String> {
    let text = String::from_utf8_lossy(src);
    let mut lines = text.lines();
    let outcome = lines
        .next()
        .and_then(|l| l.strip_prefix("-- expect: "))
        .map(|s| s.trim().to_owned())
        .ok_or("the first line must be `-- expect: OUTCOME`")?;
    const OUTCOMES: &[&str] = &[
        "ok",
        "script_error",
        "limit_cpu",
        "limit_time",
        "limit_memory",
        "limit_output",
    ];
    if !OUTCOMES.contains(&outcome.as_str()) {
        return Err(format!("unknown outcome {outcome:?}"));
    }
    let body = lines
        .next()
        .and_then(|l| l.strip_prefix("-- body: "))
        .map(str::to_owned);
    if body.is_some() && outcome != "ok" {
        return Err("`-- body:` only goes with `ok`".into());
    }
    Ok(Expectation { outcome, body })
}

/// Loads `script` and runs one request; returns the outcome name and the body (for `ok`).
fn run(script: &Path, root: &Path) -> (String, String) {
    let opts = StateOptions {
        script: script.to_path_buf(),
        chunk_name: script.file_name().unwrap().to_string_lossy().into_owned(),
        module_root: root.to_path_buf(),
        modules: true,
        entry: None,
        memory: 16 << 20,
        libs: luafcgid_sandbox::default_libs(),
        init: limits(),
    };
    let abort = AtomicBool::new(false);
    let result = ScriptState::load(&opts, &abort).and_then(|mut state| {
        let params: [(&[u8], &[u8]); 4] = [
            (b"SCRIPT_FILENAME", script.as_os_str().as_encoded_bytes()),
            (b"REQUEST_METHOD", b"GET"),
            (b"REQUEST_URI", b"/corpus?x=1"),
            (b"QUERY_STRING", b"x=1"),
        ];
        let input = RequestInput::new(OwnedRequest {
            params: params
                .iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect(),
            ..OwnedRequest::default()
        });
        state.handle(&input, &limits()).result
    });
    match result {
        Ok(response) => (
            "ok".into(),
            String::from_utf8_lossy(&response.body).into_owned(),
        ),
        Err(failure) => {
            let name = match &failure {
                Failure::Script { .. } => "script_error",
                Failure::Limit { kind, .. } => kind.outcome(),
                Failure::Aborted => "aborted",
                Failure::Io(_) => "io",
            };
            (name.into(), failure.to_string())
        }
    }
}

#[test]
fn corpus() {
    let root =
        std::fs::canonicalize(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sandbox-tests"))
            .unwrap();
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "lua"))
        .collect();
    scripts.sort();
    assert!(scripts.len() >= 25, "only {} corpus scripts", scripts.len());

    let mut problems = Vec::new();
    for script in &scripts {
        let name = script.file_name().unwrap().to_string_lossy().into_owned();
        let expected = match expectation(&std::fs::read(script).unwrap()) {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                continue;
            }
        };
        // On a thread with the workers' 4 MiB stack; a script that escapes every limit
        // would never return, so give up on it after a while.
        let (tx, rx) = mpsc::channel();
        let (script_path, root_path) = (script.clone(), root.clone());
        std::thread::Builder::new()
            .stack_size(4 << 20)
            .spawn(move || {
                let start = Instant::now();
                let outcome = run(&script_path, &root_path);
                let _ = tx.send((outcome, start.elapsed()));
            })
            .unwrap();
        let ((outcome, detail), elapsed) = match rx.recv_timeout(TIMEOUT * 10) {
            Ok(result) => result,
            Err(_) => {
                problems.push(format!("{name}: still running after {:?}", TIMEOUT * 10));
                continue;
            }
        };
        if outcome != expected.outcome {
            problems.push(format!(
                "{name}: expected {}, got {outcome}: {detail}",
                expected.outcome
            ));
        } else if let Some(body) = &expected.body {
            if &detail != body {
                problems.push(format!("{name}: expected body {body:?}, got {detail:?}"));
            }
        }
        // Every limit must hold within the time limit plus a margin.
        if elapsed > TIMEOUT + Duration::from_millis(100) {
            problems.push(format!("{name}: took {elapsed:?}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} corpus scripts failed:\n{}",
        problems.len(),
        scripts.len(),
        problems.join("\n")
    );
}
