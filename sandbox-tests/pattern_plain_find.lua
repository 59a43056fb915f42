-- expect: limit_cpu
-- Plain find of a 100k needle that almost matches everywhere in a 1M subject: O(n*m) in
-- one C call.
-- Under the corpus' 10M-instruction budget the matcher's steps (charged as instructions)
-- run out before the 1 s time limit; with no instruction budget the time limit ends it
-- (crates/luafcgid-sandbox/tests/it/pattern.rs).
function handler()
    local s, needle = ("a"):rep(1000000), ("a"):rep(100000) .. "b"
    while true do
        s:find(needle, 1, true)
    end
end
