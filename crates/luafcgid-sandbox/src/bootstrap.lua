-- Runs once in every new state, before any script code, to finish the restricted
-- environment. Receives Rust functions:
--   check(ok, err)  raises if the run was stopped (limit or abort); if `ok` is false or nil
--                   and `err` is Lua's out-of-memory error, records the memory limit and
--                   raises; otherwise returns nothing
--   emit(...)       appends its string arguments, tab separated, and a newline to the
--                   current response (discards them outside a request)
--   G               the state's globals table (load's default environment)
-- The originals of the wrapped functions survive only as upvalues here; scripts have no
-- debug library to reach them.
local check, emit, G = ...

local type, select, error, tostring = type, select, error, tostring
local opcall, oxpcall, oload, ocollect = pcall, xpcall, load, collectgarbage

-- Passes a protected call's results through, unless the run was stopped meanwhile: then the
-- stop is raised again, so no protected call can swallow a limit.
local function after(ok, ...)
	check(ok, (...))
	return ok, ...
end

local function pass(...)
	check(true)
	return ...
end

pcall = function(f, ...)
	return after(opcall(f, ...))
end

xpcall = function(f, handler, ...)
	if type(handler) ~= "function" then
		error("bad argument #2 to 'xpcall' (function expected, got " .. type(handler) .. ")", 2)
	end
	-- Lua runs a message handler with hooks off when the error came from a hook, so the
	-- handler must not run at all once the run is stopped.
	return after(oxpcall(f, function(...)
		check(true)
		return handler(...)
	end, ...))
end

-- Text only; the state's globals unless an environment is given; a reader function's errors
-- (which load would turn into a return value) still stop the run after a limit.
load = function(chunk, name, mode, env)
	local t = type(chunk)
	if t ~= "string" and t ~= "function" then
		error("bad argument #1 to 'load' (string or function expected, got " .. t .. ")", 2)
	end
	if env == nil then
		env = G
	end
	return after(oload(chunk, name, "t", env))
end
loadstring = load

if coroutine then
	local co = coroutine
	local oresume, owrap, oclose = co.resume, co.wrap, co.close
	co.resume = function(c, ...)
		return after(oresume(c, ...))
	end
	co.wrap = function(f)
		local w = owrap(f)
		return function(...)
			return pass(w(...))
		end
	end
	if oclose then
		co.close = function(c)
			return after(oclose(c))
		end
	end
end

local function strings(n, v, ...)
	if n > 0 then
		return tostring(v), strings(n - 1, ...)
	end
end

print = function(...)
	emit(strings(select("#", ...), ...))
end

collectgarbage = function(opt)
	if opt == "count" then
		return ocollect("count")
	end
	return 0
end

warn = function() end

if table then
	unpack = table.unpack
end
if string then
	string.dump = nil
end

dofile = nil
loadfile = nil
require = nil
