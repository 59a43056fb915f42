-- expect: ok
-- body: nil nil nil
function handler()
    return tostring(io) .. " " .. tostring(rawget(_G, "io")) .. " " .. tostring(_ENV.io)
end
