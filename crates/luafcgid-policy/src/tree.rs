//! [`PolicyTree`]: finds the `policy.toml` files above a script, folds them into the
//! script's effective policy, caches the result per directory, and reloads changed files.
//!
//! The chain for a script is: the operator's defaults, then each `policy.toml` from the
//! document root down to the script's directory (the root's own included), then that last
//! file's `[script."name.lua"]` table for the script's file name. On the way down, an
//! inherited value above a directory's ceiling is lowered to it, so a `[ceiling]` binds
//! every script below it whether or not the files below say anything.
//!
//! Warm resolution takes no lock: resolved directories live in an immutable published map
//! (`Arc<HashMap>`) that each thread keeps a handle to, refreshed when an atomic epoch says a
//! newer map was published. A hit is an epoch load, one hash lookup by directory (and one by
//! file name when that directory's file has per-script tables) and an `Arc` clone; it never
//! touches the file system. A miss takes the tree's mutex: directories resolved since the
//! last publication wait in a small side map there, the missing files of the chain are read,
//! and the side map is merged into a new published map by the next sweep (or sooner once it
//! holds a quarter as many directories as the published map). [`PolicyTree::sweep`]
//! re-stats every policy file path of every directory resolved so far, rereads changed
//! ones, and swaps in recomputed entries: a valid change applies and bumps the generation of
//! the directories whose effective policy changed; an invalid one leaves the last valid
//! version in force; a removed file stops applying.
//!
//! Not here: canonicalising script paths (the caller passes real paths, as the daemon has
//! them after resolving symlinks), deciding whether a file is a script, enforcing anything.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::ceiling::Ceiling;
use crate::field::{Field, Provenance, SetBy, Source};
use crate::file::PolicyFile;
use crate::operator::OperatorPolicy;
use crate::problem::Problem;
use crate::read::{self, Contents, Presence};
use crate::Policy;

/// The name of a policy file.
pub const POLICY_FILE: &str = "policy.toml";

/// [`PolicyTree::check`] looks at most this many directory levels below the directory it
/// is given.
pub const MAX_CHECK_DEPTH: usize = 32;

/// [`PolicyTree::check`] visits at most this many directories.
pub const MAX_CHECK_DIRS: usize = 100_000;

/// The effective policy of a directory (or of one script with a per-script table).
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    /// Every value concrete. `policy.tenant` is the tenant below (`None` for `""`);
    /// `policy.deny` is `denied`.
    pub policy: Policy,
    /// The tenant: the name given by the nearest `policy.toml` saying `tenant = "NAME"`;
    /// without one, the name of the first-level directory under the document root; for a
    /// script directly in the document root, `""` (the operator's own scripts).
    pub tenant: String,
    /// The tenant's directory (the document root for tenant `""`).
    pub tenant_root: PathBuf,
    /// The policy file that named the tenant, relative to the document root; `None` when
    /// the tenant follows from the directory.
    pub tenant_named_by: Option<PathBuf>,
    /// The document root the script is under.
    pub root: PathBuf,
    /// The policy files applied, relative to the document root, from the root down.
    pub files: Vec<PathBuf>,
    /// Who set each value.
    pub provenance: Provenance,
    /// The ceiling that bounds this directory's files (what they inherit).
    pub ceiling: Arc<Ceiling>,
    /// Some file on the path (or the script's table) says `deny = true`.
    pub denied: bool,
    /// Changes whenever the effective policy of this directory (or script) changes;
    /// unique across the tree. States built under another generation should be retired.
    pub generation: u64,
}

/// The outcome of resolving a script.
#[derive(Debug, Clone)]
pub enum Resolution {
    /// Serve under this policy.
    Allowed(Arc<Effective>),
    /// `deny = true` on the path: answer 403. The policy is there for logs and `explain`.
    Denied(Arc<Effective>),
    /// A policy file on the path has no valid version: answer 500 `policy_error`.
    Invalid(Arc<Problem>),
    /// The path is not below any document root (or is not a clean absolute path).
    Outside,
}

impl Resolution {
    /// The effective policy, allowed or denied.
    pub fn effective(&self) -> Option<&Arc<Effective>> {
        match self {
            Resolution::Allowed(e) | Resolution::Denied(e) => Some(e),
            _ => None,
        }
    }

