//! End to end through a real nginx on loopback (started and stopped by the test), with
//! keep-alive upstreams to the daemon over a unix socket and over TCP.

use crate::support::*;

#[test]
fn through_nginx_over_unix_and_tcp() {
    let mut d = Daemon::start(
        "[defaults]\nbody = \"2MiB\"\n",
        &[
            ("hello.lua", HELLO),
            (
                "post.lua",
                "function handler(r) local b = r:body() or '' local sum = 0 for i = 1, #b, 997 do sum = sum + b:byte(i) end return #b .. ':' .. sum end",
            ),
        ],
    );
    let nginx = start_nginx(&d.dir.path().join("nginx"), |port| {
        format!(
            r#"
    upstream via_unix {{ server unix:{unix}; keepalive 8; }}
    upstream via_tcp {{ server {tcp}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location ~ ^/unix(/.+\.lua)$ {{
            fastcgi_param SCRIPT_FILENAME $document_root$1;
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_param QUERY_STRING $query_string;
            fastcgi_param CONTENT_LENGTH $content_length;
            fastcgi_param REQUEST_URI $request_uri;
            fastcgi_param REMOTE_ADDR $remote_addr;
            fastcgi_keep_conn on;
            fastcgi_pass via_unix;
        }}
        location ~ ^/tcp(/.+\.lua)$ {{
            fastcgi_param SCRIPT_FILENAME $document_root$1;
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_param QUERY_STRING $query_string;
            fastcgi_param CONTENT_LENGTH $content_length;
            fastcgi_param REQUEST_URI $request_uri;
            fastcgi_param REMOTE_ADDR $remote_addr;
            fastcgi_keep_conn on;
            fastcgi_pass via_tcp;
        }}
    }}
"#,
            unix = d.unix.display(),
            tcp = d.tcp,
            root = d.root.display(),
        )
    });
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let expected_sum: u64 = (0..1_000_000usize)
        .step_by(997)
        .map(|i| body[i] as u64)
        .sum();
    for via in ["unix", "tcp"] {
        for _ in 0..3 {
            let r = nginx.http("GET", &format!("/{via}/hello.lua"), b"");
            assert_eq!(r.status, 200, "{via}");
            assert_eq!(r.body, b"Hello World");
        }
        let r = nginx.http("POST", &format!("/{via}/post.lua"), &body);
        assert_eq!(r.status, 200, "{via} POST");
        assert_eq!(r.text(), format!("1000000:{expected_sum}"));
        let r = nginx.http("GET", &format!("/{via}/missing.lua"), b"");
        assert_eq!(r.status, 404);
    }
    drop(nginx);
    let lines = d.stop();
    assert_eq!(requests(&lines).len(), 10, "one audit line per request");
}
