-- expect: ok
-- body: nil nil nil
function handler()
    return tostring(string.dump) .. " " .. tostring(("").dump) .. " " .. tostring(getmetatable("").__index.dump)
end
