//! luafcgid: a sandboxed, stateful FastCGI daemon for Lua 5.4.
//!
//! This crate is the daemon: configuration ([`config`]), listeners and connections
//! ([`server`], [`conn`], [`http`]), script resolution ([`resolve`]), dispatch to the Lua
//! workers ([`dispatch`]), responses ([`render`]) and the audit log ([`audit`]). The codec,
//! the sandbox, the policy fields and the state pool live in their own crates; this is the
//! only crate that knows all of them (see ARCHITECTURE.md). [`server::Server`] can be bound
//! and run from tests on `127.0.0.1:0` or a unix socket.

pub mod admission;
pub mod audit;
pub mod cli;
pub mod config;
pub mod conn;
pub mod dispatch;
pub mod http;
pub mod legacy_config;
pub mod metrics;
pub mod oneshot;
pub mod outcome;
pub mod probe;
pub mod ratelimit;
pub mod render;
pub mod request_id;
pub mod resolve;
pub mod server;
pub mod socket;
pub mod system;
