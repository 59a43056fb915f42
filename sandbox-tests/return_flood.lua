-- expect: limit_output
function handler() return string.rep("r", 2 * 1024 * 1024) end
