//! The versioned documents exchanged with the Rego policy: [`InputDoc`] goes in as `input`,
//! [`DecisionDoc`] comes out of `data.cellgate.authz.decision`.
//!
//! Both are plain serde structs with no I/O. Their shape is a contract with user policy packs, so
//! it is versioned: [`INPUT_VERSION`] travels inside every input, and a change that can break a
//! pack bumps it. The policy guide (`docs/policy.md`) documents every field for pack authors.
//!
//! # Conventions
//!
//! - **`Option` fields serialize as `null`, never skipped.** Every key is always present in the
//!   input, so a pack can write `input.request.method == null` and never has to reason about an
//!   undefined path. On the way in (deserializing), a missing `Option` field reads as `None`.
//! - Names are normalized before they reach the policy: hosts lowercase without port or trailing
//!   dot, HTTP methods uppercase, header names lowercase, paths without the query string.
//! - Unknown fields are refused when deserializing either document (`deny_unknown_fields`): a
//!   decision carrying a field the node does not understand is a policy error, not a silent drop.
//!
//! Start reading at [`InputDoc`]; [`CellDoc::from_model`] builds the cell part from the node's
//! normalized [`crate::model::Cell`], and [`DecisionDoc::validate`] is the strict check the node
//! applies to whatever the policy returned.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{self, DestinationTarget};

/// Version of the input document; carried in [`InputDoc::version`].
pub const INPUT_VERSION: &str = "cellgate.dev/input/v1";
/// Version of the decision document the base policy produces.
pub const DECISION_VERSION: &str = "cellgate.dev/decision/v1";

/// Front door: the tagged intake listener (PPv2 from the tagger).
pub const FRONT_DOOR_INTAKE: &str = "intake";
/// Front door: Envoy's ext_authz gRPC.
pub const FRONT_DOOR_EXT_AUTHZ: &str = "ext_authz";
/// Front door: the node's DNS listener.
pub const FRONT_DOOR_DNS: &str = "dns";

/// Request protocol: plain HTTP.
pub const PROTOCOL_HTTP: &str = "http";
/// Request protocol: HTTPS, intercepted and decided per HTTP request.
pub const PROTOCOL_HTTPS: &str = "https";
/// Request protocol: TLS decided on SNI and port, not decrypted (passthrough).
pub const PROTOCOL_TLS: &str = "tls";
/// Request protocol: opaque TCP.
pub const PROTOCOL_TCP: &str = "tcp";
/// Request protocol: a DNS query for [`RequestDoc::host`].
pub const PROTOCOL_DNS: &str = "dns";

/// Outcome: the request goes through.
pub const OUTCOME_ALLOW: &str = "allow";
/// Outcome: the request is refused.
pub const OUTCOME_DENY: &str = "deny";
/// Outcome: a shadow capability would have refused it; it goes through and is audited as such.
pub const OUTCOME_SHADOW_DENY: &str = "shadow_deny";

/// Reason label the node uses when the policy itself failed (error, timeout, malformed decision).
pub const REASON_POLICY_ERROR: &str = "policy_error";
/// Reason label the node uses when it holds no valid policy (everything is denied).
pub const REASON_NO_POLICY: &str = "no_policy";

/// Longest reason label accepted in a decision: labels go into metrics, so they must stay short.
const MAX_REASON_LEN: usize = 64;
/// Most human-readable reasons accepted in one decision: each lands in the audit record.
const MAX_REASONS: usize = 64;

/// The policy input, bound to `input` when the Rego policy runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputDoc {
    /// Always [`INPUT_VERSION`].
    pub version: String,
    /// Decision time in nanoseconds since the Unix epoch. Passed in rather than read by the policy
    /// so that replaying an audit record gives the same answer.
    pub time_ns: i64,
    /// Which listener received the request: `intake`, `ext_authz` or `dns`.
    pub front_door: String,
    /// Where the request came from (the cell's pod address and source port).
    pub source: AddrDoc,
    /// The verified token of the caller.
    pub identity: IdentityDoc,
    /// The cell the token belongs to, with its capabilities.
    pub cell: CellDoc,
    /// The request being decided.
    pub request: RequestDoc,
}

/// A socket address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddrDoc {
    /// IP address in its canonical text form (`10.1.2.3`, `2001:db8::1`).
    pub address: String,
    /// Port.
    pub port: u16,
}

