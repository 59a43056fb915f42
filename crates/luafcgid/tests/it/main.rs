//! Integration tests: the daemon in-process, spoken to over real sockets.

mod admission;
mod audit;
mod cli;
mod corpus;
mod fastcgi;
mod faults;
mod frontends;
mod http;
mod legacy_config;
mod metrics;
mod nginx;
mod operations;
mod policies;
mod rates;
mod scripts;
mod support;
