//! The operator's own audit log: hash-chained like the nodes' (the `cellgate-audit` crate), one
//! record per control API call and per operator event, so that the same verifier
//! (`cellgate audit verify`) and the same exporters read it.
//!
//! Every record has `decision: control`. Control API calls have `front_door: control_api` and
//! are written durably before the answer leaves ([`OperatorAudit::api_call`]); a call that
//! cannot be recorded is refused (503). Operator events have `front_door: operator` and a
//! `reason` label: `token_minted`, `token_rotated`, `token_revoked`, `cell_phase`,
//! `lockdown_set`, `lockdown_lifted` ([`OperatorAudit::event`]). Events never stop a reconcile:
//! a record that cannot be queued is logged and counted (`audit_write` in
//! `cellgate_operator_reconcile_errors_total`), and the API refuses calls from then on.
//!
//! Metadata only: who (the TokenReview user name, never the token), what, which object, how it
//! ended. Never a token, a key or a Secret's content.

use std::path::Path;
use std::sync::Arc;

use cellgate_audit::{AuditError, AuditLog, AuditOptions, Decision, Record, WriterHandle};

use crate::metrics::Metrics;

/// The `node` field of the operator's records.
pub const OPERATOR_NODE: &str = "cellgate-operator";
/// `front_door` of control API calls.
pub const FRONT_DOOR_API: &str = "control_api";
/// `front_door` of the operator's own events.
pub const FRONT_DOOR_OPERATOR: &str = "operator";

/// Handle to the operator's audit log. Cheap to clone.
#[derive(Debug, Clone)]
pub struct OperatorAudit {
    log: AuditLog,
    metrics: Option<Arc<Metrics>>,
}

/// One operator event, before it becomes a record.
#[derive(Debug, Clone, Default)]
pub struct Event {
    /// The cell's namespace (or the lockdown's).
    pub namespace: Option<String>,
    /// The cell's name.
    pub cell: Option<String>,
    /// The token id (`jti`), never the token.
    pub token_id: Option<String>,
    /// Detail, most specific last.
    pub reasons: Vec<String>,
}

impl OperatorAudit {
    /// Opens (or resumes, after verifying it) the log at `path`, creating its directory.
    ///
    /// # Errors
    /// [`AuditError`] when the directory or file cannot be used or the existing chain is broken.
    pub async fn open(path: &Path) -> Result<(Self, WriterHandle), AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| AuditError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let (log, writer) = AuditLog::open(path, AuditOptions::default()).await?;
        Ok((Self { log, metrics: None }, writer))
    }

    /// Wraps an open log (tests).
    pub fn from_log(log: AuditLog) -> Self {
        Self { log, metrics: None }
    }

    /// Counts event records that could not be queued in these metrics.
    #[must_use]
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The underlying log (for flushing and closing).
    pub fn log(&self) -> &AuditLog {
        &self.log
    }

    /// `Err(reason)` once the writer has failed: the control API refuses calls then.
    ///
    /// # Errors
    /// The writer's failure.
    pub fn healthy(&self) -> Result<(), String> {
        match self.log.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Writes one control API call's record and resolves once it is on disk.
    ///
    /// # Errors
    /// [`AuditError`] when the record cannot be made durable: the caller answers 503.
    pub async fn api_call(&self, rec: Record) -> Result<(), AuditError> {
        self.log.submit_durable(rec).await
    }

    /// A new control API record (`front_door: control_api`, `protocol: https`).
    pub fn api_record(reason: &str) -> Record {
        Record::new(
            OPERATOR_NODE,
            FRONT_DOOR_API,
            "https",
            Decision::Control,
            reason,
        )
    }

    /// Queues one operator event without waiting. A refusal is logged and counted, never
    /// silent; it does not stop the caller.
    pub fn event(&self, reason: &'static str, event: Event) {
        let mut rec = Record::new(
            OPERATOR_NODE,
            FRONT_DOOR_OPERATOR,
            "control",
            Decision::Control,
            reason,
        );
        rec.namespace = event.namespace;
        rec.cell = event.cell;
        rec.token_id = event.token_id;
        rec.reasons = event.reasons;
        if let Err(e) = self.log.submit(rec) {
            tracing::error!(reason, error = %e, "operator audit record not written");
            if let Some(m) = &self.metrics {
                m.failed("audit_write");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_and_calls_chain_in_one_verifiable_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/audit.jsonl");
        let (audit, writer) = OperatorAudit::open(&path).await.expect("open");
        audit.event(
            "token_minted",
            Event {
                namespace: Some("agents".into()),
                cell: Some("triage".into()),
                token_id: Some("jti-1".into()),
                reasons: vec!["missing".into()],
            },
        );
        let mut rec = OperatorAudit::api_record("ok");
        rec.method = Some("GET".into());
        rec.path = Some("/api/v1/cells".into());
        audit.api_call(rec).await.expect("durable");
        audit.healthy().expect("healthy");
        audit.log().clone().close().await.expect("close");
        writer.await.expect("writer").expect("clean");
        let report = cellgate_audit::verify_path(&path).expect("intact");
        assert_eq!(report.records, 2);
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines[0]["front_door"], "operator");
        assert_eq!(lines[0]["reason"], "token_minted");
        assert_eq!(lines[0]["decision"], "control");
        assert_eq!(lines[0]["token_id"], "jti-1");
        assert_eq!(lines[1]["front_door"], "control_api");
        assert_eq!(lines[1]["node"], "cellgate-operator");
    }
}
