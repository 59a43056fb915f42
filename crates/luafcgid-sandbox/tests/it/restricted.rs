//! The restricted environment: what is absent, what is replaced, what is kept.

use std::sync::atomic::AtomicBool;

use luafcgid_sandbox::ScriptState;

use crate::support::*;

fn eval(expr: &str) -> String {
    let mut s = load(format!("function handler() return tostring({expr}) end"));
    body(request(&mut s.state))
}

#[test]
fn unsafe_functions_are_absent() {
    for expr in [
        "io",
        "debug",
        "package",
        "dofile",
        "loadfile",
        "os.execute",
        "os.exit",
        "os.getenv",
        "os.remove",
        "os.rename",
        "os.tmpname",
        "os.setlocale",
        "string.dump",
        "('').dump",
        "getmetatable('').__index.dump",
        "_G.io",
        "_ENV.debug",
        "rawget(_G, 'package')",
        "module",
        "setfenv",
        "getfenv",
        "newproxy",
        "gcinfo",
        "jit",
    ] {
        assert_eq!(eval(expr), "nil", "{expr}");
    }
}

#[test]
fn safe_functions_are_present() {
    for expr in [
        "string.format",
        "string.rep",
        "string.find",
        "table.concat",
        "table.unpack",
        "math.floor",
        "utf8.char",
        "coroutine.wrap",
        "os.time",
        "os.clock",
        "os.date",
        "os.difftime",
        "pcall",
        "xpcall",
        "load",
        "loadstring",
        "unpack",
        "select",
        "setmetatable",
        "require",
        "print",
        "collectgarbage",
    ] {
        assert_ne!(eval(expr), "nil", "{expr}");
    }
    assert_eq!(eval("unpack == table.unpack"), "true");
    assert_eq!(eval("loadstring == load"), "true");
    assert_eq!(eval("os.date('%Y', 0)"), "1970");
}

