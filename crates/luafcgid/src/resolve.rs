//! From `SCRIPT_FILENAME` to a script file the daemon may run.
//!
//! The claimed path (Apache's `proxy:fcgi://host:port` prefix stripped) must name, after
//! following symlinks, a regular, readable file with a configured extension inside one of
//! the document roots and inside the same tenant's tree as the claimed path (the tenant of a
//! path is its first directory under the root; files directly in the root belong to the
//! root). No process-wide `chdir` is ever done. Answers are cached for `sweep` so a warm
//! request costs a map lookup, not a `realpath`; a changed or deleted file is seen within it.
//! In front of the shared cache, each thread keeps the last answer it gave, until the shared
//! entry it came from expires: a connection names the same script request after request,
//! and finding it there takes no lock that every thread of the daemon shares.

use foldhash::HashMap;
use std::cell::RefCell;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Tells this resolver's answers apart in the threads' [`LAST`] answers.
    id: u64,
}

/// A thread's last answer: which resolver gave it, for which claimed path, and when the
/// shared cache found it (it expires with that entry).
struct Last {
    resolver: u64,
    name: Vec<u8>,
    answer: Answer,
    at: Instant,
}

thread_local! {
    static LAST: RefCell<Option<Last>> = const { RefCell::new(None) };
}

/// Resolvers made so far, for their ids.
static RESOLVERS: AtomicU64 = AtomicU64::new(0);

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
            id: RESOLVERS.fetch_add(1, Ordering::Relaxed),
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
        if name.len() > MAX_SCRIPT_PATH {
            return Err(Refusal::BadRequest("malformed SCRIPT_FILENAME"));
        }
        // A name found in either cache was checked for a NUL byte before it was cached:
        // only a name looked up anew is scanned for one.
        if let Some(answer) = self.last_answer(name, now) {
            return answer;
        }
        let cached = {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .get(name)
                .filter(|(_, at)| now.duration_since(*at) < self.ttl)
                .map(|(answer, at)| (answer.clone(), *at))
        };
        if let Some((answer, at)) = cached {
            self.remember(name, &answer, at);
            return answer;
        }
        if name.contains(&0) {
            return Err(Refusal::BadRequest("malformed SCRIPT_FILENAME"));
        }
        let answer = self.resolve_uncached(Path::new(OsStr::from_bytes(name)));
        if let Err(Refusal::Unavailable(_)) = answer {
            return answer;
        }
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= RESOLVE_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(name.into(), (answer.clone(), now));
        }
        self.remember(name, &answer, now);
        answer
    }

    /// This thread's last answer, if it is this resolver's, for `name`, and its shared
    /// entry has not expired at `now`.
    fn last_answer(&self, name: &[u8], now: Instant) -> Option<Answer> {
        LAST.try_with(|last| {
            let last = last.try_borrow().ok()?;
            let last = last.as_ref()?;
            (last.resolver == self.id
                && last.name == name
                && now.duration_since(last.at) < self.ttl)
                .then(|| last.answer.clone())
        })
        .ok()
        .flatten()
    }

    /// Makes `answer`, found in the shared cache at `at`, this thread's last answer.
    fn remember(&self, name: &[u8], answer: &Answer, at: Instant) {
        let _ = LAST.try_with(|last| {
            let Ok(mut last) = last.try_borrow_mut() else {
                return;
            };
            match &mut *last {
                Some(last) => {
                    last.resolver = self.id;
                    // The name's buffer is reused: no allocation when a thread's scripts
                    // alternate.
                    last.name.clear();
                    last.name.extend_from_slice(name);
                    last.answer = answer.clone();
                    last.at = at;
                }
                None => {
                    *last = Some(Last {
                        resolver: self.id,
                        name: name.to_vec(),
                        answer: answer.clone(),
                        at,
                    })
                }
            }
        });
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

    /// A document root holding `site/a.lua`, and a resolver over it.
    fn root_with_script(ttl: Duration) -> (tempfile::TempDir, Resolver, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("site")).unwrap();
        let script = dir.path().join("site/a.lua");
        std::fs::write(&script, "function handler() return 'a' end").unwrap();
        let resolver = Resolver::new(&[dir.path().to_path_buf()], &["lua".into()], ttl).unwrap();
        let name = script.as_os_str().as_bytes().to_vec();
        (dir, resolver, name)
    }

    #[test]
    fn a_name_with_a_nul_byte_is_refused_even_after_its_prefix_was_cached() {
        let (_dir, resolver, name) = root_with_script(Duration::from_secs(60));
        let t0 = Instant::now();
        let mut with_nul = name.clone();
        with_nul.extend_from_slice(b"\0.lua");
        let malformed = Some(Refusal::BadRequest("malformed SCRIPT_FILENAME"));
        assert_eq!(resolver.resolve(Some(&with_nul), t0).err(), malformed);
        assert!(resolver.resolve(Some(&name), t0).is_ok());
        assert_eq!(resolver.resolve(Some(&with_nul), t0).err(), malformed);
        let mut nul_inside = name.clone();
        nul_inside.insert(name.len() - 4, 0);
        assert_eq!(resolver.resolve(Some(&nul_inside), t0).err(), malformed);
    }

    #[test]
    fn a_threads_last_answer_expires_with_the_shared_one() {
        let ttl = Duration::from_secs(60);
        let (dir, resolver, name) = root_with_script(ttl);
        let t0 = Instant::now();
        assert!(resolver.resolve(Some(&name), t0).is_ok());
        std::fs::remove_file(dir.path().join("site/a.lua")).unwrap();
        assert!(
            resolver.resolve(Some(&name), t0).is_ok(),
            "still cached within the sweep"
        );
        assert_eq!(
            resolver.resolve(Some(&name), t0 + ttl).err(),
            Some(Refusal::NotFound),
            "a removed script is seen once its answer expired"
        );
    }

    #[test]
    fn a_threads_last_answer_is_not_taken_by_another_resolver() {
        // The same path, asked of a resolver whose roots do not hold it (a reload that
        // dropped the root): not the first resolver's answer.
        let (_dir, first, name) = root_with_script(Duration::from_secs(60));
        let other_root = tempfile::tempdir().unwrap();
        let second = Resolver::new(
            &[other_root.path().to_path_buf()],
            &["lua".into()],
            Duration::from_secs(60),
        )
        .unwrap();
        let t0 = Instant::now();
        assert!(first.resolve(Some(&name), t0).is_ok());
        assert!(matches!(
            second.resolve(Some(&name), t0),
            Err(Refusal::Forbidden(_))
        ));
    }
}
