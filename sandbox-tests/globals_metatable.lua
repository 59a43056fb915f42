-- expect: ok
-- body: nil nil
-- A metatable on _G cannot resurrect removed globals.
setmetatable(_G, { __index = function(_, k) return rawget(_G, "x" .. k) end })
function handler() return tostring(io) .. " " .. tostring(debug) end