#[test]
fn exact_globals() {
    let mut s = load(
        r#"
        function handler()
            local names = {}
            for k in pairs(_G) do names[#names + 1] = k end
            for k in pairs(os) do names[#names + 1] = "os." .. k end
            table.sort(names)
            return table.concat(names, " ")
        end
        "#,
    );
    assert_eq!(
        body(request(&mut s.state)),
        "_G _VERSION assert collectgarbage coroutine error getmetatable handler ipairs load \
         loadstring math next os os.clock os.date os.difftime os.time pairs pcall print rawequal \
         rawget rawlen rawset require select setmetatable string table tonumber tostring type \
         unpack utf8 warn xpcall"
    );
}

#[test]
fn collectgarbage_only_counts() {
    assert_eq!(eval("collectgarbage('collect')"), "0");
    assert_eq!(eval("collectgarbage()"), "0");
    assert_eq!(eval("collectgarbage('stop')"), "0");
    assert_eq!(eval("collectgarbage('generational')"), "0");
    assert_eq!(eval("math.type(collectgarbage('count'))"), "float");
    assert_eq!(eval("collectgarbage('count') > 1"), "true");
}

#[test]
fn load_is_text_only() {
    // A bytecode string (whatever the mode asked for).
    assert_eq!(
        eval("select(2, load('\\27Lua\\84\\0'))"),
        "attempt to load a binary chunk (mode is 't')"
    );
    assert_eq!(
        eval("select(2, load('\\27Lua', 'x', 'b'))"),
        "attempt to load a binary chunk (mode is 't')"
    );
    assert_eq!(eval("load('return 1 + 1')()"), "2");
    assert_eq!(eval("loadstring('return 40 + 2')()"), "42");
    // Reader functions work.
    assert_eq!(
        eval("load((function() local done = false return function() if done then return nil end done = true return 'return 7' end end)())()"),
        "7"
    );
    // Not a string or function.
    let mut s = load("function handler() load(42) end");
    let message = script_error(request(&mut s.state));
    assert!(message.contains("string or function expected"), "{message}");
}

#[test]
fn load_environment() {
    // Default: the state's globals.
    assert_eq!(
        eval("(function() x = 5 return load('return x')() end)()"),
        "5"
    );
    // An explicit environment.
    assert_eq!(eval("load('return x', 'c', 't', {x = 'mine'})()"), "mine");
    assert_eq!(eval("load('return io', 'c', 't', {})()"), "nil");
    // Explicit nil: still the globals (never an unusable nil _ENV).
    assert_eq!(
        eval("(function() y = 6 return load('return y', 'c', 't', nil)() end)()"),
        "6"
    );
}

#[test]
fn load_syntax_error_is_returned() {
    assert_eq!(
        eval("select(2, load('return +', '=chunk'))"),
        "chunk:1: unexpected symbol near '+'"
    );
}

#[test]
fn warn_is_harmless() {
    assert_eq!(
        eval("(function() warn('@on') warn('x') return 'ok' end)()"),
        "ok"
    );
}

#[test]
fn string_methods_work() {
    assert_eq!(eval("('abc'):upper()"), "ABC");
    assert_eq!(eval("('%d'):format(5)"), "5");
}

#[test]
fn pcall_and_coroutines_still_work_normally() {
    assert_eq!(eval("select(2, pcall(error, 'e', 0))"), "e");
    assert_eq!(
        eval("select('#', pcall(function() return 1, 2, nil end))"),
        "4"
    );
    assert_eq!(
        eval("select(2, xpcall(error, function(m) return 'handled ' .. m end, 'm', 0))"),
        "handled m"
    );
    assert_eq!(
        eval("(function() local co = coroutine.wrap(function(a) local b = coroutine.yield(a + 1) return b * 2 end) return co(1) + co(10) end)()"),
        "22"
    );
    assert_eq!(
        eval("select(2, coroutine.resume(coroutine.create(function() return 'r' end)))"),
        "r"
    );
    // Yield across pcall inside a coroutine.
    assert_eq!(
        eval("(function() local co = coroutine.wrap(function() pcall(coroutine.yield, 'y') return 'done' end) return co() .. co() end)()"),
        "ydone"
    );
    assert_eq!(eval("coroutine.close(coroutine.create(print))"), "true");
    assert_eq!(eval("pcall()"), "false");
}

#[test]
fn xpcall_requires_a_function_handler() {
    let mut s = load("function handler() xpcall(print, nil) end");
    let message = script_error(request(&mut s.state));
    assert!(message.contains("bad argument #2 to 'xpcall'"), "{message}");
}

#[test]
fn print_formats_like_lua() {
    let mut s = load("function handler() print('a', 1, nil, true, 2.5) print() print(setmetatable({}, {__tostring = function() return 'T' end})) end");
    assert_eq!(body(request(&mut s.state)), "a\t1\tnil\ttrue\t2.5\n\nT\n");
}

/// Loads `src` with the allow-list `libs` and returns the handler's body.
fn with_libs(libs: &[&str], src: &str) -> String {
    let dir = TempDir::new();
    let script = dir.write("app/script.lua", src);
    let mut opts = options(&dir, &script);
    opts.libs = libs.iter().map(|s| s.to_string()).collect();
    let mut state = ScriptState::load(&opts, &AtomicBool::new(false))
        .unwrap_or_else(|e| panic!("{libs:?}: load failed: {e}"));
    body(request(&mut state))
}

const SURFACE: &str = "function handler()
  local out = {}
  for _, lib in ipairs({'string', 'table', 'math', 'utf8', 'coroutine', 'os'}) do
    local t = _G[lib]
    if type(t) == 'table' then
      local names = {}
      for k in pairs(t) do names[#names + 1] = k end
      table.sort(names)
      out[#out + 1] = lib .. '=' .. table.concat(names, ',')
    end
  end
  out[#out + 1] = 'unpack=' .. tostring(unpack ~= nil)
  out[#out + 1] = 'strmeta=' .. tostring(pcall(function() return ('x'):upper() end))
  return table.concat(out, ' ')
end";

#[test]
fn allow_list_narrows_libraries_and_functions() {
    // `table` is needed by the probe itself; everything else is narrowed.
    let seen = with_libs(&["table", "string.format", "os.date"], SURFACE);
    assert_eq!(
        seen,
        "string=format table=concat,insert,move,pack,remove,sort,unpack os=date unpack=true strmeta=false"
    );
    // `os` as a whole still means only the four safe functions.
    let seen = with_libs(&["table", "os"], SURFACE);
    assert!(seen.contains("os=clock,date,difftime,time "), "{seen}");
    // Without `table.unpack`, the 5.1 name goes too.
    let seen = with_libs(&["table.concat", "table.sort", "math"], SURFACE);
    assert!(seen.starts_with("table=concat,sort math="), "{seen}");
    assert!(seen.contains("unpack=false"), "{seen}");
    assert!(!seen.contains("string="), "{seen}");
}

#[test]
fn an_empty_allow_list_leaves_the_base_functions() {
    let seen = with_libs(
        &[],
        "function handler()
           local libs = {}
           for _, lib in ipairs({'string', 'table', 'math', 'utf8', 'coroutine', 'os', 'unpack'}) do
             if _G[lib] ~= nil then libs[#libs + 1] = lib end
           end
           local ok = pcall(function() return ('x'):upper() end)
           return tostring(#libs) .. ' ' .. tostring(ok) .. ' ' .. tostring(pcall(error, 'e'))
             .. ' ' .. type(load('return 1'))
         end",
    );
    assert_eq!(seen, "0 false false function");
}

#[test]
fn unknown_names_in_the_allow_list_open_nothing() {
    let seen = with_libs(
        &[
            "table",
            "io",
            "debug",
            "os.exit",
            "os.execute",
            "package",
            "string.dump",
            "_G",
        ],
        SURFACE,
    );
    assert!(!seen.contains("os="), "{seen}");
    assert!(!seen.contains("string="), "{seen}");
}
