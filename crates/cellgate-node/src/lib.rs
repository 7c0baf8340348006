//! `cellgate-node`: the per-node proxy every cell's traffic crosses.
//!
//! Start reading at [`run`]: it loads keys, cells, policy and the CA, opens the audit log, binds
//! the intake and admin listeners and returns a [`NodeHandle`] with their addresses. The data
//! path of one connection is in [`intake`] (PPv2, token, protocol detection), [`http`] (per-request
//! decisions and forwarding) and [`tunnel`] (opaque byte relays); [`decide`] is the one pipeline
//! a decision and its audit record go through, for both front doors, with its reasons in
//! [`reason`] and its one mapping to the wire in [`answer`]. In Kubernetes mode (`--kubernetes`) cells, pod
//! addresses and revocations come from the API server through [`kubernetes`] instead of files.
//!
//! | listener | default | runtime |
//! |---|---|---|
//! | intake (PPv2 required) | `0.0.0.0:15001` | data path |
//! | admin (`/healthz`, `/readyz`, `/metrics`, `/audit`, `/lockdown`) | `127.0.0.1:15021` | admin thread |
//! | Envoy ext_authz and ext_proc gRPC ([`ext_authz`], [`ext_proc`]), TCP or Unix socket | off (`--ext-authz`) | data path |
//!
//! Every `--self-check-interval` the node proves each cell on it governed ([`selfcheck`]): a
//! probe from inside the pod's network namespace to a must-deny destination the intake reserves.

pub mod admin;
pub mod alerts;
pub mod answer;
pub mod approvals;
pub mod budget;
pub mod ca_reload;
pub mod cells;
pub mod config;
pub mod credentials;
pub mod decide;
pub mod detect;
pub mod dns;
pub mod ext_authz;
pub mod ext_proc;
pub mod http;
pub mod inspect;
pub mod intake;
pub mod kubernetes;
pub mod limits;
pub mod lockdown;
pub mod mcp;
pub mod memory;
pub mod metrics;
pub mod policy_source;
pub mod reason;
pub mod recorded;
pub mod scrub;
pub mod selfcheck;
pub mod tunnel;
pub mod upstream;
pub mod usage;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use cellgate_audit::AuditLog;
use cellgate_identity::{PublicKey, Verifier};
use cellgate_policy::PolicyStore;
use cellgate_tls::mint::LeafMinter;
use tokio::sync::watch;

/// Leaf certificates cached for names no capability of the cell names: enough for an agent's
/// few mistakes, too few for names sprayed by one to crowd out anything (they have a cache of
/// their own).
const UNNAMED_LEAVES: usize = 256;

pub use config::{NodeArgs, NodeConfig};

