//! Replays the fuzz corpus of the policy parser (`fuzz/corpus/policy`) through the check
//! the fuzz target runs, so an input that once broke an invariant cannot break it again
//! unnoticed. Runs on stable, without libFuzzer; it does not fuzz.

#[path = "fuzz_corpus/check.rs"]
mod check;

#[path = "../../../fuzz/replay.rs"]
mod replay;

use replay::replay;

#[test]
fn policy_corpus_replays_cleanly() {
    replay("policy", check::policy);
}
