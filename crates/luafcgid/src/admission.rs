//! Admission beyond one script's `clones`: how many Lua workers one tenant may hold at once,
//! and how many requests may wait, per script and in all.
//!
//! A request runs only with three permits: one of its tenant's [`TenantSlots`] (at most
//! `tenant_workers`, by default one less than `workers`, so a tenant flooding the daemon with
//! slow requests never holds every worker and the other tenants keep being served), one of
//! its script's clones (the pool's admission semaphore) and one of the `workers` Lua slots.
//! A request that cannot have them at once waits, bounded by [`WaitingRoom`]: at most
//! `queue_max` in all and a quarter of that for one script, so a flooded script cannot take
//! every place in the queue either. This module only counts; `dispatch` decides.

use foldhash::HashMap;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use luafcgid_pool::ScriptKey;
use tokio::sync::Semaphore;

/// The Lua workers each tenant may hold, one semaphore per tenant.
#[derive(Debug)]
pub struct TenantSlots {
    per_tenant: usize,
    tenants: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
    /// Tells these slots apart in the threads' [`LAST_TENANT`]s.
    id: u64,
}

/// A thread's last tenant: whose slots, its name (the map's key) and its semaphore.
type LastTenant = (u64, Arc<str>, Arc<Semaphore>);

thread_local! {
    static LAST_TENANT: RefCell<Option<LastTenant>> = const { RefCell::new(None) };
}

/// Tenant slots made so far, for their ids.
static TENANT_SLOTS: AtomicU64 = AtomicU64::new(0);