/// The verified identity token's claims that matter to policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityDoc {
    /// Token id (`jti`), for audit and revocation.
    pub jti: String,
    /// Uid of the cell the token was minted for.
    pub cell_uid: String,
    /// Namespace of that cell.
    pub namespace: String,
    /// Name of that cell.
    pub name: String,
    /// Role claimed in the token, if any.
    pub role: Option<String>,
}

/// The cell as the node knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellDoc {
    /// Unique id (API server uid, or `local:<namespace>:<name>`).
    pub uid: String,
    /// Namespace (the namespace layer matches on this).
    pub namespace: String,
    /// Name (the cell layer matches on this).
    pub name: String,
    /// Role (the role layer matches on this).
    pub role: Option<String>,
    /// When true every request is denied with reason `cell_suspended`.
    pub suspended: bool,
    /// The cell's labels.
    pub labels: BTreeMap<String, String>,
    /// Capabilities in manifest order; the first that grants a request is the one reported.
    pub capabilities: Vec<CapabilityDoc>,
}

/// One capability of a cell.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityDoc {
    /// Name, unique within the cell.
    pub name: String,
    /// `enforce` or `shadow`.
    pub mode: String,
    /// `intercept` or `passthrough`; only `passthrough` capabilities may grant a `tls` request.
    pub tls: String,
    /// `http` or `tcp`; only `tcp` capabilities may grant a `tcp` request (a raw relay).
    #[serde(default = "http_protocol")]
    pub protocol: String,
    /// Where it reaches; never empty.
    pub destinations: Vec<DestinationDoc>,
    /// HTTP rule; `null` means any method and path.
    pub http: Option<HttpRuleDoc>,
    /// Whether a human must approve each request.
    pub approval: bool,
    /// Whether the node injects a credential.
    pub credential: bool,
}

/// One destination of a capability: exactly one of `host` and `cidr` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationDoc {
    /// `api.github.com`, or `*.github.com` (any subdomain at any depth, not the bare name);
    /// lowercase. Matched against [`RequestDoc::host`].
    pub host: Option<String>,
    /// `10.0.0.0/8`, `192.0.2.7/32`, `2001:db8::/32`. Matched against the address the agent
    /// dialled ([`RequestDoc::destination`]).
    pub cidr: Option<String>,
    /// Allowed ports; never empty after normalization.
    pub ports: Vec<u16>,
}

/// HTTP rule of a capability.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRuleDoc {
    /// Allowed methods, uppercase; empty means any.
    pub methods: Vec<String>,
    /// Path globs: `*` matches one segment, `**` any number of segments (zero included); empty
    /// means any path.
    pub paths: Vec<String>,
}

/// The request being decided.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestDoc {
    /// `http`, `https`, `tls`, `tcp` or `dns`.
    pub protocol: String,
    /// Host the request names (Host, `:authority`, SNI, or the DNS question), lowercase, no port.
    /// `null` for TCP without a name.
    pub host: Option<String>,
    /// Destination port.
    pub port: u16,
    /// TLS server name, when there was a ClientHello.
    pub sni: Option<String>,
    /// HTTP method, uppercase.
    pub method: Option<String>,
    /// HTTP path without the query string.
    pub path: Option<String>,
    /// HTTP query string without the `?`.
    pub query: Option<String>,
    /// Selected request headers; names lowercase. Never carries credentials.
    pub headers: BTreeMap<String, String>,
    /// The address the agent dialled (original destination). Only CIDR destinations look at it:
    /// an agent cannot send an allowed name to an address of its choosing.
    pub destination: AddrDoc,
    /// DNS question type (`A`, `AAAA`, ...) for `dns` requests.
    pub dns_type: Option<String>,
    /// The request body parsed as JSON, for capabilities that `inspect` bodies (or govern MCP);
    /// absent otherwise, and when the body was not JSON or over the capability's bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
}

