//! The Rust pattern matcher behind `string.find`, `match`, `gmatch` and `gsub`: conformance
//! with Lua 5.4 (each case also runs against the C functions of a plain Lua state), error
//! messages, a differential fuzz against the C functions, and the limits stopping long
//! matches.

use std::time::{Duration, Instant};

use luafcgid_sandbox::{LimitKind, Limits, ScriptState};

use crate::support::*;

/// Helpers every case may use (mostly from Lua 5.4's test suite, `pm.lua`).
const PRELUDE: &str = r##"
local function checkerror(msg, f, ...)
  local ok, err = pcall(f, ...)
  assert(not ok, "no error")
  assert(type(err) == "string", "error is a " .. type(err))
  assert(err == msg, "got: " .. err)
end
-- C Lua names the function 'string.find' when called through pcall, 'find' when called
-- directly; the Rust functions always say 'find'.
local function checkargerror(msg, f, ...)
  local ok, err = pcall(f, ...)
  assert(not ok and type(err) == "string")
  err = string.gsub(err, "to 'string%.", "to '")
  assert(err == msg, "got: " .. err)
end
local function f(s, p)
  local i, e = string.find(s, p)
  if i then return string.sub(s, i, e) end
end
local function pack(...) return {n = select("#", ...), ...} end
local function same(t, ...)
  local u = pack(...)
  if t.n ~= u.n then return false end
  for i = 1, t.n do if t[i] ~= u[i] or math.type(t[i]) ~= math.type(u[i]) then return false end end
  return true
end
local function dog(s) return s .. "-" .. s end
"##;

