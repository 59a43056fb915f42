-- expect: limit_cpu
-- table.insert shifts up to #t elements in one C loop; __len makes #t anything. Long shifts
-- run in Lua, under the hook.
function handler()
    table.insert(setmetatable({}, {__len = function() return 1e15 end}), 1, "x")
    return "escaped"
end
