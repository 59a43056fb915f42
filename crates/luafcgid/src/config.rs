//! The daemon's own configuration: `luafcgid.toml` as written ([`RawConfig`], unknown keys
//! refused), command-line overrides, and the validated [`Config`] the server runs with.
//!
//! Everything here is checked before any socket is bound: a bad value is a [`ConfigError`]
//! naming the key (and, for files, the line). Policy files of tenants are not read here.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use luafcgid_policy::{
    parse_rate, parse_size, Ceiling, OperatorPolicy, Policy, PolicyFields, Rate,
};
use serde::Deserialize;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// An original `config.lua` could not be read as data (no line to name: too large,
    /// memory limit).
    #[error("{path}: {message}")]
    Legacy { path: PathBuf, message: String },
    /// A value is out of range or malformed.
    #[error("{origin}: `{key}`: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
}

/// A listening address: TCP (`host:port`, `:port`, `[v6]:port`) or a unix socket path
/// (anything containing a `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

impl ListenAddr {
    /// Parses an address as the original luafcgid's `listen` did.
    pub fn parse(text: &str) -> Result<ListenAddr, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("empty address".into());
        }
        if t.contains('/') {
            return Ok(ListenAddr::Unix(PathBuf::from(t)));
        }
        if let Some(port) = t.strip_prefix(':') {
            let port: u16 = port.parse().map_err(|_| format!("bad port in `{t}`"))?;
            return Ok(ListenAddr::Tcp(SocketAddr::from(([0, 0, 0, 0], port))));
        }
        if let Ok(a) = t.parse::<SocketAddr>() {
            return Ok(ListenAddr::Tcp(a));
        }
        match t.to_socket_addrs() {
            Ok(mut addrs) => addrs
                .next()
                .map(ListenAddr::Tcp)
                .ok_or_else(|| format!("`{t}` resolves to no address")),
            Err(_) => Err(format!(
                "`{t}` is not host:port, :port, [v6]:port or a socket path"
            )),
        }
    }
}

/// A development or monitoring listener's address: `host:port`, or `:port` on 127.0.0.1.
/// Anything but loopback is refused unless `public` (such a listener has no access
/// control of its own).
pub fn loopback_unless_public(text: &str, public: bool) -> Result<SocketAddr, String> {
    let addr = match ListenAddr::parse(text)? {
        ListenAddr::Tcp(a) if text.trim().starts_with(':') => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        ListenAddr::Tcp(a) => a,
        ListenAddr::Unix(_) => return Err("takes host:port, not a socket path".into()),
    };
    if !addr.ip().is_loopback() && !public {
        return Err(format!(
            "{addr} is not a loopback address; allow it explicitly (http_public = true, or \
             --http-public) to listen beyond this machine"
        ));
    }
    Ok(addr)
}

/// `luafcgid.toml` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<Vec<String>>,
    pub socket_mode: Option<String>,
    pub allow: Option<Vec<String>>,
    pub docroot: Option<Vec<PathBuf>>,
    pub extensions: Option<Vec<String>>,
    pub http: Option<String>,
    pub http_public: Option<bool>,
    pub workers: Option<usize>,
    pub sched: Option<String>,
    pub states: Option<usize>,
    pub memory_total: Option<luafcgid_policy::SizeValue>,
    pub sweep_ms: Option<u64>,
    pub queue_timeout_ms: Option<u64>,
    pub queue_max: Option<usize>,
    pub tenant_workers: Option<usize>,
    pub client_key: Option<String>,
    pub rate_global: Option<String>,
    pub max_connections: Option<usize>,
    pub max_params: Option<luafcgid_policy::SizeValue>,
    pub read_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub shutdown_timeout_ms: Option<u64>,
    pub headers: Option<Vec<String>>,
    pub default_status: Option<String>,
    pub default_content_type: Option<String>,
    pub log: Option<PathBuf>,
    pub metrics: Option<String>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub defaults: Option<PolicyFields>,
    pub ceiling: Option<PolicyFields>,
}

/// Command-line values that win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Vec<String>,
    pub docroot: Vec<PathBuf>,
    pub http: Option<String>,
    /// `--http-public`: the development listener may bind beyond loopback.
    pub http_public: bool,
    pub workers: Option<usize>,
    pub sched: Option<String>,
    pub states: Option<usize>,
    pub clones: Option<u32>,
    pub sweep_ms: Option<u64>,
    pub log: Option<PathBuf>,
    pub metrics: Option<String>,
}

