//! One decision pipeline for both front doors (the tagged intake and Envoy's ext_authz):
//!
//! ```text
//! admission (token, cell, source binding: the front door's own, or a refusal)
//!   → admit: rate → decide (lockdown, identity re-check, Rego) → govern (approval, budgets)
//!   → approve (when marked: hold or retry, bound to the body's digest)
//!   → conclude: credential → commit (the audit record; durable before a refusal is sent)
//!   → the wire (crate::answer: an HTTP answer or a CheckResponse, from the one JSON body)
//! ```
//!
//! Everything the node refuses before policy (fronting, CONNECT, a revoked or expired token)
//! enters the same pipeline as an [`Outcome::deny`] and leaves through [`conclude`], so each
//! decision has exactly one audit record and one metric sample with the same [`Reason`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cellgate_api::policy::{IdentityDoc, InputDoc};
use cellgate_audit::{Decision, Record};
use cellgate_identity::Claims;

use crate::cells::CellEntry;
pub use crate::reason::Reason;
use crate::Shared;

/// Who is on a connection: verified once when it is accepted.
#[derive(Debug, Clone)]
pub struct ConnIdentity {
    /// Verified claims.
    pub claims: Claims,
    /// The agent's address (from PPv2).
    pub source: SocketAddr,
    /// What the agent dialled (from PPv2).
    pub original_dst: SocketAddr,
}

/// What is known about a request.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// http, https, tls, tcp, dns
    pub protocol: &'static str,
    /// Lowercase host without port.
    pub host: Option<String>,
    /// Port the request is for.
    pub port: u16,
    /// TLS SNI.
    pub sni: Option<String>,
    /// HTTP method.
    pub method: Option<String>,
    /// Path without query.
    pub path: Option<String>,
    /// Query string.
    pub query: Option<String>,
    /// Selected headers, lowercase names.
    pub headers: BTreeMap<String, String>,
    /// Front door.
    pub front_door: &'static str,
    /// DNS query type.
    pub dns_type: Option<String>,
    /// The body as JSON, for capabilities that read it ([`crate::inspect`]).
    pub json: Option<serde_json::Value>,
    /// Whether the body was longer than the bound it was read to.
    pub body_oversize: bool,
    /// How many bytes of the body were read before deciding.
    pub body_read: usize,
    /// The capabilities whose injected secret the request carries (URL, a header, the body
    /// read): it may go only to that capability's own destinations.
    pub secrets_of: Vec<String>,
    /// What the detectors of the cell's `detect` capabilities found ([`crate::detect`]).
    pub detected: Vec<crate::detect::Found>,
    /// Those detectors (to keep what they found out of the audit record).
    pub detectors: Option<Arc<crate::detect::Detectors>>,
}

/// The outcome of one decision.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// allow, deny, shadow_deny
    pub result: Decision,
    /// Why, as a stable label.
    pub reason: Reason,
    /// Details.
    pub reasons: Vec<String>,
    /// A hint for the agent.
    pub hint: Option<String>,
    /// The capability that granted (or would have), or, on a policy denial, the one that
    /// reaches the destination but refused (null when none does).
    pub capability: Option<String>,
    /// Policy version used.
    pub policy_version: Option<String>,
    /// The policy packs that denied the request or would have (shadow), with their versions;
    /// empty when no layer spoke. Every pack of the set is `PolicySet::packs`.
    pub policy_packs: Vec<cellgate_policy::PackVerdict>,
    /// The cell, when known.
    pub cell: Option<Arc<CellEntry>>,
    /// Time to decide.
    pub latency_us: u64,
    /// Request id (also sent to the agent).
    pub request_id: String,
    /// For a rate refusal: when to retry (HTTP 429 with `Retry-After`).
    pub retry_after: Option<std::time::Duration>,
    /// The state of the budgets the request falls under, for its audit record.
    pub budget: Option<serde_json::Value>,
    /// The budget that refused it (HTTP 429).
    pub exhausted: Option<crate::budget::Exhausted>,
    /// Set by governance when the request needs a human's approval: the outcome is a refusal
    /// until [`approve`] turns it into the decision (the result policy gave is kept here).
    pub awaiting_approval: Option<(cellgate_api::model::ApprovalPolicy, Decision)>,
    /// The approval a refusal is waiting for (`approval_required`).
    pub approval_id: Option<String>,
    /// MCP calls refused (answered with a JSON-RPC error).
    pub mcp: Option<Arc<crate::mcp::Refused>>,
    /// MCP lists whose answers are filtered.
    pub mcp_lists: Vec<crate::mcp::Kind>,
    /// Written to the audit record after `reasons` (e.g. the MCP session).
    pub notes: Vec<String>,
    /// What to redact before the request is sent.
    pub redact: Option<Arc<crate::detect::Detectors>>,
}

impl Outcome {
    /// Whether the request may proceed (allow or shadow_deny).
    pub fn allowed(&self) -> bool {
        matches!(self.result, Decision::Allow | Decision::ShadowDeny)
    }

