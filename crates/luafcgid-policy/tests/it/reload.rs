//! Reload: changed, added, removed and broken files; generations; concurrency.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use luafcgid_policy::{Resolution, SweepReport};

use crate::support::{allowed, invalid, Site};

#[test]
fn a_valid_change_applies_and_bumps_the_generation_of_that_subtree_only() {
    let site = Site::new("change");
    let file = site.put("t/policy.toml", "timeout_ms = 100\n");
    site.mkdir("u");
    let tree = site.tree("");
    let t1 = allowed(tree.resolve(&site.path("t/a.lua")));
    let u1 = allowed(tree.resolve(&site.path("u/a.lua")));
    let first = tree.sweep();
    assert_eq!(first.loaded, vec![file.clone()]);
    assert!(first.rejected.is_empty() && first.changed.is_empty());
    assert_eq!(tree.sweep(), SweepReport::default(), "nothing changed");
    let t1b = allowed(tree.resolve(&site.path("t/a.lua")));
    assert!(Arc::ptr_eq(&t1, &t1b));

    site.put("t/policy.toml", "timeout_ms = 200\n");
    let report = tree.sweep();
    assert_eq!(report.changed, vec![file]);
    assert!(report.loaded.is_empty() && report.rejected.is_empty());
    let t2 = allowed(tree.resolve(&site.path("t/a.lua")));
    assert_eq!(t2.policy.timeout, Duration::from_millis(200));
    assert_ne!(t2.generation, t1.generation);
    let u2 = allowed(tree.resolve(&site.path("u/a.lua")));
    assert_eq!(u2.generation, u1.generation, "a sibling is untouched");
    assert!(Arc::ptr_eq(&u1, &u2));
}

#[test]
fn a_change_that_leaves_the_effective_policy_equal_keeps_the_generation() {
    let site = Site::new("no-bump");
    site.put("t/policy.toml", "timeout_ms = 100\n");
    let tree = site.tree("");
    let before = allowed(tree.resolve(&site.path("t/a.lua")));
    tree.sweep();
    site.put(
        "t/policy.toml",
        "# same values, other bytes\ntimeout_ms = 100\n",
    );
    let report = tree.sweep();
    assert_eq!(report.changed.len(), 1);
    let after = allowed(tree.resolve(&site.path("t/a.lua")));
    assert_eq!(after.generation, before.generation);
}

#[test]
fn an_in_place_rewrite_of_another_length_is_noticed() {
    let site = Site::new("in-place");
    let file = site.put("t/policy.toml", "clones = 3\n");
    let tree = site.tree("");
    assert_eq!(
        allowed(tree.resolve(&site.path("t/a.lua"))).policy.clones,
        3
    );
    std::fs::write(&file, "clones = 4 # longer\n").unwrap();
    assert_eq!(tree.sweep().changed, vec![file]);
    assert_eq!(
        allowed(tree.resolve(&site.path("t/a.lua"))).policy.clones,
        4
    );
}

#[test]
fn a_broken_change_leaves_the_last_valid_version_in_force() {
    let site = Site::new("broken-change");
    let file = site.put("t/policy.toml", "timeout_ms = 100\n");
    let tree = site.tree("");
    let before = allowed(tree.resolve(&site.path("t/a.lua")));
    tree.sweep();

    site.put("t/policy.toml", "clones = 2\ntimeout_ms = \"soon\"\n");
    let report = tree.sweep();
    assert!(report.changed.is_empty() && report.loaded.is_empty());
    assert_eq!(report.rejected.len(), 1);
    let p = &report.rejected[0];
    assert_eq!(
        (p.file.as_path(), p.line, p.key.as_deref()),
        (file.as_path(), Some(2), Some("timeout_ms"))
    );
    let during = allowed(tree.resolve(&site.path("t/a.lua")));
    assert_eq!(during.policy.timeout, Duration::from_millis(100));
    assert_eq!(during.generation, before.generation);
    assert_eq!(tree.sweep(), SweepReport::default(), "reported once");

    site.put("t/policy.toml", "clones = 2\ntimeout_ms = \"later\"\n");
    assert_eq!(
        tree.sweep().rejected.len(),
        1,
        "another broken version is news, even with the same problem"
    );
    site.put("t/policy.toml", "{{{\n");
    assert_eq!(tree.sweep().rejected.len(), 1);
    site.put("t/policy.toml", "timeout_ms = 300\n");
    assert_eq!(tree.sweep().changed, vec![file]);
    let after = allowed(tree.resolve(&site.path("t/a.lua")));
    assert_eq!(after.policy.timeout, Duration::from_millis(300));
    assert_ne!(after.generation, before.generation);
}

