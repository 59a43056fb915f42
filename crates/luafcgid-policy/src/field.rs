//! The policy fields by name, and where each effective value came from.
//!
//! [`Field`] names every scalar policy field (the `[rate]` keys as `rate.per_client` and so
//! on); it shows a [`Policy`]'s value with units and, for the fields a ceiling bounds, ranks
//! values from narrow to wide. [`Source`] and [`Provenance`] record which layer (built-in,
//! config, a policy file, a per-script table, a ceiling) set each value, for
//! `policy explain`. Nothing here reads files or decides what a ceiling allows; that is
//! [`crate::Ceiling`]'s job.

use std::fmt;
use std::path::PathBuf;

use crate::units::{format_duration, format_size};
use crate::{Policy, PolicyFields};

/// A scalar policy field. `vars`, `script` and `ceiling` are tables, not fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    Tenant,
    TimeoutMs,
    Instructions,
    Memory,
    Output,
    Body,
    InitTimeoutMs,
    InitInstructions,
    Clones,
    Persistent,
    StateMaxRequests,
    StateMaxAge,
    Libs,
    Modules,
    ShowErrors,
    Deny,
    Entry,
    RatePerClient,
    RatePerScript,
    RatePerTenant,
    RateBurst,
}

/// How wide a value is, for comparing with a ceiling: `Unlimited` is wider than any number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Width {
    Finite(u128),
    Unlimited,
}

impl Field {
    /// How many fields there are.
    pub const COUNT: usize = 21;

    /// Every field, in the order `policy explain` lists them.
    pub const ALL: [Field; Field::COUNT] = [
        Field::Tenant,
        Field::TimeoutMs,
        Field::Instructions,
        Field::Memory,
        Field::Output,
        Field::Body,
        Field::InitTimeoutMs,
        Field::InitInstructions,
        Field::Clones,
        Field::Persistent,
        Field::StateMaxRequests,
        Field::StateMaxAge,
        Field::Libs,
        Field::Modules,
        Field::ShowErrors,
        Field::Deny,
        Field::Entry,
        Field::RatePerClient,
        Field::RatePerScript,
        Field::RatePerTenant,
        Field::RateBurst,
    ];

