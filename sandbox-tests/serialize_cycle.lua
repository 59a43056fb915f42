-- expect: script_error
local luafcgid = require("luafcgid")
function handler()
    local t = {}
    t.self = t
    return luafcgid.serialize(t)
end
