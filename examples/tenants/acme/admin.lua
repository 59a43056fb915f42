-- Runs under [script."admin.lua"] of acme/policy.toml: 200 ms, 2M instructions.
function handler(r)
	r:content_type("text/plain")
	local n = 0
	for i = 1, 100000 do
		n = n + i
	end
	return "sum " .. n .. "\n"
end