    fn same(&self, other: &Resolution) -> bool {
        match (self, other) {
            (Resolution::Allowed(a), Resolution::Allowed(b))
            | (Resolution::Denied(a), Resolution::Denied(b)) => Arc::ptr_eq(a, b),
            (Resolution::Invalid(a), Resolution::Invalid(b)) => Arc::ptr_eq(a, b),
            (Resolution::Outside, Resolution::Outside) => true,
            _ => false,
        }
    }
}

/// What a sweep (or the resolutions since the last one) found, for the audit log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SweepReport {
    /// Files read for the first time, or that reappeared, and now in force.
    pub loaded: Vec<PathBuf>,
    /// Files whose new version is now in force.
    pub changed: Vec<PathBuf>,
    /// Files that disappeared and no longer apply.
    pub removed: Vec<PathBuf>,
    /// Problems of files that are not in force as they are on disk: either an older valid
    /// version still is, or their subtree answers `policy_error`. Each is reported once,
    /// when it appears.
    pub rejected: Vec<Problem>,
    /// Events of first loads not kept because more than [`MAX_PENDING_EVENTS`] happened
    /// between two sweeps (the files are in force or refused all the same).
    pub dropped: usize,
}

impl SweepReport {
    /// Nothing happened.
    pub fn is_empty(&self) -> bool {
        self.loaded.is_empty()
            && self.changed.is_empty()
            && self.removed.is_empty()
            && self.rejected.is_empty()
            && self.dropped == 0
    }

    fn len(&self) -> usize {
        self.loaded.len() + self.changed.len() + self.removed.len() + self.rejected.len()
    }

    fn append(&mut self, other: SweepReport) {
        self.loaded.extend(other.loaded);
        self.changed.extend(other.changed);
        self.removed.extend(other.removed);
        self.rejected.extend(other.rejected);
        self.dropped += other.dropped;
    }
}

/// The most events of first loads (by resolutions) kept for the next sweep to report;
/// beyond, they are counted in [`SweepReport::dropped`].
pub const MAX_PENDING_EVENTS: usize = 4096;

/// Resolved directories, by path.
type Map = foldhash::HashMap<OsString, Arc<DirEntry>>;

/// Distinguishes trees in threads' snapshot handles.
static NEXT_TREE: AtomicU64 = AtomicU64::new(0);

/// A thread's handle on a tree's published map.
struct Snapshot {
    tree: u64,
    /// Dead once the tree is dropped: the handle is then purged.
    alive: std::sync::Weak<()>,
    epoch: u64,
    map: Arc<Map>,
}

/// Trees a thread keeps a snapshot of, at most; the oldest handle goes first.
const SNAPSHOTS_PER_THREAD: usize = 4;

thread_local! {
    static SNAPSHOTS: RefCell<Vec<Snapshot>> = const { RefCell::new(Vec::new()) };
}

/// Resolves scripts to effective policies, per directory, with caching and reload.
///
/// Each thread that resolves keeps a handle on the latest published map of each of up to
/// four trees; a map (and the policies in it) is freed once no thread holds it, so an idle
/// thread may keep an old one alive until it next resolves (handles on dropped trees are
/// purged when the thread first resolves in another tree).
#[derive(Debug)]
pub struct PolicyTree {
    id: u64,
    alive: Arc<()>,
    roots: Vec<PathBuf>,
    operator: OperatorPolicy,
    start: Start,
    /// Bumped, with `published` locked, each time a new map is published.
    epoch: AtomicU64,
    published: Mutex<Arc<Map>>,
    state: Mutex<State>,
}

/// The top of every chain.
#[derive(Debug)]
struct Start {
    policy: Policy,
    provenance: Provenance,
    ceiling: Arc<Ceiling>,
}

/// The cached resolution of a directory, and of the scripts its file has tables for.
#[derive(Debug)]
struct DirEntry {
    dir: Resolution,
    scripts: foldhash::HashMap<OsString, Resolution>,
}

impl DirEntry {
    fn get(&self, name: &OsStr) -> Resolution {
        if !self.scripts.is_empty() {
            if let Some(r) = self.scripts.get(name) {
                return r.clone();
            }
        }
        self.dir.clone()
    }

    fn same(&self, other: &DirEntry) -> bool {
        self.dir.same(&other.dir)
            && self.scripts.len() == other.scripts.len()
            && self
                .scripts
                .iter()
                .all(|(k, v)| other.scripts.get(k).is_some_and(|o| o.same(v)))
    }
}

#[derive(Debug, Default)]
struct State {
    /// Directories resolved since the last publication.
    recent: Map,
    /// Every directory of every chain resolved so far; ancestors sort before descendants.
    slots: BTreeMap<PathBuf, Slot>,
    generation: u64,
    pending: SweepReport,
}

