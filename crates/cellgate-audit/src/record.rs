//! The audit record: one per decision, and the RFC 3339 time format it carries.
//!
//! Callers fill the descriptive fields and leave the chain fields (`seq`, `prev`, `hash`) at
//! their defaults; the [`crate::AuditLog`] writer fills those. A record holds metadata only:
//! never a secret, a header value outside the schema 2 allowlist (see the crate docs), a token
//! or a body.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Record schema written by this version: 2 adds what replaying a decision needs (`schema`,
/// `port`, `sni`, `headers`, `withheld`, `cell_uid`, `role`, `cell_generation`,
/// `policy_packs`). A record without `schema` is schema 1; every version verifies the same way.
pub const SCHEMA_VERSION: u32 = 2;

/// What was decided. Serialized in snake_case (`shadow_deny`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The request was let through.
    Allow,
    /// The request was refused by policy, identity or budget.
    Deny,
    /// The request could not be decided (an internal or upstream failure); it was refused.
    Error,
    /// A shadow-mode rule would have denied it; it was let through.
    ShadowDeny,
    /// The request waits for, or was answered with, a human approval.
    Approval,
    /// Not a request: an operator's action (a lockdown turned on or off).
    Control,
}

impl Decision {
    /// The label written in the record and used in metrics.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Error => "error",
            Decision::ShadowDeny => "shadow_deny",
            Decision::Approval => "approval",
            Decision::Control => "control",
        }
    }
}

/// One audit record. JSON field names are the Rust names; absent options are omitted.
///
/// Never put a secret or a body in any field: the log is read by people and exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// When the decision was made, RFC 3339 UTC with nanoseconds (see [`format_rfc3339`]).
    pub time: String,
    /// Node that decided (the Kubernetes node name, or `local`).
    pub node: String,
    /// Which listener saw the request: `intake`, `ext_authz`, `dns`, ...
    pub front_door: String,
    /// Cell name, when the caller was identified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<String>,
    /// Cell namespace, when the caller was identified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The identity token's `jti` (never the token itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// The agent's address, `addr:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The destination the agent dialled, `addr:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// `http`, `https`, `h2`, `tls`, `tcp` or `dns`.
    pub protocol: String,
    /// HTTP method, for HTTP requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Host (HTTP `Host`/`:authority`, TLS SNI, or DNS query name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// HTTP path. Strip the query string if it may carry secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The capability that granted (or would have granted) the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    /// What was decided.
    pub decision: Decision,
    /// Short snake_case label, the same one metrics carry: `no_capability`, `token_expired`,
    /// `ppv2_missing`, ...
    pub reason: String,
    /// Detail, most specific last. Omitted when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// Version of the policy that decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
    /// Budget state after the decision. Use integers: non-integer numbers are stored as
    /// strings (see the crate docs on the file format).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<serde_json::Value>,
    /// Time spent deciding, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// Request id, shared with traces and the response headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Record schema ([`SCHEMA_VERSION`]); absent in schema 1 records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<u32>,
    /// The port the request is for (the policy input's `request.port`), schema 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// TLS server name of the connection, when there was a ClientHello; schema 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// Request headers the policy read whose values cannot carry secrets (the allowlist in
    /// the crate docs); names lowercase. Omitted when empty. Schema 2.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// What the policy saw that the record leaves out on purpose: `query` (the query string),
    /// `header:<name>` (a header value not on the allowlist), `body` (the JSON body),
    /// `path` (a path redacted by a detector). Omitted when empty. Schema 2.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub withheld: Vec<String>,
    /// Uid of the cell the token names (API server uid, or `local:<ns>:<name>`); schema 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell_uid: Option<String>,
    /// Role claimed in the token; schema 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// `metadata.generation` of the cell the node decided with; schema 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell_generation: Option<i64>,
    /// Version of each policy pack that took part in the decision, by pack name; schema 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_packs: Option<BTreeMap<String, String>>,
    /// Position in the chain, from 1. Set by the writer.
    #[serde(default)]
    pub seq: u64,
    /// Hash of the previous record (64 `0` for the first). Set by the writer.
    #[serde(default)]
    pub prev: String,
    /// This record's hash. Set by the writer.
    #[serde(default)]
    pub hash: String,
}

