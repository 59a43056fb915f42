-- expect: limit_memory
-- A caught "not enough memory" still ends the request.
function handler()
    local hoard = {}
    while true do
        pcall(function() hoard[#hoard + 1] = string.rep("y", 1 << 20) .. #hoard end)
    end
end
