//! Replays a fuzz corpus on stable, without libFuzzer: every file of `fuzz/corpus/<target>`
//! goes through the check its fuzz target runs. Shared by the crates' `fuzz_corpus` tests
//! (included with `#[path]`); it does not fuzz.

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
pub fn replay(target: &str, check: fn(&[u8])) {
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
    eprintln!("{target}: {} inputs replayed", files.len());
}