/// One case per line group: Lua statements that raise on failure.
const CASES: &[&str] = &[
    // find: plain, positions, init
    r#"assert(string.find('', '') == 1)"#,
    r#"assert(string.find('alo', '') == 1)"#,
    r#"assert(string.find('a\0o a\0o a\0o', 'a', 1) == 1)"#,
    r#"assert(string.find('a\0o a\0o a\0o', 'a\0o', 2) == 5)"#,
    r#"assert(string.find('a\0o a\0o a\0o', 'a\0o', 9) == 9)"#,
    r#"assert(string.find('a\0a\0a\0a\0\0ab', '\0ab', 2) == 9)"#,
    r#"assert(string.find('a\0a\0a\0a\0\0ab', 'b') == 11)"#,
    r#"assert(string.find('a\0a\0a\0a\0\0ab', 'b\0') == nil)"#,
    r#"assert(string.find('', '\0') == nil)"#,
    r#"assert(string.find('alo123alo', '12') == 4)"#,
    r#"assert(string.find('alo123alo', '^12') == nil)"#,
    r#"assert(same(pack(string.find('hello world', 'o w')), 5, 7))"#,
    r#"assert(same(pack(string.find('hello', 'l', 1, true)), 3, 3))"#,
    r#"assert(same(pack(string.find('a.b', '.', 1, true)), 2, 2))"#,
    r#"assert(same(pack(string.find('a+b', '+', 1, true)), 2, 2))"#,
    r#"assert(same(pack(string.find('abc', 'b', -1)), nil))"#,
    r#"assert(same(pack(string.find('abc', 'c', -1)), 3, 3))"#,
    r#"assert(same(pack(string.find('abc', 'a', -10)), 1, 1))"#,
    r#"assert(same(pack(string.find('abc', 'a', 0)), 1, 1))"#,
    r#"assert(same(pack(string.find('abc', '', 4)), 4, 3))"#,
    r#"assert(same(pack(string.find('abc', '', 5)), nil))"#,
    r#"assert(same(pack(string.find('abc', '', 10)), nil))"#,
    r#"assert(same(pack(string.find('abc', '', math.mininteger)), 1, 0))"#,
    r#"assert(same(pack(string.find('abc', 'b', 2.0)), 2, 2))"#,
    r#"assert(same(pack(string.find('abc', 'b', '2')), 2, 2))"#,
    r#"assert(same(pack(string.find(12345, 34)), 3, 4))"#,
    r#"assert(same(pack(string.find(1.5, '.', 1, true)), 2, 2))"#,
    r#"assert(same(pack(string.find('abc', 'b', nil, nil)), 2, 2))"#,
    r#"assert(same(pack(string.find('a(b', '(', 1, 1)), 2, 2))"#,
    r#"assert(same(pack(("hello"):find("l+")), 3, 4))"#,
    r#"assert(same(pack(string.find("hello", "(l)(l)")), 3, 4, "l", "l"))"#,
    r#"assert(same(pack(string.find("hello", "()ll()")), 3, 4, 3, 5))"#,
    r#"assert(same(pack(string.find("abc", "^b", 2)), 2, 2))"#,
    r#"assert(same(pack(string.find("abc", "^a", 2)), nil))"#,
    r#"assert(same(pack(string.find("aaa", "^a*$")), 1, 3))"#,
    r#"assert(same(pack(string.find("x^y", "^", 1, true)), 2, 2))"#,
    r#"assert(same(pack(string.find("x^y", "x^")), 1, 2))"#,
    // f() from pm.lua
    r#"assert(f('aloALO', '%l*') == 'alo')"#,
    r#"assert(f('aLo_ALO', '%a*') == 'aLo')"#,
    r#"assert(f("  \n\r*&\n\r   xuxu  \n\n", "%g%g%g+") == "xuxu")"#,
    r#"assert(f('aaab', 'a*') == 'aaa')"#,
    r#"assert(f('aaa', '^.*$') == 'aaa')"#,
    r#"assert(f('aaa', 'b*') == '')"#,
    r#"assert(f('aaa', 'ab*a') == 'aa')"#,
    r#"assert(f('aba', 'ab*a') == 'aba')"#,
    r#"assert(f('aaab', 'a+') == 'aaa')"#,
    r#"assert(f('aaa', '^.+$') == 'aaa')"#,
    r#"assert(not f('aaa', 'b+'))"#,
    r#"assert(not f('aaa', 'ab+a'))"#,
    r#"assert(f('aba', 'ab+a') == 'aba')"#,
    r#"assert(f('a$a', '.$') == 'a')"#,
    r#"assert(f('a$a', '.%$') == 'a$')"#,
    r#"assert(f('a$a', '.$.') == 'a$a')"#,
    r#"assert(not f('a$a', '$$'))"#,
    r#"assert(not f('a$b', 'a$'))"#,
    r#"assert(f('a$a', '$') == '')"#,
    r#"assert(f('', 'b*') == '')"#,
    r#"assert(not f('aaa', 'bb*'))"#,
    r#"assert(f('aaab', 'a-') == '')"#,
    r#"assert(f('aaa', '^.-$') == 'aaa')"#,
    r#"assert(f('aabaaabaaabaaaba', 'b.*b') == 'baaabaaabaaab')"#,
    r#"assert(f('aabaaabaaabaaaba', 'b.-b') == 'baaab')"#,
    r#"assert(f('alo xo', '.o$') == 'xo')"#,
    r#"assert(f(' \n isto é assim', '%S%S*') == 'isto')"#,
    r#"assert(f(' \n isto é assim', '%S*$') == 'assim')"#,
    r#"assert(f(' \n isto é assim', '[a-z]*$') == 'assim')"#,
    r#"assert(f('um caracter ? extra', '[^%sa-z]') == '?')"#,
    r#"assert(f('', 'a?') == '')"#,
    r#"assert(f('á', 'á?') == 'á')"#,
    r#"assert(f('ábl', 'á?b?l?') == 'ábl')"#,
    r#"assert(f('  xbl', 'x?b?l?') == '')"#,
    r#"assert(f('aa', '^aa?a?a') == 'aa')"#,
    r#"assert(f(']]]xb', '[^]]') == 'x')"#,
    r#"assert(f("0alo alo", "%x*") == "0a")"#,
    r#"assert(f("alo alo", "%C+") == "alo alo")"#,
    r#"assert(f('aaab', 'a-b') == 'aaab')"#,
    r#"assert(f('==========', '^([=]*)=%1$') == nil)"#,
    r#"assert(f('==========', '^([=]*)=?%1$') == '==========')"#,
    r#"assert(f("  alo aalo allo", "%f[%S].-%f[%s].-%f[%S]") == "alo ")"#,
    // match
    r#"assert(string.match("aaab", ".-b") == "aaab")"#,
    r#"assert(string.match("alo xyzK", "(%w+)K") == "xyz")"#,
    r#"assert(string.match("254 K", "(%d*)K") == "")"#,
    r#"assert(string.match("alo ", "(%w*)$") == "")"#,
    r#"assert(not string.match("alo ", "(%w+)$"))"#,
    r#"assert(string.find("(álo)", "%(á") == 1)"#,
    r#"do local a, b, c, d, e = string.match("xlo alo", "^(((.).).* (%w*))$")
       assert(a == 'xlo alo' and b == 'xl' and c == 'x' and d == 'alo' and e == nil) end"#,
    r#"do local a, b, c, d = string.match('0123456789', '(.+(.?)())')
       assert(a == '0123456789' and b == '' and c == 11 and d == nil) end"#,
    r#"assert(math.type(string.match("abc", "()")) == "integer")"#,
    r#"assert(same(pack(string.match("hello", "()ll()")), 3, 5))"#,
    r#"assert(same(pack(string.match("  x", "^%s*()")), 3))"#,
    r#"assert(same(pack(string.match("key = value", "(%w+)%s*=%s*(%w+)")), "key", "value"))"#,
    r#"assert(same(pack(string.match("abc", "x")), nil))"#,
    r#"assert(same(pack(string.match("abc", "b", 3)), nil))"#,
    r#"assert(same(pack(string.match("abc", ".", -1)), "c"))"#,
    r#"assert(same(pack(string.match("abc", "", 4)), ""))"#,
    r#"assert(same(pack(string.match("abc", "", 5)), nil))"#,
    r#"assert(string.match("hello world", "^(%w+)") == "hello")"#,
    r#"assert(string.match("[[x]]", "%[(%b[])%]") == "[x]")"#,
    r#"assert(string.match("f(a(b)c)d", "%b()") == "(a(b)c)")"#,
    r#"assert(string.match("f(a(b c)d", "%b()") == "(b c)")"#,
    r#"assert(string.match("((", "%b()") == nil)"#,
    r#"assert(string.match("xaaay", "%bay") == "ay" and string.match("xaaay", "^%bay") == nil)"#,
    r#"assert(string.match("x--y--z", "%-%-(.-)%-%-") == "y")"#,
    r#"assert(string.match("abcabc", "(abc)%1") == "abc")"#,
    r#"assert(string.match("abcabd", "(abc)%1") == nil)"#,
    r#"assert(string.match('"x" y', '(["\'])(.-)%1') == '"')"#,
    r#"assert(select(2, string.match([["a'b" c]], [[(["'])(.-)%1]])) == "a'b")"#,
    r#"assert(string.match("x()y", "()%(%)()") == 2)"#,
    r#"assert(string.match("THE (quick) fox", "%f[%a]%a+") == "THE")"#,
    r#"assert(string.match("THE (quick) fox", "%f[%l]%a+") == "quick")"#,
    r#"assert(string.match("abc", "%f[%z]") == "")"#,
    r#"assert(string.find("a", "%f[a]") == 1)"#,
    r#"assert(string.find("a", "%f[^%z]") == 1)"#,
    r#"assert(string.find("a", "%f[^%l]") == 2)"#,
    r#"assert(string.find("aba", "%f[a%z]") == 3)"#,
    r#"assert(string.find("aba", "%f[%z]") == 4)"#,
    r#"assert(not string.find("aba", "%f[%l%z]"))"#,
    r#"assert(not string.find("aba", "%f[^%l%z]"))"#,
    r#"do local i, e = string.find(" alo aalo allo", "%f[%S].-%f[%s].-%f[%S]")
       assert(i == 2 and e == 5) end"#,
    r#"assert(string.match("a\0b", "%z") == nil or true)"#,
    r#"assert(string.match("a\0b", "[\0]") == "\0")"#,
    r#"assert(string.match("a\0b", ".%z?b") ~= nil or true)"#,
    r#"assert(string.match("x\0y", "x%zy") == "x\0y" and string.match("x\0y", "%Z+") == "x")"#,
    r#"assert(string.match("x\0y", "x\0y") == "x\0y")"#,
    r#"assert(string.match("x\0y", "x[^a]y") == "x\0y")"#,
    // classes and sets
    r#"assert(string.match("aB1_ \t", "%a+") == "aB")"#,
    r#"assert(string.match("\1\31 x", "%c+") == "\1\31")"#,
    r#"assert(string.match("ab123cd", "%d+") == "123")"#,
    r#"assert(string.match("  x!y ", "%g+") == "x!y")"#,
    r#"assert(string.match("ABcdEF", "%l+") == "cd")"#,
    r#"assert(string.match("ab!?,.cd", "%p+") == "!?,.")"#,
    r#"assert(string.match("a \t\n\v\f\rb", "%s+") == " \t\n\v\f\r")"#,
    r#"assert(string.match("abCDef", "%u+") == "CD")"#,
    r#"assert(string.match("!!ab12__", "%w+") == "ab12")"#,
    r#"assert(string.match("xyz0fAg", "%x+") == "0fA")"#,
    r#"assert(string.match("abc123", "%A+") == "123")"#,
    r#"assert(string.match("123abc", "%D+") == "abc")"#,
    r#"assert(string.match("ab  cd", "%S+%s+(%S+)") == "cd")"#,
    r#"assert(string.match("ab!", "%W") == "!")"#,
    r#"assert(string.match("\200\201a", "%a") == "a")"#,
    r#"assert(string.match("\200\201a", "[\128-\255]+") == "\200\201")"#,
    r#"assert(string.match("a-b", "[a%-]+") == "a-")"#,
    r#"assert(string.match("a-b", "[%a-]+") == "a-b")"#,
    r#"assert(string.match("z-a", "[z-a]") == nil)"#,
    r#"assert(string.match("]", "[]]") == "]")"#,
    r#"assert(string.match("^", "[%^]") == "^")"#,
    r#"assert(string.match("a^", "[^^]") == "a")"#,
    r#"assert(string.match("-", "[-]") == "-")"#,
    r#"assert(string.match("b", "[a-]") == nil)"#,
    r#"assert(string.match("x]", "[^]x]") == nil)"#,
    r#"assert(string.match("09az", "^[0-9a-z]+$") == "09az")"#,
    r#"assert(string.match("%", "%%") == "%")"#,
    r#"assert(string.match("a.b", "%.") == ".")"#,
    r#"assert(string.match("[]", "%[%]") == "[]")"#,
    r#"assert(string.match("ab", "a?b?c?") == "ab")"#,
    r#"assert(string.match("ab", "[a-z]-b") == "ab")"#,
    // gmatch
    r#"do local a = 0; for i in string.gmatch('abcde', '()') do assert(i == a + 1); a = i end; assert(a == 6) end"#,
    r#"do local t = {n = 0}; for w in string.gmatch("first second word", "%w+") do t.n = t.n + 1; t[t.n] = w end
       assert(t[1] == "first" and t[2] == "second" and t[3] == "word" and t.n == 3) end"#,
    r#"do local t = {3, 6, 9}; for i in string.gmatch("xuxx uu ppar r", "()(.)%2") do assert(i == table.remove(t, 1)) end; assert(#t == 0) end"#,
    r#"do local t = {}; for i, j in string.gmatch("13 14 10 = 11, 15= 16, 22=23", "(%d+)%s*=%s*(%d+)") do t[tonumber(i)] = tonumber(j) end
       local a = 0; for k, v in pairs(t) do assert(k + 1 == v + 0); a = a + 1 end; assert(a == 3) end"#,
    r#"do local s = ""; for k in string.gmatch("abc", "") do s = s .. "|" end; assert(s == "||||") end"#,
    r#"do local r = {}; for k in string.gmatch("abc", "b*") do r[#r + 1] = k end; assert(table.concat(r, ",") == ",b,") end"#,
    r#"do local s = 0; for k in string.gmatch("10 20 30", "%d+", 3) do s = s + tonumber(k) end; assert(s == 50) end"#,
    r#"do local s = 0; for k in string.gmatch("10 20 30", "%d+", -2) do s = s + tonumber(k) end; assert(s == 30) end"#,
    r#"do local s = 0; for k in string.gmatch("10 20 30", "%d+", 0) do s = s + tonumber(k) end; assert(s == 60) end"#,
    r#"do local n = 0; for k in string.gmatch("abc", ".", 10) do n = n + 1 end; assert(n == 0) end"#,
    r#"do local n = 0; for k in string.gmatch("abc", "", 4) do n = n + 1 end; assert(n == 1) end"#,
    r#"do local n = 0; for k in string.gmatch("^a^a", "^a") do n = n + 1 end; assert(n == 2) end"#,
    r#"do local it = string.gmatch("ab", "."); assert(it() == "a" and it() == "b" and it() == nil and it() == nil) end"#,
    r#"do local r = {}; for a, b in string.gmatch("k=v, x=y", "(%w)=(%w)") do r[#r + 1] = a .. b end; assert(table.concat(r) == "kvxy") end"#,
    // gsub
    r#"assert(string.gsub('ülo ülo', 'ü', 'x') == 'xlo xlo')"#,
    r#"assert(string.gsub('alo úlo  ', ' +$', '') == 'alo úlo')"#,
    r#"assert(string.gsub('  alo alo  ', '^%s*(.-)%s*$', '%1') == 'alo alo')"#,
    r#"assert(string.gsub('alo  alo  \n 123\n ', '%s+', ' ') == 'alo alo 123 ')"#,
    r#"do local t = "abc d"; local a, b = string.gsub(t, '(.)', '%1@'); assert('@' .. a == string.gsub(t, '', '@') and b == 5) end"#,
    r#"do local a, b = string.gsub('abçd', '(.)', '%0@', 2); assert(a == 'a@b@çd' and b == 2) end"#,
    r#"assert(string.gsub('alo alo', '()[al]', '%1') == '12o 56o')"#,
    r#"assert(string.gsub("abc=xyz", "(%w*)(%p)(%w+)", "%3%2%1-%0") == "xyz=abc-abc=xyz")"#,
    r#"assert(string.gsub("abc", "%w", "%1%0") == "aabbcc")"#,
    r#"assert(string.gsub("abc", "%w+", "%0%1") == "abcabc")"#,
    r#"assert(string.gsub('áéí', '$', '\0óú') == 'áéí\0óú')"#,
    r#"assert(string.gsub('', '^', 'r') == 'r')"#,
    r#"assert(string.gsub('', '$', 'r') == 'r')"#,
    r#"assert(string.gsub("um (dois) tres (quatro)", "(%(%w+%))", string.upper) == "um (DOIS) tres (QUATRO)")"#,
    r#"do local t = {}; local s = 'a alo jose  joao'; local r = string.gsub(s, '()(%w+)()', function(a, w, b) assert(string.len(w) == b - a); t[a] = b - a end)
       assert(s == r and t[1] == 1 and t[3] == 3 and t[7] == 4 and t[13] == 4) end"#,
    r#"assert(string.gsub("alo $name$ xuxu", "%$(%w+)%$", {name = "LUA"}) == "alo LUA xuxu")"#,
    r#"assert(string.gsub("alo $name$ xuxu", "%$(%w+)%$", {}) == "alo $name$ xuxu")"#,
    r#"assert(string.gsub("abc d", '(%w)', {a = 1, b = 2.5}) == "12.5c d")"#,
    r#"assert(string.gsub("a b", '%w', {a = false, b = 'B'}) == "a B")"#,
    r#"assert(string.gsub("alo alo", ".", {}) == "alo alo")"#,
    r#"assert(string.gsub("alo alo", "(.)", {a = "AA", l = ""}) == "AAo AAo")"#,
    r#"assert(string.gsub("alo alo", "(.).", {a = "AA", l = "K"}) == "AAo AAo")"#,
    r#"assert(string.gsub("alo alo", "((.)(.?))", {al = "AA", o = false}) == "AAo AAo")"#,
    r#"assert(string.gsub("alo alo", "().", {'x', 'yy', 'zzz'}) == "xyyzzz alo")"#,
    r#"do local t = setmetatable({}, {__index = function(t, s) return s .. s end}); assert(string.gsub("a b c", "%w", t) == "aa bb cc") end"#,
    r#"assert(string.gsub("abc", "%w", function(c) return c:upper() end) == "ABC")"#,
    r#"assert(string.gsub("abc", "%w", function() end) == "abc")"#,
    r#"assert(string.gsub("abc", "%w", function() return false end) == "abc")"#,
    r#"assert(string.gsub("abc", "%w", function() return 1 end) == "111")"#,
    r#"assert(string.gsub("abc", "%w", function() return 1.5 end) == "1.51.51.5")"#,
    r#"assert(string.gsub("a", "a", function() return 2^53 end) == "9.007199254741e+15")"#,
    r#"assert(string.gsub("hello world", "(%w+)", dog) == "hello-hello world-world")"#,
    r#"assert(string.gsub("hello world", "%w+", "%0 %0", 1) == "hello hello world")"#,
    r#"assert(string.gsub("hello world from Lua", "(%w+)%s*(%w+)", "%2 %1") == "world hello Lua from")"#,
    r#"do local s, n = string.gsub("abc", "", "-"); assert(s == "-a-b-c-" and n == 4) end"#,
    r#"do local s, n = string.gsub("abc", "b*", "-"); assert(s == "-a-c-" and n == 3) end"#,
    r#"do local s, n = string.gsub("abc", "%w", "x", 0); assert(s == "abc" and n == 0) end"#,
    r#"do local s, n = string.gsub("abc", "%w", "x", -1); assert(s == "abc" and n == 0) end"#,
    r#"do local s, n = string.gsub("abc", "%w", "x", 2.0); assert(s == "xxc" and n == 2) end"#,
    r#"do local s, n = string.gsub("aaa", "^a", "b"); assert(s == "baa" and n == 1) end"#,
    r#"do local s, n = string.gsub("xaa", "^a", "b"); assert(s == "xaa" and n == 0) end"#,
    r#"do local s, n = string.gsub("abc", "x", "y"); assert(s == "abc" and n == 0) end"#,
    r#"do local s, n = string.gsub(123, "x", "y"); assert(s == "123" and n == 0) end"#,
    r#"do local s, n = string.gsub(123, "2", 9); assert(s == "193" and n == 1) end"#,
    r#"assert(string.gsub("abc", ".", "%%") == "%%%")"#,
    r#"assert(string.gsub("a.b", "%.", "%%.") == "a%.b")"#,
    r#"assert(string.gsub("abc", "()", "%1") == "1a2b3c4")"#,
    r#"assert(string.gsub("abc", "b()", "[%1]") == "a[3]c")"#,
    r#"assert(string.gsub("trocar tudo em |teste|b| é |beleza|al|", "|([^|]*)|([^|]*)|", "%2") ~= nil)"#,
    r#"assert(string.gsub("x = 1, y = 2", "(%w+)%s*=%s*(%w+)", "%2=%1") == "1=x, 2=y")"#,
    r#"do local function f(a, b) return string.gsub(a, '.', b) end
       assert(string.gsub("trocar tudo em |teste|b| é |beleza|al|", "|([^|]*)|([^|]*)|", f) == "trocar tudo em bbbbb é alalalalalal") end"#,
    r#"do local function isbalanced(s) return not string.find(string.gsub(s, "%b()", ""), "[()]") end
       assert(isbalanced("(9 ((8))(\0) 7) \0\0 a b ()(c)() a")); assert(not isbalanced("(9 ((8) 7) a b (\0 c) a")) end"#,
    r#"assert(string.gsub("alo 'oi' alo", "%b''", '"') == 'alo " alo')"#,
    r#"do local r = string.gsub("abc", "(b)", function(x) return string.gsub(x, "b", "B") end); assert(r == "aBc") end"#,
    r#"assert(string.gsub("αβγ", "[\128-\191]", "") == "\206\206\206")"#,
    r#"do local s = string.rep("a", 100000); local r, n = string.gsub(s, "a", "b"); assert(#r == 100000 and n == 100000 and r == string.rep("b", 100000)) end"#,
    r#"do local s = string.rep("ab", 50000); local r, n = string.gsub(s, "b", function() return "cd" end); assert(#r == 150000 and n == 50000) end"#,
    r#"do local s = string.rep("x", 200000); assert(#string.gsub(s, ".", "%0%0") == 400000) end"#,
    // errors
    r#"checkerror("malformed pattern (ends with '%')", string.find, "a", "%")"#,
    r#"checkerror("malformed pattern (missing ']')", string.find, "a", "[a")"#,
    r#"checkerror("malformed pattern (missing ']')", string.find, "a", "[]")"#,
    r#"checkerror("malformed pattern (missing ']')", string.find, "a", "[^]")"#,
    r#"checkerror("malformed pattern (missing ']')", string.find, "a", "[a%]")"#,
    r#"checkerror("malformed pattern (missing ']')", string.find, "a", "[a%")"#,
    r#"checkerror("malformed pattern (missing arguments to '%b')", string.find, "a", "%b")"#,
    r#"checkerror("malformed pattern (missing arguments to '%b')", string.find, "a", "%ba")"#,
    r#"checkerror("missing '[' after '%f' in pattern", string.find, "a", "%f")"#,
    r#"checkerror("missing '[' after '%f' in pattern", string.find, "a", "%fa")"#,
    r#"checkerror("invalid capture index %1", string.find, "a", "%1")"#,
    r#"checkerror("invalid capture index %0", string.find, "a", "%0")"#,
    r#"checkerror("invalid capture index %1", string.find, "a", "(a%1)")"#,
    r#"checkerror("invalid capture index %2", string.find, "aa", "(a)%2")"#,
    r#"checkerror("invalid pattern capture", string.match, "a", "a)")"#,
    r#"checkerror("invalid pattern capture", string.find, "a", ")$")"#,
    r#"checkerror("unfinished capture", string.find, "a", "(a")"#,
    r#"checkerror("unfinished capture", string.match, "a", "(()")"#,
    r#"checkerror("too many captures", string.find, "a", string.rep("()", 33))"#,
    r##"assert(select('#', string.find("a", string.rep("()", 32))) == 34)"##,
    r#"checkerror("pattern too complex", string.match, string.rep("a", 300), string.rep("a?", 300) .. string.rep("a", 300))"#,
    r#"assert(string.match(string.rep("a", 150), string.rep("a?", 150)) == string.rep("a", 150))"#,
    r#"checkerror("invalid replacement value (a table)", string.gsub, "alo", ".", {a = {}})"#,
    r#"checkerror("invalid replacement value (a boolean)", string.gsub, "alo", ".", function() return true end)"#,
    r#"checkerror("invalid replacement value (a function)", string.gsub, "alo", ".", {a = print})"#,
    r#"checkerror("invalid capture index %2", string.gsub, "alo", ".", "%2")"#,
    r#"checkerror("invalid capture index %1", string.gsub, "alo", "(%1)", "a")"#,
    r#"checkerror("invalid use of '%' in replacement string", string.gsub, "alo", ".", "%x")"#,
    r#"checkerror("invalid use of '%' in replacement string", string.gsub, "alo", ".", "x%")"#,
    r#"checkargerror("bad argument #3 to 'gsub' (string/function/table expected, got boolean)", string.gsub, "a", "a", true)"#,
    r#"checkargerror("bad argument #1 to 'find' (string expected, got nil)", string.find, nil, "a")"#,
    r#"checkargerror("bad argument #2 to 'find' (string expected, got no value)", string.find, "a")"#,
    r#"checkargerror("bad argument #2 to 'match' (string expected, got table)", string.match, "a", {})"#,
    r#"checkargerror("bad argument #3 to 'find' (number has no integer representation)", string.find, "a", "a", 1.5)"#,
    r#"checkargerror("bad argument #3 to 'find' (number expected, got string)", string.find, "a", "a", "x")"#,
    r#"checkargerror("bad argument #3 to 'find' (number expected, got table)", string.find, "a", "a", {})"#,
    r#"checkargerror("bad argument #4 to 'gsub' (number has no integer representation)", string.gsub, "a", "a", "b", 1.5)"#,
    r#"checkargerror("bad argument #1 to 'gmatch' (string expected, got boolean)", string.gmatch, true, "a")"#,
    r#"checkerror("malformed pattern (ends with '%')", string.gmatch("alo", "%"))"#,
    r#"checkerror("malformed pattern (ends with '%')", string.gsub, "alo", "%", "")"#,
    r#"checkerror("malformed pattern (ends with '%')", string.match, "alo", ".%")"#,
    r#"do local e = {}; local ok, err = pcall(string.gsub, "a", "a", function() error(e) end); assert(not ok and err == e) end"#,
    r#"do local ok, err = pcall(string.gsub, "a", "a", function() error("boom", 0) end); assert(not ok and err == "boom") end"#,
    r#"do local t = setmetatable({}, {__index = function() error("idx", 0) end}); local ok, err = pcall(string.gsub, "a", "a", t); assert(not ok and err == "idx") end"#,
    r#"assert(select(2, pcall(string.find, "a", "%")) == "malformed pattern (ends with '%')")"#,
    r#"assert(select(2, pcall(string.rep)) ~= nil)"#,
    // methods through the string metatable
    r#"assert(("abc"):match("b") == "b" and ("abc"):gsub("b", "x") == "axc" and ("a b"):gmatch("%a")() == "a")"#,
    r#"assert(("x"):find("x", 1, true) == 1)"#,
];

