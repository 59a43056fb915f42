//! End to end through a real nginx on loopback (started and stopped by the test), with
//! keep-alive upstreams to the daemon over a unix socket and over TCP.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

struct Nginx {
    child: Child,
    port: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_nginx(d: &Daemon) -> Nginx {
    let binary = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("nginx is required for the end-to-end test (apt-get install -y nginx)");
    let prefix = d.dir.path().join("nginx");
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    for attempt in 0..5 {
        let port = free_port();
        let conf = format!(
            r#"
daemon off;
master_process off;
worker_processes 1;
error_log {prefix}/logs/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_max_body_size 4m;
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
}}
"#,
            prefix = prefix.display(),
            unix = d.unix.display(),
            tcp = d.tcp,
            root = d.root.display(),
        );
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut child = Command::new(binary)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Ready when the port accepts; give up if nginx exits (port taken) and retry.
        let t = Instant::now();
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Nginx { child, port };
            }
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = std::fs::read_to_string(prefix.join("logs/error.log")).unwrap_or_default();
        eprintln!("nginx attempt {attempt} failed: {log}");
    }
    panic!("nginx could not start");
}

fn http(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let status = std::str::from_utf8(&out[9..12]).unwrap().parse().unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    (status, out[split + 4..].to_vec())
}

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
    let nginx = start_nginx(&d);
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let expected_sum: u64 = (0..1_000_000usize)
        .step_by(997)
        .map(|i| body[i] as u64)
        .sum();
    for via in ["unix", "tcp"] {
        for _ in 0..3 {
            let (status, b) = http(nginx.port, "GET", &format!("/{via}/hello.lua"), b"");
            assert_eq!(status, 200, "{via}");
            assert_eq!(b, b"Hello World");
        }
        let (status, b) = http(nginx.port, "POST", &format!("/{via}/post.lua"), &body);
        assert_eq!(status, 200, "{via} POST");
        assert_eq!(
            String::from_utf8(b).unwrap(),
            format!("1000000:{expected_sum}")
        );
        let (status, _) = http(nginx.port, "GET", &format!("/{via}/missing.lua"), b"");
        assert_eq!(status, 404);
    }
    drop(nginx);
    let lines = d.stop();
    assert_eq!(requests(&lines).len(), 10, "one audit line per request");
}
