-- expect: ok
-- body: Hello World
function handler() return "Hello World" end
