//! Approvals held for a human: the pending requests of capabilities with
//! `approval: {required: true}`, the decisions taken on them, and the grants they leave for
//! `mode: retry`.
//!
//! Nothing here is persisted, on purpose: a request held when the node stops is refused (its
//! connection is gone), and a retry approval does not outlive the node that granted it. A
//! request is identified by cell, capability, method, host, canonical path and the SHA-256 of
//! its body, so an approval never covers a different request.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::watch;

/// Most pending approvals on the node; more are refused (`approval_unavailable`).
pub const MAX_PENDING: usize = 1024;
/// Most live grants (retry mode) on the node; the oldest go first.
pub const MAX_GRANTS: usize = 4096;
/// Longest validity of an approval, seconds.
pub const MAX_VALIDITY_SECS: u64 = 24 * 3600;
/// Most uses of one approval.
pub const MAX_USES: u32 = 1000;

/// What an approval is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ApprovalKey {
    /// The cell's uid.
    pub cell_uid: String,
    /// The capability.
    pub capability: String,
    /// HTTP method.
    pub method: String,
    /// Host.
    pub host: String,
    /// Canonical path (and query).
    pub path: String,
    /// SHA-256 of the body, hex.
    pub body_digest: String,
}

/// A decision on a pending approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Approved by `by`.
    Approved {
        /// Who.
        by: String,
    },
    /// Denied by `by`, for `reason`.
    Denied {
        /// Who.
        by: String,
        /// Why.
        reason: String,
    },
    /// No decision can be taken (the node is stopping).
    Withdrawn {
        /// Why.
        reason: String,
    },
}

/// A pending approval, as operators list it.
#[derive(Debug, Clone, Serialize)]
pub struct PendingView {
    /// The approval id.
    pub id: String,
    /// `namespace/name` of the cell.
    pub cell: String,
    /// What it is for.
    #[serde(flatten)]
    pub key: ApprovalKey,
    /// `hold` or `retry`.
    pub mode: &'static str,
    /// RFC 3339.
    pub requested_at: String,
    /// RFC 3339: held requests are refused, retry requests forgotten, then.
    pub expires_at: String,
    /// The request id of the request that asked.
    pub request_id: String,
}

#[derive(Debug)]
struct Pending {
    view: PendingView,
    expires_ms: i64,
    verdict: watch::Sender<Option<Verdict>>,
}

#[derive(Debug, Clone)]
struct Grant {
    key: ApprovalKey,
    until_ms: i64,
    uses_left: u32,
}

/// Why a decision was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApprovalError {
    /// No pending approval has that id (decided, expired, or never asked).
    #[error("no pending approval {0} (decided already, expired, or unknown)")]
    Unknown(String),
    /// Too many pending.
    #[error("{MAX_PENDING} approvals are pending on this node already")]
    Full,
}

#[derive(Debug, Default)]
struct Book {
    pending: BTreeMap<String, Pending>,
    grants: Vec<Grant>,
}

/// The node's approvals.
#[derive(Debug, Default)]
pub struct Approvals {
    book: Mutex<Book>,
}

/// A new pending approval, or the one already open for the same request.
#[derive(Debug)]
pub struct Asked {
    /// Its id.
    pub id: String,
    /// Whether it was created by this call (then it is audited as requested).
    pub new: bool,
    /// Resolves with the decision.
    pub verdict: watch::Receiver<Option<Verdict>>,
}

impl Approvals {
    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Uses one use of a live grant for `key` (retry mode); `true` when there was one.
    pub fn take_grant(&self, key: &ApprovalKey, now_ms: i64) -> bool {
        let mut b = self.lock();
        b.grants.retain(|g| g.until_ms > now_ms && g.uses_left > 0);
        if let Some(g) = b.grants.iter_mut().find(|g| &g.key == key) {
            g.uses_left -= 1;
            return true;
        }
        false
    }

