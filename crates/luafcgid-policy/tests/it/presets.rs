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
