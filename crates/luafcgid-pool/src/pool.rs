//! Idle Lua states per script, with per-script admission, a global cap and eviction by
//! popularity with aging.
//!
//! Invariants: a state is either idle in exactly one entry or leased to exactly one request;
//! `total` counts idle + leased retained states and never exceeds the cap (a request that
//! finds the cap reached and nothing idle to evict runs on a transient state that is dropped
//! afterwards); states are dropped outside the lock (closing a Lua state takes time).

use foldhash::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

/// A script's identity: its real path (after symlinks).
pub type ScriptKey = Arc<Path>;

/// A script's key as the pool's map holds it: hashed and compared as the bytes of its path.
/// The resolver hands out canonical paths, so one file has one spelling, and bytes cost far
/// less than `Path`'s component-by-component hashing and comparison (three lookups per
/// request, and the eviction scan compares every entry's key).
#[derive(Debug, Clone)]
struct MapKey(ScriptKey);

impl MapKey {
    fn bytes(&self) -> &[u8] {
        path_bytes(&self.0)
    }
}

fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

impl PartialEq for MapKey {
    fn eq(&self, other: &MapKey) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for MapKey {}

impl std::hash::Hash for MapKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        // As `[u8]` hashes, so that lookups by `&[u8]` (`Borrow`) find it.
        self.bytes().hash(h);
    }
}

impl std::borrow::Borrow<[u8]> for MapKey {
    fn borrow(&self) -> &[u8] {
        self.bytes()
    }
}

/// What [`StatePool::admission`] says of a script.
#[derive(Debug, Clone)]
pub struct Admission {
    /// One permit per request of the script running or about to (`clones` in all).
    pub permits: Arc<Semaphore>,
    /// One of the script's recent runs took long ([`StatePool::mark_slow`]).
    pub slow: bool,
}

/// What identifies a version of a file: any change of it means the file changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    mtime_ns: i128,
    size: u64,
    inode: u64,
    device: u64,
}

impl FileStamp {
    /// The stamp of a file from its metadata.
    pub fn of(meta: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            size: meta.size(),
            inode: meta.ino(),
            device: meta.dev(),
        }
    }

    /// The stamp of the file at `path` (following symlinks).
    pub fn read(path: &Path) -> std::io::Result<FileStamp> {
        std::fs::metadata(path).map(|m| FileStamp::of(&m))
    }
}

/// What a script's states were built from: the script file's stamp and the generation of
/// its effective policy. When either changes, the states built from the old one are retired
/// at the next checkout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub file: FileStamp,
    pub policy: u64,
}

impl From<FileStamp> for Version {
    /// A version under policy generation 0 (for callers without policies).
    fn from(file: FileStamp) -> Version {
        Version { file, policy: 0 }
    }
}

/// What the pool needs to know of a state.
pub trait Pooled: Send + 'static {
    /// Files whose change makes the state stale (the script and the modules it loaded).
    fn files(&self) -> &[PathBuf];
    /// Requests served so far.
    fn requests(&self) -> u64;
    /// Bytes of memory the state holds now.
    fn memory(&self) -> usize;
}

impl Pooled for luafcgid_sandbox::ScriptState {
    fn files(&self) -> &[PathBuf] {
        luafcgid_sandbox::ScriptState::files(self)
    }
    fn requests(&self) -> u64 {
        luafcgid_sandbox::ScriptState::requests(self)
    }
    fn memory(&self) -> usize {
        luafcgid_sandbox::ScriptState::used_memory(self)
    }
}

/// A boxed state is pooled as the state: moving it in and out of the pool then copies a
/// pointer, not the state's fields.
impl<S: Pooled> Pooled for Box<S> {
    fn files(&self) -> &[PathBuf] {
        (**self).files()
    }
    fn requests(&self) -> u64 {
        (**self).requests()
    }
    fn memory(&self) -> usize {
        (**self).memory()
    }
}

/// How a lease goes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retire {
    /// Keep the state for later requests unless it is too old or stale.
    Keep,
    /// Drop the state (it hit a limit, the policy is not persistent, ...).
    Discard,
}

