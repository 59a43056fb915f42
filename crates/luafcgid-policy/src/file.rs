//! [`PolicyFile`]: one `policy.toml`, parsed from text into [`PolicyFields`] with the line of
//! every key, and checked against the ceiling it inherits.
//!
//! The text is parsed with `toml`'s spanned document ([`toml::de::DeTable`]) and walked by
//! hand rather than through serde, so that every problem (syntax, unknown key, wrong type,
//! invalid value, value above a ceiling) gets its line and a message that names the key
//! without quoting the file: policy files are untrusted input. All problems of a file are
//! reported, not just the first. This module reads no files; see the tree for that.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::ceiling::Ceiling;
use crate::field::{Field, SetBy};
use crate::problem::{quoted_key, shown_key, LineIndex, Problem};
use crate::{
    is_lib_name, DurationValue, Policy, PolicyError, PolicyFields, RateFields, SizeValue,
    KNOWN_LIBS, LIB_TABLES,
};

/// Which table is being read: it decides which keys are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    /// The top level of a `policy.toml`: every field, `[script.*]` and `[ceiling]`.
    Policy,
    /// A `[script."name.lua"]` table: every field but `tenant`, `script`, `ceiling`.
    Script,
    /// A `[ceiling]` table (a file's or the config's): limit fields only.
    Ceiling,
    /// The config's `[defaults]`: every field but `tenant`, `script`, `ceiling`.
    Defaults,
}

/// Lines of the keys of one table, by dotted key within the table (`"timeout_ms"`,
/// `"rate.burst"`, `"libs.2"` for an element, `"vars.name"`). `""` is the table's header.
#[derive(Debug, Clone, Default)]
pub(crate) struct Lines(HashMap<String, u32>);

impl Lines {
    pub(crate) fn insert(&mut self, key: &str, line: u32) {
        self.0.insert(key.to_string(), line);
    }

    pub(crate) fn get(&self, key: &str) -> Option<u32> {
        self.0.get(key).copied()
    }
}

/// Lines of the tables nested in a `policy.toml`: its `[ceiling]` and each
/// `[script."name.lua"]`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Nested {
    ceiling: Lines,
    scripts: BTreeMap<String, Lines>,
}

/// Reads tables into [`PolicyFields`], collecting problems.
pub(crate) struct Walk<'a> {
    file: &'a Path,
    index: LineIndex,
    pub(crate) problems: Vec<Problem>,
}

