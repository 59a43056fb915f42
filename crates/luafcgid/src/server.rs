//! The server: binds the listeners of a validated [`Config`], accepts connections under a
//! cap, runs the FastCGI front end (and the development HTTP listener) on the async
//! runtime, Lua under `workers` slots (see [`crate::dispatch`]), a sweeper that notices
//! changed scripts, and drains on shutdown. [`Server::bind`] then [`Server::run`] can be driven from tests on
//! `127.0.0.1:0` or a unix socket in a temporary directory.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use luafcgid_policy::{PolicyTree, Problem, Resolution, SweepReport};
use luafcgid_pool::StatePool;
use luafcgid_sandbox::ScriptState;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};

use crate::admission::{TenantSlots, WaitingRoom};
use crate::audit::{truncate, AuditLog};
use crate::config::{Config, ListenAddr};
use crate::metrics::{Eviction, Metrics};
use crate::ratelimit::{Limiters, Subject, Verdict};
use crate::render::Defaults;
use crate::request_id::RequestIds;
use crate::resolve::{Resolver, Script};
use crate::socket::{Connection, Listener, StreamListener};

/// Stack of each runtime thread, which runs Lua (Lua→Rust→Lua recursion needs more than
/// 256 KiB).
pub const THREAD_STACK: usize = 4 << 20;

/// Runtime threads for `workers` Lua slots: one more, so a thread is always free for IO.
pub fn runtime_threads(workers: usize) -> usize {
    workers + 1
}

/// How often the driver watchdog looks for Lua runs that could starve the IO driver.
pub const DRIVER_WATCH_INTERVAL: Duration = Duration::from_millis(5);

/// Looks of the driver watch that find no Lua run before it parks (half a second): an idle
/// daemon's threads all sleep.
pub const DRIVER_WATCH_IDLE_LOOKS: u32 = 100;

/// How long the parked driver watch sleeps at most: the bound on how late it may notice a
/// run whose start it missed.
pub const DRIVER_WATCH_PARK_MAX: Duration = Duration::from_millis(100);

/// Half-life of a script's popularity for eviction.
pub const POPULARITY_HALF_LIFE: Duration = Duration::from_secs(60);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: a server is already listening on this socket")]
    SocketInUse { addr: String },
    #[error("{addr}: exists and is not a socket")]
    NotASocket { addr: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The process limits set at start (`process_limits`), for the `start` event.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcessLimits {
    /// Open files: the soft limit after raising it to the hard one.
    pub nofile: Option<u64>,
    /// Core dump size: 0 when disabled (they would hold tenants' data).
    pub core: Option<u64>,
}

/// At start: raises the open-file limit to its hard limit and disables core dumps. What
/// could not be set is reported on stderr and left as it was.
pub fn process_limits() -> ProcessLimits {
    let nofile = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!("cannot raise the open-file limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|l| l.0)
        }
    };
    let core = match rlimit::setrlimit(rlimit::Resource::CORE, 0, 0) {
        Ok(()) => Some(0),
        Err(e) => {
            tracing::warn!("cannot disable core dumps: {e}");
            rlimit::getrlimit(rlimit::Resource::CORE).ok().map(|l| l.0)
        }
    };
    ProcessLimits { nofile, core }
}

