-- expect: limit_cpu
-- load() turns a reader's error into a return value; not a limit.
function handler()
    while true do load(function() while true do end end) end
end
