-- expect: limit_cpu
-- The message handler of a hook error runs with hooks off; it must not run at all.
function handler()
    xpcall(function() while true do end end, function() while true do end end)
    return "escaped"
end