/// State shared by every connection of the node.
#[derive(Debug)]
pub struct Shared {
    /// Resolved configuration.
    pub config: NodeConfig,
    /// Cells by uid.
    pub cells: cells::CellStore,
    /// Token verifier.
    pub verifier: Verifier,
    /// Policy.
    pub policy: Arc<PolicyStore>,
    /// Where the policy comes from, and why the last change was refused.
    pub policy_source: policy_source::PolicySource,
    /// Leaf certificates for names a capability of the cell names.
    pub minter: Arc<LeafMinter>,
    /// Leaf certificates for names no capability names (the agent still gets its 403 over
    /// TLS): a small cache of its own, so such names never evict the others.
    pub minter_unnamed: Arc<LeafMinter>,
    /// The CA introduced by a rotation, and what the CA and trust files last held
    /// ([`ca_reload`]).
    pub ca: ca_reload::NodeCas,
    /// Per-cell connection and request-rate ceilings.
    pub limits: Arc<limits::CellLimiter>,
    /// Upstream HTTP client.
    pub upstream: upstream::Upstream,
    /// Credentials injected at the boundary.
    pub credentials: credentials::Broker,
    /// The budget ledger (in the state directory).
    pub ledger: Arc<budget::Ledger>,
    /// LLM prices, for spend budgets.
    pub prices: usage::PriceTable,
    /// The kill switch (in the state directory).
    pub lockdown: lockdown::Lockdown,
    /// Requests held for, or answered with, a human's approval.
    pub approvals: approvals::Approvals,
    /// Requests ext_authz allowed, until their responses start ([`ext_proc`]).
    pub guards: ext_proc::Guards,
    /// Audit log.
    pub audit: AuditLog,
    /// Signs anchors of the audit chain head (`--audit-anchor-key`); exporters send what
    /// [`cellgate_audit::Anchorer::subscribe`] yields.
    pub anchorer: Option<Arc<cellgate_audit::Anchorer>>,
    /// Metrics.
    pub metrics: metrics::Metrics,
    /// Bumped on every change of cells, policy or revocations; open tunnels re-check on it.
    pub generation: watch::Sender<u64>,
    /// Connection limit.
    pub conn_limit: Arc<tokio::sync::Semaphore>,
    /// Set when a drain starts.
    pub draining: watch::Sender<bool>,
    /// Pod addresses to cell uids: for DNS (which has no token), and in Kubernetes mode, where
    /// only the pod watch fills it, for the source check of every connection.
    pub pods: std::sync::RwLock<std::collections::HashMap<std::net::IpAddr, String>>,
    /// The DNS resolver's handler, when `--dns` is set.
    pub dns: std::sync::OnceLock<Arc<cellgate_dns::DnsHandler>>,
    /// The API server watches, in Kubernetes mode.
    pub kube: std::sync::OnceLock<Arc<kubernetes::KubeState>>,
    /// Webhook alerts (`--alerts`); off without a file. Other parts of the node report events
    /// that are not audit records through it (`alerts.audit_backlog(..)`).
    pub alerts: alerts::Alerts,
    /// OTLP export of the audit log (`--otlp-endpoint` / `OTEL_EXPORTER_OTLP_ENDPOINT`); past
    /// its backlog bound new requests are refused (`audit_backlog`).
    pub export: Option<cellgate_otel::AuditExporter>,
    /// Spans of forwarded requests, when a traces endpoint is configured.
    pub tracer: Option<cellgate_otel::RequestTracer>,
    /// The enforcement self-check: probes in flight (the intake reports them) and each cell's
    /// last verdict.
    pub self_check: selfcheck::SelfCheck,
}

impl Shared {
    /// The node's default per-cell ceilings.
    pub fn ceilings(&self) -> limits::Ceilings {
        limits::Ceilings {
            connections: self.config.cell_max_connections,
            requests_per_second: self.config.cell_requests_per_second,
        }
    }

    /// Takes one request from the cell's rate; a refusal (`cell_rate_limited`) when over it.
    pub fn take_request(&self, ident: &decide::ConnIdentity) -> Result<(), Box<decide::Outcome>> {
        let Some(entry) = self.cells.get(&ident.claims.cell_uid) else {
            return Ok(()); // the decision refuses an unknown cell itself
        };
        let rate = limits::Ceilings::of(&entry.cell, self.ceilings()).requests_per_second;
        self.limits
            .request(&ident.claims.cell_uid, rate)
            .map_err(|wait| {
                let mut o = decide::Outcome::deny(
                    decide::Reason::CellRateLimited,
                    format!(
                        "cell {} is over its {rate} requests per second",
                        entry.cell.key()
                    ),
                    Some("slow down; retry after the time in Retry-After".into()),
                );
                o.retry_after = Some(wait);
                o.cell = Some(entry);
                Box::new(o)
            })
    }

    /// Signals that cells, policy or revocations changed.
    pub fn bump_generation(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }
}

/// A running node.
#[derive(Debug)]
pub struct NodeHandle {
    /// Bound intake address.
    pub intake_addr: SocketAddr,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    /// Bound DNS address (UDP and TCP), when `--dns` is set.
    pub dns_addr: Option<SocketAddr>,
    /// Bound Envoy ext_authz address, when `--ext-authz` is set.
    pub ext_authz_addr: Option<config::ListenAddr>,
    /// Shared state (tests inspect it).
    pub shared: Arc<Shared>,
    tasks: tokio::task::JoinSet<()>,
    dns: Option<cellgate_dns::DnsServer>,
}

