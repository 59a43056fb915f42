//! Parsing one file: every problem with its line and key.

use std::path::Path;

use luafcgid_policy::{Ceiling, PolicyFile};

#[test]
fn every_problem_of_a_file_has_a_line_and_a_key() {
    let text = "\
timeout_ms = 100
bogus = 1
memory = true
clones = 0
libs = [\"string\", \"io\"]
[rate]
per_client = \"fast\"
burst = -1
[vars]
x = [1]
[script.\"a.lua\"]
tenant = \"no\"
[ceiling]
entry = \"x\"
";
    let problems = PolicyFile::parse(Path::new("p/policy.toml"), text).unwrap_err();
    let found: Vec<(Option<u32>, Option<&str>)> = problems
        .iter()
        .map(|p| (p.line, p.key.as_deref()))
        .collect();
    assert_eq!(
        found,
        vec![
            (Some(2), Some("bogus")),
            (Some(3), Some("memory")),
            (Some(4), Some("clones")),
            (Some(5), Some("libs")),
            (Some(7), Some("rate.per_client")),
            (Some(8), Some("rate.burst")),
            (Some(10), Some("vars.x")),
            (Some(12), Some("script.\"a.lua\".tenant")),
            (Some(14), Some("ceiling.entry")),
        ],
        "{problems:#?}"
    );
    let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(shown[0], "p/policy.toml:2: unknown key `bogus`");
    assert_eq!(
        shown[2],
        "p/policy.toml:4: `clones` must be between 1 and 1024"
    );
    assert_eq!(
        shown[5],
        "p/policy.toml:8: `rate.burst` must not be negative"
    );
    assert!(
        shown[3].contains("entry 2 is not a known library"),
        "{}",
        shown[3]
    );
}

#[test]
fn syntax_errors_have_a_line() {
    let problems = PolicyFile::parse(Path::new("x"), "a = 1\n\nb = \n").unwrap_err();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].line, Some(3));
    assert!(
        problems[0].message.starts_with("not valid TOML"),
        "{}",
        problems[0]
    );
    let dup = PolicyFile::parse(Path::new("x"), "clones = 1\nclones = 2\n").unwrap_err();
    assert_eq!(dup[0].line, Some(2));
}

#[test]
fn a_valid_file_keeps_lines_and_checks_against_a_ceiling() {
    let text = "\n\ntimeout_ms = \"3s\"\n[rate]\nburst = 9\n[ceiling]\nclones = 1\n";
    let f = PolicyFile::parse(Path::new("f"), text).unwrap();
    assert_eq!(f.line("timeout_ms"), Some(3));
    assert_eq!(f.line("rate.burst"), Some(5));
    assert!(f.ceiling().is_some());
    assert!(f.check(&Ceiling::unbounded()).is_empty());
    let c =
        Ceiling::from_fields(&toml::from_str("timeout_ms = 1000\nclones = 1").unwrap()).unwrap();
    let problems = f.check(&c);
    assert_eq!(problems.len(), 1);
    assert_eq!(
        problems[0].to_string(),
        "f:3: timeout_ms = 3s exceeds the ceiling of 1s set by the config"
    );
}

#[test]
fn unit_forms_and_types_are_accepted_like_the_serde_fields() {
    let text = "timeout_ms = \"250ms\"\ninit_timeout_ms = 0x10\nmemory = 1_048_576\noutput = \"2MiB\"\nstate_max_age = \"1h\"\n[vars]\nf = 1.5\nb = true\n";
    let f = PolicyFile::parse(Path::new("f"), text).unwrap();
    let serde: luafcgid_policy::PolicyFields = toml::from_str(text).unwrap();
    assert_eq!(f.fields(), &serde);
}
