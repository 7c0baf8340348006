//! Why a decision came out as it did: one enum of the stable labels the audit records, the
//! metrics and the agent's answers carry, and one mapping of each to the wire.
//!
//! The labels are a contract (docs/security.md, docs/policy.md, docs/governance.md list them):
//! dashboards and alerts select on them. Policy may add its own (a layer's `reason`): those
//! travel as [`Reason::Policy`], checked to be snake_case by the policy loader.

use std::fmt;
use std::sync::Arc;

use cellgate_audit::Decision;

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident = $label:literal,)*) => {
        /// The reason of a decision. `as_str` is its stable label.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Reason {
            $($(#[$doc])* $variant,)*
            /// A label a policy layer gave to its denial.
            Policy(Arc<str>),
        }

        impl Reason {
            /// Every label the node itself gives, in declaration order.
            pub const LABELS: &'static [&'static str] = &[$($label,)*];

            /// The stable label.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $label,)*
                    Self::Policy(l) => l,
                }
            }

            /// The reason a label names: one of the node's own, else a policy's.
            pub fn from_label(label: &str) -> Self {
                match label {
                    $($label => Self::$variant,)*
                    other => Self::Policy(other.into()),
                }
            }
        }
    };
}

reasons! {
    // Policy (the base policy's labels; docs/policy.md).
    /// Granted.
    Allowed = "allowed",
    /// The cell is suspended.
    CellSuspended = "cell_suspended",
    /// No capability names the destination.
    NoCapability = "no_capability",
    /// A capability names the host, not the port.
    PortNotAllowed = "port_not_allowed",
    /// A capability names the destination; its method or path rule does not match.
    HttpRuleMismatch = "http_rule_mismatch",
    /// TLS that is not decrypted needs a passthrough capability.
    TlsPassthroughRequired = "tls_passthrough_required",
    /// Raw TCP needs a `protocol: tcp` capability.
    TcpCapabilityRequired = "tcp_capability_required",
    /// A layer denied without a label of its own.
    PolicyDenied = "policy_denied",
    /// The policy could not be evaluated.
    PolicyError = "policy_error",
    /// The node has no valid policy.
    NoPolicy = "no_policy",

    // Identity (docs/security.md).
    /// No token reached the node (ext_authz: no PPv2 TLV metadata).
    TokenMissing = "token_missing",
    /// Not a well-formed token.
    TokenMalformed = "token_malformed",
    /// The signature does not verify.
    TokenBadSignature = "token_bad_signature",
    /// Signed by a key the node does not trust.
    TokenUnknownKey = "token_unknown_key",
    /// For another audience.
    TokenWrongAudience = "token_wrong_audience",
    /// Past its expiry.
    TokenExpired = "token_expired",
    /// Before its `nbf`.
    TokenNotYetValid = "token_not_yet_valid",
    /// Revoked.
    TokenRevoked = "token_revoked",
    /// The cell the token names is not known.
    CellUnknown = "cell_unknown",
    /// The source address is not the one the token is bound to.
    SourceNotBound = "source_not_bound",
    /// The PPv2 source is not the connection's peer.
    SourceMismatch = "source_mismatch",
    /// ext_authz: the CheckRequest names no source address.
    SourceUnknown = "source_unknown",

    // PPv2 (docs/security.md).
    /// No PPv2 header.
    Ppv2Missing = "ppv2_missing",
    /// A PPv1 header.
    Ppv2V1Unsupported = "ppv2_v1_unsupported",
    /// A header cut short.
    Ppv2Truncated = "ppv2_truncated",
    /// A malformed header.
    Ppv2Malformed = "ppv2_malformed",
    /// A LOCAL command.
    Ppv2LocalCommand = "ppv2_local_command",
    /// A header over the size limit.
    Ppv2TooLarge = "ppv2_too_large",
    /// A header without the token TLV.
    Ppv2NoToken = "ppv2_no_token",
    /// Reading the header failed.
    Ppv2Io = "ppv2_io",
    /// No complete header in time.
    Ppv2Timeout = "ppv2_timeout",

    // The shape of a connection or request (docs/security.md, docs/policy.md).
    /// A connection to the destination reserved for the node's enforcement self-check that is
    /// not a probe in flight: nothing is ever forwarded there.
    SelfCheckReserved = "self_check_reserved",
    /// The cell has too many open connections.
    CellConnectionLimit = "cell_connection_limit",
    /// The cell is over its request rate (429).
    CellRateLimited = "cell_rate_limited",
    /// The first bytes stopped before the protocol could be told.
    FirstBytesIncomplete = "first_bytes_incomplete",
    /// No ClientHello in time.
    TlsHelloTimeout = "tls_hello_timeout",
    /// A malformed ClientHello.
    TlsHelloMalformed = "tls_hello_malformed",
    /// A ClientHello over the size limit.
    TlsHelloTooLarge = "tls_hello_too_large",
    /// A ClientHello cut short.
    TlsHelloTruncated = "tls_hello_truncated",
    /// Reading the ClientHello failed.
    TlsHelloIo = "tls_hello_io",
    /// An SNI that is not a host name.
    TlsSniInvalid = "tls_sni_invalid",
    /// No leaf certificate could be minted.
    TlsMintFailed = "tls_mint_failed",
    /// A host that is not a valid name or address.
    BadHost = "bad_host",
    /// A request that names no host.
    MissingHost = "missing_host",
    /// The URI's authority and `Host` differ.
    HostMismatch = "host_mismatch",
    /// `Host` names another host than SNI.
    SniHostMismatch = "sni_host_mismatch",
    /// `Host` names another port than the connection's.
    AuthorityPortMismatch = "authority_port_mismatch",
    /// CONNECT through the boundary.
    ConnectNotAllowed = "connect_not_allowed",
    /// An upgrade other than WebSocket.
    UpgradeNotAllowed = "upgrade_not_allowed",
    /// A request body over the ext_authz limit (413).
    BodyTooLarge = "body_too_large",
    /// A path too long.
    PathTooLong = "path_too_long",
    /// A request target not in origin form.
    PathNotOriginForm = "path_not_origin_form",
    /// A malformed `%` escape.
    PathMalformedEscape = "path_malformed_escape",
    /// NUL or a control character.
    PathControlCharacter = "path_control_character",
    /// A backslash.
    PathBackslash = "path_backslash",
    /// An encoded slash.
    PathEncodedSlash = "path_encoded_slash",
    /// A character not allowed in a path.
    PathInvalidCharacter = "path_invalid_character",
    /// `..;` and its kind.
    PathDotSegmentParameters = "path_dot_segment_parameters",
    /// Envoy sent a path its canonical form would change.
    PathNotCanonical = "path_not_canonical",
    /// The canonical request could not be written as a URI (400).
    BadUri = "bad_uri",
    /// The request body could not be read (the agent went away mid-body).
    BodyUnreadable = "body_unreadable",

    // Content (docs/mcp.md).
    /// An MCP tool the capability does not allow (a JSON-RPC error, HTTP 200).
    McpToolDenied = "mcp_tool_denied",
    /// An MCP resource the capability does not allow (a JSON-RPC error, HTTP 200).
    McpResourceDenied = "mcp_resource_denied",
    /// An MCP prompt the capability does not allow (a JSON-RPC error, HTTP 200).
    McpPromptDenied = "mcp_prompt_denied",
    /// A request to an MCP capability that is not a JSON-RPC message the rules can be applied
    /// to (400).
    McpMalformed = "mcp_malformed",
    /// A request carrying a credential the node injects for another capability.
    CredentialExfiltration = "credential_exfiltration",
    /// Audit only: an injected secret the upstream sent back was masked.
    SecretScrubbed = "secret_scrubbed",
    /// A secret (a key, a token) found leaving in a request (`detect`).
    SecretDetected = "secret_detected",
    /// Personal data found leaving in a request (`detect`).
    PiiDetected = "pii_detected",

    // Governance (docs/governance.md).
    /// A lockdown applies.
    Lockdown = "lockdown",
    /// A budget is used up (429).
    BudgetExhausted = "budget_exhausted",
    /// The ledger cannot be written (503).
    BudgetUnavailable = "budget_unavailable",
    /// Governance cannot be applied on this path.
    GovernanceUnavailable = "governance_unavailable",
    /// Retry mode: the request waits for approval.
    ApprovalRequired = "approval_required",
    /// Audit only: an approval was asked for.
    ApprovalRequested = "approval_requested",
    /// Hold mode: a human said no.
    ApprovalDenied = "approval_denied",
    /// Hold mode: nobody decided in time.
    ApprovalTimeout = "approval_timeout",
    /// The approval could not be asked for or waited on.
    ApprovalUnavailable = "approval_unavailable",
    /// Audit only: a response's LLM usage, counted.
    LlmUsage = "llm_usage",
    /// Audit only: a response's LLM usage could not be read.
    LlmUsageUnreadable = "llm_usage_unreadable",

    // After the decision.
    /// Something open (a relay, a response stream) closed: its authorization was withdrawn.
    Revoked = "revoked",
    /// The name resolves into the node's own reach.
    DestinationForbidden = "destination_forbidden",
    /// The capability's credential could not be obtained (503).
    CredentialUnavailable = "credential_unavailable",
    /// The host could not be resolved (502).
    UpstreamResolveFailed = "upstream_resolve_failed",
    /// The upstream did not answer in time (502).
    UpstreamTimeout = "upstream_timeout",
    /// The upstream refused the connection (502).
    UpstreamConnectRefused = "upstream_connect_refused",
    /// The upstream could not be reached (502).
    UpstreamConnectFailed = "upstream_connect_failed",
    /// The upstream switched to a protocol that was not asked for (502).
    UpstreamUpgradeRefused = "upstream_upgrade_refused",
    /// The upstream's certificate expired (502).
    UpstreamCertExpired = "upstream_cert_expired",
    /// The upstream's certificate is not valid yet (502).
    UpstreamCertNotYetValid = "upstream_cert_not_yet_valid",
    /// The upstream's certificate is for another name (502).
    UpstreamCertNameMismatch = "upstream_cert_name_mismatch",
    /// The upstream's certificate has an issuer the node does not trust (502).
    UpstreamCertUnknownIssuer = "upstream_cert_unknown_issuer",
    /// The upstream's certificate is invalid otherwise (502).
    UpstreamCertInvalid = "upstream_cert_invalid",
    /// The upstream failed otherwise (502).
    UpstreamError = "upstream_error",
    /// The decision could not be recorded (503).
    AuditUnavailable = "audit_unavailable",
    /// The audit export is further behind than its bound: new requests wait for it (503).
    AuditBacklog = "audit_backlog",
}

