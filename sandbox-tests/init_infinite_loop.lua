-- expect: limit_cpu
-- The chunk's first run has limits too.
while true do end
function handler() return "unreachable" end
