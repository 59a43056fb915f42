//! CGI responses as the front end sends them in `STDOUT`: the status line, the default,
//! global and script headers, `X-Request-Id`, `Content-Length`, a blank line and the body;
//! and the generic error pages, which show the status and the request id and nothing a
//! script or path could put there unless `show_errors` asks for it (then HTML-escaped).

use luafcgid_sandbox::{status_reason, Response};

/// What every response starts from.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub status: u16,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
}

fn reason(code: u16) -> &'static str {
    match status_reason(code) {
        "" => "Unknown",
        r => r,
    }
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The decimal digits of 0 to 99, two bytes each.
const DIGIT_PAIRS: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// Appends `n` in decimal, two digits at a time.
pub(crate) fn push_number(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    } else {
        at -= 1;
        digits[at] = b'0' + n as u8;
    }
    out.extend_from_slice(&digits[at..]);
}

fn push_status(out: &mut Vec<u8>, code: u16) {
    if code == 200 {
        // Most replies: one copy instead of five pieces.
        out.extend_from_slice(b"Status: 200 OK\r\n");
        return;
    }
    out.extend_from_slice(b"Status: ");
    push_number(out, u64::from(code));
    out.push(b' ');
    out.extend_from_slice(reason(code).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes a script's response as CGI output. `head`: headers only.
pub fn render(resp: &Response, d: &Defaults, request_id: &str, head: bool, out: &mut Vec<u8>) {
    push_status(out, resp.status.unwrap_or(d.status));
    push_header(
        out,
        "Content-Type",
        resp.content_type.as_deref().unwrap_or(&d.content_type),
    );
    for (n, v) in &d.headers {
        push_header(out, n, v);
    }
    for (n, v) in &resp.headers {
        push_header(out, n, v);
    }
    push_header(out, "X-Request-Id", request_id);
    out.extend_from_slice(b"Content-Length: ");
    push_number(out, resp.body.len() as u64);
    out.extend_from_slice(b"\r\n\r\n");
    if !head {
        out.extend_from_slice(&resp.body);
    }
}

/// Escapes text for HTML.
pub fn html_escape(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => s.push_str("&lt;"),
            '>' => s.push_str("&gt;"),
            '&' => s.push_str("&amp;"),
            '"' => s.push_str("&quot;"),
            '\'' => s.push_str("&#39;"),
            c => s.push(c),
        }
    }
    s
}

/// Writes a generic error page. `detail` is shown (escaped) only when given, which the
/// caller does only under `show_errors`. `retry_after` adds `Retry-After` (seconds).
pub fn error_page(
    code: u16,
    request_id: &str,
    detail: Option<&str>,
    retry_after: Option<u64>,
    head: bool,
    out: &mut Vec<u8>,
) {
    let phrase = reason(code);
    let mut body = format!(
        "<!DOCTYPE html>\n<html><head><title>{code} {phrase}</title></head><body>\n<h1>{code} {phrase}</h1>\n<p>Request id: {request_id}</p>\n"
    );
    if let Some(d) = detail {
        body.push_str("<pre>");
        body.push_str(&html_escape(d));
        body.push_str("</pre>\n");
    }
    body.push_str("</body></html>\n");
    push_status(out, code);
    push_header(out, "Content-Type", "text/html; charset=utf-8");
    if let Some(s) = retry_after {
        push_header(out, "Retry-After", &s.to_string());
    }
    push_header(out, "X-Request-Id", request_id);
    push_header(out, "Content-Length", &body.len().to_string());
    out.extend_from_slice(b"\r\n");
    if !head {
        out.extend_from_slice(body.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_in_decimal() {
        let mut cases: Vec<u64> = vec![0, 9, 10, 99, 100, 101, 999, 1000, 65_535, u64::MAX];
        cases.extend((0..20).map(|k| 10u64.pow(k)));
        cases.extend((1..20).map(|k| 10u64.pow(k) - 1));
        cases.extend((0..2000).map(|i| i * 7919));
        for n in cases {
            let mut out = b"x".to_vec();
            push_number(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
    }

    #[test]
    fn response_has_headers_in_order() {
        let d = Defaults {
            status: 200,
            content_type: "text/html".into(),
            headers: vec![("X-Powered-By".into(), "Lua".into())],
        };
        let r = Response {
            status: Some(404),
            headers: vec![("X-A".into(), "1".into())],
            body: b"nope".to_vec(),
            ..Response::default()
        };
        let mut out = Vec::new();
        render(&r, &d, "00000000000000ab", false, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Status: 404 Not Found\r\nContent-Type: text/html\r\nX-Powered-By: Lua\r\nX-A: 1\r\nX-Request-Id: 00000000000000ab\r\nContent-Length: 4\r\n\r\nnope"
        );
    }

    #[test]
    fn status_lines_name_their_code() {
        for (code, line) in [
            (200, "Status: 200 OK\r\n"),
            (201, "Status: 201 Created\r\n"),
            (404, "Status: 404 Not Found\r\n"),
            (599, "Status: 599 Unknown\r\n"),
        ] {
            let mut out = Vec::new();
            push_status(&mut out, code);
            assert_eq!(String::from_utf8(out).unwrap(), line);
        }
    }

    #[test]
    fn error_page_escapes_detail() {
        let mut out = Vec::new();
        error_page(500, "id", Some("<script>x</script>"), None, false, &mut out);
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("&lt;script&gt;"));
        assert!(!s.contains("<script>"));
    }
}
