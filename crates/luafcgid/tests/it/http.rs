//! The development HTTP listener.

use crate::support::*;

#[test]
fn http_listener_serves_scripts() {
    let d = Daemon::start(
        "",
        &[
            ("hello.lua", HELLO),
            ("q.lua", "function handler(r) return r.env.QUERY_STRING end"),
        ],
    );
    let (status, text) = http_get(d.http, "/hello.lua");
    assert_eq!(status, 200);
    assert!(text.ends_with("\r\n\r\nHello World"), "{text}");
    assert!(text.contains("X-Request-Id: "));
    let (_, text) = http_get(d.http, "/q.lua?a=1&b=2");
    assert!(text.ends_with("a=1&b=2"));
    assert_eq!(http_get(d.http, "/missing.lua").0, 404);
    assert_eq!(http_get(d.http, "/../etc/passwd.lua").0, 403);
}
