-- expect: limit_cpu
-- gsub of %b() over a 1 MB run of '(': every start position scans to the end (quadratic,
-- hours in C Lua) inside one C call.
-- Under the corpus' 10M-instruction budget the matcher's steps (charged as instructions)
-- run out before the 1 s time limit; with no instruction budget the time limit ends it
-- (crates/luafcgid-sandbox/tests/it/pattern.rs, also a 10 MB gsub with a function).
function handler()
    local s = ("("):rep(1024 * 1024)
    return (s:gsub("%b()", ""))
end
