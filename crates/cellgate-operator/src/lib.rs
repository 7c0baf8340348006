//! `cellgate-operator`: Cellgate's Kubernetes control plane.
//!
//! It turns each `AgentCell` into the objects that carry the boundary (ServiceAccount, token
//! Secret, CA ConfigMap, NetworkPolicy, Pod with `cellgate-init` and the `cellgate-tagger`
//! sidecar), mints and rotates the cell's token with the control plane's Ed25519 key, writes the
//! cell's status, and revokes the token when the cell is deleted. The contract it follows (names,
//! labels, ports, flags) is `docs/kubernetes.md`.
//!
//! Where to start reading:
//! - [`desired`]: the child objects as pure functions (golden-tested);
//! - [`mod@reconcile`]: the sequence of API calls, inside kube-rs's finalizer helper;
//! - [`token`], [`status`], [`revocations`]: the pure decisions the reconciler takes;
//! - [`run`]: startup, the admin listener ([`admin`], [`metrics`]) and the control API on every
//!   replica, then the leader election ([`leader`]); [`controllers`]: what the leader runs (the
//!   controllers, their watches and error policies, [`backoff`]);
//! - [`api`]: the control API (HTTPS, `/api/v1`), and [`oplog`], the operator's own audit log;
//! - [`policy`]: the policy packs (`CellgatePolicy`, `CellgateClusterPolicy`): validation,
//!   snapshots, history;
//! - [`ca`]: the interception CA's rotation (the leader runs it beside the controllers);
//! - [`config`]: flags and `CELLGATE_*` variables.

pub mod admin;
pub mod api;
pub mod backoff;
pub mod ca;
pub mod config;
pub mod desired;
pub mod leader;
pub mod metrics;
pub mod oplog;
pub mod policy;
pub mod reconcile;
pub mod revocations;
pub mod status;
pub mod token;
pub mod trust;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use cellgate_api::crd::{AgentCellResource, LABEL_CELL};
use cellgate_api::policy_pack::{CellgateClusterPolicyResource, CellgatePolicyResource};
use cellgate_identity::SigningKey;
use futures_util::future::{BoxFuture, Shared};
use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::{watcher, Controller};
use kube::{Api, Client};

pub use config::{Args, Config, ConfigError, LeaseTimings, LogFormat};
pub use desired::{render_yaml, Settings};
pub use reconcile::{error_policy, reconcile, Context, Error};

