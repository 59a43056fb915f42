-- expect: script_error
-- __gc added to a metatable after setmetatable: Lua would never run it, and the sandbox
-- refuses the assignment outright (tables used as metatables are sealed against __gc).
ran = false
keep = {}
for i = 1, 100 do
    local mt = {}
    keep[i] = setmetatable({}, mt)
    mt.__gc = function() ran = true while true do end end
end
function handler()
    keep = nil
    for i = 1, 2e5 do local garbage = {i, tostring(i)} end
    return tostring(ran)
end
