//! Rate limits in front of the state pool: the effective policy's `[rate]` table (per
//! client, per script, per tenant; `burst` applying to each) and the config's `rate_global`,
//! checked with [`governor`]'s GCRA after a request's params are read and its script and
//! policy resolved, before its body is read (on FastCGI) and before it may take a Lua slot.
//! A request over a limit is answered 429 with `Retry-After` (outcome `rate_limited`) and
//! never reaches Lua.
//!
//! Keys. Per client: the `client_key` param (default `REMOTE_ADDR`), else the peer address.
//! An IPv4 address is one key; IPv6 addresses are grouped per /64 (an IPv4-mapped IPv6
//! address counts as its IPv4 address); anything else is taken as a string, its first
//! [`MAX_TEXT_KEY`] bytes digested with a per-process keyed SipHash (no allocation; two
//! strings share a bucket only by a 64-bit collision no client can aim at). Per script: the
//! script's real path; per tenant: the tenant's name (`Effective::tenant`), both digested the
//! same way. Buckets are also keyed by the quota (rate and burst): one keyed limiter per
//! distinct quota, so a policy change that changes a rate never reuses buckets filled under
//! the old one. A client's requests to scripts whose policies set the same `per_client`
//! rate and burst thus share its bucket. No burst means the rate's count (at least 1).
//!
//! Order. A request is checked per client, then per script, per tenant and globally; the
//! first limit it is over answers, so a flooding client is turned away before it spends
//! the shared (script, tenant, global) budgets. A request refused by a wider limit has
//! still spent one unit of the narrower ones it passed.
//!
//! Bounded memory. Idle keys (whose buckets are full again) are dropped by [`Limiters::sweep`],
//! run by the server's sweeper every `sweep_ms`; limiters left empty are dropped with them.
//! And each kind of key (clients, scripts, tenants) holds at most [`MAX_KEYS`] keys across
//! all its quotas: beyond that, a key not yet known is limited under one shared overflow
//! bucket of its quota until the sweep makes room, while the keys already known keep their
//! own buckets. This fails closed: a flood of distinct (or forged) client keys cannot grow
//! memory or get fresh buckets; its price is that new clients share one bucket while more
//! than [`MAX_KEYS`] clients are active at once.
//!
//! What it does not do: count requests refused before their policy is known (400, 403, 404,
//! `policy_error`); limit bandwidth or concurrency (admission does the latter); share state
//! between daemons. The development HTTP listener checks after it has read the body (within
//! the policy's `body` limit); `luafcgid run` checks its one request like any other.

use foldhash::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{NotUntil, Quota, RateLimiter};
use luafcgid_policy::{Rate, RateLimits};

/// Most keys of one kind (clients, scripts or tenants) held at once, across all quotas.
pub const MAX_KEYS: usize = 100_000;

/// Bytes of a client key that is not an IP address taken into account.
pub const MAX_TEXT_KEY: usize = 256;

/// Which limit a request is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    PerClient,
    PerScript,
    PerTenant,
    Global,
}

impl Limit {
    /// The `error` of the request's audit line.
    pub fn detail(self) -> &'static str {
        match self {
            Limit::PerClient => "rate limit per_client",
            Limit::PerScript => "rate limit per_script",
            Limit::PerTenant => "rate limit per_tenant",
            Limit::Global => "rate limit rate_global",
        }
    }
}

/// What the rate limits say about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not checked yet: [`dispatch`](crate::dispatch::dispatch) checks it.
    Unchecked,
    /// Within every limit its policy and the config set (one unit of each spent).
    Allowed,
    /// Over `limit`; the client may retry after `retry_after` seconds (at least 1).
    Limited { limit: Limit, retry_after: u64 },
}

/// A client, as rate limits tell clients apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// An IPv4 address.
    V4(u32),
    /// The /64 network of an IPv6 address.
    V6(u64),
    /// The digest of any other key (its first [`MAX_TEXT_KEY`] bytes).
    Text(u64),
}

/// A quota as a map key: the time to earn one request back, and the burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct QuotaKey {
    period: Duration,
    burst: NonZeroU32,
}

