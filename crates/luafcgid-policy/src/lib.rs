//! Policies for luafcgid: what a script may use and how much, per directory.
//!
//! The policy fields (`timeout_ms`, `instructions`, `memory`, `libs`, `[rate]`, `[vars]`,
//! ...) are parsed into a raw, serde-checked [`PolicyFields`] and folded over a [`Policy`]
//! whose values are all concrete and validated ([`Policy::apply`]); sizes and durations take
//! units (`"64MiB"`, `"250ms"`). On top of that:
//!
//! - [`PolicyFile`]: one `policy.toml`, parsed with the line of every key, so that each
//!   [`Problem`] reads `file:line: message` and names the key.
//! - [`Ceiling`]: the most a policy may grant, field by field; checks, narrows, clamps.
//! - [`OperatorPolicy`]: the daemon config's `[defaults]` and `[ceiling]`, checked together.
//! - [`PolicyTree`]: resolves a script to its [`Effective`] policy (defaults, then every
//!   `policy.toml` from the document root down, then the per-script table), cached per
//!   directory; reloads changed files ([`PolicyTree::sweep`]); checks a subtree
//!   ([`PolicyTree::check`]); explains a script's policy ([`PolicyTree::explain`]).
//!
//! It knows nothing of Lua or FastCGI: the daemon turns a [`Policy`] into sandbox limits
//! and rate limiters, and logs what [`PolicyTree::sweep`] reports. Only [`PolicyTree`]
//! touches the file system, and only to stat and read `policy.toml` files and, for
//! `check`, to list directories.
//!
//! # Use in the daemon
//!
//! - Config validation: [`OperatorPolicy::from_config`] on the config's text (problems with
//!   lines; exit 64), or [`OperatorPolicy::new`] with values already validated
//!   ([`Ceiling::permits`] checks defaults against a ceiling).
//! - Start: one [`PolicyTree::new`], shared (`Arc`) by the request path and a sweeper.
//! - Per request: [`PolicyTree::resolve`] with the script's real path.
//!   [`Resolution::Allowed`]: run under `effective.policy`, and tag the states created with
//!   `effective.generation`; a state whose generation differs from the one the script
//!   resolves to now is retired. [`Resolution::Denied`]: 403 `forbidden`.
//!   [`Resolution::Invalid`]: 500 `policy_error` (the problem goes to the audit log).
//!   [`Resolution::Outside`]: 403. The audit `policy` field is `effective.files`, `tenant`
//!   is `effective.tenant`.
//! - Every `sweep_ms`, from a background thread: [`PolicyTree::sweep`]; log `policy_loaded`
//!   for [`SweepReport::loaded`] and [`SweepReport::changed`], `policy_rejected` for each
//!   of [`SweepReport::rejected`] (file, line, message).
//! - `luafcgid policy check`: print [`PolicyTree::check`]'s problems, exit 1 if any;
//!   `luafcgid policy explain`: print [`PolicyTree::explain`].
//!
//! ```
//! use std::path::Path;
//! use luafcgid_policy::{OperatorPolicy, PolicyTree, Resolution};
//!
//! let root = std::env::temp_dir().join(format!("luafcgid-policy-doc-{}", std::process::id()));
//! std::fs::create_dir_all(root.join("acme"))?;
//! std::fs::write(
//!     root.join("acme/policy.toml"),
//!     "timeout_ms = 250\n[script.\"report.lua\"]\ntimeout_ms = \"2s\"\n",
//! )?;
//!
//! let config = "workers = 2\n[defaults]\nmemory = \"32MiB\"\n[ceiling]\ntimeout_ms = \"5s\"\n";
//! let operator = OperatorPolicy::from_config(Path::new("luafcgid.toml"), config)
//!     .expect("a valid config");
//! let tree = PolicyTree::new(operator, vec![root.clone()]);
//! let acme = tree.roots()[0].join("acme");
//!
//! let Resolution::Allowed(e) = tree.resolve(&acme.join("index.lua")) else { panic!() };
//! assert_eq!(e.policy.timeout.as_millis(), 250);
//! assert_eq!(e.policy.memory, 32 << 20);
//! assert_eq!((e.tenant.as_str(), e.files.as_slice()), ("acme", &[Path::new("acme/policy.toml").to_path_buf()][..]));
//! let Resolution::Allowed(r) = tree.resolve(&acme.join("report.lua")) else { panic!() };
//! assert_eq!(r.policy.timeout.as_secs(), 2);
//!
//! // What the daemon's sweeper does every `sweep_ms`: first loads are reported too.
//! let report = tree.sweep();
//! assert_eq!(report.loaded, [acme.join("policy.toml")]);
//! println!("{}", tree.explain(&acme.join("report.lua")));
//! std::fs::remove_dir_all(&root)?;
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # Choices
//!
//! - A `policy.toml` that is a symbolic link is refused (a problem for its subtree), wherever
//!   it points; so are non-regular files and files over [`MAX_POLICY_FILE_SIZE`]. Problems
//!   name keys and say what is wrong, never quote the file.
//! - A `[script."name.lua"]` table is bound by the ceiling its file inherits, like the rest
//!   of the file; the file's own `[ceiling]` binds its subdirectories only, so a tenant
//!   cannot exempt one of its own scripts from what it grants below.
//! - An inherited value above a directory's ceiling is lowered to that ceiling (explain says
//!   `ceiling set by ...`); a value a file sets above its ceiling is an error.
//! - Scripts directly in a document root belong to tenant `""` (the operator's), with the
//!   document root as tenant root, unless the root's `policy.toml` names a tenant.
//! - `deny = true` is sticky: nothing below can reopen the subtree.
//! - Files are read when a script below them is first resolved; "invalid at first load"
//!   means at that moment. A file whose every version is refused (invalid, or above a
//!   lowered ancestor ceiling) makes its subtree answer `policy_error`.
#![forbid(unsafe_code)]

