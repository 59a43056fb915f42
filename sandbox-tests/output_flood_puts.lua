-- expect: limit_output
function handler(r)
    local chunk = string.rep("o", 4096)
    while true do r:puts(chunk) end
end
