-- expect: limit_cpu
-- One string.find call whose backtracking takes hours in C Lua (2.4 s at 40 characters,
-- exponential beyond): the metered matcher stops it at the time limit.
-- Under the corpus' 10M-instruction budget the matcher's steps (charged as instructions)
-- run out before the 1 s time limit; with no instruction budget the time limit ends it
-- (crates/luafcgid-sandbox/tests/it/pattern.rs).
function handler()
    return string.find(("a"):rep(1000), ".-.-.-.-.-.-.-b")
end
