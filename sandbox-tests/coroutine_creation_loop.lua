-- expect: limit_cpu
function handler()
    while true do coroutine.wrap(function() coroutine.yield() end)() end
end
