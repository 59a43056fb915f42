//! Replays the fuzz corpora of the codec (`fuzz/corpus/records`, `fuzz/corpus/params`)
//! through the checks the fuzz targets run, so an input that once broke an invariant
//! cannot break it again unnoticed. Runs on stable, without libFuzzer; it does not fuzz.

#[path = "fuzz_corpus/check.rs"]
mod check;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Every file of `fuzz/corpus/<target>`; the directory must exist and hold some.
fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no inputs", dir.display());
    files
}

/// Runs `check` on every input of `target`'s corpus; names every input that fails.
fn replay(target: &str, check: fn(&[u8])) {
    let mut failed = Vec::new();
    let files = corpus(target);
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "inputs failing the `{target}` check: {failed:#?}"
    );
    eprintln!("{target}: {} inputs replayed", files.len());
}

#[test]
fn records_corpus_replays_cleanly() {
    replay("records", check::records);
}

#[test]
fn params_corpus_replays_cleanly() {
    replay("params", check::params);
}

/// The harness itself decodes what a client sends: a request fed in small reads comes out
/// whole (a harness that decoded nothing would pass every corpus vacuously).
#[test]
fn records_check_sees_a_whole_request() {
    let mut wire = Vec::new();
    fastcgi_protocol::client::encode_request(
        1,
        false,
        [(&b"SCRIPT_FILENAME"[..], &b"/srv/a.lua"[..])],
        b"body",
        &mut wire,
    );
    let run = check::decode_stream(&check::tight_limits(), &wire, Some(7));
    assert_eq!(run.error, None);
    assert_eq!(run.consumed, wire.len());
    assert!(matches!(
        run.events.last(),
        Some(fastcgi_protocol::Event::Request(r)) if r.body == b"body"
    ));
}
