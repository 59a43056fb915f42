-- expect: limit_cpu
-- pcall must re-raise once the budget is spent.
function handler()
    while true do
        pcall(function() while true do end end)
    end
end