#[test]
fn a_change_above_the_ceiling_leaves_the_last_valid_version_in_force() {
    let site = Site::new("over-change");
    site.put("t/policy.toml", "timeout_ms = 100\n");
    let tree = site.tree("[ceiling]\ntimeout_ms = 1000\n");
    allowed(tree.resolve(&site.path("t/a.lua")));
    site.put("t/policy.toml", "timeout_ms = 5000\n");
    let report = tree.sweep();
    assert_eq!(report.rejected.len(), 1);
    assert!(report.rejected[0].message.contains("exceeds the ceiling"));
    assert_eq!(
        allowed(tree.resolve(&site.path("t/a.lua"))).policy.timeout,
        Duration::from_millis(100)
    );
}

#[test]
fn added_and_removed_files_start_and_stop_applying() {
    let site = Site::new("add-remove");
    site.mkdir("t/sub");
    let tree = site.tree("");
    let plain = allowed(tree.resolve(&site.path("t/sub/a.lua")));
    assert!(plain.files.is_empty());
    assert_eq!(tree.sweep(), SweepReport::default());

    let file = site.put("t/policy.toml", "clones = 5\n");
    assert_eq!(tree.sweep().loaded, vec![file.clone()]);
    let with = allowed(tree.resolve(&site.path("t/sub/a.lua")));
    assert_eq!(with.policy.clones, 5);
    assert_eq!(with.files, vec![std::path::PathBuf::from("t/policy.toml")]);
    assert_ne!(with.generation, plain.generation);

    site.remove("t/policy.toml");
    let report = tree.sweep();
    assert_eq!(report.removed, vec![file]);
    let without = allowed(tree.resolve(&site.path("t/sub/a.lua")));
    assert_eq!(without.policy.clones, 2);
    assert!(without.files.is_empty());
    assert_ne!(without.generation, with.generation);
}

#[test]
fn a_file_invalid_at_first_load_breaks_its_subtree_only_until_fixed() {
    let site = Site::new("invalid-at-start");
    let bad = site.put("bad/policy.toml", "clones = 0\n");
    site.put("bad/sub/policy.toml", "timeout_ms = 5\n");
    site.put("good/policy.toml", "clones = 3\n");
    let tree = site.tree("");

    let p = invalid(tree.resolve(&site.path("bad/a.lua")));
    assert_eq!(
        (p.file.as_path(), p.line, p.key.as_deref()),
        (bad.as_path(), Some(1), Some("clones"))
    );
    invalid(tree.resolve(&site.path("bad/sub/a.lua")));
    assert_eq!(
        allowed(tree.resolve(&site.path("good/a.lua")))
            .policy
            .clones,
        3
    );
    allowed(tree.resolve(&site.path("index.lua")));
    let report = tree.sweep();
    assert_eq!(report.rejected.len(), 1, "{report:?}");
    assert_eq!(report.rejected[0].file, bad);

    site.put("bad/policy.toml", "clones = 4\n");
    assert_eq!(tree.sweep().loaded, vec![bad]);
    assert_eq!(
        allowed(tree.resolve(&site.path("bad/a.lua"))).policy.clones,
        4
    );
    assert_eq!(
        allowed(tree.resolve(&site.path("bad/sub/a.lua")))
            .policy
            .timeout,
        Duration::from_millis(5)
    );
}

