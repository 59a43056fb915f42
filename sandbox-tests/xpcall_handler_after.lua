-- expect: limit_time
-- The message handler of an ordinary error runs after the error, with hooks on; a loop in
-- it ends at the limit. (No instruction budget would stop it sooner: the loop is C-heavy.)
function handler()
    xpcall(error, function() while true do string.rep("x", 100000) end end)
    return "escaped"
end
