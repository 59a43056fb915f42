-- Query string and POST body parsing with the luafcgid helper module.
local luafcgid = require("luafcgid")

function handler(r)
  local q = luafcgid.parse(r.env.QUERY_STRING or "")
  local body = r:body()
  local form = body and luafcgid.parse(body) or {}
  local name = form.name or q.name or "stranger"
  r:content_type("text/plain; charset=utf-8")
  return "Hello, " .. name .. "\n" .. luafcgid.serialize({query = q, form = form}) .. "\n"
end
