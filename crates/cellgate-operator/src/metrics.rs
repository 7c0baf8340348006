//! Prometheus metrics of the controller, served on the admin listener's `/metrics`.
//!
//! - `cellgate_operator_reconciles_total{result="ok"|"error"}`
//! - `cellgate_operator_reconcile_errors_total{reason="<label>"}`: the same short label as the
//!   error's [`crate::reconcile::Error::label`] and the log line.
//! - `cellgate_operator_tokens_minted_total{reason="missing"|"near_expiry"|...}`
//! - `cellgate_operator_reconcile_duration_seconds` (histogram)
//! - `cellgate_operator_leader`: 1 while this replica holds the leader Lease and runs the
//!   controllers, 0 on a standby.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label set with a result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: String,
}

/// Label set with a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// A short stable label.
    pub reason: String,
}

/// The operator's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    reconciles: Family<ResultLabels, Counter>,
    errors: Family<ReasonLabels, Counter>,
    minted: Family<ReasonLabels, Counter>,
    duration: Histogram,
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cellgate_operator");
        let reconciles = Family::<ResultLabels, Counter>::default();
        let errors = Family::<ReasonLabels, Counter>::default();
        let minted = Family::<ReasonLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciles by result", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconcile errors by reason",
            errors.clone(),
        );
        registry.register("tokens_minted", "Tokens minted by reason", minted.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and runs the controllers",
            leader.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            reconciles,
            errors,
            minted,
            duration,
            leader,
        }
    }

    /// Counts a successful reconcile.
    pub fn reconciled(&self, seconds: f64) {
        self.reconciles
            .get_or_create(&ResultLabels {
                result: "ok".into(),
            })
            .inc();
        self.duration.observe(seconds);
    }

    /// Counts a failed reconcile, by the error's label.
    pub fn failed(&self, reason: &str) {
        self.reconciles
            .get_or_create(&ResultLabels {
                result: "error".into(),
            })
            .inc();
        self.errors
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts a minted token.
    pub fn minted(&self, reason: &str) {
        self.minted
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Records whether this replica leads.
    pub fn leading(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_result_and_reason() {
        let m = Metrics::new();
        m.reconciled(0.01);
        m.failed("kube_apply");
        m.failed("kube_apply");
        m.minted("missing");
        let text = m.encode();
        assert!(text.contains("cellgate_operator_leader 0"), "{text}");
        m.leading(true);
        assert!(m.encode().contains("cellgate_operator_leader 1"));
        assert!(
            text.contains("cellgate_operator_reconciles_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("cellgate_operator_reconciles_total{result=\"error\"} 2"));
        assert!(text.contains("cellgate_operator_reconcile_errors_total{reason=\"kube_apply\"} 2"));
        assert!(text.contains("cellgate_operator_tokens_minted_total{reason=\"missing\"} 1"));
    }
}