    /// The key as written in a policy file (`"timeout_ms"`, `"rate.per_client"`).
    pub fn name(self) -> &'static str {
        match self {
            Field::Tenant => "tenant",
            Field::TimeoutMs => "timeout_ms",
            Field::Instructions => "instructions",
            Field::Memory => "memory",
            Field::Output => "output",
            Field::Body => "body",
            Field::InitTimeoutMs => "init_timeout_ms",
            Field::InitInstructions => "init_instructions",
            Field::Clones => "clones",
            Field::Persistent => "persistent",
            Field::StateMaxRequests => "state_max_requests",
            Field::StateMaxAge => "state_max_age",
            Field::Libs => "libs",
            Field::Modules => "modules",
            Field::ShowErrors => "show_errors",
            Field::Deny => "deny",
            Field::Entry => "entry",
            Field::RatePerClient => "rate.per_client",
            Field::RatePerScript => "rate.per_script",
            Field::RatePerTenant => "rate.per_tenant",
            Field::RateBurst => "rate.burst",
        }
    }

    /// The field with this key, if any.
    pub fn from_name(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether a ceiling bounds this field. `tenant`, `deny` and `entry` are not limits.
    pub fn has_ceiling(self) -> bool {
        !matches!(self, Field::Tenant | Field::Deny | Field::Entry)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// Whether `fields` sets this field.
    pub fn is_set_in(self, fields: &PolicyFields) -> bool {
        let rate = fields.rate.as_ref();
        match self {
            Field::Tenant => fields.tenant.is_some(),
            Field::TimeoutMs => fields.timeout_ms.is_some(),
            Field::Instructions => fields.instructions.is_some(),
            Field::Memory => fields.memory.is_some(),
            Field::Output => fields.output.is_some(),
            Field::Body => fields.body.is_some(),
            Field::InitTimeoutMs => fields.init_timeout_ms.is_some(),
            Field::InitInstructions => fields.init_instructions.is_some(),
            Field::Clones => fields.clones.is_some(),
            Field::Persistent => fields.persistent.is_some(),
            Field::StateMaxRequests => fields.state_max_requests.is_some(),
            Field::StateMaxAge => fields.state_max_age.is_some(),
            Field::Libs => fields.libs.is_some(),
            Field::Modules => fields.modules.is_some(),
            Field::ShowErrors => fields.show_errors.is_some(),
            Field::Deny => fields.deny.is_some(),
            Field::Entry => fields.entry.is_some(),
            Field::RatePerClient => rate.is_some_and(|r| r.per_client.is_some()),
            Field::RatePerScript => rate.is_some_and(|r| r.per_script.is_some()),
            Field::RatePerTenant => rate.is_some_and(|r| r.per_tenant.is_some()),
            Field::RateBurst => rate.is_some_and(|r| r.burst.is_some()),
        }
    }

    /// The fields `fields` sets, in [`Field::ALL`] order.
    pub fn set_in(fields: &PolicyFields) -> impl Iterator<Item = Field> + '_ {
        Field::ALL.into_iter().filter(|f| f.is_set_in(fields))
    }

    /// A copy of `fields` holding only this field (to validate one value at a time).
    pub(crate) fn only(self, fields: &PolicyFields) -> PolicyFields {
        let mut out = PolicyFields::default();
        let mut rate = crate::RateFields::default();
        let src_rate = fields.rate.clone().unwrap_or_default();
        match self {
            Field::Tenant => out.tenant = fields.tenant.clone(),
            Field::TimeoutMs => out.timeout_ms = fields.timeout_ms.clone(),
            Field::Instructions => out.instructions = fields.instructions,
            Field::Memory => out.memory = fields.memory.clone(),
            Field::Output => out.output = fields.output.clone(),
            Field::Body => out.body = fields.body.clone(),
            Field::InitTimeoutMs => out.init_timeout_ms = fields.init_timeout_ms.clone(),
            Field::InitInstructions => out.init_instructions = fields.init_instructions,
            Field::Clones => out.clones = fields.clones,
            Field::Persistent => out.persistent = fields.persistent,
            Field::StateMaxRequests => out.state_max_requests = fields.state_max_requests,
            Field::StateMaxAge => out.state_max_age = fields.state_max_age.clone(),
            Field::Libs => out.libs = fields.libs.clone(),
            Field::Modules => out.modules = fields.modules,
            Field::ShowErrors => out.show_errors = fields.show_errors,
            Field::Deny => out.deny = fields.deny,
            Field::Entry => out.entry = fields.entry.clone(),
            Field::RatePerClient => rate.per_client = src_rate.per_client,
            Field::RatePerScript => rate.per_script = src_rate.per_script,
            Field::RatePerTenant => rate.per_tenant = src_rate.per_tenant,
            Field::RateBurst => rate.burst = src_rate.burst,
        }
        if rate != crate::RateFields::default() {
            out.rate = Some(rate);
        }
        out
    }

    /// This field's value in `p`, with units (`"64MiB"`, `"250ms"`, `"20/s"`).
    pub fn show(self, p: &Policy) -> String {
        let never = |zero: bool, text: String| {
            if zero {
                format!("{text} (never)")
            } else {
                text
            }
        };
        let rate = |r: &Option<crate::Rate>| match r {
            Some(r) => r.to_string(),
            None => "no limit".to_string(),
        };
        match self {
            Field::Tenant => p.tenant.clone().unwrap_or_default(),
            Field::TimeoutMs => format_duration(p.timeout),
            Field::Instructions => p.instructions.to_string(),
            Field::Memory => format_size(p.memory),
            Field::Output => format_size(p.output),
            Field::Body => format_size(p.body),
            Field::InitTimeoutMs => format_duration(p.init_timeout),
            Field::InitInstructions => p.init_instructions.to_string(),
            Field::Clones => p.clones.to_string(),
            Field::Persistent => p.persistent.to_string(),
            Field::StateMaxRequests => {
                never(p.state_max_requests == 0, p.state_max_requests.to_string())
            }
            Field::StateMaxAge => {
                never(p.state_max_age.is_zero(), format_duration(p.state_max_age))
            }
            Field::Libs => {
                let names: Vec<String> = p.libs.iter().map(|l| format!("{l:?}")).collect();
                format!("[{}]", names.join(", "))
            }
            Field::Modules => p.modules.to_string(),
            Field::ShowErrors => p.show_errors.to_string(),
            Field::Deny => p.deny.to_string(),
            Field::Entry => match &p.entry {
                Some(e) => e.clone(),
                None => "main if defined, else handler".to_string(),
            },
            Field::RatePerClient => rate(&p.rate.per_client),
            Field::RatePerScript => rate(&p.rate.per_script),
            Field::RatePerTenant => rate(&p.rate.per_tenant),
            Field::RateBurst => match p.rate.burst {
                Some(b) => b.to_string(),
                None => "no limit".to_string(),
            },
        }
    }

    /// How wide this field's value in `p` is; `None` for `libs` (a set, compared as one)
    /// and for the fields no ceiling bounds. Zero retirement limits and absent or zero
    /// rates mean "no limit".
    pub(crate) fn width(self, p: &Policy) -> Option<Width> {
        let n = |v: u128| Some(Width::Finite(v));
        let zero_unlimited = |v: u128| {
            Some(if v == 0 {
                Width::Unlimited
            } else {
                Width::Finite(v)
            })
        };
        let rate = |r: &Option<crate::Rate>| {
            Some(match r {
                Some(r) if r.count > 0 => {
                    // Requests per hour, exact for the /s, /min and /h forms.
                    Width::Finite(u128::from(r.count) * 3_600_000_000_000 / r.per.as_nanos().max(1))
                }
                _ => Width::Unlimited,
            })
        };
        match self {
            Field::TimeoutMs => n(p.timeout.as_nanos()),
            Field::Instructions => n(p.instructions.into()),
            Field::Memory => n(p.memory.into()),
            Field::Output => n(p.output.into()),
            Field::Body => n(p.body.into()),
            Field::InitTimeoutMs => n(p.init_timeout.as_nanos()),
            Field::InitInstructions => n(p.init_instructions.into()),
            Field::Clones => n(p.clones.into()),
            Field::Persistent => n(p.persistent.into()),
            Field::StateMaxRequests => zero_unlimited(p.state_max_requests.into()),
            Field::StateMaxAge => zero_unlimited(p.state_max_age.as_nanos()),
            Field::Modules => n(p.modules.into()),
            Field::ShowErrors => n(p.show_errors.into()),
            Field::RatePerClient => rate(&p.rate.per_client),
            Field::RatePerScript => rate(&p.rate.per_script),
            Field::RatePerTenant => rate(&p.rate.per_tenant),
            Field::RateBurst => Some(match p.rate.burst {
                Some(b) => Width::Finite(b.into()),
                None => Width::Unlimited,
            }),
            Field::Libs | Field::Tenant | Field::Deny | Field::Entry => None,
        }
    }

    /// Copies this field's value from `from` into `to`.
    pub(crate) fn copy(self, from: &Policy, to: &mut Policy) {
        match self {
            Field::Tenant => to.tenant = from.tenant.clone(),
            Field::TimeoutMs => to.timeout = from.timeout,
            Field::Instructions => to.instructions = from.instructions,
            Field::Memory => to.memory = from.memory,
            Field::Output => to.output = from.output,
            Field::Body => to.body = from.body,
            Field::InitTimeoutMs => to.init_timeout = from.init_timeout,
            Field::InitInstructions => to.init_instructions = from.init_instructions,
            Field::Clones => to.clones = from.clones,
            Field::Persistent => to.persistent = from.persistent,
            Field::StateMaxRequests => to.state_max_requests = from.state_max_requests,
            Field::StateMaxAge => to.state_max_age = from.state_max_age,
            Field::Libs => to.libs = from.libs.clone(),
            Field::Modules => to.modules = from.modules,
            Field::ShowErrors => to.show_errors = from.show_errors,
            Field::Deny => to.deny = from.deny,
            Field::Entry => to.entry = from.entry.clone(),
            Field::RatePerClient => to.rate.per_client = from.rate.per_client,
            Field::RatePerScript => to.rate.per_script = from.rate.per_script,
            Field::RatePerTenant => to.rate.per_tenant = from.rate.per_tenant,
            Field::RateBurst => to.rate.burst = from.rate.burst,
        }
    }

    /// Whether the field has the same value in both policies.
    pub(crate) fn same(self, a: &Policy, b: &Policy) -> bool {
        let mut c = a.clone();
        self.copy(b, &mut c);
        c == *a
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Who set a ceiling: the daemon config's `[ceiling]`, or the `[ceiling]` table of a policy
/// file (its path relative to the document root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetBy {
    Config,
    File(PathBuf),
}

impl fmt::Display for SetBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetBy::Config => f.write_str("the config"),
            SetBy::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Which layer set an effective value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// [`Policy::default`].
    BuiltIn,
    /// The daemon config's `[defaults]` (or a command-line flag that overrides it).
    Config,
    /// A policy file, by its path relative to the document root.
    File(PathBuf),
    /// A `[script."name.lua"]` table of a policy file.
    Script { file: PathBuf, script: String },
    /// Lowered to a ceiling on the way down: the inherited value was above it.
    Ceiling(SetBy),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::BuiltIn => f.write_str("built-in"),
            Source::Config => f.write_str("config"),
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Script { file, script } => {
                write!(f, "{} [script.{:?}]", file.display(), script)
            }
            Source::Ceiling(by) => write!(f, "ceiling set by {by}"),
        }
    }
}

