//! Units in policy and config values: sizes (`"64MiB"`), durations (`"250ms"`) and rates
//! (`"20/s"`), read from text and shown back with the largest exact unit. Pure parsing and
//! formatting; no defaults and no limits live here.

use std::time::Duration;

/// A value with a unit that could not be read.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("cannot read `{text}`: {reason}")]
pub struct UnitError {
    text: String,
    reason: &'static str,
}

impl UnitError {
    /// What is wrong, without the text that was read: safe to show for untrusted input.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

fn err(text: &str, reason: &'static str) -> UnitError {
    UnitError {
        text: text.chars().take(64).collect(),
        reason,
    }
}

fn split_number(text: &str) -> Result<(u64, &str), UnitError> {
    let t = text.trim();
    let digits = t
        .find(|c: char| !(c.is_ascii_digit() || c == '_'))
        .unwrap_or(t.len());
    if digits == 0 {
        return Err(err(text, "expected a number first"));
    }
    let n: u64 = t[..digits]
        .replace('_', "")
        .parse()
        .map_err(|_| err(text, "number too large"))?;
    Ok((n, t[digits..].trim()))
}

/// Parses a size: `1024`, `"512B"`, `"64KiB"`, `"64MiB"`, `"1GiB"` (also `KB`, `MB`, `GB`).
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let (n, unit) = split_number(text)?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(err(text, "unknown size unit (use B, KiB, MiB, GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| err(text, "size too large"))
}

/// Parses a duration: `"250ms"`, `"2s"`, `"1min"`, `"1h"`; a bare number is milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let (n, unit) = split_number(text)?;
    let ms: u64 = match unit {
        "" | "ms" => 1,
        "s" => 1000,
        "min" | "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(err(text, "unknown duration unit (use ms, s, min, h)")),
    };
    n.checked_mul(ms)
        .map(Duration::from_millis)
        .ok_or_else(|| err(text, "duration too large"))
}

/// A rate limit: `count` events per `per`. A count of zero means "off".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

/// Parses a rate: `"20/s"`, `"600/min"`, `"0/s"` (off).
pub fn parse_rate(text: &str) -> Result<Rate, UnitError> {
    let (count, rest) = text
        .split_once('/')
        .ok_or_else(|| err(text, "expected N/s or N/min"))?;
    let count: u32 = count
        .trim()
        .parse()
        .map_err(|_| err(text, "expected a whole number before `/`"))?;
    let per = match rest.trim() {
        "s" => Duration::from_secs(1),
        "min" | "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(err(text, "unknown rate unit (use /s, /min, /h)")),
    };
    Ok(Rate { count, per })
}

/// Shows a size with the largest binary unit that divides it exactly (`"64MiB"`, `"1500B"`).
pub fn format_size(bytes: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes != 0 && bytes & ((1u64 << shift) - 1) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

/// Shows a duration in whole seconds when it is one (`"2s"`), else in milliseconds
/// (`"250ms"`); sub-millisecond parts, which no policy value carries, are dropped.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms != 0 && ms / 1000 * 1000 == ms {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

impl std::fmt::Display for Rate {
    /// `"20/s"`, `"600/min"`, `"5/h"`; a count of zero shows as `"off"`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.count == 0 {
            return f.write_str("off");
        }
        match self.per.as_secs() {
            1 if self.per.subsec_nanos() == 0 => write!(f, "{}/s", self.count),
            60 if self.per.subsec_nanos() == 0 => write!(f, "{}/min", self.count),
            3600 if self.per.subsec_nanos() == 0 => write!(f, "{}/h", self.count),
            _ => write!(f, "{}/{}", self.count, format_duration(self.per)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1_024").unwrap(), 1024);
        assert_eq!(parse_size("2KB").unwrap(), 2000);
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999GiB").is_err());
        assert!(parse_size("3 furlongs").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1500").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("2 fortnights").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(
            parse_rate("20/s").unwrap(),
            Rate {
                count: 20,
                per: Duration::from_secs(1)
            }
        );
        assert_eq!(parse_rate("600/min").unwrap().per, Duration::from_secs(60));
        assert!(parse_rate("20").is_err());
        assert!(parse_rate("x/s").is_err());
    }

    #[test]
    fn formats_with_exact_units() {
        assert_eq!(format_size(64 << 20), "64MiB");
        assert_eq!(format_size(1536), "1536B");
        assert_eq!(format_size(3 << 10), "3KiB");
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
        assert_eq!(format_duration(Duration::ZERO), "0ms");
        assert_eq!(parse_rate("600/min").unwrap().to_string(), "600/min");
        assert_eq!(parse_rate("0/s").unwrap().to_string(), "off");
    }

    #[test]
    fn reasons_do_not_carry_the_text() {
        let e = parse_size("secret-value").unwrap_err();
        assert!(!e.reason().contains("secret"));
        assert!(
            e.to_string().contains("secret"),
            "Display keeps the text for operators"
        );
    }
}