/// Longest value of one string field after [`Record::clamp`], in bytes.
pub(crate) const CLAMP_FIELD_LEN: usize = 256;
/// Most detail reasons kept by [`Record::clamp`] (the clamp marker comes on top).
pub(crate) const CLAMP_REASONS: usize = 8;
/// Longest detail reason after [`Record::clamp`], in bytes.
pub(crate) const CLAMP_REASON_LEN: usize = 128;
/// Longest serialized `budget` kept by [`Record::clamp`], in bytes.
pub(crate) const CLAMP_BUDGET_LEN: usize = 4096;
/// Most entries kept in each map or list of schema 2 (`headers`, `withheld`, `policy_packs`)
/// by [`Record::clamp`].
pub(crate) const CLAMP_ENTRIES: usize = 8;
/// Longest key, value or list item of those after [`Record::clamp`], in bytes.
pub(crate) const CLAMP_ENTRY_LEN: usize = 64;
/// Reason appended to a record that [`Record::clamp`] shortened.
pub const CLAMPED_REASON: &str = "audit_record_clamped";

impl Record {
    /// A record stamped with the current time; fill the other fields before submitting.
    #[must_use]
    pub fn new(
        node: impl Into<String>,
        front_door: impl Into<String>,
        protocol: impl Into<String>,
        decision: Decision,
        reason: impl Into<String>,
    ) -> Record {
        Record {
            time: format_rfc3339(SystemTime::now()),
            node: node.into(),
            front_door: front_door.into(),
            cell: None,
            namespace: None,
            token_id: None,
            source: None,
            destination: None,
            protocol: protocol.into(),
            method: None,
            host: None,
            path: None,
            capability: None,
            decision,
            reason: reason.into(),
            reasons: Vec::new(),
            policy_version: None,
            budget: None,
            latency_us: None,
            request_id: None,
            schema: None,
            port: None,
            sni: None,
            headers: BTreeMap::new(),
            withheld: Vec::new(),
            cell_uid: None,
            role: None,
            cell_generation: None,
            policy_packs: None,
            seq: 0,
            prev: String::new(),
            hash: String::new(),
        }
    }

    /// Shortens every free-form field so that the record's line fits in
    /// [`crate::MAX_LINE_LEN`] whatever it held, and appends [`CLAMPED_REASON`] to `reasons`.
    ///
    /// The writer calls this only for a record whose line would be too long: an oversized
    /// record is still written (shortened and marked), never dropped. Worst case after the
    /// clamp, with every byte escaped as `\u00xx` (6 bytes): 21 fields of 256 bytes, 9
    /// reasons of 128 bytes, a budget of 4 KiB, 8 headers, 8 withheld items and 8 packs of
    /// 64-byte keys and values, keys and hashes: about 58 KiB.
    pub fn clamp(&mut self) {
        for field in [
            &mut self.time,
            &mut self.node,
            &mut self.front_door,
            &mut self.protocol,
            &mut self.reason,
        ] {
            truncate_utf8(field, CLAMP_FIELD_LEN);
        }
        for field in [
            &mut self.cell,
            &mut self.namespace,
            &mut self.token_id,
            &mut self.source,
            &mut self.destination,
            &mut self.method,
            &mut self.host,
            &mut self.path,
            &mut self.capability,
            &mut self.policy_version,
            &mut self.request_id,
            &mut self.sni,
            &mut self.cell_uid,
            &mut self.role,
        ]
        .into_iter()
        .flatten()
        {
            truncate_utf8(field, CLAMP_FIELD_LEN);
        }
        self.reasons.truncate(CLAMP_REASONS);
        for reason in &mut self.reasons {
            truncate_utf8(reason, CLAMP_REASON_LEN);
        }
        self.reasons.push(CLAMPED_REASON.to_owned());
        self.headers = clamp_map(std::mem::take(&mut self.headers));
        self.policy_packs = self.policy_packs.take().map(clamp_map);
        self.withheld.truncate(CLAMP_ENTRIES);
        for item in &mut self.withheld {
            truncate_utf8(item, CLAMP_ENTRY_LEN);
        }
        if let Some(budget) = &self.budget {
            let len = serde_json::to_vec(budget).map_or(usize::MAX, |v| v.len());
            if len > CLAMP_BUDGET_LEN {
                self.budget = Some(serde_json::Value::String(format!(
                    "clamped: {len} bytes over the limit of {CLAMP_BUDGET_LEN}"
                )));
            }
        }
    }
}