#[derive(Debug)]
struct Slot {
    root: usize,
    presence: Presence,
    on_disk: OnDisk,
    /// The last version accepted: valid and within its ceiling when it was.
    in_force: Option<Arc<PolicyFile>>,
    decision: Decision,
    ceiling_in: Arc<Ceiling>,
    ceiling_out: Arc<Ceiling>,
}

#[derive(Debug)]
enum OnDisk {
    Absent,
    Valid(Arc<PolicyFile>),
    Invalid(Vec<Problem>),
}

#[derive(Debug, Clone)]
enum Decision {
    NoFile,
    /// Apply `file`; `rejected` holds the problems of the version on disk when `file` is
    /// an older one.
    Use {
        file: Arc<PolicyFile>,
        rejected: Vec<Problem>,
    },
    /// No usable version: the subtree answers `policy_error`.
    Broken(Vec<Problem>),
}

impl Decision {
    fn problems(&self) -> &[Problem] {
        match self {
            Decision::NoFile => &[],
            Decision::Use { rejected, .. } => rejected,
            Decision::Broken(p) => p,
        }
    }

    fn file(&self) -> Option<&Arc<PolicyFile>> {
        match self {
            Decision::Use { file, .. } => Some(file),
            _ => None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The path of `dir` relative to `root` (`""` for the root itself).
fn relative(root: &Path, dir: &Path) -> PathBuf {
    dir.strip_prefix(root).unwrap_or(dir).to_path_buf()
}

/// Reads the policy file of `dir`.
fn load(root: &Path, dir: &Path) -> (Presence, OnDisk) {
    let path = dir.join(POLICY_FILE);
    let (presence, contents) = read::read(&path);
    let on_disk = match contents {
        Contents::Absent => OnDisk::Absent,
        Contents::Present(Err(why)) => OnDisk::Invalid(vec![Problem::whole(&path, why)]),
        Contents::Present(Ok(bytes)) => match PolicyFile::from_bytes(&path, &bytes) {
            Ok(mut f) => {
                f.label_ceiling(&SetBy::File(relative(root, &path)));
                OnDisk::Valid(Arc::new(f))
            }
            Err(problems) => OnDisk::Invalid(problems),
        },
    };
    (presence, on_disk)
}

/// Chooses the version of `slot`'s file that applies below `ceiling_in`.
fn decide(slot: &mut Slot, ceiling_in: Arc<Ceiling>) {
    let fallback = |in_force: &Option<Arc<PolicyFile>>, problems: Vec<Problem>| match in_force {
        Some(g) if g.check(&ceiling_in).is_empty() => Decision::Use {
            file: g.clone(),
            rejected: problems,
        },
        _ => Decision::Broken(problems),
    };
    let decision = match &slot.on_disk {
        OnDisk::Absent => {
            slot.in_force = None;
            Decision::NoFile
        }
        OnDisk::Valid(f) => {
            let violations = f.check(&ceiling_in);
            if violations.is_empty() {
                slot.in_force = Some(f.clone());
                Decision::Use {
                    file: f.clone(),
                    rejected: Vec::new(),
                }
            } else {
                fallback(&slot.in_force, violations)
            }
        }
        OnDisk::Invalid(problems) => fallback(&slot.in_force, problems.clone()),
    };
    slot.ceiling_out = match decision.file().and_then(|f| f.ceiling()) {
        Some(own) => Arc::new(ceiling_in.narrowed(own)),
        None => ceiling_in.clone(),
    };
    slot.ceiling_in = ceiling_in;
    slot.decision = decision;
}

/// Adds to `report` what changed in `slot` (file `path`) from `before` (`None`: a slot just
/// created). `reread`: the file was read again, so its problems are news even if an
/// earlier version had the same ones.
fn note(
    report: &mut SweepReport,
    path: &Path,
    before: Option<(&Presence, &Decision)>,
    reread: bool,
    slot: &Slot,
) {
    let was_present = before.is_some_and(|(p, _)| *p != Presence::Absent);
    if was_present && slot.presence == Presence::Absent {
        report.removed.push(path.to_path_buf());
    }
    let on_disk_in_force = match (&slot.on_disk, slot.decision.file()) {
        (OnDisk::Valid(d), Some(f)) => Arc::ptr_eq(d, f),
        _ => false,
    };
    let before_file = before.and_then(|(_, d)| d.file());
    let newly = on_disk_in_force
        && !before_file.is_some_and(|b| slot.decision.file().is_some_and(|f| Arc::ptr_eq(b, f)));
    if newly {
        if before_file.is_some() {
            report.changed.push(path.to_path_buf());
        } else {
            report.loaded.push(path.to_path_buf());
        }
    }
    let problems = slot.decision.problems();
    if !problems.is_empty() && (reread || before.is_none_or(|(_, d)| d.problems() != problems)) {
        report.rejected.extend(problems.iter().cloned());
    }
}

/// An effective policy being built, before it gets a generation.
enum Draft {
    Policy(Box<Effective>),
    Invalid(Problem),
}

impl PolicyTree {
    /// A tree over `roots` (document roots; canonicalised here when possible, as scripts
    /// are resolved by their real paths), under the operator's policy. Defaults above the
    /// operator's ceiling are lowered to it. Reads no policy file yet.
    pub fn new(operator: OperatorPolicy, roots: Vec<PathBuf>) -> PolicyTree {
        let roots = roots
            .into_iter()
            .map(|r| std::fs::canonicalize(&r).unwrap_or(r))
            .collect();
        let mut provenance = Provenance::all(Source::BuiltIn);
        for f in Field::ALL {
            provenance.set(f, operator.source(f));
        }
        for (name, _) in &operator.defaults.vars {
            provenance.set_var(name, Source::Config);
        }
        let mut policy = operator.defaults.clone();
        for f in operator.ceiling.clamp(&mut policy) {
            provenance.set(f, Source::Ceiling(SetBy::Config));
        }
        let start = Start {
            policy,
            provenance,
            ceiling: Arc::new(operator.ceiling.clone()),
        };
        PolicyTree {
            id: NEXT_TREE.fetch_add(1, Ordering::Relaxed),
            alive: Arc::new(()),
            roots,
            operator,
            start,
            epoch: AtomicU64::new(0),
            published: Mutex::new(Arc::new(Map::default())),
            state: Mutex::new(State::default()),
        }
    }

    /// The document roots, canonical.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// The operator's policy the tree was built with.
    pub fn operator(&self) -> &OperatorPolicy {
        &self.operator
    }

    /// The effective policy of `script`, given by its real (canonical, absolute) path.
    /// Warm: a hash lookup and an `Arc` clone, no file system access.
    pub fn resolve(&self, script: &Path) -> Resolution {
        let Some((dir, name)) = split_script(script) else {
            return Resolution::Outside;
        };
        if let Some(hit) = self.lookup(dir, name) {
            return hit;
        }
        self.resolve_cold(dir, name)
    }

    /// Looks `dir` up in this thread's snapshot of the published map, first refreshing
    /// the snapshot if a newer map was published.
    fn lookup(&self, dir: &Path, name: &OsStr) -> Option<Resolution> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let found = SNAPSHOTS.try_with(|snapshots| {
            let Ok(mut snapshots) = snapshots.try_borrow_mut() else {
                return self.lookup_published(dir, name);
            };
            let i = match snapshots.iter().position(|s| s.tree == self.id) {
                Some(i) => i,
                None => {
                    snapshots.retain(|s| s.alive.strong_count() > 0);
                    if snapshots.len() >= SNAPSHOTS_PER_THREAD {
                        snapshots.remove(0);
                    }
                    snapshots.push(self.snapshot());
                    snapshots.len() - 1
                }
            };
            if snapshots[i].epoch != epoch {
                snapshots[i] = self.snapshot();
            }
            snapshots[i].map.get(dir.as_os_str()).map(|e| e.get(name))
        });
        // Without thread-local storage (a thread being torn down), ask the published map.
        found.unwrap_or_else(|_| self.lookup_published(dir, name))
    }

    fn lookup_published(&self, dir: &Path, name: &OsStr) -> Option<Resolution> {
        let map = lock(&self.published).clone();
        map.get(dir.as_os_str()).map(|e| e.get(name))
    }

    fn snapshot(&self) -> Snapshot {
        let map = lock(&self.published);
        Snapshot {
            tree: self.id,
            alive: Arc::downgrade(&self.alive),
            epoch: self.epoch.load(Ordering::Acquire),
            map: map.clone(),
        }
    }

    /// Makes `map` the published one.
    fn publish(&self, map: Map) {
        let mut published = lock(&self.published);
        *published = Arc::new(map);
        self.epoch.fetch_add(1, Ordering::Release);
    }

    /// Publishes the published map with the recently resolved directories added.
    fn merge_recent(&self, state: &mut State) {
        if state.recent.is_empty() {
            return;
        }
        let mut map = (**lock(&self.published)).clone();
        map.extend(state.recent.drain());
        self.publish(map);
    }

    /// The document root `dir` is below (the longest, if roots nest), with the directories
    /// from that root down to `dir`.
    fn chain(&self, dir: &Path) -> Option<(usize, Vec<PathBuf>)> {
        let (root, root_path) = self
            .roots
            .iter()
            .enumerate()
            .filter(|(_, r)| dir.starts_with(r))
            .max_by_key(|(_, r)| r.as_os_str().len())?;
        let rest = dir.strip_prefix(root_path).ok()?;
        let mut chain = vec![root_path.clone()];
        let mut at = root_path.clone();
        for c in rest.components() {
            let Component::Normal(part) = c else {
                return None;
            };
            at.push(part);
            chain.push(at.clone());
        }
        Some((root, chain))
    }

    fn resolve_cold(&self, dir: &Path, name: &OsStr) -> Resolution {
        let mut state = lock(&self.state);
        if let Some(entry) = state.recent.get(dir.as_os_str()) {
            return entry.get(name);
        }
        if let Some(hit) = self.lookup_published(dir, name) {
            return hit;
        }
        let Some((root, chain)) = self.chain(dir) else {
            return Resolution::Outside;
        };
        let mut events = SweepReport::default();
        for (i, d) in chain.iter().enumerate() {
            if state.slots.contains_key(d) {
                continue;
            }
            let ceiling_in = match i {
                0 => self.start.ceiling.clone(),
                _ => match state.slots.get(&chain[i - 1]) {
                    Some(parent) => parent.ceiling_out.clone(),
                    None => self.start.ceiling.clone(),
                },
            };
            let (presence, on_disk) = load(&self.roots[root], d);
            let mut slot = Slot {
                root,
                presence,
                on_disk,
                in_force: None,
                decision: Decision::NoFile,
                ceiling_in: ceiling_in.clone(),
                ceiling_out: ceiling_in.clone(),
            };
            decide(&mut slot, ceiling_in);
            note(&mut events, &d.join(POLICY_FILE), None, true, &slot);
            state.slots.insert(d.clone(), slot);
        }
        Self::keep(&mut state, events);
        let entry = self.entry(&mut state, root, dir, None);
        let resolution = entry.get(name);
        state
            .recent
            .insert(dir.as_os_str().to_owned(), Arc::new(entry));
        // Publish once the side map is large enough that copying the published map is
        // paid for: each directory is copied O(1) times on average.
        let published = lock(&self.published).len();
        if state.recent.len() >= (published / 4).max(64) {
            self.merge_recent(&mut state);
        }
        resolution
    }

    /// Keeps events of resolutions for the next sweep, up to [`MAX_PENDING_EVENTS`].
    fn keep(state: &mut State, events: SweepReport) {
        if state.pending.len() + events.len() <= MAX_PENDING_EVENTS {
            state.pending.append(events);
        } else {
            state.pending.dropped += events.len();
        }
    }

    /// Looks again at every policy file of every directory resolved so far: rereads the
    /// changed ones, applies valid changes (bumping the generation of each directory whose
    /// effective policy changes), keeps the last valid version where a new one is invalid,
    /// stops applying removed files, and forgets directories that no longer exist. Returns
    /// what happened, including first loads by resolutions since the last sweep.
    ///
    /// File system access happens without the tree's locks, and resolution of directories
    /// already resolved takes none, so it goes on meanwhile; the new entries are published
    /// as a new map.
    pub fn sweep(&self) -> SweepReport {
        let (snapshot, mut report) = {
            let mut state = lock(&self.state);
            let snapshot: Vec<(PathBuf, usize, Presence)> = state
                .slots
                .iter()
                .map(|(d, s)| (d.clone(), s.root, s.presence))
                .collect();
            (snapshot, std::mem::take(&mut state.pending))
        };
        let mut fresh = Vec::new();
        let mut gone = Vec::new();
        for (dir, root, seen) in snapshot {
            let now = read::presence(&dir.join(POLICY_FILE));
            if now != seen {
                let (presence, on_disk) = load(&self.roots[root], &dir);
                fresh.push((dir, seen, presence, on_disk));
            } else if now == Presence::Absent && read::presence(&dir) == Presence::Absent {
                gone.push(dir);
            }
        }
        let mut state = lock(&self.state);
        if fresh.is_empty() && gone.is_empty() {
            self.merge_recent(&mut state);
            return report;
        }
        let mut before: HashMap<PathBuf, (Presence, Decision)> = HashMap::new();
        for (dir, seen, presence, on_disk) in fresh {
            if let Some(slot) = state.slots.get_mut(&dir) {
                if slot.presence == seen {
                    before.insert(dir, (slot.presence, slot.decision.clone()));
                    slot.presence = presence;
                    slot.on_disk = on_disk;
                }
            }
        }
        for dir in &gone {
            let pruned: Vec<PathBuf> = state
                .slots
                .range(dir.clone()..)
                .take_while(|(d, _)| d.starts_with(dir))
                .map(|(d, _)| d.clone())
                .collect();
            for d in pruned {
                let Some(slot) = state.slots.remove(&d) else {
                    continue;
                };
                let was = before.remove(&d).map_or(slot.presence, |(p, _)| p);
                if was != Presence::Absent {
                    report.removed.push(d.join(POLICY_FILE));
                }
            }
        }
        // Decide again from the top: a parent's new ceiling may admit or refuse a child.
        let dirs: Vec<PathBuf> = state.slots.keys().cloned().collect();
        for dir in dirs {
            let Some(slot) = state.slots.get(&dir) else {
                continue;
            };
            let is_root = self.roots.get(slot.root).is_some_and(|r| *r == dir);
            let parent = dir.parent().and_then(|p| state.slots.get(p));
            let ceiling_in = match parent {
                Some(p) if !is_root => p.ceiling_out.clone(),
                _ => self.start.ceiling.clone(),
            };
            let Some(slot) = state.slots.get_mut(&dir) else {
                continue;
            };
            let reread = before.remove(&dir);
            let old = match &reread {
                Some(old) => old.clone(),
                None => (slot.presence, slot.decision.clone()),
            };
            decide(slot, ceiling_in);
            let path = dir.join(POLICY_FILE);
            note(
                &mut report,
                &path,
                Some((&old.0, &old.1)),
                reread.is_some(),
                slot,
            );
        }
        let published = lock(&self.published).clone();
        let recent = std::mem::take(&mut state.recent);
        let old_cache: Vec<(OsString, Arc<DirEntry>)> = published
            .iter()
            .chain(recent.iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        drop(published);
        let mut cache = Map::with_capacity_and_hasher(old_cache.len(), Default::default());
        for (key, old) in old_cache {
            let dir = PathBuf::from(&key);
            let Some(root) = state.slots.get(&dir).map(|s| s.root) else {
                continue;
            };
            let entry = self.entry(&mut state, root, &dir, Some(&old));
            let entry = if entry.same(&old) {
                old
            } else {
                Arc::new(entry)
            };
            cache.insert(key, entry);
        }
        self.publish(cache);
        report
    }

    /// Builds the cache entry of `dir` from the slots, reusing `old`'s values (and so
    /// their generations) where nothing changed.
    fn entry(
        &self,
        state: &mut State,
        root: usize,
        dir: &Path,
        old: Option<&DirEntry>,
    ) -> DirEntry {
        let (draft, scripts) = self.compose(state, root, dir);
        let mut seal = |draft: Draft, old: Option<&Resolution>| -> Resolution {
            match draft {
                Draft::Invalid(p) => match old {
                    Some(Resolution::Invalid(o)) if **o == p => Resolution::Invalid(o.clone()),
                    _ => Resolution::Invalid(Arc::new(p)),
                },
                Draft::Policy(mut e) => {
                    if let Some(o) = old.and_then(Resolution::effective) {
                        e.generation = o.generation;
                        if **o == *e {
                            return old.cloned().unwrap_or(Resolution::Outside);
                        }
                    }
                    state.generation += 1;
                    e.generation = state.generation;
                    let denied = e.denied;
                    let e = Arc::new(*e);
                    if denied {
                        Resolution::Denied(e)
                    } else {
                        Resolution::Allowed(e)
                    }
                }
            }
        };
        let dir_resolution = seal(draft, old.map(|o| &o.dir));
        let scripts = scripts
            .into_iter()
            .map(|(name, draft)| {
                let old = old.and_then(|o| o.scripts.get(&name));
                let r = seal(draft, old);
                (name, r)
            })
            .collect();
        DirEntry {
            dir: dir_resolution,
            scripts,
        }
    }

    /// Folds the chain of `dir` into its effective policy, and each per-script table of
    /// its file into that script's.
    fn compose(&self, state: &State, root: usize, dir: &Path) -> (Draft, Vec<(OsString, Draft)>) {
        let root_path = &self.roots[root];
        let Some((_, chain)) = self.chain(dir) else {
            return (
                Draft::Invalid(Problem::whole(dir, "is not below a document root")),
                Vec::new(),
            );
        };
        let mut policy = self.start.policy.clone();
        let mut provenance = self.start.provenance.clone();
        let mut files = Vec::new();
        let mut tenant: Option<(String, PathBuf, PathBuf)> = None;
        let mut denied = self.start.policy.deny;
        let mut deny_source = self.start.provenance.field(Field::Deny).clone();
        let mut ceiling = self.start.ceiling.clone();
        let mut last: Option<(Arc<PolicyFile>, PathBuf)> = None;
        for d in &chain {
            let Some(slot) = state.slots.get(d) else {
                return (
                    Draft::Invalid(Problem::whole(d, "was not loaded")),
                    Vec::new(),
                );
            };
            ceiling = slot.ceiling_in.clone();
            for f in ceiling.clamp(&mut policy) {
                let by = ceiling.set_by(f).cloned().unwrap_or(SetBy::Config);
                provenance.set(f, Source::Ceiling(by));
            }
            last = None;
            match &slot.decision {
                Decision::NoFile => {}
                Decision::Broken(problems) if !denied => {
                    let p = problems
                        .first()
                        .cloned()
                        .unwrap_or_else(|| Problem::whole(&d.join(POLICY_FILE), "is invalid"));
                    return (Draft::Invalid(p), Vec::new());
                }
                // A subtree closed above stays closed, broken or not.
                Decision::Broken(_) => break,
                Decision::Use { file, .. } => {
                    let rel = relative(root_path, &d.join(POLICY_FILE));
                    if policy.apply(file.fields()).is_err() {
                        let p = Problem::whole(&d.join(POLICY_FILE), "has an invalid value");
                        return (Draft::Invalid(p), Vec::new());
                    }
                    provenance.record(file.fields(), &Source::File(rel.clone()));
                    files.push(rel.clone());
                    if !denied && file.fields().deny == Some(true) {
                        denied = true;
                        deny_source = Source::File(rel.clone());
                    }
                    if let Some(name) = &file.fields().tenant {
                        tenant = Some((name.clone(), d.clone(), rel.clone()));
                    }
                    last = Some((file.clone(), rel));
                }
            }
        }
        let (tenant, tenant_root, tenant_named_by) = match tenant {
            Some((name, dir, by)) => (name, dir, Some(by)),
            None => match dir
                .strip_prefix(root_path)
                .ok()
                .and_then(|r| r.components().next())
            {
                Some(first) => {
                    let name = first.as_os_str().to_string_lossy().into_owned();
                    (name, root_path.join(first), None)
                }
                None => (String::new(), root_path.clone(), None),
            },
        };
        policy.tenant = (!tenant.is_empty()).then(|| tenant.clone());
        policy.deny = denied;
        if denied {
            provenance.set(Field::Deny, deny_source);
        }
        let base = Effective {
            policy,
            tenant,
            tenant_root,
            tenant_named_by,
            root: root_path.clone(),
            files,
            provenance,
            ceiling,
            denied,
            generation: 0,
        };
        let mut scripts = Vec::new();
        if let Some((file, rel)) = &last {
            for (name, fields) in file.fields().script.iter().flatten() {
                let mut e = base.clone();
                if e.policy.apply(fields).is_err() {
                    let p = Problem::whole(file.path(), "has an invalid [script] table");
                    scripts.push((OsString::from(name), Draft::Invalid(p)));
                    continue;
                }
                let source = Source::Script {
                    file: rel.clone(),
                    script: name.clone(),
                };
                e.provenance.record(fields, &source);
                e.policy.tenant = base.policy.tenant.clone();
                if base.denied {
                    e.provenance
                        .set(Field::Deny, base.provenance.field(Field::Deny).clone());
                } else if fields.deny == Some(true) {
                    e.denied = true;
                }
                e.policy.deny = e.denied;
                scripts.push((OsString::from(name), Draft::Policy(Box::new(e))));
            }
        }
        (Draft::Policy(Box::new(base)), scripts)
    }

    /// Every problem of every `policy.toml` at or below `dir`, and of those above it up to
    /// its document root (which bind it), read afresh from disk: syntax, keys, values, and
    /// ceilings against what the ancestors grant. The walk does not follow symbolic links
    /// to directories, goes at most [`MAX_CHECK_DEPTH`] levels down and visits at most
    /// [`MAX_CHECK_DIRS`] directories (saying so when it stops). A directory outside every
    /// document root is checked as if it were one. Caches nothing.
    pub fn check(&self, dir: &Path) -> Vec<Problem> {
        let dir = match std::fs::canonicalize(dir) {
            Ok(d) => d,
            Err(e) => return vec![Problem::whole(dir, format!("cannot be read: {}", e.kind()))],
        };
        let (root, chain) = match self.chain(&dir) {
            Some((root, chain)) => (self.roots[root].clone(), chain),
            None => (dir.clone(), vec![dir.clone()]),
        };
        let mut problems = Vec::new();
        let mut ceiling = self.start.ceiling.clone();
        for above in &chain[..chain.len() - 1] {
            ceiling = self.check_file(&root, above, ceiling, &mut problems);
        }
        let mut visited = 0;
        self.check_walk(&root, &dir, ceiling, 0, &mut visited, &mut problems);
        problems
    }

    /// Checks the policy file of `dir` against `ceiling`; returns the ceiling below.
    fn check_file(
        &self,
        root: &Path,
        dir: &Path,
        ceiling: Arc<Ceiling>,
        problems: &mut Vec<Problem>,
    ) -> Arc<Ceiling> {
        match load(root, dir).1 {
            OnDisk::Absent => ceiling,
            OnDisk::Invalid(p) => {
                problems.extend(p);
                ceiling
            }
            OnDisk::Valid(f) => {
                problems.extend(f.check(&ceiling));
                match f.ceiling() {
                    Some(own) => Arc::new(ceiling.narrowed(own)),
                    None => ceiling,
                }
            }
        }
    }

    fn check_walk(
        &self,
        root: &Path,
        dir: &Path,
        ceiling: Arc<Ceiling>,
        depth: usize,
        visited: &mut usize,
        problems: &mut Vec<Problem>,
    ) {
        *visited += 1;
        if *visited > MAX_CHECK_DIRS {
            if *visited == MAX_CHECK_DIRS + 1 {
                problems.push(Problem::whole(
                    dir,
                    format!("not checked: the check stops after {MAX_CHECK_DIRS} directories"),
                ));
            }
            return;
        }
        let below = self.check_file(root, dir, ceiling, problems);
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                problems.push(Problem::whole(
                    dir,
                    format!("cannot be listed: {}", e.kind()),
                ));
                return;
            }
        };
        let mut subdirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        if subdirs.is_empty() {
            return;
        }
        if depth >= MAX_CHECK_DEPTH {
            problems.push(Problem::whole(
                dir,
                format!("subdirectories not checked: deeper than {MAX_CHECK_DEPTH} levels"),
            ));
            return;
        }
        subdirs.sort();
        for sub in subdirs {
            self.check_walk(root, &sub, below.clone(), depth + 1, visited, problems);
        }
    }
}

/// A script's directory and file name, as [`Path::parent`] and [`Path::file_name`] give
/// them. A path whose last `/` is followed by a name and preceded by neither `/` nor `.`
/// (every canonical path) is split at that byte without parsing its components; any other
/// goes through `Path`.
fn split_script(script: &Path) -> Option<(&Path, &OsStr)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = script.as_os_str().as_bytes();
    if let Some(i) = bytes.iter().rposition(|&b| b == b'/') {
        let name = &bytes[i + 1..];
        let plain_name = !name.is_empty() && name != b"." && name != b"..";
        let plain_dir = i == 0 || !matches!(bytes[i - 1], b'/' | b'.');
        if plain_name && plain_dir {
            let dir = &bytes[..i.max(1)];
            return Some((Path::new(OsStr::from_bytes(dir)), OsStr::from_bytes(name)));
        }
    }
    Some((script.parent()?, script.file_name()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_split_as_path_splits_them() {
        for path in [
            "/srv/www/site/hello.lua",
            "/hello.lua",
            "/",
            "",
            "hello.lua",
            "site/hello.lua",
            "/srv/www/",
            "/srv/www/.",
            "/srv/www/..",
            "/srv//www//hello.lua",
            "/srv/www/./hello.lua",
            "/srv/www/../hello.lua",
            "/srv/www./hello.lua",
            "./hello.lua",
            "../hello.lua",
            "//hello.lua",
            "/srv/www/.hidden",
            "/srv/www/hello.lua/",
        ] {
            let p = Path::new(path);
            let slow = p.parent().zip(p.file_name());
            assert_eq!(split_script(p), slow, "{path}");
        }
    }
}