    /// A denial decided by the node itself, before or without policy.
    pub fn deny(reason: Reason, detail: impl Into<String>, hint: Option<String>) -> Self {
        Self {
            result: Decision::Deny,
            reason,
            reasons: vec![detail.into()],
            hint,
            capability: None,
            policy_version: None,
            policy_packs: Vec::new(),
            cell: None,
            latency_us: 0,
            request_id: new_request_id(),
            retry_after: None,
            budget: None,
            exhausted: None,
            awaiting_approval: None,
            approval_id: None,
            mcp: None,
            mcp_lists: Vec::new(),
            notes: Vec::new(),
            redact: None,
        }
    }

    /// This outcome turned into a refusal (`Deny`) or a failure (`Error`) for `reason`, keeping
    /// what is known of the request (cell, capability, request id, budgets).
    pub fn refused(mut self, result: Decision, reason: Reason, detail: impl Into<String>) -> Self {
        self.result = result;
        self.reason = reason;
        self.reasons = vec![detail.into()];
        self.hint = None;
        self
    }

    /// The capability that granted (or would have), as the cell defines it.
    pub fn granting_capability(&self) -> Option<&cellgate_api::model::Capability> {
        let entry = self.cell.as_ref()?;
        entry.cell.capability(self.capability.as_deref()?)
    }

    /// The HTTP status of this outcome when it refuses ([`Reason::http_status`]).
    pub fn deny_status(&self) -> u16 {
        self.reason.http_status(self.result)
    }

    /// `Retry-After` in whole seconds (at least 1), for a rate refusal.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|d| d.as_secs_f64().ceil().max(1.0) as u64)
    }
}

/// A fresh request id.
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Unix time now, in seconds.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// When the token behind `claims` stops being accepted (its `exp` plus the verifier's clock
/// leeway), as a timer deadline: what is still open then is closed (`token_expired`).
pub fn expiry_deadline(claims: &Claims) -> tokio::time::Instant {
    let left = claims
        .exp
        .saturating_add(cellgate_identity::token::LEEWAY_SECS)
        .saturating_sub(now_secs());
    let left = std::time::Duration::from_secs(u64::try_from(left).unwrap_or(0));
    // Far-future expiries are capped: `Instant + Duration` must not overflow.
    tokio::time::Instant::now() + left.min(std::time::Duration::from_secs(10 * 365 * 86_400))
}

