//! Integration tests of the policy tree: real files in temporary directories.

mod ceilings;
mod check;
mod explain;
mod files;
mod fuzz;
mod inherit;
mod parse;
mod presets;
mod reload;
mod support;