/// The cases as one script: `handler` returns the failures, one per line.
fn conformance_script() -> String {
    let mut src = String::from(PRELUDE);
    src.push_str("local cases = {\n");
    for case in CASES {
        src.push_str("function()\n");
        src.push_str(case);
        src.push_str("\nend,\n");
    }
    src.push_str(
        "}\nfunction handler()\n  local bad = {}\n  for i, c in ipairs(cases) do\n    \
         local ok, err = pcall(c)\n    if not ok then bad[#bad + 1] = i .. ': ' .. tostring(err) end\n  \
         end\n  return #cases .. ' cases\\n' .. table.concat(bad, '\\n')\nend\n",
    );
    src
}

#[test]
fn conformance() {
    assert!(CASES.len() >= 150, "{}", CASES.len());
    let src = conformance_script();
    let expected = format!("{} cases\n", CASES.len());
    // The reference: the C functions of a plain Lua 5.4 state.
    let lua = mlua::Lua::new();
    lua.load(&src).set_name("@app/script.lua").exec().unwrap();
    let handler: mlua::Function = lua.globals().get("handler").unwrap();
    let reference: String = handler.call(()).unwrap();
    assert_eq!(
        reference, expected,
        "the cases fail against C Lua:\n{reference}"
    );
    // The sandbox: short calls go to C, the rest to Rust; then everything to Rust.
    for rust_only in [false, true] {
        let got = if rust_only {
            let mut loaded = rust_only_state(&src);
            body(request(&mut loaded.0))
        } else {
            body(request(&mut load(&src).state))
        };
        check_cases(&got);
    }
}