/// The first [`CLAMP_ENTRIES`] entries of `map`, keys and values cut to [`CLAMP_ENTRY_LEN`].
fn clamp_map(map: BTreeMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter()
        .take(CLAMP_ENTRIES)
        .map(|(mut k, mut v)| {
            truncate_utf8(&mut k, CLAMP_ENTRY_LEN);
            truncate_utf8(&mut v, CLAMP_ENTRY_LEN);
            (k, v)
        })
        .collect()
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let cut = s.floor_char_boundary(max);
        s.truncate(cut);
    }
}

const SECS_PER_DAY: i64 = 86_400;

/// Formats a time as RFC 3339 in UTC with nine fractional digits:
/// `2024-02-29T13:45:07.000000001Z`.
///
/// Written by hand (Howard Hinnant's days-to-civil algorithm) to keep a date-time library out
/// of the dependency tree. Times before 1970 are supported; years outside 0000..=9999 are
/// clamped to that range, which RFC 3339 cannot express anyway.
#[must_use]
pub fn format_rfc3339(time: SystemTime) -> String {
    // (whole seconds since the epoch, nanoseconds in that second), flooring before the epoch.
    let (secs, nanos): (i64, u32) = match time.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(e) => {
            let d = e.duration();
            let whole = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            match d.subsec_nanos() {
                0 => (whole.saturating_neg(), 0),
                n => (
                    whole.saturating_neg().saturating_sub(1),
                    1_000_000_000_u32.saturating_sub(n),
                ),
            }
        }
    };
    // 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z.
    const MIN_SECS: i64 = -62_167_219_200;
    const MAX_SECS: i64 = 253_402_300_799;
    let (secs, nanos) = if secs < MIN_SECS {
        (MIN_SECS, 0)
    } else if secs > MAX_SECS {
        (MAX_SECS, 999_999_999)
    } else {
        (secs, nanos)
    };
    let days = secs.div_euclid(SECS_PER_DAY);
    let rem = secs.rem_euclid(SECS_PER_DAY);
    let (year, month, day) = civil_from_days(days).unwrap_or((1970, 1, 1));
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem.div_euclid(3600),
        rem.rem_euclid(3600).div_euclid(60),
        rem.rem_euclid(60),
    )
}

