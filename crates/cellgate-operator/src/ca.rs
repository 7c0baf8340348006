//! The interception CA's rotation on the operator's side.
//!
//! The contract (objects, phases, the nodes' reports) is `cellgate_api::ca_rotation`. The
//! operator keeps the state in the ConfigMap `cellgate-ca-rotation` of the control namespace (it
//! alone writes it), takes requests from the ConfigMap `cellgate-ca-rotation-request` (which it
//! creates empty, and `kubectl cellgate ca rotate` writes), and drives the rotation with
//! [`Rotation::tick`], every [`TICK`] ([`Rotation::run`]):
//!
//! | phase | moves on when | then writes, in order |
//! |---|---|---|
//! | `Idle` | a request (`kubectl cellgate ca rotate`) it has not acted on | the new CA (generated like the current one) into the nodes' Secret as `next.crt`/`next.key`; the state (`Introduced`); `cellgate-ca-bundle` with both CAs |
//! | `Introduced` | every cell's CA ConfigMap holds the new CA, then [`BUNDLE_PROPAGATION`] more, and every node pod's own report shows the new CA loaded | the Secret: `ca.crt`/`ca.key` = the new CA, `next.*` gone (nodes switch as kubelet updates their volume); the state (`Active`) |
//! | `Active` | every node pod reports it signs with the new CA | the state (`Retiring`, `retireAfter` = now + grace) |
//! | `Retiring` | `retireAfter` has passed and every node pod still signs with the new CA | the state (`Idle`); `cellgate-ca-bundle` without the old CA |
//!
//! Fail closed: a node pod without a report, or whose report was written by an earlier pod,
//! keeps the phase; so does a cell bundle without the new CA, and zero node pods (a selector that
//! finds none is a misconfiguration, not an empty cluster). Every write of the state and the
//! Secret is a server-side apply carrying the `resourceVersion` read at the start of the tick, so
//! a concurrent change (a second operator, an edit by hand) makes it fail and the tick is retried
//! on fresh state. The Secret is written before the state: after a crash between the two, the
//! state still describes what is published, and the next tick repeats the step.
//!
//! What the cells trust follows `cellgate-ca-bundle`: the operator mounts it as `--ca-cert`, and
//! [`crate::trust::watch`] turns a change of it into a new trust bundle written into every cell's
//! CA ConfigMap, annotated there with the fingerprints of its cell CAs ([`annotate_bundle`]):
//! what the `Introduced` phase waits for. Only the leader runs the rotation.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellgate_api::ca_rotation::{
    self, check_nodes, node_pods, NodeCheck, NodeReport, Phase, RotateRequest, State, Want,
    ANNOTATION_BUNDLE_CAS, BUNDLE_KEY, BUNDLE_PROPAGATION, LABEL_NODE_REPORT, NODE_POD_SELECTOR,
    REQUEST_CONFIGMAP, ROTATION_CONFIGMAP, SECRET_CERT, SECRET_KEY, SECRET_NEXT_CERT,
    SECRET_NEXT_KEY,
};
use cellgate_api::crd::{ca_bundle_name, LABEL_CELL, MANAGED_BY, OPERATOR_FIELD_MANAGER};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::Client;

use crate::oplog::{Event as AuditEvent, OperatorAudit};
use crate::reconcile::Clock;
use crate::token::{parse_rfc3339, rfc3339};

/// How often the rotation is looked at. In `Idle` a tick is two GETs: the state and the request.
pub const TICK: Duration = Duration::from_secs(10);

/// Puts the fingerprints of the cell CAs of `bundle` on a cell's CA ConfigMap
/// ([`ANNOTATION_BUNDLE_CAS`]): what the rotation checks before the new CA signs.
pub fn annotate_bundle(cm: &mut ConfigMap, bundle: &cellgate_tls::TrustBundle) {
    let fingerprints: Vec<String> = bundle
        .cell_cas()
        .iter()
        .map(|c| cellgate_tls::rotation::fingerprint(c.der()))
        .collect();
    cm.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_BUNDLE_CAS.to_string(), fingerprints.join(","));
}

