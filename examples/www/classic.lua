-- The original luafcgid 1.x form: main(env, con).
function main(env, con)
  con:header("X-Script", "classic")
  con:puts("<h1>luafcgid ", env.LUAFCGID_VERSION, "</h1>\n")
  con:puts("<p>method: ", env.REQUEST_METHOD or "?", "</p>\n")
end
