//! The policy input of a request and what its audit record keeps of it, in one place, so that
//! a recorded decision can be re-decided (`cellgate policy replay`) with the input the node
//! built, and the two cannot drift apart.
//!
//! - [`Request`] holds what the policy input is built from; [`input_doc`] is the only function
//!   that turns it into an [`InputDoc`]. The node calls it for every decision
//!   ([`crate::decide`]); the replay calls it on what [`Request::from_record`] read back.
//! - [`fill_record`] writes the schema 2 fields of a decision's record: the request's port,
//!   SNI, the header values on [`RECORDED_HEADERS`] when their value has the shape those
//!   headers have, the cell's uid and generation, the token's role, the policy's packs, and in
//!   `withheld` what the policy saw that the record leaves out (the query string, other header
//!   values, the body, a redacted path). Never `Authorization`, `Cookie`, the identity token or
//!   a query value.
//! - [`classify`] says whether a record is a decision the policy made (and what it decided) or
//!   something a replay cannot re-decide, and why.
//!
//! A replayed input differs from the node's only where the record withholds: the query string
//! and withheld header values are given as `""` (present, empty), the body is not given, and
//! `time_ns` is the record's `time` (taken a few microseconds after the node's clock read).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use cellgate_api::policy::{
    AddrDoc, CellDoc, DecisionDoc, IdentityDoc, InputDoc, RequestDoc, INPUT_VERSION, OUTCOME_ALLOW,
    OUTCOME_SHADOW_DENY,
};
use cellgate_audit::{Decision, Record, SCHEMA_VERSION};

use crate::reason::Reason;

/// Request headers whose values a record keeps, each only when the value has its header's
/// usual shape ([`recordable_value`]): media types, a length, a protocol token. Every other
/// header the policy reads (today `user-agent` and `x-request-id`: free text an agent chooses)
/// is recorded by name only, in `withheld`.
pub const RECORDED_HEADERS: &[&str] = &["accept", "content-length", "content-type", "upgrade"];

/// Longest header value a record keeps, in bytes (the policy input's own bound is 256).
const MAX_RECORDED_HEADER_LEN: usize = 256;

/// `withheld` item: the query string.
pub const WITHHELD_QUERY: &str = "query";
/// `withheld` item: the JSON body given to the policy.
pub const WITHHELD_BODY: &str = "body";
/// `withheld` item: the path, redacted by a detector.
pub const WITHHELD_PATH: &str = "path";
/// `withheld` item prefix: a header's value (`header:user-agent`).
pub const WITHHELD_HEADER: &str = "header:";

/// What the policy input of one request is built from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Decision time, nanoseconds since the Unix epoch.
    pub time_ns: i64,
    /// `intake`, `ext_authz`, `dns`.
    pub front_door: String,
    /// The agent's address.
    pub source: Option<SocketAddr>,
    /// What the agent dialled.
    pub destination: Option<SocketAddr>,
    /// The verified token.
    pub identity: IdentityDoc,
    /// `http`, `https`, `tls`, `tcp`, `dns`.
    pub protocol: String,
    /// Lowercase host without port.
    pub host: Option<String>,
    /// The port the request is for.
    pub port: u16,
    /// TLS SNI.
    pub sni: Option<String>,
    /// HTTP method.
    pub method: Option<String>,
    /// Path without query.
    pub path: Option<String>,
    /// Query string.
    pub query: Option<String>,
    /// Headers the policy reads, lowercase names.
    pub headers: BTreeMap<String, String>,
    /// DNS question type.
    pub dns_type: Option<String>,
}

fn addr(a: Option<SocketAddr>) -> AddrDoc {
    a.map(|a| AddrDoc {
        address: a.ip().to_canonical().to_string(),
        port: a.port(),
    })
    .unwrap_or_default()
}

