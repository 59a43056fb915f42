//! Replays the fuzz corpora of request assembly and of the daemon's configuration
//! (`fuzz/corpus/requests`, `fuzz/corpus/config`) through the checks the fuzz targets run,
//! so an input that once broke an invariant cannot break it again unnoticed. Runs on
//! stable, without libFuzzer; it does not fuzz.

#[path = "fuzz_corpus/check.rs"]
mod check;

#[path = "../../../fuzz/replay.rs"]
mod replay;

use replay::replay;

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