impl<'a> Walk<'a> {
    pub(crate) fn new(file: &'a Path, text: &str) -> Walk<'a> {
        Walk {
            file,
            index: LineIndex::new(text.as_bytes()),
            problems: Vec::new(),
        }
    }

    pub(crate) fn line_at(&self, offset: usize) -> u32 {
        self.index.line(offset)
    }

    pub(crate) fn problem(&mut self, line: Option<u32>, key: Option<String>, message: String) {
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line,
            key,
            message,
        });
    }

    /// Parses the whole text; `None` (with the problem recorded) on a syntax error.
    pub(crate) fn document<'i>(&mut self, text: &'i str) -> Option<Spanned<DeTable<'i>>> {
        match DeTable::parse(text) {
            Ok(t) => Some(t),
            Err(e) => {
                let line = e.span().map(|s| self.line_at(s.start));
                // The parser's messages describe tokens ("invalid string", "expected `=`")
                // and never carry the text; keep one short line of it all the same.
                let what: String = e
                    .message()
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(120)
                    .collect();
                self.problem(line, None, format!("not valid TOML: {what}"));
                None
            }
        }
    }

    /// Reads one table of `section` into fields, its keys' lines into `lines` and those of
    /// its nested tables (only a [`Section::Policy`] has any) into `nested`. `prefix` is
    /// the table's dotted key path for messages (`""`, `"ceiling."`, `"defaults."`,
    /// `"script.\"a.lua\"."`).
    pub(crate) fn table(
        &mut self,
        table: &DeTable<'_>,
        section: Section,
        prefix: &str,
        lines: &mut Lines,
        nested: &mut Nested,
    ) -> PolicyFields {
        let mut out = PolicyFields::default();
        for (k, v) in table.iter() {
            let key: &str = k.get_ref();
            let line = self.line_at(k.span().start);
            lines.0.insert(key.to_string(), line);
            let full = format!("{prefix}{}", shown_key(key));
            if let Some(why) = refused(section, key) {
                self.problem(Some(line), Some(full.clone()), format!("`{full}` {why}"));
                continue;
            }
            match key {
                "tenant" => out.tenant = self.string(&full, line, v),
                "entry" => out.entry = self.string(&full, line, v),
                "timeout_ms" => out.timeout_ms = self.duration(&full, line, v),
                "init_timeout_ms" => out.init_timeout_ms = self.duration(&full, line, v),
                "state_max_age" => out.state_max_age = self.duration(&full, line, v),
                "instructions" => out.instructions = self.count(&full, line, v),
                "init_instructions" => out.init_instructions = self.count(&full, line, v),
                "state_max_requests" => out.state_max_requests = self.count(&full, line, v),
                "memory" => out.memory = self.size(&full, line, v),
                "output" => out.output = self.size(&full, line, v),
                "body" => out.body = self.size(&full, line, v),
                "clones" => out.clones = self.small_count(&full, line, v),
                "persistent" => out.persistent = self.boolean(&full, line, v),
                "modules" => out.modules = self.boolean(&full, line, v),
                "show_errors" => out.show_errors = self.boolean(&full, line, v),
                "deny" => out.deny = self.boolean(&full, line, v),
                "libs" => out.libs = self.libs(&full, line, v, lines),
                "rate" => out.rate = self.rate(&full, line, v, lines),
                "vars" => out.vars = self.vars(&full, line, v, lines),
                "script" => out.script = self.scripts(v, line, &mut nested.scripts),
                "ceiling" => {
                    let Some(t) = self.subtable(&full, line, v) else {
                        continue;
                    };
                    nested.ceiling.insert("", line);
                    let fields = self.table(
                        t,
                        Section::Ceiling,
                        "ceiling.",
                        &mut nested.ceiling,
                        &mut Nested::default(),
                    );
                    out.ceiling = Some(Box::new(fields));
                }
                _ => self.problem(
                    Some(line),
                    Some(full.clone()),
                    format!("unknown key `{full}`"),
                ),
            }
        }
        self.values(&mut out, prefix, lines);
        out
    }

    /// Validates each set field on its own (so that every bad value is reported), and drops
    /// the bad ones.
    fn values(&mut self, fields: &mut PolicyFields, prefix: &str, lines: &Lines) {
        for f in Field::set_in(fields).collect::<Vec<_>>() {
            if let Err(PolicyError::Invalid { message, .. }) =
                Policy::default().apply(&f.only(fields))
            {
                let full = format!("{prefix}{}", f.name());
                self.problem(
                    lines.get(f.name()),
                    Some(full.clone()),
                    format!("`{full}` {message}"),
                );
                clear(f, fields);
            }
        }
    }

    fn type_error(&mut self, full: &str, line: u32, what: &str) {
        self.problem(
            Some(line),
            Some(full.to_string()),
            format!("`{full}` must be {what}"),
        );
    }

    fn string(&mut self, full: &str, line: u32, v: &Spanned<DeValue<'_>>) -> Option<String> {
        match v.get_ref() {
            DeValue::String(s) => Some(s.to_string()),
            _ => {
                self.type_error(full, line, "a string");
                None
            }
        }
    }

    fn boolean(&mut self, full: &str, line: u32, v: &Spanned<DeValue<'_>>) -> Option<bool> {
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.type_error(full, line, "true or false");
                None
            }
        }
    }

    fn integer(
        &mut self,
        full: &str,
        line: u32,
        v: &Spanned<DeValue<'_>>,
        what: &str,
    ) -> Option<u64> {
        match v.get_ref() {
            DeValue::Integer(i) => match u64::from_str_radix(i.as_str(), i.radix()) {
                Ok(n) => Some(n),
                Err(_) => {
                    let negative = i.as_str().starts_with('-');
                    let why = if negative {
                        "must not be negative"
                    } else {
                        "is too large"
                    };
                    self.problem(
                        Some(line),
                        Some(full.to_string()),
                        format!("`{full}` {why}"),
                    );
                    None
                }
            },
            _ => {
                self.type_error(full, line, what);
                None
            }
        }
    }

    fn count(&mut self, full: &str, line: u32, v: &Spanned<DeValue<'_>>) -> Option<u64> {
        self.integer(full, line, v, "a whole number")
    }

    fn small_count(&mut self, full: &str, line: u32, v: &Spanned<DeValue<'_>>) -> Option<u32> {
        let n = self.integer(full, line, v, "a whole number")?;
        match u32::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                self.problem(
                    Some(line),
                    Some(full.to_string()),
                    format!("`{full}` is too large"),
                );
                None
            }
        }
    }

    fn duration(
        &mut self,
        full: &str,
        line: u32,
        v: &Spanned<DeValue<'_>>,
    ) -> Option<DurationValue> {
        const WHAT: &str = "a whole number of milliseconds or a string with a unit, like \"250ms\"";
        match v.get_ref() {
            DeValue::String(s) => Some(DurationValue::Text(s.to_string())),
            _ => self.integer(full, line, v, WHAT).map(DurationValue::Millis),
        }
    }

    fn size(&mut self, full: &str, line: u32, v: &Spanned<DeValue<'_>>) -> Option<SizeValue> {
        const WHAT: &str = "a number of bytes or a string with a unit, like \"64MiB\"";
        match v.get_ref() {
            DeValue::String(s) => Some(SizeValue::Text(s.to_string())),
            _ => self.integer(full, line, v, WHAT).map(SizeValue::Bytes),
        }
    }

    fn subtable<'v, 'i>(
        &mut self,
        full: &str,
        line: u32,
        v: &'v Spanned<DeValue<'i>>,
    ) -> Option<&'v DeTable<'i>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => {
                self.type_error(full, line, "a table");
                None
            }
        }
    }

    fn libs(
        &mut self,
        full: &str,
        line: u32,
        v: &Spanned<DeValue<'_>>,
        lines: &mut Lines,
    ) -> Option<Vec<String>> {
        let DeValue::Array(items) = v.get_ref() else {
            self.type_error(
                full,
                line,
                "an array of library names, like [\"string\", \"os.time\"]",
            );
            return None;
        };
        let mut libs = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let at = self.line_at(item.span().start);
            lines.0.insert(format!("libs.{i}"), at);
            match item.get_ref() {
                DeValue::String(s) if is_lib_name(s) => libs.push(s.to_string()),
                DeValue::String(_) => {
                    ok = false;
                    self.problem(
                        Some(at),
                        Some(full.to_string()),
                        format!(
                            "`{full}` entry {} is not a known library or library function \
                             (known: {}, or one function of {} such as \"string.format\")",
                            i + 1,
                            KNOWN_LIBS.join(", "),
                            LIB_TABLES.join(", ")
                        ),
                    );
                }
                _ => {
                    ok = false;
                    self.problem(
                        Some(at),
                        Some(full.to_string()),
                        format!("`{full}` entry {} must be a string", i + 1),
                    );
                }
            }
        }
        ok.then_some(libs)
    }

    fn rate(
        &mut self,
        full: &str,
        line: u32,
        v: &Spanned<DeValue<'_>>,
        lines: &mut Lines,
    ) -> Option<RateFields> {
        let t = self.subtable(full, line, v)?;
        let mut rate = RateFields::default();
        for (k, v) in t.iter() {
            let key: &str = k.get_ref();
            let at = self.line_at(k.span().start);
            let inner = format!("{full}.{}", shown_key(key));
            lines.0.insert(format!("rate.{key}"), at);
            match key {
                "per_client" => rate.per_client = self.string(&inner, at, v),
                "per_script" => rate.per_script = self.string(&inner, at, v),
                "per_tenant" => rate.per_tenant = self.string(&inner, at, v),
                "burst" => rate.burst = self.small_count(&inner, at, v),
                _ => self.problem(
                    Some(at),
                    Some(inner.clone()),
                    format!("unknown key `{inner}`"),
                ),
            }
        }
        Some(rate)
    }

    fn vars(
        &mut self,
        full: &str,
        line: u32,
        v: &Spanned<DeValue<'_>>,
        lines: &mut Lines,
    ) -> Option<BTreeMap<String, toml::Value>> {
        let t = self.subtable(full, line, v)?;
        let mut vars = BTreeMap::new();
        for (k, v) in t.iter() {
            let key: &str = k.get_ref();
            let at = self.line_at(k.span().start);
            lines.0.insert(format!("vars.{key}"), at);
            let value = match v.get_ref() {
                DeValue::String(s) => Some(toml::Value::String(s.to_string())),
                DeValue::Boolean(b) => Some(toml::Value::Boolean(*b)),
                DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                    .ok()
                    .map(toml::Value::Integer),
                DeValue::Float(x) => x.as_str().parse::<f64>().ok().map(toml::Value::Float),
                _ => None,
            };
            match value {
                Some(value) => {
                    vars.insert(key.to_string(), value);
                }
                None => {
                    let inner = format!("{full}.{}", shown_key(key));
                    self.type_error(&inner, at, "a string, number or boolean");
                }
            }
        }
        Some(vars)
    }

    fn scripts(
        &mut self,
        v: &Spanned<DeValue<'_>>,
        line: u32,
        scripts: &mut BTreeMap<String, Lines>,
    ) -> Option<BTreeMap<String, PolicyFields>> {
        let t = self.subtable("script", line, v)?;
        let mut out = BTreeMap::new();
        for (k, v) in t.iter() {
            let name: &str = k.get_ref();
            let at = self.line_at(k.span().start);
            let full = format!("script.{}", quoted_key(name));
            if !is_file_name(name) {
                self.problem(
                    Some(at),
                    Some(full.clone()),
                    format!("`{full}`: a [script] table is named after a file in this directory, like \"admin.lua\""),
                );
                continue;
            }
            let Some(table) = self.subtable(&full, at, v) else {
                continue;
            };
            let mut lines = Lines::default();
            lines.insert("", at);
            let prefix = format!("{full}.");
            let fields = self.table(
                table,
                Section::Script,
                &prefix,
                &mut lines,
                &mut Nested::default(),
            );
            scripts.insert(name.to_string(), lines);
            out.insert(name.to_string(), fields);
        }
        Some(out)
    }
}

