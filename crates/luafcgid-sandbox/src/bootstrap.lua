-- Runs once in every new state, before any script code, to finish the restricted
-- environment. Receives Rust functions:
--   check(ok, err)  raises if the run was stopped (limit or abort); if `ok` is false or nil
--                   and `err` is Lua's out-of-memory error, records the memory limit and
--                   raises; otherwise returns nothing
--   emit(...)       appends its string arguments, tab separated, and a newline to the
--                   current response (discards them outside a request)
--   G               the state's globals table (load's default environment)
--   step()          raises if the run was stopped or its deadline has passed; called between
--                   the slices of work the wrappers below split long C calls into
--   rep(s, n, sep)  string.rep for long results (strings, n > 1): refuses one larger than the
--                   memory limit at once and builds the rest in slices with deadline checks
-- The originals of the wrapped functions survive only as upvalues here; scripts have no
-- debug library to reach them.
local check, emit, G, step, rep = ...

local type, select, error, tostring, tonumber = type, select, error, tostring, tonumber
local rawget, getmetatable, osetmetatable = rawget, getmetatable, setmetatable
local opcall, oload, ocollect = pcall, load, collectgarbage
local maxinteger = math and math.maxinteger or 0x7fffffffffffffff
local tointeger = math and math.tointeger
	or function(n)
		if n % 1 == 0 and n >= -0x1p63 and n < 0x1p63 then
			return n | 0
		end
	end

-- The integer a C function's luaL_checkinteger would read from `x`, or nil.
local function int(x)
	local n = tonumber(x)
	if n then
		return tointeger(n)
	end
end

-- How many elements the table wrappers hand to one C call; a step check runs between two.
local CHUNK = 4096

-- Longest string.rep result left to Lua's own C function.
local REP_DIRECT = 1 << 20

-- Passes a protected call's results through, unless the run was stopped meanwhile: then the
-- stop is raised again, so no protected call can swallow a limit.
local function after(ok, ...)
	check(ok, (...))
	return ok, ...
end

pcall = function(f, ...)
	return after(opcall(f, ...))
end

-- Lua runs a message handler inside the error, with hooks off when the error came from the
-- hook, so the handler never runs there: `f` runs under pcall, and only an ordinary error
-- (the run not stopped) calls the handler, afterwards, in normal context with hooks on. As
-- with Lua's xpcall, the result is false and the handler's first result; an error in the
-- handler gives false and that error.
local function handled(ok, ...)
	check(ok, (...))
	return false, (...)
end

local function xpcalled(handler, ok, ...)
	check(ok, (...))
	if ok then
		return true, ...
	end
	return handled(opcall(handler, (...)))
end

xpcall = function(f, handler, ...)
	if type(handler) ~= "function" then
		error("bad argument #2 to 'xpcall' (function expected, got " .. type(handler) .. ")", 2)
	end
	return xpcalled(handler, opcall(f, ...))
end