/// Parses a time as [`format_rfc3339`] writes it (`YYYY-MM-DDTHH:MM:SS[.fraction]Z`, UTC, up to
/// nine fractional digits) into nanoseconds since the Unix epoch: the `time_ns` a replayed
/// decision is given. `None` for any other form, or outside what an `i64` of nanoseconds holds
/// (years 1678 to 2261).
#[must_use]
pub fn parse_rfc3339_ns(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let digits = b.get(from..from.checked_add(len)?)?;
        digits.iter().try_fold(0_i64, |acc, &d| {
            let digit = i64::from(d.checked_sub(b'0').filter(|v| *v <= 9)?);
            acc.checked_mul(10)?.checked_add(digit)
        })
    };
    let sep = |at: usize, c: u8| b.get(at) == Some(&c);
    if !(sep(4, b'-') && sep(7, b'-') && sep(10, b'T') && sep(13, b':') && sep(16, b':')) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, min, sec) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    let rest = b.get(19..)?;
    let (frac, tail) = match rest.split_first() {
        Some((b'.', f)) => {
            let n = f.iter().take_while(|c| c.is_ascii_digit()).count();
            if n == 0 || n > 9 {
                return None;
            }
            let mut v = num(20, n)?;
            for _ in n..9 {
                v = v.checked_mul(10)?;
            }
            (v, f.get(n..)?)
        }
        _ => (0, rest),
    };
    if tail != b"Z" || !(1..=12).contains(&month) || hour > 23 || min > 59 || sec > 59 {
        return None;
    }
    let days = days_from_civil(year, month, day)?;
    // A day past the month's end comes back as another date: refuse it.
    if civil_from_days(days)? != (year, u32::try_from(month).ok()?, u32::try_from(day).ok()?) {
        return None;
    }
    days.checked_mul(SECS_PER_DAY)?
        .checked_add(hour.checked_mul(3600)?.checked_add(min.checked_mul(60)?)?)?
        .checked_add(sec)?
        .checked_mul(1_000_000_000)?
        .checked_add(frac)
}