/// The policy input of `req`, with an empty cell (the engine takes the cell from its prebuilt
/// value) and no body (given only to capabilities that read it, see [`crate::decide`]).
pub fn input_doc(req: Request) -> InputDoc {
    InputDoc {
        version: INPUT_VERSION.into(),
        time_ns: req.time_ns,
        front_door: req.front_door,
        source: addr(req.source),
        identity: req.identity,
        cell: CellDoc::default(),
        request: RequestDoc {
            protocol: req.protocol,
            host: req.host,
            port: req.port,
            sni: req.sni,
            method: req.method,
            path: req.path,
            query: req.query,
            headers: req.headers,
            destination: addr(req.destination),
            dns_type: req.dns_type,
            json: None,
        },
    }
}

/// The decision a policy's answer stands for, as the node records it.
pub fn decision_of(d: &DecisionDoc) -> Decision {
    match d.outcome.as_str() {
        OUTCOME_ALLOW if d.allow => Decision::Allow,
        OUTCOME_SHADOW_DENY if d.allow => Decision::ShadowDeny,
        _ => Decision::Deny,
    }
}

/// Whether a header's value is one a record may keep: a header on [`RECORDED_HEADERS`] whose
/// value has that header's shape. Media types (`content-type`, `accept`) keep only the
/// `charset` and `q` parameters; anything else (a quoted string, another parameter) withholds
/// the whole value.
pub fn recordable_value(name: &str, value: &str) -> bool {
    if value.len() > MAX_RECORDED_HEADER_LEN {
        return false;
    }
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    let media_range = |s: &str| {
        let mut parts = s.split(';').map(str::trim);
        let Some((ty, sub)) = parts.next().and_then(|m| m.split_once('/')) else {
            return false;
        };
        token(ty)
            && token(sub)
            && parts.all(|p| {
                p.split_once('=').is_some_and(|(k, v)| {
                    matches!(k.trim().to_ascii_lowercase().as_str(), "charset" | "q")
                        && token(v.trim())
                })
            })
    };
    match name {
        "content-length" => {
            !value.is_empty() && value.len() <= 20 && value.bytes().all(|b| b.is_ascii_digit())
        }
        "upgrade" => value.split(',').all(|p| {
            let p = p.trim();
            token(p.split_once('/').map_or(p, |(a, _)| a))
                && p.split_once('/').is_none_or(|(_, v)| token(v))
        }),
        "content-type" => media_range(value),
        "accept" => value.split(',').all(media_range),
        _ => false,
    }
}

/// `policy_packs` key standing for the whole set, when its packs are not known.
pub const WHOLE_SET: &str = "set";

/// The packs of `set` (name → version), for [`fill_record`].
pub fn packs_of(set: &cellgate_policy::PolicySet) -> BTreeMap<String, String> {
    set.packs()
        .iter()
        .map(|p| (p.name.clone(), p.version.clone()))
        .collect()
}

/// Writes the schema 2 fields of a decision's record: `req` as the policy saw it, the cell's
/// uid and generation (when the node knew the cell), the versions of the packs of the set that
/// decided (`packs`), and what is withheld. `path_redacted`: a detector redacted the path the record carries.
pub fn fill_record(
    rec: &mut Record,
    req: &Request,
    generation: Option<i64>,
    packs: Option<BTreeMap<String, String>>,
    body_read: bool,
    path_redacted: bool,
) {
    rec.schema = Some(SCHEMA_VERSION);
    rec.port = Some(req.port);
    rec.sni.clone_from(&req.sni);
    rec.cell_generation = generation;
    if !req.identity.cell_uid.is_empty() {
        rec.cell_uid = Some(req.identity.cell_uid.clone());
    }
    rec.role.clone_from(&req.identity.role);
    if let Some(v) = &rec.policy_version {
        // The packs of the set that decided; when that set is no longer at hand (a reload in
        // between), the set's version stands for them all.
        rec.policy_packs = Some(
            packs
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| BTreeMap::from([(WHOLE_SET.to_owned(), v.clone())])),
        );
    }
    rec.headers.clear();
    rec.withheld.clear();
    for (name, value) in &req.headers {
        if RECORDED_HEADERS.contains(&name.as_str()) && recordable_value(name, value) {
            rec.headers.insert(name.clone(), value.clone());
        } else {
            rec.withheld.push(format!("{WITHHELD_HEADER}{name}"));
        }
    }
    if req.query.is_some() {
        rec.withheld.push(WITHHELD_QUERY.to_owned());
    }
    if body_read {
        rec.withheld.push(WITHHELD_BODY.to_owned());
    }
    if path_redacted {
        rec.withheld.push(WITHHELD_PATH.to_owned());
    }
}