/// The source of every effective value: one per [`Field`], one per `[vars]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    fields: [Source; Field::COUNT],
    vars: Vec<(String, Source)>,
}

impl Provenance {
    /// Every value from the same source.
    pub fn all(source: Source) -> Provenance {
        Provenance {
            fields: std::array::from_fn(|_| source.clone()),
            vars: Vec::new(),
        }
    }

    /// Who set `field`.
    pub fn field(&self, field: Field) -> &Source {
        &self.fields[field.index()]
    }

    /// Who set the `[vars]` entry `name`, if it is set.
    pub fn var(&self, name: &str) -> Option<&Source> {
        self.vars.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    /// Every `[vars]` entry's source, in the order the entries were first set.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Source)> {
        self.vars.iter().map(|(n, s)| (n.as_str(), s))
    }

    pub(crate) fn set(&mut self, field: Field, source: Source) {
        self.fields[field.index()] = source;
    }

    pub(crate) fn set_var(&mut self, name: &str, source: Source) {
        match self.vars.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = source,
            None => self.vars.push((name.to_string(), source)),
        }
    }

    /// Records `source` for every field and var that `fields` sets.
    pub(crate) fn record(&mut self, fields: &PolicyFields, source: &Source) {
        for f in Field::set_in(fields) {
            self.set(f, source.clone());
        }
        if let Some(vars) = &fields.vars {
            for name in vars.keys() {
                self.set_var(name, source.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn names_round_trip_and_indexes_match_order() {
        for (i, f) in Field::ALL.into_iter().enumerate() {
            assert_eq!(f.index(), i);
            assert_eq!(Field::from_name(f.name()), Some(f));
        }
        assert_eq!(Field::from_name("timeout"), None);
    }

    #[test]
    fn only_keeps_one_field() {
        let fields: PolicyFields =
            toml::from_str("timeout_ms = 5\nclones = 3\n[rate]\nburst = 4\nper_client = \"1/s\"")
                .unwrap();
        let one = Field::RateBurst.only(&fields);
        assert_eq!(
            Field::set_in(&one).collect::<Vec<_>>(),
            vec![Field::RateBurst]
        );
        let set: Vec<Field> = Field::set_in(&fields).collect();
        assert_eq!(
            set,
            vec![
                Field::TimeoutMs,
                Field::Clones,
                Field::RatePerClient,
                Field::RateBurst
            ]
        );
    }

    #[test]
    fn widths_treat_zero_and_absent_as_unlimited() {
        let mut p = Policy::default();
        assert_eq!(Field::StateMaxRequests.width(&p), Some(Width::Unlimited));
        assert_eq!(Field::StateMaxAge.width(&p), Some(Width::Unlimited));
        assert_eq!(Field::RatePerClient.width(&p), Some(Width::Unlimited));
        p.state_max_requests = 5;
        assert_eq!(Field::StateMaxRequests.width(&p), Some(Width::Finite(5)));
        p.rate.per_client = Some(crate::parse_rate("60/min").unwrap());
        let per_min = Field::RatePerClient.width(&p);
        p.rate.per_client = Some(crate::parse_rate("1/s").unwrap());
        assert_eq!(Field::RatePerClient.width(&p), per_min, "60/min = 1/s");
        p.rate.per_client = Some(crate::parse_rate("0/s").unwrap());
        assert_eq!(Field::RatePerClient.width(&p), Some(Width::Unlimited));
        assert!(Width::Finite(u128::MAX) < Width::Unlimited);
        p.timeout = Duration::from_millis(3);
        assert_eq!(Field::TimeoutMs.show(&p), "3ms");
    }
}
