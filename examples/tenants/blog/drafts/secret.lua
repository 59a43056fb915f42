-- Never runs: drafts/policy.toml says deny = true.
function handler()
	return "draft"
end
