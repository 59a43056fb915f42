//! `policy explain`: the effective policy of a script as text, each value with its units
//! and the layer that set it, then the tenant, the files applied and the ceiling in force.
//!
//! Output is for people, not for parsing; it may change. It shows `[vars]` values, so it is
//! for the operator's terminal, never for error pages or the audit log.

use std::fmt::Write;
use std::path::Path;

use crate::field::Field;
use crate::tree::{Effective, PolicyTree, Resolution};

impl Effective {
    /// The effective policy as text: one line per field with its value and source.
    pub fn explain(&self) -> String {
        let mut out = String::new();
        let tenant = if self.tenant.is_empty() {
            "\"\" (scripts directly in the document root)".to_string()
        } else {
            format!("{:?}", self.tenant)
        };
        let named = match &self.tenant_named_by {
            Some(by) => format!("named by {}", by.display()),
            None => "named after its directory".to_string(),
        };
        let files = if self.files.is_empty() {
            "none".to_string()
        } else {
            let f: Vec<String> = self.files.iter().map(|p| p.display().to_string()).collect();
            f.join(", ")
        };
        let _ = writeln!(out, "document root  {}", self.root.display());
        let _ = writeln!(out, "tenant         {tenant}, {named}");
        let _ = writeln!(out, "tenant root    {}", self.tenant_root.display());
        let _ = writeln!(out, "policy files   {files}");
        let _ = writeln!(
            out,
            "access         {}",
            if self.denied {
                "denied (deny = true): every request answers 403"
            } else {
                "allowed"
            }
        );
        let _ = writeln!(out, "generation     {}", self.generation);
        let _ = writeln!(out, "\neffective policy");
        for f in Field::ALL.into_iter().filter(|f| *f != Field::Tenant) {
            let _ = writeln!(
                out,
                "  {:<20} {:<24} {}",
                f.name(),
                f.show(&self.policy),
                self.provenance.field(f)
            );
        }
        for (name, value) in &self.policy.vars {
            let source = self
                .provenance
                .var(name)
                .map(|s| s.to_string())
                .unwrap_or_default();
            let key = format!("vars.{name}");
            let _ = writeln!(out, "  {key:<20} {:<24} {source}", format!("{value:?}"));
        }
        let _ = writeln!(
            out,
            "\nceiling in force (bounds the policy files of this directory)"
        );
        for f in Field::ALL.into_iter().filter(|f| f.has_ceiling()) {
            match (self.ceiling.limit(f), self.ceiling.set_by(f)) {
                (Some(limit), Some(by)) => {
                    let _ = writeln!(out, "  {:<20} {limit:<24} set by {by}", f.name());
                }
                _ => {
                    let _ = writeln!(out, "  {:<20} unbounded", f.name());
                }
            }
        }
        out
    }
}

impl PolicyTree {
    /// `policy explain SCRIPT`: resolves `script` (canonicalised first: this is a tool, not
    /// the request path; a script that does not exist yet is placed by its directory) and
    /// describes the outcome.
    pub fn explain(&self, script: &Path) -> String {
        // A script that does not exist yet is explained by its directory.
        let real = std::fs::canonicalize(script).or_else(|e| {
            match (script.parent(), script.file_name()) {
                (Some(dir), Some(name)) => {
                    let dir = if dir.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        dir
                    };
                    std::fs::canonicalize(dir).map(|d| d.join(name))
                }
                _ => Err(e),
            }
        });
        let real = match real {
            Ok(p) => p,
            Err(e) => return format!("{}: cannot be resolved: {}\n", script.display(), e.kind()),
        };
        let head = format!("script         {}\n", real.display());
        match self.resolve(&real) {
            Resolution::Allowed(e) | Resolution::Denied(e) => head + &e.explain(),
            Resolution::Invalid(p) => {
                format!("{head}policy error   every script here answers 500 policy_error\n  {p}\n")
            }
            Resolution::Outside => format!("{head}not below any document root\n"),
        }
    }
}
