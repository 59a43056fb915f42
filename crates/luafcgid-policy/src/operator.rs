//! [`OperatorPolicy`]: the daemon config's `[defaults]` and `[ceiling]`, the top of every
//! policy chain.
//!
//! [`OperatorPolicy::from_config`] reads those two tables out of the config's text, with
//! lines, and checks that the defaults lie within the ceiling; every other key of the config
//! is ignored here (the daemon's own config type reads them). [`OperatorPolicy::new`] wraps
//! values the daemon has already validated. Nothing here reads files.

use std::path::Path;

use crate::ceiling::Ceiling;
use crate::field::{Field, Source};
use crate::file::{Lines, Nested, Section, Walk};
use crate::problem::Problem;
use crate::{Policy, PolicyFields};

/// The operator's policy: defaults where no policy file says otherwise, and the root
/// ceiling no policy file may exceed.
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorPolicy {
    /// The effective policy of a script no policy file touches.
    pub defaults: Policy,
    /// The most any policy file may grant.
    pub ceiling: Ceiling,
    /// Which fields the config's `[defaults]` wrote (beyond those differing from built-in).
    written: [bool; Field::COUNT],
}

impl OperatorPolicy {
    /// Wraps already validated values. A default that differs from [`Policy::default`] is
    /// reported as set by `config` in explanations, the others as `built-in`. Defaults above
    /// the ceiling are not refused here (check with [`Ceiling::permits`] first); a
    /// [`crate::PolicyTree`] lowers them to the ceiling.
    pub fn new(defaults: Policy, ceiling: Ceiling) -> OperatorPolicy {
        OperatorPolicy {
            defaults,
            ceiling,
            written: [false; Field::COUNT],
        }
    }

    /// Reads the `[defaults]` and `[ceiling]` tables of the daemon config `text` (read from
    /// `path`, named in problems) and checks the defaults against the ceiling. Problems
    /// name the line and key: a default above the ceiling points at the default when the
    /// config wrote it, else at the ceiling's key (the built-in value is what exceeds it).
    pub fn from_config(path: &Path, text: &str) -> Result<OperatorPolicy, Vec<Problem>> {
        let mut walk = Walk::new(path, text);
        let Some(doc) = walk.document(text) else {
            return Err(walk.problems);
        };
        let mut read = |name: &str, section: Section, lines: &mut Lines| -> PolicyFields {
            let Some((k, v)) = doc.get_ref().iter().find(|(k, _)| k.get_ref() == name) else {
                return PolicyFields::default();
            };
            let line = walk.line_at(k.span().start);
            lines.insert("", line);
            match v.get_ref() {
                toml::de::DeValue::Table(t) => {
                    let prefix = format!("{name}.");
                    walk.table(t, section, &prefix, lines, &mut Nested::default())
                }
                _ => {
                    walk.problem(
                        Some(line),
                        Some(name.into()),
                        format!("`{name}` must be a table"),
                    );
                    PolicyFields::default()
                }
            }
        };
        let mut default_lines = Lines::default();
        let mut ceiling_lines = Lines::default();
        let defaults_fields = read("defaults", Section::Defaults, &mut default_lines);
        let ceiling_fields = read("ceiling", Section::Ceiling, &mut ceiling_lines);
        if !walk.problems.is_empty() {
            return Err(walk.problems);
        }
        let mut defaults = Policy::default();
        let ceiling = defaults
            .apply(&defaults_fields)
            .and_then(|()| Ceiling::from_fields(&ceiling_fields))
            .map_err(|e| vec![Problem::whole(path, e.to_string())])?;
        let mut written = [false; Field::COUNT];
        for f in Field::set_in(&defaults_fields) {
            written[f.index()] = true;
        }
        let mut problems = Vec::new();
        if let Err(violations) = ceiling.permits(&defaults) {
            for v in violations {
                let name = v.field.name();
                let (line, key, message) = if written[v.field.index()] {
                    let line = v
                        .item
                        .and_then(|i| default_lines.get(&format!("libs.{i}")))
                        .or_else(|| default_lines.get(name));
                    (
                        line,
                        format!("defaults.{name}"),
                        format!("[defaults] {}", v.message),
                    )
                } else {
                    (
                        ceiling_lines.get(name),
                        format!("ceiling.{name}"),
                        format!(
                            "[defaults] {} (built-in); set `{name}` in [defaults] within the ceiling",
                            v.message
                        ),
                    )
                };
                problems.push(Problem {
                    file: path.to_path_buf(),
                    line,
                    key: Some(key),
                    message,
                });
            }
        }
        if !problems.is_empty() {
            problems.sort_by_key(|p| p.line);
            return Err(problems);
        }
        Ok(OperatorPolicy {
            defaults,
            ceiling,
            written,
        })
    }

    /// Who set the default of `field`: `config` when the config wrote it or it differs
    /// from the built-in value, else `built-in`.
    pub fn source(&self, field: Field) -> Source {
        if self.written[field.index()] || !field.same(&self.defaults, &Policy::default()) {
            Source::Config
        } else {
            Source::BuiltIn
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tables_and_ignores_other_keys() {
        let text = "workers = 2\ndocroot = [\"/srv\"]\n[defaults]\ntimeout_ms = 500\n[ceiling]\ntimeout_ms = \"2s\"\n";
        let op = OperatorPolicy::from_config(Path::new("luafcgid.toml"), text).unwrap();
        assert_eq!(op.defaults.timeout, std::time::Duration::from_millis(500));
        assert_eq!(op.ceiling.limit(Field::TimeoutMs).as_deref(), Some("2s"));
        assert_eq!(op.source(Field::TimeoutMs), Source::Config);
        assert_eq!(op.source(Field::Memory), Source::BuiltIn);
    }

    #[test]
    fn defaults_above_the_ceiling_name_the_line() {
        let text = "[ceiling]\ntimeout_ms = 100\nclones = 1\n\n[defaults]\ntimeout_ms = 200\n";
        let problems = OperatorPolicy::from_config(Path::new("c.toml"), text).unwrap_err();
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            shown,
            vec![
                "c.toml:3: [defaults] clones = 2 exceeds the ceiling of 1 set by the config (built-in); set `clones` in [defaults] within the ceiling",
                "c.toml:6: [defaults] timeout_ms = 200ms exceeds the ceiling of 100ms set by the config",
            ]
        );
    }

    #[test]
    fn bad_tables_are_problems_with_lines() {
        let text = "[defaults]\ntenant = \"x\"\nmemory = \"1 parsec\"\n[ceiling]\ndeny = true\n";
        let problems = OperatorPolicy::from_config(Path::new("c.toml"), text).unwrap_err();
        let lines: Vec<Option<u32>> = problems.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![Some(2), Some(3), Some(5)], "{problems:?}");
        assert!(OperatorPolicy::from_config(Path::new("c.toml"), "defaults = 3").is_err());
        assert!(OperatorPolicy::from_config(Path::new("c.toml"), "[defaults\n").is_err());
    }
}