    /// Opens an approval for `key` (or joins the one already pending for it, in retry mode).
    ///
    /// # Errors
    /// When [`MAX_PENDING`] are pending.
    #[allow(clippy::too_many_arguments)]
    pub fn ask(
        &self,
        key: ApprovalKey,
        cell: String,
        retry: bool,
        timeout_secs: u64,
        request_id: &str,
        now_ms: i64,
    ) -> Result<Asked, ApprovalError> {
        let mut b = self.lock();
        b.pending.retain(|_, p| p.expires_ms > now_ms);
        if retry {
            if let Some((id, p)) = b.pending.iter().find(|(_, p)| p.view.key == key) {
                return Ok(Asked {
                    id: id.clone(),
                    new: false,
                    verdict: p.verdict.subscribe(),
                });
            }
        }
        if b.pending.len() >= MAX_PENDING {
            return Err(ApprovalError::Full);
        }
        let id = format!("ap-{}", &crate::decide::new_request_id()[..12]);
        let expires_ms = now_ms
            .saturating_add(i64::try_from(timeout_secs.saturating_mul(1000)).unwrap_or(i64::MAX));
        let (tx, rx) = watch::channel(None);
        b.pending.insert(
            id.clone(),
            Pending {
                view: PendingView {
                    id: id.clone(),
                    cell,
                    key,
                    mode: if retry { "retry" } else { "hold" },
                    requested_at: crate::budget::rfc3339_ms(now_ms),
                    expires_at: crate::budget::rfc3339_ms(expires_ms),
                    request_id: request_id.to_string(),
                },
                expires_ms,
                verdict: tx,
            },
        );
        Ok(Asked {
            id,
            new: true,
            verdict: rx,
        })
    }

    /// The pending approval `id`, if it is pending.
    pub fn view(&self, id: &str, now_ms: i64) -> Option<PendingView> {
        let b = self.lock();
        b.pending
            .get(id)
            .filter(|p| p.expires_ms > now_ms)
            .map(|p| p.view.clone())
    }

    /// Forgets a pending approval whose held request gave up (timeout, client gone).
    pub fn withdraw(&self, id: &str) -> Option<PendingView> {
        self.lock().pending.remove(id).map(|p| p.view)
    }

    /// Decides a pending approval. An approval of a retry request leaves a grant valid for
    /// `valid_secs` and `uses` uses; a held request goes on at once.
    ///
    /// # Errors
    /// When no approval with that id is pending.
    pub fn decide(
        &self,
        id: &str,
        verdict: Verdict,
        valid_secs: u64,
        uses: u32,
        now_ms: i64,
    ) -> Result<PendingView, ApprovalError> {
        let mut b = self.lock();
        b.pending.retain(|_, p| p.expires_ms > now_ms);
        let p = b
            .pending
            .remove(id)
            .ok_or_else(|| ApprovalError::Unknown(id.to_string()))?;
        if matches!(verdict, Verdict::Approved { .. }) && p.view.mode == "retry" {
            if b.grants.len() >= MAX_GRANTS {
                b.grants.remove(0);
            }
            let valid_ms = i64::try_from(valid_secs.min(MAX_VALIDITY_SECS) * 1000).unwrap_or(0);
            b.grants.push(Grant {
                key: p.view.key.clone(),
                until_ms: now_ms.saturating_add(valid_ms),
                uses_left: uses.clamp(1, MAX_USES),
            });
        }
        let _ = p.verdict.send(Some(verdict));
        Ok(p.view)
    }

    /// What is pending (expired entries dropped).
    pub fn list(&self, now_ms: i64) -> Vec<PendingView> {
        let mut b = self.lock();
        b.pending.retain(|_, p| p.expires_ms > now_ms);
        b.pending.values().map(|p| p.view.clone()).collect()
    }

    /// Denies everything pending: the node is stopping and no decision can reach its request.
    pub fn deny_all(&self, reason: &str) -> usize {
        let mut b = self.lock();
        let n = b.pending.len();
        for (_, p) in std::mem::take(&mut b.pending) {
            let _ = p.verdict.send(Some(Verdict::Withdrawn {
                reason: reason.into(),
            }));
        }
        n
    }
}

