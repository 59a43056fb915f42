-- expect: ok
-- body: false nil
function handler()
    local ok = pcall(require, "socket.core")
    return tostring(ok) .. " " .. tostring(package)
end
