-- expect: script_error
-- Each nested coroutine.wrap call nests a resume in C: Lua's C-stack limit stops it.
local function f() return coroutine.wrap(f)() end
function handler() return f() end