/// Audits the closing of something open (a relay, a streamed response, an HTTP connection)
/// whose token expired, with reason `token_expired`.
pub async fn record_expired_close(
    shared: &Shared,
    ident: &ConnIdentity,
    facts: &Facts,
    what: &str,
) {
    let mut out = Outcome::deny(
        Reason::TokenExpired,
        format!(
            "open {what} closed: token {} expired at {}",
            ident.claims.jti, ident.claims.exp
        ),
        None,
    );
    out.cell = shared.cells.get(&ident.claims.cell_uid);
    tracing::info!(what, "closing what an expired token had open");
    let _ = commit(shared, ident.into(), facts, &out).await;
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A refusal at admission: the outcome to record, and the identity when the token verified.
#[derive(Debug)]
pub struct Unadmitted {
    /// The verified identity, when the token was good and something after it failed.
    pub ident: Option<ConnIdentity>,
    /// The refusal.
    pub out: Outcome,
}

/// Admission, the same for both front doors: the token verified (`verified`, or why not), the
/// cell it names known to this node, and `source` bound to it (in Kubernetes mode a Running pod
/// of the cell on this node, from the pod watch; otherwise the token's `pod_addr`). A bound
/// token outside Kubernetes also tells the DNS listener which cell its address is.
///
/// # Errors
/// The refusal, to record and answer (or close the connection on).
pub fn identify(
    shared: &Shared,
    verified: Result<Claims, cellgate_identity::token::TokenError>,
    source: SocketAddr,
    dst: SocketAddr,
) -> Result<ConnIdentity, Box<Unadmitted>> {
    let refused = |ident: Option<ConnIdentity>, reason: Reason, detail: String| {
        Box::new(Unadmitted {
            ident,
            out: Outcome::deny(reason, detail, None),
        })
    };
    let claims = match verified {
        Ok(c) => c,
        Err(e) => return Err(refused(None, Reason::from_label(e.reason()), e.to_string())),
    };
    let ident = ConnIdentity {
        claims,
        source,
        original_dst: dst,
    };
    let claims = &ident.claims;
    if shared.cells.get(&claims.cell_uid).is_none() {
        let detail = format!(
            "cell {}/{} ({}) is not known to this node",
            claims.namespace, claims.name, claims.cell_uid
        );
        return Err(refused(Some(ident), Reason::CellUnknown, detail));
    }
    if shared.config.kubernetes {
        // Kubernetes tokens are not bound to an address: the pod watch says which addresses
        // are this cell's pods on this node, and alone maps addresses to cells.
        if !crate::kubernetes::source_is_cell_pod(shared, source.ip(), &claims.cell_uid) {
            let detail = format!(
                "source address {} is not a running pod of cell {}/{} on this node",
                source.ip().to_canonical(),
                claims.namespace,
                claims.name
            );
            return Err(refused(Some(ident), Reason::SourceNotBound, detail));
        }
        return Ok(ident);
    }
    if let Err(e) = cellgate_identity::token::check_binding(claims, source.ip()) {
        let (reason, detail) = (Reason::from_label(e.reason()), e.to_string());
        return Err(refused(Some(ident), reason, detail));
    }
    if let Some(bound) = claims
        .pod_addr
        .as_deref()
        .and_then(|a| a.parse::<std::net::IpAddr>().ok())
    {
        let known = shared
            .pods
            .read()
            .map(|p| p.get(&bound) == Some(&claims.cell_uid))
            .unwrap_or(true);
        if !known {
            if let Ok(mut pods) = shared.pods.write() {
                pods.insert(bound, claims.cell_uid.clone());
            }
        }
    }
    Ok(ident)
}

/// Decides a request of `ident` with `facts`. Never does I/O.
pub fn decide(shared: &Shared, ident: &ConnIdentity, facts: &Facts) -> Outcome {
    let start = Instant::now();
    let mut out = decide_inner(shared, ident, facts);
    out.latency_us = start.elapsed().as_micros() as u64;
    shared
        .metrics
        .decision_seconds
        .observe(start.elapsed().as_secs_f64());
    out
}

fn decide_inner(shared: &Shared, ident: &ConnIdentity, facts: &Facts) -> Outcome {
    let claims = &ident.claims;
    // The token was verified when the connection opened; it can since have expired or been
    // revoked, and the cell removed: re-check on every request.
    if shared.verifier.is_revoked(&claims.jti) {
        return Outcome::deny(
            Reason::TokenRevoked,
            format!("token {} was revoked", claims.jti),
            None,
        );
    }
    if cellgate_identity::token::is_past_expiry(claims.exp, now_secs()) {
        return Outcome::deny(
            Reason::TokenExpired,
            format!("token expired at {}", claims.exp),
            Some("the cell's token expired; a new one is issued by the control plane".into()),
        );
    }
    let Some(entry) = shared.cells.get(&claims.cell_uid) else {
        return Outcome::deny(
            Reason::CellUnknown,
            format!(
                "cell {}/{} ({}) is not known to this node",
                claims.namespace, claims.name, claims.cell_uid
            ),
            None,
        );
    };
    // The self-check's must-deny destination is never allowed, whatever a capability says: the
    // intake takes probes to it before any decision; this covers the other front doors.
    if shared.self_check.reserves(ident.original_dst) {
        let mut o = crate::selfcheck::refusal(ident.original_dst);
        o.cell = Some(entry);
        return o;
    }
    // The kill switch: before anything else about the cell, and re-checked for what is open.
    if let Some(lock) = shared.lockdown.applies(&entry.cell.namespace) {
        let mut o = Outcome::deny(
            Reason::Lockdown,
            format!(
                "the node is in lockdown since {}: {}",
                lock.since, lock.reason
            ),
            Some("every request is refused until operators lift the lockdown; do not retry".into()),
        );
        o.cell = Some(entry);
        return o;
    }
    // Kubernetes mode: tokens are not bound to an address; the source must still be a Running
    // pod of the cell on this node (re-checked here so a relay outliving its pod is closed).
    if shared.config.kubernetes
        && !crate::kubernetes::source_is_cell_pod(shared, ident.source.ip(), &claims.cell_uid)
    {
        let mut o = Outcome::deny(
            Reason::SourceNotBound,
            format!(
                "source address {} is not a running pod of cell {}/{} on this node",
                ident.source.ip().to_canonical(),
                claims.namespace,
                claims.name
            ),
            None,
        );
        o.cell = Some(entry);
        return o;
    }
    let Some(policy) = shared.policy.current() else {
        let mut o = Outcome::deny(
            Reason::NoPolicy,
            "this node has no valid policy and denies everything",
            None,
        );
        o.cell = Some(entry);
        return o;
    };
    let mut input = crate::recorded::input_doc(policy_request(ident.into(), facts, now_ns()));
    input.request.json = facts.json.clone();
    let version = policy.version().to_string();
    // The body goes to the policy only for a request granted by a capability that reads it,
    // and only when it is within that capability's bound: decided without it first (which
    // capability grants does not depend on it), then again with it.
    let json = input.request.json.take();
    let mut out = evaluate(&policy, &input, &entry, &version);
    if json.is_some() && out.allowed() && sees_body(&out, facts) {
        input.request.json = json;
        out = evaluate(&policy, &input, &entry, &version);
    }
    if out.allowed() {
        content(&mut out, facts);
    }
    out
}

/// Whether the capability that granted reads the body, and all of it was read within its bound.
fn sees_body(out: &Outcome, facts: &Facts) -> bool {
    out.granting_capability()
        .and_then(|c| c.inspect)
        .is_some_and(|i| !facts.body_oversize && facts.body_read <= i.max_bytes as usize)
}

fn evaluate(
    policy: &cellgate_policy::PolicySet,
    input: &InputDoc,
    entry: &Arc<CellEntry>,
    version: &str,
) -> Outcome {
    let entry = entry.clone();
    let version = version.to_string();
    match policy.decide_with_cell(input, &entry.value) {
        Ok(cellgate_policy::Decided {
            decision: d,
            packs: policy_packs,
        }) => Outcome {
            result: crate::recorded::decision_of(&d),
            reason: Reason::from_label(&d.reason),
            reasons: d.reasons,
            hint: d.hint,
            capability: d.capability,
            policy_version: Some(version),
            policy_packs,
            cell: Some(entry),
            latency_us: 0,
            request_id: new_request_id(),
            retry_after: None,
            budget: None,
            exhausted: None,
            awaiting_approval: None,
            approval_id: None,
            mcp: None,
            mcp_lists: Vec::new(),
            notes: Vec::new(),
            redact: None,
        },
        Err(e) => {
            tracing::warn!(error = %e, "policy evaluation failed; denying");
            let mut o = Outcome::deny(
                Reason::PolicyError,
                format!("policy evaluation failed: {e}"),
                None,
            );
            o.policy_version = Some(version);
            o.cell = Some(entry);
            o
        }
    }
}

/// The content stage, for capabilities that read bodies: a body over the bound, and MCP calls
/// the capability's rules do not allow. In shadow mode a refusal is recorded (`shadow_deny`)
/// and the request goes through.
fn content(out: &mut Outcome, facts: &Facts) {
    // Only the intake reads content; on other front doors governance refuses such capabilities
    // (`governance_unavailable`).
    if facts.front_door != "intake" {
        return;
    }
    let Some(entry) = out.cell.clone() else {
        return;
    };
    let Some(cap) = out
        .capability
        .as_deref()
        .and_then(|n| entry.cell.capability(n))
    else {
        return;
    };
    // Always refused, shadow or not: a secret the agent should never have had.
    if let Some(other) = facts.secrets_of.iter().find(|c| **c != cap.name) {
        out.result = Decision::Deny;
        out.reason = Reason::CredentialExfiltration;
        out.reasons = vec![format!(
            "the request carries the credential of capability {other}, which goes only to that capability's destinations"
        )];
        out.hint =
            Some("never send a credential the boundary injects; it is not yours to use".into());
        return;
    }
    let shadow = cap.mode == cellgate_api::model::Mode::Shadow;
    let refuse = |out: &mut Outcome, reason: Reason, detail: String| {
        out.result = if shadow {
            Decision::ShadowDeny
        } else {
            Decision::Deny
        };
        out.reason = reason;
        out.reasons = vec![detail];
        out.hint = None;
    };
    if let Some(d) = &cap.detect {
        use crate::detect::{Class, Place, HIGH_ENTROPY_NAME};
        use cellgate_api::manifest::DetectAction;
        let action = |class| match class {
            Class::Secret => d.secrets,
            Class::Pii => d.pii,
        };
        let mine: Vec<_> = facts
            .detected
            .iter()
            .filter(|f| action(f.class).is_some())
            .filter(|f| match f.detector.as_str() {
                HIGH_ENTROPY_NAME => d.entropy,
                name if crate::detect::is_builtin(name) => true,
                name => d.patterns.iter().any(|p| p.name == name),
            })
            .collect();
        let refused = mine
            .iter()
            .find(|f| action(f.class) == Some(DetectAction::Deny) || f.place == Place::Path);
        if let Some(f) = refused {
            let reason = match f.class {
                Class::Secret => Reason::SecretDetected,
                Class::Pii => Reason::PiiDetected,
            };
            let what = if f.place == Place::Path && action(f.class) == Some(DetectAction::Redact) {
                ", which cannot be redacted"
            } else {
                ""
            };
            let detail = format!(
                "detector {} found something in {}{what}",
                f.detector, f.place
            );
            return refuse(out, reason, detail);
        }
        if !mine.is_empty() {
            let redacted = |c| action(c) == Some(DetectAction::Redact);
            out.redact = Some(Arc::new(crate::detect::Detectors::of(d, redacted)));
            for f in mine {
                out.notes
                    .push(format!("redacted {} in {}", f.detector, f.place));
            }
        }
    }
    let Some(inspect) = cap.inspect else {
        return;
    };
    let over = facts.body_oversize || facts.body_read > inspect.max_bytes as usize;
    if over
        && (cap.mcp.is_some() || inspect.on_oversize == cellgate_api::manifest::OnOversize::Deny)
    {
        let detail = format!(
            "the request body is over the {} bytes capability {} reads",
            inspect.max_bytes, cap.name
        );
        return refuse(out, Reason::BodyTooLarge, detail);
    }
    let Some(rules) = &cap.mcp else {
        return;
    };
    if facts.method.as_deref() != Some("POST") {
        return;
    }
    match crate::mcp::check(rules, facts.json.as_ref()) {
        crate::mcp::Checked::Pass(lists) => out.mcp_lists = lists,
        crate::mcp::Checked::Refused(r) => {
            refuse(out, r.reason(), r.detail());
            if !shadow {
                out.mcp = Some(r);
            }
        }
        crate::mcp::Checked::Malformed(why) => refuse(
            out,
            Reason::McpMalformed,
            format!("capability {} governs an MCP server: {why}", cap.name),
        ),
    }
}

/// A new request, through every stage before the credential: the cell's rate, the decision
/// (lockdown, identity, policy), then governance (approval, budgets). Re-checks of what is
/// already open call [`decide`] alone: they are not new requests and spend no budget.
pub async fn admit(shared: &Shared, ident: &ConnIdentity, facts: &Facts) -> Outcome {
    let out = match shared.take_request(ident) {
        Ok(()) => decide(shared, ident, facts),
        Err(refused) => *refused,
    };
    let out = export_gate(shared, out);
    govern(shared, facts, out).await
}

/// Refuses a new request while the audit export is further behind than its bound
/// (`audit_backlog`, 503): the node never drops a record to keep up, so it stops adding
/// allowed actions until the collector has caught up. Open streams are not closed for it.
fn export_gate(shared: &Shared, out: Outcome) -> Outcome {
    match &shared.export {
        Some(export) if out.allowed() && export.over_bound() => {
            let status = export.status();
            shared
                .alerts
                .audit_backlog(status.backlog, status.lag_seconds);
            let what = format!(
                "the audit export is {} records behind, past its bound of {}; the collector is down or slow",
                status.backlog,
                export.max_backlog()
            );
            out.refused(Decision::Error, Reason::AuditBacklog, what)
        }
        _ => out,
    }
}

/// The budgets a request granted by `cap` falls under: the cell's, then the capability's.
pub fn budget_scopes<'a>(
    cell: &'a cellgate_api::model::Cell,
    cap: Option<&'a cellgate_api::model::Capability>,
) -> Vec<crate::budget::Scope<'a>> {
    let mut v = Vec::new();
    if let Some(spec) = &cell.budget {
        v.push(crate::budget::Scope {
            name: crate::budget::CELL_SCOPE,
            spec,
        });
    }
    if let Some(cap) = cap {
        if let Some(spec) = &cap.budget {
            v.push(crate::budget::Scope {
                name: &cap.name,
                spec,
            });
        }
    }
    v
}

