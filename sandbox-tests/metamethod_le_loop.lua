-- expect: limit_cpu
-- A looping __le metamethod runs under the hook like any Lua code.
function handler()
    local mt = {__le = function() while true do end end}
    local a, b = setmetatable({}, mt), setmetatable({}, mt)
    return tostring(a <= b)
end
