local M = {}
function M.greet(who) return "greetings, " .. who end
return M