/// The decision, read from `data.cellgate.authz.decision`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionDoc {
    /// Whether the request goes through (true for `allow` and `shadow_deny`).
    pub allow: bool,
    /// `allow`, `deny` or `shadow_deny`.
    pub outcome: String,
    /// The capability that granted (or, for `shadow_deny`, would have been used).
    pub capability: Option<String>,
    /// Mode of that capability: `enforce` or `shadow`.
    pub mode: Option<String>,
    /// Short snake_case label for audit and metrics (`allowed`, `no_capability`,
    /// `http_rule_mismatch`, `port_not_allowed`, `cell_suspended`, `policy_denied`, ...).
    pub reason: String,
    /// Human-readable explanations, e.g. the messages of the layers that denied.
    pub reasons: Vec<String>,
    /// Guidance written for the agent (an LLM) on what this cell may reach instead.
    pub hint: Option<String>,
}

/// Why a decision document is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError {
    /// `outcome` is not one of the three known values.
    #[error("decision outcome {0:?} is not one of allow, deny, shadow_deny")]
    UnknownOutcome(String),
    /// `allow` contradicts `outcome`.
    #[error("decision allow={allow} contradicts outcome {outcome:?}")]
    Inconsistent {
        /// The `allow` field.
        allow: bool,
        /// The `outcome` field.
        outcome: String,
    },
    /// `reason` is empty, too long, or not a snake_case label.
    #[error(
        "decision reason {0:?} is not a short snake_case label (a-z, 0-9, _; at most 64 bytes)"
    )]
    BadReason(String),
    /// Too many human-readable reasons.
    #[error("decision carries {0} reasons; at most 64 are accepted")]
    TooManyReasons(usize),
    /// `mode` is neither `enforce` nor `shadow`.
    #[error("decision mode {0:?} is neither enforce nor shadow")]
    BadMode(String),
}

impl DecisionDoc {
    /// A denial decided by the node itself (no valid policy, policy error), not by Rego.
    pub fn node_deny(reason: &str, message: impl Into<String>) -> Self {
        Self {
            allow: false,
            outcome: OUTCOME_DENY.to_owned(),
            capability: None,
            mode: None,
            reason: reason.to_owned(),
            reasons: vec![message.into()],
            hint: None,
        }
    }

    /// Checks the invariants the node relies on.
    ///
    /// # Errors
    ///
    /// [`DecisionError`] naming the first broken invariant: unknown outcome, `allow` contradicting
    /// `outcome`, a reason that is not a short snake_case label, too many reasons, unknown mode.
    pub fn validate(&self) -> Result<(), DecisionError> {
        let expect_allow = match self.outcome.as_str() {
            OUTCOME_ALLOW | OUTCOME_SHADOW_DENY => true,
            OUTCOME_DENY => false,
            other => return Err(DecisionError::UnknownOutcome(other.to_owned())),
        };
        if expect_allow != self.allow {
            return Err(DecisionError::Inconsistent {
                allow: self.allow,
                outcome: self.outcome.clone(),
            });
        }
        if !is_label(&self.reason) {
            return Err(DecisionError::BadReason(self.reason.clone()));
        }
        if self.reasons.len() > MAX_REASONS {
            return Err(DecisionError::TooManyReasons(self.reasons.len()));
        }
        if let Some(mode) = &self.mode {
            if mode != model::Mode::Enforce.as_str() && mode != model::Mode::Shadow.as_str() {
                return Err(DecisionError::BadMode(mode.clone()));
            }
        }
        Ok(())
    }
}

/// Whether `s` is a short snake_case label.
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_REASON_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl CellDoc {
    /// The policy view of a normalized cell.
    pub fn from_model(cell: &model::Cell) -> Self {
        Self {
            uid: cell.uid.clone(),
            namespace: cell.namespace.clone(),
            name: cell.name.clone(),
            role: cell.role.clone(),
            suspended: cell.suspended,
            labels: cell.labels.clone(),
            capabilities: cell
                .capabilities
                .iter()
                .map(CapabilityDoc::from_model)
                .collect(),
        }
    }
}

fn http_protocol() -> String {
    "http".into()
}

impl CapabilityDoc {
    /// The policy view of a normalized capability.
    pub fn from_model(cap: &model::Capability) -> Self {
        Self {
            name: cap.name.clone(),
            mode: cap.mode.as_str().to_owned(),
            tls: cap.tls.as_str().to_owned(),
            protocol: cap.protocol.as_str().to_owned(),
            destinations: cap
                .destinations
                .iter()
                .map(DestinationDoc::from_model)
                .collect(),
            http: cap.http.as_ref().map(|h| HttpRuleDoc {
                methods: h.methods.clone(),
                paths: h.paths.clone(),
            }),
            approval: cap.approval,
            credential: cap.credential.is_some(),
        }
    }
}

