// CPU-bound Lua workloads shared by the `sandbox_cost` example and
// `scripts/bench-vm-patch.sh` (which includes this file into a throwaway program).

/// Workloads: each defines `work()`, returning a value that depends on all its work.
pub const WORKLOADS: &[(&str, &str)] = &[
    (
        "fib(27), recursive",
        "local function fib(n) if n < 2 then return n end return fib(n - 1) + fib(n - 2) end
         function work() return fib(27) end",
    ),
    (
        "tight loop, 10M additions",
        "function work() local x = 0 for i = 1, 10000000 do x = x + i end return x end",
    ),
    (
        "string building, 200k pieces",
        "function work()
           local t = {}
           for i = 1, 200000 do t[#t + 1] = tostring(i) .. ',' end
           return #table.concat(t)
         end",
    ),
    (
        "table.sort, 200k numbers",
        "function work()
           local t, x = {}, 12345
           for i = 1, 200000 do x = (x * 1103515245 + 12345) % 2147483648 t[i] = x end
           table.sort(t)
           return t[1]
         end",
    ),
    (
        "JSON-like encoder, 20k records",
        "local function enc(v, out)
           local k = type(v)
           if k == 'table' then
             if #v > 0 then
               out[#out + 1] = '['
               for i = 1, #v do if i > 1 then out[#out + 1] = ',' end enc(v[i], out) end
               out[#out + 1] = ']'
             else
               out[#out + 1] = '{'
               local first = true
               for key, val in pairs(v) do
                 if not first then out[#out + 1] = ',' end
                 first = false
                 out[#out + 1] = string.format('%q', key) out[#out + 1] = ':'
                 enc(val, out)
               end
               out[#out + 1] = '}'
             end
           elseif k == 'string' then out[#out + 1] = string.format('%q', v)
           else out[#out + 1] = tostring(v) end
         end
         function work()
           local rows = {}
           for i = 1, 20000 do rows[i] = {id = i, name = 'user' .. i, tags = {'a', 'b', i}} end
           local out = {}
           enc(rows, out)
           return #table.concat(out)
         end",
    ),
];
