//! Alerts: webhooks told about what operators should look at now.
//!
//! Start reading at [`Alerts::start`]. Alerts are derived from the audit record stream
//! ([`cellgate_audit::AuditLog::subscribe`], a broadcast that never blocks the writer) by
//! [`Deriver`], plus events other node code reports directly ([`Alerts::audit_backlog`]):
//!
//! | event | raised by |
//! |---|---|
//! | `denial_rate` | more than `denialRate.perCell` `deny` records of one cell within one `denialRate.window` (once per window and cell) |
//! | `budget_exhausted` | a `deny` record with reason `budget_exhausted` (once per `cooldown`, cell and capability) |
//! | `approval_waiting` | an `approval` record with reason `approval_requested` (each one: each waits for a human) |
//! | `lockdown` | a `control` record with reason `lockdown_on` or `lockdown_off` |
//! | `audit_backlog` | [`Alerts::audit_backlog`] (at most once per `cooldown`) |
//! | `records_skipped` | the alerter fell behind the audit stream and skipped records; sent to every sink |
//!
//! Delivery is best effort, unlike audit records (which are never dropped): each sink has a
//! bounded queue; when it is full the oldest alert is dropped and counted
//! (`cellgate_alerts_dropped_total{sink}`). A task per sink posts each alert, signed with
//! HMAC-SHA256 (`X-Cellgate-Signature: sha256=<hex>`), with a delivery id that stays the same
//! across retries (`X-Cellgate-Delivery`), retrying with exponential backoff and jitter a bounded
//! number of times. Everything runs on a thread of its own (`cellgate-alerts`), so neither a slow
//! receiver nor a flood of alerts touches the data path's runtime.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use cellgate_audit::{Decision, Record};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use ring::hmac;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Notify};

use crate::metrics::AlertMetrics;

/// Largest alerts file read, bytes: a few sinks fit in far less.
pub const MAX_FILE_BYTES: u64 = 64 * 1024;
/// Most sinks: each has a task, a queue and a client.
pub const MAX_SINKS: usize = 16;
/// Largest queue per sink: alerts are small, but a typo must not reserve gigabytes.
pub const MAX_QUEUE: usize = 65_536;
/// Most delivery attempts per alert.
pub const MAX_ATTEMPTS: u32 = 20;
/// Largest HMAC key or URL file read, bytes.
const MAX_SECRET_BYTES: u64 = 4096;
/// Most cells (and cell/capability pairs) whose denials are tracked at once; past it the
/// oldest expired entries are forgotten, and a new cell is not tracked until one expires.
pub const MAX_TRACKED: usize = 4096;
/// Longest `detail` in an alert, bytes.
const MAX_DETAIL: usize = 512;
/// Header carrying the HMAC of the body.
pub const SIGNATURE_HEADER: &str = "x-cellgate-signature";
/// Header naming the event.
pub const EVENT_HEADER: &str = "x-cellgate-event";
/// Header carrying the delivery id, the same across the retries of one alert.
pub const DELIVERY_HEADER: &str = "x-cellgate-delivery";

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// More denials of one cell than `denialRate.perCell` within `denialRate.window`.
    DenialRate,
    /// A budget was used up.
    BudgetExhausted,
    /// A request waits for a human's approval.
    ApprovalWaiting,
    /// A lockdown was turned on or off.
    Lockdown,
    /// The audit exporter's backlog passed its threshold.
    AuditBacklog,
    /// The alerter fell behind the audit stream; not configurable: every sink gets it.
    #[serde(skip_deserializing)]
    RecordsSkipped,
}

impl Event {
    /// The label in payloads, headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DenialRate => "denial_rate",
            Self::BudgetExhausted => "budget_exhausted",
            Self::ApprovalWaiting => "approval_waiting",
            Self::Lockdown => "lockdown",
            Self::AuditBacklog => "audit_backlog",
            Self::RecordsSkipped => "records_skipped",
        }
    }

    const CONFIGURABLE: [Event; 5] = [
        Self::DenialRate,
        Self::BudgetExhausted,
        Self::ApprovalWaiting,
        Self::Lockdown,
        Self::AuditBacklog,
    ];
}

/// Payload shape of a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The [`Alert`] as JSON, with its delivery id.
    #[default]
    Json,
    /// `{"text": "..."}`, the shape of a Slack incoming webhook.
    Slack,
}