#[test]
fn a_lowered_parent_ceiling_refuses_a_child_until_raised_again() {
    let site = Site::new("lowered");
    let parent = site.put("policy.toml", "[ceiling]\ntimeout_ms = 2000\n");
    let child = site.put("t/policy.toml", "timeout_ms = 1500\n");
    let tree = site.tree("");
    assert_eq!(
        allowed(tree.resolve(&site.path("t/a.lua"))).policy.timeout,
        Duration::from_millis(1500)
    );
    tree.sweep();

    site.put("policy.toml", "[ceiling]\ntimeout_ms = 1000\n");
    let report = tree.sweep();
    assert_eq!(report.changed, vec![parent.clone()]);
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(report.rejected[0].file, child);
    assert!(report.rejected[0].message.contains("set by policy.toml"));
    invalid(tree.resolve(&site.path("t/a.lua")));

    site.put("policy.toml", "[ceiling]\ntimeout_ms = 3000\n");
    let report = tree.sweep();
    assert_eq!(report.changed, vec![parent]);
    assert_eq!(report.loaded, vec![child]);
    assert_eq!(
        allowed(tree.resolve(&site.path("t/a.lua"))).policy.timeout,
        Duration::from_millis(1500)
    );
}

#[test]
fn vanished_directories_are_forgotten_and_can_come_back() {
    let site = Site::new("vanish");
    let file = site.put("t/sub/policy.toml", "clones = 6\n");
    let tree = site.tree("");
    assert_eq!(
        allowed(tree.resolve(&site.path("t/sub/a.lua")))
            .policy
            .clones,
        6
    );
    tree.sweep();
    std::fs::remove_dir_all(site.path("t")).unwrap();
    assert_eq!(tree.sweep().removed, vec![file.clone()]);
    tree.sweep();
    site.put("t/sub/policy.toml", "clones = 7\n");
    assert_eq!(
        allowed(tree.resolve(&site.path("t/sub/a.lua")))
            .policy
            .clones,
        7
    );
    assert_eq!(tree.sweep().loaded, vec![file]);
}

/// Resolvers run while the file flips between valid versions and broken ones and the tree
/// sweeps: every resolution is one of the valid versions, never an error.
#[test]
fn resolution_never_fails_while_reloading() {
    let site = Site::new("concurrent");
    site.put("t/policy.toml", "timeout_ms = 100\n");
    let tree = Arc::new(site.tree(""));
    let script = site.path("t/a.lua");
    allowed(tree.resolve(&script));
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicUsize::new(0));
    let resolvers: Vec<_> = (0..2)
        .map(|_| {
            let (tree, stop, seen, script) =
                (tree.clone(), stop.clone(), seen.clone(), script.clone());
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    match tree.resolve(&script) {
                        Resolution::Allowed(e) => {
                            let ms = e.policy.timeout.as_millis();
                            assert!(ms == 100 || ms == 200, "{ms}");
                        }
                        other => panic!("resolution failed during reload: {other:?}"),
                    }
                    n += 1;
                }
                seen.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();
    for i in 0..60 {
        let text = match i % 3 {
            0 => "timeout_ms = 200\n",
            1 => "timeout_ms = [\n",
            _ => "timeout_ms = 100\n",
        };
        site.put("t/policy.toml", text);
        tree.sweep();
    }
    stop.store(true, Ordering::Relaxed);
    for r in resolvers {
        r.join().unwrap();
    }
    assert!(seen.load(Ordering::Relaxed) > 0);
}

#[test]
fn first_loads_beyond_the_pending_limit_are_counted() {
    use luafcgid_policy::MAX_PENDING_EVENTS;
    let site = Site::new("pending");
    let n = MAX_PENDING_EVENTS + 3;
    for i in 0..n {
        site.put(&format!("t{i}/policy.toml"), "clones = 1\n");
    }
    let tree = site.tree("");
    for i in 0..n {
        allowed(tree.resolve(&site.path(&format!("t{i}/a.lua"))));
    }
    let report = tree.sweep();
    assert_eq!(report.loaded.len(), MAX_PENDING_EVENTS);
    assert_eq!(report.dropped, 3);
    assert!(tree.sweep().is_empty());
}
