-- expect: limit_time
-- The parser is one C call; a reader returning endless comment text is fed to it in slices
-- with a deadline check between two.
function handler()
    local s, first = ("x"):rep(4e6), true
    load(function()
        if first then first = false return "--[[" end
        return s
    end)
    return "escaped"
end