impl TenantSlots {
    pub fn new(per_tenant: usize) -> TenantSlots {
        TenantSlots {
            per_tenant: per_tenant.max(1),
            tenants: Mutex::new(HashMap::default()),
            id: TENANT_SLOTS.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Semaphore>>> {
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The semaphore of `tenant` (`""`: the operator's scripts in a document root), from the
    /// map itself (requests take it through [`TenantSlots::of_cached`]).
    #[cfg(test)]
    fn of(&self, tenant: &str) -> Arc<Semaphore> {
        self.entry(tenant).1
    }

    /// The map's key and semaphore of `tenant`, added if new.
    fn entry(&self, tenant: &str) -> (Arc<str>, Arc<Semaphore>) {
        let mut tenants = self.lock();
        if let Some((name, s)) = tenants.get_key_value(tenant) {
            return (name.clone(), s.clone());
        }
        let name: Arc<str> = Arc::from(tenant);
        let s = Arc::new(Semaphore::new(self.per_tenant));
        tenants.insert(name.clone(), s.clone());
        (name, s)
    }

    /// The semaphore of `tenant` (`""`: the operator's scripts in a document root), the
    /// map's, but taken from the calling thread's last tenant when that is the same one:
    /// every request of every
    /// thread asks, and the map's lock, shared by all of them, cost 0.3–0.6 µs of CPU per
    /// request with 50 connections on two CPUs. The thread keeps its last tenant's
    /// semaphore, so [`TenantSlots::prune`] keeps that tenant while it is some thread's
    /// last (at most one tenant per thread): a semaphore is only ever handed out while it
    /// is in the map, so two requests of one tenant never count against two semaphores.
    pub fn of_cached(&self, tenant: &str) -> Arc<Semaphore> {
        let hit = LAST_TENANT
            .try_with(|last| {
                let last = last.try_borrow().ok()?;
                let (id, name, s) = last.as_ref()?;
                (*id == self.id && &**name == tenant).then(|| s.clone())
            })
            .ok()
            .flatten();
        if let Some(s) = hit {
            return s;
        }
        let (name, s) = self.entry(tenant);
        let _ = LAST_TENANT.try_with(|last| {
            if let Ok(mut last) = last.try_borrow_mut() {
                *last = Some((self.id, name, s.clone()));
            }
        });
        s
    }

    /// Forgets tenants with nothing running or waiting (their semaphore is unused; a
    /// thread's last tenant counts as used).
    pub fn prune(&self) {
        let per_tenant = self.per_tenant;
        self.lock()
            .retain(|_, s| Arc::strong_count(s) > 1 || s.available_permits() != per_tenant);
    }

    /// Tenants known now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// No tenant known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Requests waiting for their permits: in all, and per script.
#[derive(Debug)]
pub struct WaitingRoom {
    max: usize,
    per_script: usize,
    counts: Mutex<(usize, HashMap<ScriptKey, usize>)>,
}

/// Why a request may not wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `queue_max` requests wait already.
    All,
    /// A quarter of `queue_max` requests of this script wait already.
    Script,
}

impl WaitingRoom {
    /// Room for `max` waiting requests, a quarter of them (at least one) for one script.
    pub fn new(max: usize) -> WaitingRoom {
        WaitingRoom {
            max,
            per_script: (max / 4).max(1),
            counts: Mutex::new((0, HashMap::default())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (usize, HashMap<ScriptKey, usize>)> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a place for a request of `script`, or says why there is none. Every `Ok` must
    /// be matched by one [`WaitingRoom::leave`].
    pub fn enter(&self, script: &ScriptKey) -> Result<(), Full> {
        let mut guard = self.lock();
        let (all, scripts) = &mut *guard;
        if *all >= self.max {
            return Err(Full::All);
        }
        let n = scripts.entry(script.clone()).or_insert(0);
        if *n >= self.per_script {
            return Err(Full::Script);
        }
        *n += 1;
        *all += 1;
        Ok(())
    }

    /// Gives back the place `enter` took for `script`.
    pub fn leave(&self, script: &ScriptKey) {
        let mut guard = self.lock();
        let (all, scripts) = &mut *guard;
        *all = all.saturating_sub(1);
        if let Some(n) = scripts.get_mut(script) {
            *n -= 1;
            if *n == 0 {
                scripts.remove(script);
            }
        }
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.lock().0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_is_bounded_in_all_and_per_script() {
        let room = WaitingRoom::new(8);
        let a: ScriptKey = Arc::from(std::path::Path::new("/a.lua"));
        let b: ScriptKey = Arc::from(std::path::Path::new("/b.lua"));
        assert_eq!(room.enter(&a), Ok(()));
        assert_eq!(room.enter(&a), Ok(()));
        assert_eq!(
            room.enter(&a),
            Err(Full::Script),
            "a quarter of 8 for one script"
        );
        for _ in 0..2 {
            assert_eq!(room.enter(&b), Ok(()));
        }
        room.leave(&a);
        assert_eq!(room.enter(&a), Ok(()));
        assert_eq!(room.waiting(), 4);
        let many = WaitingRoom::new(2);
        assert_eq!(many.enter(&a), Ok(()));
        assert_eq!(many.enter(&b), Ok(()));
        let c: ScriptKey = Arc::from(std::path::Path::new("/c.lua"));
        assert_eq!(many.enter(&c), Err(Full::All));
    }

    #[test]
    fn tenants_share_a_semaphore_and_are_pruned_when_idle() {
        let slots = TenantSlots::new(1);
        let a = slots.of("acme");
        assert!(Arc::ptr_eq(&a, &slots.of("acme")));
        let permit = a.clone().try_acquire_owned().unwrap();
        assert!(
            slots.of("acme").try_acquire().is_err(),
            "one worker per tenant"
        );
        assert!(slots.of("other").try_acquire().is_ok());
        drop(a);
        slots.prune();
        assert_eq!(slots.len(), 1, "acme still runs");
        drop(permit);
        slots.prune();
        assert!(slots.is_empty());
    }

    #[test]
    fn a_threads_last_tenant_is_the_maps_and_stays_while_it_is_the_last() {
        let slots = TenantSlots::new(1);
        let a = slots.of_cached("acme");
        assert!(Arc::ptr_eq(&a, &slots.of("acme")), "the map's semaphore");
        assert!(Arc::ptr_eq(&a, &slots.of_cached("acme")), "from the thread");
        drop(a);
        slots.prune();
        assert_eq!(slots.len(), 1, "the thread's last tenant is kept");
        // Another tenant becomes the thread's last: the first may go.
        drop(slots.of_cached("other"));
        slots.prune();
        assert_eq!(slots.len(), 1);
        assert!(slots.of_cached("other").try_acquire().is_ok());
        // Other threads ask the map: the same semaphore, so a tenant's cap holds across
        // threads.
        let here = slots.of_cached("other");
        let there = std::thread::scope(|s| s.spawn(|| slots.of_cached("other")).join().unwrap());
        assert!(Arc::ptr_eq(&here, &there));
    }

    #[test]
    fn a_threads_last_tenant_is_not_taken_by_other_slots() {
        // A reload builds new slots: their semaphores, not the old ones.
        let old = TenantSlots::new(1);
        let new = TenantSlots::new(1);
        let a = old.of_cached("acme");
        let b = new.of_cached("acme");
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&b, &new.of("acme")));
    }
}
