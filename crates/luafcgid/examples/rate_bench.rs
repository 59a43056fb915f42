//! What a rate check costs: `Limiters::check` for a policy with `per_client` only and with
//! all three keyed limits, one client and many, on one thread.
//!
//! `cargo run --release -p luafcgid --example rate_bench`

use std::path::Path;
use std::time::{Duration, Instant};

use luafcgid::ratelimit::{Limiters, Subject};
use luafcgid_policy::{Rate, RateLimits};

fn rate() -> Option<Rate> {
    Some(Rate {
        count: 1_000_000_000,
        per: Duration::from_secs(1),
    })
}

fn bench(name: &str, limits: &Limiters, rate: &RateLimits, clients: &[String]) {
    const N: usize = 2_000_000;
    let script = Path::new("/srv/www/acme/hello.lua");
    let start = Instant::now();
    for i in 0..N {
        let subject = Subject {
            client: clients[i % clients.len()].as_bytes(),
            script,
            tenant: "acme",
        };
        std::hint::black_box(limits.check(rate, &subject));
    }
    let ns = start.elapsed().as_nanos() as f64 / N as f64;
    println!("{name}: {ns:.0} ns per check");
}

fn main() {
    let one = vec!["192.0.2.1".to_string()];
    let many: Vec<String> = (0..10_000u32)
        .map(|i| std::net::Ipv4Addr::from_bits(0x0a00_0000 + i).to_string())
        .collect();
    let v6: Vec<String> = (0..10_000u32)
        .map(|i| format!("2001:db8:{:x}:{:x}::1", i >> 8, i & 0xff))
        .collect();
    let none = RateLimits::default();
    let client = RateLimits {
        per_client: rate(),
        ..RateLimits::default()
    };
    let all = RateLimits {
        per_client: rate(),
        per_script: rate(),
        per_tenant: rate(),
        burst: None,
    };
    let limits = Limiters::new(None);
    bench("no limit set", &limits, &none, &one);
    bench("per_client, one client", &limits, &client, &one);
    bench("per_client, 10,000 IPv4 clients", &limits, &client, &many);
    bench("per_client, 10,000 IPv6 /64s", &limits, &client, &v6);
    bench("per_client + per_script + per_tenant", &limits, &all, &many);
    let global = Limiters::new(rate());
    bench("rate_global only", &global, &none, &one);
}
