-- expect: limit_cpu
function handler() while true do end end
