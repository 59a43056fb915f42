-- The guest's script: runs under blog-guest's policy.
function handler(r)
	r:content_type("text/plain")
	return "hello from the guest corner\n"
end
