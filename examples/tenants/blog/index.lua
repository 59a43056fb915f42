-- blog's front page: a fresh state per request (persistent = false), so the counter
-- never goes past 1.
count = (count or 0) + 1

function handler(r)
	r:content_type("text/plain")
	return "blog, request " .. count .. " of this state, " .. os.date("!%Y-%m-%d") .. "\n"
end