impl Reason {
    /// Whether this reason is a failure after an allow, on the way to the upstream.
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            Self::UpstreamResolveFailed
                | Self::UpstreamTimeout
                | Self::UpstreamConnectRefused
                | Self::UpstreamConnectFailed
                | Self::UpstreamUpgradeRefused
                | Self::UpstreamCertExpired
                | Self::UpstreamCertNotYetValid
                | Self::UpstreamCertNameMismatch
                | Self::UpstreamCertUnknownIssuer
                | Self::UpstreamCertInvalid
                | Self::UpstreamError
        )
    }

    /// Whether the detail of this reason comes from inside the node or its backends (a policy
    /// engine's error, a Vault answer, an I/O error): such details go to the audit record and
    /// the node's log only, and the agent reads [`Reason::public_message`] instead.
    pub fn detail_is_internal(&self) -> bool {
        self.is_upstream()
            || matches!(
                self,
                Self::PolicyError
                    | Self::CredentialUnavailable
                    | Self::AuditUnavailable
                    | Self::BudgetUnavailable
                    | Self::ApprovalUnavailable
                    | Self::BadUri
                    | Self::TlsMintFailed
            )
    }

    /// What the agent reads for a reason whose detail is internal.
    pub fn public_message(&self) -> String {
        match self {
            Self::PolicyError => "the policy could not be evaluated, so the request was refused; operators find why in the audit record of this request id".into(),
            Self::CredentialUnavailable => "the capability's credential could not be obtained, so the request was not sent; operators find why in the audit record of this request id".into(),
            Self::AuditUnavailable => "the decision could not be recorded, so the request was not sent".into(),
            Self::BudgetUnavailable => "the budget ledger cannot be written, so the request was not counted or sent".into(),
            Self::ApprovalUnavailable => "the approval could not be asked for or waited on, so the request was refused; operators find why in the audit record of this request id".into(),
            Self::BadUri => "the request could not be written as a valid URI for the upstream".into(),
            Self::TlsMintFailed => "the node could not present a certificate for this name".into(),
            Self::UpstreamUpgradeRefused => "the upstream answered 101 Switching Protocols to something other than a WebSocket upgrade; it was not relayed".into(),
            r if r.is_upstream() => format!("the request was allowed but the upstream failed: {r}"),
            r => format!("refused: {r}"),
        }
    }

    /// The HTTP status of an answer with this reason and `result`.
    pub fn http_status(&self, result: Decision) -> u16 {
        match self {
            Self::BudgetExhausted | Self::CellRateLimited => 429,
            Self::BodyTooLarge => 413,
            Self::BadUri | Self::BodyUnreadable | Self::McpMalformed => 400,
            // Answered in the protocol the client speaks: a JSON-RPC error.
            Self::McpToolDenied | Self::McpResourceDenied | Self::McpPromptDenied => 200,
            r if r.is_upstream() => 502,
            _ if result == Decision::Error => 503,
            _ => 403,
        }
    }

    /// The `error` field of the JSON answer.
    pub fn error_code(&self, result: Decision) -> &'static str {
        match self {
            Self::BudgetExhausted => "cellgate_budget_exhausted",
            Self::ApprovalRequired => "cellgate_approval_required",
            Self::CredentialUnavailable => "cellgate_credential_unavailable",
            Self::BadUri => "cellgate_bad_request",
            r if r.is_upstream() => "cellgate_upstream_error",
            _ if result == Decision::Error => "cellgate_unavailable",
            _ => "cellgate_denied",
        }
    }

    /// What the agent is told to do, when the decision gave no hint of its own.
    pub fn default_hint(&self) -> &'static str {
        match self {
            Self::NoCapability => "this cell has no capability for that destination; ask its owners to add one to the AgentCell",
            Self::CellSuspended => "this cell is suspended; every request is refused until it is resumed",
            Self::TokenRevoked | Self::TokenExpired => "this cell's identity is no longer valid; the task must be restarted with a new token",
            Self::NoPolicy => "the node has no valid policy and refuses everything; operators can see why on /readyz",
            Self::ApprovalDenied => "a human denied this request; do not retry it unchanged",
            Self::ApprovalTimeout => "no human decided on this request in time; it may be asked again later",
            Self::CredentialUnavailable | Self::AuditUnavailable | Self::AuditBacklog | Self::BudgetUnavailable => "the boundary could not complete this request; retry later",
            r if r.is_upstream() => "the destination could not be reached; retry later",
            _ => "the request was refused by the cell's boundary; do not retry it unchanged",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Reason {
    fn from(label: &str) -> Self {
        Self::from_label(label)
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for l in Reason::LABELS {
            assert!(seen.insert(*l), "{l} twice");
            let r = Reason::from_label(l);
            assert!(!matches!(r, Reason::Policy(_)), "{l} is not a node reason");
            assert_eq!(r.as_str(), *l);
        }
        assert_eq!(
            Reason::from_label("destructive_method"),
            Reason::Policy("destructive_method".into())
        );
    }

    /// Every label another crate gives a refusal is one of the node's own, so nothing the node
    /// records or answers falls back to a policy label by accident.
    #[test]
    fn the_labels_of_other_crates_are_node_reasons() {
        use cellgate_api::path::PathError;
        let mut labels: Vec<&str> = Vec::new();
        labels.extend(cellgate_proxy_protocol::ParseError::LABELS);
        labels.extend(cellgate_identity::token::TokenError::LABELS);
        labels.extend(cellgate_tls::client_hello::HelloError::LABELS);
        labels.extend(PathError::LABELS);
        labels.extend(cellgate_tls::upstream::CERT_LABELS);
        for l in labels {
            assert!(
                !matches!(Reason::from_label(l), Reason::Policy(_)),
                "{l} is missing from Reason"
            );
        }
    }

    #[test]
    fn statuses_follow_the_reason() {
        let s = |r: Reason, d| r.http_status(d);
        assert_eq!(s(Reason::BudgetExhausted, Decision::Deny), 429);
        assert_eq!(s(Reason::CellRateLimited, Decision::Deny), 429);
        assert_eq!(s(Reason::BudgetUnavailable, Decision::Error), 503);
        assert_eq!(s(Reason::CredentialUnavailable, Decision::Error), 503);
        assert_eq!(s(Reason::UpstreamTimeout, Decision::Error), 502);
        assert_eq!(s(Reason::BodyTooLarge, Decision::Deny), 413);
        assert_eq!(s(Reason::NoCapability, Decision::Deny), 403);
        assert_eq!(s(Reason::Policy("x".into()), Decision::Deny), 403);
        assert_eq!(
            Reason::CredentialUnavailable.error_code(Decision::Error),
            "cellgate_credential_unavailable"
        );
        assert_eq!(
            Reason::AuditUnavailable.error_code(Decision::Error),
            "cellgate_unavailable"
        );
        assert_eq!(
            Reason::UpstreamConnectFailed.error_code(Decision::Error),
            "cellgate_upstream_error"
        );
    }
}
