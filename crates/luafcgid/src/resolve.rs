//! From `SCRIPT_FILENAME` to a script file the daemon may run.
//!
//! The claimed path (Apache's `proxy:fcgi://host:port` prefix stripped) must name, after
//! following symlinks, a regular, readable file with a configured extension inside one of
//! the document roots and inside the same tenant's tree as the claimed path (the tenant of a
//! path is its first directory under the root; files directly in the root belong to the
//! root). No process-wide `chdir` is ever done. Answers are cached for `sweep` so a warm
//! request costs a map lookup, not a `realpath`; a changed or deleted file is seen within it.

use foldhash::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use luafcgid_pool::{FileStamp, ScriptKey};

/// Most cached answers kept; the cache is emptied when it is full.
pub const RESOLVE_CACHE_ENTRIES: usize = 16_384;

/// Longest `SCRIPT_FILENAME` accepted.
pub const MAX_SCRIPT_PATH: usize = 4096;

/// A script the daemon may run.
#[derive(Debug)]
pub struct Script {
    /// Real path (the pool's key).
    pub key: ScriptKey,
    /// The file's stamp when it was resolved.
    pub stamp: FileStamp,
    /// Path relative to its document root (for logs and error messages).
    pub relative: String,
    /// Real path of the tenant's directory: `require` stays inside it.
    pub tenant_root: PathBuf,
    /// The tenant's name (its directory's name; empty for the root).
    pub tenant: String,
}

/// Why a script cannot run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: no or malformed `SCRIPT_FILENAME`.
    BadRequest(&'static str),
    /// 404: no such regular file.
    NotFound,
    /// 403: outside the roots or the tenant's tree, unreadable, wrong extension.
    Forbidden(&'static str),
    /// 503: the system could not answer now (descriptors or memory exhausted); never
    /// cached, so the next request tries again.
    Unavailable(&'static str),
}

/// The refusal for an error of the file system: gone, forbidden, or a passing shortage of
/// the daemon's own (descriptors, memory) that says nothing of the script.
fn refusal_of(e: &std::io::Error) -> Refusal {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => Refusal::Forbidden("unreadable"),
        std::io::ErrorKind::OutOfMemory => Refusal::Unavailable("out of memory"),
        _ if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
            Refusal::Unavailable("out of file descriptors")
        }
        _ if matches!(e.raw_os_error(), Some(libc::ENOMEM)) => {
            Refusal::Unavailable("out of memory")
        }
        _ => Refusal::NotFound,
    }
}

#[derive(Debug)]
struct Root {
    given: PathBuf,
    real: PathBuf,
}

type Answer = Result<Arc<Script>, Refusal>;

/// Cached answers by claimed path, with when they were found.
type AnswerCache = HashMap<Box<[u8]>, (Answer, Instant)>;

/// Resolves and caches script paths.
#[derive(Debug)]
pub struct Resolver {
    roots: Vec<Root>,
    extensions: Vec<String>,
    ttl: Duration,
    cache: Mutex<AnswerCache>,
}

/// Strips Apache mod_proxy_fcgi's `proxy:fcgi://host[:port]` prefix.
pub fn strip_proxy_prefix(name: &[u8]) -> &[u8] {
    const P: &[u8] = b"proxy:fcgi://";
    if name.len() > P.len() && name[..P.len()].eq_ignore_ascii_case(P) {
        let rest = &name[P.len()..];
        return match rest.iter().position(|&b| b == b'/') {
            Some(i) => &rest[i..],
            None => b"",
        };
    }
    name
}

impl Resolver {
    /// A resolver over `docroots` (each must exist).
    pub fn new(
        docroots: &[PathBuf],
        extensions: &[String],
        ttl: Duration,
    ) -> std::io::Result<Self> {
        let mut roots = Vec::new();
        for d in docroots {
            roots.push(Root {
                given: d.clone(),
                real: std::fs::canonicalize(d)?,
            });
        }
        Ok(Resolver {
            roots,
            extensions: extensions.to_vec(),
            ttl,
            cache: Mutex::new(HashMap::default()),
        })
    }

    /// Real paths of the document roots.
    pub fn roots(&self) -> impl Iterator<Item = &Path> {
        self.roots.iter().map(|r| r.real.as_path())
    }