mod ceiling;
mod explain;
mod field;
mod file;
mod operator;
mod problem;
mod read;
mod tree;
mod units;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

pub use ceiling::{Ceiling, Violation};
pub use field::{Field, Provenance, SetBy, Source};
pub use file::PolicyFile;
pub use operator::OperatorPolicy;
pub use problem::Problem;
pub use read::MAX_POLICY_FILE_SIZE;
pub use tree::{
    Effective, PolicyTree, Resolution, SweepReport, MAX_CHECK_DEPTH, MAX_CHECK_DIRS,
    MAX_PENDING_EVENTS, POLICY_FILE,
};
pub use units::{
    format_duration, format_size, parse_duration, parse_rate, parse_size, Rate, UnitError,
};

use problem::shown_key;

/// Why a policy value was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PolicyError {
    /// A value has the right type but an impossible magnitude or form.
    #[error("`{key}`: {message}")]
    Invalid {
        /// The field name.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// A size field: a byte count or a string with a unit (`"64MiB"`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum SizeValue {
    /// Plain bytes.
    Bytes(u64),
    /// A string with a unit: B, KiB, MiB, GiB (also KB, MB, GB as powers of 1000).
    Text(String),
}

/// A duration field: integer milliseconds or a string with a unit (`"250ms"`, `"2s"`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum DurationValue {
    /// Plain milliseconds.
    Millis(u64),
    /// A string with a unit: ms, s, min, h.
    Text(String),
}

/// The `[rate]` table as written.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateFields {
    /// Per client key.
    pub per_client: Option<String>,
    /// Per script.
    pub per_script: Option<String>,
    /// Per tenant.
    pub per_tenant: Option<String>,
    /// Burst size.
    pub burst: Option<u32>,
}

/// Policy fields exactly as written in a file; every field optional.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyFields {
    pub tenant: Option<String>,
    pub timeout_ms: Option<DurationValue>,
    pub instructions: Option<u64>,
    pub memory: Option<SizeValue>,
    pub output: Option<SizeValue>,
    pub body: Option<SizeValue>,
    pub init_timeout_ms: Option<DurationValue>,
    pub init_instructions: Option<u64>,
    pub clones: Option<u32>,
    pub persistent: Option<bool>,
    pub state_max_requests: Option<u64>,
    pub state_max_age: Option<DurationValue>,
    pub libs: Option<Vec<String>>,
    pub modules: Option<bool>,
    pub show_errors: Option<bool>,
    pub deny: Option<bool>,
    pub entry: Option<String>,
    pub rate: Option<RateFields>,
    pub vars: Option<BTreeMap<String, toml::Value>>,
    pub script: Option<BTreeMap<String, PolicyFields>>,
    pub ceiling: Option<Box<PolicyFields>>,
}

