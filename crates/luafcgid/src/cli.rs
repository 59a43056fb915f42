//! The command line: `luafcgid serve` and its flags (design section 5). Parsing only; the
//! values become a [`Config`](crate::config::Config) through
//! [`RawConfig::validate`](crate::config::RawConfig::validate).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Overrides;

/// Exit code for usage and configuration errors (sysexits' EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// A sandboxed, stateful FastCGI daemon for Lua 5.4.
#[derive(Debug, Parser)]
#[command(name = "luafcgid", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Signals, environment and exit codes of `serve`, shown after its options.
const SERVE_AFTER_HELP: &str = "\
Signals:
  SIGTERM, SIGINT  stop accepting, answer what was sent, drain (shutdown_timeout_ms), exit 0
  SIGHUP           reload the config file, policies and scripts; a bad file is refused
  SIGUSR1          reopen the audit log file (logrotate's postrotate)

Environment:
  LISTEN_PID, LISTEN_FDS  sockets from systemd socket activation, used instead of --listen
  NOTIFY_SOCKET           systemd readiness: READY=1, RELOADING=1, STOPPING=1
  LUAFCGID_LOG            the daemon's own diagnostics on stderr (error, warn, info, debug)

Exit codes: 0 stopped by a signal, 1 could not start (socket in use, log unwritable,
privilege drop failed), 64 bad command line or config.
More: docs/operations.md";

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve Lua scripts over FastCGI.
    #[command(after_help = SERVE_AFTER_HELP)]
    Serve(ServeArgs),
    /// Run one request through the same sandbox and policy; print the CGI response (stdout)
    /// and the outcome (stderr, after the request's audit line). Exit 0 when the outcome is
    /// `ok`, 1 otherwise.
    Run(RunArgs),
    /// Tools for policy authors: check policy files, explain a script's effective policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

/// `luafcgid policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate every policy.toml under the document roots (or under DIR); print each
    /// problem as `file:line: message`. Exit 0 when clean, 1 on any problem.
    Check(PolicyCheckArgs),
    /// Print a script's effective policy and, for each value, what set it.
    Explain(PolicyExplainArgs),
}

/// Where the tools that do not serve find the config and the scripts.
#[derive(Debug, Args)]
pub struct Roots {
    /// Daemon config file (TOML, or an original luafcgid config.lua): its `[defaults]` and `[ceiling]` start every policy chain.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Document root. Repeatable.
    #[arg(long, value_name = "DIR")]
    pub docroot: Vec<PathBuf>,
}

/// Flags of `luafcgid policy check`.
#[derive(Debug, Args)]
pub struct PolicyCheckArgs {
    #[command(flatten)]
    pub roots: Roots,
    /// Check only this directory (and what binds it from above).
    #[arg(value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Flags of `luafcgid policy explain`.
#[derive(Debug, Args)]
pub struct PolicyExplainArgs {
    #[command(flatten)]
    pub roots: Roots,
    /// The script.
    #[arg(value_name = "SCRIPT")]
    pub script: PathBuf,
}

/// Flags of `luafcgid run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub roots: Roots,
    /// The script file.
    #[arg(value_name = "SCRIPT")]
    pub script: PathBuf,
    /// Request method.
    #[arg(long, value_name = "M", default_value = "GET")]
    pub method: String,
    /// Query string (without `?`).
    #[arg(long, value_name = "Q", default_value = "")]
    pub query: String,
    /// File whose contents are the request body.
    #[arg(long, value_name = "FILE")]
    pub body: Option<PathBuf>,
    /// Request header `Name: value`. Repeatable.
    #[arg(long, value_name = "K:V")]
    pub header: Vec<String>,
    /// Audit log file (default: stderr).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
}

impl RunArgs {
    /// The flags as config overrides.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            docroot: self.roots.docroot.clone(),
            log: Some(
                self.log
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/dev/stderr")),
            ),
            ..Overrides::default()
        }
    }

    /// The headers as (name, value) pairs; an error names the first without a colon.
    pub fn headers(&self) -> Result<Vec<(String, String)>, String> {
        self.header
            .iter()
            .map(|h| match h.split_once(':') {
                Some((k, v)) if !k.trim().is_empty() => {
                    Ok((k.trim().to_string(), v.trim().to_string()))
                }
                _ => Err(format!("--header {h:?}: expected `Name: value`")),
            })
            .collect()
    }
}

/// Flags of `luafcgid serve`; they win over the config file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Daemon config file (TOML, or an original luafcgid config.lua).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Validate the config and exit.
    #[arg(long)]
    pub check: bool,
    /// FastCGI listener: `host:port`, `:port`, `[v6]:port`, or a unix socket path (has a `/`). Repeatable.
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Document root; scripts must lie inside one. Repeatable.
    #[arg(long, value_name = "DIR")]
    pub docroot: Vec<PathBuf>,
    /// Development HTTP listener (host:port; `:port` is 127.0.0.1), so a page shows without
    /// a web server. Loopback only, unless --http-public.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// Let --http listen on an address other than loopback.
    #[arg(long = "http-public")]
    pub http_public: bool,
    /// Lua worker threads (default: number of CPUs, at least 2).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// CPU scheduling of the daemon's threads: `batch` (default; a thread that wakes does
    /// not preempt the web server) or `normal`.
    #[arg(long, value_name = "POLICY")]
    pub sched: Option<String>,
    /// Most Lua states kept, all scripts together.
    #[arg(long, value_name = "N")]
    pub states: Option<usize>,
    /// Most states of one script at once.
    #[arg(long, value_name = "N")]
    pub clones: Option<u32>,
    /// How stale a changed script may be, in milliseconds.
    #[arg(long = "sweep-ms", value_name = "N")]
    pub sweep_ms: Option<u64>,
    /// Audit log file (JSON lines; default stdout), or `unix:PATH`: one datagram per line to
    /// a unix datagram socket.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// Metrics listener: /metrics (Prometheus text) and /healthz (host:port; :port is on
    /// loopback).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
}

impl ServeArgs {
    /// The flags as config overrides.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            docroot: self.docroot.clone(),
            http: self.http.clone(),
            http_public: self.http_public,
            workers: self.workers,
            sched: self.sched.clone(),
            states: self.states,
            clones: self.clones,
            sweep_ms: self.sweep_ms,
            log: self.log.clone(),
            metrics: self.metrics.clone(),
        }
    }
}
