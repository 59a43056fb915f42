-- expect: ok
-- body: nil
function handler() return tostring(debug) end
