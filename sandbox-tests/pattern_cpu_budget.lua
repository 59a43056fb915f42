-- expect: limit_cpu
-- Few VM instructions, much matching: the matcher charges its steps as instructions.
function handler()
    local s = ("a"):rep(30)
    while true do
        s:find("a-a-a-a-a-b")
    end
end