impl DestinationDoc {
    /// The policy view of a normalized destination.
    pub fn from_model(dest: &model::Destination) -> Self {
        let (host, cidr) = match &dest.target {
            DestinationTarget::Host(p) => (Some(p.as_manifest()), None),
            DestinationTarget::Cidr(c) => (None, Some(c.to_string())),
        };
        Self {
            host,
            cidr,
            ports: dest.ports.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Capability, Cell, Cidr, Destination, HostPattern, HttpRule, Mode, TlsMode};

    fn cell() -> Cell {
        Cell {
            uid: "u1".into(),
            namespace: "ns".into(),
            name: "agent".into(),
            role: Some("readonly".into()),
            suspended: false,
            labels: BTreeMap::new(),
            generation: 1,
            budget: None,
            limits: None,
            capabilities: vec![Capability {
                name: "github".into(),
                mode: Mode::Shadow,
                tls: TlsMode::Intercept,
                protocol: crate::model::Protocol::Http,
                allow_internal_addresses: false,
                destinations: vec![
                    Destination {
                        target: DestinationTarget::Host(HostPattern::Wildcard("github.com".into())),
                        ports: vec![443],
                    },
                    Destination {
                        target: DestinationTarget::Cidr(Cidr::new("10.1.2.3".parse().unwrap(), 8)),
                        ports: vec![5432],
                    },
                ],
                http: Some(HttpRule {
                    methods: vec!["GET".into()],
                    paths: vec!["/repos/**".into()],
                }),
                credential: None,
                budget: None,
                approval: true,
                approval_policy: Default::default(),
                inspect: None,
                mcp: None,
                detect: None,
            }],
        }
    }

    #[test]
    fn from_model_keeps_manifest_spelling() {
        let doc = CellDoc::from_model(&cell());
        let cap = &doc.capabilities[0];
        assert_eq!(cap.mode, "shadow");
        assert_eq!(cap.tls, "intercept");
        assert_eq!(cap.destinations[0].host.as_deref(), Some("*.github.com"));
        assert_eq!(cap.destinations[1].cidr.as_deref(), Some("10.0.0.0/8"));
        assert!(cap.approval && !cap.credential);
    }

    #[test]
    fn options_serialize_as_null() {
        let input = InputDoc {
            version: INPUT_VERSION.into(),
            cell: CellDoc::from_model(&cell()),
            ..InputDoc::default()
        };
        let v = serde_json::to_value(&input).unwrap();
        assert!(v["request"]["host"].is_null());
        assert!(v["identity"]["role"].is_null());
        assert!(v["cell"]["capabilities"][0]["destinations"][0]["cidr"].is_null());
        let back: InputDoc = serde_json::from_value(v).unwrap();
        assert_eq!(back, input);
    }

    #[test]
    fn decision_is_strict() {
        let ok = r#"{"allow":true,"outcome":"allow","capability":"c","mode":"enforce",
                     "reason":"allowed","reasons":[],"hint":null}"#;
        let d: DecisionDoc = serde_json::from_str(ok).unwrap();
        d.validate().unwrap();
        let extra = ok.replace("\"hint\":null", "\"hint\":null,\"x\":1");
        assert!(serde_json::from_str::<DecisionDoc>(&extra).is_err());
        let missing = r#"{"allow":true,"outcome":"allow"}"#;
        assert!(serde_json::from_str::<DecisionDoc>(missing).is_err());

        let mut bad = d.clone();
        bad.allow = false;
        assert!(matches!(
            bad.validate(),
            Err(DecisionError::Inconsistent { .. })
        ));
        let mut bad = d.clone();
        bad.outcome = "maybe".into();
        assert!(matches!(
            bad.validate(),
            Err(DecisionError::UnknownOutcome(_))
        ));
        let mut bad = d.clone();
        bad.reason = "Not A Label".into();
        assert!(matches!(bad.validate(), Err(DecisionError::BadReason(_))));
        let mut bad = d;
        bad.mode = Some("audit".into());
        assert!(matches!(bad.validate(), Err(DecisionError::BadMode(_))));
        DecisionDoc::node_deny(REASON_NO_POLICY, "no valid policy")
            .validate()
            .unwrap();
    }
}
