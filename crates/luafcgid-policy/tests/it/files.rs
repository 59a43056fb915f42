//! Untrusted files: symbolic links, size, type, encoding, and no content in messages.

use std::os::unix::fs::symlink;

use luafcgid_policy::MAX_POLICY_FILE_SIZE;

use crate::support::{allowed, invalid, Site};

const SECRET: &str = "hunter2-do-not-print";

#[test]
fn a_symlinked_policy_file_is_refused_and_its_target_never_shown() {
    let site = Site::new("symlink");
    let secret = site.outside("secret.toml");
    std::fs::write(
        &secret,
        format!("password = \"{SECRET}\"\ntimeout_ms = 1\n"),
    )
    .unwrap();
    site.mkdir("t");
    symlink(&secret, site.path("t/policy.toml")).unwrap();
    // Even a link to a file inside the same root is refused: policy files are regular files.
    site.put("shared.toml", "clones = 3\n");
    site.mkdir("u");
    symlink("../shared.toml", site.path("u/policy.toml")).unwrap();
    let tree = site.tree("");

    for dir in ["t", "u"] {
        let p = invalid(tree.resolve(&site.path(&format!("{dir}/a.lua"))));
        assert!(p.message.contains("symbolic link"), "{p}");
        assert!(!p.to_string().contains(SECRET), "{p}");
    }
    let problems = tree.check(&site.root);
    assert_eq!(problems.len(), 2, "{problems:?}");
    for p in &problems {
        assert!(!p.to_string().contains(SECRET));
    }
    allowed(tree.resolve(&site.path("index.lua")));
}

#[test]
fn problems_name_keys_but_never_quote_values_or_lines() {
    let site = Site::new("no-echo");
    let cases = [
        format!("api_token = \"{SECRET}\"\n"),
        format!("memory = \"{SECRET}\"\n"),
        format!("libs = [\"{SECRET}\"]\n"),
        format!("timeout_ms = {SECRET}\n"),
        format!("{SECRET}\n"),
        format!("[rate]\nper_client = \"{SECRET}\"\n"),
        format!("tenant = \"{SECRET}\"\nclones = 0\n"),
    ];
    for (i, text) in cases.iter().enumerate() {
        site.put(&format!("c{i}/policy.toml"), text);
    }
    let tree = site.tree("");
    let problems = tree.check(&site.root);
    assert_eq!(problems.len(), cases.len(), "{problems:#?}");
    for p in &problems {
        assert!(!p.to_string().contains(SECRET), "{p}");
        assert!(!p.to_string().contains("hunter2"), "{p}");
    }
    assert!(
        problems[0].message.contains("api_token"),
        "the key is named"
    );
}

#[test]
fn an_oversized_policy_file_is_refused() {
    let site = Site::new("oversized");
    let limit = MAX_POLICY_FILE_SIZE as usize;
    let mut big = "# filler\n".repeat(limit / 9 + 1);
    big.push_str("clones = 3\n");
    assert!(big.len() > limit);
    site.put("big/policy.toml", &big);
    let mut exact = "#".repeat(limit - "\nclones = 3\n".len());
    exact.push_str("\nclones = 3\n");
    assert_eq!(exact.len(), limit);
    site.put("exact/policy.toml", &exact);
    let tree = site.tree("");
    let p = invalid(tree.resolve(&site.path("big/a.lua")));
    assert_eq!(p.line, None);
    assert!(p.message.contains("larger than 64KiB"), "{p}");
    assert_eq!(
        allowed(tree.resolve(&site.path("exact/a.lua")))
            .policy
            .clones,
        3
    );
}

#[test]
fn directories_and_fifos_named_policy_toml_are_refused_without_blocking() {
    let site = Site::new("non-regular");
    site.mkdir("d/policy.toml");
    site.mkdir("f");
    let status = std::process::Command::new("mkfifo")
        .arg(site.path("f/policy.toml"))
        .status()
        .expect("mkfifo runs");
    assert!(status.success());
    let tree = site.tree("");
    for dir in ["d", "f"] {
        let p = invalid(tree.resolve(&site.path(&format!("{dir}/a.lua"))));
        assert!(p.message.contains("not a regular file"), "{p}");
    }
}

#[test]
fn non_utf8_is_a_problem_with_its_line() {
    let site = Site::new("utf8");
    site.put_bytes("t/policy.toml", b"clones = 3\n# caf\xe9\n");
    let tree = site.tree("");
    let p = invalid(tree.resolve(&site.path("t/a.lua")));
    assert_eq!(p.line, Some(2));
    assert!(p.message.contains("UTF-8"));
}

#[test]
fn an_unreadable_policy_file_is_a_problem() {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::new("unreadable");
    let f = site.put("t/policy.toml", "clones = 3\n");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o000)).unwrap();
    let readable_anyway = std::fs::read(&f).is_ok(); // as root, permissions do not stop reads
    let tree = site.tree("");
    let r = tree.resolve(&site.path("t/a.lua"));
    if readable_anyway {
        assert_eq!(allowed(r).policy.clones, 3);
    } else {
        assert!(invalid(r).message.contains("cannot be read"));
    }
}
