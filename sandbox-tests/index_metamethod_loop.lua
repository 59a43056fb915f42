-- expect: limit_cpu
local trap = setmetatable({}, { __index = function() while true do end end })
function handler()
    while true do pcall(function() return trap.x end) end
end
