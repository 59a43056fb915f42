-- acme's front page: reads a policy variable and a module from the tenant's tree.
local greet = require("lib.greet")

function handler(r)
	r:content_type("text/plain")
	return greet(r:config("greeting") or "hello")
end
