//! [`Ceiling`]: the most a policy may grant, field by field, and who said so.
//!
//! A ceiling is a set of optional maxima over the fields that are limits (every [`Field`]
//! but `tenant`, `deny` and `entry`; `vars` are not limits either). An absent maximum is
//! unbounded. "Narrower" means: a lower number; for `libs` a subset; for `persistent`,
//! `modules` and `show_errors`, `false`; for rates fewer requests per second, an absent or
//! zero (`"0/s"`) rate being no limit at all and so the widest; for `rate.burst` a lower
//! burst, absent being the widest; for `state_max_requests` and `state_max_age` a lower
//! value, `0` ("never retire") being the widest.
//!
//! This module compares, narrows and clamps values. It does not know where ceilings come
//! from (the config, policy files) beyond the [`SetBy`] label each bound carries for
//! messages, and it reads no files.

use std::fmt;

use crate::field::{Field, SetBy};
use crate::{Policy, PolicyError, PolicyFields};

/// The most a policy may grant. Fields without a maximum are unbounded.
#[derive(Debug, Clone, PartialEq)]
pub struct Ceiling {
    /// The maxima, for the bound fields; the other fields' values mean nothing.
    limits: Policy,
    /// Who set each bound field's maximum; `None`: unbounded.
    set_by: [Option<SetBy>; Field::COUNT],
}

/// A value above its ceiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The field over its ceiling.
    pub field: Field,
    /// `timeout_ms = 5s exceeds the ceiling of 2s set by policy.toml`.
    pub message: String,
    /// For `libs`: the position of the first library the ceiling does not allow.
    pub(crate) item: Option<usize>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Default for Ceiling {
    fn default() -> Self {
        Ceiling::unbounded()
    }
}

impl Ceiling {
    /// No maxima at all.
    pub fn unbounded() -> Ceiling {
        Ceiling {
            limits: Policy::default(),
            set_by: Default::default(),
        }
    }