/// What every connection and worker shares.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub resolver: Resolver,
    /// States boxed: a lease moves a pointer in and out of the pool.
    pub pool: StatePool<Box<ScriptState>>,
    /// One permit per request allowed in Lua at once (`workers`).
    pub lua_slots: Arc<Semaphore>,
    /// The thread that keeps the IO driver polled while Lua runs; told when a run starts.
    pub driver_watch: Arc<DriverWatch>,
    pub audit: Arc<AuditLog>,
    pub defaults: Defaults,
    pub ids: Arc<RequestIds>,
    pub limits: fastcgi_protocol::Limits,
    /// Requests waiting for their permits (a Lua slot, a clone, their tenant's share).
    pub waiting: WaitingRoom,
    /// The Lua workers each tenant may hold.
    pub tenants: TenantSlots,
    /// Connections refused at the cap.
    pub refused_connections: AtomicU64,
    /// Effective policies per directory (`policy.toml` files under the document roots).
    pub policies: PolicyTree,
    /// Rate limits (the policies' `[rate]` tables and `rate_global`).
    pub rates: Limiters,
    /// The counters of `/metrics` (they outlive this `Shared`: see [`Shared::with_metrics`]).
    pub metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    /// What connections and workers share, without any listener: the resolver, the state
    /// pool, the audit log. `Server::bind` and `luafcgid run` build it.
    pub fn new(config: Config, shutdown: watch::Receiver<bool>) -> Result<Arc<Shared>, ServeError> {
        Shared::with_metrics(config, shutdown, Arc::default())
    }

    /// As [`Shared::new`], counting into `metrics` (those of a `Shared` this one replaces,
    /// so the counters go on); the metrics listener reports this `Shared` from now on.
    pub fn with_metrics(
        config: Config,
        shutdown: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Shared>, ServeError> {
        let resolver = Resolver::new(&config.docroots, &config.extensions, config.sweep)?;
        let audit = Arc::new(AuditLog::open(config.log.as_ref())?);
        let lua_slots = Arc::new(Semaphore::new(config.workers));
        Shared::build(
            config,
            resolver,
            audit,
            (lua_slots, Arc::default()),
            Arc::new(RequestIds::default()),
            shutdown,
            metrics,
        )
    }

    /// Everything built from `config`, sharing the given log, Lua slots, request ids and
    /// counters.
    fn build(
        config: Config,
        resolver: Resolver,
        audit: Arc<AuditLog>,
        (lua_slots, driver_watch): (Arc<Semaphore>, Arc<DriverWatch>),
        ids: Arc<RequestIds>,
        shutdown: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Shared>, ServeError> {
        let limits = fastcgi_protocol::Limits {
            max_params_bytes: config.max_params,
            max_body_bytes: config.ceiling.body,
            ..fastcgi_protocol::Limits::default()
        };
        let shared = Arc::new(Shared {
            pool: StatePool::new(
                config.states,
                usize::try_from(config.memory_total).unwrap_or(usize::MAX),
                POPULARITY_HALF_LIFE,
            ),
            defaults: Defaults {
                status: config.default_status,
                content_type: config.default_content_type.clone(),
                headers: config.headers.clone(),
            },
            rates: Limiters::new(config.rate_global),
            policies: PolicyTree::new(
                config.operator_policy(),
                resolver.roots().map(Path::to_path_buf).collect(),
            ),
            resolver,
            lua_slots,
            driver_watch,
            audit,
            ids,
            limits,
            waiting: WaitingRoom::new(config.queue_max),
            tenants: TenantSlots::new(config.tenant_workers),
            refused_connections: AtomicU64::new(0),
            metrics,
            config,
            shutdown,
        });
        shared.metrics.attach(&shared);
        Ok(shared)
    }

    /// The effective policy of a script (a cached lookup when warm).
    pub fn policy_for(&self, script: &Script) -> Resolution {
        self.policies.resolve(&script.key)
    }

    /// The most request body a script may receive: its policy's `body`, or nothing when it
    /// will not run (denied, or its policy is invalid).
    pub fn body_limit(&self, script: &Script) -> u64 {
        match self.policy_for(script) {
            Resolution::Allowed(e) => e.policy.body,
            _ => 0,
        }
    }

    /// What is known of a request once its params are complete, before its body: the most
    /// body it may send, and what the rate limits say (`Unchecked` when it will not run:
    /// denied, or its policy is invalid).
    /// The resolution comes back too, so `dispatch` need not look the policy up again.
    pub fn screen(
        &self,
        script: &Script,
        params: Option<&fastcgi_protocol::Params>,
        peer: &str,
    ) -> (u64, Verdict, Resolution) {
        let resolution = self.policy_for(script);
        let (limit, rate) = match &resolution {
            Resolution::Allowed(e) => (e.policy.body, self.rate_check(script, e, params, peer)),
            _ => (0, Verdict::Unchecked),
        };
        (limit, rate, resolution)
    }

    /// Checks a request against the rate limits of its effective policy and the config,
    /// spending one unit of each it passes. The client is the `client_key` param, else the
    /// peer address.
    pub fn rate_check(
        &self,
        script: &Script,
        effective: &luafcgid_policy::Effective,
        params: Option<&fastcgi_protocol::Params>,
        peer: &str,
    ) -> Verdict {
        // Found among the params (a scan of the twenty or so a web server sends) only when
        // a per-client limit will read it.
        let client = if self.rates.needs_client(&effective.policy.rate) {
            params
                .and_then(|p| p.get(self.config.client_key.as_bytes()))
                .unwrap_or(peer.as_bytes())
        } else {
            &[]
        };
        let subject = Subject {
            client,
            script: &script.key,
            tenant: &effective.tenant,
        };
        self.rates.check(&effective.policy.rate, &subject)
    }

    /// Logs what a policy sweep found: `policy_loaded` for files now in force,
    /// `policy_rejected` for files that are not (an older version stays, or their subtree
    /// answers `policy_error`).
    pub fn log_policy_report(&self, report: &SweepReport) {
        for file in report.loaded.iter().chain(&report.changed) {
            self.audit.lifecycle(
                "policy_loaded",
                serde_json::json!({"file": self.resolver.relative(file)}),
            );
        }
        for file in &report.removed {
            self.audit.lifecycle(
                "policy_loaded",
                serde_json::json!({"file": self.resolver.relative(file), "removed": true}),
            );
        }
        for p in &report.rejected {
            tracing::warn!("policy rejected: {p}");
            self.log_policy_problem(p);
        }
        self.audit.count_dropped(report.dropped as u64);
    }

    fn log_policy_problem(&self, p: &Problem) {
        self.audit.lifecycle(
            "policy_rejected",
            serde_json::json!({
                "file": self.resolver.relative(&p.file),
                "line": p.line,
                "message": truncate(&p.message),
            }),
        );
    }

    /// Checks every policy file under the document roots and logs each problem as a
    /// `policy_rejected` event; returns how many there were.
    pub fn check_policies(&self) -> usize {
        let mut count = 0;
        for root in self.policies.roots() {
            for p in self.policies.check(root) {
                tracing::warn!("invalid policy: {p}");
                self.log_policy_problem(&p);
                count += 1;
            }
        }
        count
    }

    /// Whether the server is shutting down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }
}

/// Keys a reload cannot change: they were applied when the daemon started (sockets bound,
/// threads started, privileges dropped). Gives `new` the running values of those keys and
/// returns the names of the ones it had changed.
fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($($key:ident),*) => {$(
            if new.$key != old.$key {
                changed.push(stringify!($key));
                new.$key = old.$key.clone();
            }
        )*};
    }
    keep!(
        listen,
        socket_mode,
        http,
        metrics,
        workers,
        sched,
        max_connections,
        user,
        group
    );
    changed
}

