-- expect: limit_cpu
-- The same backtracking match, under pcall in a loop: the limit is not catchable.
-- Under the corpus' 10M-instruction budget the matcher's steps (charged as instructions)
-- run out before the 1 s time limit; with no instruction budget the time limit ends it
-- (crates/luafcgid-sandbox/tests/it/pattern.rs).
function handler()
    while true do
        pcall(string.match, ("a"):rep(50), "(.-)(.-)(.-)(.-)(.-)(.-)(.-)b")
    end
end
