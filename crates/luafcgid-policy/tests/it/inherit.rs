//! Inheritance order, provenance, tenants, deny.

use std::time::Duration;

use luafcgid_policy::{Field, Source};

use crate::support::{allowed, denied, invalid, rel, Site};

#[test]
fn layers_apply_from_defaults_to_the_script_table() {
    let site = Site::new("order");
    site.put(
        "policy.toml",
        "timeout_ms = 900\ninstructions = 1000\nmemory = \"32MiB\"\n[vars]\na = \"root\"\nb = \"root\"\n",
    );
    site.put(
        "t/policy.toml",
        "timeout_ms = 800\ninstructions = 2000\n[vars]\nb = \"t\"\n",
    );
    site.put(
        "t/sub/policy.toml",
        "timeout_ms = 700\n[script.\"x.lua\"]\ntimeout_ms = 600\n[script.\"x.lua\".vars]\na = \"x\"\n",
    );
    let tree =
        site.tree("[defaults]\noutput = \"4MiB\"\nmemory = \"16MiB\"\n[defaults.vars]\nc = 1\n");

    let x = allowed(tree.resolve(&site.path("t/sub/x.lua")));
    assert_eq!(x.policy.timeout, Duration::from_millis(600));
    assert_eq!(x.policy.instructions, 2000);
    assert_eq!(x.policy.memory, 32 << 20);
    assert_eq!(x.policy.output, 4 << 20);
    assert_eq!(x.policy.body, 1 << 20);
    assert_eq!(
        x.policy.vars,
        vec![
            ("c".to_string(), "1".to_string()),
            ("a".to_string(), "x".to_string()),
            ("b".to_string(), "t".to_string()),
        ]
    );
    assert_eq!(
        x.files,
        vec![
            rel("policy.toml"),
            rel("t/policy.toml"),
            rel("t/sub/policy.toml")
        ]
    );
    let p = &x.provenance;
    assert_eq!(
        p.field(Field::TimeoutMs),
        &Source::Script {
            file: rel("t/sub/policy.toml"),
            script: "x.lua".into()
        }
    );
    assert_eq!(
        p.field(Field::Instructions),
        &Source::File(rel("t/policy.toml"))
    );
    assert_eq!(p.field(Field::Memory), &Source::File(rel("policy.toml")));
    assert_eq!(p.field(Field::Output), &Source::Config);
    assert_eq!(p.field(Field::Body), &Source::BuiltIn);
    assert_eq!(p.var("c"), Some(&Source::Config));
    assert_eq!(p.var("b"), Some(&Source::File(rel("t/policy.toml"))));
    assert!(matches!(p.var("a"), Some(Source::Script { .. })));

    let y = allowed(tree.resolve(&site.path("t/sub/y.lua")));
    assert_eq!(y.policy.timeout, Duration::from_millis(700));
    assert_eq!(
        y.provenance.field(Field::TimeoutMs),
        &Source::File(rel("t/sub/policy.toml"))
    );
    assert_eq!(y.policy.vars[1], ("a".to_string(), "root".to_string()));
    let upper = allowed(tree.resolve(&site.path("t/z.lua")));
    assert_eq!(upper.policy.timeout, Duration::from_millis(800));
    let top = allowed(tree.resolve(&site.path("index.lua")));
    assert_eq!(top.policy.timeout, Duration::from_millis(900));
    assert_eq!(top.files, vec![rel("policy.toml")]);
}

#[test]
fn script_tables_apply_only_to_their_file_in_their_directory() {
    let site = Site::new("script-tables");
    site.put("t/policy.toml", "[script.\"admin.lua\"]\nclones = 7\n");
    site.mkdir("t/sub");
    let tree = site.tree("");
    assert_eq!(
        allowed(tree.resolve(&site.path("t/admin.lua")))
            .policy
            .clones,
        7
    );
    assert_eq!(
        allowed(tree.resolve(&site.path("t/other.lua")))
            .policy
            .clones,
        2
    );
    assert_eq!(
        allowed(tree.resolve(&site.path("t/sub/admin.lua")))
            .policy
            .clones,
        2,
        "a table names a file of its own directory, not of subdirectories"
    );
}