impl Shared {
    /// What a reload to `config` builds: a new resolver, state pool (every script loads
    /// again), policy tree and rate limiters; the audit log (unless `log` changed), Lua
    /// slots, request ids and the shutdown signal carry over. Keys that need a restart keep
    /// their running values and are returned by name.
    pub fn reload(
        &self,
        mut config: Config,
    ) -> Result<(Arc<Shared>, Vec<&'static str>), ServeError> {
        let kept = keep_restart_only(&self.config, &mut config);
        let resolver = Resolver::new(&config.docroots, &config.extensions, config.sweep)?;
        let audit = if config.log == self.config.log {
            self.audit.clone()
        } else {
            Arc::new(AuditLog::open(config.log.as_ref())?)
        };
        let shared = Shared::build(
            config,
            resolver,
            audit,
            (self.lua_slots.clone(), self.driver_watch.clone()),
            self.ids.clone(),
            self.shutdown.clone(),
            self.metrics.clone(),
        )?;
        shared.refused_connections.store(
            self.refused_connections
                .load(std::sync::atomic::Ordering::Relaxed),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok((shared, kept))
    }
}

/// The running configuration and everything built from it. A reload replaces it as a
/// whole; requests already admitted finish with the one they started with, connections
/// move to the new one between requests.
#[derive(Debug)]
pub struct Live {
    current: std::sync::RwLock<Arc<Shared>>,
    generation: AtomicU64,
}

impl Live {
    fn new(shared: Arc<Shared>) -> Live {
        Live {
            current: std::sync::RwLock::new(shared),
            generation: AtomicU64::new(0),
        }
    }

