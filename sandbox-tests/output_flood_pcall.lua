-- expect: limit_output
function handler(r)
    local chunk = string.rep("o", 65536)
    while true do pcall(r.puts, r, chunk) end
end
