//! Replays the fuzz corpora of the codec (`fuzz/corpus/records`, `fuzz/corpus/params`)
//! through the checks the fuzz targets run, so an input that once broke an invariant
//! cannot break it again unnoticed. Runs on stable, without libFuzzer; it does not fuzz.

#[path = "fuzz_corpus/check.rs"]
mod check;

#[path = "../../../fuzz/replay.rs"]
mod replay;

use replay::replay;

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
