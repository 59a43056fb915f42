//! [`Problem`]: one thing wrong with a policy file, located by file, line and key.
//!
//! Problems are shown to policy authors (`policy check`) and logged (`policy_rejected`).
//! Policy files are untrusted, and one might be a link to a file the daemon can read but
//! the tenant cannot, so a problem's message never quotes the file: it names the key (cut
//! short and escaped when odd) and says what is wrong. This module does no IO.

use std::fmt;
use std::path::{Path, PathBuf};

/// One thing wrong with a policy file (or the config's policy tables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file, as the caller named it (the tree uses absolute paths).
    pub file: PathBuf,
    /// 1-based line, when the problem has a place in the text.
    pub line: Option<u32>,
    /// The key concerned, dotted (`"timeout_ms"`, `"ceiling.memory"`,
    /// `"script.\"admin.lua\".clones"`), when there is one.
    pub key: Option<String>,
    /// What is wrong; names the key, never quotes the file's text.
    pub message: String,
}

impl Problem {
    /// A problem with the file as a whole (unreadable, too large, a symbolic link).
    pub fn whole(file: &Path, message: impl Into<String>) -> Problem {
        Problem {
            file: file.to_path_buf(),
            line: None,
            key: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    /// `file:line: message`, or `file: message` when there is no line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for Problem {}

/// Maps byte offsets of a text to 1-based line numbers.
#[derive(Debug)]
pub(crate) struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub(crate) fn new(text: &[u8]) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(
            text.iter()
                .enumerate()
                .filter(|(_, b)| **b == b'\n')
                .map(|(i, _)| i + 1),
        );
        LineIndex { starts }
    }

    /// The line holding byte `offset` (offsets past the end count as the last line).
    pub(crate) fn line(&self, offset: usize) -> u32 {
        let i = self.starts.partition_point(|s| *s <= offset);
        u32::try_from(i.max(1)).unwrap_or(u32::MAX)
    }
}

/// A key from an untrusted file, fit to appear in a message: at most 48 characters,
/// control and non-ASCII characters escaped.
pub(crate) fn shown_key(key: &str) -> String {
    const MAX: usize = 48;
    let plain = key.len() <= MAX
        && !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if plain {
        return key.to_string();
    }
    quoted_key(key)
}

/// A key from an untrusted file in double quotes, escaped and cut short.
pub(crate) fn quoted_key(key: &str) -> String {
    const MAX: usize = 48;
    let mut out: String = key.chars().take(MAX).flat_map(char::escape_debug).collect();
    if key.chars().count() > MAX {
        out.push('…');
    }
    format!("\"{out}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_file_line_message() {
        let p = Problem {
            file: "a/policy.toml".into(),
            line: Some(3),
            key: Some("timeout_ms".into()),
            message: "bad".into(),
        };
        assert_eq!(p.to_string(), "a/policy.toml:3: bad");
        assert_eq!(
            Problem::whole(Path::new("x"), "gone").to_string(),
            "x: gone"
        );
    }

    #[test]
    fn lines_from_offsets() {
        let idx = LineIndex::new(b"a = 1\nb = 2\n\nc");
        assert_eq!(idx.line(0), 1);
        assert_eq!(idx.line(5), 1);
        assert_eq!(idx.line(6), 2);
        assert_eq!(idx.line(12), 3);
        assert_eq!(idx.line(13), 4);
        assert_eq!(idx.line(1000), 4);
    }

    #[test]
    fn odd_keys_are_escaped_and_cut() {
        assert_eq!(shown_key("timeout_ms"), "timeout_ms");
        assert_eq!(shown_key("a\nb"), "\"a\\nb\"");
        let long = "x".repeat(100);
        let shown = shown_key(&long);
        assert!(shown.chars().count() < 60, "{shown}");
    }
}
