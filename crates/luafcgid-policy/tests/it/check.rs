//! `check`: every problem below a directory, bound by the ancestors above it.

use std::os::unix::fs::symlink;

use luafcgid_policy::MAX_CHECK_DEPTH;

use crate::support::Site;

#[test]
fn check_finds_every_problem_below_and_applies_ancestors() {
    let site = Site::new("check");
    site.put("policy.toml", "[ceiling]\nclones = 2\n");
    let a = site.put("a/policy.toml", "clones = 3\n");
    let ab = site.put("a/b/policy.toml", "timeout_ms = \"x\"\nmemory = 5\n");
    site.put("c/policy.toml", "clones = 2\n");
    // A link to a directory is not followed: a's problems are reported once.
    symlink(site.path("a"), site.path("link")).unwrap();
    // Nor is one leading outside the root.
    std::fs::create_dir_all(site.outside("elsewhere")).unwrap();
    std::fs::write(site.outside("elsewhere/policy.toml"), "nonsense = 1\n").unwrap();
    symlink(site.outside("elsewhere"), site.path("out")).unwrap();
    let tree = site.tree("");

    let all = tree.check(&site.root);
    let files: Vec<(&std::path::Path, Option<u32>)> =
        all.iter().map(|p| (p.file.as_path(), p.line)).collect();
    assert_eq!(
        files,
        vec![
            (a.as_path(), Some(1)),
            (ab.as_path(), Some(1)),
            (ab.as_path(), Some(2))
        ],
        "{all:#?}"
    );
    assert!(all[0].message.contains("set by policy.toml"));

    let below_a = tree.check(&site.path("a"));
    assert_eq!(below_a, all, "ancestors above the directory apply");
    let only_b = tree.check(&site.path("a/b"));
    assert_eq!(
        only_b.len(),
        3,
        "a's own problem binds what b inherits: {only_b:#?}"
    );
    assert!(tree.check(&site.path("c")).is_empty());
    let missing = tree.check(&site.path("nope"));
    assert_eq!(missing.len(), 1);
}

#[test]
fn check_stops_at_the_depth_limit_and_says_so() {
    let site = Site::new("deep");
    let mut rel = String::from("d");
    for _ in 0..MAX_CHECK_DEPTH + 2 {
        rel.push_str("/d");
    }
    site.mkdir(&rel);
    site.put(&format!("{rel}/policy.toml"), "bogus = 1\n");
    let tree = site.tree("");
    let problems = tree.check(&site.root);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].message.contains("deeper than"),
        "{}",
        problems[0]
    );
}

#[test]
fn a_directory_outside_every_root_is_checked_as_a_root() {
    let site = Site::new("check-outside");
    std::fs::create_dir_all(site.outside("staging/t")).unwrap();
    std::fs::write(site.outside("staging/t/policy.toml"), "timeout_ms = 9000\n").unwrap();
    let tree = site.tree("[ceiling]\ntimeout_ms = 5000\n");
    let problems = tree.check(&site.outside("staging"));
    assert_eq!(problems.len(), 1);
    assert!(problems[0].message.contains("set by the config"));
}
