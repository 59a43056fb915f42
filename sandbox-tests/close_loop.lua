-- expect: script_error
-- A looping __close handler would run with hooks off if a limit stopped its block (the error
-- path closes to-be-closed variables inside the hook), so __close metamethods are refused.
function handler()
    do
        local x <close> = setmetatable({}, {__close = function() while true do end end})
    end
    return "escaped"
end