/// Why the operator could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The signing key could not be loaded.
    #[error("signing key: {0}")]
    SigningKey(#[from] cellgate_identity::keys::KeyError),
    /// The CA certificate could not be read.
    #[error("cannot use the CA certificate {path}: {reason}; check --ca-cert")]
    CaCert {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The system roots could not be read or used, or the trust bundle is too large.
    #[error(transparent)]
    SystemRoots(trust::TrustLoadError),
    /// The admin listener did not start.
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    /// The operator's audit log could not be opened.
    #[error("cannot open the operator's audit log: {0}; check --audit-log")]
    AuditLog(#[from] cellgate_audit::AuditError),
    /// The control API's certificate could not be loaded or made.
    #[error(transparent)]
    ApiTls(#[from] api::tls::TlsError),
    /// The control API listener did not start.
    #[error(transparent)]
    Api(#[from] api::ServeError),
    /// No usable Kubernetes client configuration, or the API server is unreachable.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// The OTLP export of the operator's audit log could not be configured.
    #[error("{0}; check --otlp-endpoint and OTEL_EXPORTER_OTLP_*")]
    Export(String),
    /// This replica led and lost the leader Lease; its controllers were stopped at once.
    #[error("leadership lost ({0}); exiting so that this replica restarts as a standby")]
    LeadershipLost(String),
}

impl RunError {
    /// A short stable label (for the exit log line).
    pub fn label(&self) -> &'static str {
        match self {
            RunError::SigningKey(_) => "signing_key",
            RunError::CaCert { .. } => "ca_cert",
            RunError::SystemRoots(_) => "system_roots",
            RunError::Admin(_) => "admin_listener",
            RunError::AuditLog(_) => "audit_log",
            RunError::ApiTls(_) => "api_tls",
            RunError::Api(_) => "api_listener",
            RunError::Kube(_) => "kube_client",
            RunError::Export(_) => "otlp_export",
            RunError::LeadershipLost(_) => "leadership_lost",
        }
    }
}

impl From<trust::TrustLoadError> for RunError {
    fn from(e: trust::TrustLoadError) -> Self {
        match e {
            trust::TrustLoadError::CaCert { path, reason } => RunError::CaCert { path, reason },
            other => RunError::SystemRoots(other),
        }
    }
}

/// Resolves when the operator is asked to stop; cloneable, so that every controller and the
/// election can wait for the same signal.
pub type Shutdown = Shared<BoxFuture<'static, ()>>;

/// Where a started operator listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`).
    pub admin: std::net::SocketAddr,
    /// The control API (HTTPS).
    pub api: std::net::SocketAddr,
}

/// A [`Shutdown`] that never resolves (tests, and callers that stop by dropping the future).
pub fn never() -> Shutdown {
    futures_util::future::pending().boxed().shared()
}

/// The first SIGTERM or Ctrl-C (graceful: in-flight reconciles finish, the Lease is released),
/// and the second (forced: the controllers are dropped at once).
fn shutdown_signals() -> (Shutdown, Shutdown) {
    let (tx, rx) = tokio::sync::watch::channel(0u8);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                    None
                }
            };
        for n in 1..=2u8 {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => {}
            }
            tracing::info!(
                signal = n,
                "{}",
                if n == 1 {
                    "shutdown requested: finishing the reconciles in flight (signal again to force)"
                } else {
                    "forced shutdown requested"
                }
            );
            let _ = tx.send(n);
        }
    });
    let at = |n: u8| {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v >= n).await;
        }
        .boxed()
        .shared()
    };
    (at(1), at(2))
}

/// The operator's three controllers, with their error policies, as one future that runs them
/// until `shutdown` resolves and their in-flight reconciles have finished:
/// - AgentCells (all namespaces) with [`reconcile`] and [`error_policy`], watching the objects
///   they own (Pods, Secrets, ConfigMaps, ServiceAccounts, NetworkPolicies with the label
///   `cellgate.dev/cell`) so that a changed or deleted child is put back;
/// - `CellgateClusterPolicy` and `CellgatePolicy` with [`policy::reconcile_cluster`],
///   [`policy::reconcile_namespaced`] and [`policy::error_policy`].
///
/// Each watch follows kube-runtime's list-then-watch protocol (resourceVersion, bookmarks) and
/// its default backoff when the watch fails; a failed reconcile is requeued after the per-object
/// backoff of [`backoff`]. Only the leader runs this ([`run`] through [`leader::Elector::lead`]).
pub fn controllers(
    client: Client,
    ctx: Arc<Context>,
    policy_ctx: Arc<policy::PolicyContext>,
    shutdown: Shutdown,
) -> impl std::future::Future<Output = ()> + Send {
    let owned = watcher::Config::default().labels(LABEL_CELL);
    let cells = Controller::new(
        Api::<AgentCellResource>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
    .owns(Api::<Pod>::all(client.clone()), owned.clone())
    .owns(Api::<Secret>::all(client.clone()), owned.clone())
    .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
    .owns(Api::<ServiceAccount>::all(client.clone()), owned.clone())
    .owns(Api::<NetworkPolicy>::all(client.clone()), owned)
    // A new trust bundle (CA or system roots changed) is written into every cell's ConfigMap.
    .reconcile_all_on(ctx.trust.changes())
    .graceful_shutdown_on(shutdown.clone())
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        if let Err(e) = result {
            // Reconcile errors are logged and counted in error_policy; these are the
            // controller's own (watch) errors.
            tracing::debug!(error = %e, "controller event");
        }
    });
    let cluster_policies = Controller::new(
        Api::<CellgateClusterPolicyResource>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
    .graceful_shutdown_on(shutdown.clone())
    .run(
        policy::reconcile_cluster,
        policy::error_policy,
        policy_ctx.clone(),
    )
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "cluster policy controller event");
        }
    });
    let namespaced_policies = Controller::new(
        Api::<CellgatePolicyResource>::all(client),
        watcher::Config::default().any_semantic(),
    )
    .graceful_shutdown_on(shutdown)
    .run(
        policy::reconcile_namespaced,
        policy::error_policy,
        policy_ctx,
    )
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "policy controller event");
        }
    });
    futures_util::future::join3(cells, cluster_policies, namespaced_policies).map(|_| ())
}

