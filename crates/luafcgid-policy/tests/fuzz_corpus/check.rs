//! The check behind the `policy` fuzz target: one `policy.toml` parsed as the daemon's
//! policy tree parses it ([`PolicyFile::from_bytes`]), then checked against the ceilings
//! it may inherit, narrowed and clamped as the tree does.
//!
//! `fuzz/fuzz_targets/policy.rs` includes this file by path and calls [`policy`], as does
//! the corpus replay in `tests/fuzz_corpus.rs`. A broken invariant panics; a file the
//! parser refuses is not a failure. Nothing here touches the file system.

use std::path::Path;

use luafcgid_policy::{Ceiling, Policy, PolicyFile, Problem, MAX_POLICY_FILE_SIZE};

/// A problem names the file it was given and, when it has a line, one of the text's.
fn check_problem(p: &Problem, path: &Path, lines: usize) {
    assert_eq!(p.file, path);
    if let Some(line) = p.line {
        assert!(
            (1..=lines).contains(&(line as usize)),
            "problem on line {line} of a {lines}-line file: {p}"
        );
    }
    assert!(!p.message.is_empty());
    assert!(!p.to_string().is_empty());
}

/// The `policy` target: `data` is the content of a `policy.toml`. Never a panic; a
/// refusal comes with problems on the file's own lines; a parsed file, checked against an
/// unbounded ceiling, the built-in defaults as a ceiling, and its own `[ceiling]`, gives
/// problems that are well placed; narrowing by its own `[ceiling]` never widens either
/// ceiling; a policy clamped by a ceiling is permitted by it.
pub fn policy(data: &[u8]) {
    // The tree refuses larger files before parsing them.
    if data.len() as u64 > MAX_POLICY_FILE_SIZE {
        return;
    }
    let path = Path::new("tenant/policy.toml");
    let lines = data.iter().filter(|&&b| b == b'\n').count() + 1;
    let file = match PolicyFile::from_bytes(path, data) {
        Ok(file) => file,
        Err(problems) => {
            assert!(!problems.is_empty(), "refused without a problem");
            for p in &problems {
                check_problem(p, path, lines);
            }
            return;
        }
    };
    assert_eq!(file.path(), path);
    let mut ceilings = vec![
        Ceiling::unbounded(),
        Ceiling::from_policy(&Policy::default()),
    ];
    ceilings.extend(file.ceiling().cloned());
    for inherited in &ceilings {
        for p in &file.check(inherited) {
            check_problem(p, path, lines);
        }
        if let Some(own) = file.ceiling() {
            let below = inherited.narrowed(own);
            assert!(
                inherited.check_ceiling(&below).is_empty(),
                "narrowing widened"
            );
            assert!(
                own.check_ceiling(&below).is_empty(),
                "narrowing widened its own"
            );
        }
        let mut policy = Policy::default();
        if policy.apply(file.fields()).is_ok() {
            inherited.clamp(&mut policy);
            if let Err(v) = inherited.permits(&policy) {
                panic!("a clamped policy is over its ceiling: {v:?}");
            }
        }
    }
}
