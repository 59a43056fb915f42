-- expect: limit_cpu
-- A looping __len metamethod runs under the hook like any Lua code.
function handler()
    local mt = {__len = function() while true do end end}
    local a, b = setmetatable({}, mt), setmetatable({}, mt)
    return tostring(#a)
end
