-- expect: script_error
function handler() return string.format("%099999d", 1) end