impl NodeHandle {
    /// Starts a drain: accept loops stop, open connections get the grace period, then close.
    pub async fn shutdown(mut self) {
        self.shared.draining.send_replace(true);
        // No decision can reach a held request any more: refuse them now (each is audited).
        let held = self
            .shared
            .approvals
            .deny_all("the node is shutting down; no decision can reach the request");
        if held > 0 {
            tracing::warn!(held, "requests waiting for approval refused at shutdown");
        }
        let grace = self.shared.config.drain;
        let open =
            || self.shared.config.max_connections - self.shared.conn_limit.available_permits();
        tracing::info!(open = open(), grace_s = grace.as_secs(), "draining");
        let deadline = tokio::time::Instant::now() + grace;
        while open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if open() > 0 {
            tracing::warn!(
                open = open(),
                "grace period over; closing the remaining connections"
            );
        } else {
            tracing::info!("drained: no open connections");
        }
        self.tasks.abort_all();
        if let Some(dns) = self.dns.take() {
            dns.shutdown().await;
        }
        // Dynamic secrets die with the node rather than live out their lease unused.
        let (revoked, failed) = self
            .shared
            .credentials
            .revoke_all(self.shared.config.credentials.timeout)
            .await;
        if revoked + failed > 0 {
            tracing::info!(revoked, failed, "vault leases revoked at shutdown");
        }
        if let Err(e) = self.shared.ledger.persist_exact().await {
            tracing::error!(error = %e, "budget ledger not written at shutdown");
        }
        let _ = self.shared.audit.flush().await;
        // The final head, after the final flush: anything cut after this is detectable.
        if let Some(anchorer) = &self.shared.anchorer {
            match anchorer.finish().await {
                Ok(Some(a)) => tracing::info!(seq = a.seq, "audit head anchored at shutdown"),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "audit head not anchored at shutdown"),
            }
        }
        // One last attempt to send what is durable (the final anchor included); what is left
        // stays in the log and goes out at the next start.
        if let Some(export) = &self.shared.export {
            export.shutdown(EXPORT_SHUTDOWN).await;
        }
        if let Some(tracer) = &self.shared.tracer {
            tracer.shutdown();
        }
    }
}

/// How long the OTLP export may try to send its backlog at shutdown.
const EXPORT_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(5);

struct ScrapedValues {
    minter: Arc<LeafMinter>,
    audit: AuditLog,
    cells: std::sync::Weak<Shared>,
}

impl std::fmt::Debug for ScrapedValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScrapedValues")
    }
}

impl metrics::Gauges for ScrapedValues {
    fn export(&self) -> Option<cellgate_otel::ExportStatus> {
        self.cells
            .upgrade()
            .and_then(|s| s.export.as_ref().map(cellgate_otel::AuditExporter::status))
    }

    fn read(&self) -> Vec<(&'static str, &'static str, u64, bool)> {
        let stats = self.audit.stats();
        let mut v = vec![
            (
                "cellgate_cert_cache_hits",
                "Leaf certificate cache hits",
                self.minter.hits(),
                true,
            ),
            (
                "cellgate_cert_cache_misses",
                "Leaf certificate cache misses",
                self.minter.misses(),
                true,
            ),
            (
                "cellgate_cert_mints",
                "Leaf certificates minted",
                self.minter.mints(),
                true,
            ),
            (
                "cellgate_audit_records_written",
                "Audit records written",
                stats.written,
                true,
            ),
            (
                "cellgate_audit_overflows",
                "Audit submissions refused because the queue was full",
                stats.overflows,
                true,
            ),
        ];
        if let Some(s) = self.cells.upgrade() {
            v.push((
                "cellgate_cells",
                "Cells known to this node",
                s.cells.len() as u64,
                false,
            ));
            let (lock, cluster) = (s.lockdown.state(), s.lockdown.cluster_state());
            v.push((
                "cellgate_lockdowns",
                "Lockdowns in force, the node's and the cluster's: 1 for each node- or cluster-wide one, 1 per locked namespace",
                u64::from(lock.all.is_some())
                    + lock.namespaces.len() as u64
                    + u64::from(cluster.all.is_some())
                    + cluster.namespaces.len() as u64,
                false,
            ));
            v.push((
                "cellgate_approvals_pending",
                "Requests waiting for a human's approval on this node",
                s.approvals.list(decide::now_ms()).len() as u64,
                false,
            ));
            if let Some(a) = &s.anchorer {
                v.push((
                    "cellgate_audit_anchor_failures",
                    "Anchors of the audit chain head that could not be written",
                    a.failures(),
                    true,
                ));
            }
            if let Some(d) = s.dns.get() {
                let c = d.stats().snapshot();
                v.push((
                    "cellgate_dns_queries",
                    "DNS queries from cells",
                    c.queries,
                    true,
                ));
                v.push((
                    "cellgate_dns_nxdomain",
                    "DNS queries answered NXDOMAIN",
                    c.nxdomain,
                    true,
                ));
                v.push((
                    "cellgate_dns_refused",
                    "DNS queries refused",
                    c.refused,
                    true,
                ));
                v.push((
                    "cellgate_dns_servfail",
                    "DNS queries answered SERVFAIL",
                    c.servfail,
                    true,
                ));
            }
        }
        v
    }