// ---- the file ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct File {
    sinks: Vec<SinkFile>,
    #[serde(default)]
    denial_rate: Option<DenialRateFile>,
    #[serde(default)]
    queue: Option<QueueFile>,
    #[serde(default)]
    retry: Option<RetryFile>,
    #[serde(default)]
    cooldown: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SinkFile {
    name: String,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    url_file: Option<PathBuf>,
    #[serde(default)]
    secret_file: Option<PathBuf>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    format: Format,
    #[serde(default)]
    events: Option<Vec<Event>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DenialRateFile {
    per_cell: u64,
    #[serde(default)]
    window: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct QueueFile {
    capacity: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RetryFile {
    #[serde(default)]
    attempts: Option<u32>,
    #[serde(default)]
    backoff_base: Option<String>,
    #[serde(default)]
    backoff_max: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
}

/// Why the alerts file is refused. The node does not start with a file it refuses.
#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    /// The file (or a file it names) cannot be read.
    #[error("{path}: {why}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The YAML does not parse, or has a key the node does not know.
    #[error("{path}: {why}")]
    Parse {
        /// The alerts file.
        path: PathBuf,
        /// serde's message, with the field path and position.
        why: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: {field}: {why}")]
    Invalid {
        /// The alerts file.
        path: PathBuf,
        /// Which field, e.g. `sinks[1].url`.
        field: String,
        /// What is wrong, and the hint.
        why: String,
    },
}

/// An HMAC key; `Debug` prints nothing of it.
#[derive(Clone)]
pub struct SigningKey(hmac::Key);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    /// A key from its bytes.
    pub fn new(secret: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// `sha256=<hex HMAC-SHA256 of body>`, the value of [`SIGNATURE_HEADER`].
    pub fn sign(&self, body: &[u8]) -> String {
        format!("sha256={}", hex::encode(hmac::sign(&self.0, body).as_ref()))
    }
}

/// A sink's URL; `Debug` and `Display` show the scheme and authority only (a Slack webhook's
/// path is its credential).
#[derive(Clone)]
pub struct SinkUrl(http::Uri);

impl SinkUrl {
    /// Scheme and authority, for logs.
    pub fn redacted(&self) -> String {
        format!(
            "{}://{}/...",
            self.0.scheme_str().unwrap_or("?"),
            self.0.authority().map(|a| a.host()).unwrap_or("?")
        )
    }
}

impl std::fmt::Debug for SinkUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// One resolved sink.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Name, in metrics and logs.
    pub name: String,
    /// Where alerts are posted.
    pub url: SinkUrl,
    /// HMAC key (required for `json`, optional for `slack`).
    pub key: Option<SigningKey>,
    /// Extra CA file for an https URL, added to the system roots.
    pub ca_file: Option<PathBuf>,
    /// Payload shape.
    pub format: Format,
    /// Events this sink receives (`records_skipped` always).
    pub events: Vec<Event>,
}

impl SinkConfig {
    fn wants(&self, e: Event) -> bool {
        e == Event::RecordsSkipped || self.events.contains(&e)
    }
}

/// Retry policy of deliveries.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts per alert, the first included.
    pub attempts: u32,
    /// Wait before the second attempt; doubled after each failure.
    pub backoff_base: Duration,
    /// Longest wait between attempts.
    pub backoff_max: Duration,
    /// Bound on one attempt (connect, request, response head).
    pub timeout: Duration,
}

/// The resolved alerts configuration ([`AlertsConfig::load`]).
#[derive(Debug, Clone)]
pub struct AlertsConfig {
    /// Where to post.
    pub sinks: Vec<SinkConfig>,
    /// `denial_rate` fires past this many denials of one cell...
    pub denial_per_cell: u64,
    /// ... within this window.
    pub denial_window: Duration,
    /// Queue capacity per sink.
    pub queue_capacity: usize,
    /// Retries.
    pub retry: Retry,
    /// Least time between two `budget_exhausted` alerts of one cell and capability, and between
    /// two `audit_backlog` alerts.
    pub cooldown: Duration,
}

/// Parses `500ms`, `2s`, `1m`, `1h`.
fn parse_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
}

fn read_small(path: &Path) -> Result<Vec<u8>, AlertsError> {
    let err = |why: String| AlertsError::Read {
        path: path.to_owned(),
        why,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| err(e.to_string()))?
        .len();
    if len > MAX_SECRET_BYTES {
        return Err(err(format!("over {MAX_SECRET_BYTES} bytes")));
    }
    std::fs::read(path).map_err(|e| err(e.to_string()))
}

fn trim_bytes(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    b.get(start..end).unwrap_or_default()
}

/// Checks an http(s) URL with a host.
fn parse_url(s: &str) -> Result<http::Uri, &'static str> {
    let uri: http::Uri = s.parse().map_err(|_| "not a URL")?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("not an http:// or https:// URL"),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL names no host");
    }
    Ok(uri)
}

