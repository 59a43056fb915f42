-- expect: limit_memory
-- Deep Lua recursion grows the Lua stack until the memory limit (16 MiB here) stops it,
-- before Lua's own one-million-slot stack limit.
local function f(n) return 1 + f(n + 1) end
function handler() return f(1) end
