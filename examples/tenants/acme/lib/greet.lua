-- A module of the acme tenant: require("lib.greet") from any acme script.
return function(text)
	return text .. "!\n"
end
