-- expect: ok
-- body: 0 0 0 number
function handler()
    return collectgarbage("collect") .. " " .. collectgarbage("stop") .. " " .. collectgarbage()
        .. " " .. type(collectgarbage("count"))
end
