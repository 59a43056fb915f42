-- expect: limit_time
-- table.move over a billion slots is one C loop: the sandbox splits it into chunks with a
-- deadline check between two.
function handler()
    table.move({}, 1, 1e9, 1)
    return "escaped"
end
