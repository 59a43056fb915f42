//! A document root in a temporary directory, removed when dropped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use luafcgid_policy::{Effective, OperatorPolicy, PolicyTree, Problem, Resolution};

static NEXT: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug)]
pub struct Site {
    /// Canonical.
    pub root: PathBuf,
    base: PathBuf,
}

impl Site {
    pub fn new(name: &str) -> Site {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = std::env::temp_dir().join(format!(
            "luafcgid-policy-it-{}-{n}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("www")).unwrap();
        let base = std::fs::canonicalize(base).unwrap();
        Site {
            root: base.join("www"),
            base,
        }
    }

    /// A path below the document root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// A path beside the document root (outside it).
    pub fn outside(&self, rel: &str) -> PathBuf {
        self.base.join(rel)
    }

    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// Writes a file through a new inode (write beside, then rename over), so a reload
    /// sees the change whatever the clock's resolution.
    pub fn put(&self, rel: &str, text: &str) -> PathBuf {
        self.put_bytes(rel, text.as_bytes())
    }

    pub fn put_bytes(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let tmp = p.with_file_name(".policy.toml.new");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        p
    }

    pub fn remove(&self, rel: &str) {
        std::fs::remove_file(self.path(rel)).unwrap();
    }

    /// A tree over this root with the given daemon config text.
    pub fn tree(&self, config: &str) -> PolicyTree {
        let op = OperatorPolicy::from_config(Path::new("luafcgid.toml"), config)
            .unwrap_or_else(|p| panic!("config: {p:?}"));
        PolicyTree::new(op, vec![self.root.clone()])
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

#[track_caller]
pub fn allowed(r: Resolution) -> Arc<Effective> {
    match r {
        Resolution::Allowed(e) => e,
        other => panic!("expected an allowed policy, got {other:?}"),
    }
}

#[track_caller]
pub fn denied(r: Resolution) -> Arc<Effective> {
    match r {
        Resolution::Denied(e) => e,
        other => panic!("expected a denied policy, got {other:?}"),
    }
}

#[track_caller]
pub fn invalid(r: Resolution) -> Arc<Problem> {
    match r {
        Resolution::Invalid(p) => p,
        other => panic!("expected a policy error, got {other:?}"),
    }
}

pub fn rel(p: &str) -> PathBuf {
    PathBuf::from(p)
}
