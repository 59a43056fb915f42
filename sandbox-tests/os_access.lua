-- expect: ok
-- body: nil nil nil nil nil nil nil
function handler()
    local out = {}
    for _, name in ipairs({ "execute", "exit", "getenv", "remove", "rename", "tmpname", "setlocale" }) do
        out[#out + 1] = tostring(os[name])
    end
    return table.concat(out, " ")
end