/// How the daemon's threads are scheduled against the rest of the machine (`sched`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sched {
    /// `SCHED_BATCH` (the default): a thread of the daemon that wakes does not preempt the
    /// task running on its CPU (the web server, most often, in the middle of a batch of
    /// events); it runs when that task's time slice ends or it sleeps. The sandbox's
    /// watchdog and the driver watch stay under the normal policy, so limits and stalls are
    /// noticed on time, and so does the audit writer (measured faster so).
    Batch,
    /// The policy the daemon was started with, left as it is (normally `SCHED_OTHER`).
    Normal,
}

impl Sched {
    /// The name in the config file.
    pub fn name(self) -> &'static str {
        match self {
            Sched::Batch => "batch",
            Sched::Normal => "normal",
        }
    }

    /// The policy of that name in the config file.
    fn from_name(name: &str) -> Option<Sched> {
        [Sched::Batch, Sched::Normal]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<ListenAddr>,
    pub socket_mode: Option<u32>,
    pub allow: Vec<IpAddr>,
    /// Document roots as configured (absolute).
    pub docroots: Vec<PathBuf>,
    pub extensions: Vec<String>,
    pub http: Option<SocketAddr>,
    pub workers: usize,
    /// The CPU scheduling policy of the daemon's threads (`sched`).
    pub sched: Sched,
    pub states: usize,
    pub memory_total: u64,
    pub sweep: Duration,
    pub queue_timeout: Duration,
    pub queue_max: usize,
    /// Most Lua workers one tenant may hold at once (default: `workers - 1`, at least 1), so
    /// a tenant flooding the daemon with slow requests never holds every worker.
    pub tenant_workers: usize,
    /// The param that names the client (for rate limits and the audit log).
    pub client_key: Arc<str>,
    pub rate_global: Option<Rate>,
    pub max_connections: usize,
    pub max_params: usize,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// Global response headers, in order.
    pub headers: Vec<(String, String)>,
    pub default_status: u16,
    pub default_content_type: String,
    /// Audit log file; `None` is stdout.
    pub log: Option<PathBuf>,
    /// The metrics listener (`/metrics`, `/healthz`); `:port` is on loopback.
    pub metrics: Option<SocketAddr>,
    pub user: Option<String>,
    pub group: Option<String>,
    /// The effective policy where no policy file says otherwise.
    pub defaults: Policy,
    /// The most a policy may grant.
    pub ceiling: Policy,
}

fn invalid(origin: &str, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin: origin.to_string(),
        key: key.to_string(),
        message: message.into(),
    }
}

impl Config {
    /// The operator's policy for the policy tree: the `[defaults]` (with the flags applied)
    /// and the `[ceiling]` (over the built-in one).
    pub fn operator_policy(&self) -> OperatorPolicy {
        OperatorPolicy::new(self.defaults.clone(), Ceiling::from_policy(&self.ceiling))
    }
}

/// The built-in ceiling: generous values that keep the daemon alive.
pub fn builtin_ceiling() -> Policy {
    Policy {
        timeout: Duration::from_secs(300),
        instructions: u64::MAX / 2,
        memory: 4 << 30,
        output: 1 << 30,
        body: 1 << 30,
        init_timeout: Duration::from_secs(300),
        init_instructions: u64::MAX / 2,
        clones: 1024,
        show_errors: true,
        ..Policy::default()
    }
}

/// Checks a header line `Name: value` and splits it.
pub fn parse_header_line(line: &str) -> Result<(String, String), String> {
    let (name, value) = line
        .split_once(':')
        .ok_or_else(|| format!("`{line}` is not `Name: value`"))?;
    let name = name.trim();
    let value = value.trim();
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(format!("`{name}` is not a header name"));
    }
    if value.chars().any(|c| c == '\r' || c == '\n' || c == '\0') {
        return Err(format!("the value of `{name}` holds a line break or NUL"));
    }
    Ok((name.to_string(), value.to_string()))
}

