//! Prometheus metrics of the node, served as text on the admin port's `/metrics`.
//!
//! Reason labels are the same short labels as in audit records, so a spike in a metric leads
//! straight to the matching records.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of `cellgate_decisions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// allow, deny, shadow_deny, error
    pub result: String,
    /// Short reason label.
    pub reason: String,
    /// Front door: intake, dns, ext_authz.
    pub front_door: String,
}

/// Labels of `cellgate_connections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// accepted, or the reason it was refused.
    pub outcome: String,
}

/// Labels of `cellgate_self_check_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SelfCheckLabels {
    /// The `Governed` condition's reason (`RulesMissing`, `TaggerNotListening`, ...).
    pub reason: String,
}

/// Labels of `cellgate_alerts_failed_total` and `cellgate_alerts_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    /// The sink's name in the alerts file.
    pub sink: String,
}

/// Labels of `cellgate_alerts_sent_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    /// The sink's name in the alerts file.
    pub sink: String,
    /// The alert's event (`denial_rate`, `budget_exhausted`, ...).
    pub event: String,
}

/// The alerter's counters ([`crate::alerts`]). Clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct AlertMetrics {
    /// Alerts a sink acknowledged (2xx), by sink and event.
    pub sent: Family<AlertLabels, Counter>,
    /// Alerts given up after their last attempt, by sink.
    pub failed: Family<SinkLabels, Counter>,
    /// Alerts dropped from a full sink queue, by sink.
    pub dropped: Family<SinkLabels, Counter>,
}

impl AlertMetrics {
    /// Creates the series of a sink at zero, so they are exported before anything happens.
    pub fn register_sink(&self, sink: &str, events: &[crate::alerts::Event]) {
        for e in events {
            let _ = self.sent.get_or_create(&AlertLabels {
                sink: sink.into(),
                event: e.as_str().into(),
            });
        }
        let labels = SinkLabels { sink: sink.into() };
        let _ = self.failed.get_or_create(&labels);
        let _ = self.dropped.get_or_create(&labels);
    }

    /// Counts an alert delivered.
    pub fn sent(&self, sink: &str, event: &str) {
        self.sent
            .get_or_create(&AlertLabels {
                sink: sink.into(),
                event: event.into(),
            })
            .inc();
    }

    /// Counts an alert given up.
    pub fn failed(&self, sink: &str) {
        self.failed
            .get_or_create(&SinkLabels { sink: sink.into() })
            .inc();
    }

    /// Counts an alert dropped from a full queue.
    pub fn dropped(&self, sink: &str) {
        self.dropped
            .get_or_create(&SinkLabels { sink: sink.into() })
            .inc();
    }
}

/// Upper bounds (µs) of `cellgate_ext_authz_check_duration_seconds`: fine below 100 µs, where
/// a Check should land, coarse above.
pub const EXT_AUTHZ_BUCKETS_US: &[f64] = &[
    5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0, 200.0, 300.0, 500.0,
    1000.0, 2500.0, 5000.0, 10_000.0, 50_000.0,
];

/// The node's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Decisions by result and reason.
    pub decisions: Family<DecisionLabels, Counter>,
    /// Decision latency (policy evaluation and the checks around it).
    pub decision_seconds: Histogram,
    /// ext_authz Check handling time, from the request's arrival at the handler to its response.
    pub ext_authz_check_seconds: Histogram,
    /// Open intake connections.
    pub open_connections: Gauge,
    /// Intake connections by outcome.
    pub connections: Family<ConnLabels, Counter>,
    /// Policy and cell files refused on reload.
    pub reload_failures: Family<ConnLabels, Counter>,
    /// The alerter's counters.
    pub alerts: AlertMetrics,
    /// Denials by host, for the few hosts first denied ([`DENIED_HOSTS_MAX`]).
    pub denied_hosts: Family<HostLabels, Counter>,
    denied_hosts_named: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Enforcement self-check probes run ([`crate::selfcheck`]).
    pub self_check_probes: Counter,
    /// Self-check probes that did not prove their cell governed, by the condition's reason.
    pub self_check_failures: Family<SelfCheckLabels, Counter>,
}