/// Rate limits of a policy, parsed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateLimits {
    pub per_client: Option<Rate>,
    pub per_script: Option<Rate>,
    pub per_tenant: Option<Rate>,
    pub burst: Option<u32>,
}

/// The library tables whose functions a policy may also allow one by one
/// (`"string.format"`). `os` is not among them: only the four functions in [`KNOWN_LIBS`].
pub const LIB_TABLES: &[&str] = &["string", "table", "math", "utf8", "coroutine"];

/// Whether `name` is something `libs` may list: a name of [`KNOWN_LIBS`], or one function
/// of a [`LIB_TABLES`] library (`"string.format"`). Functions the sandbox never provides
/// (`string.dump`) stay absent whatever the list says.
pub fn is_lib_name(name: &str) -> bool {
    if KNOWN_LIBS.contains(&name) {
        return true;
    }
    match name.split_once('.') {
        Some((table, function)) => {
            LIB_TABLES.contains(&table)
                && !function.is_empty()
                && function.len() <= 64
                && !function.starts_with(|c: char| c.is_ascii_digit())
                && function
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
        }
        None => false,
    }
}

/// Whether the allow-list `granted` covers `name`: listed itself, or its whole library is.
pub fn lib_allows(granted: &[String], name: &str) -> bool {
    granted.iter().any(|g| g == name)
        || name
            .split_once('.')
            .is_some_and(|(table, _)| granted.iter().any(|g| g == table))
}

/// The names both allow-lists cover: what a script may use under both.
pub fn lib_intersection(a: &[String], b: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in a
        .iter()
        .filter(|n| lib_allows(b, n))
        .chain(b.iter().filter(|n| lib_allows(a, n)))
    {
        if !out.contains(name) && !lib_allows(&out, name) {
            out.push(name.clone());
        }
    }
    // A whole library added after one of its functions covers it.
    let whole: Vec<String> = out.iter().filter(|n| !n.contains('.')).cloned().collect();
    out.retain(|n| {
        !n.split_once('.')
            .is_some_and(|(table, _)| whole.iter().any(|w| w == table))
    });
    out
}

/// The library names a policy may allow.
pub const KNOWN_LIBS: &[&str] = &[
    "string",
    "table",
    "math",
    "utf8",
    "coroutine",
    "os.time",
    "os.clock",
    "os.date",
    "os.difftime",
];

/// An effective policy: every value concrete and validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub tenant: Option<String>,
    pub timeout: Duration,
    pub instructions: u64,
    pub memory: u64,
    pub output: u64,
    pub body: u64,
    pub init_timeout: Duration,
    pub init_instructions: u64,
    pub clones: u32,
    pub persistent: bool,
    pub state_max_requests: u64,
    pub state_max_age: Duration,
    pub libs: Vec<String>,
    pub modules: bool,
    pub show_errors: bool,
    pub deny: bool,
    pub entry: Option<String>,
    pub rate: RateLimits,
    pub vars: Vec<(String, String)>,
}

impl Default for Policy {
    /// The built-in defaults, used where neither the config nor a policy file says otherwise.
    fn default() -> Self {
        Policy {
            tenant: None,
            timeout: Duration::from_millis(1000),
            instructions: 50_000_000,
            memory: 64 << 20,
            output: 8 << 20,
            body: 1 << 20,
            init_timeout: Duration::from_millis(1000),
            init_instructions: 50_000_000,
            clones: 2,
            persistent: true,
            state_max_requests: 0,
            state_max_age: Duration::ZERO,
            libs: KNOWN_LIBS.iter().map(|s| s.to_string()).collect(),
            modules: true,
            show_errors: false,
            deny: false,
            entry: None,
            rate: RateLimits::default(),
            vars: Vec::new(),
        }
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        key,
        message: message.into(),
    }
}

/// A value with a unit that could not be read. The message names the key and the reason,
/// never the text: policy files are untrusted and their problems are logged.
fn unreadable(key: &'static str, e: &UnitError) -> PolicyError {
    invalid(key, e.reason())
}

