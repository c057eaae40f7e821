//! Go-style durations, as Consul clients send them: `"10s"`, `"1m30s"`, `"500ms"`, `"1.5h"`.
//! As in Go (and so in Consul), a number needs its unit: `"10"` is refused, only `"0"` is not.

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("invalid duration {0:?}: expected a number followed by ns, us, ms, s, m or h, like \"10s\" or \"1m30s\"")]
    Invalid(String),
    #[error("invalid duration {0:?}: the unit is missing (ns, us, ms, s, m or h), like \"{0}s\"")]
    NoUnit(String),
}

/// Parses a Go duration string (`"300ms"`, `"2h45m"`, `"1.5s"`, `"0"`).
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let invalid = || DurationError::Invalid(input.to_string());
    if let Ok(n) = s.parse::<f64>() {
        return if n == 0.0 {
            Ok(Duration::ZERO)
        } else {
            Err(DurationError::NoUnit(s.to_string()))
        };
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        if num_len == 0 {
            return Err(invalid());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| invalid())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(invalid()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| invalid())
}

/// Formats a duration the way Go prints short ones (`"10s"`, `"1.5s"`, `"250ms"`).
pub fn format(d: Duration) -> String {
    if d.as_millis() < 1000 && d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// Serde adapter for config fields written as `"10s"`.
pub mod serde_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse(" 7s "), Ok(Duration::from_secs(7)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("100us"), Ok(Duration::from_micros(100)));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert!(parse("s").is_err());
        assert!(parse("10x").is_err());
        assert!(parse("ten seconds").is_err());
        assert!(parse("-1s").is_err());
        // A number without its unit is refused, as Go and Consul refuse it.
        assert_eq!(parse("5"), Err(DurationError::NoUnit("5".into())));
        assert_eq!(parse(" 1.5 "), Err(DurationError::NoUnit("1.5".into())));
        assert_eq!(
            parse("5").unwrap_err().to_string(),
            "invalid duration \"5\": the unit is missing (ns, us, ms, s, m or h), like \"5s\""
        );
    }

    #[test]
    fn formats_round_trip() {
        for d in ["10s", "250ms", "1.5s"] {
            assert_eq!(format(parse(d).unwrap()), d);
        }
    }
}
