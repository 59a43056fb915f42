-- expect: script_error
function handler( return end