/// Runs the operator until SIGTERM or Ctrl-C: [`run_with`] with a client from the
/// environment (in-cluster or kubeconfig) and the process' signals.
///
/// # Errors
/// [`RunError`] when startup fails or leadership is lost; reconcile errors are retried, not
/// returned.
pub async fn run(config: Config) -> Result<(), RunError> {
    let (graceful, forced) = shutdown_signals();
    let connect = async {
        let client = Client::try_default().await?;
        let version = client.apiserver_version().await?;
        tracing::info!(apiserver.version = %version.git_version, "connected to the API server");
        Ok(client)
    };
    run_with(config, connect, graceful, forced, |_| {}).await
}

/// Runs the operator: loads the signing key and CA certificate, starts the admin listener on
/// its own thread, opens the operator's audit log, connects to the API server (`connect`),
/// starts the control API (HTTPS), then stands in the leader election. Every replica serves the
/// admin endpoints and the control API; only the leader runs the [`controllers`].
///
/// `graceful` stops the operator: a standby at once; the leader after its in-flight reconciles,
/// releasing the Lease. `forced` drops the controllers at once. `bound` is told the admin and
/// control API addresses once both listen (port 0 in the config picks free ports).
///
/// # Errors
/// [`RunError`] when startup fails, and [`RunError::LeadershipLost`] when this replica led and
/// lost the Lease: the controllers were dropped the moment it was lost, and the process is
/// meant to exit (the Deployment restarts it, as a standby) rather than lead again with
/// whatever state the lost term left.
pub async fn run_with(
    config: Config,
    connect: impl std::future::Future<Output = Result<Client, kube::Error>>,
    graceful: Shutdown,
    forced: Shutdown,
    bound: impl FnOnce(Bound),
) -> Result<(), RunError> {
    tracing::info!(config = %config.summary(), "starting cellgate-operator");
    let signing_key = Arc::new(SigningKey::load(&config.signing_key)?);
    // The cell CA(s) and the system roots: every cell's trust bundle, re-read while running.
    let trust_files = trust::TrustFiles {
        ca_cert: config.ca_cert.clone(),
        system_roots: config.system_roots.clone(),
    };
    let (trust_texts, bundle) = trust_files.load()?;
    tracing::info!(
        cell_cas = bundle.cell_cas().len(),
        system_roots = bundle.system_roots().len(),
        "trust bundle loaded"
    );
    let trust = trust::Trust::new(bundle);
    let metrics = Arc::new(metrics::Metrics::new());
    let state = Arc::new(admin::AdminState {
        metrics: metrics.clone(),
        ..admin::AdminState::default()
    });
    let admin = admin::start(config.admin, state.clone())?;
    tracing::info!(admin.addr = %admin.addr, signing_key.kid = signing_key.kid(), "admin listener up");
    let identity = config
        .identity
        .clone()
        .unwrap_or_else(|| format!("cellgate-operator-{}", uuid::Uuid::new_v4().simple()));

    let (audit, audit_writer) = oplog::OperatorAudit::open(&config.audit_log).await?;
    let audit = audit.with_metrics(metrics.clone());
    // The operator's log goes out like the nodes': from the file, after a durable cursor.
    let export = match &config.otlp {
        Some(otlp) => Some(
            cellgate_otel::AuditExporter::start(
                otlp,
                &config.audit_log,
                audit.log().clone(),
                &identity,
                None,
            )
            .map_err(|e| RunError::Export(e.to_string()))?,
        ),
        None => None,
    };
    let tls = match &config.api_tls {
        Some((cert, key)) => api::tls::from_files(cert, key)?,
        None => {
            let ns = &config.control_namespace;
            let names = vec![
                format!("{}", api::SERVICE_NAME),
                format!("{}.{ns}", api::SERVICE_NAME),
                format!("{}.{ns}.svc", api::SERVICE_NAME),
            ];
            api::tls::self_signed(&names)?
        }
    };
    if tls.self_signed {
        tracing::warn!(
            tls.sha256 = %tls.fingerprint,
            "control API: no --api-tls-cert/--api-tls-key given, serving a self-signed certificate generated at start (clients must pin this fingerprint or skip verification)"
        );
    } else {
        tracing::info!(tls.sha256 = %tls.fingerprint, "control API certificate loaded");
    }

    let client = connect.await?;
    // Every replica serves the control API: each call is a TokenReview, a SubjectAccessReview
    // and reads or writes through the API server (which orders concurrent writes), recorded in
    // this replica's audit log; nothing in it needs the controllers.
    let api_server = api::start(
        config.api_listen,
        tls.config.clone(),
        Arc::new(api::ApiState {
            client: client.clone(),
            control_namespace: config.control_namespace.clone(),
            audit: audit.clone(),
        }),
    )
    .await?;
    tracing::info!(api.addr = %api_server.addr, "control API up (HTTPS)");
    bound(Bound {
        admin: admin.addr,
        api: api_server.addr,
    });

    let clock: Arc<dyn reconcile::Clock> = Arc::new(reconcile::SystemClock);
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            Settings {
                init_image: config.init_image.clone(),
                tagger_image: config.tagger_image.clone(),
                node_cidrs: config.node_cidrs.clone(),
                cell_max_connections: config.cell_max_connections,
            },
            trust.clone(),
            signing_key,
            config.token_ttl,
            config.control_namespace.clone(),
            metrics.clone(),
            clock.clone(),
        )
        .with_audit(audit.clone()),
    );
    let policy_ctx = Arc::new(policy::PolicyContext::new(
        client.clone(),
        config.control_namespace.clone(),
        clock.clone(),
    ));
    let rotation = Arc::new(
        ca::Rotation::new(
            client.clone(),
            config.control_namespace.clone(),
            config.ca_secret.clone(),
            config.ca_bundle_configmap.clone(),
            clock.clone(),
        )
        .with_audit(audit.clone()),
    );
    // On every replica (it only reads files), so that a new leader starts from the current bundle.
    let trust_watch = tokio::spawn(trust::watch(
        trust_files,
        trust,
        trust_texts,
        trust::POLL_INTERVAL,
    ));
    let mut elector = leader::Elector::new(
        client.clone(),
        leader::ElectionConfig {
            namespace: config.control_namespace.clone(),
            name: leader::LEASE_NAME.into(),
            identity: identity.clone(),
            timings: config.lease,
        },
        clock,
        state.leadership.clone(),
    );
    state.ready.store(true, Ordering::Release);
    tracing::info!(lease.identity = %identity, "standing in the leader election");
    // Everything that writes on the operator's behalf runs in here, only while leading.
    let work = || {
        metrics.leading(true);
        let controllers = controllers(client.clone(), ctx, policy_ctx, graceful.clone());
        // The CA rotation writes the nodes' Secret and the published CAs: the leader's too.
        let controllers =
            futures_util::future::join(controllers, rotation.run(graceful.clone())).map(|_| ());
        async move {
            tokio::select! {
                () = controllers => {}
                () = forced => tracing::warn!("forced shutdown: reconciles in flight are aborted"),
            }
        }
    };
    let outcome = elector.lead(work, graceful.clone()).await;
    metrics.leading(false);
    state.ready.store(false, Ordering::Release);
    tracing::info!(?outcome, "shutting down");
    trust_watch.abort();
    api_server.shutdown().await;
    if let Err(e) = audit.log().clone().close().await {
        tracing::error!(error = %e, "the operator's audit log did not close cleanly");
    }
    let _ = audit_writer.await;
    if let Some(export) = export {
        export.shutdown(std::time::Duration::from_secs(5)).await;
    }
    let _ = tokio::task::spawn_blocking(move || admin.shutdown()).await;
    match outcome {
        leader::Outcome::Lost(lost) => Err(RunError::LeadershipLost(lost.to_string())),
        leader::Outcome::Standby | leader::Outcome::Finished => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn config(dir: &std::path::Path, admin: &str) -> Config {
        let env = BTreeMap::from([
            ("CELLGATE_NODE_CIDRS".to_string(), "10.0.0.0/16".to_string()),
            (
                "CELLGATE_SIGNING_KEY".to_string(),
                dir.join("signing.key").display().to_string(),
            ),
            (
                "CELLGATE_CA_CERT".to_string(),
                dir.join("ca.crt").display().to_string(),
            ),
            (
                "CELLGATE_SYSTEM_ROOTS".to_string(),
                dir.join("roots.pem").display().to_string(),
            ),
            ("CELLGATE_ADMIN".to_string(), admin.to_string()),
        ]);
        Config::resolve(&Args::default(), &env).expect("config")
    }

    #[tokio::test]
    async fn startup_fails_early_with_a_labelled_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = run(config(dir.path(), "127.0.0.1:0"))
            .await
            .expect_err("no key");
        assert_eq!(err.label(), "signing_key");

        SigningKey::generate()
            .expect("key")
            .write_pair(dir.path())
            .expect("write");
        let err = run(config(dir.path(), "127.0.0.1:0"))
            .await
            .expect_err("no ca");
        assert_eq!(err.label(), "ca_cert");
        std::fs::write(dir.path().join("ca.crt"), "not a certificate").expect("write");
        let err = run(config(dir.path(), "127.0.0.1:0"))
            .await
            .expect_err("bad ca");
        assert!(
            err.to_string().contains("no PEM CERTIFICATE block"),
            "{err}"
        );

        std::fs::write(
            dir.path().join("ca.crt"),
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let err = run(config(dir.path(), "127.0.0.1:0"))
            .await
            .expect_err("not a certificate");
        assert_eq!(err.label(), "ca_cert");
        assert!(
            err.to_string().contains("not an X.509 certificate"),
            "{err}"
        );

        let ca = |name: &str| {
            cellgate_tls::Ca::generate(name)
                .expect("ca")
                .cert_pem()
                .to_string()
        };
        std::fs::write(dir.path().join("ca.crt"), ca("cell")).expect("write");
        let err = run(config(dir.path(), "127.0.0.1:0"))
            .await
            .expect_err("no system roots");
        assert_eq!(err.label(), "system_roots");
        assert!(err.to_string().contains("--system-roots"), "{err}");
        std::fs::write(dir.path().join("roots.pem"), "no certificates").expect("write");
        let err = run(config(dir.path(), "127.0.0.1:0"))
            .await
            .expect_err("empty system roots");
        assert_eq!(err.label(), "system_roots");
        assert!(
            err.to_string().contains("no PEM CERTIFICATE block"),
            "{err}"
        );

        std::fs::write(dir.path().join("roots.pem"), ca("root")).expect("write");
        let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = busy.local_addr().expect("addr").to_string();
        let err = run(config(dir.path(), &addr)).await.expect_err("busy port");
        assert_eq!(err.label(), "admin_listener");
    }
}