/// The metrics listener's address: `host:port` or `[v6]:port` as written, `:port` on
/// loopback (the counters tell how busy each script is: not for every network by default).
pub fn metrics_addr(text: &str) -> Result<SocketAddr, String> {
    if let Some(port) = text.trim().strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("bad port in `{}`", text.trim()))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    match ListenAddr::parse(text)? {
        ListenAddr::Tcp(a) => Ok(a),
        ListenAddr::Unix(_) => Err("the metrics listener takes host:port or :port".into()),
    }
}

impl RawConfig {
    /// Reads and parses a config file: `luafcgid.toml`, or an original luafcgid `config.lua`
    /// when the name ends in `.lua` (see [`crate::legacy_config`]), whose warnings (keys
    /// ignored or not known) are logged here.
    pub fn read(path: &Path) -> Result<RawConfig, ConfigError> {
        let (raw, warnings) = RawConfig::read_with_warnings(path)?;
        for w in warnings {
            tracing::warn!("{}: {w}", path.display());
        }
        Ok(raw)
    }

    /// As [`RawConfig::read`], giving the warnings instead of logging them (a TOML file has
    /// none: an unknown key there is an error).
    pub fn read_with_warnings(path: &Path) -> Result<(RawConfig, Vec<String>), ConfigError> {
        if crate::legacy_config::is_legacy(path) {
            let legacy = crate::legacy_config::read(path)?;
            return Ok((legacy.raw, legacy.warnings));
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok((RawConfig::parse(&text, path)?, Vec::new()))
    }

    /// Parses config text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(0);
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                message: e.message().to_string(),
            }
        })
    }

    /// Applies overrides and validates. `origin` names the source in errors.
    pub fn validate(self, origin: &str, o: &Overrides) -> Result<Config, ConfigError> {
        let e = |key: &str, m: String| invalid(origin, key, m);
        let listen_text: Vec<String> = if !o.listen.is_empty() {
            o.listen.clone()
        } else {
            self.listen.unwrap_or_else(|| vec!["127.0.0.1:9000".into()])
        };
        let mut listen = Vec::new();
        for l in &listen_text {
            listen.push(ListenAddr::parse(l).map_err(|m| e("listen", m))?);
        }
        let socket_mode = match self.socket_mode {
            None => None,
            Some(m) => Some(
                u32::from_str_radix(m.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|v| *v <= 0o777)
                    .ok_or_else(|| e("socket_mode", format!("`{m}` is not an octal mode")))?,
            ),
        };
        let mut allow = Vec::new();
        for a in self
            .allow
            .unwrap_or_else(|| vec!["127.0.0.1".into(), "::1".into()])
        {
            allow.push(
                a.parse::<IpAddr>()
                    .map_err(|_| e("allow", format!("`{a}` is not an IP address")))?,
            );
        }
        let docroot_list = if !o.docroot.is_empty() {
            o.docroot.clone()
        } else {
            self.docroot.unwrap_or_default()
        };
        if docroot_list.is_empty() {
            return Err(e(
                "docroot",
                "at least one document root is required".into(),
            ));
        }
        let mut docroots = Vec::new();
        for d in docroot_list {
            let abs = std::path::absolute(&d)
                .map_err(|err| e("docroot", format!("{}: {err}", d.display())))?;
            if !abs.is_dir() {
                return Err(e(
                    "docroot",
                    format!("{} is not a readable directory", abs.display()),
                ));
            }
            docroots.push(abs);
        }
        let extensions = self.extensions.unwrap_or_else(|| vec![".lua".into()]);
        for x in &extensions {
            if !x.starts_with('.') || x.len() < 2 || x.contains('/') {
                return Err(e("extensions", format!("`{x}` must look like `.lua`")));
            }
        }
        let http_public = o.http_public || self.http_public.unwrap_or(false);
        let http = match o.http.clone().or(self.http) {
            None => None,
            Some(h) => Some(loopback_unless_public(&h, http_public).map_err(|m| e("http", m))?),
        };
        let metrics = match o.metrics.clone().or(self.metrics) {
            None => None,
            Some(m) => Some(metrics_addr(&m).map_err(|msg| e("metrics", msg))?),
        };
        if listen.is_empty() && http.is_none() {
            return Err(e(
                "listen",
                "at least one address is required (or an `http` listener)".into(),
            ));
        }
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        // At least two, so that one tenant at its `tenant_workers` cap never holds every
        // worker, even on one CPU (a long run there gives up the CPU to the other).
        let workers = o.workers.or(self.workers).unwrap_or(cpus.max(2));
        if !(1..=1024).contains(&workers) {
            return Err(e("workers", "must be between 1 and 1024".into()));
        }
        let sched = match o.sched.as_deref().or(self.sched.as_deref()) {
            None => Sched::Batch,
            Some(name) => Sched::from_name(name).ok_or_else(|| {
                e(
                    "sched",
                    format!("`{name}` is neither \"batch\" nor \"normal\""),
                )
            })?,
        };
        let states = o.states.or(self.states).unwrap_or(1000);
        if states == 0 {
            return Err(e("states", "must be at least 1".into()));
        }
        let size = |key: &str,
                    v: Option<luafcgid_policy::SizeValue>,
                    d: u64|
         -> Result<u64, ConfigError> {
            match v {
                None => Ok(d),
                Some(luafcgid_policy::SizeValue::Bytes(n)) => Ok(n),
                Some(luafcgid_policy::SizeValue::Text(t)) => {
                    parse_size(&t).map_err(|m| invalid(origin, key, m.to_string()))
                }
            }
        };
        let memory_total = size("memory_total", self.memory_total, 4 << 30)?;
        let max_params = size("max_params", self.max_params, 1 << 20)?;
        if !(1024..=(64 << 20)).contains(&max_params) {
            return Err(e("max_params", "must be between 1KiB and 64MiB".into()));
        }
        let ms = |key: &str, v: Option<u64>, d: u64, min: u64| -> Result<Duration, ConfigError> {
            let v = v.unwrap_or(d);
            if v < min {
                return Err(invalid(origin, key, format!("must be at least {min}")));
            }
            Ok(Duration::from_millis(v))
        };
        let sweep = ms("sweep_ms", o.sweep_ms.or(self.sweep_ms), 1000, 10)?;
        let queue_timeout = ms("queue_timeout_ms", self.queue_timeout_ms, 1000, 1)?;
        let read_timeout = ms("read_timeout_ms", self.read_timeout_ms, 10_000, 1)?;
        let idle_timeout = ms("idle_timeout_ms", self.idle_timeout_ms, 60_000, 1)?;
        let shutdown_timeout = ms("shutdown_timeout_ms", self.shutdown_timeout_ms, 10_000, 0)?;
        let queue_max = self.queue_max.unwrap_or(1024);
        let tenant_workers = self
            .tenant_workers
            .unwrap_or(workers.saturating_sub(1).max(1));
        if !(1..=workers).contains(&tenant_workers) {
            return Err(e(
                "tenant_workers",
                format!("must be between 1 and `workers` ({workers})"),
            ));
        }
        if queue_max == 0 {
            return Err(e("queue_max", "must be at least 1".into()));
        }
        let max_connections = self.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            return Err(e("max_connections", "must be at least 1".into()));
        }
        let rate_global = match self.rate_global {
            None => None,
            Some(r) => Some(parse_rate(&r).map_err(|m| e("rate_global", m.to_string()))?)
                .filter(|r| r.count > 0),
        };
        let mut headers = Vec::new();
        for h in self.headers.unwrap_or_default() {
            headers.push(parse_header_line(&h).map_err(|m| e("headers", m))?);
        }
        let default_status = match self.default_status {
            None => 200,
            Some(s) => s
                .split_whitespace()
                .next()
                .and_then(|c| c.parse::<u16>().ok())
                .filter(|c| (100..=599).contains(c))
                .ok_or_else(|| e("default_status", format!("`{s}` is not like `200 OK`")))?,
        };
        let default_content_type = self
            .default_content_type
            .unwrap_or_else(|| "text/html".into());
        parse_header_line(&format!("Content-Type: {default_content_type}"))
            .map_err(|m| e("default_content_type", m))?;
        let client_key: Arc<str> = self.client_key.as_deref().unwrap_or("REMOTE_ADDR").into();
        let mut ceiling = builtin_ceiling();
        if let Some(c) = &self.ceiling {
            ceiling.apply(c).map_err(|m| e("ceiling", m.to_string()))?;
        }
        let mut defaults = Policy::default();
        if let Some(d) = &self.defaults {
            defaults
                .apply(d)
                .map_err(|m| e("defaults", m.to_string()))?;
        }
        if let Some(c) = o.clones {
            if !(1..=1024).contains(&c) {
                return Err(e("clones", "must be between 1 and 1024".into()));
            }
            defaults.clones = c;
        }
        check_ceiling(&defaults, &ceiling).map_err(|(k, m)| e(&format!("defaults.{k}"), m))?;
        Ok(Config {
            listen,
            socket_mode,
            allow,
            docroots,
            extensions,
            http,
            workers,
            sched,
            states,
            memory_total,
            sweep,
            queue_timeout,
            queue_max,
            tenant_workers,
            client_key,
            rate_global,
            max_connections,
            max_params: max_params as usize,
            read_timeout,
            idle_timeout,
            shutdown_timeout,
            headers,
            default_status,
            default_content_type,
            log: o.log.clone().or(self.log),
            metrics,
            user: self.user,
            group: self.group,
            defaults,
            ceiling,
        })
    }
}

