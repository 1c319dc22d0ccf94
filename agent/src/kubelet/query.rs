//! The kubelet API's spelling of a log request: `containerLogs`' URL query (`follow`,
//! `tailLines`, `sinceSeconds`, …) parsed into [`LogOptions`] as the real kubelet and API server
//! take it. Only the query's grammar lives here; what the options mean when a log is read is
//! [`crate::logfmt`]'s, and this file must not touch log files.

use std::collections::BTreeSet;

use jiff::Timestamp;

use crate::logfmt::{LogError, LogOptions};

/// Parses `containerLogs`' URL query string (`follow=true&tailLines=10&sinceSeconds=60&timestamps=true&
/// previous=true&limitBytes=100&sinceTime=...`), percent-decoded; unknown keys are ignored. A
/// malformed value is [`LogError::BadRequest`] naming the parameter, and so are sinceSeconds
/// and sinceTime together (as in the real API). As in the API server, the first value of a
/// repeated key counts, and a flag given without a value (`follow`) is true.
pub fn log_options(query: &str) -> Result<LogOptions, LogError> {
    let mut opts = LogOptions::default();
    let mut seen = BTreeSet::new();
    let (mut since_seconds, mut since_time) = (None, None);
    for pair in query.strip_prefix('?').unwrap_or(query).split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(raw_key).ok_or_else(|| {
            LogError::BadRequest(format!("query parameter {raw_key:?}: invalid percent-encoding"))
        })?;
        const KNOWN: [&str; 7] =
            ["follow", "previous", "timestamps", "tailLines", "limitBytes", "sinceSeconds", "sinceTime"];
        // Unknown keys (`container`, `insecureSkipTLSVerifyBackend`, …) are ignored, values and all.
        if !KNOWN.contains(&key.as_str()) {
            continue;
        }
        let value = percent_decode(raw_value).ok_or_else(|| {
            LogError::BadRequest(format!("query parameter {key}: invalid percent-encoding in {raw_value:?}"))
        })?;
        if !seen.insert(key.clone()) {
            continue;
        }
        match key.as_str() {
            "follow" => opts.follow = parse_flag(&key, &value)?,
            "previous" => opts.previous = parse_flag(&key, &value)?,
            "timestamps" => opts.timestamps = parse_flag(&key, &value)?,
            "tailLines" => opts.tail_lines = Some(parse_count(&key, &value, 0)?),
            "limitBytes" => opts.limit_bytes = Some(parse_count(&key, &value, 1)?),
            "sinceSeconds" => since_seconds = Some(parse_count(&key, &value, 1)?),
            "sinceTime" => {
                let t = value.parse::<Timestamp>().map_err(|e| {
                    LogError::BadRequest(format!(
                        "invalid sinceTime {value:?}: want an RFC 3339 time such as 2024-05-01T12:00:00Z ({e})"
                    ))
                })?;
                since_time = Some(t);
            }
            _ => {}
        }
    }
    opts.since = match (since_seconds, since_time) {
        (Some(_), Some(_)) => {
            return Err(LogError::BadRequest(
                "at most one of sinceTime or sinceSeconds may be specified".into(),
            ));
        }
        (Some(secs), None) => Some(since_seconds_ago(secs)),
        (None, t) => t,
    };
    Ok(opts)
}

/// The time `secs` seconds ago; a span reaching before the earliest time means "everything".
fn since_seconds_ago(secs: u64) -> Timestamp {
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    Timestamp::now().checked_sub(jiff::SignedDuration::from_secs(secs)).unwrap_or(Timestamp::MIN)
}

/// Decodes `%XX` escapes and `+` (a space in a query string); `None` for a broken escape or bytes
/// that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A boolean parameter, spelled as Go's `strconv.ParseBool` spells them; empty (`?follow`) is true.
fn parse_flag(key: &str, value: &str) -> Result<bool, LogError> {
    match value {
        "" | "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(LogError::BadRequest(format!("invalid {key} {value:?}: want true or false"))),
    }
}

/// A whole-number parameter of at least `min`.
fn parse_count(key: &str, value: &str, min: u64) -> Result<u64, LogError> {
    match value.parse::<u64>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(LogError::BadRequest(format!(
            "invalid {key} {value:?}: want a whole number of at least {min}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(query: &str) -> LogOptions {
        log_options(query).expect("valid query")
    }

    fn bad(query: &str) -> String {
        match log_options(query) {
            Err(e @ LogError::BadRequest(_)) => {
                assert_eq!(e.http_status(), 400);
                e.to_string()
            }
            other => panic!("{query}: expected BadRequest, got {other:?}"),
        }
    }

    #[test]
    fn queries_parse_as_the_kubelet_takes_them() {
        assert_eq!(opts(""), LogOptions::default());
        let o =
            opts("follow=true&tailLines=10&timestamps=1&previous=false&limitBytes=100&container=main&x=%zz");
        assert_eq!(
            o,
            LogOptions {
                follow: true,
                timestamps: true,
                tail_lines: Some(10),
                limit_bytes: Some(100),
                ..Default::default()
            }
        );
        assert!(opts("?follow").follow, "a bare flag is true");
        assert!(!opts("follow=false&follow=true").follow, "the first value counts");
        assert_eq!(opts("tailLines=0").tail_lines, Some(0));
        let t = opts("sinceTime=2024-05-01T12%3A00%3A00%2B02%3A00").since.expect("since");
        assert_eq!(t, "2024-05-01T10:00:00Z".parse::<Timestamp>().expect("ts"));
        let before = Timestamp::now();
        let since = opts("sinceSeconds=60").since.expect("since");
        let ago = before.as_second() - since.as_second();
        assert!((59..=61).contains(&ago), "{ago}");
        assert_eq!(opts(&format!("sinceSeconds={}", u64::MAX)).since, Some(Timestamp::MIN));

        assert!(bad("follow=yes").contains("follow"));
        assert!(bad("tailLines=-1").contains("tailLines"));
        assert!(bad("tailLines=ten").contains("tailLines"));
        assert!(bad("limitBytes=0").contains("limitBytes"));
        assert!(bad("sinceSeconds=0").contains("sinceSeconds"));
        assert!(bad("sinceTime=yesterday").contains("sinceTime"));
        assert!(bad("tailLines=%4").contains("tailLines"), "a broken escape names the parameter");
        assert!(bad("sinceSeconds=5&sinceTime=2024-05-01T10:00:00Z").contains("at most one of"));
    }
}
