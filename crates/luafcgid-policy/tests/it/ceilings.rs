//! Ceilings: violations with file, line and setter; nested ceilings; delegation.

use std::time::Duration;

use luafcgid_policy::{Field, SetBy, Source};

use crate::support::{allowed, invalid, rel, Site};

const CONFIG: &str = "\
[ceiling]
timeout_ms = 2000
libs = [\"string\", \"table\"]
show_errors = false
[ceiling.rate]
per_client = \"10/s\"
[defaults]
libs = [\"string\"]
[defaults.rate]
per_client = \"5/s\"
";

#[test]
fn values_above_the_config_ceiling_are_refused_with_file_line_and_key() {
    let site = Site::new("over-config");
    let file = site.put(
        "a/policy.toml",
        "# a tenant asks for too much\nmemory = \"8MiB\"\ntimeout_ms = 5000\nlibs = [\n  \"string\",\n  \"math\",\n]\nshow_errors = true\n[rate]\nper_client = \"20/s\"\n",
    );
    site.put(
        "b/policy.toml",
        "timeout_ms = 2000\nlibs = [\"table\"]\n[rate]\nper_client = \"600/min\"\n",
    );
    let tree = site.tree(CONFIG);

    let p = invalid(tree.resolve(&site.path("a/x.lua")));
    assert_eq!(
        p.to_string(),
        format!(
            "{}:3: timeout_ms = 5s exceeds the ceiling of 2s set by the config",
            file.display()
        )
    );
    assert_eq!(p.key.as_deref(), Some("timeout_ms"));

    let problems = tree.check(&site.root);
    let found: Vec<(Option<u32>, Option<&str>)> = problems
        .iter()
        .map(|p| (p.line, p.key.as_deref()))
        .collect();
    assert_eq!(
        found,
        vec![
            (Some(3), Some("timeout_ms")),
            (Some(6), Some("libs")),
            (Some(8), Some("show_errors")),
            (Some(10), Some("rate.per_client")),
        ],
        "{problems:#?}"
    );
    assert!(problems[1].message.contains("\"math\""), "{}", problems[1]);
    assert_eq!(
        problems[2].message,
        "show_errors = true exceeds the ceiling of false set by the config"
    );
    assert_eq!(
        problems[3].message,
        "rate.per_client = 20/s exceeds the ceiling of 10/s set by the config"
    );
    let b = allowed(tree.resolve(&site.path("b/x.lua")));
    assert_eq!(b.policy.libs, vec!["table".to_string()]);
}

#[test]
fn a_nested_ceiling_cannot_widen_what_it_inherits() {
    let site = Site::new("widen");
    site.put(
        "policy.toml",
        "[ceiling]\ntimeout_ms = 2000\nmodules = false\n",
    );
    let t = site.put(
        "t/policy.toml",
        "timeout_ms = 1500\nmodules = false\n[ceiling]\ntimeout_ms = 3000\nmodules = true\n",
    );
    let tree = site.tree("");
    allowed(tree.resolve(&site.path("x.lua")));
    let p = invalid(tree.resolve(&site.path("t/x.lua")));
    assert_eq!(
        p.to_string(),
        format!(
            "{}:4: [ceiling] timeout_ms = 3s exceeds the ceiling of 2s set by policy.toml",
            t.display()
        )
    );
    let all = tree.check(&site.path("t"));
    let lines: Vec<(Option<u32>, Option<&str>)> =
        all.iter().map(|p| (p.line, p.key.as_deref())).collect();
    assert_eq!(
        lines,
        vec![
            (Some(4), Some("ceiling.timeout_ms")),
            (Some(5), Some("ceiling.modules"))
        ]
    );
}

#[test]
fn delegation_binds_children_and_grandchildren_to_the_delegate_ceiling() {
    let site = Site::new("delegation");
    site.put("policy.toml", "[ceiling]\ntimeout_ms = \"5s\"\n");
    site.put(
        "reseller/policy.toml",
        "timeout_ms = \"5s\"\n[ceiling]\ntimeout_ms = \"2s\"\n",
    );
    site.put("reseller/client/policy.toml", "timeout_ms = \"2s\"\n");
    let too_much = site.put("reseller/client2/policy.toml", "timeout_ms = \"3s\"\n");
    site.mkdir("reseller/client3");
    site.put(
        "reseller/client/grand/policy.toml",
        "timeout_ms = \"2001ms\"\n",
    );
    site.put(
        "reseller/client/fine/policy.toml",
        "timeout_ms = \"1999ms\"\n",
    );
    let tree = site.tree("[ceiling]\ntimeout_ms = \"10s\"\n");

    let r = allowed(tree.resolve(&site.path("reseller/a.lua")));
    assert_eq!(r.policy.timeout, Duration::from_secs(5));
    let c = allowed(tree.resolve(&site.path("reseller/client/a.lua")));
    assert_eq!(c.policy.timeout, Duration::from_secs(2));
    assert_eq!(
        c.ceiling.set_by(Field::TimeoutMs),
        Some(&SetBy::File(rel("reseller/policy.toml")))
    );
    let p = invalid(tree.resolve(&site.path("reseller/client2/a.lua")));
    assert_eq!(
        p.to_string(),
        format!(
            "{}:1: timeout_ms = 3s exceeds the ceiling of 2s set by reseller/policy.toml",
            too_much.display()
        )
    );
    let quiet = allowed(tree.resolve(&site.path("reseller/client3/a.lua")));
    assert_eq!(
        quiet.policy.timeout,
        Duration::from_secs(2),
        "an inherited value is lowered to the ceiling below"
    );
    assert_eq!(
        quiet.provenance.field(Field::TimeoutMs),
        &Source::Ceiling(SetBy::File(rel("reseller/policy.toml")))
    );
    let g = invalid(tree.resolve(&site.path("reseller/client/grand/a.lua")));
    assert!(g.message.contains("set by reseller/policy.toml"), "{g}");
    assert_eq!(
        allowed(tree.resolve(&site.path("reseller/client/fine/a.lua")))
            .policy
            .timeout,
        Duration::from_millis(1999)
    );
}

#[test]
fn script_tables_are_bound_by_the_inherited_ceiling_not_by_their_files_own() {
    let site = Site::new("script-ceiling");
    site.put(
        "t/policy.toml",
        "timeout_ms = 1000\n[ceiling]\ntimeout_ms = 500\n[script.\"slow.lua\"]\ntimeout_ms = 4000\n",
    );
    site.mkdir("t/sub");
    let u = site.put(
        "u/policy.toml",
        "[script.\"slow.lua\"]\ntimeout_ms = 6000\n",
    );
    let tree = site.tree("[ceiling]\ntimeout_ms = 5000\n");
    assert_eq!(
        allowed(tree.resolve(&site.path("t/slow.lua")))
            .policy
            .timeout,
        Duration::from_secs(4)
    );
    assert_eq!(
        allowed(tree.resolve(&site.path("t/x.lua"))).policy.timeout,
        Duration::from_secs(1)
    );
    assert_eq!(
        allowed(tree.resolve(&site.path("t/sub/x.lua")))
            .policy
            .timeout,
        Duration::from_millis(500)
    );
    let p = invalid(tree.resolve(&site.path("u/x.lua")));
    assert_eq!(
        p.to_string(),
        format!(
            "{}:2: [script.\"slow.lua\"] timeout_ms = 6s exceeds the ceiling of 5s set by the config",
            u.display()
        )
    );
    assert_eq!(p.key.as_deref(), Some("script.\"slow.lua\".timeout_ms"));
}

#[test]
fn absent_and_zero_mean_no_limit_and_are_widest() {
    let site = Site::new("widest");
    let config = "[ceiling]\nstate_max_requests = 1000\n[ceiling.rate]\nper_tenant = \"100/s\"\nburst = 10\n\
                  [defaults]\nstate_max_requests = 500\n[defaults.rate]\nper_tenant = \"50/s\"\nburst = 5\n";
    site.put("off/policy.toml", "[rate]\nper_tenant = \"0/s\"\n");
    site.put("never/policy.toml", "state_max_requests = 0\n");
    site.put(
        "ok/policy.toml",
        "state_max_requests = 1000\n[rate]\nper_tenant = \"6000/min\"\nburst = 10\n",
    );
    site.put("burst/policy.toml", "[rate]\nburst = 11\n");
    let tree = site.tree(config);
    let off = invalid(tree.resolve(&site.path("off/a.lua")));
    assert_eq!(off.line, Some(2));
    assert!(
        off.message
            .starts_with("rate.per_tenant = off exceeds the ceiling of 100/s"),
        "{off}"
    );
    let never = invalid(tree.resolve(&site.path("never/a.lua")));
    assert!(
        never
            .message
            .starts_with("state_max_requests = 0 (never) exceeds"),
        "{never}"
    );
    allowed(tree.resolve(&site.path("ok/a.lua")));
    assert_eq!(
        invalid(tree.resolve(&site.path("burst/a.lua")))
            .key
            .as_deref(),
        Some("rate.burst")
    );
}

#[test]
fn narrower_booleans_and_library_subsets_are_accepted() {
    let site = Site::new("narrower");
    let config = "[ceiling]\npersistent = false\nmodules = false\nlibs = [\"string\", \"math\"]\n\
                  [defaults]\npersistent = false\nmodules = false\nlibs = [\"string\"]\n";
    site.put("a/policy.toml", "persistent = false\nlibs = [\"math\"]\n");
    site.put("b/policy.toml", "modules = true\n");
    site.put("c/policy.toml", "libs = []\n");
    let tree = site.tree(config);
    assert_eq!(
        allowed(tree.resolve(&site.path("a/x.lua"))).policy.libs,
        vec!["math".to_string()]
    );
    let b = invalid(tree.resolve(&site.path("b/x.lua")));
    assert_eq!((b.line, b.key.as_deref()), (Some(1), Some("modules")));
    assert!(allowed(tree.resolve(&site.path("c/x.lua")))
        .policy
        .libs
        .is_empty());
}
