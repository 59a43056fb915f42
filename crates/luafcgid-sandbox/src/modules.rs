//! `require`: the `luafcgid` helper module, and `.lua` modules from the tenant's tree.
//!
//! `require("a.b")` loads `a/b.lua` relative to the script's directory, then relative to the
//! tenant's root; the file's real path (after symlinks) must lie inside the root. Modules are
//! Lua source only, run in the state's globals under whatever limits the current run has
//! (the init limits while the chunk first runs, the request's limits otherwise), and are
//! cached per state in a private table (there is no `package.loaded`). Every file loaded is
//! reported through [`Ctx::new_files`](crate::request::Ctx) so the pool can rebuild the state
//! when it changes. Error messages name modules by their path relative to the root, never by
//! an absolute path.
//!
//! It does not load C modules, search `LUA_PATH`, or look outside the tenant's tree.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mlua::{Error, Lua, Table, Value};

use crate::request::with_ctx;

/// Longest module name accepted.
const MAX_MODULE_NAME: usize = 200;

/// Where modules of one state come from.
#[derive(Debug)]
pub(crate) struct ModuleSpace {
    /// Directory of the script (searched first).
    pub(crate) script_dir: PathBuf,
    /// The tenant's root (a real path; searched second; nothing outside it loads).
    pub(crate) root: PathBuf,
    /// Whether `.lua` modules may be loaded at all.
    pub(crate) enabled: bool,
    /// Names being loaded right now (to refuse `a` requiring `a` during its own load).
    loading: Mutex<Vec<String>>,
}

impl ModuleSpace {
    pub(crate) fn new(script_dir: PathBuf, root: PathBuf, enabled: bool) -> ModuleSpace {
        ModuleSpace {
            script_dir,
            root,
            enabled,
            loading: Mutex::new(Vec::new()),
        }
    }

    /// The real path of module `name`, or why there is none.
    pub(crate) fn resolve(&self, name: &str) -> Result<PathBuf, String> {
        let rel = module_file(name)?;
        for base in [&self.script_dir, &self.root] {
            let candidate = base.join(&rel);
            match std::fs::canonicalize(&candidate) {
                Ok(real) => {
                    if !real.starts_with(&self.root) {
                        return Err(format!(
                            "module '{name}' resolves outside the tenant's tree"
                        ));
                    }
                    if !real.is_file() {
                        return Err(format!("module '{name}' is not a regular file"));
                    }
                    return Ok(real);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("module '{name}': {}", e.kind())),
            }
        }
        Err(format!("module '{name}' not found"))
    }

    /// How `path` (inside the root) is named in chunk names and messages.
    fn display_name(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }
}

/// The relative file of module `name` (`a.b` → `a/b.lua`), after checking the name: only
/// `[A-Za-z0-9_.-]`, no empty segment (so no `..`, no leading or trailing dot).
pub(crate) fn module_file(name: &str) -> Result<PathBuf, String> {
    let valid_chars = name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if name.is_empty()
        || name.len() > MAX_MODULE_NAME
        || !valid_chars
        || name.split('.').any(str::is_empty)
    {
        return Err(format!(
            "invalid module name {:?} (use letters, digits, '_', '-' and '.' between names)",
            &name[..name.len().min(64)]
        ));
    }
    let mut path: PathBuf = name.split('.').collect();
    path.set_extension("lua");
    Ok(path)
}

/// Reads a Lua source file for loading: refuses bytecode, drops a UTF-8 BOM and blanks a
/// first line starting with `#` (as `lua` does), keeping line numbers.
pub(crate) fn source_text(mut src: Vec<u8>) -> Result<Vec<u8>, &'static str> {
    if src.starts_with(b"\xEF\xBB\xBF") {
        src.drain(..3);
    }
    let mut code_start = 0;
    if src.first() == Some(&b'#') {
        let end = src.iter().position(|&c| c == b'\n').unwrap_or(src.len());
        src.drain(..end);
        code_start = 1;
    }
    if src.get(code_start) == Some(&0x1b) {
        return Err("precompiled Lua bytecode is refused; only Lua source is loaded");
    }
    Ok(src)
}

/// Creates the global `require`.
pub(crate) fn install_require(lua: &Lua, space: ModuleSpace) -> mlua::Result<()> {
    let space = Arc::new(space);
    let cache = lua.create_table()?;
    let require = lua.create_function(move |lua, name: mlua::LuaString| {
        with_ctx(lua, |ctx| ctx.budget.check())?;
        let cached = cache.raw_get::<Value>(&name)?;
        if !cached.is_nil() {
            return Ok(cached);
        }
        let name = name
            .to_str()
            .map_err(|_| Error::runtime("require: invalid module name"))?
            .to_owned();
        if name == "luafcgid" {
            let m = Value::Table(crate::helpers::module(lua)?);
            cache.raw_set(name, &m)?;
            return Ok(m);
        }
        load_module(lua, &space, &cache, name)
    })?;
    lua.globals().raw_set("require", require)
}

fn load_module(lua: &Lua, space: &ModuleSpace, cache: &Table, name: String) -> mlua::Result<Value> {
    if !space.enabled {
        return Err(Error::runtime(format!(
            "module '{name}' not found (modules are disabled)"
        )));
    }
    let path = space.resolve(&name).map_err(Error::runtime)?;
    let shown = space.display_name(&path);
    let src = std::fs::read(&path)
        .map_err(|e| Error::runtime(format!("cannot read module '{shown}': {}", e.kind())))?;
    let src = source_text(src).map_err(|e| Error::runtime(format!("module '{shown}': {e}")))?;
    with_ctx(lua, |ctx| {
        if !ctx.new_files.contains(&path) {
            ctx.new_files.push(path.clone());
        }
        Ok(())
    })?;
    {
        let mut loading = space.loading.lock().unwrap_or_else(|e| e.into_inner());
        if loading.contains(&name) {
            return Err(Error::runtime(format!(
                "module '{name}' requires itself while loading"
            )));
        }
        loading.push(name.clone());
    }
    let result = lua
        .load(&src)
        .set_name(format!("@{shown}"))
        .set_mode(mlua::chunk::ChunkMode::Text)
        .into_function()
        .and_then(|f| f.call::<Value>((name.as_str(), shown.as_str())));
    space
        .loading
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|n| n != &name);
    let value = match result? {
        Value::Nil => Value::Boolean(true),
        v => v,
    };
    cache.raw_set(name, &value)?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(module_file("a.b").unwrap(), PathBuf::from("a/b.lua"));
        assert_eq!(
            module_file("lib-x_1").unwrap(),
            PathBuf::from("lib-x_1.lua")
        );
        for bad in [
            "",
            "..",
            "a..b",
            ".a",
            "a.",
            "/etc/passwd",
            "a/b",
            "a b",
            "é",
            "a\0",
        ] {
            assert!(module_file(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sources() {
        assert!(source_text(b"\x1bLua\x54\x00".to_vec()).is_err());
        assert!(source_text(b"#!/usr/bin/lua\n\x1bLua".to_vec()).is_err());
        assert_eq!(
            source_text(b"\xEF\xBB\xBF#!lua\nreturn 1".to_vec()).unwrap(),
            b"\nreturn 1".to_vec()
        );
    }
}