impl AlertsConfig {
    /// Reads and checks the alerts file, and the secret, URL and CA files it names.
    ///
    /// # Errors
    /// An [`AlertsError`] naming the file and the field: a key the node does not know, a
    /// `json` sink without `secretFile`, a URL that is not http(s), an unreadable file, a value
    /// out of range.
    pub fn load(path: &Path) -> Result<Self, AlertsError> {
        let len = std::fs::metadata(path)
            .map_err(|e| AlertsError::Read {
                path: path.to_owned(),
                why: e.to_string(),
            })?
            .len();
        if len > MAX_FILE_BYTES {
            return Err(AlertsError::Read {
                path: path.to_owned(),
                why: format!("over {MAX_FILE_BYTES} bytes"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| AlertsError::Read {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    /// [`AlertsConfig::load`] on text already read; `path` names it in errors. Files it names
    /// (secrets, URLs, CAs) are read from the file system.
    ///
    /// # Errors
    /// As [`AlertsConfig::load`].
    pub fn parse(path: &Path, text: &str) -> Result<Self, AlertsError> {
        let invalid = |field: String, why: String| AlertsError::Invalid {
            path: path.to_owned(),
            field,
            why,
        };
        let file: File = serde_yaml::from_str(text).map_err(|e| AlertsError::Parse {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        if file.sinks.is_empty() {
            return Err(invalid(
                "sinks".into(),
                "no sink: name at least one, or run the node without --alerts".into(),
            ));
        }
        if file.sinks.len() > MAX_SINKS {
            return Err(invalid(
                "sinks".into(),
                format!("{} sinks; at most {MAX_SINKS}", file.sinks.len()),
            ));
        }
        let dur = |field: &str, v: Option<&String>, default: Duration| match v {
            None => Ok(default),
            Some(s) => parse_duration(s).ok_or_else(|| {
                invalid(
                    field.into(),
                    format!("{s:?} is not a duration like 500ms, 30s or 5m"),
                )
            }),
        };
        let mut sinks = Vec::with_capacity(file.sinks.len());
        for (i, s) in file.sinks.into_iter().enumerate() {
            let f = |k: &str| format!("sinks[{i}].{k}");
            let name_ok = !s.name.is_empty()
                && s.name.len() <= 63
                && s.name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
            if !name_ok {
                return Err(invalid(
                    f("name"),
                    format!("{:?}: 1 to 63 letters, digits, '-' or '_'", s.name),
                ));
            }
            if sinks.iter().any(|o: &SinkConfig| o.name == s.name) {
                return Err(invalid(f("name"), format!("{:?} twice", s.name)));
            }
            let url = match (&s.url, &s.url_file) {
                (Some(u), None) => {
                    parse_url(u).map_err(|why| invalid(f("url"), format!("{u:?}: {why}")))?
                }
                (None, Some(p)) => {
                    let raw = read_small(p)?;
                    // The value is a credential (a Slack webhook's path): never in the message.
                    let u = std::str::from_utf8(trim_bytes(&raw)).map_err(|_| {
                        invalid(f("urlFile"), format!("{}: not UTF-8", p.display()))
                    })?;
                    parse_url(u)
                        .map_err(|why| invalid(f("urlFile"), format!("{}: {why}", p.display())))?
                }
                _ => {
                    return Err(invalid(
                        f("url"),
                        "give exactly one of url and urlFile".into(),
                    ))
                }
            };
            let key = match &s.secret_file {
                Some(p) => {
                    let raw = read_small(p)?;
                    let secret = trim_bytes(&raw);
                    if secret.len() < 16 {
                        return Err(invalid(
                            f("secretFile"),
                            format!("{}: the key is under 16 bytes", p.display()),
                        ));
                    }
                    Some(SigningKey::new(secret))
                }
                None if s.format == Format::Json => {
                    return Err(invalid(
                        f("secretFile"),
                        "required for format json: receivers check the X-Cellgate-Signature HMAC with it".into(),
                    ))
                }
                None => None,
            };
            if let Some(p) = &s.ca_file {
                if url.scheme_str() != Some("https") {
                    return Err(invalid(f("caFile"), "only for an https:// URL".into()));
                }
                // Checked now, not at the first alert.
                cellgate_tls::upstream::client_config(std::slice::from_ref(p), false)
                    .map_err(|e| invalid(f("caFile"), e.to_string()))?;
            }
            let events = match s.events {
                None => Event::CONFIGURABLE.to_vec(),
                Some(e) if e.is_empty() => {
                    return Err(invalid(
                        f("events"),
                        "empty: name at least one event, or leave events out for all".into(),
                    ))
                }
                Some(e) => e,
            };
            sinks.push(SinkConfig {
                name: s.name,
                url: SinkUrl(url),
                key,
                ca_file: s.ca_file,
                format: s.format,
                events,
            });
        }
        let (denial_per_cell, denial_window) = match &file.denial_rate {
            None => (20, Duration::from_secs(60)),
            Some(d) => (
                d.per_cell,
                dur(
                    "denialRate.window",
                    d.window.as_ref(),
                    Duration::from_secs(60),
                )?,
            ),
        };
        if denial_per_cell == 0 {
            return Err(invalid(
                "denialRate.perCell".into(),
                "must be at least 1: the alert fires past this many denials".into(),
            ));
        }
        let queue_capacity = file.queue.as_ref().map_or(256, |q| q.capacity);
        if !(1..=MAX_QUEUE).contains(&queue_capacity) {
            return Err(invalid(
                "queue.capacity".into(),
                format!("{queue_capacity} is not between 1 and {MAX_QUEUE}"),
            ));
        }
        let r = file.retry.as_ref();
        let retry = Retry {
            attempts: r.and_then(|r| r.attempts).unwrap_or(5),
            backoff_base: dur(
                "retry.backoffBase",
                r.and_then(|r| r.backoff_base.as_ref()),
                Duration::from_millis(500),
            )?,
            backoff_max: dur(
                "retry.backoffMax",
                r.and_then(|r| r.backoff_max.as_ref()),
                Duration::from_secs(30),
            )?,
            timeout: dur(
                "retry.timeout",
                r.and_then(|r| r.timeout.as_ref()),
                Duration::from_secs(5),
            )?,
        };
        if !(1..=MAX_ATTEMPTS).contains(&retry.attempts) {
            return Err(invalid(
                "retry.attempts".into(),
                format!("{} is not between 1 and {MAX_ATTEMPTS}", retry.attempts),
            ));
        }
        if retry.backoff_max < retry.backoff_base {
            return Err(invalid(
                "retry.backoffMax".into(),
                "must be at least retry.backoffBase".into(),
            ));
        }
        let cooldown = dur("cooldown", file.cooldown.as_ref(), Duration::from_secs(300))?;
        Ok(Self {
            sinks,
            denial_per_cell,
            denial_window,
            queue_capacity,
            retry,
            cooldown,
        })
    }
}

// ---- alerts ----

/// One alert: the JSON payload of a `json` sink (with `delivery` added). Absent fields are
/// omitted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// What happened.
    pub event: Event,
    /// When, RFC 3339 UTC: the audit record's time, or when the event was reported.
    pub time: String,
    /// The node that raised it.
    pub node: String,
    /// The cell's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cell: Option<String>,
    /// The cell's namespace (for a lockdown, the namespace locked; none: every cell).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The audit reason label of the record behind it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The capability concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    /// A readable sentence.
    pub detail: String,
    /// `denial_rate`: denials in the window when it fired; `audit_backlog`: records waiting;
    /// `records_skipped`: records skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// `denial_rate`: the `perCell` it passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u64>,
    /// `denial_rate`: the window, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<u64>,
    /// `audit_backlog`: age of the oldest record not exported, seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// The `seq` of the audit record behind it (look it up with `cellgate audit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The request id of that record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl Alert {
    fn new(event: Event, time: String, node: &str, detail: String) -> Self {
        let mut detail = detail;
        if detail.len() > MAX_DETAIL {
            let mut end = MAX_DETAIL;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
        }
        Self {
            event,
            time,
            node: node.to_string(),
            cell: None,
            namespace: None,
            reason: None,
            capability: None,
            detail,
            count: None,
            threshold: None,
            window_seconds: None,
            lag_seconds: None,
            seq: None,
            request_id: None,
        }
    }

    fn from_record(event: Event, rec: &Record, detail: String) -> Self {
        let mut a = Self::new(event, rec.time.clone(), &rec.node, detail);
        a.cell = rec.cell.clone();
        a.namespace = rec.namespace.clone();
        a.reason = Some(rec.reason.clone());
        a.capability = rec.capability.clone();
        a.seq = Some(rec.seq);
        a.request_id = rec.request_id.clone();
        a
    }

    /// The one line of a `slack` payload.
    pub fn text(&self) -> String {
        let mut s = format!("[cellgate] {} on node {}", self.event.as_str(), self.node);
        match (&self.namespace, &self.cell) {
            (Some(ns), Some(c)) => s.push_str(&format!(", cell {ns}/{c}")),
            (Some(ns), None) => s.push_str(&format!(", namespace {ns}")),
            _ => {}
        }
        s.push_str(": ");
        s.push_str(&self.detail);
        s
    }
}

#[derive(Debug)]
struct Window {
    start: Instant,
    count: u64,
    alerted: bool,
}

/// Turns audit records into alerts: a pure state machine (time is passed in).
#[derive(Debug)]
pub struct Deriver {
    per_cell: u64,
    window: Duration,
    cooldown: Duration,
    denials: HashMap<(String, String), Window>,
    budget_sent: HashMap<(String, String, String), Instant>,
}

impl Deriver {
    /// A deriver with the thresholds of `config`.
    pub fn new(config: &AlertsConfig) -> Self {
        Self {
            per_cell: config.denial_per_cell,
            window: config.denial_window,
            cooldown: config.cooldown,
            denials: HashMap::new(),
            budget_sent: HashMap::new(),
        }
    }

    /// The alerts `rec` raises at `now` (none, one, or two: a budget denial counts as a denial
    /// too).
    pub fn on_record(&mut self, rec: &Record, now: Instant) -> Vec<Alert> {
        let detail = || rec.reasons.join("; ");
        let mut out = Vec::new();
        match (rec.decision, rec.reason.as_str()) {
            (Decision::Control, "lockdown_on" | "lockdown_off") => {
                out.push(Alert::from_record(Event::Lockdown, rec, detail()));
            }
            (Decision::Approval, "approval_requested") => {
                out.push(Alert::from_record(Event::ApprovalWaiting, rec, detail()));
            }
            (Decision::Deny, reason) => {
                let (Some(ns), Some(cell)) = (&rec.namespace, &rec.cell) else {
                    return out;
                };
                if reason == "budget_exhausted" {
                    let key = (
                        ns.clone(),
                        cell.clone(),
                        rec.capability.clone().unwrap_or_default(),
                    );
                    let due = self
                        .budget_sent
                        .get(&key)
                        .is_none_or(|t| now.saturating_duration_since(*t) >= self.cooldown);
                    if due && self.room(now, true) {
                        self.budget_sent.insert(key, now);
                        out.push(Alert::from_record(Event::BudgetExhausted, rec, detail()));
                    }
                }
                let key = (ns.clone(), cell.clone());
                if !self.denials.contains_key(&key) && !self.room(now, false) {
                    return out;
                }
                let w = self.denials.entry(key).or_insert(Window {
                    start: now,
                    count: 0,
                    alerted: false,
                });
                if now.saturating_duration_since(w.start) >= self.window {
                    *w = Window {
                        start: now,
                        count: 0,
                        alerted: false,
                    };
                }
                w.count = w.count.saturating_add(1);
                if w.count > self.per_cell && !w.alerted {
                    w.alerted = true;
                    let mut a = Alert::from_record(
                        Event::DenialRate,
                        rec,
                        format!(
                            "{} denials within {}s (more than {}); the latest: {reason}",
                            w.count,
                            self.window.as_secs(),
                            self.per_cell
                        ),
                    );
                    a.count = Some(w.count);
                    a.threshold = Some(self.per_cell);
                    a.window_seconds = Some(self.window.as_secs());
                    out.push(a);
                }
            }
            _ => {}
        }
        out
    }

    /// Whether a new entry fits in the tracking maps, forgetting expired ones when full.
    fn room(&mut self, now: Instant, budget: bool) -> bool {
        if budget {
            if self.budget_sent.len() >= MAX_TRACKED {
                let cooldown = self.cooldown;
                self.budget_sent
                    .retain(|_, t| now.saturating_duration_since(*t) < cooldown);
            }
            self.budget_sent.len() < MAX_TRACKED
        } else {
            if self.denials.len() >= MAX_TRACKED {
                let window = self.window;
                self.denials
                    .retain(|_, w| now.saturating_duration_since(w.start) < window);
            }
            self.denials.len() < MAX_TRACKED
        }
    }
}

// ---- delivery ----

#[derive(Debug)]
struct Pending {
    alert: Alert,
    delivery: String,
}

/// One sink's bounded queue: full, the oldest alert is dropped.
#[derive(Debug)]
struct Queue {
    sink: SinkConfig,
    items: Mutex<VecDeque<Arc<Pending>>>,
    capacity: usize,
    ready: Notify,
    closed: AtomicBool,
    dropped: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    node: String,
    queues: Vec<Arc<Queue>>,
    metrics: AlertMetrics,
    epoch: Instant,
    cooldown_ms: u64,
    /// Milliseconds since `epoch` before which `audit_backlog` sends nothing.
    backlog_next_ms: AtomicU64,
}

impl Inner {
    /// Queues `alert` for every sink that wants it; never waits.
    fn raise(&self, alert: Alert) {
        let pending = Arc::new(Pending {
            delivery: uuid::Uuid::new_v4().to_string(),
            alert,
        });
        for q in &self.queues {
            if !q.sink.wants(pending.alert.event) {
                continue;
            }
            let dropped = {
                let mut items = q.items.lock().unwrap_or_else(|p| p.into_inner());
                let dropped = if items.len() >= q.capacity {
                    items.pop_front()
                } else {
                    None
                };
                items.push_back(pending.clone());
                dropped
            };
            q.ready.notify_one();
            if let Some(d) = dropped {
                self.metrics.dropped(&q.sink.name);
                let n = q.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // Logged at 1, 2, 4, 8, ... so a flood does not flood the log too.
                if n.is_power_of_two() {
                    tracing::warn!(
                        sink = %q.sink.name, event = d.alert.event.as_str(), delivery = %d.delivery,
                        dropped_total = n,
                        "alert queue full: the oldest alert was dropped (alerts are best effort)"
                    );
                }
            }
        }
    }
}

/// The node's alerter. Off until [`Alerts::start`]; every method is cheap and never waits.
#[derive(Debug, Default)]
pub struct Alerts {
    inner: OnceLock<Arc<Inner>>,
}

impl Alerts {
    /// Whether alerts are configured and running.
    pub fn enabled(&self) -> bool {
        self.inner.get().is_some()
    }

    /// Reports that the audit exporter's backlog passed its threshold: `records` waiting, the
    /// oldest `lag_secs` old. Raises an `audit_backlog` alert at most once per `cooldown`
    /// (default 5m); other calls return at once. Never blocks: a few atomic operations, and
    /// when an alert is due, a short lock on each sink's queue.
    pub fn audit_backlog(&self, records: u64, lag_secs: f64) {
        let Some(inner) = self.inner.get() else {
            return;
        };
        let now_ms = u64::try_from(inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = inner.backlog_next_ms.load(Ordering::Relaxed);
        if now_ms < next
            || inner
                .backlog_next_ms
                .compare_exchange(
                    next,
                    now_ms.saturating_add(inner.cooldown_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        let mut a = Alert::new(
            Event::AuditBacklog,
            cellgate_audit::format_rfc3339(SystemTime::now()),
            &inner.node,
            format!("{records} audit records wait for export; the oldest is {lag_secs:.1}s old"),
        );
        a.count = Some(records);
        a.lag_seconds = Some(lag_secs);
        inner.raise(a);
    }

    /// Starts alerting: a thread (`cellgate-alerts`) with its own runtime reads `records` (an
    /// [`cellgate_audit::AuditLog::subscribe`] receiver), derives alerts and delivers them.
    /// It ends when the audit log closes. Calling it twice does nothing the second time.
    ///
    /// # Errors
    /// When the thread, its runtime or a sink's TLS configuration cannot be created.
    pub fn start(
        &self,
        config: AlertsConfig,
        node: &str,
        metrics: &AlertMetrics,
        records: broadcast::Receiver<Arc<Record>>,
    ) -> std::io::Result<()> {
        if self.enabled() {
            return Ok(());
        }
        let mut clients = Vec::with_capacity(config.sinks.len());
        for s in &config.sinks {
            clients.push(sink_client(s).map_err(std::io::Error::other)?);
            metrics.register_sink(&s.name, &s.events);
        }
        let inner = Arc::new(Inner {
            node: node.to_string(),
            queues: config
                .sinks
                .iter()
                .map(|s| {
                    Arc::new(Queue {
                        sink: s.clone(),
                        items: Mutex::new(VecDeque::new()),
                        capacity: config.queue_capacity,
                        ready: Notify::new(),
                        closed: AtomicBool::new(false),
                        dropped: AtomicU64::new(0),
                    })
                })
                .collect(),
            metrics: metrics.clone(),
            epoch: Instant::now(),
            cooldown_ms: u64::try_from(config.cooldown.as_millis()).unwrap_or(u64::MAX),
            backlog_next_ms: AtomicU64::new(0),
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let deriver = Deriver::new(&config);
        let retry = config.retry;
        let run = inner.clone();
        std::thread::Builder::new()
            .name("cellgate-alerts".into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut senders = Vec::new();
                    for (q, client) in run.queues.iter().zip(clients) {
                        senders.push(tokio::spawn(deliver(
                            q.clone(),
                            client,
                            retry,
                            run.metrics.clone(),
                        )));
                    }
                    derive(&run, deriver, records).await;
                    for q in &run.queues {
                        q.closed.store(true, Ordering::Release);
                        q.ready.notify_one();
                    }
                    for s in senders {
                        let _ = s.await;
                    }
                });
            })?;
        for s in &config.sinks {
            tracing::info!(
                sink = %s.name, url = %s.url.redacted(), format = ?s.format,
                events = ?s.events.iter().map(|e| e.as_str()).collect::<Vec<_>>(),
                signed = s.key.is_some(), "alert sink configured"
            );
        }
        let _ = self.inner.set(inner);
        Ok(())
    }
}

/// Reads the record stream until it closes. A receiver that lagged raises one
/// `records_skipped` alert per lag, naming how many records it missed.
async fn derive(
    inner: &Inner,
    mut deriver: Deriver,
    mut records: broadcast::Receiver<Arc<Record>>,
) {
    loop {
        match records.recv().await {
            Ok(rec) => {
                for a in deriver.on_record(&rec, Instant::now()) {
                    inner.raise(a);
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(skipped = n, "the alerter fell behind the audit stream");
                let mut a = Alert::new(
                    Event::RecordsSkipped,
                    cellgate_audit::format_rfc3339(SystemTime::now()),
                    &inner.node,
                    format!(
                        "the alerter fell behind and skipped {n} audit records: alerts they would have raised were not sent (the records are in the audit log)"
                    ),
                );
                a.count = Some(n);
                inner.raise(a);
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

fn sink_client(s: &SinkConfig) -> Result<HttpClient, String> {
    let tls = if s.url.0.scheme_str() == Some("https") {
        let cas: Vec<PathBuf> = s.ca_file.iter().cloned().collect();
        cellgate_tls::upstream::client_config(&cas, false).map_err(|e| e.to_string())?
    } else {
        // Never used for TLS: an http:// sink.
        Arc::new(
            rustls::ClientConfig::builder_with_provider(cellgate_tls::crypto_provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
    };
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// The body of `p` for `format`.
fn body(format: Format, p: &Pending) -> Bytes {
    #[derive(Serialize)]
    struct Json<'a> {
        delivery: &'a str,
        #[serde(flatten)]
        alert: &'a Alert,
    }
    let v = match format {
        Format::Json => serde_json::to_vec(&Json {
            delivery: &p.delivery,
            alert: &p.alert,
        }),
        Format::Slack => serde_json::to_vec(&serde_json::json!({ "text": p.alert.text() })),
    };
    Bytes::from(v.unwrap_or_default())
}

enum Attempt {
    Delivered,
    Retry(String),
    GiveUp(String),
}

async fn attempt(
    client: &HttpClient,
    q: &Queue,
    p: &Pending,
    body: &Bytes,
    timeout: Duration,
) -> Attempt {
    let mut req = http::Request::post(q.sink.url.0.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("cellgate-node/", env!("CARGO_PKG_VERSION")),
        )
        .header(EVENT_HEADER, p.alert.event.as_str())
        .header(DELIVERY_HEADER, p.delivery.as_str());
    if let Some(k) = &q.sink.key {
        req = req.header(SIGNATURE_HEADER, k.sign(body));
    }
    let req = match req.body(Full::new(body.clone())) {
        Ok(r) => r,
        Err(e) => return Attempt::GiveUp(format!("request not built: {e}")),
    };
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Attempt::Retry(format!("no answer within {}ms", timeout.as_millis())),
        Ok(Err(e)) => Attempt::Retry(format!("request failed: {e}")),
        Ok(Ok(resp)) => {
            let s = resp.status();
            if s.is_success() {
                Attempt::Delivered
            } else if s.is_client_error()
                && s != http::StatusCode::REQUEST_TIMEOUT
                && s != http::StatusCode::TOO_MANY_REQUESTS
            {
                Attempt::GiveUp(format!("the receiver answered {s}"))
            } else {
                Attempt::Retry(format!("the receiver answered {s}"))
            }
        }
    }
}

/// Backoff before attempt `n + 1` (n ≥ 1): base·2ⁿ⁻¹, at most max, then a random part of it
/// between a half and the whole, so receivers that failed together are not retried together.
fn backoff(retry: &Retry, n: u32) -> Duration {
    let exp = retry
        .backoff_base
        .saturating_mul(1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX));
    let d = exp.min(retry.backoff_max);
    let mut b = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let frac = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX);
    d.mul_f64(0.5 + 0.5 * frac)
}

async fn deliver(q: Arc<Queue>, client: HttpClient, retry: Retry, metrics: AlertMetrics) {
    loop {
        let next = q
            .items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        let Some(p) = next else {
            if q.closed.load(Ordering::Acquire) {
                return;
            }
            q.ready.notified().await;
            continue;
        };
        let body = body(q.sink.format, &p);
        let mut n = 0;
        let failure = loop {
            n += 1;
            match attempt(&client, &q, &p, &body, retry.timeout).await {
                Attempt::Delivered => break None,
                Attempt::GiveUp(why) => break Some(why),
                Attempt::Retry(why) if n >= retry.attempts => break Some(why),
                Attempt::Retry(why) => {
                    tracing::debug!(sink = %q.sink.name, delivery = %p.delivery, attempt = n, %why, "alert not delivered; retrying");
                    tokio::time::sleep(backoff(&retry, n)).await;
                }
            }
        };
        match failure {
            None => metrics.sent(&q.sink.name, p.alert.event.as_str()),
            Some(why) => {
                metrics.failed(&q.sink.name);
                tracing::warn!(
                    sink = %q.sink.name, event = p.alert.event.as_str(), delivery = %p.delivery,
                    attempts = n, %why, "alert not delivered; given up"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Result<AlertsConfig, AlertsError> {
        AlertsConfig::parse(Path::new("alerts.yaml"), text)
    }

    fn with_secret(dir: &Path) -> PathBuf {
        let p = dir.join("hmac");
        std::fs::write(&p, "0123456789abcdef0123\n").unwrap();
        p
    }

    #[test]
    fn a_full_file_parses_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let secret = with_secret(dir.path());
        let c = cfg(&format!(
            "sinks:\n- name: ops\n  url: https://hooks.example.com/cellgate\n  secretFile: {}\n  events: [denial_rate, lockdown]\n\
             - name: chat\n  url: http://127.0.0.1:9/hook\n  format: slack\n\
             denialRate: {{perCell: 5, window: 30s}}\nqueue: {{capacity: 8}}\n\
             retry: {{attempts: 3, backoffBase: 100ms, backoffMax: 2s, timeout: 1s}}\ncooldown: 1m\n",
            secret.display()
        ))
        .unwrap();
        assert_eq!(c.sinks.len(), 2);
        assert_eq!(c.sinks[0].events, vec![Event::DenialRate, Event::Lockdown]);
        assert!(c.sinks[0].key.is_some());
        assert_eq!(c.sinks[1].format, Format::Slack);
        assert!(c.sinks[1].key.is_none());
        assert_eq!(c.sinks[1].events.len(), 5, "no events: all of them");
        assert!(c.sinks[1].wants(Event::RecordsSkipped));
        assert!(!c.sinks[0].wants(Event::AuditBacklog));
        assert_eq!(
            (c.denial_per_cell, c.denial_window),
            (5, Duration::from_secs(30))
        );
        assert_eq!(c.queue_capacity, 8);
        assert_eq!(c.retry.attempts, 3);
        assert_eq!(c.retry.backoff_base, Duration::from_millis(100));
        assert_eq!(c.cooldown, Duration::from_secs(60));
        // Debug never shows the key or the URL's path.
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("0123456789abcdef") && !dbg.contains("/cellgate"),
            "{dbg}"
        );
    }

    #[test]
    fn bad_files_are_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let secret = with_secret(dir.path());
        let s = secret.display();
        for (text, wanted) in [
            (format!("sinks:\n- name: a\n  url: http://x/\n  secretFile: {s}\n  colour: red\n"), "unknown field `colour`"),
            ("sinks: []\nextra: 1\n".to_string(), "unknown field `extra`"),
            ("sinks:\n- name: a\n  url: http://x/\n".to_string(), "sinks[0].secretFile: required for format json"),
            (format!("sinks:\n- name: a\n  url: ftp://x/\n  secretFile: {s}\n"), "sinks[0].url"),
            (format!("sinks:\n- name: a\n  url: not a url\n  secretFile: {s}\n"), "sinks[0].url"),
            (format!("sinks:\n- name: a\n  secretFile: {s}\n"), "exactly one of url and urlFile"),
            (format!("sinks:\n- name: a\n  url: http://x/\n  secretFile: {s}\n  events: [everything]\n"), "unknown variant `everything`"),
            (format!("sinks:\n- name: a\n  url: http://x/\n  secretFile: {s}\n  events: [records_skipped]\n"), "records_skipped"),
            (format!("sinks:\n- name: a\n  url: http://x/\n  secretFile: {s}\n  format: teams\n"), "unknown variant `teams`"),
            (format!("sinks:\n- name: a\n  url: http://x/\n  secretFile: {s}\ndenialRate: {{perCell: 0}}\n"), "denialRate.perCell"),
            (format!("sinks:\n- name: a\n  url: http://x/\n  secretFile: {s}\ndenialRate: {{perCell: 3, window: soon}}\n"), "denialRate.window"),
            (format!("sinks:\n- name: a\n  url: http://x/\n  secretFile: {s}\nqueue: {{capacity: 0}}\n"), "queue.capacity"),
            (format!("sinks:\n- name: a\n  url: http://x/\n  secretFile: {s}\nretry: {{attempts: 0}}\n"), "retry.attempts"),
            (format!("sinks:\n- name: a\n  url: http://x/\n  secretFile: {s}\n- name: a\n  url: http://y/\n  secretFile: {s}\n"), "\"a\" twice"),
            ("sinks:\n- name: a\n  url: http://x/\n  secretFile: /nonexistent/key\n".to_string(), "/nonexistent/key"),
            (format!("sinks:\n- name: a\n  url: http://x/\n  secretFile: {s}\n  caFile: {s}\n"), "only for an https"),
            ("sinks: []\n".to_string(), "no sink"),
        ] {
            let e = cfg(&text).unwrap_err().to_string();
            assert!(e.contains(wanted), "{text}\n=> {e}\n(wanted {wanted:?})");
        }
        let short = dir.path().join("short");
        std::fs::write(&short, "tiny").unwrap();
        let e = cfg(&format!(
            "sinks:\n- name: a\n  url: http://x/\n  secretFile: {}\n",
            short.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("under 16 bytes"), "{e}");
    }

    /// The kustomize component's example file is one the node takes.
    #[test]
    fn the_shipped_example_parses() {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/components/alerts/alerts.yaml"
        ))
        .unwrap();
        std::fs::write(dir.path().join("ops"), "0123456789abcdef0123").unwrap();
        let text = text.replace(
            "/etc/cellgate/alerts-secret/",
            &format!("{}/", dir.path().display()),
        );
        let c = cfg(&text).unwrap();
        assert_eq!(c.sinks[0].name, "ops");
        assert!(c.sinks[0].key.is_some());
    }

    #[test]
    fn a_url_file_is_read_and_never_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("url");
        std::fs::write(
            &good,
            "https://hooks.slack.test/services/T0/B0/SECRETPATH\n",
        )
        .unwrap();
        let c = cfg(&format!(
            "sinks:\n- name: s\n  urlFile: {}\n  format: slack\n",
            good.display()
        ))
        .unwrap();
        assert_eq!(c.sinks[0].url.redacted(), "https://hooks.slack.test/...");
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "gopher://SECRETPATH").unwrap();
        let e = cfg(&format!(
            "sinks:\n- name: s\n  urlFile: {}\n  format: slack\n",
            bad.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sinks[0].urlFile") && !e.contains("SECRETPATH"),
            "{e}"
        );
    }

    fn deny(cell: &str, reason: &str) -> Record {
        let mut r = Record::new("n1", "intake", "https", Decision::Deny, reason);
        r.cell = Some(cell.into());
        r.namespace = Some("agents".into());
        r
    }

    fn deriver(per_cell: u64) -> Deriver {
        Deriver {
            per_cell,
            window: Duration::from_secs(60),
            cooldown: Duration::from_secs(300),
            denials: HashMap::new(),
            budget_sent: HashMap::new(),
        }
    }

    #[test]
    fn denial_rate_fires_once_per_window_and_cell() {
        let mut d = deriver(3);
        let t0 = Instant::now();
        let mut fired = Vec::new();
        for i in 0..10 {
            fired.extend(d.on_record(&deny("a", "no_capability"), t0 + Duration::from_millis(i)));
        }
        for i in 0..3 {
            fired.extend(d.on_record(&deny("b", "no_capability"), t0 + Duration::from_millis(i)));
        }
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert_eq!(fired[0].event, Event::DenialRate);
        assert_eq!(fired[0].cell.as_deref(), Some("a"));
        assert_eq!((fired[0].count, fired[0].threshold), (Some(4), Some(3)));
        // A new window counts again.
        let later = t0 + Duration::from_secs(61);
        let again: Vec<_> = (0..4)
            .flat_map(|i| {
                d.on_record(
                    &deny("a", "no_capability"),
                    later + Duration::from_millis(i),
                )
            })
            .collect();
        assert_eq!(again.len(), 1);
        // Allows and unidentified denials are not counted.
        let mut allow = deny("c", "allowed");
        allow.decision = Decision::Allow;
        let mut anon = deny("c", "ppv2_missing");
        anon.cell = None;
        for _ in 0..10 {
            assert!(d.on_record(&allow, later).is_empty());
            assert!(d.on_record(&anon, later).is_empty());
        }
    }

    #[test]
    fn records_map_to_their_events() {
        let mut d = deriver(100);
        let now = Instant::now();
        let mut b = deny("a", "budget_exhausted");
        b.capability = Some("windowed".into());
        let first = d.on_record(&b, now);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].event, Event::BudgetExhausted);
        assert_eq!(first[0].capability.as_deref(), Some("windowed"));
        assert!(d.on_record(&b, now).is_empty(), "cooldown");
        assert_eq!(d.on_record(&b, now + Duration::from_secs(301)).len(), 1);
        let mut ap = Record::new(
            "n1",
            "intake",
            "https",
            Decision::Approval,
            "approval_requested",
        );
        ap.cell = Some("a".into());
        assert_eq!(d.on_record(&ap, now)[0].event, Event::ApprovalWaiting);
        assert_eq!(
            d.on_record(&ap, now).len(),
            1,
            "each approval waits for a human"
        );
        for r in ["lockdown_on", "lockdown_off"] {
            let l = Record::new("n1", "admin", "control", Decision::Control, r);
            let a = d.on_record(&l, now);
            assert_eq!(a[0].event, Event::Lockdown);
            assert_eq!(a[0].reason.as_deref(), Some(r));
        }
        let other = Record::new(
            "n1",
            "intake",
            "https",
            Decision::Control,
            "secret_scrubbed",
        );
        assert!(d.on_record(&other, now).is_empty());
    }

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        let k = SigningKey::new(b"Jefe");
        assert_eq!(
            k.sign(b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(format!("{k:?}"), "SigningKey(<redacted>)");
    }

    #[test]
    fn backoff_doubles_within_bounds() {
        let r = Retry {
            attempts: 5,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(300),
            timeout: Duration::from_secs(1),
        };
        for _ in 0..50 {
            let b1 = backoff(&r, 1);
            assert!(
                b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(100),
                "{b1:?}"
            );
            let b2 = backoff(&r, 2);
            assert!(
                b2 >= Duration::from_millis(100) && b2 <= Duration::from_millis(200),
                "{b2:?}"
            );
            let b9 = backoff(&r, 40);
            assert!(
                b9 >= Duration::from_millis(150) && b9 <= Duration::from_millis(300),
                "{b9:?}"
            );
        }
    }

    #[test]
    fn slack_text_reads_as_a_line() {
        let mut a = Alert::new(
            Event::DenialRate,
            "t".into(),
            "n1",
            "7 denials within 60s".into(),
        );
        a.cell = Some("c".into());
        a.namespace = Some("agents".into());
        assert_eq!(
            a.text(),
            "[cellgate] denial_rate on node n1, cell agents/c: 7 denials within 60s"
        );
    }
}
