-- expect: ok
-- body: nil attempt to load a binary chunk (mode is 't')
function handler()
    local f, err = load("\27Lua\84\0\25\147\r\n\26\n", "bc", "b")
    return tostring(f) .. " " .. err
end