/// Why a record cannot be re-decided.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NotReplayable {
    /// Written before schema 2: the port, SNI, headers and cell uid the policy saw are unknown.
    Schema1,
    /// The node refused it before the policy ran (token, identity, lockdown, the request's
    /// shape, DNS): the label is the record's reason.
    BeforePolicy(String),
    /// A follow-up of a request already recorded (an upstream failure, usage counted, an
    /// approval asked, something open closed) or an operator's action: not a decision.
    FollowUp(String),
    /// The record's path was redacted by a detector.
    PathRedacted,
    /// The record was clamped (oversized): its fields are cut.
    Clamped,
    /// A field the input needs is missing or unreadable.
    Malformed(&'static str),
}

impl NotReplayable {
    /// A short label for reports.
    pub fn label(&self) -> String {
        match self {
            Self::Schema1 => "schema 1 record (no request details)".into(),
            Self::BeforePolicy(r) => format!("decided before policy ({r})"),
            Self::FollowUp(r) => format!("not a decision ({r})"),
            Self::PathRedacted => "path redacted in the record".into(),
            Self::Clamped => "record clamped".into(),
            Self::Malformed(f) => format!("record lacks {f}"),
        }
    }
}

/// What the policy decided for a recorded request, when the policy decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyVerdict {
    /// `Allow`, `ShadowDeny` or `Deny`.
    pub decision: Decision,
    /// The policy's reason label (`allowed` when the node refused after the policy allowed:
    /// budgets, approvals, content rules, a credential).
    pub reason: String,
}

/// Whether `label` is one the policy gives (the base policy's, or a pack's own).
fn is_policy_label(label: &str) -> bool {
    matches!(
        Reason::from_label(label),
        Reason::Allowed
            | Reason::CellSuspended
            | Reason::NoCapability
            | Reason::PortNotAllowed
            | Reason::HttpRuleMismatch
            | Reason::TlsPassthroughRequired
            | Reason::TcpCapabilityRequired
            | Reason::PolicyDenied
            | Reason::PolicyError
            | Reason::Policy(_)
    )
}

/// Records that follow a decision already recorded for the same request.
fn is_follow_up(label: &str) -> bool {
    let r = Reason::from_label(label);
    r.is_upstream()
        || matches!(
            r,
            Reason::SecretScrubbed
                | Reason::ApprovalRequested
                | Reason::LlmUsage
                | Reason::LlmUsageUnreadable
                | Reason::Revoked
                | Reason::DestinationForbidden
                | Reason::AuditUnavailable
        )
}

/// What the policy decided for `rec`, or why a replay cannot re-decide it.
///
/// # Errors
/// [`NotReplayable`]: the reason.
pub fn classify(rec: &Record) -> Result<PolicyVerdict, NotReplayable> {
    if matches!(rec.decision, Decision::Control | Decision::Approval) || is_follow_up(&rec.reason) {
        return Err(NotReplayable::FollowUp(rec.reason.clone()));
    }
    if rec.policy_version.is_none() {
        return Err(NotReplayable::BeforePolicy(rec.reason.clone()));
    }
    let verdict = if is_policy_label(&rec.reason) {
        PolicyVerdict {
            decision: match rec.decision {
                Decision::Allow => Decision::Allow,
                Decision::ShadowDeny => Decision::ShadowDeny,
                _ => Decision::Deny,
            },
            reason: rec.reason.clone(),
        }
    } else {
        // The policy allowed; governance, content rules or the credential refused after it.
        PolicyVerdict {
            decision: Decision::Allow,
            reason: Reason::Allowed.as_str().to_owned(),
        }
    };
    if rec.schema.unwrap_or(1) < 2 {
        return Err(NotReplayable::Schema1);
    }
    if rec
        .reasons
        .last()
        .is_some_and(|r| r == cellgate_audit::CLAMPED_REASON)
    {
        return Err(NotReplayable::Clamped);
    }
    if rec.withheld.iter().any(|w| w == WITHHELD_PATH) {
        return Err(NotReplayable::PathRedacted);
    }
    Ok(verdict)
}

