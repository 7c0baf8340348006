//! An audit record as an OpenTelemetry log record.
//!
//! Semantic-convention names where one exists, `cellgate.*` for the rest:
//!
//! | record field | attribute |
//! |---|---|
//! | `method` | `http.request.method` |
//! | `host` | `server.address` |
//! | port of `destination` | `server.port` |
//! | `path` (never a query: cut at `?` if one slipped in) | `url.path` |
//! | `source` | `client.address`, `client.port` |
//! | `namespace` | `k8s.namespace.name` |
//! | `node` | `k8s.node.name` |
//! | `cell`, `capability`, `decision`, `reason`, `reasons`, `policy_version`, `token_id`, `budget` (JSON text), `latency_us`, `request_id`, `front_door`, `protocol`, `destination` | `cellgate.cell`, `cellgate.capability`, `cellgate.decision`, `cellgate.reason`, `cellgate.reasons`, `cellgate.policy.version`, `cellgate.token.id`, `cellgate.budget`, `cellgate.latency_us`, `cellgate.request.id`, `cellgate.front_door`, `cellgate.protocol`, `cellgate.destination` |
//! | `seq`, `hash`, `prev` | `cellgate.record.seq`, `cellgate.record.hash` (the dedupe key), `cellgate.record.prev` |
//!
//! The log record's time is the decision's time; its event name `cellgate.decision`
//! (`cellgate.control` for control records such as lockdowns and operator events); its
//! severity INFO for allows and control records, WARN for denials and shadow denials, ERROR for
//! errors; its body `"<decision> <reason>"`. A record holds no secret and no body by
//! construction (see `cellgate_audit::Record`), and nothing else is added here.

use std::time::SystemTime;

use cellgate_audit::{Anchor, Decision, Record};
use opentelemetry::logs::{AnyValue, LogRecord as _, Severity};
use opentelemetry::Key;
use opentelemetry_sdk::logs::SdkLogRecord;

/// Event name of a decision record.
pub const EVENT_DECISION: &str = "cellgate.decision";
/// Event name of a control record (lockdown, operator events).
pub const EVENT_CONTROL: &str = "cellgate.control";
/// Event name of a signed chain-head anchor.
pub const EVENT_ANCHOR: &str = "cellgate.audit.anchor";

/// Fills `out` (a fresh record from the exporter's logger) from `rec`.
pub fn fill(out: &mut SdkLogRecord, rec: &Record) {
    if let Some(t) = parse_time(&rec.time) {
        out.set_timestamp(t);
    }
    out.set_observed_timestamp(SystemTime::now());
    let (number, text) = match rec.decision {
        Decision::Allow | Decision::Control => (Severity::Info, "INFO"),
        Decision::Error => (Severity::Error, "ERROR"),
        _ => (Severity::Warn, "WARN"),
    };
    out.set_severity_number(number);
    out.set_severity_text(text);
    out.set_event_name(if rec.decision == Decision::Control {
        EVENT_CONTROL
    } else {
        EVENT_DECISION
    });
    out.set_body(AnyValue::String(
        format!("{} {}", rec.decision.as_str(), rec.reason).into(),
    ));
    let mut put = |k: &'static str, v: AnyValue| out.add_attribute(Key::from_static_str(k), v);
    let s = |v: &str| AnyValue::String(v.to_owned().into());
    if let Some(m) = &rec.method {
        put("http.request.method", s(m));
    }
    if let Some(h) = &rec.host {
        put("server.address", s(h));
    }
    if let Some((_, port)) = rec.destination.as_deref().and_then(split_host_port) {
        put("server.port", AnyValue::Int(i64::from(port)));
    }
    if let Some(p) = &rec.path {
        let p = p.split_once('?').map_or(p.as_str(), |(path, _)| path);
        put("url.path", s(p));
    }
    if let Some((addr, port)) = rec.source.as_deref().and_then(split_host_port) {
        put("client.address", s(addr));
        put("client.port", AnyValue::Int(i64::from(port)));
    }
    if let Some(ns) = &rec.namespace {
        put("k8s.namespace.name", s(ns));
    }
    put("k8s.node.name", s(&rec.node));
    put("cellgate.front_door", s(&rec.front_door));
    put("cellgate.protocol", s(&rec.protocol));
    if let Some(d) = &rec.destination {
        put("cellgate.destination", s(d));
    }
    if let Some(c) = &rec.cell {
        put("cellgate.cell", s(c));
    }
    if let Some(c) = &rec.capability {
        put("cellgate.capability", s(c));
    }
    put("cellgate.decision", s(rec.decision.as_str()));
    put("cellgate.reason", s(&rec.reason));
    if !rec.reasons.is_empty() {
        put(
            "cellgate.reasons",
            AnyValue::ListAny(Box::new(rec.reasons.iter().map(|r| s(r)).collect())),
        );
    }
    if let Some(v) = &rec.policy_version {
        put("cellgate.policy.version", s(v));
    }
    if let Some(t) = &rec.token_id {
        put("cellgate.token.id", s(t));
    }
    if let Some(b) = &rec.budget {
        put("cellgate.budget", s(&b.to_string()));
    }
    if let Some(l) = rec.latency_us {
        put(
            "cellgate.latency_us",
            AnyValue::Int(i64::try_from(l).unwrap_or(i64::MAX)),
        );
    }
    if let Some(r) = &rec.request_id {
        put("cellgate.request.id", s(r));
    }
    put(
        "cellgate.record.seq",
        AnyValue::Int(i64::try_from(rec.seq).unwrap_or(i64::MAX)),
    );
    put("cellgate.record.hash", s(&rec.hash));
    put("cellgate.record.prev", s(&rec.prev));
}

