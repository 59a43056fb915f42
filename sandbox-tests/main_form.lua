-- expect: ok
-- body: GET /corpus?x=1 1
function main(env, con)
    con:write(env.REQUEST_METHOD, " ", env.REQUEST_URI, " ", env.LUAFCGID_VERSION)
end