/// Why `key` may not appear in `section`, if it may not.
fn refused(section: Section, key: &str) -> Option<&'static str> {
    let field = Field::from_name(key);
    match section {
        Section::Policy => None,
        Section::Script | Section::Defaults => match key {
            "tenant" => Some("names a directory's tenant and belongs at the top of a policy.toml"),
            "script" => Some("cannot be nested here"),
            "ceiling" => Some("cannot appear here: a [ceiling] table binds subdirectories"),
            _ => None,
        },
        Section::Ceiling => match (key, field) {
            ("rate", _) => None,
            (_, Some(f)) if !f.has_ceiling() => {
                Some("is not a limit and cannot appear in a [ceiling] table")
            }
            ("vars" | "script" | "ceiling", _) => Some("cannot appear in a [ceiling] table"),
            _ => None,
        },
    }
}

/// Whether `name` can name a file in a directory.
fn is_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
}

/// Unsets `f` in `fields`.
fn clear(f: Field, fields: &mut PolicyFields) {
    let rate = fields.rate.get_or_insert_with(RateFields::default);
    match f {
        Field::Tenant => fields.tenant = None,
        Field::TimeoutMs => fields.timeout_ms = None,
        Field::Instructions => fields.instructions = None,
        Field::Memory => fields.memory = None,
        Field::Output => fields.output = None,
        Field::Body => fields.body = None,
        Field::InitTimeoutMs => fields.init_timeout_ms = None,
        Field::InitInstructions => fields.init_instructions = None,
        Field::Clones => fields.clones = None,
        Field::Persistent => fields.persistent = None,
        Field::StateMaxRequests => fields.state_max_requests = None,
        Field::StateMaxAge => fields.state_max_age = None,
        Field::Libs => fields.libs = None,
        Field::Modules => fields.modules = None,
        Field::ShowErrors => fields.show_errors = None,
        Field::Deny => fields.deny = None,
        Field::Entry => fields.entry = None,
        Field::RatePerClient => rate.per_client = None,
        Field::RatePerScript => rate.per_script = None,
        Field::RatePerTenant => rate.per_tenant = None,
        Field::RateBurst => rate.burst = None,
    }
    if fields.rate.as_ref() == Some(&RateFields::default()) {
        fields.rate = None;
    }
}