/// A state whose string functions all use the Rust matcher (no fast path to C).
fn rust_only_state(src: &str) -> (luafcgid_sandbox::ScriptState, TempDir) {
    std::env::set_var("LUAFCGID_PATTERN_RUST_ONLY", "1");
    let (dir, state) = try_load(src);
    std::env::remove_var("LUAFCGID_PATTERN_RUST_ONLY");
    (state.unwrap(), dir)
}

fn check_cases(got: &str) {
    let failures: Vec<String> = got
        .lines()
        .skip(1)
        .map(|l| {
            let i: usize = l.split(':').next().unwrap().parse().unwrap();
            format!("{l}\n    case: {}", CASES[i - 1])
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Random patterns and subjects over a small alphabet, run through both implementations; every
/// result (values with their types, or the error message) must be the same.
const FUZZ: &str = r##"
local seed = 12345
local function rand(n)
  seed = (seed * 1103515245 + 12345) % 2147483648
  return seed % n + 1
end
local patoms = {"a", "b", ".", "%a", "%d", "%s", "%w", "%A", "[ab]", "[^a]", "[a-c]", "%%", "%b()",
  "%f[%a]", "%f[^a]", "(", ")", "()", "%1", "%2", "^", "$", "*", "+", "-", "?", "%", "[", "]", "x", "(a)", "(.-)", "%z"}
local satoms = {"a", "b", "c", "(", ")", " ", "1", "x", "\0", "ab", "aa"}
local function pick(t, n)
  local s = {}
  for i = 1, rand(n) - 1 do s[#s + 1] = t[rand(#t)] end
  return table.concat(s)
end
local function show(ok, ...)
  local out = {tostring(ok)}
  for i = 1, select("#", ...) do
    local v = select(i, ...)
    out[#out + 1] = (math.type(v) or type(v)) .. ":" .. tostring(v)
  end
  return table.concat(out, ",")
end
local repls = {"%0", "<%1>", "x", "%%", "%2", "", "%"}
local rt = {a = "A", b = false, ["("] = 1}
local function run(n)
  local out = {}
  for i = 1, n do
    local s, p = pick(satoms, 8), pick(patoms, 6)
    local init = rand(9) - 4
    out[#out + 1] = show(pcall(string.find, s, p, init))
    out[#out + 1] = show(pcall(string.match, s, p, init))
    out[#out + 1] = show(pcall(string.gsub, s, p, repls[rand(#repls)], rand(4) - 1))
    out[#out + 1] = show(pcall(string.gsub, s, p, rt))
    out[#out + 1] = show(pcall(string.gsub, s, p, function(...) return select("#", ...) .. (...) end))
    out[#out + 1] = show(pcall(function()
      local r = {}
      for a, b in string.gmatch(s, p, init) do r[#r + 1] = tostring(a) .. "/" .. tostring(b) end
      return table.concat(r, " ")
    end))
  end
  return table.concat(out, "\n")
end
function handler() return run(N) end
"##;

#[test]
fn differential_fuzz() {
    let src = FUZZ.replace("run(N)", "run(3000)");
    let lua = mlua::Lua::new();
    lua.load(&src).set_name("@app/script.lua").exec().unwrap();
    let handler: mlua::Function = lua.globals().get("handler").unwrap();
    let reference: String = handler.call(()).unwrap();
    for rust_only in [true, false] {
        fuzz_against(&src, &reference, rust_only);
    }
}

fn fuzz_against(src: &str, reference: &str, rust_only: bool) {
    let mut s = if rust_only {
        rust_only_state(src)
    } else {
        let (dir, state) = try_load(src);
        (state.unwrap(), dir)
    };
    let limits = Limits {
        instructions: 0,
        timeout: Duration::from_secs(60),
        output: 1 << 26,
    };
    let got = body(Req::default().run(&mut s.0, &limits));
    let (r, g): (Vec<&str>, Vec<&str>) = (reference.lines().collect(), got.lines().collect());
    assert_eq!(r.len(), g.len());
    let diffs: Vec<String> = r
        .iter()
        .zip(&g)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .take(10)
        .map(|(i, (a, b))| format!("line {i} (rust_only {rust_only}): C {a:?} vs Rust {b:?}"))
        .collect();
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

fn timed(src: &str, limits: &Limits) -> (luafcgid_sandbox::Report, Duration) {
    // Room for a 10 MB subject (string.rep needs twice that for a moment).
    let dir = TempDir::new();
    let script = dir.write("s.lua", src);
    let mut opts = options(&dir, &script);
    opts.memory = 256 << 20;
    let mut state = ScriptState::load(&opts, &Default::default()).unwrap();
    let start = Instant::now();
    let report = Req::default().run(&mut state, limits);
    (report, start.elapsed())
}

fn time_limit(ms: u64) -> Limits {
    Limits {
        instructions: 0,
        timeout: Duration::from_millis(ms),
        output: 0,
    }
}

/// Each attack ends with the time limit, no later than the limit + 50 ms (DESIGN: 10% or 50
/// ms), even when the script catches errors.
#[test]
fn long_matches_stop_at_the_time_limit() {
    let cases = [
        (
            "backtracking, 40 characters",
            r#"function handler() return string.find(("a"):rep(40), ".-.-.-.-.-.-.-b") end"#,
        ),
        (
            "backtracking, 1000 characters",
            r#"function handler() return string.find(("a"):rep(1000), ".-.-.-.-.-.-.-b") end"#,
        ),
        (
            "backtracking through pcall and match",
            r#"function handler() while true do pcall(string.match, ("a"):rep(60), ".-.-.-.-.-.-.-.-b") end end"#,
        ),
        (
            "plain find, 100k needle over 1M subject",
            r#"function handler()
                 local s, n = ("a"):rep(1000000), ("a"):rep(100000) .. "b"
                 while true do string.find(s, n, 1, true) end
               end"#,
        ),
        (
            "find without specials, 100k needle",
            r#"function handler()
                 local s, n = ("a"):rep(1000000), ("a"):rep(100000) .. "b"
                 while true do pcall(s.find, s, n) end
               end"#,
        ),
        (
            "gsub over 10 MB with a function",
            r#"function handler()
                 local s = ("x"):rep(10 * 1024 * 1024)
                 while true do s:gsub(".", function(c) return c end) end
               end"#,
        ),
        (
            "gmatch with backtracking",
            r#"function handler() for x in string.gmatch(("a"):rep(60), "(.-.-.-.-.-.-b)") do end end"#,
        ),
        (
            "back-references",
            r#"function handler() return string.find(("a"):rep(20000), "(a*)%1%1%1b") end"#,
        ),
    ];
    for (name, src) in cases {
        // Typically 0.05-0.1 ms over. A second try only absorbs a descheduled test thread on
        // a loaded machine; a matcher that does not stop fails both.
        let mut times = Vec::new();
        for _ in 0..2 {
            let (report, elapsed) = timed(src, &time_limit(200));
            expect_limit(report, LimitKind::Time);
            println!("{name}: {elapsed:?}");
            assert!(elapsed >= Duration::from_millis(200), "{name}: {elapsed:?}");
            times.push(elapsed);
            if elapsed <= Duration::from_millis(250) {
                break;
            }
        }
        let best = times.iter().min().unwrap();
        assert!(*best <= Duration::from_millis(250), "{name}: {times:?}");
    }
}

#[test]
fn instruction_budget_stops_a_long_match() {
    let limits = Limits {
        instructions: 1_000_000,
        timeout: Duration::from_secs(10),
        output: 0,
    };
    let (report, elapsed) = timed(
        r#"function handler() return string.find(("a"):rep(40), ".-.-.-.-.-.-.-b") end"#,
        &limits,
    );
    let instructions = report.instructions;
    expect_limit(report, LimitKind::Instructions);
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    assert!(instructions >= 1_000_000, "{instructions}");
    // A gsub callback that loops is stopped by the hook, and pcall cannot swallow it.
    let (report, _) = timed(
        r#"function handler()
             for i = 1, 10 do pcall(string.gsub, "aaaa", "a", function() while true do end end) end
             return "escaped"
           end"#,
        &limits,
    );
    expect_limit(report, LimitKind::Instructions);
}

#[test]
fn a_tripped_limit_inside_a_callback_is_not_caught() {
    let (report, _) = timed(
        r#"function handler()
             local t = setmetatable({}, {__index = function() while true do end end})
             for i = 1, 10 do pcall(string.gsub, "abc", "%w", t) end
             for i = 1, 10 do pcall(string.gsub, "abc", "%w", function() return string.find(("a"):rep(40), ".-.-.-.-.-.-.-b") end) end
             return "escaped"
           end"#,
        &time_limit(200),
    );
    expect_limit(report, LimitKind::Time);
}

#[test]
fn gsub_results_count_against_the_memory_limit() {
    // 1 MiB subject, each character replaced by 1000 copies: a 1 GB result in C Lua terms.
    let mut s = load(
        r#"function handler()
             local s = ("x"):rep(1024 * 1024)
             local r = s:gsub(".", ("%0"):rep(10) .. ("y"):rep(1000))
             return #r
           end"#,
    );
    expect_limit(request(&mut s.state), LimitKind::Memory);
}

#[test]
fn abort_stops_a_long_match() {
    let mut s =
        load(r#"function handler() return string.find(("a"):rep(1000), ".-.-.-.-.-.-.-b") end"#);
    let req = std::sync::Arc::new(Req::default());
    let start = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            req.abort.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let report = req.run(&mut s.state, &time_limit(5000));
        assert!(
            matches!(report.result, Err(luafcgid_sandbox::Failure::Aborted)),
            "{:?}",
            report.result.err()
        );
    });
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
}

/// The fast path's bound (copied from `pattern.rs`'s wrapper) holds against C Lua: every call
/// it admits on adversarial patterns ends within a few milliseconds.
#[test]
fn fast_path_bound_admits_only_short_calls() {
    let lua = mlua::Lua::new();
    let worst: f64 = lua
        .load(
            r#"
      local LIMIT = 2e6
      local function cheap(s, p)
        local n = #s + 1
        local q = select(2, string.gsub(p, "[%*%+%-%?]", "")) + select(2, string.gsub(p, "%%[b1-9]", ""))
        return n ^ (q + 1) * (#p + 1) * (n + 1) * (q + 1) <= LIMIT
      end
      local pats = {".-.-.-.-.-.-.-b", ".-b", "a*a*b", "(.-)%1b", "(a*)%1%1b", "%b()", "(.*)(.*)x",
        "[%a%d%s%p%c%x]*[%a%d]-x", "a?a?a?a?a?a?a?a?aaaaaaaa", "((a-)-)-b", "%f[%a].-x", "^(.-)$x",
        string.rep("[^b]", 50) .. "b", "(((((((((a)))))))))b"}
      local subjects = {function(n) return ("a"):rep(n) end, function(n) return ("("):rep(n) end,
        function(n) return ("ab"):rep(n // 2) end}
      local worst = 0
      for _, p in ipairs(pats) do
        for _, mk in ipairs(subjects) do
          for n = 0, 3000, 7 do
            local s = mk(n)
            if cheap(s, p) then
              local t = os.clock()
              string.find(s, p)
              string.gsub(s, p, "")
              worst = math.max(worst, os.clock() - t)
            end
          end
        end
      end
      return worst
    "#,
        )
        .eval()
        .unwrap();
    println!("worst admitted call: {:.3} ms", worst * 1e3);
    assert!(worst < 0.03, "{worst}");
}
