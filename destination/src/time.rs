//! Event timestamps to the form Klaviyo takes: UTC ISO 8601, inside the
//! window Klaviyo accepts (2000-01-01 to one year after now). Chord sends
//! ISO 8601 in any precision and offset; some senders use epoch millis.

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, SecondsFormat, TimeZone, Utc};
use serde_json::Value;

use crate::klaviyo::limits;

/// The event time as Klaviyo's `time`, or a warning saying why it is left
/// out (Klaviyo then uses the time it receives the event).
pub fn event_time(value: &Value, now_unix_ms: i64) -> Result<String, String> {
    let time = parse(value).ok_or_else(|| {
        format!("timestamp {value} is not an ISO 8601 date-time or epoch milliseconds; `time` is left out")
    })?;
    let earliest = Utc
        .with_ymd_and_hms(limits::EARLIEST_EVENT_YEAR, 1, 1, 0, 0, 0)
        .single()
        .expect("a valid date");
    let latest = Utc
        .timestamp_millis_opt(now_unix_ms)
        .single()
        .map(|now| now + Duration::days(365));
    if time < earliest || latest.is_some_and(|latest| time > latest) {
        return Err(format!(
            "timestamp {value} is outside the window Klaviyo accepts ({} to one year from now); `time` is left out",
            limits::EARLIEST_EVENT_YEAR
        ));
    }
    Ok(time.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn parse(value: &Value) -> Option<DateTime<Utc>> {
    match value {
        Value::Number(n) => from_millis(n.as_f64()?),
        Value::String(text) => {
            let text = text.trim();
            if !text.is_empty() && text.chars().all(|c| c.is_ascii_digit()) {
                return from_millis(text.parse::<f64>().ok()?);
            }
            parse_iso(text)
        }
        _ => None,
    }
}

fn from_millis(ms: f64) -> Option<DateTime<Utc>> {
    if !ms.is_finite() {
        return None;
    }
    Utc.timestamp_millis_opt(ms as i64).single()
}

/// RFC 3339 and the looser ISO 8601 forms seen in the wild: any number of
/// fraction digits, `+hhmm` offsets, a space for `T`, no offset (UTC),
/// no seconds, a date alone.
fn parse_iso(text: &str) -> Option<DateTime<Utc>> {
    let upper = text.to_ascii_uppercase();
    if let Ok(t) = DateTime::parse_from_rfc3339(&upper) {
        return Some(t.with_timezone(&Utc));
    }
    let normalised = upper.replacen(' ', "T", 1);
    for format in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%dT%H:%M%z"] {
        if let Ok(t) = DateTime::parse_from_str(&normalised, format) {
            return Some(t.with_timezone(&Utc));
        }
    }
    let naive = normalised.trim_end_matches('Z');
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(naive, format) {
            return Some(t.and_utc());
        }
    }
    NaiveDate::parse_from_str(naive, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// 2026-11-28T00:00:00Z
    const NOW: i64 = 1_795_824_000_000;

    fn time(value: Value) -> Result<String, String> {
        event_time(&value, NOW)
    }

    #[test]
    fn iso_times_in_any_precision_and_offset_become_utc_millis() {
        for (input, expected) in [
            ("2025-09-12T20:00:00.000Z", "2025-09-12T20:00:00.000Z"),
            ("2025-09-12T11:45:45-04:00", "2025-09-12T15:45:45.000Z"),
            ("2025-09-12T20:00:00.123456789Z", "2025-09-12T20:00:00.123Z"),
            ("2025-09-12T20:00:00+0200", "2025-09-12T18:00:00.000Z"),
            ("2025-09-12 20:00:00", "2025-09-12T20:00:00.000Z"),
            ("2025-09-12t20:00:00z", "2025-09-12T20:00:00.000Z"),
            ("2025-09-12T20:00", "2025-09-12T20:00:00.000Z"),
            ("2025-09-12", "2025-09-12T00:00:00.000Z"),
        ] {
            assert_eq!(time(json!(input)).as_deref(), Ok(expected), "{input}");
        }
    }

    #[test]
    fn epoch_millis_are_accepted_as_numbers_and_digit_strings() {
        assert_eq!(time(json!(1757707200000i64)).as_deref(), Ok("2025-09-12T20:00:00.000Z"));
        assert_eq!(time(json!("1757707200000")).as_deref(), Ok("2025-09-12T20:00:00.000Z"));
    }

    #[test]
    fn times_outside_klaviyos_window_are_left_out_with_a_reason() {
        assert!(time(json!("1999-12-31T23:59:59Z")).unwrap_err().contains("outside"));
        assert!(time(json!("2027-12-01T00:00:00Z")).unwrap_err().contains("outside"));
        assert!(time(json!("2027-11-01T00:00:00Z")).is_ok());
        assert!(time(json!("yesterday")).unwrap_err().contains("not an ISO 8601"));
    }
}
