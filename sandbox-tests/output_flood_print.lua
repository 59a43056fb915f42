-- expect: limit_output
function handler()
    while true do print("flood flood flood flood") end
end
