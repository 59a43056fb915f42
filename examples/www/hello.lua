-- The smallest script: the chunk runs once per state, handler once per request.
s = "Hello World"
function handler() return s end