impl Request {
    /// The request a schema 2 record describes, as [`input_doc`] takes it.
    ///
    /// # Errors
    /// [`NotReplayable::Malformed`] naming a field the input needs that the record lacks.
    pub fn from_record(rec: &Record) -> Result<Request, NotReplayable> {
        let sock = |s: &Option<String>, what| {
            s.as_deref()
                .and_then(|s| s.parse::<SocketAddr>().ok())
                .ok_or(NotReplayable::Malformed(what))
        };
        let mut headers: BTreeMap<String, String> = rec.headers.clone();
        let mut query = None;
        for w in &rec.withheld {
            if let Some(name) = w.strip_prefix(WITHHELD_HEADER) {
                headers.insert(name.to_owned(), String::new());
            } else if w == WITHHELD_QUERY {
                query = Some(String::new());
            }
        }
        Ok(Request {
            time_ns: cellgate_audit::parse_rfc3339_ns(&rec.time)
                .ok_or(NotReplayable::Malformed("a readable time"))?,
            front_door: rec.front_door.clone(),
            source: Some(sock(&rec.source, "source")?),
            destination: Some(sock(&rec.destination, "destination")?),
            identity: IdentityDoc {
                jti: rec.token_id.clone().unwrap_or_default(),
                cell_uid: rec
                    .cell_uid
                    .clone()
                    .ok_or(NotReplayable::Malformed("cell_uid"))?,
                namespace: rec
                    .namespace
                    .clone()
                    .ok_or(NotReplayable::Malformed("namespace"))?,
                name: rec.cell.clone().ok_or(NotReplayable::Malformed("cell"))?,
                role: rec.role.clone(),
            },
            protocol: rec.protocol.clone(),
            host: rec.host.clone(),
            port: rec.port.ok_or(NotReplayable::Malformed("port"))?,
            sni: rec.sni.clone(),
            method: rec.method.clone(),
            path: rec.path.clone(),
            query,
            headers,
            dns_type: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            time_ns: 1_709_210_096_123_456_789,
            front_door: "intake".into(),
            source: Some("10.0.0.7:41000".parse().unwrap()),
            destination: Some("[::ffff:140.82.112.3]:443".parse().unwrap()),
            identity: IdentityDoc {
                jti: "jti-1".into(),
                cell_uid: "local:agents:researcher".into(),
                namespace: "agents".into(),
                name: "researcher".into(),
                role: Some("reader".into()),
            },
            protocol: "https".into(),
            host: Some("api.github.com".into()),
            port: 443,
            sni: Some("api.github.com".into()),
            method: Some("POST".into()),
            path: Some("/repos/x/issues".into()),
            query: None,
            headers: BTreeMap::from([
                (
                    "content-type".into(),
                    "application/json; charset=utf-8".into(),
                ),
                (
                    "accept".into(),
                    "application/vnd.github+json, */*;q=0.8".into(),
                ),
                ("content-length".into(), "42".into()),
            ]),
            dns_type: None,
        }
    }

    /// What the node records of its input is what the replay rebuilds, field for field.
    fn record_of(req: &Request) -> Record {
        let mut rec = Record::new(
            "n1",
            &req.front_door,
            &req.protocol,
            Decision::Deny,
            "no_capability",
        );
        rec.time = cellgate_audit::format_rfc3339(
            std::time::UNIX_EPOCH + std::time::Duration::from_nanos(req.time_ns as u64),
        );
        rec.cell = Some(req.identity.name.clone());
        rec.namespace = Some(req.identity.namespace.clone());
        rec.token_id = Some(req.identity.jti.clone());
        rec.source = req.source.map(|s| s.to_string());
        rec.destination = req.destination.map(|s| s.to_string());
        rec.method.clone_from(&req.method);
        rec.host.clone_from(&req.host);
        rec.path.clone_from(&req.path);
        rec.policy_version = Some("0123456789ab".into());
        fill_record(
            &mut rec,
            req,
            Some(4),
            Some(BTreeMap::from([("base".into(), "0123".into())])),
            false,
            false,
        );
        rec
    }

    #[test]
    fn the_input_rebuilt_from_a_record_is_the_decided_one() {
        let req = request();
        let rec = record_of(&req);
        assert_eq!(rec.withheld, Vec::<String>::new());
        assert_eq!(rec.cell_generation, Some(4));
        assert_eq!(rec.policy_packs.as_ref().unwrap()["base"], "0123");
        let back = Request::from_record(&rec).unwrap();
        assert_eq!(input_doc(back), input_doc(req));
    }

    #[test]
    fn secrets_and_free_text_are_withheld() {
        let mut req = request();
        req.query = Some("api_key=sk-live-123".into());
        for (k, v) in [
            ("authorization", "Bearer sk-live-123"),
            ("cookie", "session=abc"),
            ("x-cellgate-token", "eyJ.sig"),
            ("user-agent", "sdk/1.0 key=sk-live-123"),
            ("content-type", "text/plain; token=sk-live-123"),
            ("accept", "\"sk-live-123\""),
        ] {
            req.headers.insert(k.into(), v.into());
        }
        let rec = record_of(&req);
        let line = serde_json::to_string(&rec).unwrap();
        for secret in ["sk-live-123", "session=abc", "eyJ.sig", "Bearer"] {
            assert!(!line.contains(secret), "{secret} in {line}");
        }
        assert_eq!(
            rec.headers,
            BTreeMap::from([("content-length".to_string(), "42".to_string())])
        );
        for w in [
            "query",
            "header:authorization",
            "header:cookie",
            "header:user-agent",
            "header:content-type",
        ] {
            assert!(
                rec.withheld.iter().any(|x| x == w),
                "{w}: {:?}",
                rec.withheld
            );
        }
        // Replayed: present, empty.
        let back = input_doc(Request::from_record(&rec).unwrap());
        assert_eq!(back.request.query.as_deref(), Some(""));
        assert_eq!(back.request.headers["user-agent"], "");
    }

    #[test]
    fn header_value_shapes() {
        for (n, v, ok) in [
            ("content-type", "application/json", true),
            ("content-type", "multipart/form-data; boundary=x", false),
            ("accept", "*/*", true),
            ("accept", "text/html,application/xml;q=0.9", true),
            ("content-length", "123", true),
            ("content-length", "12a", false),
            ("upgrade", "websocket", true),
            ("upgrade", "h2c, websocket/13", true),
            ("upgrade", "web socket", false),
            ("user-agent", "curl/8.0", false),
        ] {
            assert_eq!(recordable_value(n, v), ok, "{n}: {v}");
        }
    }

    #[test]
    fn classification() {
        let req = request();
        let mut rec = record_of(&req);
        assert_eq!(classify(&rec).unwrap().decision, Decision::Deny);
        rec.reason = "budget_exhausted".into();
        assert_eq!(
            classify(&rec).unwrap(),
            PolicyVerdict {
                decision: Decision::Allow,
                reason: "allowed".into()
            }
        );
        rec.reason = "upstream_timeout".into();
        assert!(matches!(classify(&rec), Err(NotReplayable::FollowUp(_))));
        rec.reason = "token_expired".into();
        rec.policy_version = None;
        assert!(matches!(
            classify(&rec),
            Err(NotReplayable::BeforePolicy(_))
        ));
        let mut old = record_of(&req);
        old.schema = None;
        assert_eq!(classify(&old), Err(NotReplayable::Schema1));
    }
}
