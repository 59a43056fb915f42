-- expect: limit_cpu
-- A looping __index metamethod runs under the hook like any Lua code.
function handler()
    local mt = {__index = function() while true do end end}
    local a, b = setmetatable({}, mt), setmetatable({}, mt)
    return tostring(a.x)
end