impl QuotaKey {
    /// The quota of `rate` with `burst` (default: the rate's count); `None` when the rate is
    /// absent or zero (off).
    fn of(rate: Option<Rate>, burst: Option<u32>) -> Option<QuotaKey> {
        let rate = rate.filter(|r| r.count > 0)?;
        let period = (rate.per / rate.count).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(burst.unwrap_or(rate.count)).unwrap_or(NonZeroU32::MIN);
        Some(QuotaKey { period, burst })
    }

    fn quota(self) -> Quota {
        Quota::with_period(self.period)
            .expect("the period is at least 1 ns")
            .allow_burst(self.burst)
    }
}

type Instant = <DefaultClock as Clock>::Instant;

/// The buckets of one quota: a concurrent map from key to GCRA state, whose new keys beyond
/// the shared cap of its kind fall into one overflow bucket.
struct Buckets<K> {
    map: DashMap<K, InMemoryState>,
    overflow: InMemoryState,
    /// Keys held by every quota of this kind.
    held: std::sync::Arc<AtomicUsize>,
    max: usize,
}

impl<K: Hash + Eq + Clone> StateStore for Buckets<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(state) = self.map.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        if self.held.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.held.fetch_sub(1, Ordering::Relaxed);
            return self.overflow.measure_and_replace(&NotKeyed::NonKey, f);
        }
        match self.map.entry(key.clone()) {
            Entry::Occupied(state) => {
                // Another thread added it meanwhile.
                self.held.fetch_sub(1, Ordering::Relaxed);
                state.get().measure_and_replace(&NotKeyed::NonKey, f)
            }
            Entry::Vacant(slot) => slot
                .insert(InMemoryState::default())
                .measure_and_replace(&NotKeyed::NonKey, f),
        }
    }
}

