-- expect: limit_time
-- Few instructions, each a slow C call: the wall clock ends it.
function handler()
    while true do
        local s = string.rep("x", 1000000)
        s = s:upper()
    end
end