/// Checks that `p` grants no more than `ceiling`; names the first key over it.
pub fn check_ceiling(p: &Policy, c: &Policy) -> Result<(), (&'static str, String)> {
    let over = |k: &'static str, v: String, max: String| {
        Err((k, format!("{v} is above the ceiling {max}")))
    };
    if p.timeout > c.timeout {
        return over(
            "timeout_ms",
            format!("{:?}", p.timeout),
            format!("{:?}", c.timeout),
        );
    }
    if p.instructions > c.instructions {
        return over(
            "instructions",
            p.instructions.to_string(),
            c.instructions.to_string(),
        );
    }
    if p.memory > c.memory {
        return over("memory", p.memory.to_string(), c.memory.to_string());
    }
    if p.output > c.output {
        return over("output", p.output.to_string(), c.output.to_string());
    }
    if p.body > c.body {
        return over("body", p.body.to_string(), c.body.to_string());
    }
    if p.init_timeout > c.init_timeout {
        return over(
            "init_timeout_ms",
            format!("{:?}", p.init_timeout),
            format!("{:?}", c.init_timeout),
        );
    }
    if p.init_instructions > c.init_instructions {
        return over(
            "init_instructions",
            p.init_instructions.to_string(),
            c.init_instructions.to_string(),
        );
    }
    if p.clones > c.clones {
        return over("clones", p.clones.to_string(), c.clones.to_string());
    }
    if p.show_errors && !c.show_errors {
        return over("show_errors", "true".into(), "false".into());
    }
    if p.modules && !c.modules {
        return over("modules", "true".into(), "false".into());
    }
    if p.persistent && !c.persistent {
        return over("persistent", "true".into(), "false".into());
    }
    if let Some(l) = p
        .libs
        .iter()
        .find(|l| !luafcgid_policy::lib_allows(&c.libs, l))
    {
        return Err(("libs", format!("`{l}` is not allowed by the ceiling")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        std::env::temp_dir()
    }

    fn overrides() -> Overrides {
        Overrides {
            docroot: vec![root()],
            ..Overrides::default()
        }
    }

    #[test]
    fn metrics_port_alone_is_on_loopback() {
        assert_eq!(metrics_addr(":9100"), Ok("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(
            metrics_addr("0.0.0.0:9100"),
            Ok("0.0.0.0:9100".parse().unwrap()),
            "an explicit address is the operator's choice"
        );
        assert_eq!(
            metrics_addr("[::1]:9100"),
            Ok("[::1]:9100".parse().unwrap())
        );
        assert!(metrics_addr("/run/metrics.sock")
            .unwrap_err()
            .contains("host:port"));
        assert!(metrics_addr(":x").unwrap_err().contains("bad port"));
        let raw = RawConfig::parse("metrics = \"/tmp/m.sock\"", Path::new("c.toml")).unwrap();
        let err = raw
            .validate("c.toml", &overrides())
            .unwrap_err()
            .to_string();
        assert!(err.contains("metrics"), "{err}");
        let o = Overrides {
            metrics: Some(":9100".into()),
            ..overrides()
        };
        let c = RawConfig::default().validate("c.toml", &o).unwrap();
        assert_eq!(c.metrics, Some("127.0.0.1:9100".parse().unwrap()));
    }

    #[test]
    fn listen_forms() {
        assert_eq!(
            ListenAddr::parse(":9000").unwrap(),
            ListenAddr::Tcp("0.0.0.0:9000".parse().unwrap())
        );
        assert_eq!(
            ListenAddr::parse("[::1]:9000").unwrap(),
            ListenAddr::Tcp("[::1]:9000".parse().unwrap())
        );
        assert_eq!(
            ListenAddr::parse("/run/x.sock").unwrap(),
            ListenAddr::Unix("/run/x.sock".into())
        );
        assert_eq!(
            ListenAddr::parse("./x.sock").unwrap(),
            ListenAddr::Unix("./x.sock".into())
        );
        assert!(ListenAddr::parse("nonsense").is_err());
        assert!(ListenAddr::parse(":99999").is_err());
    }

    #[test]
    fn defaults_table_sets_limits_and_flags_win() {
        let raw = RawConfig::parse(
            "workers = 3\nstates = 10\n[defaults]\ntimeout_ms = 200\ninstructions = 1000\nmemory = \"8MiB\"\nclones = 4\n",
            Path::new("t.toml"),
        )
        .unwrap();
        let o = Overrides {
            workers: Some(5),
            clones: Some(2),
            ..overrides()
        };
        let c = raw.validate("t.toml", &o).unwrap();
        assert_eq!(c.workers, 5);
        assert_eq!(c.states, 10);
        assert_eq!(c.defaults.timeout, Duration::from_millis(200));
        assert_eq!(c.defaults.instructions, 1000);
        assert_eq!(c.defaults.memory, 8 << 20);
        assert_eq!(c.defaults.clones, 2);
    }

    #[test]
    fn empty_listen_is_refused_unless_http_listens() {
        let raw = RawConfig::parse("listen = []", Path::new("c.toml")).unwrap();
        let err = raw
            .validate("c.toml", &overrides())
            .unwrap_err()
            .to_string();
        assert!(err.contains("`listen`"), "{err}");
        let raw = RawConfig::parse(
            "listen = []\nhttp = \"127.0.0.1:8080\"",
            Path::new("c.toml"),
        )
        .unwrap();
        let c = raw.validate("c.toml", &overrides()).unwrap();
        assert!(c.listen.is_empty() && c.http.is_some());
    }

    #[test]
    fn unknown_key_names_its_line() {
        let err = RawConfig::parse("workers = 2\nwrokers = 3\n", Path::new("c.toml")).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("c.toml:2:"), "{text}");
        assert!(text.contains("wrokers"), "{text}");
    }

    #[test]
    fn development_listener_is_loopback_unless_public() {
        let http = |text: &str, o: Overrides| {
            let raw = RawConfig::parse(text, Path::new("c.toml")).unwrap();
            raw.validate("c.toml", &o).map(|c| c.http)
        };
        let a = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        assert_eq!(
            http("http = \":8080\"", overrides()).unwrap(),
            a("127.0.0.1:8080")
        );
        assert_eq!(
            http("http = \"[::1]:81\"", overrides()).unwrap(),
            a("[::1]:81")
        );
        let e = http("http = \"0.0.0.0:8080\"", overrides()).unwrap_err();
        assert!(e.to_string().contains("not a loopback address"), "{e}");
        assert_eq!(
            http("http = \"0.0.0.0:8080\"\nhttp_public = true", overrides()).unwrap(),
            a("0.0.0.0:8080")
        );
        let forced = Overrides {
            http: Some("0.0.0.0:8081".into()),
            http_public: true,
            ..overrides()
        };
        assert_eq!(http("", forced).unwrap(), a("0.0.0.0:8081"));
        assert!(http("http = \"/tmp/x.sock\"", overrides()).is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        for bad in [
            "workers = 0",
            "socket_mode = \"999\"",
            "allow = [\"localhost\"]",
            "headers = [\"X-Bad\"]",
            "headers = [\"Bad Name: x\"]",
            "default_status = \"abc\"",
            "extensions = [\"lua\"]",
            "[defaults]\nclones = 0",
            "[ceiling]\ntimeout_ms = 100\n[defaults]\ntimeout_ms = 200",
        ] {
            let raw = RawConfig::parse(bad, Path::new("c.toml")).unwrap();
            assert!(raw.validate("c.toml", &overrides()).is_err(), "{bad}");
        }
        let raw = RawConfig::default();
        assert!(
            raw.validate("c", &Overrides::default()).is_err(),
            "no docroot"
        );
    }
}