/// Counts for diagnostics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Retained states (idle + leased).
    pub states: usize,
    /// Idle states.
    pub idle: usize,
    /// Scripts with an entry.
    pub scripts: usize,
    /// States evicted to make room, since start.
    pub evicted: u64,
    /// Memory of the retained states, as measured when each was last checked in.
    pub memory: usize,
}

/// A file a script's states depend on, with its stamp when they were built.
type WatchedFile = (PathBuf, Option<FileStamp>);

struct Idle<S> {
    state: S,
    created: Instant,
    memory: usize,
}

struct Entry<S> {
    idle: Vec<Idle<S>>,
    leased: usize,
    generation: u64,
    stamp: Option<Version>,
    files: Vec<WatchedFile>,
    score: f64,
    scored_at: Instant,
    admission: Arc<Semaphore>,
    clones: u32,
    /// Until when the script counts as slow (see [`StatePool::mark_slow`]).
    slow_until: Option<Instant>,
}

impl<S> Entry<S> {
    fn new(clones: u32, now: Instant) -> Self {
        Entry {
            idle: Vec::new(),
            leased: 0,
            generation: 0,
            stamp: None,
            files: Vec::new(),
            score: 0.0,
            scored_at: now,
            admission: Arc::new(Semaphore::new(clones as usize)),
            clones,
            slow_until: None,
        }
    }

    /// Forgets the states' version and moves the idle states to `doomed`; states still
    /// leased are dropped at checkin. Returns how many idle states went and their memory.
    fn retire(&mut self, doomed: &mut Vec<S>) -> (usize, usize) {
        self.generation += 1;
        self.stamp = None;
        self.files.clear();
        let count = self.idle.len();
        let memory = self.idle.iter().map(|i| i.memory).sum();
        doomed.extend(self.idle.drain(..).map(|i| i.state));
        (count, memory)
    }

    fn popularity(&self, now: Instant, half_life: Duration) -> f64 {
        let age = now.saturating_duration_since(self.scored_at).as_secs_f64();
        self.score * (-age / half_life.as_secs_f64()).exp2()
    }
}

struct Inner<S> {
    entries: HashMap<MapKey, Entry<S>>,
    total: usize,
    evicted: u64,
    /// Memory of the retained states, as last measured (at checkin).
    memory: usize,
}

/// A state lent to one request.
#[derive(Debug)]
pub struct Lease<S> {
    key: ScriptKey,
    state: Option<S>,
    generation: u64,
    created: Instant,
    transient: bool,
    /// Memory counted for this state in the pool's total.
    memory: usize,
    /// The state was created for this request (its chunk just ran).
    pub fresh: bool,
    /// A script whose idle state was evicted to make room for this one.
    pub evicted: Option<ScriptKey>,
}

impl<S> Lease<S> {
    /// The leased state.
    pub fn state(&mut self) -> &mut S {
        self.state
            .as_mut()
            .expect("a lease holds its state until checkin")
    }
}

/// The pool of Lua states of every script.
pub struct StatePool<S> {
    inner: Mutex<Inner<S>>,
    cap: usize,
    memory_cap: usize,
    half_life: Duration,
}

impl<S: Pooled> std::fmt::Debug for StatePool<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatePool")
            .field("cap", &self.cap)
            .field("stats", &self.stats())
            .finish()
    }
}

fn drop_all<S>(states: Vec<S>) {
    drop(states)
}

