//! The `luafcgid` binary: parses the command line, validates the configuration before any
//! socket is bound (exit 64 when it is bad), then runs the server until SIGTERM or SIGINT;
//! SIGHUP reloads the configuration, SIGUSR1 reopens the audit log file.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use luafcgid::cli::{
    Cli, Command, PolicyCheckArgs, PolicyCommand, PolicyExplainArgs, Roots, RunArgs, ServeArgs,
    EXIT_USAGE,
};
use luafcgid::config::Overrides;
use luafcgid::config::RawConfig;
use luafcgid::server::{Live, Server};
use luafcgid::system::Identity;
use luafcgid_policy::{PolicyTree, Problem};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::signal::unix::Signal;

/// jemalloc, for the Lua states above all (mlua allocates them through the global
/// allocator): states are built and dropped all the time when scripts outnumber `states`,
/// and with glibc's allocator the daemon's RSS kept climbing with them. See
/// docs/performance.md ("Many scripts, fewer states") for the measurements.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LUAFCGID_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Run(args) => run_script(args),
        Command::Policy(PolicyCommand::Check(args)) => policy_check(args),
        Command::Policy(PolicyCommand::Explain(args)) => policy_explain(args),
    }
}

/// The policy tree of a validated config (document roots made real).
fn policy_tree(config: &luafcgid::config::Config) -> PolicyTree {
    let roots = config
        .docroots
        .iter()
        .map(|r| std::fs::canonicalize(r).unwrap_or_else(|_| r.clone()))
        .collect();
    PolicyTree::new(config.operator_policy(), roots)
}

/// Every problem of the policy files under the tree's roots (or under `dir`).
fn policy_problems(tree: &PolicyTree, dir: Option<&std::path::Path>) -> Vec<Problem> {
    match dir {
        Some(d) => tree.check(d),
        None => tree.roots().iter().flat_map(|r| tree.check(r)).collect(),
    }
}

/// The policy tree the tools work on: the config of `roots`, its document roots or the
/// `--docroot` flags, else `fallback_root`.
fn roots_tree(roots: &Roots, fallback_root: Option<&PathBuf>) -> Result<PolicyTree, ExitCode> {
    let mut docroot = roots.docroot.clone();
    if docroot.is_empty() && roots.config.is_none() {
        docroot.extend(fallback_root.cloned());
    }
    let overrides = Overrides {
        docroot,
        ..Overrides::default()
    };
    let (config, _) = load_config(roots.config.as_ref(), &overrides)?;
    Ok(policy_tree(&config))
}

/// Prints each problem as `file:line: message`.
fn print_problems(problems: &[Problem]) {
    for p in problems {
        println!("{p}");
    }
}

fn policy_check(args: PolicyCheckArgs) -> ExitCode {
    // Without any document root, the directory checked is the root.
    let tree = match roots_tree(&args.roots, args.dir.as_ref()) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let problems = policy_problems(&tree, args.dir.as_deref());
    print_problems(&problems);
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("{} problem(s)", problems.len());
        ExitCode::from(1)
    }
}

