//! Time on the command line and in human output.
//!
//! Shroud counts time in Unix seconds (`u64`), as the peer list does. This module
//! turns command-line text into seconds ([`parse_instant`], [`parse_duration`]) and
//! seconds into text for people ([`format_date`], [`format_relative`],
//! [`format_span`]). Only [`now`] and [`parse_instant_or_now`] (for `now`) read the
//! clock; every other function is pure.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The last second that RFC 3339 (four-digit years) can name: 9999-12-31T23:59:59Z.
const MAX_DATE: u64 = 253_402_300_799;

/// The current time in Unix seconds (0 if the clock is before 1970).
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Parses a point in time: decimal Unix seconds (`1764000000`) or an RFC 3339 date
/// in UTC (`2025-11-24T16:00:00Z`, or with a space instead of `T`).
pub fn parse_instant(text: &str) -> Result<u64, String> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map_err(|_| format!("`{text}` is too large for a Unix time"));
    }
    humantime::parse_rfc3339_weak(text)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .ok_or_else(|| {
            format!(
                "`{text}` is neither Unix seconds (e.g. 1764000000) nor an RFC 3339 UTC date \
                 (e.g. 2025-11-24T16:00:00Z)"
            )
        })
}

/// [`parse_instant`], or `now` for the current time (what the options documented
/// `[default: now]` also accept spelled out).
pub fn parse_instant_or_now(text: &str) -> Result<u64, String> {
    if text == "now" {
        Ok(now())
    } else {
        parse_instant(text)
    }
}

/// Parses a positive duration in whole seconds: `24h`, `7d`, `3600s`, `1h 30m`, ...
/// (units: `s`, `m`, `h`, `d`, `w`, and their long forms).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration such as 24h, 7d or 3600s ({e})"))?;
    if d.subsec_nanos() != 0 {
        return Err(format!("`{text}` is not a whole number of seconds"));
    }
    if d.as_secs() == 0 {
        return Err("the duration must be positive".to_owned());
    }
    Ok(d.as_secs())
}

/// Formats Unix seconds as an RFC 3339 UTC date (`2025-11-24T16:00:00Z`).
///
/// Times after the year 9999 are written `@<seconds>`.
pub fn format_date(t: u64) -> String {
    if t > MAX_DATE {
        return format!("@{t}");
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

/// A length of time in its two most significant units: `3d 4h`, `11h 59m`, `42s`.
///
/// The second unit is omitted when it is zero (`1d`, not `1d 0h`); the remainder is
/// truncated, not rounded.
pub fn format_span(secs: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let Some(i) = UNITS.iter().position(|&(n, _)| secs >= n) else {
        return "0s".to_owned();
    };
    let (n, unit) = UNITS[i];
    let mut out = format!("{}{unit}", secs / n);
    if let Some(&(m, next)) = UNITS.get(i + 1) {
        let rest = (secs % n) / m;
        if rest != 0 {
            out.push_str(&format!(" {rest}{next}"));
        }
    }
    out
}

/// `t` relative to `now`: `in 11h 59m`, `3h 2m ago`, or `now`.
pub fn format_relative(t: u64, now: u64) -> String {
    match t.cmp(&now) {
        std::cmp::Ordering::Greater => format!("in {}", format_span(t - now)),
        std::cmp::Ordering::Less => format!("{} ago", format_span(now - t)),
        std::cmp::Ordering::Equal => "now".to_owned(),
    }
}

/// `format_date` followed by `format_relative` in parentheses.
pub fn format_date_relative(t: u64, now: u64) -> String {
    format!("{} ({})", format_date(t), format_relative(t, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants() {
        assert_eq!(parse_instant("1764000000"), Ok(1_764_000_000));
        assert_eq!(parse_instant("0"), Ok(0));
        assert_eq!(parse_instant("2025-11-24T16:00:00Z"), Ok(1_764_000_000));
        assert_eq!(parse_instant("2025-11-24 16:00:00"), Ok(1_764_000_000));
        assert!(parse_instant("").is_err());
        assert!(parse_instant("-1").is_err());
        assert!(parse_instant("yesterday").is_err());
        assert!(parse_instant("99999999999999999999999").is_err());
        // `now`, as the help's [default: now] suggests, only where it is offered.
        assert!(parse_instant("now").is_err());
        let before = now();
        let t = parse_instant_or_now("now").unwrap();
        assert!(t >= before && t <= now(), "{t}");
        assert_eq!(parse_instant_or_now("1764000000"), Ok(1_764_000_000));
        assert!(parse_instant_or_now("Now").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h"), Ok(86_400));
        assert_eq!(parse_duration("7d"), Ok(604_800));
        assert_eq!(parse_duration("3600s"), Ok(3_600));
        assert_eq!(parse_duration("1h 30m"), Ok(5_400));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1500ms").is_err());
        assert!(parse_duration("24").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn dates_and_spans() {
        assert_eq!(format_date(1_764_000_000), "2025-11-24T16:00:00Z");
        assert_eq!(format_date(MAX_DATE), "9999-12-31T23:59:59Z");
        assert_eq!(format_date(u64::MAX), format!("@{}", u64::MAX));
        assert_eq!(format_span(0), "0s");
        assert_eq!(format_span(42), "42s");
        assert_eq!(format_span(43_140), "11h 59m");
        assert_eq!(format_span(86_400 + 300), "1d");
        assert_eq!(format_span(3 * 86_400 + 4 * 3_600 + 59), "3d 4h");
        assert_eq!(format_relative(10, 10), "now");
        assert_eq!(format_relative(3_610, 10), "in 1h");
        assert_eq!(format_relative(10, 130), "2m ago");
    }
}
