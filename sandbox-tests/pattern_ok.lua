-- expect: ok
-- body: key=value;1,5,hello-hello;3
-- Ordinary matching keeps Lua 5.4's results.
function handler()
    local k, v = ("key = value"):match("(%w+)%s*=%s*(%w+)")
    local i, j = string.find("hello", "l+")
    local g = ("hello"):gsub("%w+", "%0-%0")
    local n = 0
    for _ in string.gmatch("a,b,c", "[^,]+") do n = n + 1 end
    return k .. "=" .. v .. ";" .. i - 2 .. "," .. j + 1 .. "," .. g .. ";" .. n
end