    /// What new requests use now.
    pub fn current(&self) -> Arc<Shared> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// How many reloads took effect (a connection compares it to switch between requests).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Reloads to `config` (already validated): builds the new state beside the old, then
    /// switches to it. On failure the running configuration stays. The audit log gets
    /// `config_loaded` (with the keys that need a restart) or `config_rejected`.
    pub fn reload(&self, config: Config, origin: &str) -> Result<(), ServeError> {
        let old = self.current();
        match old.reload(config) {
            Ok((new, kept)) => {
                for key in &kept {
                    tracing::warn!("reload: `{key}` changed; it takes effect at the next start");
                }
                {
                    let mut current = self
                        .current
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    *current = new.clone();
                    self.generation
                        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                }
                new.metrics.reloaded();
                new.audit.lifecycle(
                    "config_loaded",
                    serde_json::json!({"file": origin, "restart_needed": kept}),
                );
                let checked = new.clone();
                std::thread::spawn(move || checked.check_policies());
                Ok(())
            }
            Err(e) => {
                self.reject(origin, &e.to_string());
                Err(e)
            }
        }
    }

    /// Says in the audit log that a reload from `origin` was refused, and why.
    pub fn reject(&self, origin: &str, message: &str) {
        tracing::error!("reload refused, the running configuration stays: {message}");
        self.current().audit.lifecycle(
            "config_rejected",
            serde_json::json!({"file": origin, "message": truncate(message)}),
        );
    }
}

enum Bound {
    Tcp(TcpListener),
    /// A unix listener and, when the daemon created its socket file (not inherited), the
    /// path to remove at exit.
    Unix(UnixListener, Option<PathBuf>),
}

/// A bound, not yet running server.
pub struct Server {
    live: Arc<Live>,
    listeners: Vec<Bound>,
    http: Option<TcpListener>,
    metrics: Option<TcpListener>,
    shutdown_tx: watch::Sender<bool>,
    limits: Option<ProcessLimits>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listen", &self.local_addrs())
            .finish()
    }
}

fn bind_unix(path: &Path, mode: Option<u32>) -> Result<UnixListener, ServeError> {
    let addr = path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::SocketInUse { addr });
            }
            std::fs::remove_file(path).map_err(|source| ServeError::Bind {
                addr: addr.clone(),
                source,
            })?;
        }
        Ok(_) => return Err(ServeError::NotASocket { addr }),
        Err(_) => {}
    }
    let l = UnixListener::bind(path).map_err(|source| ServeError::Bind {
        addr: addr.clone(),
        source,
    })?;
    if let Some(m) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m))
            .map_err(|source| ServeError::Bind { addr, source })?;
    }
    Ok(l)
}

async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|source| ServeError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr).map_err(|source| ServeError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    socket.listen(1024).map_err(|source| ServeError::Bind {
        addr: addr.to_string(),
        source,
    })
}

impl Server {
    /// Binds every listener and starts the Lua workers. Must run inside a tokio runtime.
    pub async fn bind(config: Config) -> Result<Server, ServeError> {
        Server::bind_with(config, Vec::new()).await
    }

    /// [`Server::bind`], except that listening sockets handed over by a service manager,
    /// when there are any, replace the configured `listen` addresses. Their socket files
    /// are not the daemon's to remove.
    pub async fn bind_with(
        config: Config,
        inherited: Vec<crate::system::Inherited>,
    ) -> Result<Server, ServeError> {
        let mut listeners = Vec::new();
        if inherited.is_empty() {
            for l in &config.listen {
                listeners.push(match l {
                    ListenAddr::Tcp(a) => Bound::Tcp(bind_tcp(*a).await?),
                    ListenAddr::Unix(p) => {
                        Bound::Unix(bind_unix(p, config.socket_mode)?, Some(p.clone()))
                    }
                });
            }
        }
        for l in inherited {
            listeners.push(match l {
                crate::system::Inherited::Tcp(t) => Bound::Tcp(TcpListener::from_std(t)?),
                crate::system::Inherited::Unix(u) => Bound::Unix(UnixListener::from_std(u)?, None),
            });
        }
        let http = match config.http {
            Some(a) => Some(bind_tcp(a).await?),
            None => None,
        };
        let metrics = match config.metrics {
            Some(a) => Some(bind_tcp(a).await?),
            None => None,
        };
        let (shutdown_tx, shutdown) = watch::channel(false);
        let shared = Shared::new(config, shutdown)?;
        Ok(Server {
            live: Arc::new(Live::new(shared)),
            listeners,
            http,
            metrics,
            shutdown_tx,
            limits: None,
        })
    }

    /// The process limits the binary set at start, reported in the `start` event.
    pub fn with_process_limits(mut self, limits: ProcessLimits) -> Server {
        self.limits = Some(limits);
        self
    }

