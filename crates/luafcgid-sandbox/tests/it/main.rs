//! Integration tests of luafcgid-sandbox: each module covers one part of the script API.

mod entry;
mod escapes;
mod hardening;
mod helpers;
mod limits;
mod modules;
mod pattern;
mod request;
mod restricted;
mod support;