/// One `policy.toml`, parsed and validated on its own (syntax, keys, types, values); its
/// ceilings are checked separately with [`PolicyFile::check`], against what it inherits.
#[derive(Debug, Clone)]
pub struct PolicyFile {
    path: PathBuf,
    fields: PolicyFields,
    ceiling: Option<Ceiling>,
    lines: Lines,
    nested: Nested,
}

impl PolicyFile {
    /// Parses `text`, read from `path` (used in problems only). Every problem is returned,
    /// sorted by line.
    pub fn parse(path: &Path, text: &str) -> Result<PolicyFile, Vec<Problem>> {
        let mut walk = Walk::new(path, text);
        let Some(doc) = walk.document(text) else {
            return Err(walk.problems);
        };
        let mut lines = Lines::default();
        let mut nested = Nested::default();
        let fields = walk.table(doc.get_ref(), Section::Policy, "", &mut lines, &mut nested);
        let mut problems = walk.problems;
        let ceiling = match fields.ceiling.as_deref().map(Ceiling::from_fields) {
            None => None,
            Some(Ok(c)) => Some(c.labelled(&SetBy::File(path.to_path_buf()))),
            Some(Err(e)) => {
                // Values were validated one by one above; this is only reached if a
                // combination is refused.
                problems.push(Problem {
                    file: path.to_path_buf(),
                    line: nested.ceiling.get(""),
                    key: Some("ceiling".into()),
                    message: format!("[ceiling] {e}"),
                });
                None
            }
        };
        if !problems.is_empty() {
            problems.sort_by_key(|p| p.line);
            return Err(problems);
        }
        Ok(PolicyFile {
            path: path.to_path_buf(),
            fields,
            ceiling,
            lines,
            nested,
        })
    }

