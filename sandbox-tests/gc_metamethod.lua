-- expect: script_error
-- A __gc finalizer runs with hooks off (during any allocation, and when the state closes):
-- setmetatable refuses a metatable with __gc.
function handler()
    setmetatable({}, {__gc = function() while true do end end})
    for i = 1, 1e5 do local garbage = {i} end
    return "escaped"
end