-- Lua runs __gc finalizers with hooks off (during any allocation, and at close), so no table
-- may get one. Lua marks a table for finalization only when its metatable has a raw __gc
-- field at setmetatable time; adding __gc to the metatable later has no effect.
-- __close handlers must not exist either: when the hook stops a run, the error path closes
-- the frame's to-be-closed variables with hooks off, so a looping __close would run forever.
-- A value gets closed (by `<close>` or a generic for's fourth value) only through its
-- metatable's __close, looked up when it is closed; so every table used as a metatable is
-- sealed against later __gc/__close fields: a guard metatable refuses them on assignment
-- and `rawset` refuses them too.
local orawset, oxpairs = rawset, pairs
local sealed = osetmetatable({}, { __mode = "k" })
local function forbidden(k)
	return k == "__gc" or k == "__close"
end
local function seal(mt)
	if sealed[mt] then
		return
	end
	local inner = getmetatable(mt)
	local guard = { __metatable = false }
	if inner ~= nil then
		if type(inner) ~= "table" then
			error("cannot use a table with a protected metatable as a metatable", 3)
		end
		-- The metatable has a metatable of its own (an inheritance chain, say): keep its
		-- fields, and refuse the forbidden ones before its own __newindex sees them.
		for k, v in oxpairs(inner) do
			guard[k] = v
		end
		local next_newindex = inner.__newindex
		guard.__newindex = function(t, k, v)
			if forbidden(k) then
				error(k .. " metamethods are not allowed", 2)
			end
			if type(next_newindex) == "function" then
				return next_newindex(t, k, v)
			elseif next_newindex ~= nil then
				next_newindex[k] = v
			else
				orawset(t, k, v)
			end
		end
		guard.__metatable = false
	else
		guard.__newindex = function(t, k, v)
			if forbidden(k) then
				error(k .. " metamethods are not allowed", 2)
			end
			orawset(t, k, v)
		end
	end
	osetmetatable(mt, guard)
	sealed[mt] = true
end
setmetatable = function(t, mt)
	if type(mt) == "table" then
		if rawget(mt, "__gc") ~= nil then
			error("__gc metamethods are not allowed", 2)
		end
		if rawget(mt, "__close") ~= nil then
			error("__close metamethods are not allowed", 2)
		end
		seal(mt)
	end
	return osetmetatable(t, mt)
end
rawset = function(t, k, v)
	if sealed[t] and forbidden(k) then
		error(k .. " metamethods are not allowed", 2)
	end
	return orawset(t, k, v)
end

-- The parser is one C call: a long source is fed to it in slices, with a step check between
-- two (and between two calls of a reader function).
local LOAD_SLICE = 1 << 16
local ssub = string and string.sub

local function sliced(reader)
	local buf, pos = nil, 1
	return function()
		step()
		if buf then
			if pos <= #buf then
				local s = ssub(buf, pos, pos + LOAD_SLICE - 1)
				pos = pos + LOAD_SLICE
				return s
			end
			buf = nil
		end
		local piece = reader()
		if ssub and type(piece) == "string" and #piece > LOAD_SLICE then
			buf, pos = piece, LOAD_SLICE + 1
			return ssub(piece, 1, LOAD_SLICE)
		end
		return piece
	end
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
	if t == "string" then
		if ssub and #chunk > LOAD_SLICE then
			local whole = chunk
			if name == nil then
				name = chunk
			end
			chunk = sliced(function()
				local s = whole
				whole = nil
				return s
			end)
		end
	else
		chunk = sliced(chunk)
	end
	return after(oload(chunk, name, "t", env))
end
loadstring = load

if coroutine then
	local co = coroutine
	local oresume, ocreate, ostatus, oclose = co.resume, co.create, co.status, co.close
	co.resume = function(c, ...)
		return after(oresume(c, ...))
	end
	-- A coroutine killed by the hook keeps hooks off for good, and closing it runs its
	-- pending __close handlers in it: so it is never closed once the run is stopped. Lua's own
	-- wrap closes a dead coroutine before raising its error; this one checks first.
	local function wrapped(c, ok, ...)
		if ok then
			check(true)
			return ...
		end
		local err = ...
		check(false, err)
		if ostatus(c) == "dead" then
			local cok, cerr = oclose(c)
			check(cok, cerr)
			if not cok then
				err = cerr
			end
		end
		if type(err) == "string" then
			error(err, 2)
		end
		error(err, 0)
	end
	co.wrap = function(f)
		if type(f) ~= "function" then
			error("bad argument #1 to 'wrap' (function expected, got " .. type(f) .. ")", 2)
		end
		local c = ocreate(f)
		return function(...)
			return wrapped(c, oresume(c, ...))
		end
	end
	co.close = function(c)
		check(true)
		return after(oclose(c))
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
	local tbl = table
	local omove, oinsert, oremove, osort = tbl.move, tbl.insert, tbl.remove, tbl.sort

	-- table.move runs one C loop over the whole range, with no element needing to exist:
	-- long ranges go in chunks, in the order (forward or backward) Lua would use.
	tbl.move = function(a1, f, e, t, a2)
		local nf, ne, nt = int(f), int(e), int(t)
		if
			not (nf and ne and nt)
			or ne - nf < CHUNK -- also a difference that wraps around: Lua raises
			or (nf <= 0 and ne >= maxinteger + nf)
			or nt > maxinteger - (ne - nf)
		then
			return omove(a1, f, e, t, a2)
		end
		local n = ne - nf
		if nt > nf and nt <= ne and (a2 == nil or a2 == a1) then
			local i = n
			while i >= 0 do
				local lo = i - CHUNK + 1
				if lo < 0 then
					lo = 0
				end
				step()
				omove(a1, nf + lo, nf + i, nt + lo, a2)
				i = lo - 1
			end
		else
			local i = 0
			while i <= n do
				local hi = i + CHUNK - 1
				if hi > n then
					hi = n
				end
				step()
				omove(a1, nf + i, nf + hi, nt + i, a2)
				i = hi + 1
			end
		end
		if a2 == nil then
			return a1
		end
		return a2
	end

	-- table.insert and table.remove shift every element after the position in one C loop;
	-- with a __len metamethod the length is whatever the script says. Long shifts run here,
	-- in Lua, under the hook.
	tbl.insert = function(t, ...)
		if select("#", ...) ~= 2 or type(t) ~= "table" then
			return oinsert(t, ...)
		end
		local pos, v = ...
		local p, e = int(pos), int(#t)
		if not (p and e) or e == maxinteger or p < 1 or p > e + 1 or e + 1 - p < CHUNK then
			return oinsert(t, pos, v)
		end
		for i = e + 1, p + 1, -1 do
			t[i] = t[i - 1]
		end
		t[p] = v
	end

	tbl.remove = function(t, ...)
		if type(t) ~= "table" then
			return oremove(t, ...)
		end
		local size = int(#t)
		local pos = ...
		local p = size
		if pos ~= nil then
			p = int(pos)
		end
		if not (size and p) or p < 1 or p > size or size - p < CHUNK then
			return oremove(t, ...)
		end
		local v = t[p]
		for i = p, size - 1 do
			t[i] = t[i + 1]
		end
		t[size] = nil
		return v
	end

	-- table.sort of a long array (or one whose __len says so) is one long C call: above
	-- SORT_FAST elements, a heapsort in Lua, in place, under the hook. A plain array (its
	-- length is its raw length) goes to C up to SORT_FAST_PLAIN elements, a few tens of
	-- milliseconds of C at most; comparators and metamethods run under the hook either way.
	local SORT_FAST = 1 << 14
	local SORT_FAST_PLAIN = 1 << 18
	local orawlen = rawlen
	local function less(a, b)
		return a < b
	end
	local function sift(t, lt, root, last)
		while true do
			local child = root * 2
			if child > last then
				return
			end
			local top = root
			if lt(t[top], t[child]) then
				top = child
			end
			if child < last and lt(t[top], t[child + 1]) then
				top = child + 1
			end
			if top == root then
				return
			end
			t[root], t[top] = t[top], t[root]
			root = top
		end
	end
	tbl.sort = function(t, lt)
		if type(t) ~= "table" or (lt ~= nil and type(lt) ~= "function") then
			return osort(t, lt)
		end
		local n = int(#t)
		if not n or n <= SORT_FAST or n >= 0x7fffffff then
			return osort(t, lt)
		end
		if n <= SORT_FAST_PLAIN and orawlen(t) == n and getmetatable(t) == nil then
			return osort(t, lt)
		end
		lt = lt or less
		for i = n // 2, 1, -1 do
			sift(t, lt, i, n)
		end
		for last = n, 2, -1 do
			t[1], t[last] = t[last], t[1]
			sift(t, lt, 1, last - 1)
		end
	end
end
if string then
	local str = string
	str.dump = nil
	-- string.rep of an empty string and separator loops `n` times copying nothing; a long
	-- result is one C call that copies the pieces one by one (60 MiB of "x": over 100 ms).
	local orep = str.rep
	str.rep = function(s, n, sep)
		local k = int(n)
		if k and k > 1 then
			local ts, tsep = type(s), type(sep)
			if
				(ts == "string" or ts == "number")
				and (sep == nil or tsep == "string" or tsep == "number")
			then
				local ls, lsep = #tostring(s), (sep == nil and 0 or #tostring(sep))
				if ls + lsep == 0 then
					return ""
				end
				if (ls + lsep) * 1.0 * k > REP_DIRECT then
					return rep(tostring(s), k, sep ~= nil and tostring(sep) or "")
				end
			end
		end
		return orep(s, n, sep)
	end
	-- The string metatable is the state's own, but scripts see a stand-in: they can neither
	-- change the real one's __index nor give it other fields.
	local smt = getmetatable("")
	if smt then
		smt.__metatable = osetmetatable({}, {
			__index = { __index = str },
			__newindex = function()
				error("the string metatable is read-only", 2)
			end,
			__metatable = false,
		})
	end
end
if os and os.date then
	-- os.date runs strftime once per conversion of its format, in one C call.
	local odate = os.date
	os.date = function(format, ...)
		if type(format) == "string" and #format > 1024 then
			error("bad argument #1 to 'date' (format longer than 1024 bytes)", 2)
		end
		return odate(format, ...)
	end
end

dofile = nil
loadfile = nil
require = nil
