//! Replays the fuzz corpora of request assembly and of the daemon's configuration
//! (`fuzz/corpus/requests`, `fuzz/corpus/config`) through the checks the fuzz targets run,
//! so an input that once broke an invariant cannot break it again unnoticed. Runs on
//! stable, without libFuzzer; it does not fuzz.

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
    let files = corpus(target);
    let mut failed = Vec::new();
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
}

#[test]
fn requests_corpus_replays_cleanly() {
    replay("requests", check::requests);
}

#[test]
fn config_corpus_replays_cleanly() {
    replay("config", check::config);
}

/// The limits the `requests` check runs with are the daemon's defaults, not the codec's.
#[test]
fn requests_check_runs_with_the_daemons_limits() {
    let limits = check::daemon_limits();
    assert_eq!(limits.max_params_bytes, 1 << 20);
    assert_eq!(
        limits.max_body_bytes,
        luafcgid::config::builtin_ceiling().body
    );
}
