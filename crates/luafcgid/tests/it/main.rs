//! Integration tests: the daemon in-process, spoken to over real sockets.

mod admission;
mod audit;
mod cli;
mod corpus;
mod fastcgi;
mod http;
mod legacy_config;
mod nginx;
mod policies;
mod rates;
mod scripts;
mod support;
