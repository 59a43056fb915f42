//! Integration tests of luafcgid-sandbox: each module covers one part of the script API.

mod entry;
mod escapes;
mod helpers;
mod limits;
mod modules;
mod request;
mod restricted;
mod support;
