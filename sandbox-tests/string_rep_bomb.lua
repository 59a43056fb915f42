-- expect: limit_memory
function handler() return #string.rep("x", 1e9) end