    fn read_labeled(&self) -> Vec<metrics::LabeledGauge> {
        let Some(s) = self.cells.upgrade() else {
            return Vec::new();
        };
        // One series per counter of each budget of each cell on the node: bounded by the
        // AgentCells, not by traffic.
        let mut series = Vec::new();
        for entry in s.cells.snapshot().values() {
            let cell = &entry.cell;
            for u in s.ledger.usage_of(&cell.uid) {
                for (counter, value) in [
                    ("requests", u.requests),
                    ("window_requests", u.window_requests),
                    ("tokens", u.tokens),
                    ("spend_micros", u.spend_micros),
                ] {
                    series.push((
                        vec![
                            ("namespace", cell.namespace.clone()),
                            ("cell", cell.name.clone()),
                            ("scope", u.scope.clone()),
                            ("counter", counter.to_string()),
                        ],
                        i64::try_from(value).unwrap_or(i64::MAX),
                    ));
                }
            }
        }
        vec![
            metrics::LabeledGauge {
                name: "cellgate_budget_used",
                help: "Budget counters of the cells on this node (scope: cell or a capability; counter: requests over the cell's life, window_requests in the current window, LLM tokens, spend_micros in millionths of a USD)",
                series,
            },
            s.self_check.gauge(),
        ]
    }
}

fn load_trust(paths: &[PathBuf]) -> anyhow::Result<Vec<PublicKey>> {
    let mut keys = Vec::new();
    for p in paths {
        keys.extend(PublicKey::load_all(p)?);
    }
    Ok(keys)
}

/// Starts the node: binds every listener and returns their addresses. In Kubernetes mode the
/// API client comes from the in-cluster configuration or `KUBECONFIG`.
///
/// # Errors
/// Anything that keeps the node from starting safely: unreadable keys or CA, an audit log that
/// does not verify, a listener that cannot bind, no Kubernetes client configuration with
/// `--kubernetes`. A policy that does not load is *not* an error: the node starts, denies
/// everything, and `/readyz` says why.
pub async fn run(config: NodeConfig) -> anyhow::Result<NodeHandle> {
    run_with(config, None).await
}