/// Why a tick failed; it is tried again at the next.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// An API call failed (a conflict means someone else wrote meanwhile).
    #[error("{verb} {what}: {source}")]
    Kube {
        /// `get`, `list` or `apply`.
        verb: &'static str,
        /// The object.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The state ConfigMap does not describe a rotation the operator can act on.
    #[error("{ROTATION_CONFIGMAP} in {namespace}: {reason}; fix or delete it (it is rebuilt from the Secret {secret} when missing)")]
    State {
        /// The control namespace.
        namespace: String,
        /// The Secret it would be rebuilt from.
        secret: String,
        /// What is wrong.
        reason: String,
    },
    /// The nodes' Secret does not hold what the state says.
    #[error("Secret {secret}: {reason}")]
    Secret {
        /// The Secret.
        secret: String,
        /// What does not match.
        reason: String,
    },
    /// The new CA could not be made.
    #[error("generating the new CA: {0}")]
    Generate(#[from] cellgate_tls::CaError),
    /// A time out of range.
    #[error("time out of range: {0}")]
    Time(i64),
}

impl RotationError {
    /// A short stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            RotationError::Kube { source, .. } => match source {
                kube::Error::Api(s) if s.code == 409 => "ca_rotation_conflict",
                _ => "ca_rotation_kube",
            },
            RotationError::State { .. } => "ca_rotation_state",
            RotationError::Secret { .. } => "ca_rotation_secret",
            RotationError::Generate(_) => "ca_rotation_generate",
            RotationError::Time(_) => "ca_rotation_time",
        }
    }
}

/// What one tick did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do.
    Idle,
    /// A rotation started: a new CA was introduced (its fingerprint).
    Introduced(String),
    /// The phase moved on.
    Advanced {
        /// From.
        from: Phase,
        /// To.
        to: Phase,
    },
    /// Still waiting, for what.
    Waiting(String),
    /// A request was refused, why.
    Refused(String),
}

/// The rotation's driver: where things are and how to reach them.
pub struct Rotation {
    client: Client,
    namespace: String,
    secret: String,
    bundle_configmap: String,
    clock: Arc<dyn Clock>,
    audit: Option<OperatorAudit>,
    /// The published set last seen in the bundle ConfigMap: it is read again only when the set
    /// differs.
    bundle_synced: Mutex<Option<String>>,
}

impl std::fmt::Debug for Rotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotation")
            .field("namespace", &self.namespace)
            .field("secret", &self.secret)
            .field("bundle_configmap", &self.bundle_configmap)
            .finish_non_exhaustive()
    }
}

fn kube_err(
    verb: &'static str,
    what: impl Into<String>,
) -> impl FnOnce(kube::Error) -> RotationError {
    let what = what.into();
    move |source| RotationError::Kube { verb, what, source }
}

fn params() -> PatchParams {
    PatchParams::apply(OPERATOR_FIELD_MANAGER).force()
}

