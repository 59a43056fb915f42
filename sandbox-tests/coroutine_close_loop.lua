-- expect: limit_cpu
-- A __close handler that errors after the limit; close must not report it as a value.
function handler()
    while true do
        local co = coroutine.create(function()
            local guard <close> = setmetatable({}, { __close = function() while true do end end })
            coroutine.yield()
        end)
        coroutine.resume(co)
        coroutine.close(co)
    end
end
