//! Integration tests: the daemon in-process, spoken to over real sockets.

mod admission;
mod audit;
mod cli;
mod corpus;
mod fastcgi;
mod frontends;
mod http;
mod nginx;
mod policies;
mod rates;
mod scripts;
mod support;