fn text_of(data: Option<&BTreeMap<String, ByteString>>, key: &str) -> Option<String> {
    data?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

impl Rotation {
    /// A driver for the state in `namespace`, the nodes' Secret `secret` and the published
    /// ConfigMap `bundle_configmap`.
    pub fn new(
        client: Client,
        namespace: String,
        secret: String,
        bundle_configmap: String,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            client,
            namespace,
            secret,
            bundle_configmap,
            clock,
            audit: None,
            bundle_synced: Mutex::new(None),
        }
    }

    /// Records the rotation's steps in `audit`.
    #[must_use]
    pub fn with_audit(mut self, audit: OperatorAudit) -> Self {
        self.audit = Some(audit);
        self
    }

    fn event(&self, reason: &'static str, reasons: Vec<String>) {
        if let Some(a) = &self.audit {
            a.event(
                reason,
                AuditEvent {
                    namespace: Some(self.namespace.clone()),
                    reasons,
                    ..AuditEvent::default()
                },
            );
        }
    }

    fn now_text(&self, secs: i64) -> Result<String, RotationError> {
        rfc3339(secs).map_err(|_| RotationError::Time(secs))
    }

    fn configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Runs [`Rotation::tick`] every [`TICK`] until `stop` resolves; a failed tick is logged and
    /// tried again at the next.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = std::pin::pin!(stop);
        let mut last: Option<Step> = None;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {}
            }
            match self.tick().await {
                Ok(step) => {
                    if last.as_ref() != Some(&step) && step != Step::Idle {
                        tracing::info!(?step, "CA rotation");
                    }
                    last = Some(step);
                }
                Err(e) => {
                    tracing::warn!(reason = e.label(), error = %e, "CA rotation tick failed; retrying");
                    last = None;
                }
            }
        }
    }

    /// Looks at the rotation once and takes the next step if it is due (module docs).
    ///
    /// # Errors
    /// [`RotationError`]: nothing after the failed call was written.
    pub async fn tick(&self) -> Result<Step, RotationError> {
        let now = self.clock.now();
        let (data, rv) = self.read_or_bootstrap(now).await?;
        let state = State::from_data(&data).map_err(|reason| RotationError::State {
            namespace: self.namespace.clone(),
            secret: self.secret.clone(),
            reason,
        })?;
        let asked = self.read_requests().await?;
        self.publish(&state).await?;
        let request = match RotateRequest::from_data(&asked) {
            Some(Ok(r)) if state.handled.as_deref() != Some(r.id.as_str()) => Some(Ok(r)),
            Some(Err(e)) => Some(Err(e)),
            _ => None,
        };
        match (state.phase, request) {
            (_, Some(Err(reason))) => {
                let outcome = format!("refused: {reason}");
                if state.outcome.as_deref() != Some(outcome.as_str()) {
                    let next = State {
                        outcome: Some(outcome.clone()),
                        ..state
                    };
                    self.write_state(&next, &rv).await?;
                }
                Ok(Step::Refused(outcome))
            }
            (Phase::Idle, Some(Ok(req))) => self.start(state, &req, &rv, now).await,
            (Phase::Introduced, Some(Ok(req))) if req.force => {
                self.start(state, &req, &rv, now).await
            }
            (phase, Some(Ok(req))) => {
                let why = match phase {
                    Phase::Introduced => "a rotation is in progress (phase Introduced); --force replaces its new CA, which does not sign yet",
                    _ => "a rotation is in progress and its new CA already signs; wait until the phase is Idle",
                };
                let next = State {
                    handled: Some(req.id.clone()),
                    outcome: Some(format!("refused: {why}")),
                    ..state
                };
                self.write_state(&next, &rv).await?;
                Ok(Step::Refused(why.to_string()))
            }
            (Phase::Idle, None) => Ok(Step::Idle),
            (Phase::Introduced, None) => self.introduced(state, &rv, now).await,
            (Phase::Active, None) => self.active(state, &rv, now).await,
            (Phase::Retiring, None) => self.retiring(state, &rv, now).await,
        }
    }

    /// The state's data and resourceVersion; a missing state is made from the nodes' Secret
    /// (`Idle`, signing with its `ca.crt`).
    async fn read_or_bootstrap(
        &self,
        now: i64,
    ) -> Result<(BTreeMap<String, String>, String), RotationError> {
        let what = || format!("ConfigMap {}/{ROTATION_CONFIGMAP}", self.namespace);
        if let Some(cm) = self
            .configmaps()
            .get_opt(ROTATION_CONFIGMAP)
            .await
            .map_err(kube_err("get", what()))?
        {
            return Ok((
                cm.data.unwrap_or_default(),
                cm.metadata.resource_version.unwrap_or_default(),
            ));
        }
        let secret = self
            .secrets()
            .get_opt(&self.secret)
            .await
            .map_err(kube_err("get", format!("Secret {}/{}", self.namespace, self.secret)))?
            .ok_or_else(|| RotationError::Secret {
                secret: self.secret.clone(),
                reason: format!(
                    "not found in {}: the nodes' CA (ca.crt, ca.key) must be created first (deploy/README.md)",
                    self.namespace
                ),
            })?;
        let signing = text_of(secret.data.as_ref(), SECRET_CERT)
            .filter(|c| !cellgate_tls::rotation::fingerprints(c).is_empty())
            .ok_or_else(|| RotationError::Secret {
                secret: self.secret.clone(),
                reason: format!("{SECRET_CERT} holds no PEM certificate"),
            })?;
        let state = State {
            phase: Phase::Idle,
            signing,
            since: Some(self.now_text(now)?),
            ..State::default()
        };
        let cm = self.state_object(&state, None);
        let created = self
            .configmaps()
            .patch(ROTATION_CONFIGMAP, &params(), &Patch::Apply(&cm))
            .await
            .map_err(kube_err("apply", what()))?;
        tracing::info!(ca.signing = %cellgate_tls::rotation::first_fingerprint(&state.signing), "CA rotation state created from the nodes' Secret");
        Ok((
            created.data.unwrap_or_default(),
            created.metadata.resource_version.unwrap_or_default(),
        ))
    }

    /// The data of the request ConfigMap; a missing one is created empty (so that users need
    /// only `patch` on it, by name).
    async fn read_requests(&self) -> Result<BTreeMap<String, String>, RotationError> {
        let what = || format!("ConfigMap {}/{REQUEST_CONFIGMAP}", self.namespace);
        if let Some(cm) = self
            .configmaps()
            .get_opt(REQUEST_CONFIGMAP)
            .await
            .map_err(kube_err("get", what()))?
        {
            return Ok(cm.data.unwrap_or_default());
        }
        let empty = ConfigMap {
            metadata: ObjectMeta {
                name: Some(REQUEST_CONFIGMAP.into()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    MANAGED_BY.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        };
        self.configmaps()
            .patch(REQUEST_CONFIGMAP, &params(), &Patch::Apply(&empty))
            .await
            .map_err(kube_err("apply", what()))?;
        Ok(BTreeMap::new())
    }

    fn state_object(&self, state: &State, rv: Option<&str>) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(ROTATION_CONFIGMAP.into()),
                namespace: Some(self.namespace.clone()),
                resource_version: rv.map(str::to_string),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_string(),
                    MANAGED_BY.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(state.to_data()),
            ..ConfigMap::default()
        }
    }

    async fn write_state(&self, state: &State, rv: &str) -> Result<(), RotationError> {
        let cm = self.state_object(state, Some(rv));
        self.configmaps()
            .patch(ROTATION_CONFIGMAP, &params(), &Patch::Apply(&cm))
            .await
            .map_err(kube_err(
                "apply",
                format!("ConfigMap {}/{ROTATION_CONFIGMAP}", self.namespace),
            ))?;
        Ok(())
    }

    /// Puts the state's published set into the bundle ConfigMap (read only when the set differs
    /// from what it last held); the cells follow it through [`crate::trust::watch`].
    async fn publish(&self, state: &State) -> Result<(), RotationError> {
        let pem = state.published_pem();
        let synced = self
            .bundle_synced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if synced.as_deref() == Some(pem.as_str()) {
            return Ok(());
        }
        let what = format!("ConfigMap {}/{}", self.namespace, self.bundle_configmap);
        let have = self
            .configmaps()
            .get_opt(&self.bundle_configmap)
            .await
            .map_err(kube_err("get", what.clone()))?
            .and_then(|cm| cm.data)
            .and_then(|d| d.get(BUNDLE_KEY).cloned());
        if have.as_deref() != Some(pem.as_str()) {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(self.bundle_configmap.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(BUNDLE_KEY.to_string(), pem.clone())])),
                ..ConfigMap::default()
            };
            self.configmaps()
                .patch(&self.bundle_configmap, &params(), &Patch::Apply(&cm))
                .await
                .map_err(kube_err("apply", what))?;
            tracing::info!(
                ca.published = ?cellgate_tls::rotation::fingerprints(&pem),
                "published CA set written: every cell's bundle follows"
            );
        }
        *self
            .bundle_synced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(pem);
        Ok(())
    }

    /// The nodes' Secret, checked against the state: its `ca.crt` must be the state's signing
    /// CA, and (when `next` is given) its `next.crt` the state's next CA.
    async fn read_secret(
        &self,
        state: &State,
    ) -> Result<(BTreeMap<String, ByteString>, String), RotationError> {
        let secret = self.secrets().get(&self.secret).await.map_err(kube_err(
            "get",
            format!("Secret {}/{}", self.namespace, self.secret),
        ))?;
        let data = secret.data.unwrap_or_default();
        let fp = |k: &str| {
            text_of(Some(&data), k).map(|t| cellgate_tls::rotation::first_fingerprint(&t))
        };
        let mismatch = |what: &str, key: &str| {
            RotationError::Secret {
            secret: self.secret.clone(),
            reason: format!(
                "{key} is not the {what} CA of {ROTATION_CONFIGMAP} (phase {}): the Secret was changed outside the rotation; put it back, or delete {ROTATION_CONFIGMAP} to start over from the Secret",
                state.phase
            ),
        }
        };
        if fp(SECRET_CERT).as_deref()
            != Some(cellgate_tls::rotation::first_fingerprint(&state.signing).as_str())
        {
            return Err(mismatch("signing", SECRET_CERT));
        }
        if !data.contains_key(SECRET_KEY) {
            return Err(RotationError::Secret {
                secret: self.secret.clone(),
                reason: format!("no {SECRET_KEY}"),
            });
        }
        if let Some(next) = &state.next {
            if fp(SECRET_NEXT_CERT).as_deref()
                != Some(cellgate_tls::rotation::first_fingerprint(next).as_str())
                || !data.contains_key(SECRET_NEXT_KEY)
            {
                return Err(mismatch("next", SECRET_NEXT_CERT));
            }
        }
        Ok((data, secret.metadata.resource_version.unwrap_or_default()))
    }

    async fn write_secret(
        &self,
        data: BTreeMap<String, ByteString>,
        rv: String,
    ) -> Result<(), RotationError> {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.secret.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version: Some(rv),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..Secret::default()
        };
        self.secrets()
            .patch(&self.secret, &params(), &Patch::Apply(&secret))
            .await
            .map_err(kube_err(
                "apply",
                format!("Secret {}/{}", self.namespace, self.secret),
            ))?;
        Ok(())
    }

    /// `Idle` (or `Introduced` with `--force`) → `Introduced` with a fresh CA.
    async fn start(
        &self,
        state: State,
        req: &RotateRequest,
        rv: &str,
        now: i64,
    ) -> Result<Step, RotationError> {
        let grace = match req.grace() {
            Ok(_) => req
                .grace
                .clone()
                .unwrap_or_else(|| format!("{}h", ca_rotation::DEFAULT_GRACE.as_secs() / 3600)),
            Err(reason) => {
                let next = State {
                    handled: Some(req.id.clone()),
                    outcome: Some(format!("refused: {reason}")),
                    ..state
                };
                self.write_state(&next, rv).await?;
                return Ok(Step::Refused(reason));
            }
        };
        // The next CA of a forced restart is replaced, not checked.
        let (current, secret_rv) = self
            .read_secret(&State {
                next: None,
                ..state.clone()
            })
            .await?;
        let new = cellgate_tls::rotation::successor(&state.signing, now)?;
        let mut data: BTreeMap<String, ByteString> = [SECRET_CERT, SECRET_KEY]
            .into_iter()
            .filter_map(|k| Some((k.to_string(), current.get(k)?.clone())))
            .collect();
        data.insert(
            SECRET_NEXT_CERT.into(),
            ByteString(new.cert_pem().as_bytes().to_vec()),
        );
        data.insert(
            SECRET_NEXT_KEY.into(),
            ByteString(new.key_pem().into_bytes()),
        );
        self.write_secret(data, secret_rv).await?;
        let replaced = state
            .next
            .as_deref()
            .map(cellgate_tls::rotation::first_fingerprint);
        let next = State {
            phase: Phase::Introduced,
            next: Some(new.cert_pem().to_string()),
            since: Some(self.now_text(now)?),
            bundles_ready: None,
            grace: Some(grace.clone()),
            waiting: Some("every cell's bundle to hold the new CA".into()),
            handled: Some(req.id.clone()),
            outcome: Some("started".into()),
            ..state
        };
        self.write_state(&next, rv).await?;
        self.publish(&next).await?;
        let fp = new.fingerprint().to_string();
        tracing::warn!(ca.new = %fp, ca.replaced = ?replaced, grace = %grace, "CA rotation started: new CA introduced");
        let mut reasons = vec![format!("new CA {fp}"), format!("grace {grace}")];
        if let Some(r) = replaced {
            reasons.push(format!("replaces the introduced CA {r}"));
        }
        self.event("ca_rotation_started", reasons);
        Ok(Step::Introduced(fp))
    }

    /// How every node pod stands against `want`: the pods and reports listed now.
    async fn nodes(&self, want: Want<'_>) -> Result<Vec<String>, RotationError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let pods = pods
            .list(&ListParams::default().labels(NODE_POD_SELECTOR))
            .await
            .map_err(kube_err("list", format!("node pods in {}", self.namespace)))?;
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        let reports: Vec<NodeReport> = leases
            .list(&ListParams::default().labels(&format!("{LABEL_NODE_REPORT}=ca")))
            .await
            .map_err(kube_err(
                "list",
                format!("node reports in {}", self.namespace),
            ))?
            .items
            .iter()
            .filter_map(NodeReport::from_lease)
            .collect();
        let pods = node_pods(&pods.items);
        if pods.is_empty() {
            return Ok(vec![format!(
                "a node pod to report (none found in {} with labels {NODE_POD_SELECTOR})",
                self.namespace
            )]);
        }
        Ok(check_nodes(&pods, &reports, want)
            .into_iter()
            .filter(|(_, c)| !c.is_ready())
            .map(|(p, c): (_, NodeCheck)| {
                let node = if p.node.is_empty() { "-" } else { &p.node };
                format!("node {node} (pod {}) {}", p.pod, c.describe(want))
            })
            .collect())
    }

    /// The cells whose CA ConfigMap does not hold `fingerprint`.
    async fn bundles_without(&self, fingerprint: &str) -> Result<Vec<String>, RotationError> {
        let all: Api<ConfigMap> = Api::all(self.client.clone());
        let list = all
            .list_metadata(&ListParams::default().labels(LABEL_CELL))
            .await
            .map_err(kube_err("list", "cell CA ConfigMaps"))?;
        let mut out: Vec<String> = list
            .items
            .iter()
            .filter(|cm| {
                let cell = cm.metadata.labels.as_ref().and_then(|l| l.get(LABEL_CELL));
                cell.is_some_and(|c| cm.metadata.name.as_deref() == Some(&ca_bundle_name(c)))
            })
            .filter(|cm| {
                !cm.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_BUNDLE_CAS))
                    .is_some_and(|v| v.split(',').any(|f| f.trim() == fingerprint))
            })
            .map(|cm| {
                format!(
                    "{}/{}",
                    cm.metadata.namespace.as_deref().unwrap_or_default(),
                    cm.metadata.name.as_deref().unwrap_or_default()
                )
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Writes `waits` into `state` as what is waited for, and the state when that (or anything
    /// else) changed from what was read; the step is [`Step::Waiting`].
    async fn wait(
        &self,
        state: State,
        rv: &str,
        waits: Vec<String>,
    ) -> Result<Step, RotationError> {
        let text = waits.join("; ");
        let next = State {
            waiting: Some(text.clone()),
            ..state.clone()
        };
        if next != state {
            self.write_state(&next, rv).await?;
        }
        Ok(Step::Waiting(text))
    }

    /// `Introduced` → `Active` once the bundles (and, [`BUNDLE_PROPAGATION`] later, the pods)
    /// and every node have the new CA.
    async fn introduced(
        &self,
        mut state: State,
        rv: &str,
        now: i64,
    ) -> Result<Step, RotationError> {
        let next_pem = state.next.clone().unwrap_or_default();
        let new_fp = cellgate_tls::rotation::first_fingerprint(&next_pem);
        let mut waits = Vec::new();
        let bundles = self.bundles_without(&new_fp).await?;
        if bundles.is_empty() {
            let ready = match state.bundles_ready.as_deref().and_then(parse_rfc3339) {
                Some(t) => t,
                None => {
                    state.bundles_ready = Some(self.now_text(now)?);
                    now
                }
            };
            let propagated = ready.saturating_add(BUNDLE_PROPAGATION.as_secs() as i64);
            if now < propagated {
                waits.push(format!(
                    "the bundles to reach the pods (until {})",
                    self.now_text(propagated)?
                ));
            }
        } else {
            // Counted again from when every bundle holds it.
            state.bundles_ready = None;
            waits.push(format!(
                "{} cell bundle(s) to hold the new CA: {}",
                bundles.len(),
                bundles.join(", ")
            ));
        }
        waits.extend(self.nodes(Want::Loaded(&new_fp)).await?);
        if !waits.is_empty() {
            return self.wait(state, rv, waits).await;
        }
        let (data, secret_rv) = self.read_secret(&state).await?;
        let mut switched = BTreeMap::new();
        for (from, to) in [
            (SECRET_NEXT_CERT, SECRET_CERT),
            (SECRET_NEXT_KEY, SECRET_KEY),
        ] {
            if let Some(v) = data.get(from) {
                switched.insert(to.to_string(), v.clone());
            }
        }
        self.write_secret(switched, secret_rv).await?;
        let old_fp = cellgate_tls::rotation::first_fingerprint(&state.signing);
        let next = State {
            phase: Phase::Active,
            previous: Some(state.signing.clone()),
            signing: next_pem,
            next: None,
            since: Some(self.now_text(now)?),
            bundles_ready: None,
            waiting: Some("every node to sign with the new CA".into()),
            ..state
        };
        self.write_state(&next, rv).await?;
        self.event(
            "ca_rotation_active",
            vec![
                format!("new CA {new_fp} signs"),
                format!("old CA {old_fp} still published"),
            ],
        );
        Ok(Step::Advanced {
            from: Phase::Introduced,
            to: Phase::Active,
        })
    }

    /// `Active` → `Retiring` once every node signs with the new CA.
    async fn active(&self, state: State, rv: &str, now: i64) -> Result<Step, RotationError> {
        let fp = cellgate_tls::rotation::first_fingerprint(&state.signing);
        let waits = self.nodes(Want::Signing(&fp)).await?;
        if !waits.is_empty() {
            return self.wait(state, rv, waits).await;
        }
        let grace = state
            .grace
            .as_deref()
            .map(|g| RotateRequest {
                id: String::new(),
                grace: Some(g.to_string()),
                force: false,
            })
            .map_or(Ok(ca_rotation::DEFAULT_GRACE), |r| r.grace())
            .unwrap_or(ca_rotation::DEFAULT_GRACE);
        let until = self.now_text(now.saturating_add(grace.as_secs() as i64))?;
        let next = State {
            phase: Phase::Retiring,
            since: Some(self.now_text(now)?),
            retire_after: Some(until.clone()),
            waiting: Some(format!("the grace period to end ({until})")),
            ..state
        };
        self.write_state(&next, rv).await?;
        self.event(
            "ca_rotation_retiring",
            vec![
                format!("every node signs with {fp}"),
                format!("old CA removed after {until}"),
            ],
        );
        Ok(Step::Advanced {
            from: Phase::Active,
            to: Phase::Retiring,
        })
    }

    /// `Retiring` → `Idle` once the grace period is over (and every node still signs with the
    /// new CA): the old CA leaves the bundles.
    async fn retiring(&self, state: State, rv: &str, now: i64) -> Result<Step, RotationError> {
        let until = state
            .retire_after
            .as_deref()
            .and_then(parse_rfc3339)
            .unwrap_or(i64::MAX);
        if now < until {
            return Ok(Step::Waiting(state.waiting.unwrap_or_default()));
        }
        let fp = cellgate_tls::rotation::first_fingerprint(&state.signing);
        let waits = self.nodes(Want::Signing(&fp)).await?;
        if !waits.is_empty() {
            return self.wait(state, rv, waits).await;
        }
        let old = state
            .previous
            .as_deref()
            .map(cellgate_tls::rotation::first_fingerprint)
            .unwrap_or_default();
        let next = State {
            phase: Phase::Idle,
            previous: None,
            since: Some(self.now_text(now)?),
            grace: None,
            retire_after: None,
            waiting: None,
            ..state
        };
        self.write_state(&next, rv).await?;
        self.publish(&next).await?;
        self.event(
            "ca_rotation_finished",
            vec![format!("old CA {old} removed"), format!("CA {fp} alone")],
        );
        Ok(Step::Advanced {
            from: Phase::Retiring,
            to: Phase::Idle,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_bundle_names_the_fingerprints_of_its_cell_cas() {
        let a = cellgate_tls::Ca::generate("a").expect("a");
        let b = cellgate_tls::Ca::generate("b").expect("b");
        let root = cellgate_tls::Ca::generate("root").expect("root");
        let bundle = cellgate_tls::TrustBundle::new(
            &format!("{}{}", a.cert_pem(), b.cert_pem()),
            Some(root.cert_pem()),
        )
        .expect("bundle");
        let mut cm = ConfigMap::default();
        annotate_bundle(&mut cm, &bundle);
        assert_eq!(
            cm.metadata.annotations.expect("annotated")[ANNOTATION_BUNDLE_CAS],
            format!("{},{}", a.fingerprint(), b.fingerprint()),
            "the cell CAs, not the system roots"
        );
    }
}