/// Whether the node reads the responses of requests like `facts` (for LLM usage): HTTP through
/// the intake, TLS intercepted. Envoy mode, TLS passthrough and raw relays cannot be metered.
pub fn usage_meterable(facts: &Facts) -> bool {
    facts.front_door == "intake" && matches!(facts.protocol, "http" | "https")
}

/// Unix time now, in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Budgets, then approvals, on an allowed request. A token or spend budget the node cannot
/// meter on this path is refused (`governance_unavailable`), never let through unmetered; so is
/// a hold approval on a front door that cannot hold a request. A request that needs approval
/// leaves here refused (`approval_required`) and marked for [`approve`], which only the front
/// doors that can bind the request's body call: a front door that does not, refuses. All of
/// this holds in shadow mode too: shadow relaxes policy denials, not governance.
async fn govern(shared: &Shared, facts: &Facts, mut out: Outcome) -> Outcome {
    if !out.allowed() {
        return out;
    }
    let Some(entry) = out.cell.clone() else {
        return out;
    };
    let cap = out
        .capability
        .as_deref()
        .and_then(|name| entry.cell.capability(name));
    let unavailable = |out: Outcome, what: String, hint: &str| {
        let mut out = out.refused(Decision::Deny, Reason::GovernanceUnavailable, what);
        out.hint = Some(hint.into());
        out
    };
    if let Some(cap) =
        cap.filter(|c| (c.inspect.is_some() || c.detect.is_some()) && facts.front_door != "intake")
    {
        let what = format!(
            "capability {} reads requests' content (inspect, mcp or detect), which the {} front door does not",
            cap.name, facts.front_door
        );
        return unavailable(
            out,
            what,
            "body inspection, MCP governance and detection are enforced on the node's intake",
        );
    }
    if let Some(cap) = cap.filter(|c| c.approval) {
        if !matches!(facts.protocol, "http" | "https") {
            let what = format!("capability {} requires approval of each request, and a {} connection has no request to approve", cap.name, facts.protocol);
            return unavailable(
                out,
                what,
                "approvals govern HTTP requests (TLS intercepted); not relays",
            );
        }
        if cap.approval_policy.mode == cellgate_api::model::ApprovalMode::Hold
            && facts.front_door != "intake"
        {
            let what = format!("capability {} holds requests for approval, which the {} front door cannot do (Envoy gives up on a check within its timeout)", cap.name, facts.front_door);
            return unavailable(
                out,
                what,
                "use approval mode: retry with Envoy, or send through the node's intake",
            );
        }
    }
    let scopes = budget_scopes(&entry.cell, cap);
    if scopes.iter().any(|s| crate::budget::meters_usage(s.spec)) && !usage_meterable(facts) {
        let what = format!(
            "a token or spend budget governs this request, and the node cannot read the usage of {} requests through the {} front door",
            facts.protocol, facts.front_door
        );
        return unavailable(
            out,
            what,
            "token and spend budgets need HTTP through the node's intake with TLS intercepted",
        );
    }
    while !scopes.is_empty() {
        let now = now_ms();
        match shared.ledger.take(&entry.cell.uid, &scopes, now) {
            crate::budget::Take::Granted(state) => {
                out.budget = Some(state);
                break;
            }
            crate::budget::Take::Exhausted(e) => {
                let (limit, used) = e.amounts();
                out.result = Decision::Deny;
                out.reason = Reason::BudgetExhausted;
                out.reasons = vec![format!(
                    "the {} budget {} of {} is used up ({used} of {limit})",
                    if e.scope == "cell" {
                        "cell's"
                    } else {
                        "capability's"
                    },
                    e.budget,
                    if e.scope == "cell" {
                        entry.cell.key()
                    } else {
                        e.scope.clone()
                    },
                )];
                out.hint = Some(match e.resets_at_ms {
                    Some(_) => {
                        "the budget resets at resets_at; retry after the time in Retry-After".into()
                    }
                    None => "the budget is used up for the cell's life; ask its owners to raise it"
                        .into(),
                });
                out.retry_after = e.retry_after(now);
                out.budget = Some(shared.ledger.state(&entry.cell.uid, &scopes));
                out.exhausted = Some(e);
                return out;
            }
            crate::budget::Take::Persist => {
                if let Err(e) = shared.ledger.persist().await {
                    tracing::error!(error = %e, "budget ledger unavailable; refusing");
                    return out.refused(
                        Decision::Error,
                        Reason::BudgetUnavailable,
                        format!("the budget ledger cannot be written ({e}), so the request was not counted or sent"),
                    );
                }
            }
        }
    }
    if let Some(cap) = cap.filter(|c| c.approval) {
        out.awaiting_approval = Some((cap.approval_policy, out.result));
        out.result = Decision::Deny;
        out.reason = Reason::ApprovalRequired;
        out.reasons = vec![format!(
            "capability {} requires a human's approval of each request",
            cap.name
        )];
    }
    out
}

