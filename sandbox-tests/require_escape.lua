-- expect: ok
-- body: false false false false
function handler()
    local out = {}
    for _, name in ipairs({ "..", "../../etc/passwd", "/etc/passwd", "a..b" }) do
        out[#out + 1] = tostring((pcall(require, name)))
    end
    return table.concat(out, " ")
end
