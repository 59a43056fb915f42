-- expect: limit_memory
big = {}
for i = 1, 1e9 do big[i] = "item" .. i end
function handler() end