/// Largest request body bound to an approval (its SHA-256 is part of what is approved); a
/// larger one is refused.
pub const APPROVAL_MAX_BODY: usize = 1024 * 1024;

/// The approval stage: a request [`govern`] marked is held for a decision (mode `hold`) or
/// answered at once with an approval id (mode `retry`), unless an earlier approval of the same
/// request covers it. `body_digest` is the SHA-256 of the whole body; `None` when the front door
/// could not read it, which refuses.
pub async fn approve(
    shared: &Shared,
    ident: &ConnIdentity,
    facts: &Facts,
    mut out: Outcome,
    body_digest: Option<String>,
) -> Outcome {
    use crate::approvals::{ApprovalKey, Verdict};
    let Some((policy, decided)) = out.awaiting_approval.take() else {
        return out;
    };
    let (Some(entry), Some(cap)) = (out.cell.clone(), out.capability.clone()) else {
        return out;
    };
    let Some(body_digest) = body_digest else {
        out.reason = Reason::GovernanceUnavailable;
        out.reasons = vec![format!(
            "the request's body could not be read whole (at most {APPROVAL_MAX_BODY} bytes), so no approval could be bound to it"
        )];
        return out;
    };
    let path = match &facts.query {
        Some(q) => format!("{}?{q}", facts.path.as_deref().unwrap_or("/")),
        None => facts.path.clone().unwrap_or_else(|| "/".into()),
    };
    let key = ApprovalKey {
        cell_uid: entry.cell.uid.clone(),
        capability: cap.clone(),
        method: facts.method.clone().unwrap_or_default(),
        host: facts.host.clone().unwrap_or_default(),
        path,
        body_digest,
    };
    let retry = policy.mode == cellgate_api::model::ApprovalMode::Retry;
    let now = now_ms();
    if retry && shared.approvals.take_grant(&key, now) {
        out.result = decided;
        out.reason = Reason::Allowed;
        out.reasons = vec!["approved earlier: the approval of this request has a use left".into()];
        return out;
    }
    let asked = match shared.approvals.ask(
        key,
        entry.cell.key(),
        retry,
        policy.timeout_secs,
        &out.request_id,
        now,
    ) {
        Ok(a) => a,
        Err(e) => {
            out.reason = Reason::ApprovalUnavailable;
            out.reasons = vec![e.to_string()];
            return out;
        }
    };
    if asked.new {
        let mut o = out.clone();
        o.result = Decision::Approval;
        o.reason = Reason::ApprovalRequested;
        o.reasons = vec![format!(
            "approval {} requested ({} mode, {}s)",
            asked.id,
            if retry { "retry" } else { "hold" },
            policy.timeout_secs
        )];
        o.approval_id = Some(asked.id.clone());
        if commit(shared, ident.into(), facts, &o).await.is_err() {
            shared.approvals.withdraw(&asked.id);
            out.reason = Reason::ApprovalUnavailable;
            out.reasons = vec!["the approval request could not be recorded".into()];
            return out;
        }
        // In Kubernetes, approvers see it as an AgentApproval; no object, no approval.
        if shared.config.kubernetes {
            let published = match shared.approvals.view(&asked.id, now) {
                Some(view) => crate::kubernetes::publish_approval(shared, &view).await,
                None => Err("expired before it could be published".into()),
            };
            if let Err(e) = published {
                tracing::warn!(approval = %asked.id, error = %e, "AgentApproval not created; refusing");
                shared.approvals.withdraw(&asked.id);
                out.reason = Reason::ApprovalUnavailable;
                out.reasons = vec![format!(
                    "the approval could not be published to the API server: {e}"
                )];
                return out;
            }
        }
    }
    out.approval_id = Some(asked.id.clone());
    if retry {
        out.result = Decision::Approval;
        out.hint = Some(format!(
            "a human must approve this request ({}); retry the same request (same method, host, path and body) once approved",
            asked.id
        ));
        return out;
    }
    // Hold: wait for the decision; a request that gives up withdraws its approval.
    struct Withdraw<'a>(&'a Shared, &'a str, bool);
    impl Drop for Withdraw<'_> {
        fn drop(&mut self) {
            if self.2 {
                self.0.approvals.withdraw(self.1);
            }
        }
    }
    let mut guard = Withdraw(shared, &asked.id, true);
    let mut verdict = asked.verdict;
    let waited = tokio::time::timeout(
        std::time::Duration::from_secs(policy.timeout_secs),
        verdict.wait_for(Option::is_some),
    )
    .await;
    let got = match waited {
        Ok(Ok(v)) => v.clone(),
        Ok(Err(_)) => None,
        Err(_) => {
            out.reason = Reason::ApprovalTimeout;
            out.reasons = vec![format!(
                "approval {} was not decided within {}s",
                asked.id, policy.timeout_secs
            )];
            return out;
        }
    };
    guard.2 = false;
    match got {
        Some(Verdict::Approved { by }) => {
            out.result = decided;
            out.reason = Reason::Allowed;
            out.reasons = vec![format!("approved by {by} ({})", asked.id)];
        }
        Some(Verdict::Denied { by, reason }) => {
            out.reason = Reason::ApprovalDenied;
            out.reasons = vec![format!("denied by {by} ({}): {reason}", asked.id)];
        }
        Some(Verdict::Withdrawn { reason }) => {
            out.reason = Reason::ApprovalUnavailable;
            out.reasons = vec![format!("approval {}: {reason}", asked.id)];
        }
        None => {
            out.reason = Reason::ApprovalUnavailable;
            out.reasons = vec![format!(
                "approval {} was dropped before a decision",
                asked.id
            )];
        }
    }
    out
}

