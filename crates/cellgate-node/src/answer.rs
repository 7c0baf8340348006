//! The one mapping of a refusal to the wire: the status, the headers and the JSON body every
//! refused request gets, whichever front door it came through. The intake writes it as an
//! HTTP response ([`crate::http`]); ext_authz as the `DeniedHttpResponse` Envoy sends
//! ([`crate::ext_authz`]).
//!
//! The body is written for an agent, often an LLM: what was refused, why, and what to do. What
//! went wrong inside the node or a backend (a policy engine's error, a Vault answer, an I/O
//! error) is never in it: those reasons carry a fixed message and the request id under which
//! operators find the detail in the audit record ([`Reason::detail_is_internal`]).

use crate::decide::{ConnIdentity, Outcome};

/// A refusal as it goes on the wire.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<u64>,
    /// The JSON body.
    pub body: serde_json::Value,
}

impl Answer {
    /// The body as sent: JSON and a newline.
    pub fn text(&self) -> String {
        let mut text = self.body.to_string();
        text.push('\n');
        text
    }

    /// The headers every answer carries besides `content-type`: the request id, `no-store`
    /// and `Retry-After` when there is one.
    pub fn headers<'a>(
        &'a self,
        request_id: &'a str,
    ) -> impl Iterator<Item = (&'static str, String)> + 'a {
        [
            ("content-type", "application/json".to_string()),
            ("cache-control", "no-store".to_string()),
            (crate::http::REQUEST_ID_HEADER, request_id.to_string()),
        ]
        .into_iter()
        .chain(self.retry_after.map(|s| ("retry-after", s.to_string())))
    }
}

/// The answer to a refused (or failed) request. `ident` names the cell when the outcome knows
/// none (a refusal before the cell was looked up); null when no identity was verified.
pub fn of(ident: Option<&ConnIdentity>, out: &Outcome) -> Answer {
    let cell = out
        .cell
        .as_ref()
        .map(|e| e.cell.key())
        .or_else(|| ident.map(|i| format!("{}/{}", i.claims.namespace, i.claims.name)));
    let reason = &out.reason;
    let message = if reason.detail_is_internal() {
        reason.public_message()
    } else {
        out.reasons
            .first()
            .cloned()
            .unwrap_or_else(|| reason.public_message())
    };
    let hint = out
        .hint
        .clone()
        .filter(|_| !reason.detail_is_internal())
        .unwrap_or_else(|| reason.default_hint().to_string());
    if let Some(refused) = &out.mcp {
        let data = serde_json::json!({
            "cell": cell,
            "capability": out.capability,
            "request_id": out.request_id,
        });
        return Answer {
            status: 200,
            retry_after: None,
            body: crate::mcp::error_response(refused, &data),
        };
    }
    let mut body = serde_json::json!({
        "error": reason.error_code(out.result),
        "reason": reason.as_str(),
        "message": message,
        "cell": cell,
        "capability": out.capability,
        "request_id": out.request_id,
        "hint": hint,
    });
    let fields = body.as_object_mut().expect("a JSON object");
    if let Some(e) = &out.exhausted {
        let (limit, used) = e.amounts();
        fields.insert("budget".into(), e.budget.into());
        fields.insert("scope".into(), e.scope.clone().into());
        fields.insert("limit".into(), limit);
        fields.insert("used".into(), used);
        fields.insert(
            "resets_at".into(),
            e.resets_at_ms.map(crate::budget::rfc3339_ms).into(),
        );
    }
    if let Some(id) = &out.approval_id {
        fields.insert("approval_id".into(), id.clone().into());
    }
    Answer {
        status: out.deny_status(),
        retry_after: out.retry_after_secs(),
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reason::Reason;
    use cellgate_audit::Decision;

    #[test]
    fn internal_details_never_reach_the_agent() {
        let secret = "vault said: permission denied at secret/data/github token=s.abcdef";
        let out = Outcome::deny(Reason::NoCapability, "x", None).refused(
            Decision::Error,
            Reason::CredentialUnavailable,
            secret,
        );
        let a = of(None, &out);
        assert_eq!(a.status, 503);
        let text = a.text();
        assert!(!text.contains("vault said"), "{text}");
        assert!(!text.contains("s.abcdef"), "{text}");
        assert_eq!(a.body["error"], "cellgate_credential_unavailable");
        assert_eq!(a.body["reason"], "credential_unavailable");
        assert_eq!(a.body["request_id"], out.request_id.as_str());

        let out = Outcome::deny(
            Reason::PolicyError,
            "policy evaluation failed: rego stack overflow in data.x",
            Some("internal hint".into()),
        );
        let a = of(None, &out);
        assert!(!a.text().contains("rego"), "{}", a.text());
        assert!(!a.text().contains("internal hint"), "{}", a.text());
    }

    #[test]
    fn a_denial_says_what_and_why() {
        let out = Outcome::deny(
            Reason::NoCapability,
            "no capability of cell a/b names evil.test:443",
            Some("This cell may call: api.test:443".into()),
        );
        let a = of(None, &out);
        assert_eq!(a.status, 403);
        assert_eq!(a.body["error"], "cellgate_denied");
        assert_eq!(
            a.body["message"],
            "no capability of cell a/b names evil.test:443"
        );
        assert_eq!(a.body["hint"], "This cell may call: api.test:443");
        assert!(a.retry_after.is_none());
        let mut rated = Outcome::deny(Reason::CellRateLimited, "over", None);
        rated.retry_after = Some(std::time::Duration::from_millis(1200));
        let a = of(None, &rated);
        assert_eq!((a.status, a.retry_after), (429, Some(2)));
        assert!(a.headers("id").any(|(k, v)| k == "retry-after" && v == "2"));
    }
}
