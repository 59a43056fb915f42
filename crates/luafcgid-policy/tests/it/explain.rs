//! `explain`: values with units and their sources, tenant, files and ceiling.

use crate::support::Site;

/// The words of the line of `text` whose first word is `key`.
fn row<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.first() == Some(&key))
        .unwrap_or_else(|| panic!("no `{key}` line in\n{text}"))
}

#[test]
fn explain_shows_each_value_with_its_source_and_the_ceiling() {
    let site = Site::new("explain");
    site.put("policy.toml", "[ceiling]\ntimeout_ms = \"2s\"\n");
    site.put(
        "t/policy.toml",
        "tenant = \"acme\"\ntimeout_ms = 1500\n[script.\"x.lua\"]\nbody = \"2MiB\"\n[vars]\ngreeting = \"hi\"\n",
    );
    let tree = site.tree("[defaults]\nmemory = \"32MiB\"\n[ceiling]\ntimeout_ms = \"5s\"\n");
    let text = tree.explain(&site.path("t/x.lua"));

    assert_eq!(
        row(&text, "timeout_ms"),
        ["timeout_ms", "1500ms", "t/policy.toml"]
    );
    assert_eq!(row(&text, "memory"), ["memory", "32MiB", "config"]);
    assert_eq!(
        row(&text, "body"),
        ["body", "2MiB", "t/policy.toml", "[script.\"x.lua\"]"]
    );
    assert_eq!(
        row(&text, "instructions"),
        ["instructions", "50000000", "built-in"]
    );
    assert_eq!(
        row(&text, "vars.greeting"),
        ["vars.greeting", "\"hi\"", "t/policy.toml"]
    );
    assert_eq!(
        row(&text, "tenant"),
        ["tenant", "\"acme\",", "named", "by", "t/policy.toml"]
    );
    assert_eq!(
        row(&text, "policy"),
        ["policy", "files", "policy.toml,", "t/policy.toml"]
    );
    assert_eq!(row(&text, "access"), ["access", "allowed"]);
    let ceiling = text
        .split("ceiling in force")
        .nth(1)
        .expect("a ceiling section");
    assert_eq!(
        row(ceiling, "timeout_ms"),
        ["timeout_ms", "2s", "set", "by", "policy.toml"]
    );
    assert_eq!(row(ceiling, "memory"), ["memory", "unbounded"]);
}

#[test]
fn explain_says_when_a_value_was_lowered_to_a_ceiling() {
    let site = Site::new("explain-clamp");
    site.put(
        "policy.toml",
        "timeout_ms = 3000\n[ceiling]\ntimeout_ms = 1000\n",
    );
    site.mkdir("t");
    let tree = site.tree("");
    let text = tree.explain(&site.path("t/x.lua"));
    assert_eq!(
        row(&text, "timeout_ms"),
        ["timeout_ms", "1s", "ceiling", "set", "by", "policy.toml"]
    );
    assert_eq!(
        row(&text, "tenant"),
        ["tenant", "\"t\",", "named", "after", "its", "directory"]
    );
}

#[test]
fn explain_reports_policy_errors_and_paths_outside() {
    let site = Site::new("explain-error");
    let bad = site.put("t/policy.toml", "clones = 0\n");
    let tree = site.tree("");
    let text = tree.explain(&site.path("t/x.lua"));
    assert!(text.contains("policy error"), "{text}");
    assert!(text.contains(&format!("{}:1:", bad.display())), "{text}");
    std::fs::write(site.outside("x.lua"), "").unwrap();
    assert!(tree
        .explain(&site.outside("x.lua"))
        .contains("not below any document root"));
}