/// Who a decision is about: the verified identity when there is one (none for a refusal before
/// the token was verified), and the connection's addresses.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The verified identity.
    pub ident: Option<&'a ConnIdentity>,
    /// The agent's address.
    pub source: SocketAddr,
    /// What the agent dialled.
    pub dst: SocketAddr,
}

impl<'a> From<&'a ConnIdentity> for Subject<'a> {
    fn from(ident: &'a ConnIdentity) -> Self {
        Self {
            ident: Some(ident),
            source: ident.source,
            dst: ident.original_dst,
        }
    }
}

/// Builds the audit record of a decision.
pub fn audit_record(shared: &Shared, who: Subject<'_>, facts: &Facts, out: &Outcome) -> Record {
    let Subject { ident, source, dst } = who;
    let (cell, namespace) = match (&out.cell, ident) {
        (Some(e), _) => (Some(e.cell.name.clone()), Some(e.cell.namespace.clone())),
        (None, Some(i)) => (
            Some(i.claims.name.clone()),
            Some(i.claims.namespace.clone()),
        ),
        _ => (None, None),
    };
    let mut reasons = out.reasons.clone();
    reasons.truncate(16);
    let mut rec = Record::new(
        &shared.config.node_name,
        facts.front_door,
        facts.protocol,
        out.result,
        out.reason.as_str(),
    );
    rec.cell = cell;
    rec.namespace = namespace;
    rec.token_id = ident.map(|i| i.claims.jti.clone());
    rec.source = Some(source.to_string());
    rec.destination = Some(dst.to_string());
    rec.method = facts.method.clone();
    rec.host = facts.host.clone();
    rec.path = facts.path.clone();
    // What a detector found in the path is not written down either.
    if let Some(ds) = &facts.detectors {
        if facts
            .detected
            .iter()
            .any(|f| f.place == crate::detect::Place::Path)
        {
            rec.path = rec.path.map(|p| ds.redact(&p));
        }
    }
    rec.capability = out.capability.clone();
    rec.reasons = reasons;
    rec.policy_version = out.policy_version.clone();
    rec.budget = out.budget.clone();
    if let Some(id) = &out.approval_id {
        rec.reasons.push(format!("approval_id={id}"));
    }
    rec.reasons.extend(out.notes.iter().cloned());
    rec.latency_us = Some(out.latency_us);
    rec.request_id = Some(out.request_id.clone());
    let path_redacted = rec.path != facts.path;
    let packs = out.policy_version.as_deref().and_then(|v| {
        let set = shared.policy.current()?;
        (set.version() == v).then(|| crate::recorded::packs_of(&set))
    });
    crate::recorded::fill_record(
        &mut rec,
        &policy_request(who, facts, 0),
        out.cell.as_ref().map(|e| e.cell.generation),
        packs,
        facts.json.is_some(),
        path_redacted,
    );
    rec
}

