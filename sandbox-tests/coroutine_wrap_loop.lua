-- expect: limit_cpu
function handler()
    while true do
        pcall(coroutine.wrap(function() while true do end end))
    end
end