impl<S: Pooled> StatePool<S> {
    /// A pool retaining at most `states` states holding at most `memory` bytes together
    /// (0: no bound), whose popularity counts halve every `half_life`.
    pub fn new(states: usize, memory: usize, half_life: Duration) -> Self {
        StatePool {
            inner: Mutex::new(Inner {
                entries: HashMap::default(),
                total: 0,
                evicted: 0,
                memory: 0,
            }),
            cap: states.max(1),
            memory_cap: if memory == 0 { usize::MAX } else { memory },
            half_life,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<S>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a request of `key` needs before it runs: the semaphore that bounds concurrent
    /// requests of the script to `clones` (a request holds a permit from before it is
    /// queued until its state is checked back in), and whether the script is slow now.
    pub fn admission(&self, key: &ScriptKey, clones: u32) -> Admission {
        let mut inner = self.lock();
        // Found without cloning the key, nearly always.
        let entry = match inner.entries.get_mut(path_bytes(key)) {
            Some(entry) => entry,
            None => inner
                .entries
                .entry(MapKey(key.clone()))
                .or_insert_with(|| Entry::new(clones, Instant::now())),
        };
        if entry.clones != clones {
            entry.clones = clones;
            entry.admission = Arc::new(Semaphore::new(clones as usize));
        }
        Admission {
            permits: entry.admission.clone(),
            slow: entry.slow_until.is_some_and(|until| Instant::now() < until),
        }
    }

    /// Counts `key` as slow for the next `window`: one of its runs took long. The mark is
    /// kept with the script's entry, so it costs nothing per request and goes when the
    /// entry does; a script with no entry (never admitted, or forgotten) is not marked.
    pub fn mark_slow(&self, key: &ScriptKey, window: Duration) {
        let until = Instant::now() + window;
        if let Some(entry) = self.lock().entries.get_mut(path_bytes(key)) {
            entry.slow_until = Some(until);
        }
    }

    /// Lends a state of `key`: an idle one if any, else one made by `build`. `version` is
    /// the script file's current stamp and policy generation; when it differs from the one
    /// the states were built from, those states are retired first.
    pub fn checkout<E>(
        &self,
        key: &ScriptKey,
        version: impl Into<Version>,
        build: impl FnOnce() -> Result<S, E>,
    ) -> Result<Lease<S>, E> {
        let stamp = version.into();
        let now = Instant::now();
        let mut doomed: Vec<S> = Vec::new();
        let (generation, transient, evicted) = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let half_life = self.half_life;
            let entry = match inner.entries.get_mut(path_bytes(key)) {
                Some(entry) => entry,
                None => inner
                    .entries
                    .entry(MapKey(key.clone()))
                    .or_insert_with(|| Entry::new(1, now)),
            };
            // The decay is brought up to date at most once per 1/1024 of a half-life (an
            // `exp2` per request cost some 200 instructions); a request counted in
            // between counts as of `scored_at`, at most 0.07% too little.
            if now.saturating_duration_since(entry.scored_at) < half_life / 1024 {
                entry.score += 1.0;
            } else {
                entry.score = entry.popularity(now, half_life) + 1.0;
                entry.scored_at = now;
            }
            if entry.stamp != Some(stamp) {
                if entry.stamp.is_some() {
                    let (count, memory) = entry.retire(&mut doomed);
                    inner.total -= count;
                    inner.memory -= memory;
                }
                entry.stamp = Some(stamp);
                entry.files.clear();
            }
            if let Some(idle) = entry.idle.pop() {
                entry.leased += 1;
                let generation = entry.generation;
                drop(guard);
                drop_all(doomed);
                return Ok(Lease {
                    key: key.clone(),
                    state: Some(idle.state),
                    generation,
                    created: idle.created,
                    transient: false,
                    memory: idle.memory,
                    fresh: false,
                    evicted: None,
                });
            }
            let generation = entry.generation;
            let mut evicted = None;
            let mut transient = false;
            if inner.total >= self.cap {
                // Evict one idle state of the least popular other script.
                let victim = inner
                    .entries
                    .iter()
                    .filter(|(k, e)| !e.idle.is_empty() && k.bytes() != path_bytes(key))
                    .map(|(k, e)| (k, e.popularity(now, half_life)))
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|(k, _)| k.0.clone());
                match victim {
                    Some(v) => {
                        let e = inner
                            .entries
                            .get_mut(path_bytes(&v))
                            .expect("victim exists");
                        // The least recently used idle state sits at the bottom.
                        let idle = e.idle.remove(0);
                        inner.memory -= idle.memory;
                        doomed.push(idle.state);
                        inner.total -= 1;
                        inner.evicted += 1;
                        evicted = Some(v);
                    }
                    None => transient = true,
                }
            }
            if !transient {
                inner.total += 1;
            }
            let entry = inner
                .entries
                .get_mut(path_bytes(key))
                .expect("entry exists");
            entry.leased += 1;
            (generation, transient, evicted)
        };
        drop_all(doomed);
        match build() {
            Ok(state) => {
                let mut inner = self.lock();
                if let Some(entry) = inner.entries.get_mut(path_bytes(key)) {
                    if entry.generation == generation && entry.files.is_empty() {
                        entry.files = state
                            .files()
                            .iter()
                            .map(|p| (p.clone(), FileStamp::read(p).ok()))
                            .collect();
                    }
                }
                Ok(Lease {
                    key: key.clone(),
                    state: Some(state),
                    generation,
                    created: now,
                    transient,
                    memory: 0,
                    fresh: true,
                    evicted,
                })
            }
            Err(e) => {
                let mut inner = self.lock();
                if !transient {
                    inner.total -= 1;
                }
                if let Some(entry) = inner.entries.get_mut(path_bytes(key)) {
                    entry.leased -= 1;
                }
                Err(e)
            }
        }
    }