/// (year, month 1..=12, day 1..=31) to days since 1970-01-01; the inverse of
/// [`civil_from_days`]. <https://howardhinnant.github.io/date_algorithms.html#days_from_civil>
#[allow(clippy::arithmetic_side_effects)] // inputs bounded by the caller: year < 10^4, month and day < 100
fn days_from_civil(year: i64, month: i64, day: i64) -> Option<i64> {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era.checked_mul(146_097)?
        .checked_add(doe)?
        .checked_sub(719_468)
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31) in the proleptic Gregorian
/// calendar. <https://howardhinnant.github.io/date_algorithms.html#civil_from_days>
///
/// `None` only on overflow, which the caller's clamp to years 0..=9999 rules out.
fn civil_from_days(days: i64) -> Option<(i64, u32, u32)> {
    // Shift the epoch to 0000-03-01 so that leap days fall at the end of a year.
    let z = days.checked_add(719_468)?;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = doe
        .checked_sub(doe.div_euclid(1460))?
        .checked_add(doe.div_euclid(36_524))?
        .checked_sub(doe.div_euclid(146_096))?
        .div_euclid(365); // [0, 399]
    let doy = doe.checked_sub(
        yoe.checked_mul(365)?
            .checked_add(yoe.div_euclid(4))?
            .checked_sub(yoe.div_euclid(100))?,
    )?; // [0, 365]
    let mp = doy.checked_mul(5)?.checked_add(2)?.div_euclid(153); // [0, 11], March = 0
    let day = doy
        .checked_sub(mp.checked_mul(153)?.checked_add(2)?.div_euclid(5))?
        .checked_add(1)?; // [1, 31]
    let month = if mp < 10 {
        mp.checked_add(3)?
    } else {
        mp.checked_sub(9)?
    };
    let year = era
        .checked_mul(400)?
        .checked_add(yoe)?
        .checked_add(i64::from(month <= 2))?;
    Some((year, u32::try_from(month).ok()?, u32::try_from(day).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: i64, nanos: u32) -> SystemTime {
        if secs >= 0 {
            UNIX_EPOCH + Duration::new(secs as u64, nanos)
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
                + Duration::from_nanos(nanos.into())
        }
    }

    #[test]
    fn known_times() {
        let cases = [
            (0, 0, "1970-01-01T00:00:00.000000000Z"),
            (951_782_400, 0, "2000-02-29T00:00:00.000000000Z"),
            (951_868_799, 999_999_999, "2000-02-29T23:59:59.999999999Z"),
            (1_709_210_096, 123_456_789, "2024-02-29T12:34:56.123456789Z"),
            (4_102_444_800, 1, "2100-01-01T00:00:00.000000001Z"),
            (4_107_542_400, 0, "2100-03-01T00:00:00.000000000Z"),
            (253_402_300_799, 0, "9999-12-31T23:59:59.000000000Z"),
            (-1, 0, "1969-12-31T23:59:59.000000000Z"),
            (-1, 500_000_000, "1969-12-31T23:59:59.500000000Z"),
            (-62_167_219_200, 0, "0000-01-01T00:00:00.000000000Z"),
            (-2_208_988_800, 0, "1900-01-01T00:00:00.000000000Z"),
        ];
        for (secs, nanos, want) in cases {
            assert_eq!(format_rfc3339(at(secs, nanos)), want, "{secs}.{nanos}");
        }
    }

    #[test]
    fn parse_is_the_inverse_of_format() {
        for (secs, nanos) in [
            (0_i64, 0_u32),
            (951_868_799, 999_999_999),
            (1_709_210_096, 123_456_789),
            (4_107_542_400, 1),
            (-1, 500_000_000),
        ] {
            let text = format_rfc3339(at(secs, nanos));
            let ns = parse_rfc3339_ns(&text).unwrap();
            assert_eq!(ns, secs * 1_000_000_000 + i64::from(nanos), "{text}");
        }
        assert_eq!(
            parse_rfc3339_ns("2024-02-29T12:34:56Z"),
            Some(1_709_210_096_000_000_000)
        );
        assert_eq!(
            parse_rfc3339_ns("2024-02-29T12:34:56.5Z"),
            Some(1_709_210_096_500_000_000)
        );
        for bad in [
            "",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00+01:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00.1234567890Z",
            "2024-01-01 00:00:00Z",
            "9999-12-31T23:59:59Z",
        ] {
            assert_eq!(parse_rfc3339_ns(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn out_of_range_years_are_clamped() {
        assert_eq!(
            format_rfc3339(at(300_000_000_000, 0)),
            "9999-12-31T23:59:59.999999999Z"
        );
        assert_eq!(
            format_rfc3339(at(-70_000_000_000, 0)),
            "0000-01-01T00:00:00.000000000Z"
        );
    }

    /// Checks the closed-form conversion against a naive day-by-day walk from 1900 to 2200.
    #[test]
    fn civil_from_days_matches_a_day_by_day_walk() {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let month_len = |y: i64, m: u32| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let (mut y, mut m, mut d) = (1900_i64, 1_u32, 1_u32);
        for days in -25_567_i64..84_000 {
            assert_eq!(civil_from_days(days), Some((y, m, d)), "day {days}");
            d += 1;
            if d > month_len(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn decision_serializes_snake_case() {
        for d in [
            Decision::Allow,
            Decision::Deny,
            Decision::Error,
            Decision::ShadowDeny,
            Decision::Approval,
        ] {
            assert_eq!(
                serde_json::to_value(d).unwrap(),
                serde_json::Value::String(d.as_str().into())
            );
        }
    }

    #[test]
    fn absent_options_are_omitted() {
        let rec = Record::new("n1", "intake", "tcp", Decision::Deny, "ppv2_missing");
        let v = serde_json::to_value(&rec).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut keys = keys;
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "decision",
                "front_door",
                "hash",
                "node",
                "prev",
                "protocol",
                "reason",
                "seq",
                "time"
            ]
        );
        let back: Record = serde_json::from_value(v).unwrap();
        assert_eq!(back, rec);
    }

    #[test]
    fn clamp_respects_char_boundaries_and_marks_the_record() {
        let mut rec = Record::new("n1", "intake", "http", Decision::Allow, "ok");
        rec.path = Some("é".repeat(10_000));
        rec.reasons = vec!["x".repeat(1000); 100];
        rec.budget = Some(serde_json::json!({ "big": "y".repeat(10_000) }));
        rec.clamp();
        let path = rec.path.as_deref().unwrap();
        assert!(path.len() <= CLAMP_FIELD_LEN && path.chars().all(|c| c == 'é'));
        assert_eq!(rec.reasons.len(), CLAMP_REASONS + 1);
        assert_eq!(rec.reasons.last().map(String::as_str), Some(CLAMPED_REASON));
        assert!(rec.budget.unwrap().as_str().unwrap().starts_with("clamped"));
    }
}