/// Fills `out` with a signed chain-head anchor: event `cellgate.audit.anchor`, body the
/// anchor's line of the anchors file (so the bodies a collector kept, one per line, are an
/// anchors file `cellgate audit verify --anchors` reads), attributes `cellgate.anchor.seq`,
/// `cellgate.anchor.hash`, `cellgate.anchor.key_id`, `cellgate.anchor.sig`, `k8s.node.name`.
pub fn fill_anchor(out: &mut SdkLogRecord, anchor: &Anchor) {
    if let Some(t) = parse_time(&anchor.time) {
        out.set_timestamp(t);
    }
    out.set_observed_timestamp(SystemTime::now());
    out.set_severity_number(Severity::Info);
    out.set_severity_text("INFO");
    out.set_event_name(EVENT_ANCHOR);
    let line = anchor.to_line();
    let line = String::from_utf8_lossy(line.strip_suffix(b"\n").unwrap_or(&line)).into_owned();
    out.set_body(AnyValue::String(line.into()));
    let s = |v: &str| AnyValue::String(v.to_owned().into());
    out.add_attribute(Key::from_static_str("k8s.node.name"), s(&anchor.node));
    out.add_attribute(
        Key::from_static_str("cellgate.anchor.seq"),
        AnyValue::Int(i64::try_from(anchor.seq).unwrap_or(i64::MAX)),
    );
    out.add_attribute(
        Key::from_static_str("cellgate.anchor.hash"),
        s(&anchor.hash),
    );
    out.add_attribute(
        Key::from_static_str("cellgate.anchor.key_id"),
        s(&anchor.key_id),
    );
    out.add_attribute(Key::from_static_str("cellgate.anchor.sig"), s(&anchor.sig));
}

/// `addr:port` or `[v6]:port` split; `None` without a port.
fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host, port))
}

/// The record's RFC 3339 time.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    s.parse::<jiff::Timestamp>().ok().map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::logs::{Logger as _, LoggerProvider as _};
    use opentelemetry_sdk::logs::SdkLoggerProvider;

    #[test]
    fn semantic_convention_names_and_no_query() {
        let provider = SdkLoggerProvider::builder().build();
        let logger = provider.logger("t");
        let mut out = logger.create_log_record();
        let mut rec = Record::new("node-a", "intake", "https", Decision::Deny, "no_capability");
        rec.method = Some("POST".into());
        rec.host = Some("api.example.com".into());
        rec.destination = Some("[2001:db8::1]:443".into());
        rec.source = Some("10.0.0.7:40000".into());
        rec.path = Some("/v1/x?token=leak".into());
        rec.namespace = Some("team".into());
        rec.cell = Some("agent".into());
        rec.seq = 7;
        rec.hash = "a".repeat(64);
        rec.prev = "b".repeat(64);
        fill(&mut out, &rec);
        let attrs: std::collections::HashMap<String, String> = out
            .attributes_iter()
            .map(|(k, v)| (k.to_string(), format!("{v:?}")))
            .collect();
        assert!(attrs["http.request.method"].contains("POST"));
        assert!(attrs["server.address"].contains("api.example.com"));
        assert_eq!(attrs["server.port"], "Int(443)");
        assert!(attrs["url.path"].contains("/v1/x") && !attrs["url.path"].contains("leak"));
        assert!(attrs["client.address"].contains("10.0.0.7"));
        assert_eq!(attrs["client.port"], "Int(40000)");
        assert!(attrs["k8s.namespace.name"].contains("team"));
        assert!(attrs["cellgate.record.hash"].contains(&"a".repeat(64)));
        assert_eq!(attrs["cellgate.record.seq"], "Int(7)");
        assert_eq!(out.severity_number(), Some(Severity::Warn));
        assert_eq!(out.event_name(), Some(EVENT_DECISION));
        assert!(out.timestamp().is_some());
    }
}