fn size(key: &'static str, v: &SizeValue) -> Result<u64, PolicyError> {
    match v {
        SizeValue::Bytes(n) => Ok(*n),
        SizeValue::Text(t) => parse_size(t).map_err(|e| unreadable(key, &e)),
    }
}

fn duration(key: &'static str, v: &DurationValue) -> Result<Duration, PolicyError> {
    match v {
        DurationValue::Millis(n) => Ok(Duration::from_millis(*n)),
        DurationValue::Text(t) => parse_duration(t).map_err(|e| unreadable(key, &e)),
    }
}

fn positive<T: PartialOrd + Default + Copy>(key: &'static str, v: T) -> Result<T, PolicyError> {
    if v > T::default() {
        Ok(v)
    } else {
        Err(invalid(key, "must be greater than zero"))
    }
}

impl Policy {
    /// Lays `fields` over this policy. Values are validated; nested `script` and `ceiling`
    /// tables are not applied here (the caller chooses when they apply).
    pub fn apply(&mut self, fields: &PolicyFields) -> Result<(), PolicyError> {
        let f = fields;
        if let Some(t) = &f.tenant {
            if t.is_empty() || t.len() > 64 || t.chars().any(|c| c.is_control()) {
                return Err(invalid("tenant", "must be 1 to 64 printable characters"));
            }
            self.tenant = Some(t.clone());
        }
        if let Some(v) = &f.timeout_ms {
            self.timeout = positive("timeout_ms", duration("timeout_ms", v)?)?;
        }
        if let Some(v) = f.instructions {
            self.instructions = positive("instructions", v)?;
        }
        if let Some(v) = &f.memory {
            let m = size("memory", v)?;
            if m < 256 << 10 {
                return Err(invalid("memory", "must be at least 256KiB"));
            }
            self.memory = m;
        }
        if let Some(v) = &f.output {
            self.output = positive("output", size("output", v)?)?;
        }
        if let Some(v) = &f.body {
            self.body = size("body", v)?;
        }
        if let Some(v) = &f.init_timeout_ms {
            self.init_timeout = positive("init_timeout_ms", duration("init_timeout_ms", v)?)?;
        }
        if let Some(v) = f.init_instructions {
            self.init_instructions = positive("init_instructions", v)?;
        }
        if let Some(v) = f.clones {
            if !(1..=1024).contains(&v) {
                return Err(invalid("clones", "must be between 1 and 1024"));
            }
            self.clones = v;
        }
        if let Some(v) = f.persistent {
            self.persistent = v;
        }
        if let Some(v) = f.state_max_requests {
            self.state_max_requests = v;
        }
        if let Some(v) = &f.state_max_age {
            self.state_max_age = duration("state_max_age", v)?;
        }
        if let Some(libs) = &f.libs {
            for (i, l) in libs.iter().enumerate() {
                if !is_lib_name(l) {
                    return Err(invalid(
                        "libs",
                        format!(
                            "entry {} is not a known library or library function (known: {}, \
                             or one function of {} such as \"string.format\")",
                            i + 1,
                            KNOWN_LIBS.join(", "),
                            LIB_TABLES.join(", ")
                        ),
                    ));
                }
            }
            self.libs = libs.clone();
        }
        if let Some(v) = f.modules {
            self.modules = v;
        }
        if let Some(v) = f.show_errors {
            self.show_errors = v;
        }
        if let Some(v) = f.deny {
            self.deny = v;
        }
        if let Some(e) = &f.entry {
            let ok = !e.is_empty()
                && e.len() <= 64
                && !e.starts_with(|c: char| c.is_ascii_digit())
                && e.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(invalid("entry", "must be a Lua identifier"));
            }
            self.entry = Some(e.clone());
        }
        if let Some(r) = &f.rate {
            let rate =
                |key: &'static str, v: &Option<String>| -> Result<Option<Rate>, PolicyError> {
                    v.as_deref()
                        .map(|s| parse_rate(s).map_err(|e| unreadable(key, &e)))
                        .transpose()
                };
            if let Some(v) = rate("rate.per_client", &r.per_client)? {
                self.rate.per_client = Some(v);
            }
            if let Some(v) = rate("rate.per_script", &r.per_script)? {
                self.rate.per_script = Some(v);
            }
            if let Some(v) = rate("rate.per_tenant", &r.per_tenant)? {
                self.rate.per_tenant = Some(v);
            }
            if let Some(b) = r.burst {
                self.rate.burst = Some(positive("rate.burst", b)?);
            }
        }
        if let Some(vars) = &f.vars {
            for (k, v) in vars {
                let text = match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Float(x) => x.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    _ => {
                        return Err(invalid(
                            "vars",
                            format!("`{}` must be a string, number or boolean", shown_key(k)),
                        ))
                    }
                };
                match self.vars.iter_mut().find(|(name, _)| name == k) {
                    Some(slot) => slot.1 = text,
                    None => self.vars.push((k.clone(), text)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(src: &str) -> PolicyFields {
        toml::from_str(src).unwrap()
    }

    #[test]
    fn applies_values_with_units() {
        let mut p = Policy::default();
        p.apply(&fields(
            "timeout_ms = \"250ms\"\nmemory = \"8MiB\"\nbody = 1024\nclones = 3\n[vars]\ngreeting = \"hi\"\nn = 4",
        ))
        .unwrap();
        assert_eq!(p.timeout, Duration::from_millis(250));
        assert_eq!(p.memory, 8 << 20);
        assert_eq!(p.body, 1024);
        assert_eq!(p.clones, 3);
        assert_eq!(
            p.vars,
            vec![("greeting".into(), "hi".into()), ("n".into(), "4".into())]
        );
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(toml::from_str::<PolicyFields>("timeout = 5").is_err());
        let mut p = Policy::default();
        assert!(p.apply(&fields("clones = 0")).is_err());
        assert!(p.apply(&fields("memory = \"12 parsecs\"")).is_err());
        assert!(p.apply(&fields("libs = [\"io\"]")).is_err());
        assert!(p.apply(&fields("entry = \"os.exit\"")).is_err());
        assert!(p.apply(&fields("timeout_ms = 0")).is_err());
        assert_eq!(p, Policy::default());
    }
}

#[cfg(test)]
mod presets {
    use super::*;

    #[test]
    fn shipped_presets_are_valid() {
        for (name, text) in [
            ("default", include_str!("../../../policies/default.toml")),
            ("strict", include_str!("../../../policies/strict.toml")),
            ("trusted", include_str!("../../../policies/trusted.toml")),
        ] {
            let fields: PolicyFields =
                toml::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut p = Policy::default();
            p.apply(&fields).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let mut p = Policy::default();
        p.apply(&toml::from_str(include_str!("../../../policies/default.toml")).unwrap())
            .unwrap();
        assert_eq!(
            p,
            Policy::default(),
            "default.toml writes out the built-in defaults"
        );
    }
}

#[cfg(test)]
mod lib_names {
    use super::*;

    fn list(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_functions_and_coverage() {
        for ok in [
            "string",
            "os.date",
            "string.format",
            "table.concat",
            "math.pi",
        ] {
            assert!(is_lib_name(ok), "{ok}");
        }
        for bad in [
            "io",
            "os",
            "os.exit",
            "debug.getinfo",
            "string.",
            "string.1x",
            "string.a-b",
            "",
        ] {
            assert!(!is_lib_name(bad), "{bad}");
        }
        let granted = list(&["string", "os.date"]);
        assert!(lib_allows(&granted, "string.format"));
        assert!(lib_allows(&granted, "os.date"));
        assert!(!lib_allows(&granted, "os.time"));
        assert!(!lib_allows(&granted, "table.concat"));
        assert!(!lib_allows(&list(&["string.format"]), "string"));
    }

    #[test]
    fn intersection_keeps_what_both_cover() {
        let i = lib_intersection(
            &list(&["string", "table"]),
            &list(&["string.format", "table", "math"]),
        );
        assert_eq!(i, list(&["table", "string.format"]));
        let i = lib_intersection(&list(&["string.rep"]), &list(&["string.format"]));
        assert!(i.is_empty());
        let mut p = Policy::default();
        p.apply(&toml::from_str("libs = [\"string.format\", \"math\"]").unwrap())
            .unwrap();
        assert_eq!(p.libs, list(&["string.format", "math"]));
        assert!(p
            .apply(&toml::from_str("libs = [\"os.exit\"]").unwrap())
            .is_err());
    }
}
