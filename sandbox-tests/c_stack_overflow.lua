-- expect: script_error
-- Recursion through a metamethod nests C calls: Lua stops it at its C-stack limit.
local t = setmetatable({}, {})
getmetatable(t).__index = function(self, k) return self[k .. "x"] end
function handler() return t.a end
