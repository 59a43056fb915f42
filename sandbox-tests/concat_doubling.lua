-- expect: limit_memory
function handler()
    local s = "x"
    while true do s = s .. s end
end
