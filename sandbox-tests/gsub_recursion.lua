-- expect: script_error
-- Recursion through string.gsub callbacks nests C calls: Lua's C-stack limit stops it.
local function f(s) return (s:gsub(".", f)) end
function handler() return f("aa") end