#[test]
fn tenant_is_named_by_the_nearest_file_or_is_the_first_level_directory() {
    let site = Site::new("tenants");
    site.put("acme/policy.toml", "tenant = \"acme-corp\"\n");
    site.put("acme/shop/policy.toml", "tenant = \"shop\"\n");
    site.mkdir("acme/x/y");
    site.mkdir("plain/deep/er");
    let tree = site.tree("");

    let top = allowed(tree.resolve(&site.path("index.lua")));
    assert_eq!((top.tenant.as_str(), &top.tenant_root), ("", &site.root));
    assert_eq!(top.policy.tenant, None);

    let acme = allowed(tree.resolve(&site.path("acme/x/y/a.lua")));
    assert_eq!(acme.tenant, "acme-corp");
    assert_eq!(acme.tenant_root, site.path("acme"));
    assert_eq!(acme.tenant_named_by, Some(rel("acme/policy.toml")));
    assert_eq!(acme.policy.tenant.as_deref(), Some("acme-corp"));

    let shop = allowed(tree.resolve(&site.path("acme/shop/a.lua")));
    assert_eq!(
        (shop.tenant.as_str(), &shop.tenant_root),
        ("shop", &site.path("acme/shop"))
    );

    let plain = allowed(tree.resolve(&site.path("plain/deep/er/a.lua")));
    assert_eq!(plain.tenant, "plain");
    assert_eq!(plain.tenant_root, site.path("plain"));
    assert_eq!(plain.tenant_named_by, None);
}

#[test]
fn a_root_policy_may_name_the_tenant_of_the_root() {
    let site = Site::new("root-tenant");
    site.put("policy.toml", "tenant = \"main\"\n");
    site.mkdir("sub");
    let tree = site.tree("");
    let e = allowed(tree.resolve(&site.path("sub/a.lua")));
    assert_eq!((e.tenant.as_str(), &e.tenant_root), ("main", &site.root));
}

#[test]
fn deny_closes_a_subtree_and_nothing_below_reopens_it() {
    let site = Site::new("deny");
    site.put("closed/policy.toml", "deny = true\n");
    site.put("closed/sub/policy.toml", "deny = false\ntimeout_ms = 10\n");
    site.put("closed/broken/policy.toml", "timeout_ms = \n");
    site.put("open/policy.toml", "[script.\"secret.lua\"]\ndeny = true\n");
    site.put("open/broken/policy.toml", "timeout_ms = \n");
    let tree = site.tree("");

    denied(tree.resolve(&site.path("closed/a.lua")));
    let sub = denied(tree.resolve(&site.path("closed/sub/a.lua")));
    assert_eq!(sub.policy.timeout, Duration::from_millis(10));
    assert!(sub.policy.deny);
    assert_eq!(
        sub.provenance.field(Field::Deny),
        &Source::File(rel("closed/policy.toml")),
        "the file that closed the subtree, not the one that tried to reopen it"
    );
    denied(tree.resolve(&site.path("closed/broken/a.lua")));
    assert!(!allowed(tree.resolve(&site.path("open/a.lua"))).policy.deny);
    let secret = denied(tree.resolve(&site.path("open/secret.lua")));
    assert!(matches!(
        secret.provenance.field(Field::Deny),
        Source::Script { .. }
    ));
    invalid(tree.resolve(&site.path("open/broken/a.lua")));
}

#[test]
fn paths_outside_the_roots_are_outside() {
    let site = Site::new("outside");
    let tree = site.tree("");
    use luafcgid_policy::Resolution;
    assert!(matches!(
        tree.resolve(&site.outside("x.lua")),
        Resolution::Outside
    ));
    let sneaky = site.root.join("..").join("x.lua");
    assert!(matches!(tree.resolve(&sneaky), Resolution::Outside));
    assert!(matches!(
        tree.resolve(std::path::Path::new("/")),
        Resolution::Outside
    ));
}
