//! No input makes parsing or resolution panic, and no value shows up in a problem.

use std::path::Path;

use luafcgid_policy::{Ceiling, OperatorPolicy, PolicyFile};
use proptest::prelude::*;

use crate::support::Site;

const KEYS: &[&str] = &[
    "tenant",
    "timeout_ms",
    "instructions",
    "memory",
    "output",
    "body",
    "init_timeout_ms",
    "init_instructions",
    "clones",
    "persistent",
    "state_max_requests",
    "state_max_age",
    "libs",
    "modules",
    "show_errors",
    "deny",
    "entry",
    "rate.per_client",
    "rate.burst",
    "vars.x",
    "ceiling.timeout_ms",
    "ceiling.libs",
    "script.\"a.lua\".clones",
    "script.\"a.lua\".tenant",
];

fn ceilings() -> Vec<Ceiling> {
    [
        "",
        "timeout_ms = 1\nlibs = []\npersistent = false\n[rate]\nper_client = \"1/s\"\nburst = 1",
    ]
    .iter()
    .map(|t| Ceiling::from_fields(&toml::from_str(t).unwrap()).unwrap())
    .collect()
}

fn exercise(bytes: &[u8]) {
    if let Ok(f) = PolicyFile::from_bytes(Path::new("p"), bytes) {
        for c in ceilings() {
            let _ = f.check(&c);
        }
    }
    let _ = OperatorPolicy::from_config(Path::new("c"), &String::from_utf8_lossy(bytes));
}

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    for (open, close) in [("[", "]"), ("{a=", "}")] {
        let depth = 20_000;
        let text = format!("x = {}1{}\n", open.repeat(depth), close.repeat(depth));
        assert!(PolicyFile::parse(Path::new("p"), &text).is_err());
    }
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        exercise(&bytes);
    }

    #[test]
    fn toml_like_text_never_panics(text in "[a-z_\\[\\]\\.\"'= 0-9\\n#{},:+-]{0,300}") {
        exercise(text.as_bytes());
    }

    /// Policy-shaped files with any value in any field: parsing and checking never panic,
    /// and a value never appears in a problem.
    #[test]
    fn values_never_appear_in_problems(
        picks in proptest::collection::vec((0..KEYS.len(), 0..8usize), 1..6),
        secret in "[A-Z]{12}",
    ) {
        let values = [
            format!("\"{secret}\""),
            format!("[\"{secret}\"]"),
            format!("{{ {secret} = 1 }}"),
            "-1".to_string(),
            "99999999999999999999".to_string(),
            "1.5".to_string(),
            "true".to_string(),
            format!("\"9{secret}\""),
        ];
        let mut text = String::new();
        for (k, v) in picks {
            text.push_str(&format!("{} = {}\n", KEYS[k], values[v]));
        }
        let shown: Vec<String> = match PolicyFile::parse(Path::new("p"), &text) {
            Ok(f) => ceilings().iter().flat_map(|c| f.check(c)).map(|p| p.to_string()).collect(),
            Err(problems) => problems.iter().map(|p| p.to_string()).collect(),
        };
        for s in shown {
            prop_assert!(!s.contains(&secret), "{s}\nfrom:\n{text}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Whole trees of random files: resolving, sweeping, checking and explaining never panic.
    #[test]
    fn trees_of_random_files_never_panic(
        root in proptest::collection::vec(any::<u8>(), 0..200),
        child in "[a-z_\\[\\]\\.\"= 0-9\\n]{0,120}",
        again in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let site = Site::new("fuzz");
        site.put_bytes("policy.toml", &root);
        site.put("t/policy.toml", &child);
        let tree = site.tree("");
        let script = site.path("t/a.lua");
        let _ = tree.resolve(&script);
        let _ = tree.sweep();
        site.put_bytes("t/policy.toml", &again);
        let _ = tree.sweep();
        let _ = tree.resolve(&script);
        let _ = tree.check(&site.root);
        std::fs::write(&script, "").unwrap();
        let _ = tree.explain(&script);
    }
}
