-- expect: ok
-- body: a+b%26c x y {1,2,a="b"}
local luafcgid = require("luafcgid")
function handler(r)
    local q = luafcgid.parse(r.env.QUERY_STRING .. "&y=x+y")
    return luafcgid.urlencode("a b&c") .. " " .. q.y .. " " .. luafcgid.serialize({ 1, 2, a = "b" })
end