/// [`run`] with a given Kubernetes client (tests pass kube's mocked service). The client is used
/// only when `config.kubernetes` is set; without one, it is inferred as [`run`] does.
///
/// # Errors
/// As [`run`].
pub async fn run_with(
    config: NodeConfig,
    kube_client: Option<kube::Client>,
) -> anyhow::Result<NodeHandle> {
    // A bad alerts file stops the node before anything is opened.
    let alerts_config = match &config.alerts {
        Some(p) => Some(alerts::AlertsConfig::load(p).context("--alerts")?),
        None => None,
    };
    let kube_client = match (config.kubernetes, kube_client) {
        (false, _) => None,
        (true, Some(c)) => Some(c),
        (true, None) => Some(kube::Client::try_default().await.context(
            "--kubernetes: no Kubernetes client configuration (in-cluster service account or KUBECONFIG)",
        )?),
    };
    // The admin port first: when it is taken (and the caller allows), any free port, decided
    // before anything else is opened.
    let admin_listener = match std::net::TcpListener::bind(config.admin) {
        Ok(l) => l,
        Err(e) if config.admin_any_port_if_taken && e.kind() == std::io::ErrorKind::AddrInUse => {
            std::net::TcpListener::bind(SocketAddr::new(config.admin.ip(), 0))
                .with_context(|| format!("binding the admin endpoint on {}", config.admin.ip()))?
        }
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context(format!("binding the admin endpoint on {}", config.admin)))
        }
    };
    let verifier = Verifier::new(&load_trust(&config.trust)?);
    let cas = match &config.ca_dir {
        Some(dir) => cellgate_tls::rotation::CaSet::load(dir)
            .with_context(|| format!("loading the CA from {}", dir.display()))?,
        None => cellgate_tls::rotation::CaSet {
            signing: Arc::new(
                cellgate_tls::ca::Ca::generate("Cellgate ephemeral CA")
                    .context("generating an in-memory CA")?,
            ),
            next: None,
        },
    };
    let ca = cas.signing.clone();
    let minter = Arc::new(LeafMinter::new(
        ca.clone(),
        cellgate_tls::mint::MinterConfig::default(),
    ));
    let minter_unnamed = Arc::new(LeafMinter::new(
        ca,
        cellgate_tls::mint::MinterConfig {
            capacity: std::num::NonZeroUsize::new(UNNAMED_LEAVES)
                .unwrap_or(std::num::NonZeroUsize::MIN),
            ..Default::default()
        },
    ));
    let (audit, _writer) = AuditLog::open(&config.audit, Default::default())
        .await
        .with_context(|| format!("opening the audit log {}", config.audit.display()))?;
    let anchorer = start_anchorer(&config, &audit).await?;
    let (export, tracer) = match &config.otlp {
        Some(otlp) => (
            Some(
                cellgate_otel::AuditExporter::start(
                    otlp,
                    &config.audit,
                    audit.clone(),
                    &config.node_name,
                    anchorer.as_ref().map(|a| a.subscribe()),
                )
                .context("starting the OTLP export")?,
            ),
            cellgate_otel::RequestTracer::start(otlp, &config.node_name)
                .context("starting the OTLP span export")?,
        ),
        None => (None, None),
    };
    let policy = Arc::new(PolicyStore::default());
    let policy_source = policy_source::PolicySource::new(
        config.base_policy_dir.clone(),
        config.policies_dir.iter().cloned().collect(),
    );
    policy_source.poll(&policy);
    let upstream = upstream::Upstream::new(&config)?;
    let state_dir = config.state_dir();
    let ledger = Arc::new(budget::Ledger::open(&state_dir)?);
    let lockdown = lockdown::Lockdown::open(&state_dir)?;
    if let Some(l) = lockdown.state().all {
        tracing::warn!(reason = %l.reason, since = %l.since, "starting in lockdown: every request is refused");
    }
    let prices = match &config.price_table {
        Some(p) => usage::PriceTable::load(p).map_err(|e| anyhow::anyhow!("--price-table: {e}"))?,
        None => usage::PriceTable::default_table(),
    };
    let (generation, _) = watch::channel(0);
    let (draining, _) = watch::channel(false);
    let credentials =
        credentials::Broker::from_config(config.secrets_dir.clone(), &config.credentials)
            .await
            .context("configuring the credential backends")?;
    let shared = Arc::new_cyclic(|weak| Shared {
        cells: cells::CellStore::default(),
        verifier,
        policy: policy.clone(),
        policy_source,
        minter: minter.clone(),
        minter_unnamed,
        ca: ca_reload::NodeCas::new(cas.next),
        limits: Arc::default(),
        upstream,
        credentials,
        ledger: ledger.clone(),
        prices,
        lockdown,
        approvals: approvals::Approvals::default(),
        guards: ext_proc::Guards::default(),
        metrics: metrics::Metrics::new(Arc::new(ScrapedValues {
            minter: minter.clone(),
            audit: audit.clone(),
            cells: weak.clone(),
        })),
        audit,
        anchorer,
        generation,
        conn_limit: Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
        draining,
        pods: std::sync::RwLock::new(
            config
                .pods
                .iter()
                .map(|(ip, ns, name)| (*ip, cellgate_api::manifest::local_uid(ns, name)))
                .collect(),
        ),
        dns: std::sync::OnceLock::new(),
        kube: std::sync::OnceLock::new(),
        alerts: alerts::Alerts::default(),
        export,
        tracer,
        self_check: selfcheck::SelfCheck::new(&config.self_check),
        config,
    });
    // Subscribed before the first record the node writes.
    if let Some(c) = alerts_config {
        shared
            .alerts
            .start(
                c,
                &shared.config.node_name,
                &shared.metrics.alerts,
                shared.audit.subscribe(),
            )
            .context("starting the alerter")?;
    }
    // An export past its bound or stalled raises an `audit_backlog` alert (rate-limited there).
    if shared.export.is_some() {
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(s) = weak.upgrade() else { break };
                if let Some(status) = s.export.as_ref().map(cellgate_otel::AuditExporter::status) {
                    if status.over_bound || status.stalled {
                        s.alerts.audit_backlog(status.backlog, status.lag_seconds);
                    }
                }
            }
        });
    }
    if let Some(dir) = &shared.config.cells_dir {
        shared.cells.rescan(dir);
    }
    credentials::Broker::watch_cells(&shared);
    let intake_listener = tokio::net::TcpListener::bind(shared.config.listen)
        .await
        .with_context(|| format!("binding the intake on {}", shared.config.listen))?;

    let intake_addr = intake_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    tracing::info!(
        intake = %intake_addr, admin = %admin_addr, node = %shared.config.node_name,
        cells = shared.cells.len(), policy = ?shared.policy.current().map(|p| p.version().to_string()),
        audit = %shared.config.audit.display(), audit_durability = shared.config.audit_durability.as_str(),
        trusted_keys = ?shared.verifier.key_ids(),
        "cellgate-node started"
    );
    let dns = match shared.config.dns {
        Some(addr) => {
            let server = dns::start(&shared, addr)
                .await
                .with_context(|| format!("binding DNS on {addr}"))?;
            let _ = shared.dns.set(server.handler().clone());
            Some(server)
        }
        None => None,
    };
    let dns_addr = dns.as_ref().map(|d| d.local_addr());
    let mut tasks = tokio::task::JoinSet::new();
    let ext_authz_addr = match &shared.config.ext_authz {
        Some(addr) => {
            let server = ext_authz::bind(&shared, addr)
                .await
                .with_context(|| format!("binding ext_authz on {addr}"))?;
            tracing::info!(ext_authz = %server.local_addr, "Envoy ext_authz listening");
            let local = server.local_addr.clone();
            tasks.spawn(server.serve);
            Some(local)
        }
        None => None,
    };
    if let Some(client) = kube_client {
        kubernetes::start(&shared, client, &mut tasks);
    }
    selfcheck::start(&shared, &mut tasks);
    tasks.spawn(intake::serve(shared.clone(), intake_listener));
    tasks.spawn(watch_sources(shared.clone()));
    tasks.spawn(ca_reload::watch(shared.clone()));
    tasks.spawn(ledger.flush_loop());
    // Admin traffic does not share a runtime with the data path.
    admin::spawn(shared.clone(), admin_listener)?;
    Ok(NodeHandle {
        intake_addr,
        admin_addr,
        dns_addr,
        ext_authz_addr,
        shared,
        tasks,
        dns,
    })
}

