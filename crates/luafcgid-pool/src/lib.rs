//! The state pool of luafcgid.
//!
//! [`StatePool`] keeps idle Lua states per script (up to `clones` per script and `states` in
//! all), hands them out one request at a time, and evicts idle states of the least popular
//! scripts (request counts that decay with age) when the total is reached. It notices changed
//! or deleted script and module files ([`StatePool::sweep`]) and retires their states. It
//! also holds each script's admission semaphore (its `clones`).
//!
//! It does not know FastCGI, HTTP or policy files: the daemon gives each checkout the
//! [`StateOptions`] to build a state with and decides what a request's outcome means.

#![forbid(unsafe_code)]

mod pool;

pub use luafcgid_sandbox::StateOptions;
pub use pool::{
    Admission, FileStamp, Lease, PoolStats, Pooled, Retire, ScriptKey, StatePool, Version,
};