/// What the policy input of a request is built from ([`crate::recorded`]): the same for the
/// decision and for its audit record, so a replay rebuilds the input the node decided on.
fn policy_request(who: Subject<'_>, facts: &Facts, time_ns: i64) -> crate::recorded::Request {
    let identity = who
        .ident
        .map_or_else(IdentityDoc::default, |i| IdentityDoc {
            jti: i.claims.jti.clone(),
            cell_uid: i.claims.cell_uid.clone(),
            namespace: i.claims.namespace.clone(),
            name: i.claims.name.clone(),
            role: i.claims.role.clone(),
        });
    crate::recorded::Request {
        time_ns,
        front_door: facts.front_door.into(),
        source: Some(who.source),
        destination: Some(who.dst),
        identity,
        protocol: facts.protocol.into(),
        host: facts.host.clone(),
        port: facts.port,
        sni: facts.sni.clone(),
        method: facts.method.clone(),
        path: facts.path.clone(),
        query: facts.query.clone(),
        headers: facts.headers.clone(),
        dns_type: facts.dns_type.clone(),
    }
}

/// Records `out` for something already under way (a response stream cut, usage counted), off
/// the caller's path: nothing waits on it, and a failure is logged by [`record`].
pub fn record_in_background(
    shared: &Arc<Shared>,
    ident: &ConnIdentity,
    facts: &Facts,
    out: &Outcome,
) {
    let rec = audit_record(shared, ident.into(), facts, out);
    let shared = shared.clone();
    tokio::spawn(async move {
        let _ = record(&shared, rec).await;
    });
}

