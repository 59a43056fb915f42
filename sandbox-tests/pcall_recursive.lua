-- expect: limit_cpu
local function f() return pcall(f) end
function handler() while true do f() end end