    /// A ceiling from a `[ceiling]` table (the config's, or a policy file's): the fields it
    /// sets are bound, the others unbounded. Values are validated as in [`Policy::apply`];
    /// fields that are not limits (`tenant`, `deny`, `entry`, `vars`, nested `script` or
    /// `ceiling`) are refused. Every bound is labelled [`SetBy::Config`].
    pub fn from_fields(fields: &PolicyFields) -> Result<Ceiling, PolicyError> {
        let refuse = |key: &'static str| PolicyError::Invalid {
            key,
            message: "is not a limit and cannot appear in a [ceiling] table".into(),
        };
        if let Some(f) = Field::set_in(fields).find(|f| !f.has_ceiling()) {
            return Err(refuse(f.name()));
        }
        if fields.vars.is_some() {
            return Err(refuse("vars"));
        }
        if fields.script.is_some() {
            return Err(refuse("script"));
        }
        if fields.ceiling.is_some() {
            return Err(refuse("ceiling"));
        }
        let mut limits = Policy::default();
        limits.apply(fields)?;
        let mut set_by: [Option<SetBy>; Field::COUNT] = Default::default();
        for f in Field::set_in(fields) {
            set_by[f.index()] = Some(SetBy::Config);
        }
        Ok(Ceiling { limits, set_by })
    }

    /// A ceiling binding every limit field to `p`'s value (absent rates and zero
    /// retirement limits stay "no limit"), labelled [`SetBy::Config`]. For a daemon that
    /// keeps its ceiling as a [`Policy`].
    pub fn from_policy(p: &Policy) -> Ceiling {
        let mut set_by: [Option<SetBy>; Field::COUNT] = Default::default();
        for f in Field::ALL.into_iter().filter(|f| f.has_ceiling()) {
            set_by[f.index()] = Some(SetBy::Config);
        }
        Ceiling {
            limits: p.clone(),
            set_by,
        }
    }

    /// Whether `field` has a maximum.
    pub fn bounds(&self, field: Field) -> bool {
        self.set_by[field.index()].is_some()
    }

    /// The maximum of `field`, shown with units; `None` when unbounded.
    pub fn limit(&self, field: Field) -> Option<String> {
        self.bounds(field).then(|| field.show(&self.limits))
    }

    /// Who set the maximum of `field`.
    pub fn set_by(&self, field: Field) -> Option<&SetBy> {
        self.set_by[field.index()].as_ref()
    }

    /// Relabels every bound as set by `by`.
    pub(crate) fn labelled(mut self, by: &SetBy) -> Ceiling {
        for s in self.set_by.iter_mut().flatten() {
            *s = by.clone();
        }
        self
    }

    /// `Some` when `field` of `p` is above this ceiling.
    fn over(&self, field: Field, p: &Policy, prefix: &str) -> Option<Violation> {
        let by = self.set_by(field)?;
        if field == Field::Libs {
            let i = p
                .libs
                .iter()
                .position(|l| !crate::lib_allows(&self.limits.libs, l))?;
            let allowed = if self.limits.libs.is_empty() {
                "none".to_string()
            } else {
                self.limits.libs.join(", ")
            };
            return Some(Violation {
                field,
                message: format!(
                    "{prefix}libs includes {:?}, which the ceiling set by {by} does not allow (allowed: {allowed})",
                    p.libs[i]
                ),
                item: Some(i),
            });
        }
        let (value, max) = (field.width(p)?, field.width(&self.limits)?);
        (value > max).then(|| Violation {
            field,
            message: format!(
                "{prefix}{} = {} exceeds the ceiling of {} set by {by}",
                field.name(),
                field.show(p),
                field.show(&self.limits)
            ),
            item: None,
        })
    }

    /// The `fields` of `p` that are above this ceiling.
    pub fn check(&self, p: &Policy, fields: impl IntoIterator<Item = Field>) -> Vec<Violation> {
        fields
            .into_iter()
            .filter_map(|f| self.over(f, p, ""))
            .collect()
    }

    /// Every limit of `p` that is above this ceiling: for the config's `[defaults]`, which
    /// must lie within the config's `[ceiling]`.
    pub fn permits(&self, p: &Policy) -> Result<(), Vec<Violation>> {
        let v = self.check(p, Field::ALL);
        if v.is_empty() {
            Ok(())
        } else {
            Err(v)
        }
    }

    /// The maxima of `own` (a policy file's `[ceiling]`) that would widen this one.
    pub fn check_ceiling(&self, own: &Ceiling) -> Vec<Violation> {
        Field::ALL
            .into_iter()
            .filter(|f| own.bounds(*f))
            .filter_map(|f| self.over(f, &own.limits, "[ceiling] "))
            .collect()
    }

    /// The ceiling below a directory whose file carries `own`: field by field, the
    /// narrower of the two (this one on a tie). `libs` bound by both: the intersection.
    pub fn narrowed(&self, own: &Ceiling) -> Ceiling {
        let mut out = self.clone();
        for f in Field::ALL.into_iter().filter(|f| own.bounds(*f)) {
            let take_own = match (self.bounds(f), f) {
                (false, _) => true,
                (true, Field::Libs) => {
                    out.limits.libs = crate::lib_intersection(&self.limits.libs, &own.limits.libs);
                    out.set_by[f.index()] = if out.limits.libs == self.limits.libs {
                        self.set_by[f.index()].clone()
                    } else {
                        own.set_by[f.index()].clone()
                    };
                    false
                }
                (true, _) => f.width(&own.limits) < f.width(&self.limits),
            };
            if take_own {
                f.copy(&own.limits, &mut out.limits);
                out.set_by[f.index()] = own.set_by[f.index()].clone();
            }
        }
        out
    }

    /// Lowers every value of `p` above this ceiling to the maximum (`libs`: drops the
    /// libraries not allowed). Returns the fields changed.
    pub fn clamp(&self, p: &mut Policy) -> Vec<Field> {
        let mut changed = Vec::new();
        for f in Field::ALL.into_iter().filter(|f| self.bounds(*f)) {
            if f == Field::Libs {
                let narrowed = crate::lib_intersection(&p.libs, &self.limits.libs);
                if narrowed != p.libs {
                    p.libs = narrowed;
                    changed.push(f);
                }
            } else if f.width(p) > f.width(&self.limits) {
                f.copy(&self.limits, p);
                changed.push(f);
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ceiling(src: &str) -> Ceiling {
        Ceiling::from_fields(&toml::from_str(src).unwrap()).unwrap()
    }

    fn policy(src: &str) -> Policy {
        let mut p = Policy::default();
        p.apply(&toml::from_str(src).unwrap()).unwrap();
        p
    }

    #[test]
    fn numbers_bools_libs_rates() {
        let c = ceiling(
            "timeout_ms = 2000\npersistent = false\nlibs = [\"string\"]\n[rate]\nper_client = \"10/s\"\nburst = 5",
        );
        let p = policy("timeout_ms = 5000\npersistent = true\nlibs = [\"string\", \"math\"]\n[rate]\nper_client = \"20/s\"\nburst = 6");
        let v = c.check(&p, Field::ALL);
        let fields: Vec<Field> = v.iter().map(|v| v.field).collect();
        assert_eq!(
            fields,
            vec![
                Field::TimeoutMs,
                Field::Persistent,
                Field::Libs,
                Field::RatePerClient,
                Field::RateBurst
            ]
        );
        assert_eq!(
            v[0].message,
            "timeout_ms = 5s exceeds the ceiling of 2s set by the config"
        );
        assert_eq!(v[2].item, Some(1));
        let ok = policy("timeout_ms = 2000\npersistent = false\nlibs = [\"string\"]\n[rate]\nper_client = \"600/min\"\nburst = 5");
        assert!(c.permits(&ok).is_ok());
    }

    #[test]
    fn absent_or_zero_means_widest() {
        let c = ceiling(
            "state_max_requests = 100\nstate_max_age = \"1h\"\n[rate]\nper_tenant = \"5/s\"",
        );
        let p = Policy::default();
        let over: Vec<Field> = c.check(&p, Field::ALL).iter().map(|v| v.field).collect();
        assert_eq!(
            over,
            vec![
                Field::StateMaxRequests,
                Field::StateMaxAge,
                Field::RatePerTenant
            ]
        );
        let off = policy("[rate]\nper_tenant = \"0/s\"");
        assert_eq!(c.check(&off, [Field::RatePerTenant]).len(), 1);
        let zero = ceiling("state_max_requests = 0");
        assert!(
            zero.permits(&p).is_ok(),
            "a ceiling of 0 retires never: no bound"
        );
    }

    #[test]
    fn refuses_non_limits() {
        for src in [
            "tenant = \"x\"",
            "deny = true",
            "entry = \"main\"",
            "[vars]\na = 1",
            "[ceiling]\nclones = 1",
        ] {
            assert!(
                Ceiling::from_fields(&toml::from_str(src).unwrap()).is_err(),
                "{src}"
            );
        }
    }

    #[test]
    fn narrowing_and_clamping() {
        let parent = ceiling("timeout_ms = 2000\nlibs = [\"string\", \"math\"]");
        let own = ceiling("timeout_ms = 500\nmemory = \"8MiB\"\nlibs = [\"math\"]")
            .labelled(&SetBy::File("a/policy.toml".into()));
        let n = parent.narrowed(&own);
        assert_eq!(n.limit(Field::TimeoutMs).as_deref(), Some("500ms"));
        assert_eq!(n.limit(Field::Memory).as_deref(), Some("8MiB"));
        assert_eq!(n.limit(Field::Libs).as_deref(), Some("[\"math\"]"));
        assert_eq!(
            n.set_by(Field::TimeoutMs),
            Some(&SetBy::File("a/policy.toml".into()))
        );
        let wider = ceiling("timeout_ms = 9000");
        assert_eq!(
            parent.narrowed(&wider).limit(Field::TimeoutMs).as_deref(),
            Some("2s")
        );
        assert_eq!(parent.check_ceiling(&wider).len(), 1);
        assert!(parent.check_ceiling(&own).is_empty());

        let mut p = Policy::default();
        let changed = n.clamp(&mut p);
        assert_eq!(changed, vec![Field::TimeoutMs, Field::Memory, Field::Libs]);
        assert_eq!(p.timeout, Duration::from_millis(500));
        assert_eq!(p.libs, vec!["math".to_string()]);
        assert!(n.clamp(&mut p).is_empty(), "clamping twice changes nothing");
    }
}
