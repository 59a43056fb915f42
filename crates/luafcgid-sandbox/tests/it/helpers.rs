//! `require("luafcgid")`.

use crate::support::*;

fn run(handler_body: &str) -> String {
    let mut s = load(format!(
        "local luafcgid = require('luafcgid')\nfunction handler(r)\n{handler_body}\nend"
    ));
    body(request(&mut s.state))
}

fn fails(handler_body: &str) -> String {
    let mut s = load(format!(
        "local luafcgid = require('luafcgid')\nfunction handler(r)\n{handler_body}\nend"
    ));
    script_error(request(&mut s.state))
}

#[test]
fn same_module_every_time() {
    assert_eq!(
        run("return tostring(require('luafcgid') == luafcgid)"),
        "true"
    );
}

#[test]
fn urlencode_and_urldecode() {
    assert_eq!(
        run("return luafcgid.urlencode('a b&c=d/é~')"),
        "a+b%26c%3Dd%2F%C3%A9~"
    );
    assert_eq!(
        run("return luafcgid.urldecode('a+b%26c%3dd%2F%C3%A9~%zz%')"),
        "a b&c=d/é~%zz%"
    );
}

#[test]
fn parse() {
    assert_eq!(
        run(r#"
            local t = luafcgid.parse("a=1&b=x+y&a=2&c&&d=%3D&a=3")
            return table.concat({t.a[1], t.a[2], t.a[3], #t.a, t.b, "[" .. t.c .. "]", t.d}, ",")
            "#),
        "1,2,3,3,x y,[],="
    );
    assert_eq!(run("return tostring(next(luafcgid.parse('')))"), "nil");
}

#[test]
fn serialize_round_trips() {
    assert_eq!(
        run(r#"
            local v = {1, 2.5, "three", true, false, n = {x = 1}, ["key with space"] = "v\n\0\"",
                       [10] = -1, [-0.5] = 1/0, [true] = "t", big = math.mininteger, f = 1e300, i = 2^53}
            local s = luafcgid.serialize(v)
            local back = load("return " .. s, "s", "t", {})()
            assert(luafcgid.serialize(back) == s, s)
            assert(back[3] == "three" and back.n.x == 1 and back["key with space"] == "v\n\0\"")
            assert(math.type(back.big) == "integer" and back.big == math.mininteger)
            assert(math.type(back.i) == "float" and back[-0.5] == 1/0 and back[true] == "t")
            return s
            "#),
        "{1,2.5,\"three\",true,false,[true]=\"t\",[-0.5]=1/0,[10]=-1,big=(-9223372036854775807-1),\
         f=1e300,i=9007199254740992.0,[\"key with space\"]=\"v\\\n\\0\\\"\",n={x=1}}"
    );
    assert_eq!(run("return luafcgid.serialize(nil)"), "nil");
    assert_eq!(run("return luafcgid.serialize('%q')"), "\"%q\"");
    assert_eq!(run("return luafcgid.serialize(0/0)"), "0/0");
    assert_eq!(
        run("return luafcgid.serialize({['end'] = 1, _x = 2})"),
        "{_x=2,[\"end\"]=1}"
    );
}

#[test]
fn serialize_quotes_like_lua() {
    assert_eq!(
        run(r#"
            local s = ""
            for i = 0, 255 do s = s .. string.char(i) .. (i % 3 == 0 and "1" or "") end
            assert(luafcgid.serialize(s) == string.format("%q", s))
            return "same"
            "#),
        "same"
    );
}

#[test]
fn serialize_refuses() {
    for (value, expected) in [
        ("print", "cannot serialize a function"),
        ("r", "cannot serialize a userdata"),
        ("coroutine.create(print)", "cannot serialize a thread"),
        (
            "(function() local t = {} t.self = t return t end)()",
            "cycle",
        ),
        (
            "(function() local t = {} for i = 1, 70 do t = {t} end return t end)()",
            "deeper than 64",
        ),
    ] {
        let message = fails(&format!("return luafcgid.serialize({value})"));
        assert!(message.contains(expected), "{value}: {message}");
    }
    // Shared, non-cyclic references are fine; 64 levels are fine.
    assert_eq!(
        run("local s = {1} return luafcgid.serialize({s, s})"),
        "{{1},{1}}"
    );
    assert_eq!(
        run("local t = {} for i = 1, 63 do t = {t} end return #luafcgid.serialize(t)"),
        "128"
    );
}

#[test]
fn serialize_ignores_metatables() {
    assert_eq!(
        run(
            r#"return luafcgid.serialize(setmetatable({a = 1}, {__index = function() error("no") end, __pairs = function() error("no") end}))"#
        ),
        "{a=1}"
    );
}
