-- expect: ok
-- body: nil nil nil
function handler()
    return tostring(package) .. " " .. tostring(dofile) .. " " .. tostring(loadfile)
end