/// The time a bucket's state says its next request conforms (relative to the limiter's
/// start); `None` for a state never used.
fn arrival(state: &InMemoryState) -> Option<Nanos> {
    state
        .measure_and_replace(&NotKeyed::NonKey, Err::<((), Nanos), _>)
        .unwrap_err()
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for Buckets<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        let mut dropped = 0;
        self.map.retain(|_, state| {
            let keep = arrival(state).is_some_and(|tat| tat > drop_below);
            dropped += usize::from(!keep);
            keep
        });
        self.held.fetch_sub(dropped, Ordering::Relaxed);
        // Rehashing costs time: only once the map has at least halved.
        if dropped > 0 && dropped >= self.map.len() {
            self.map.shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

type Keyed<K> = RateLimiter<K, Buckets<K>, DefaultClock, NoOpMiddleware<Instant>>;

/// The keyed limiters of one kind of key, one per distinct quota.
struct Kind<K: Hash + Eq + Clone> {
    limiters: RwLock<HashMap<QuotaKey, Keyed<K>>>,
    held: std::sync::Arc<AtomicUsize>,
    max: usize,
}

impl<K: Hash + Eq + Clone> Kind<K> {
    fn new(max: usize) -> Kind<K> {
        Kind {
            limiters: RwLock::new(HashMap::default()),
            held: std::sync::Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// Spends one request of `key`'s bucket under `quota`, or says how long until one is
    /// available.
    fn check(&self, quota: QuotaKey, key: &K) -> Result<(), Duration> {
        {
            let limiters = self.limiters.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(l) = limiters.get(&quota) {
                return check_keyed(l, key);
            }
        }
        let mut limiters = self
            .limiters
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let l = limiters.entry(quota).or_insert_with(|| {
            let buckets = Buckets {
                map: DashMap::new(),
                overflow: InMemoryState::default(),
                held: self.held.clone(),
                max: self.max,
            };
            RateLimiter::new(quota.quota(), buckets, DefaultClock::default())
        });
        check_keyed(l, key)
    }

    /// Drops idle keys, and limiters left without any.
    fn sweep(&self) {
        {
            let limiters = self.limiters.read().unwrap_or_else(PoisonError::into_inner);
            for l in limiters.values() {
                l.retain_recent();
            }
        }
        let mut limiters = self
            .limiters
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        limiters.retain(|_, l| !l.is_empty());
    }

    fn keys(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn limiters(&self) -> usize {
        self.limiters
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

fn check_keyed<K: Hash + Eq + Clone>(l: &Keyed<K>, key: &K) -> Result<(), Duration> {
    l.check_key(key).map_err(|n| wait(&n, l.clock()))
}

fn wait(n: &NotUntil<Instant>, clock: &DefaultClock) -> Duration {
    n.wait_time_from(clock.now())
}

/// Whole seconds to wait, rounded up, at least 1 (for `Retry-After`).
fn retry_after(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// Keys currently held, per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyCounts {
    pub clients: usize,
    pub scripts: usize,
    pub tenants: usize,
    /// Keyed limiters (one per kind and distinct quota in use).
    pub limiters: usize,
}

/// Every rate limiter of the daemon.
pub struct Limiters {
    global: Option<RateLimiter<NotKeyed, InMemoryState, DefaultClock, NoOpMiddleware<Instant>>>,
    clients: Kind<ClientKey>,
    scripts: Kind<u64>,
    tenants: Kind<u64>,
    digest: RandomState,
}

impl std::fmt::Debug for Limiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiters")
            .field("global", &self.global.is_some())
            .field("keys", &self.keys())
            .finish()
    }
}

/// What a request is checked as.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The client key's value (the `client_key` param, else the peer address); may be left
    /// empty when [`Limiters::needs_client`] says it is not read.
    pub client: &'a [u8],
    /// The script's real path.
    pub script: &'a Path,
    /// The tenant's name.
    pub tenant: &'a str,
}

impl Limiters {
    /// Limiters with the config's global rate (`None` or a zero count: off).
    pub fn new(global: Option<Rate>) -> Limiters {
        Limiters::with_max_keys(global, MAX_KEYS)
    }

    /// As [`Limiters::new`], with another cap on the keys of each kind.
    pub fn with_max_keys(global: Option<Rate>, max_keys: usize) -> Limiters {
        Limiters {
            global: QuotaKey::of(global, None).map(|q| RateLimiter::direct(q.quota())),
            clients: Kind::new(max_keys),
            scripts: Kind::new(max_keys),
            tenants: Kind::new(max_keys),
            digest: RandomState::new(),
        }
    }

    /// Whether [`Limiters::check`] under `rate` reads [`Subject::client`]: only a per-client
    /// limit does, so finding the client among a request's params can wait for one.
    pub fn needs_client(&self, rate: &RateLimits) -> bool {
        QuotaKey::of(rate.per_client, rate.burst).is_some()
    }

    /// Checks a request under `rate` (its effective policy's table) and the global rate,
    /// spending one unit of each limit it passes. Costs nothing when no limit is set.
    pub fn check(&self, rate: &RateLimits, subject: &Subject<'_>) -> Verdict {
        let limited = |limit, wait| Verdict::Limited {
            limit,
            retry_after: retry_after(wait),
        };
        if let Some(q) = QuotaKey::of(rate.per_client, rate.burst) {
            let key = self.client_key(subject.client);
            if let Err(wait) = self.clients.check(q, &key) {
                return limited(Limit::PerClient, wait);
            }
        }
        if let Some(q) = QuotaKey::of(rate.per_script, rate.burst) {
            let key = self.text(subject.script.as_os_str().as_encoded_bytes());
            if let Err(wait) = self.scripts.check(q, &key) {
                return limited(Limit::PerScript, wait);
            }
        }
        if let Some(q) = QuotaKey::of(rate.per_tenant, rate.burst) {
            let key = self.text(subject.tenant.as_bytes());
            if let Err(wait) = self.tenants.check(q, &key) {
                return limited(Limit::PerTenant, wait);
            }
        }
        if let Some(g) = &self.global {
            if let Err(n) = g.check() {
                return limited(Limit::Global, wait(&n, g.clock()));
            }
        }
        Verdict::Allowed
    }

    /// Drops the keys whose buckets are full again (indistinguishable from new ones), and
    /// the limiters left empty. Takes time in proportion to the keys held: run it off the
    /// request path.
    pub fn sweep(&self) {
        self.clients.sweep();
        self.scripts.sweep();
        self.tenants.sweep();
    }

    /// Keys held now.
    pub fn keys(&self) -> KeyCounts {
        KeyCounts {
            clients: self.clients.keys(),
            scripts: self.scripts.keys(),
            tenants: self.tenants.keys(),
            limiters: self.clients.limiters() + self.scripts.limiters() + self.tenants.limiters(),
        }
    }

    /// How rate limits tell the client `value` apart from others.
    pub fn client_key(&self, value: &[u8]) -> ClientKey {
        let ip = std::str::from_utf8(value)
            .ok()
            .and_then(|s| s.parse::<IpAddr>().ok());
        match ip {
            Some(IpAddr::V4(v4)) => ClientKey::V4(v4.to_bits()),
            Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::V4(v4.to_bits()),
                None => ClientKey::V6((v6.to_bits() >> 64) as u64),
            },
            None => ClientKey::Text(self.text(value)),
        }
    }

    fn text(&self, value: &[u8]) -> u64 {
        self.digest
            .hash_one(&value[..value.len().min(MAX_TEXT_KEY)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(count: u32, secs: u64) -> Option<Rate> {
        Some(Rate {
            count,
            per: Duration::from_secs(secs),
        })
    }

    fn subject(client: &str) -> Subject<'_> {
        Subject {
            client: client.as_bytes(),
            script: Path::new("/srv/www/a/x.lua"),
            tenant: "a",
        }
    }

    fn per_client(count: u32, burst: Option<u32>) -> RateLimits {
        RateLimits {
            per_client: rate(count, 1),
            burst,
            ..RateLimits::default()
        }
    }

    #[test]
    fn client_keys_group_ipv6_per_64() {
        let l = Limiters::new(None);
        let k = |s: &str| l.client_key(s.as_bytes());
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff::9"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("::ffff:192.0.2.7"), k("192.0.2.7"));
        assert_ne!(k("192.0.2.7"), k("192.0.2.8"));
        assert_eq!(k("unix"), k("unix"));
        assert_ne!(k("unix"), k("unix2"));
        assert!(matches!(k("fe80::1%eth0"), ClientKey::Text(_)));
        let long_a = "a".repeat(MAX_TEXT_KEY) + "x";
        let long_b = "a".repeat(MAX_TEXT_KEY) + "y";
        assert_eq!(k(&long_a), k(&long_b), "only the first bytes count");
    }

    #[test]
    fn quota_burst_defaults_to_the_count() {
        let q = QuotaKey::of(rate(20, 1), None).unwrap();
        assert_eq!(q.burst.get(), 20);
        assert_eq!(q.period, Duration::from_millis(50));
        assert_eq!(QuotaKey::of(rate(20, 1), Some(3)).unwrap().burst.get(), 3);
        assert!(QuotaKey::of(rate(0, 1), Some(3)).is_none(), "0/s is off");
        assert!(QuotaKey::of(None, Some(3)).is_none());
    }

    #[test]
    fn burst_then_limited_with_a_retry_after() {
        let l = Limiters::new(None);
        let r = per_client(1, Some(2));
        assert_eq!(l.check(&r, &subject("10.0.0.1")), Verdict::Allowed);
        assert_eq!(l.check(&r, &subject("10.0.0.1")), Verdict::Allowed);
        let v = l.check(&r, &subject("10.0.0.1"));
        assert_eq!(
            v,
            Verdict::Limited {
                limit: Limit::PerClient,
                retry_after: 1
            }
        );
        assert_eq!(l.check(&r, &subject("10.0.0.2")), Verdict::Allowed);
        let slow = per_client(1, Some(1));
        let slow = RateLimits {
            per_client: rate(1, 3600),
            ..slow
        };
        assert_eq!(l.check(&slow, &subject("10.0.0.9")), Verdict::Allowed);
        match l.check(&slow, &subject("10.0.0.9")) {
            Verdict::Limited { retry_after, .. } => {
                assert!((3599..=3600).contains(&retry_after), "{retry_after}")
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn another_quota_has_its_own_buckets() {
        let l = Limiters::new(None);
        let one = per_client(1, Some(1));
        assert_eq!(l.check(&one, &subject("10.0.0.1")), Verdict::Allowed);
        assert!(matches!(
            l.check(&one, &subject("10.0.0.1")),
            Verdict::Limited { .. }
        ));
        let two = per_client(1, Some(2));
        assert_eq!(l.check(&two, &subject("10.0.0.1")), Verdict::Allowed);
        assert_eq!(l.keys().limiters, 2);
    }

    #[test]
    fn global_and_order() {
        let l = Limiters::new(rate(1, 3600));
        let none = RateLimits::default();
        assert_eq!(l.check(&none, &subject("10.0.0.1")), Verdict::Allowed);
        assert!(matches!(
            l.check(&none, &subject("10.0.0.2")),
            Verdict::Limited {
                limit: Limit::Global,
                ..
            }
        ));
        let l = Limiters::new(None);
        let all = RateLimits {
            per_client: rate(1, 3600),
            per_script: rate(1, 3600),
            per_tenant: rate(1, 3600),
            burst: None,
        };
        assert_eq!(l.check(&all, &subject("10.0.0.1")), Verdict::Allowed);
        let limit = |v| match v {
            Verdict::Limited { limit, .. } => limit,
            v => panic!("{v:?}"),
        };
        assert_eq!(limit(l.check(&all, &subject("10.0.0.1"))), Limit::PerClient);
        assert_eq!(limit(l.check(&all, &subject("10.0.0.2"))), Limit::PerScript);
        let other_script = Subject {
            script: Path::new("/srv/www/a/y.lua"),
            ..subject("10.0.0.3")
        };
        assert_eq!(limit(l.check(&all, &other_script)), Limit::PerTenant);
    }

    #[test]
    fn the_client_is_needed_only_by_a_per_client_limit() {
        let l = Limiters::new(rate(1, 1));
        assert!(l.needs_client(&per_client(5, None)));
        assert!(!l.needs_client(&per_client(0, None)), "a zero count is off");
        let others = RateLimits {
            per_script: rate(1, 3600),
            per_tenant: rate(1, 3600),
            burst: Some(3),
            ..RateLimits::default()
        };
        assert!(!l.needs_client(&others));
        // What `check` does without it: the same verdicts with the client left empty.
        let unread = subject("");
        assert_eq!(l.check(&others, &unread), Verdict::Allowed);
        assert!(matches!(
            l.check(&others, &subject("10.0.0.9")),
            Verdict::Limited { .. }
        ));
    }

    #[test]
    fn keys_beyond_the_cap_share_an_overflow_bucket() {
        let l = Limiters::with_max_keys(None, 100);
        let r = RateLimits {
            per_client: rate(1, 3600),
            ..RateLimits::default()
        };
        for i in 0..100u32 {
            let ip = std::net::Ipv4Addr::from_bits(i).to_string();
            assert_eq!(l.check(&r, &subject(&ip)), Verdict::Allowed);
        }
        assert_eq!(l.keys().clients, 100);
        // The first new key takes the overflow bucket's one request; the next ones are
        // refused, however many there are, and hold no memory.
        assert_eq!(l.check(&r, &subject("10.1.0.0")), Verdict::Allowed);
        for i in 1..1000u32 {
            let ip = std::net::Ipv4Addr::from_bits((10 << 24) | (1 << 16) | i).to_string();
            assert!(matches!(
                l.check(&r, &subject(&ip)),
                Verdict::Limited { .. }
            ));
        }
        assert_eq!(l.keys().clients, 100);
        // Known keys keep their own buckets (spent here: limited, not by the overflow).
        assert!(matches!(
            l.check(&r, &subject("0.0.0.1")),
            Verdict::Limited { .. }
        ));
    }

    #[test]
    fn sweep_drops_idle_keys_and_empty_limiters() {
        let l = Limiters::new(None);
        // 1000/s, burst 1: a bucket is full again 1 ms after its request.
        let r = per_client(1000, Some(1));
        for i in 0..500u32 {
            let ip = std::net::Ipv4Addr::from_bits(i).to_string();
            assert_eq!(l.check(&r, &subject(&ip)), Verdict::Allowed);
        }
        let slow = RateLimits {
            per_client: rate(1, 3600),
            ..RateLimits::default()
        };
        assert_eq!(l.check(&slow, &subject("10.9.9.9")), Verdict::Allowed);
        assert_eq!(l.keys().clients, 501);
        let start = std::time::Instant::now();
        loop {
            l.sweep();
            if l.keys().clients == 1 {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{:?}", l.keys());
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(l.keys().limiters, 1, "the fast quota's limiter is gone");
        // The slow key is still limited: its bucket was kept.
        assert!(matches!(
            l.check(&slow, &subject("10.9.9.9")),
            Verdict::Limited { .. }
        ));
    }
}