    /// The addresses actually bound (ports resolved).
    pub fn local_addrs(&self) -> Vec<ListenAddr> {
        self.listeners
            .iter()
            .filter_map(|l| match l {
                Bound::Tcp(t) => t.local_addr().ok().map(ListenAddr::Tcp),
                Bound::Unix(u, _) => u
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(|p| ListenAddr::Unix(p.to_path_buf()))),
            })
            .collect()
    }

    /// The unix socket files the daemon created (and removes at exit).
    pub fn created_sockets(&self) -> Vec<PathBuf> {
        self.listeners
            .iter()
            .filter_map(|l| match l {
                Bound::Unix(_, p) => p.clone(),
                Bound::Tcp(_) => None,
            })
            .collect()
    }

    /// The development HTTP listener's address.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|h| h.local_addr().ok())
    }

    /// The metrics listener's address.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|m| m.local_addr().ok())
    }

    /// What connections and workers share now (for tests and diagnostics).
    pub fn shared(&self) -> Arc<Shared> {
        self.live.current()
    }

    /// The running configuration, which a reload replaces.
    pub fn live(&self) -> Arc<Live> {
        self.live.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting (connections the kernel had
    /// already completed are still taken), lets in-flight requests and requests already
    /// sent finish (bounded by `shutdown_timeout`), removes the unix sockets it created and
    /// stops the workers.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let Server {
            live,
            listeners,
            http,
            metrics,
            shutdown_tx,
            limits,
        } = self;
        let shared = live.current();
        let connections = Arc::new(Semaphore::new(shared.config.max_connections));
        let (stop_accepting, stop) = watch::channel(false);
        let mut accept_tasks = Vec::new();
        let mut sockets = Vec::new();
        let listening: Vec<String> = listeners
            .iter()
            .filter_map(|l| match l {
                Bound::Tcp(t) => t.local_addr().ok().map(|a| a.to_string()),
                Bound::Unix(u, _) => u.local_addr().ok().map(|a| match a.as_pathname() {
                    Some(p) => p.display().to_string(),
                    None => "unix (unnamed)".to_string(),
                }),
            })
            .collect();
        shared.audit.lifecycle(
            "start",
            serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "listen": listening,
                "workers": shared.config.workers,
                "sched": shared.config.sched.name(),
                "states": shared.config.states,
                "nofile": limits.and_then(|l| l.nofile),
                "core": limits.and_then(|l| l.core),
            }),
        );
        // Started before the first accept, so that it watches from the first request on.
        let driver_watch = shared.driver_watch.clone();
        let watchdog = {
            let watch = driver_watch.clone();
            let slots = shared.lua_slots.clone();
            let workers = shared.config.workers;
            let handle = tokio::runtime::Handle::current();
            std::thread::Builder::new()
                .name("driver-watch".into())
                .spawn(move || watch_driver(handle, slots, workers, &watch))?
        };
        for l in listeners {
            let accepting = Accepting {
                live: live.clone(),
                connections: connections.clone(),
                stop: stop.clone(),
            };
            match l {
                Bound::Tcp(t) => accept_tasks.push(tokio::spawn(accept_tcp(t, accepting))),
                Bound::Unix(u, p) => {
                    sockets.extend(p);
                    accept_tasks.push(tokio::spawn(accept_unix(u, accepting)))
                }
            }
        }
        // Stopped by abort at shutdown (they serve no FastCGI request to drain).
        let mut side_tasks = Vec::new();
        if let Some(h) = http {
            side_tasks.push(tokio::spawn(crate::http::accept(
                h,
                live.clone(),
                connections.clone(),
            )));
        }
        if let Some(m) = metrics {
            let counters = shared.metrics.clone();
            side_tasks.push(tokio::spawn(crate::metrics::serve(m, counters)));
        }
        // Report invalid policies at start (their subtrees answer `policy_error`); the
        // walk runs beside serving, never delaying it.
        let checked = shared.clone();
        tokio::task::spawn_blocking(move || checked.check_policies());
        let sweeper = tokio::spawn(sweep(live.clone()));
        // Not kept: a reload must be able to free the states of the configuration it
        // replaces.
        drop(shared);
        shutdown.await;
        let _ = stop_accepting.send(true);
        for t in accept_tasks {
            let _ = t.await;
        }
        for t in &side_tasks {
            t.abort();
        }
        sweeper.abort();
        let _ = shutdown_tx.send(true);
        for p in &sockets {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!("cannot remove the socket {}: {e}", p.display());
            }
        }
        // Every connection holds a permit: all of them back means all connections ended.
        let shared = live.current();
        let max = shared.config.max_connections as u32;
        let _ = tokio::time::timeout(
            shared.config.shutdown_timeout,
            connections.acquire_many(max),
        )
        .await;
        driver_watch.stop();
        let _ = watchdog.join();
        let _ = tokio::task::spawn_blocking(move || {
            shared.audit.lifecycle("stop", serde_json::json!({}));
            shared.audit.close();
        })
        .await;
        Ok(())
    }
}