    /// Like [`PolicyFile::parse`], for bytes that may not be UTF-8.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<PolicyFile, Vec<Problem>> {
        match std::str::from_utf8(bytes) {
            Ok(text) => PolicyFile::parse(path, text),
            Err(e) => Err(vec![Problem {
                file: path.to_path_buf(),
                line: Some(LineIndex::new(bytes).line(e.valid_up_to())),
                key: None,
                message: "is not valid UTF-8".into(),
            }]),
        }
    }

    /// The path given to [`PolicyFile::parse`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fields as written (validated).
    pub fn fields(&self) -> &PolicyFields {
        &self.fields
    }

    /// The file's own `[ceiling]`, which binds its subdirectories; labelled with the path
    /// given to [`PolicyFile::parse`].
    pub fn ceiling(&self) -> Option<&Ceiling> {
        self.ceiling.as_ref()
    }

    /// Relabels the file's own ceiling (with its path relative to the document root).
    pub(crate) fn label_ceiling(&mut self, by: &SetBy) {
        if let Some(c) = self.ceiling.take() {
            self.ceiling = Some(c.labelled(by));
        }
    }

    /// The line of a top-level key (`"timeout_ms"`, `"rate.burst"`, `"vars.name"`).
    pub fn line(&self, key: &str) -> Option<u32> {
        self.lines.get(key)
    }

    /// Checks the file against the ceiling it inherits: the values it sets at its top level
    /// and in each `[script."name.lua"]` table, and each maximum of its own `[ceiling]`.
    /// A per-script table is bound by the inherited ceiling, not by the file's own
    /// `[ceiling]`, which binds subdirectories only.
    pub fn check(&self, inherited: &Ceiling) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut report = |lines: &Lines, prefix: &str, table: &str, v: crate::Violation| {
            let line = v
                .item
                .and_then(|i| lines.get(&format!("libs.{i}")))
                .or_else(|| lines.get(v.field.name()))
                .or_else(|| lines.get(""));
            problems.push(Problem {
                file: self.path.clone(),
                line,
                key: Some(format!("{prefix}{}", v.field.name())),
                message: format!("{table}{}", v.message),
            });
        };
        if let Some(p) = policy_of(&self.fields) {
            for v in inherited.check(&p, Field::set_in(&self.fields)) {
                report(&self.lines, "", "", v);
            }
        }
        for (name, fields) in self.fields.script.iter().flatten() {
            let Some(p) = policy_of(fields) else { continue };
            let lines = self.nested.scripts.get(name).cloned().unwrap_or_default();
            let shown = quoted_key(name);
            for v in inherited.check(&p, Field::set_in(fields)) {
                report(
                    &lines,
                    &format!("script.{shown}."),
                    &format!("[script.{shown}] "),
                    v,
                );
            }
        }
        if let Some(own) = &self.ceiling {
            for v in inherited.check_ceiling(own) {
                report(&self.nested.ceiling, "ceiling.", "", v);
            }
        }
        problems.sort_by_key(|p| p.line);
        problems
    }
}

/// The built-in policy with `fields` laid over it.
fn policy_of(fields: &PolicyFields) -> Option<Policy> {
    let mut p = Policy::default();
    p.apply(fields).ok()?;
    Some(p)
}
