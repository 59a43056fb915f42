-- expect: limit_cpu
function handler()
    while true do
        pcall(string.gsub, "aaaa", "a", function() while true do end end)
    end
end