fn allowed(shared: &Shared, ip: IpAddr) -> bool {
    let allow = &shared.config.allow;
    if allow.is_empty() {
        return true;
    }
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    allow.contains(&ip)
}

/// Waits a little after an accept error (descriptors exhausted, ...) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A permit for one more connection, or `None` (counted as refused) at the cap; the caller
/// then drops the connection at once.
pub(crate) fn connection_permit(
    shared: &Shared,
    connections: &Arc<Semaphore>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let permit = connections.clone().try_acquire_owned().ok();
    if permit.is_none() {
        shared
            .refused_connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    permit
}

/// What an accept loop needs: where connections go, their cap, and when to stop.
struct Accepting {
    live: Arc<Live>,
    connections: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
}

impl Accepting {
    /// Serves an accepted TCP connection (non-blocking).
    fn serve_tcp(&self, stream: std::net::TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        if let Ok(stream) = Connection::new(stream) {
            self.serve(stream, Arc::from(peer.ip().to_string()), Some(peer.ip()));
        }
    }

    /// Serves an accepted unix-socket connection (non-blocking).
    fn serve_unix(&self, stream: std::os::unix::net::UnixStream, peer: &Arc<str>) {
        if let Ok(stream) = Connection::new(stream) {
            self.serve(stream, peer.clone(), None);
        }
    }

    /// Serves `stream` on a task of its own, unless the connection cap is reached or its
    /// TCP peer is not in `allow`.
    fn serve<S>(&self, stream: S, peer: Arc<str>, ip: Option<IpAddr>)
    where
        S: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + std::os::fd::AsRawFd
            + Unpin
            + Send
            + 'static,
    {
        let shared = self.live.current();
        let Some(permit) = connection_permit(&shared, &self.connections) else {
            return;
        };
        if ip.is_some_and(|ip| !allowed(&shared, ip)) {
            return;
        }
        let live = self.live.clone();
        tokio::spawn(async move {
            crate::conn::serve(stream, peer, live).await;
            drop(permit);
        });
    }
}

async fn accept_tcp(l: TcpListener, mut a: Accepting) {
    let what = format!("{:?}", l.local_addr().ok());
    let l = match l.into_std().and_then(Listener::new) {
        Ok(l) => l,
        Err(e) => return tracing::error!("cannot watch {what}: {e}"),
    };
    while !*a.stop.borrow() {
        tokio::select! {
            r = l.accept() => match r {
                Ok((stream, peer)) => a.serve_tcp(stream, peer),
                Err(e) => backoff(&mut a.stop, &what, e).await,
            },
            _ = a.stop.changed() => {}
        }
    }
    // Connections the kernel completed before the stop: their clients may already have
    // sent a request, which must be answered.
    let l = l.into_inner();
    while let Ok((stream, peer)) = l.accept_one() {
        a.serve_tcp(stream, peer);
    }
}

async fn accept_unix(l: UnixListener, mut a: Accepting) {
    let peer: Arc<str> = Arc::from("unix");
    let l = match l.into_std().and_then(Listener::new) {
        Ok(l) => l,
        Err(e) => return tracing::error!("cannot watch a unix socket: {e}"),
    };
    while !*a.stop.borrow() {
        tokio::select! {
            r = l.accept() => match r {
                Ok((stream, _)) => a.serve_unix(stream, &peer),
                Err(e) => backoff(&mut a.stop, "a unix socket", e).await,
            },
            _ = a.stop.changed() => {}
        }
    }
    let l = l.into_inner();
    while let Ok((stream, _)) = l.accept_one() {
        a.serve_unix(stream, &peer);
    }
}

/// After an accept error (descriptors exhausted, ...): says it and waits a little, so the
/// loop neither spins nor gives up; a stop ends the wait.
async fn backoff(stop: &mut watch::Receiver<bool>, what: &str, e: std::io::Error) {
    tracing::warn!("accept on {what}: {e}");
    tokio::select! {
        _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
        _ = stop.changed() => {}
    }
}

/// The driver watch's state, shared with the requests that start Lua runs.
#[derive(Debug)]
pub struct DriverWatch {
    watching: AtomicBool,
    parked: AtomicBool,
    /// The watching thread, once it runs.
    thread: std::sync::Mutex<Option<std::thread::Thread>>,
}

impl Default for DriverWatch {
    fn default() -> Self {
        DriverWatch {
            watching: AtomicBool::new(true),
            parked: AtomicBool::new(false),
            thread: std::sync::Mutex::new(None),
        }
    }
}

impl DriverWatch {
    /// A Lua run took a slot: wakes the watch if it is parked (one load when it is not).
    pub fn run_started(&self) {
        if self.parked.load(Ordering::SeqCst) {
            self.unpark();
        }
    }

    /// Whether the watch is parked (the daemon has been without a Lua run for a while).
    pub fn is_parked(&self) -> bool {
        self.parked.load(Ordering::SeqCst)
    }

    fn unpark(&self) {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(thread) = &*thread {
            thread.unpark();
        }
    }

    /// Makes the calling thread the watching one.
    fn start(&self) {
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::thread::current());
    }

    /// Ends the watch (at shutdown).
    fn stop(&self) {
        self.watching.store(false, Ordering::SeqCst);
        self.unpark();
    }
}