/// Values read at scrape time from other components' atomics.
pub trait Gauges: Send + Sync + std::fmt::Debug + 'static {
    /// (name, help, value, is_counter)
    fn read(&self) -> Vec<(&'static str, &'static str, u64, bool)>;

    /// Gauges with labels, read at scrape time: (name, help, series of (labels, value)). The
    /// label sets must be bounded by configuration (cells on the node, their budgets), never by
    /// what agents send.
    fn read_labeled(&self) -> Vec<LabeledGauge> {
        Vec::new()
    }

    /// Where the OTLP export of the audit log stands; `None` when no export is configured
    /// (the export metrics then read 0).
    fn export(&self) -> Option<cellgate_otel::ExportStatus> {
        None
    }
}

/// The export metrics: `cellgate_audit_export_records_total{result="exported"|"failed"}`,
/// `cellgate_audit_export_backlog_records`, `cellgate_audit_export_lag_seconds`,
/// `cellgate_audit_export_stalled`, `cellgate_audit_export_anchors_total`.
fn encode_export(
    status: Option<cellgate_otel::ExportStatus>,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let s = status.unwrap_or_default();
    let mut e = encoder.encode_descriptor(
        "cellgate_audit_export_records",
        "Audit records sent over OTLP, by result: exported (the collector accepted them) or failed (a request that failed; the records stay in the log and are sent again)",
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (result, v) in [("exported", s.exported), ("failed", s.failed)] {
        ConstCounter::new(v).encode(e.encode_family(&[("result", result)])?)?;
    }
    let backlog = ConstGauge::new(i64::try_from(s.backlog).unwrap_or(i64::MAX));
    let e = encoder.encode_descriptor(
        "cellgate_audit_export_backlog_records",
        "Audit records written but not yet exported",
        None,
        backlog.metric_type(),
    )?;
    backlog.encode(e)?;
    let lag = ConstGauge::new(s.lag_seconds);
    let e = encoder.encode_descriptor(
        "cellgate_audit_export_lag_seconds",
        "Age of the oldest audit record not yet exported (0 when caught up)",
        None,
        lag.metric_type(),
    )?;
    lag.encode(e)?;
    let stalled = ConstGauge::new(i64::from(s.stalled));
    let e = encoder.encode_descriptor(
        "cellgate_audit_export_stalled",
        "1 while the export makes no progress with records waiting (/readyz fails)",
        None,
        stalled.metric_type(),
    )?;
    stalled.encode(e)?;
    let anchors = ConstCounter::new(s.anchors);
    let e = encoder.encode_descriptor(
        "cellgate_audit_export_anchors",
        "Signed audit chain-head anchors the collector accepted",
        None,
        anchors.metric_type(),
    )?;
    anchors.encode(e)
}

/// One labeled gauge read at scrape time ([`Gauges::read_labeled`]).
#[derive(Debug)]
pub struct LabeledGauge {
    /// Metric name.
    pub name: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Each series: its labels and value.
    pub series: Vec<(Vec<(&'static str, String)>, i64)>,
}

/// Most hosts `cellgate_denials_by_host_total` names; denials of any other host count under
/// `host="other"`, so an agent spraying names cannot grow the series without bound.
pub const DENIED_HOSTS_MAX: usize = 100;

/// Labels of `cellgate_denials_by_host_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabels {
    /// The host of the denied request, or `other` past [`DENIED_HOSTS_MAX`] hosts.
    pub host: String,
}

#[derive(Debug)]
struct Scraped(Arc<dyn Gauges>);

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, value, is_counter) in self.0.read() {
            if is_counter {
                let c = ConstCounter::new(value);
                let e = encoder.encode_descriptor(name, help, None, c.metric_type())?;
                c.encode(e)?;
            } else {
                let g = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
                let e = encoder.encode_descriptor(name, help, None, g.metric_type())?;
                g.encode(e)?;
            }
        }
        encode_export(self.0.export(), &mut encoder)?;
        for g in self.0.read_labeled() {
            let mut e = encoder.encode_descriptor(
                g.name,
                g.help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (labels, value) in &g.series {
                ConstGauge::new(*value).encode(e.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

impl Metrics {
    /// Counts a refused reload: `what` is `cells` or `policy`.
    pub fn reload_refused(&self, what: &str) {
        self.reload_failures
            .get_or_create(&ConnLabels {
                outcome: what.into(),
            })
            .inc();
    }

    /// Registers everything; `scraped` supplies values owned elsewhere (cert cache, audit queue).
    pub fn new(scraped: Arc<dyn Gauges>) -> Self {
        let mut registry = Registry::default();
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "cellgate_decisions",
            "Decisions by result, reason and front door",
            decisions.clone(),
        );
        // 5 µs .. ~80 ms
        let decision_seconds = Histogram::new(exponential_buckets(0.000_005, 2.0, 15));
        registry.register(
            "cellgate_decision_duration_seconds",
            "Time to decide one request",
            decision_seconds.clone(),
        );
        let ext_authz_check_seconds =
            Histogram::new(EXT_AUTHZ_BUCKETS_US.iter().map(|us| us / 1e6));
        registry.register(
            "cellgate_ext_authz_check_duration_seconds",
            "Time to handle one ext_authz Check in the node: body decode, token, decision, \
             credential, audit submission and response (the gRPC round trip is not included)",
            ext_authz_check_seconds.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "cellgate_open_connections",
            "Open intake connections",
            open_connections.clone(),
        );
        let connections = Family::<ConnLabels, Counter>::default();
        registry.register(
            "cellgate_connections",
            "Intake connections by outcome",
            connections.clone(),
        );
        let reload_failures = Family::<ConnLabels, Counter>::default();
        registry.register(
            "cellgate_reload_failures",
            "Refused policy or cell reloads by kind",
            reload_failures.clone(),
        );
        let alerts = AlertMetrics::default();
        registry.register(
            "cellgate_alerts_sent",
            "Alerts a sink acknowledged, by sink and event",
            alerts.sent.clone(),
        );
        registry.register(
            "cellgate_alerts_failed",
            "Alerts given up after their last delivery attempt, by sink",
            alerts.failed.clone(),
        );
        registry.register(
            "cellgate_alerts_dropped",
            "Alerts dropped because the sink's queue was full (alerts are best effort), by sink",
            alerts.dropped.clone(),
        );
        let denied_hosts = Family::<HostLabels, Counter>::default();
        registry.register(
            "cellgate_denials_by_host",
            "Denied requests by host: the first 100 hosts denied since the node started by name, any other as host=\"other\"",
            denied_hosts.clone(),
        );
        let self_check_probes = Counter::default();
        registry.register(
            "cellgate_self_check_probes",
            "Enforcement self-check probes run (one per cell on this node per interval, plus a confirmation of each TaggerNotListening or NotReceivedByNode)",
            self_check_probes.clone(),
        );
        let self_check_failures = Family::<SelfCheckLabels, Counter>::default();
        registry.register(
            "cellgate_self_check_failures",
            "Enforcement self-check probes that did not prove their cell governed, by the Governed condition's reason (False: RulesMissing, TaggerNotListening, ...; Unknown: ProbeUnavailable, ...)",
            self_check_failures.clone(),
        );
        registry.register_collector(Box::new(Scraped(scraped)));
        Self {
            self_check_probes,
            self_check_failures,
            denied_hosts,
            denied_hosts_named: Default::default(),
            alerts,
            registry,
            decisions,
            decision_seconds,
            ext_authz_check_seconds,
            open_connections,
            connections,
            reload_failures,
        }
    }

    /// Counts a decision.
    pub fn decision(&self, result: &str, reason: &str, front_door: &str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                result: result.into(),
                reason: reason.into(),
                front_door: front_door.into(),
            })
            .inc();
    }

    /// Counts a denied request to `host` (by name for the first [`DENIED_HOSTS_MAX`] hosts,
    /// else as `other`).
    pub fn denied_host(&self, host: &str) {
        let named = {
            let mut named = self
                .denied_hosts_named
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            named.contains(host)
                || (named.len() < DENIED_HOSTS_MAX
                    && host.len() <= 253
                    && named.insert(host.into()))
        };
        self.denied_hosts
            .get_or_create(&HostLabels {
                host: if named { host.into() } else { "other".into() },
            })
            .inc();
    }

    /// Counts a self-check probe, and its reason when it did not prove the cell governed.
    pub fn self_check_probe(&self, reason: &str, governed: bool) {
        self.self_check_probes.inc();
        if !governed {
            self.self_check_failures
                .get_or_create(&SelfCheckLabels {
                    reason: reason.into(),
                })
                .inc();
        }
    }

    /// Counts a connection outcome.
    pub fn connection(&self, outcome: &str) {
        self.connections
            .get_or_create(&ConnLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