    /// Takes a lease back. The state is kept idle when `retire` is `Keep`, its script has
    /// not changed since it was built, and it is younger than `max_age` and has served fewer
    /// than `max_requests` requests (zero: no bound). When the states then hold more memory
    /// than the pool's budget, idle states of the least popular scripts are dropped until
    /// they fit; their scripts are returned.
    pub fn checkin(
        &self,
        mut lease: Lease<S>,
        retire: Retire,
        max_requests: u64,
        max_age: Duration,
    ) -> Vec<ScriptKey> {
        let state = lease
            .state
            .take()
            .expect("a lease holds its state until checkin");
        let worn = (max_requests > 0 && state.requests() >= max_requests)
            || (!max_age.is_zero() && lease.created.elapsed() >= max_age);
        let memory = state.memory();
        // The returned state while it is not kept; dropped, like `doomed`, after the lock.
        let mut returned = Some(state);
        let mut doomed = Vec::new();
        let mut evicted = Vec::new();
        {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let keep = retire == Retire::Keep && !worn && !lease.transient;
            inner.memory -= lease.memory;
            match inner.entries.get_mut(path_bytes(&lease.key)) {
                Some(entry) => {
                    entry.leased -= 1;
                    if keep && entry.generation == lease.generation {
                        if let Some(state) = returned.take() {
                            entry.idle.push(Idle {
                                state,
                                created: lease.created,
                                memory,
                            });
                            inner.memory += memory;
                        }
                    } else if !lease.transient {
                        inner.total -= 1;
                    }
                }
                None if !lease.transient => inner.total -= 1,
                None => {}
            }
            // The clock is read only when memory is over the cap (nearly never).
            let mut now = None;
            while inner.memory > self.memory_cap {
                let now = *now.get_or_insert_with(Instant::now);
                let Some(victim) = inner
                    .entries
                    .iter()
                    .filter(|(_, e)| !e.idle.is_empty())
                    .map(|(k, e)| (k, e.popularity(now, self.half_life)))
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|(k, _)| k.0.clone())
                else {
                    break;
                };
                let e = inner
                    .entries
                    .get_mut(path_bytes(&victim))
                    .expect("victim exists");
                let idle = e.idle.remove(0);
                inner.memory -= idle.memory;
                inner.total -= 1;
                inner.evicted += 1;
                doomed.push(idle.state);
                evicted.push(victim);
            }
        }
        drop(returned);
        drop_all(doomed);
        evicted
    }

    /// Retires every state of `key` (its file was deleted or its policy changed).
    pub fn invalidate(&self, key: &Path) {
        let doomed = {
            let mut inner = self.lock();
            let mut doomed = Vec::new();
            if let Some(entry) = inner.entries.get_mut(path_bytes(key)) {
                let (count, memory) = entry.retire(&mut doomed);
                inner.total -= count;
                inner.memory -= memory;
            }
            doomed
        };
        drop_all(doomed);
    }

    /// Checks the files of every script with states; retires the states of scripts whose
    /// file or modules changed or vanished, and forgets scripts with no states, no request
    /// in flight and little popularity left. Returns the scripts retired.
    pub fn sweep(&self) -> Vec<ScriptKey> {
        let now = Instant::now();
        let checks: Vec<(ScriptKey, u64, Vec<WatchedFile>)> = {
            let inner = self.lock();
            inner
                .entries
                .iter()
                .filter(|(_, e)| !e.files.is_empty())
                .map(|(k, e)| (k.0.clone(), e.generation, e.files.clone()))
                .collect()
        };
        let stale: Vec<(ScriptKey, u64)> = checks
            .into_iter()
            .filter(|(_, _, files)| {
                files
                    .iter()
                    .any(|(p, stamp)| FileStamp::read(p).ok() != *stamp)
            })
            .map(|(k, g, _)| (k, g))
            .collect();
        let mut retired = Vec::new();
        let mut doomed = Vec::new();
        {
            let mut guard = self.lock();
            let inner = &mut *guard;
            for (key, generation) in stale {
                if let Some(entry) = inner.entries.get_mut(path_bytes(&key)) {
                    if entry.generation == generation {
                        let (count, memory) = entry.retire(&mut doomed);
                        inner.total -= count;
                        inner.memory -= memory;
                        retired.push(key);
                    }
                }
            }
            let half_life = self.half_life;
            inner.entries.retain(|_, e| {
                // Only the entry holds its semaphore: no request is between admission and
                // checkin, so forgetting it cannot hand a second semaphore to the script.
                let forgotten = e.idle.is_empty()
                    && e.leased == 0
                    && Arc::strong_count(&e.admission) == 1
                    && e.popularity(now, half_life) < 0.01;
                !forgotten
            });
        }
        drop_all(doomed);
        retired
    }

    /// Current counts.
    pub fn stats(&self) -> PoolStats {
        let inner = self.lock();
        PoolStats {
            states: inner.total,
            idle: inner.entries.values().map(|e| e.idle.len()).sum(),
            scripts: inner.entries.len(),
            evicted: inner.evicted,
            memory: inner.memory,
        }
    }

    /// The `top` scripts holding the most states (idle or leased), most first (ties by
    /// path), with their counts; scripts with none are left out. Copies the counts under
    /// the lock and sorts outside it.
    pub fn states_per_script(&self, top: usize) -> Vec<(ScriptKey, usize)> {
        let mut counts: Vec<(ScriptKey, usize)> = {
            let inner = self.lock();
            inner
                .entries
                .iter()
                .map(|(k, e)| (k.0.clone(), e.idle.len() + e.leased))
                .filter(|(_, n)| *n > 0)
                .collect()
        };
        counts.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        counts.truncate(top);
        counts
    }

    /// Idle states of one script.
    pub fn idle_states(&self, key: &Path) -> usize {
        self.lock()
            .entries
            .get(path_bytes(key))
            .map_or(0, |e| e.idle.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    static BUILT: AtomicU64 = AtomicU64::new(0);

    #[derive(Debug)]
    struct Fake {
        id: u64,
        files: Vec<PathBuf>,
        requests: u64,
        memory: usize,
    }
    impl Pooled for Fake {
        fn files(&self) -> &[PathBuf] {
            &self.files
        }
        fn requests(&self) -> u64 {
            self.requests
        }
        fn memory(&self) -> usize {
            self.memory
        }
    }

    fn fake(files: Vec<PathBuf>) -> Result<Fake, ()> {
        Ok(Fake {
            id: BUILT.fetch_add(1, Ordering::Relaxed),
            files,
            requests: 0,
            memory: 1000,
        })
    }

    fn key(p: &str) -> ScriptKey {
        Arc::from(Path::new(p))
    }

    fn stamp(n: u64) -> FileStamp {
        FileStamp {
            mtime_ns: 0,
            size: n,
            inode: 1,
            device: 1,
        }
    }

    #[test]
    fn idle_state_is_reused() {
        let pool = StatePool::new(10, 0, Duration::from_secs(60));
        let k = key("/a.lua");
        let mut l = pool.checkout(&k, stamp(1), || fake(vec![])).unwrap();
        assert!(l.fresh);
        let id = l.state().id;
        let _ = pool.checkin(l, Retire::Keep, 0, Duration::ZERO);
        let mut l = pool.checkout(&k, stamp(1), || fake(vec![])).unwrap();
        assert!(!l.fresh);
        assert_eq!(l.state().id, id);
        let _ = pool.checkin(l, Retire::Discard, 0, Duration::ZERO);
        assert_eq!(pool.stats().states, 0);
    }

    #[test]
    fn changed_policy_generation_retires_states() {
        let pool = StatePool::new(10, 0, Duration::from_secs(60));
        let k = key("/a.lua");
        let v = |policy| Version {
            file: stamp(1),
            policy,
        };
        let l = pool.checkout(&k, v(1), || fake(vec![])).unwrap();
        let id = l.state.as_ref().unwrap().id;
        let _ = pool.checkin(l, Retire::Keep, 0, Duration::ZERO);
        let mut l = pool.checkout(&k, v(1), || fake(vec![])).unwrap();
        assert_eq!(l.state().id, id, "same policy: the warm state");
        let _ = pool.checkin(l, Retire::Keep, 0, Duration::ZERO);
        let mut l = pool.checkout(&k, v(2), || fake(vec![])).unwrap();
        assert!(l.fresh, "a new policy generation gets a new state");
        assert_ne!(l.state().id, id);
        let _ = pool.checkin(l, Retire::Keep, 0, Duration::ZERO);
        assert_eq!(pool.stats().states, 1, "the old state was retired");
    }

    #[test]
    fn changed_stamp_retires_states() {
        let pool = StatePool::new(10, 0, Duration::from_secs(60));
        let k = key("/a.lua");
        let l = pool.checkout(&k, stamp(1), || fake(vec![])).unwrap();
        let _ = pool.checkin(l, Retire::Keep, 0, Duration::ZERO);
        let l = pool.checkout(&k, stamp(2), || fake(vec![])).unwrap();
        assert!(l.fresh);
        let _ = pool.checkin(l, Retire::Keep, 0, Duration::ZERO);
        assert_eq!(pool.stats().states, 1);
    }

    #[test]
    fn state_leased_across_a_change_is_not_kept() {
        let pool = StatePool::new(10, 0, Duration::from_secs(60));
        let k = key("/a.lua");
        let old = pool.checkout(&k, stamp(1), || fake(vec![])).unwrap();
        let new = pool.checkout(&k, stamp(2), || fake(vec![])).unwrap();
        let _ = pool.checkin(old, Retire::Keep, 0, Duration::ZERO);
        let _ = pool.checkin(new, Retire::Keep, 0, Duration::ZERO);
        assert_eq!(pool.idle_states(&k), 1);
        assert_eq!(pool.stats().states, 1);
    }

    #[test]
    fn eviction_takes_the_least_popular_idle_state() {
        let pool = StatePool::new(2, 0, Duration::from_secs(3600));
        let (hot, cold, third) = (key("/hot.lua"), key("/cold.lua"), key("/third.lua"));
        for _ in 0..5 {
            let l = pool.checkout(&hot, stamp(1), || fake(vec![])).unwrap();
            let _ = pool.checkin(l, Retire::Keep, 0, Duration::ZERO);
        }
        let l = pool.checkout(&cold, stamp(1), || fake(vec![])).unwrap();
        let _ = pool.checkin(l, Retire::Keep, 0, Duration::ZERO);
        // `cold` was used last, but `hot` is more popular: `cold` goes.
        let l = pool.checkout(&third, stamp(1), || fake(vec![])).unwrap();
        assert_eq!(l.evicted.as_deref(), Some(Path::new("/cold.lua")));
        let _ = pool.checkin(l, Retire::Keep, 0, Duration::ZERO);
        assert_eq!(pool.idle_states(&hot), 1);
        assert_eq!(pool.idle_states(&cold), 0);
        assert_eq!(pool.stats().states, 2);
    }

    #[test]
    fn states_per_script_counts_idle_and_leased_most_first() {
        let pool = StatePool::new(10, 0, Duration::from_secs(3600));
        let (a, b, c) = (key("/a.lua"), key("/b.lua"), key("/c.lua"));
        let la: Vec<_> = (0..3)
            .map(|_| pool.checkout(&a, stamp(1), || fake(vec![])).unwrap())
            .collect();
        let lb = pool.checkout(&b, stamp(1), || fake(vec![])).unwrap();
        let _ = pool.checkin(lb, Retire::Keep, 0, Duration::ZERO);
        let lc = pool.checkout(&c, stamp(1), || fake(vec![])).unwrap();
        let _ = pool.checkin(lc, Retire::Discard, 0, Duration::ZERO);
        assert_eq!(
            pool.states_per_script(10),
            vec![(a.clone(), 3), (b.clone(), 1)],
            "three leased, one idle, none"
        );
        assert_eq!(pool.states_per_script(1), vec![(a.clone(), 3)]);
        for l in la {
            let _ = pool.checkin(l, Retire::Keep, 0, Duration::ZERO);
        }
        assert_eq!(pool.states_per_script(10)[0], (a, 3));
    }

    #[test]
    fn popularity_ages() {
        let pool = StatePool::new(2, 0, Duration::from_millis(1));
        let (old, new, third) = (key("/old.lua"), key("/new.lua"), key("/third.lua"));
        for _ in 0..50 {
            let l = pool.checkout(&old, stamp(1), || fake(vec![])).unwrap();
            let _ = pool.checkin(l, Retire::Keep, 0, Duration::ZERO);
        }
        // Fifty half-lives later the old burst counts for nothing.
        std::thread::sleep(Duration::from_millis(50));
        let l = pool.checkout(&new, stamp(1), || fake(vec![])).unwrap();
        let _ = pool.checkin(l, Retire::Keep, 0, Duration::ZERO);
        let l = pool.checkout(&third, stamp(1), || fake(vec![])).unwrap();
        assert_eq!(l.evicted.as_deref(), Some(Path::new("/old.lua")));
        let _ = pool.checkin(l, Retire::Keep, 0, Duration::ZERO);
    }

    #[test]
    fn cap_reached_with_nothing_idle_gives_a_transient_state() {
        let pool = StatePool::new(1, 0, Duration::from_secs(60));
        let (a, b) = (key("/a.lua"), key("/b.lua"));
        let la = pool.checkout(&a, stamp(1), || fake(vec![])).unwrap();
        let lb = pool.checkout(&b, stamp(1), || fake(vec![])).unwrap();
        let _ = pool.checkin(lb, Retire::Keep, 0, Duration::ZERO);
        assert_eq!(pool.idle_states(&b), 0);
        let _ = pool.checkin(la, Retire::Keep, 0, Duration::ZERO);
        assert_eq!(pool.stats().states, 1);
    }

    #[test]
    fn worn_states_are_retired() {
        let pool = StatePool::new(4, 0, Duration::from_secs(60));
        let k = key("/a.lua");
        let mut l = pool.checkout(&k, stamp(1), || fake(vec![])).unwrap();
        l.state().requests = 3;
        let _ = pool.checkin(l, Retire::Keep, 3, Duration::ZERO);
        assert_eq!(pool.idle_states(&k), 0);
        assert_eq!(pool.stats().states, 0);
    }

    #[test]
    fn old_states_are_retired() {
        let pool = StatePool::new(4, 0, Duration::from_secs(60));
        let k = key("/a.lua");
        let l = pool.checkout(&k, stamp(1), || fake(vec![])).unwrap();
        let _ = pool.checkin(l, Retire::Keep, 0, Duration::from_secs(3600));
        assert_eq!(pool.idle_states(&k), 1, "young enough");
        let l = pool.checkout(&k, stamp(1), || fake(vec![])).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let _ = pool.checkin(l, Retire::Keep, 0, Duration::from_millis(10));
        assert_eq!(pool.idle_states(&k), 0, "older than state_max_age");
    }

    #[test]
    fn sweep_retires_states_of_changed_files() {
        let dir = std::env::temp_dir().join(format!("pool-sweep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let module = dir.join("m.lua");
        std::fs::write(&module, "return 1").unwrap();
        let pool = StatePool::new(4, 0, Duration::from_secs(60));
        let k = key("/a.lua");
        let m = module.clone();
        let l = pool.checkout(&k, stamp(1), move || fake(vec![m])).unwrap();
        let _ = pool.checkin(l, Retire::Keep, 0, Duration::ZERO);
        assert!(pool.sweep().is_empty());
        assert_eq!(pool.idle_states(&k), 1);
        std::fs::write(&module, "return 22").unwrap();
        assert_eq!(pool.sweep(), vec![k.clone()]);
        assert_eq!(pool.idle_states(&k), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_boxed_state_is_pooled_as_the_state() {
        let pool: StatePool<Box<Fake>> = StatePool::new(4, 0, Duration::from_secs(60));
        let k = key("/a.lua");
        let lease = pool
            .checkout(&k, stamp(1), || fake(vec![]).map(Box::new))
            .unwrap();
        let id = lease.state.as_ref().unwrap().id;
        pool.checkin(lease, Retire::Keep, 0, Duration::ZERO);
        assert_eq!(pool.stats().memory, 1000, "its memory is counted");
        let mut again = pool
            .checkout(&k, stamp(1), || fake(vec![]).map(Box::new))
            .unwrap();
        assert_eq!(again.state().id, id, "the idle one is lent again");
        again.state().requests = 5;
        pool.checkin(again, Retire::Keep, 5, Duration::ZERO);
        assert_eq!(pool.idle_states(&k), 0, "worn out by its request count");
    }

    #[test]
    fn sweep_keeps_an_admission_in_use() {
        let pool: StatePool<Fake> = StatePool::new(4, 0, Duration::from_secs(60));
        let k = key("/a.lua");
        let sem = pool.admission(&k, 1).permits;
        let _permit = sem.clone().try_acquire_owned().unwrap();
        pool.sweep();
        let again = pool.admission(&k, 1).permits;
        assert!(
            Arc::ptr_eq(&sem, &again),
            "a request holds it: it must survive the sweep"
        );
        assert!(again.try_acquire().is_err(), "the clone is taken");
        drop((sem, again, _permit));
        pool.sweep();
        assert_eq!(pool.stats().scripts, 0, "unused, it is forgotten");
    }

    #[test]
    fn a_slow_mark_lasts_its_window_and_stays_with_its_script() {
        let pool: StatePool<Fake> = StatePool::new(4, 0, Duration::from_secs(60));
        let (slow, other) = (key("/slow.lua"), key("/other.lua"));
        pool.mark_slow(&slow, Duration::from_secs(60));
        assert!(
            !pool.admission(&slow, 1).slow,
            "no entry yet: nothing to mark"
        );
        pool.mark_slow(&slow, Duration::from_secs(60));
        assert!(pool.admission(&slow, 1).slow);
        assert!(pool.admission(&slow, 1).slow, "asking does not clear it");
        assert!(!pool.admission(&other, 1).slow, "only the marked script");
        pool.mark_slow(&slow, Duration::ZERO);
        assert!(!pool.admission(&slow, 1).slow, "the window is over");
    }

    #[test]
    fn memory_budget_evicts_the_least_popular_idle_states() {
        // Room for 2,500 bytes: three states of 1,000 do not fit.
        let pool = StatePool::new(100, 2500, Duration::from_secs(3600));
        let (hot, warm, cold) = (key("/hot.lua"), key("/warm.lua"), key("/cold.lua"));
        for (k, n) in [(&hot, 5), (&warm, 3), (&cold, 1)] {
            for _ in 0..n {
                let l = pool.checkout(k, stamp(1), || fake(vec![])).unwrap();
                let evicted = pool.checkin(l, Retire::Keep, 0, Duration::ZERO);
                if k == &cold {
                    assert_eq!(evicted, vec![cold.clone()], "the coldest goes");
                } else {
                    assert!(evicted.is_empty());
                }
            }
        }
        assert_eq!(pool.stats().memory, 2000);
        assert_eq!(pool.idle_states(&hot), 1);
        assert_eq!(pool.idle_states(&warm), 1);
        assert_eq!(pool.idle_states(&cold), 0);
        // A state that grew is accounted at its new size.
        let mut l = pool.checkout(&hot, stamp(1), || fake(vec![])).unwrap();
        l.state().memory = 1600;
        let evicted = pool.checkin(l, Retire::Keep, 0, Duration::ZERO);
        assert_eq!(evicted, vec![warm.clone()]);
        assert_eq!(pool.stats().memory, 1600);
        assert_eq!(pool.stats().states, 1);
    }

    #[test]
    fn failed_build_releases_its_slot() {
        let pool: StatePool<Fake> = StatePool::new(1, 0, Duration::from_secs(60));
        let k = key("/a.lua");
        assert!(pool.checkout(&k, stamp(1), || Err::<Fake, ()>(())).is_err());
        assert_eq!(pool.stats().states, 0);
    }
}
