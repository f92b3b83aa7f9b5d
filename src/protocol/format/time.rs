//! The protocol's one timestamp form: RFC 3339 in UTC, written with milliseconds, read strictly.

use std::time::SystemTime;

/// RFC 3339 UTC with milliseconds.
pub fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parses an RFC 3339 time in UTC: `YYYY-MM-DDTHH:MM:SS`, an optional fraction, and `Z`
/// (P52). Anything else is unparsable, an offset included: humantime's parser would read
/// `…00.000+05:30` as UTC, hours off.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let t = time.as_bytes();
    let well_formed = date.len() == 10
        && date.bytes().all(|b| b.is_ascii_digit() || b == b'-')
        && t.len() >= 8
        && t[2] == b':'
        && t[5] == b':'
        && (t.len() == 8 || (t[8] == b'.' && t.len() > 9))
        && t.iter()
            .enumerate()
            .all(|(i, b)| matches!(i, 2 | 5 | 8) || b.is_ascii_digit());
    if !well_formed {
        return None;
    }
    humantime::parse_rfc3339_weak(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_utc_times_with_z_parse() {
        let ok = [
            "2026-11-23T10:15:00Z",
            "2026-11-23T10:15:00.000Z",
            "2026-11-23T10:15:00.5Z",
            " 2026-11-23T10:15:00Z\n",
        ];
        for t in ok {
            assert!(parse_time(t).is_some(), "{t:?}");
        }
        assert_eq!(
            parse_time("2026-11-23T10:15:00.250Z"),
            parse_time("2026-11-23T10:15:00Z").map(|t| t + std::time::Duration::from_millis(250))
        );
        let bad = [
            "2026-11-23T10:15:00.000+05:30",
            "2026-11-23T10:15:00+00:00",
            "2026-11-23T10:15:00",
            "2026-11-23t10:15:00z",
            "2026-11-23T10:15:00z",
            "2026-11-23 10:15:00Z",
            "2026-11-23T10:15Z",
            "2026-11-23T10:15:00.Z",
            "2026-11-23T10:15:00Zjunk",
            "2026-11-23T10:15:60.5.5Z",
            "1969-12-31T23:59:59Z",
            "",
        ];
        for t in bad {
            assert_eq!(parse_time(t), None, "{t:?}");
        }
    }
}