/// Loads the anchor key and starts anchoring the audit chain head, when `--audit-anchor-key` is
/// set: a key that cannot be read, or an anchors file that contradicts the log, stops the node.
async fn start_anchorer(
    config: &NodeConfig,
    audit: &AuditLog,
) -> anyhow::Result<Option<Arc<cellgate_audit::Anchorer>>> {
    let Some(key_path) = &config.audit_anchor_key else {
        tracing::warn!(
            "no --audit-anchor-key: the audit chain head is not anchored, so a log cut or rewritten together with its .head would go unnoticed"
        );
        return Ok(None);
    };
    let key = cellgate_audit::AnchorKey::load(key_path).context("--audit-anchor-key")?;
    let path = cellgate_audit::anchors_path(&config.audit);
    let anchorer = cellgate_audit::Anchorer::start(
        audit.clone(),
        key,
        cellgate_audit::AnchorOptions {
            node: config.node_name.clone(),
            path: path.clone(),
            interval: config.audit_anchor_interval,
        },
    )
    .await
    .with_context(|| format!("starting the audit anchors in {}", path.display()))?;
    tracing::info!(
        key_id = anchorer.key_id(),
        anchors = %path.display(),
        interval_s = config.audit_anchor_interval.as_secs(),
        "audit chain head anchored at the interval and at shutdown"
    );
    Ok(Some(Arc::new(anchorer)))
}

/// Polls the cells and policy directories; any change bumps the generation.
async fn watch_sources(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.watch_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut changed = false;
        if let Some(dir) = &shared.config.cells_dir {
            if shared.cells.rescan(dir) {
                if !shared.cells.last_errors().is_empty() {
                    shared.metrics.reload_refused("cells");
                }
                changed = true;
            }
        }
        match shared.policy_source.poll(&shared.policy) {
            policy_source::Polled::Unchanged => {}
            policy_source::Polled::Installed(_) => changed = true,
            policy_source::Polled::Refused(_) => shared.metrics.reload_refused("policy"),
        }
        if changed {
            shared.bump_generation();
        }
    }
}

/// Resolves when a drain starts (or the node is gone).
pub async fn until_draining(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|d| *d).await;
}
