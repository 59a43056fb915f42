//! Helpers shared by the integration tests: a temporary directory, script loading, requests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use luafcgid_sandbox::{
    Failure, LimitKind, Limits, OwnedRequest, Report, RequestInput, Response, ScriptState,
    StateOptions,
};

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("luafcgid-sandbox-it-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(std::fs::canonicalize(&dir).unwrap())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to `rel` (creating directories) and returns the full path.
    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn limits() -> Limits {
    Limits {
        instructions: 10_000_000,
        timeout: Duration::from_secs(2),
        output: 1 << 20,
    }
}

pub fn options(dir: &TempDir, script: &Path) -> StateOptions {
    StateOptions {
        script: script.to_path_buf(),
        chunk_name: script
            .strip_prefix(dir.path())
            .unwrap()
            .display()
            .to_string(),
        module_root: dir.path().to_path_buf(),
        modules: true,
        entry: None,
        memory: 16 << 20,
        libs: luafcgid_sandbox::default_libs(),
        init: limits(),
    }
}

/// A loaded script and the directory holding it.
pub struct Loaded {
    pub dir: TempDir,
    pub state: ScriptState,
}

pub fn try_load(src: impl AsRef<[u8]>) -> (TempDir, Result<ScriptState, Failure>) {
    let dir = TempDir::new();
    let script = dir.write("app/script.lua", src);
    let result = ScriptState::load(&options(&dir, &script), &AtomicBool::new(false));
    (dir, result)
}

pub fn load(src: impl AsRef<[u8]>) -> Loaded {
    let (dir, state) = try_load(src);
    Loaded {
        dir,
        state: state.unwrap_or_else(|e| panic!("load failed: {e}")),
    }
}

/// One request's input, owned.
#[derive(Default)]
pub struct Req {
    pub params: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
    pub vars: Vec<(String, String)>,
    pub abort: Arc<AtomicBool>,
}

impl Req {
    pub fn param(mut self, k: &str, v: &str) -> Req {
        self.params.push((k.into(), v.into()));
        self
    }
    pub fn body(mut self, b: &str) -> Req {
        self.body = b.into();
        self
    }
    pub fn var(mut self, k: &str, v: &str) -> Req {
        self.vars.push((k.into(), v.into()));
        self
    }
    pub fn run(&self, state: &mut ScriptState, limits: &Limits) -> Report {
        let input = RequestInput {
            data: Arc::new(OwnedRequest {
                params: self.params.clone(),
                body: self.body.clone(),
                vars: self.vars.clone(),
            }),
            abort: self.abort.clone(),
            client: None,
        };
        state.handle(&input, limits)
    }
}

/// Runs an empty request with the default test limits.
pub fn request(state: &mut ScriptState) -> Report {
    Req::default().run(state, &limits())
}

pub fn ok(report: Report) -> Response {
    match report.result {
        Ok(response) => response,
        Err(e) => panic!("request failed: {e}"),
    }
}

pub fn body(report: Report) -> String {
    String::from_utf8(ok(report).body).unwrap()
}

/// The message of a script error; panics on any other outcome.
pub fn script_error(report: Report) -> String {
    match report.result {
        Err(Failure::Script { message }) => message,
        Err(e) => panic!("expected a script error, got {e}"),
        Ok(r) => panic!(
            "expected a script error, got a response: {:?}",
            String::from_utf8_lossy(&r.body)
        ),
    }
}

/// Asserts that the request ended with `kind`.
pub fn expect_limit(report: Report, kind: LimitKind) {
    match report.result {
        Err(Failure::Limit { kind: k, .. }) if k == kind => {}
        Err(e) => panic!("expected the {kind} limit, got {e}"),
        Ok(r) => panic!(
            "expected the {kind} limit, got a response: {:?}",
            String::from_utf8_lossy(&r.body)
        ),
    }
}

/// Runs `f` on a thread with the 4 MiB stack the daemon's workers have.
pub fn on_worker_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(4 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}