/// Audits a human's decision on a pending approval (`approval_granted` / `approval_rejected`,
/// decision `approval`), naming the approver and the validity or the reason.
pub async fn record_decision(
    shared: &crate::Shared,
    view: &PendingView,
    front_door: &str,
    approved: bool,
    by: &str,
    detail: String,
) {
    let mut rec = cellgate_audit::Record::new(
        &shared.config.node_name,
        front_door,
        "http",
        cellgate_audit::Decision::Approval,
        if approved {
            "approval_granted"
        } else {
            "approval_rejected"
        },
    );
    let (ns, name) = view.cell.split_once('/').unwrap_or(("", &view.cell));
    rec.namespace = Some(ns.to_string());
    rec.cell = Some(name.to_string());
    rec.capability = Some(view.key.capability.clone());
    rec.method = Some(view.key.method.clone());
    rec.host = Some(view.key.host.clone());
    rec.path = Some(view.key.path.clone());
    rec.request_id = Some(view.request_id.clone());
    rec.reasons = vec![
        format!("approval_id={}", view.id),
        format!("by {by}"),
        detail,
    ];
    if let Err(e) = crate::decide::record(shared, rec).await {
        tracing::error!(error = %e, "approval decision record not written");
    }
    tracing::info!(approval = %view.id, approved, by = %by, "approval decided");
}

/// SHA-256 of a body, hex.
pub fn body_digest(body: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(path: &str) -> ApprovalKey {
        ApprovalKey {
            cell_uid: "c".into(),
            capability: "deploy".into(),
            method: "POST".into(),
            host: "api.test".into(),
            path: path.into(),
            body_digest: body_digest(b"{}"),
        }
    }

    #[test]
    fn retry_grants_cover_the_same_request_for_their_uses_and_validity() {
        let a = Approvals::default();
        let first = a.ask(key("/x"), "ns/c".into(), true, 60, "r1", 0).unwrap();
        assert!(first.new);
        // The same request again joins the pending approval; another opens its own.
        let again = a.ask(key("/x"), "ns/c".into(), true, 60, "r2", 10).unwrap();
        assert_eq!((again.id.as_str(), again.new), (first.id.as_str(), false));
        let other = a.ask(key("/y"), "ns/c".into(), true, 60, "r3", 10).unwrap();
        assert_ne!(other.id, first.id);
        assert!(!a.take_grant(&key("/x"), 20));
        a.decide(
            &first.id,
            Verdict::Approved { by: "ops".into() },
            600,
            2,
            20,
        )
        .unwrap();
        assert_eq!(
            *first.verdict.borrow(),
            Some(Verdict::Approved { by: "ops".into() })
        );
        assert!(a.take_grant(&key("/x"), 30));
        assert!(a.take_grant(&key("/x"), 40));
        assert!(!a.take_grant(&key("/x"), 50), "two uses only");
        assert!(
            !a.take_grant(&key("/y"), 50),
            "another request is not covered"
        );
        // Validity.
        let again = a
            .ask(key("/x"), "ns/c".into(), true, 60, "r4", 100)
            .unwrap();
        a.decide(&again.id, Verdict::Approved { by: "ops".into() }, 1, 5, 100)
            .unwrap();
        assert!(a.take_grant(&key("/x"), 1_099));
        assert!(!a.take_grant(&key("/x"), 1_100));
        // Decided once.
        assert_eq!(
            a.decide(&again.id, Verdict::Approved { by: "x".into() }, 1, 1, 200)
                .unwrap_err(),
            ApprovalError::Unknown(again.id.clone())
        );
    }

    #[test]
    fn expired_and_withdrawn_approvals_cannot_be_decided() {
        let a = Approvals::default();
        let p = a.ask(key("/x"), "ns/c".into(), false, 1, "r", 0).unwrap();
        assert_eq!(a.list(999).len(), 1);
        assert!(a.list(1_000).is_empty());
        assert!(a
            .decide(&p.id, Verdict::Approved { by: "x".into() }, 1, 1, 1_000)
            .is_err());
        let p = a.ask(key("/x"), "ns/c".into(), false, 60, "r", 0).unwrap();
        assert!(a.withdraw(&p.id).is_some());
        assert!(a
            .decide(&p.id, Verdict::Approved { by: "x".into() }, 1, 1, 1)
            .is_err());
        // A hold approval leaves no grant.
        let p = a.ask(key("/z"), "ns/c".into(), false, 60, "r", 0).unwrap();
        a.decide(&p.id, Verdict::Approved { by: "x".into() }, 60, 1, 1)
            .unwrap();
        assert!(!a.take_grant(&key("/z"), 2));
        let p = a.ask(key("/z"), "ns/c".into(), false, 60, "r", 0).unwrap();
        assert_eq!(a.deny_all("stopping"), 1);
        assert!(matches!(
            *p.verdict.borrow(),
            Some(Verdict::Withdrawn { .. })
        ));
    }
}
