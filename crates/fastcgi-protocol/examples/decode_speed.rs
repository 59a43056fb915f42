//! Measures the codec's cost per request for a typical nginx request (30
//! params in one padded record, empty body) and for encoding a small response.
//!
//! Run: `cargo run --release -p fastcgi-protocol --example decode_speed`

use std::hint::black_box;
use std::time::Instant;

use fastcgi_protocol::{client, encode_response, Decoder, Event, Limits, Status};

fn nginx_request() -> Vec<u8> {
    let pairs: &[(&str, &str)] = &[
        ("QUERY_STRING", "a=1&b=2"),
        ("REQUEST_METHOD", "GET"),
        ("CONTENT_TYPE", ""),
        ("CONTENT_LENGTH", ""),
        ("SCRIPT_NAME", "/hello.lua"),
        ("REQUEST_URI", "/hello.lua?a=1&b=2"),
        ("DOCUMENT_URI", "/hello.lua"),
        ("DOCUMENT_ROOT", "/srv/www"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("REQUEST_SCHEME", "http"),
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("SERVER_SOFTWARE", "nginx/1.22.1"),
        ("REMOTE_ADDR", "127.0.0.1"),
        ("REMOTE_PORT", "51234"),
        ("SERVER_ADDR", "127.0.0.1"),
        ("SERVER_PORT", "80"),
        ("SERVER_NAME", "localhost"),
        ("REDIRECT_STATUS", "200"),
        ("HTTP_HOST", "localhost:8080"),
        (
            "HTTP_USER_AGENT",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        (
            "HTTP_ACCEPT",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        ),
        ("HTTP_ACCEPT_LANGUAGE", "en-US,en;q=0.5"),
        ("HTTP_ACCEPT_ENCODING", "gzip, deflate, br"),
        ("HTTP_CONNECTION", "keep-alive"),
        (
            "HTTP_COOKIE",
            "session=0123456789abcdef0123456789abcdef; theme=dark",
        ),
        ("HTTP_UPGRADE_INSECURE_REQUESTS", "1"),
        ("HTTP_SEC_FETCH_DEST", "document"),
        ("HTTP_SEC_FETCH_MODE", "navigate"),
        ("HTTP_CACHE_CONTROL", "max-age=0"),
        ("SCRIPT_FILENAME", "/srv/www/hello.lua"),
    ];
    let mut out = Vec::new();
    client::encode_request(
        1,
        true,
        pairs.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        b"",
        &mut out,
    );
    out
}

fn main() {
    let wire = nginx_request();
    let mut decoder = Decoder::new(Limits::default());
    let iterations = 2_000_000u32;
    let start = Instant::now();
    let mut found = 0usize;
    for _ in 0..iterations {
        let mut buf = &wire[..];
        while let Ok(Status::Complete((used, event))) = decoder.decode(black_box(buf)) {
            buf = &buf[used..];
            if let Some(Event::Request(r)) = event {
                if let Ok(p) = &r.params {
                    found += p.get(b"SCRIPT_FILENAME").map_or(0, <[u8]>::len);
                    found += p.get(b"REQUEST_METHOD").map_or(0, <[u8]>::len);
                }
                decoder.finish(r.id);
            }
        }
    }
    let per = start.elapsed() / iterations;
    println!(
        "decode {}-byte nginx request (30 params) + 2 lookups + finish: {:?}/request ({found})",
        wire.len(),
        per
    );

    let body =
        b"Status: 200 OK\r\nContent-Type: text/html\r\nContent-Length: 11\r\n\r\nHello World";
    let mut out = Vec::with_capacity(256);
    let start = Instant::now();
    for _ in 0..iterations {
        out.clear();
        encode_response(1, black_box(body), &mut out);
        black_box(&out);
    }
    println!(
        "encode_response ({} bytes): {:?}/response",
        out.len(),
        start.elapsed() / iterations
    );
}
