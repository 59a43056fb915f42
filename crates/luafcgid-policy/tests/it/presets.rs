//! The shipped presets parse with lines, and work as a directory's policy.toml.

use std::path::Path;

use luafcgid_policy::{Ceiling, PolicyFile};

use crate::support::{allowed, Site};

const PRESETS: [(&str, &str); 3] = [
    ("default", include_str!("../../../../policies/default.toml")),
    ("strict", include_str!("../../../../policies/strict.toml")),
    ("trusted", include_str!("../../../../policies/trusted.toml")),
];

#[test]
fn shipped_presets_validate_and_resolve() {
    let site = Site::new("presets");
    for (name, text) in PRESETS {
        let f =
            PolicyFile::parse(Path::new(name), text).unwrap_or_else(|p| panic!("{name}: {p:?}"));
        assert!(f.check(&Ceiling::unbounded()).is_empty(), "{name}");
        site.put(&format!("{name}/policy.toml"), text);
    }
    let tree = site.tree("");
    assert!(tree.check(&site.root).is_empty());
    let strict = allowed(tree.resolve(&site.path("strict/a.lua")));
    assert!(!strict.policy.persistent);
    let default = allowed(tree.resolve(&site.path("default/a.lua")));
    let expected = luafcgid_policy::Policy {
        tenant: Some("default".into()),
        ..Default::default()
    };
    assert_eq!(default.policy, expected);
}

/// The example tree of tenants in `examples/tenants` is valid, and every script in it
/// resolves to a policy (allowed or denied), never to a policy error.
#[test]
fn the_example_tenant_tree_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tenants");
    let root = std::fs::canonicalize(root).expect("examples/tenants exists");
    let op = luafcgid_policy::OperatorPolicy::new(
        luafcgid_policy::Policy::default(),
        Ceiling::unbounded(),
    );
    let tree = luafcgid_policy::PolicyTree::new(op, vec![root.clone()]);
    let problems = tree.check(&root);
    assert!(problems.is_empty(), "{problems:#?}");
    let mut scripts = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "lua") {
                scripts.push(path);
            }
        }
    }
    assert!(!scripts.is_empty());
    for script in scripts {
        let r = tree.resolve(&script);
        assert!(r.effective().is_some(), "{}: {r:?}", script.display());
    }
}