fn policy_explain(args: PolicyExplainArgs) -> ExitCode {
    match roots_tree(&args.roots, None) {
        Ok(tree) => {
            print!("{}", tree.explain(&args.script));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// Reads and validates the config file (if any) with `overrides`: the config and where it
/// came from, or the problem.
fn read_config(
    file: Option<&PathBuf>,
    overrides: &luafcgid::config::Overrides,
) -> Result<(luafcgid::config::Config, String), String> {
    let (raw, origin) = match file {
        Some(path) => match RawConfig::read(path) {
            Ok(r) => (r, path.display().to_string()),
            Err(e) => return Err(e.to_string()),
        },
        None => (RawConfig::default(), "command line".to_string()),
    };
    raw.validate(&origin, overrides)
        .map(|c| (c, origin))
        .map_err(|e| e.to_string())
}

/// [`read_config`], printing the problem and giving the exit code on failure.
fn load_config(
    file: Option<&PathBuf>,
    overrides: &luafcgid::config::Overrides,
) -> Result<(luafcgid::config::Config, String), ExitCode> {
    read_config(file, overrides).map_err(|e| {
        eprintln!("luafcgid: {e}");
        ExitCode::from(EXIT_USAGE as u8)
    })
}

fn run_script(args: RunArgs) -> ExitCode {
    let usage = |message: String| {
        eprintln!("luafcgid run: {message}");
        ExitCode::from(EXIT_USAGE as u8)
    };
    let headers = match args.headers() {
        Ok(h) => h,
        Err(e) => return usage(e),
    };
    let body = match &args.body {
        Some(path) => match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => return usage(format!("--body {}: {e}", path.display())),
        },
        None => Vec::new(),
    };
    let (config, _) = match load_config(args.roots.config.as_ref(), &args.overrides()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let req = luafcgid::oneshot::OneRequest {
        script: args.script.clone(),
        method: args.method.clone(),
        query: args.query.clone(),
        body,
        headers,
    };
    match luafcgid::oneshot::run_one(config, &req) {
        Ok(reply) => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&reply.cgi).and_then(|()| out.flush());
            eprintln!("outcome: {}", reply.outcome.as_str());
            if reply.outcome == luafcgid::outcome::Outcome::Ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("luafcgid run: {e}");
            ExitCode::from(1)
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let (config, origin) = match load_config(args.config.as_ref(), &args.overrides()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Checked before anything is bound, as the rest of the config.
    let identity = match Identity::lookup(config.user.as_deref(), config.group.as_deref()) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("luafcgid: {origin}: user/group: {e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    if args.check {
        let problems = policy_problems(&policy_tree(&config), None);
        print_problems(&problems);
        if !problems.is_empty() {
            eprintln!("{origin}: ok; {} policy problem(s)", problems.len());
            return ExitCode::from(1);
        }
        println!("{origin}: ok");
        return ExitCode::SUCCESS;
    }
    if config.workers == 1 {
        tracing::warn!(
            "workers = 1: one tenant's long requests hold the only worker and every other \
             tenant waits (two or more keep tenants apart)"
        );
    }
    // Taken before any thread starts (the variables are removed from the environment).
    let inherited = match luafcgid::system::inherited_listeners() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("luafcgid: socket activation: {e}");
            return ExitCode::from(1);
        }
    };
    let file = args.config.clone();
    let overrides = args.overrides();
    let reread = move || {
        read_config(file.as_ref(), &overrides).map_err(|e| {
            let origin = file
                .as_ref()
                .map_or("command line".into(), |f| f.display().to_string());
            (origin, e)
        })
    };
    let start = Start {
        config,
        identity,
        inherited,
    };
    match run(start, reread) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("luafcgid: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// What a reload reads (the config file again, with the same command-line flags): the config and where it came from, or where and what the problem is.
type Reread =
    dyn Fn() -> Result<(luafcgid::config::Config, String), (String, String)> + Send + Sync;

/// What the daemon starts with.
struct Start {
    config: luafcgid::config::Config,
    /// Who to run as once the sockets are bound.
    identity: Option<Identity>,
    /// Listening sockets from the service manager, in place of `listen`.
    inherited: Vec<luafcgid::system::Inherited>,
}

fn run(
    start: Start,
    reread: impl Fn() -> Result<(luafcgid::config::Config, String), (String, String)>
        + Send
        + Sync
        + 'static,
) -> anyhow::Result<()> {
    // Before any thread starts, so that every thread inherits it (the watchdog, the driver
    // watch and the audit writer leave it again).
    if start.config.sched == luafcgid::config::Sched::Batch {
        if let Err(e) = luafcgid_sandbox::set_batch_scheduling() {
            tracing::warn!("sched = \"batch\": {e}; the threads keep the normal policy");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(luafcgid::server::runtime_threads(start.config.workers))
        .thread_stack_size(luafcgid::server::THREAD_STACK)
        .thread_name("luafcgid")
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        // Before binding: once the sockets exist, no signal the daemon handles may take its
        // default action (SIGTERM right after start must drain and remove the sockets;
        // SIGHUP's default would end the daemon).
        use tokio::signal::unix::{signal, SignalKind};
        let usr1 = signal(SignalKind::user_defined1());
        let hup = signal(SignalKind::hangup());
        let shutdown = shutdown_signal();
        let limits = luafcgid::server::process_limits();
        let server = Server::bind_with(start.config, start.inherited)
            .await?
            .with_process_limits(limits);
        for a in server.local_addrs() {
            tracing::info!("FastCGI on {a}");
        }
        if let Some(identity) = &start.identity {
            for socket in server.created_sockets() {
                identity
                    .own(&socket)
                    .with_context(|| format!("giving {} to {}", socket.display(), identity.user))?;
            }
            identity.assume().map_err(anyhow::Error::msg)?;
            tracing::info!(
                "running as user {} (uid {}, gid {})",
                identity.user,
                identity.uid,
                identity.gid
            );
        }
        luafcgid::system::notify("READY=1");
        if let Some(h) = server.http_addr() {
            tracing::info!("HTTP (development) on http://{h}/");
        }
        if let Some(m) = server.metrics_addr() {
            tracing::info!("metrics on http://{m}/metrics");
        }
        tokio::spawn(reopen_log_on_sigusr1(usr1, server.live()));
        tokio::spawn(reload_on_sighup(hup, server.live(), Arc::new(reread)));
        server.run(shutdown).await?;
        Ok(())
    })
}

/// SIGUSR1 (logrotate's `postrotate`): the audit log file is reopened by name.
async fn reopen_log_on_sigusr1(usr1: std::io::Result<Signal>, live: Arc<Live>) {
    let mut usr1 = match usr1 {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot handle SIGUSR1 ({e}): the audit log cannot be reopened");
            return;
        }
    };
    while usr1.recv().await.is_some() {
        live.current().audit.reopen();
    }
}

/// SIGHUP: the config file is read and validated again; if it is good, the daemon switches
/// to it (policies and scripts load anew) without dropping a request; if not, the running
/// configuration stays and the problem is logged.
async fn reload_on_sighup(hup: std::io::Result<Signal>, live: Arc<Live>, reread: Arc<Reread>) {
    let mut hup = match hup {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot handle SIGHUP ({e}): the configuration cannot be reloaded");
            return;
        }
    };
    while hup.recv().await.is_some() {
        let live = live.clone();
        let reread = reread.clone();
        luafcgid::system::notify("RELOADING=1");
        let _ = tokio::task::spawn_blocking(move || match reread() {
            Ok((config, origin)) => {
                if live.reload(config, &origin).is_ok() {
                    tracing::info!("configuration reloaded from {origin}");
                }
            }
            Err((origin, message)) => live.reject(&origin, &message),
        })
        .await;
        luafcgid::system::notify("READY=1");
    }
}

/// Registers the SIGTERM and SIGINT handlers now (not when first polled) and returns the
/// future that completes when either arrives.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        luafcgid::system::notify("STOPPING=1");
        tracing::info!("shutting down");
    }
}
