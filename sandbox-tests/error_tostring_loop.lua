-- expect: limit_cpu
function handler()
    error(setmetatable({}, { __tostring = function() while true do end end }))
end