/// Keeps the IO driver polled while Lua runs. tokio polls its driver only from an idle
/// thread, and a thread that took the driver's last events and then runs Lua leaves the
/// others asleep. The sandbox's hook hands the driver off after about a millisecond
/// (`probe.rs`), but a single long C call runs no hook; so while any Lua run is in
/// progress, this thread spawns an empty task from outside the runtime every few
/// milliseconds, which wakes an idle runtime thread (that then polls the driver). After
/// [`DRIVER_WATCH_IDLE_LOOKS`] looks without a run it parks until a run starts
/// ([`DriverWatch::run_started`]), or [`DRIVER_WATCH_PARK_MAX`] at most.
fn watch_driver(
    handle: tokio::runtime::Handle,
    lua_slots: Arc<Semaphore>,
    workers: usize,
    watch: &DriverWatch,
) {
    // Wakes on time even when the daemon's other threads run as a batch.
    luafcgid_sandbox::leave_batch_scheduling();
    watch.start();
    let running = || lua_slots.available_permits() < workers;
    let mut idle = 0u32;
    while watch.watching.load(Ordering::SeqCst) {
        if idle >= DRIVER_WATCH_IDLE_LOOKS {
            watch.parked.store(true, Ordering::SeqCst);
            // A run that takes its slot after this look sees `parked` and wakes the watch.
            if !running() && watch.watching.load(Ordering::SeqCst) {
                std::thread::park_timeout(DRIVER_WATCH_PARK_MAX);
            }
            watch.parked.store(false, Ordering::SeqCst);
        } else {
            std::thread::sleep(DRIVER_WATCH_INTERVAL);
        }
        if running() {
            idle = 0;
            handle.spawn(async {});
        } else {
            idle = idle.saturating_add(1);
        }
    }
}

/// Every `sweep`, on the configuration current then: notices changed scripts and policy
/// files, prunes idle tenants and rate-limit keys.
async fn sweep(live: Arc<Live>) {
    let mut period = live.current().config.sweep;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let shared = live.current();
        if shared.config.sweep != period {
            period = shared.config.sweep;
            tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let s = shared.clone();
        let swept = tokio::task::spawn_blocking(move || {
            s.tenants.prune();
            (s.pool.sweep(), s.policies.sweep())
        })
        .await;
        let (retired, report) = swept.unwrap_or_default();
        let s = shared.clone();
        let _ = tokio::task::spawn_blocking(move || s.rates.sweep()).await;
        shared.log_policy_report(&report);
        for key in retired {
            shared.metrics.evicted(Eviction::Changed);
            shared.audit.lifecycle(
                "state_evicted",
                serde_json::json!({"script": shared.resolver.relative(&key), "reason": "changed"}),
            );
        }
    }
}