/// Why a decision could not be recorded; the caller fails closed.
#[derive(Debug, thiserror::Error)]
#[error("audit unavailable: {0}")]
pub struct AuditFailed(pub String);

/// Writes the record of a decision and counts it: denials are durable before this returns;
/// allows (and shadow denials, which go on too) are queued (never waiting on the disk; a full
/// queue is an error), or with `--audit-durability strict` durable before this returns as
/// well, so that the request is forwarded only once its record is on disk. Durable writes share
/// the writer's group commit: concurrent requests wait for one sync, not one each.
///
/// # Errors
/// When the record could not be written or queued: the request must then be refused.
pub async fn record(shared: &Shared, rec: Record) -> Result<(), AuditFailed> {
    let result = decision_label(rec.decision);
    shared
        .metrics
        .decision(result, &rec.reason, &rec.front_door);
    if rec.decision == Decision::Deny {
        if let Some(host) = &rec.host {
            shared.metrics.denied_host(host);
        }
    }
    let goes_on = rec.decision == Decision::Allow || rec.decision == Decision::ShadowDeny;
    let r = if goes_on && shared.config.audit_durability == crate::config::AuditDurability::Relaxed
    {
        shared.audit.submit(rec)
    } else {
        shared.audit.submit_durable(rec).await
    };
    r.map_err(|e| {
        tracing::error!(error = %e, "audit record could not be written; failing closed");
        AuditFailed(e.to_string())
    })
}

/// Builds the audit record of `out` and writes it ([`record`]).
///
/// # Errors
/// When the record could not be written or queued: a request must then be refused.
pub async fn commit(
    shared: &Shared,
    who: Subject<'_>,
    facts: &Facts,
    out: &Outcome,
) -> Result<(), AuditFailed> {
    record(shared, audit_record(shared, who, facts, out)).await
}

/// Where a decided request goes.
#[derive(Debug)]
pub enum Concluded {
    /// Allowed and recorded: send it, with the capability's credential when it has one.
    Forward(Outcome, Option<crate::credentials::Injected>),
    /// Refused (or failed) and recorded, durably: answer with [`crate::answer::of`].
    Answer(Outcome),
}

/// The last stages of the pipeline, the same for both front doors: the credential of an
/// allowed HTTP request (never sent without it: `credential_unavailable`), then the commit of
/// the one audit record of the request. A record that cannot be written refuses the request
/// (`audit_unavailable`).
pub async fn conclude(
    shared: &Shared,
    who: Subject<'_>,
    facts: &Facts,
    mut out: Outcome,
) -> Concluded {
    let mut injected = None;
    if out.allowed() && matches!(facts.protocol, "http" | "https") {
        if let Some(entry) = out.cell.clone() {
            let cap = out
                .capability
                .as_deref()
                .and_then(|n| entry.cell.capability(n));
            let got = match cap {
                Some(cap) => shared.credentials.injection(&entry.cell, cap).await,
                None => Ok(None),
            };
            match got {
                Ok(i) => injected = i,
                Err(e) => {
                    out = out.refused(
                        Decision::Error,
                        Reason::CredentialUnavailable,
                        e.to_string(),
                    );
                }
            }
        }
    }
    if let Err(e) = commit(shared, who, facts, &out).await {
        return Concluded::Answer(out.refused(Decision::Error, Reason::AuditUnavailable, e.0));
    }
    if out.allowed() {
        Concluded::Forward(out, injected)
    } else {
        tracing::info!(reason = %out.reason, request.id = %out.request_id, front_door = facts.front_door, "refused");
        Concluded::Answer(out)
    }
}

/// Records a failure after an allow (an upstream that cannot be reached, a forbidden resolved
/// address) and returns its outcome for the answer.
pub async fn after_allow(
    shared: &Shared,
    who: Subject<'_>,
    facts: &Facts,
    out: &Outcome,
    reason: Reason,
    detail: String,
) -> Outcome {
    let result = if reason == Reason::DestinationForbidden {
        Decision::Deny
    } else {
        Decision::Error
    };
    tracing::info!(reason = %reason, detail = %detail, "refused after the decision");
    let mut o = out.clone().refused(result, reason, detail);
    if o.reason == Reason::DestinationForbidden {
        o.hint = Some("this name resolves into the node's own reach (loopback, link-local, cloud metadata, the node itself); a capability must set allowInternalAddresses to reach such an address".into());
    }
    let _ = commit(shared, who, facts, &o).await;
    o
}

/// The metric label of a decision.
pub fn decision_label(d: Decision) -> &'static str {
    match d {
        Decision::Allow => "allow",
        Decision::Deny => "deny",
        Decision::Error => "error",
        Decision::ShadowDeny => "shadow_deny",
        Decision::Approval => "approval",
        Decision::Control => "control",
    }
}
