-- expect: limit_cpu
-- table.sort of 2^31 slots with an always-true C comparator would loop in C for a minute;
-- long sorts run as a heapsort in Lua, under the hook.
function handler()
    table.sort(setmetatable({}, {__len = function() return 2^31 - 2 end}), rawequal)
    return "escaped"
end
