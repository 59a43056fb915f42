-- expect: ok
-- body: ABC
-- The string metatable is protected: scripts get a read-only stand-in.
function handler()
    local m = getmetatable("")
    pcall(function() m.__index = {upper = function() while true do end end} end)
    rawset(m, "__index", {upper = function() return "hijacked" end})
    return ("abc"):upper()
end
