-- expect: limit_output
-- serialize of a table too large for the output limit fails, checking the deadline while it sorts.
function handler()
    local t = {}
    for i = 1, 1e5 do t["k" .. i] = i end
    return require("luafcgid").serialize(t)
end
