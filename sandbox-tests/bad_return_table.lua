-- expect: script_error
function handler()
    return setmetatable({}, { __tostring = function() return "never" end })
end
