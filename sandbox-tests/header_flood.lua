-- expect: limit_output
function handler(r)
    for i = 1, 1e7 do r:header("X-Flood-" .. i, string.rep("h", 100)) end
end
