-- Relative require: loads demo/lib/words.lua from this script's directory.
local words = require("lib.words")

function handler(r)
  r:content_type("text/plain")
  return words.greet(r.env.QUERY_STRING ~= "" and r.env.QUERY_STRING or "world") .. "\n"
end