    /// Resolves a `SCRIPT_FILENAME` value (cached) received at `now`.
    pub fn resolve(&self, script_filename: Option<&[u8]>, now: Instant) -> Answer {
        let Some(raw) = script_filename else {
            return Err(Refusal::BadRequest("no SCRIPT_FILENAME"));
        };
        let name = strip_proxy_prefix(raw);
        if name.is_empty() {
            return Err(Refusal::BadRequest("empty SCRIPT_FILENAME"));
        }
        if name.len() > MAX_SCRIPT_PATH || name.contains(&0) {
            return Err(Refusal::BadRequest("malformed SCRIPT_FILENAME"));
        }
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((answer, at)) = cache.get(name) {
                if now.duration_since(*at) < self.ttl {
                    return answer.clone();
                }
            }
        }
        let answer = self.resolve_uncached(Path::new(OsStr::from_bytes(name)));
        if let Err(Refusal::Unavailable(_)) = answer {
            return answer;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= RESOLVE_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(name.into(), (answer.clone(), now));
        answer
    }

    /// A real path as the audit log shows it: relative to its document root.
    pub fn relative(&self, real: &Path) -> String {
        self.roots
            .iter()
            .find_map(|r| real.strip_prefix(&r.real).ok())
            .unwrap_or(real)
            .to_string_lossy()
            .into_owned()
    }

    /// Forgets every cached answer.
    pub fn clear(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn has_extension(&self, p: &Path) -> bool {
        let name = p.file_name().map(|n| n.as_bytes()).unwrap_or(b"");
        self.extensions
            .iter()
            .any(|x| name.len() > x.len() && name.ends_with(x.as_bytes()))
    }

    fn resolve_uncached(&self, claimed: &Path) -> Answer {
        if !claimed.is_absolute() {
            return Err(Refusal::BadRequest("SCRIPT_FILENAME is not absolute"));
        }
        let mut parts = Vec::new();
        for c in claimed.components() {
            match c {
                Component::RootDir => {}
                Component::CurDir => {}
                Component::Normal(p) => parts.push(p),
                Component::ParentDir => return Err(Refusal::Forbidden("`..` in the path")),
                Component::Prefix(_) => return Err(Refusal::Forbidden("path prefix")),
            }
        }
        let clean: PathBuf = std::iter::once(OsStr::new("/")).chain(parts).collect();
        if !self.has_extension(&clean) {
            return Err(Refusal::Forbidden("not a script extension"));
        }
        let Some((root, rel_claimed)) = self.roots.iter().find_map(|r| {
            clean
                .strip_prefix(&r.given)
                .ok()
                .or_else(|| clean.strip_prefix(&r.real).ok())
                .map(|rel| (r, rel.to_path_buf()))
        }) else {
            return Err(Refusal::Forbidden("outside the document roots"));
        };
        let real = std::fs::canonicalize(&clean).map_err(|e| refusal_of(&e))?;
        let Ok(rel_real) = real.strip_prefix(&root.real) else {
            return Err(Refusal::Forbidden("resolves outside the document root"));
        };
        let tenant_of = |rel: &Path| -> Option<PathBuf> {
            let mut c = rel.components();
            let first = c.next()?;
            c.next()?;
            Some(PathBuf::from(first.as_os_str()))
        };
        let tenant = tenant_of(&rel_claimed);
        if tenant != tenant_of(rel_real) {
            return Err(Refusal::Forbidden("resolves into another tenant's tree"));
        }
        if !self.has_extension(&real) {
            return Err(Refusal::Forbidden("target is not a script extension"));
        }
        let meta = std::fs::metadata(&real).map_err(|e| match refusal_of(&e) {
            Refusal::Forbidden(_) => Refusal::NotFound,
            other => other,
        })?;
        if !meta.is_file() {
            return Err(Refusal::NotFound);
        }
        if let Err(e) = std::fs::File::open(&real) {
            return Err(match refusal_of(&e) {
                Refusal::NotFound if e.kind() != std::io::ErrorKind::NotFound => {
                    Refusal::Forbidden("unreadable")
                }
                other => other,
            });
        }
        let tenant_root = match &tenant {
            Some(t) => root.real.join(t),
            None => root.real.clone(),
        };
        Ok(Arc::new(Script {
            key: Arc::from(real.as_path()),
            stamp: FileStamp::of(&meta),
            relative: rel_real.to_string_lossy().into_owned(),
            tenant_root,
            tenant: tenant
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apache_prefix_is_stripped() {
        assert_eq!(
            strip_proxy_prefix(b"proxy:fcgi://127.0.0.1:9000/srv/a.lua"),
            b"/srv/a.lua"
        );
        assert_eq!(strip_proxy_prefix(b"/srv/a.lua"), b"/srv/a.lua");
        assert_eq!(strip_proxy_prefix(b"proxy:fcgi://host"), b"");
    }
}
