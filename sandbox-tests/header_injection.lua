-- expect: script_error
function handler(r)
    r:header("X-Evil", "1\r\nSet-Cookie: session=stolen")
end
