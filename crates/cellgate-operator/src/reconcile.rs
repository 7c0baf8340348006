//! The reconciler: one AgentCell in, its children and status out. Start at [`reconcile`].
//!
//! Each reconcile runs inside kube-rs's finalizer helper ([`FINALIZER`]): a new cell first gets
//! the finalizer (and nothing else); a live cell is applied ([`apply`]); a deleted cell has its
//! token revoked ([`cleanup`]) before the helper removes the finalizer. Every write is a
//! server-side apply with the field manager [`OPERATOR_FIELD_MANAGER`], except the revocation
//! list (a merge patch of the keys it changes) and the pod recreation (a delete). What is written
//! comes from the pure functions of [`crate::desired`], [`crate::token`], [`crate::status`] and
//! [`crate::revocations`]; this module only sequences the calls.
//!
//! Calls of an apply, in order: apply ServiceAccount; get Secret; apply Secret (the kept or a
//! freshly minted token); apply CA ConfigMap; apply NetworkPolicy (before the pod, so the pod
//! never runs without its egress rules); get Pod, then apply it when missing or delete it when
//! its template hash differs; apply status when it changed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cellgate_api::crd::{
    pod_name, token_secret_name, AgentCellResource, AgentCellStatus, ANNOTATION_TOKEN_EXPIRY,
    ANNOTATION_TOKEN_ID, FINALIZER, OPERATOR_FIELD_MANAGER, REVOCATIONS_CONFIGMAP,
};
use cellgate_identity::SigningKey;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, finalizer, Event};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::desired::{self, DesiredError, Settings, ANNOTATION_TEMPLATE_HASH};
use crate::metrics::Metrics;
use crate::oplog::{Event as AuditEvent, OperatorAudit};
use crate::revocations;
use crate::status::{self, Observation, PodObservation};
use crate::token::{self, TokenDecision, TokenIssueError};
use crate::trust::Trust;

/// How soon to look again at a pod being deleted for recreation.
pub const RECREATE_REQUEUE: Duration = Duration::from_secs(2);
pub use crate::backoff::{delay as backoff, BACKOFF_BASE, BACKOFF_MAX};

/// Where time and token ids come from; the tests fix both.
pub trait Clock: Send + Sync {
    /// Now, in Unix seconds.
    fn now(&self) -> i64;
    /// A fresh, unique token id.
    fn token_id(&self) -> String;
}

/// The system clock and random v4 UUIDs.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        jiff::Timestamp::now().as_second()
    }

    fn token_id(&self) -> String {
        uuid::Uuid::new_v4().to_string()
    }
}

/// Everything a reconcile needs.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Images and node ranges.
    pub settings: Settings,
    /// The trust bundle written into each cell's CA ConfigMap (the cell CA(s) and the system
    /// roots); [`crate::trust::watch`] keeps it current.
    pub trust: Trust,
    /// The control plane's token signing key.
    pub signing_key: Arc<SigningKey>,
    /// Lifetime of minted tokens.
    pub token_ttl: Duration,
    /// Namespace of `cellgate-revocations`.
    pub control_namespace: String,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Time and ids.
    pub clock: Arc<dyn Clock>,
    /// The operator's audit log, when one is open: tokens minted, rotated and revoked, and
    /// phase changes are recorded in it.
    pub audit: Option<OperatorAudit>,
    /// Consecutive failures per cell, for [`error_policy`].
    pub backoff: Backoff,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .field("signing_key", &self.signing_key)
            .field("token_ttl", &self.token_ttl)
            .field("control_namespace", &self.control_namespace)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        settings: Settings,
        trust: impl Into<Trust>,
        signing_key: Arc<SigningKey>,
        token_ttl: Duration,
        control_namespace: String,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            client,
            settings,
            trust: trust.into(),
            signing_key,
            token_ttl,
            control_namespace,
            metrics,
            clock,
            audit: None,
            backoff: Backoff::default(),
        }
    }

    /// Records the operator's events in `audit`.
    #[must_use]
    pub fn with_audit(mut self, audit: OperatorAudit) -> Self {
        self.audit = Some(audit);
        self
    }

    fn event(&self, reason: &'static str, event: AuditEvent) {
        if let Some(a) = &self.audit {
            a.event(reason, event);
        }
    }
}

/// Why a reconcile failed. Each has a short [`Error::label`] for metrics and logs; the controller
/// retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("{verb} {kind} {name}: {source}")]
    Kube {
        /// `get`, `apply`, `delete`, `patch` or `create`.
        verb: &'static str,
        /// The object's kind.
        kind: &'static str,
        /// `namespace/name`.
        name: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// A token could not be minted.
    #[error(transparent)]
    Token(#[from] TokenIssueError),
    /// A desired object could not be built for a reason other than the spec.
    #[error(transparent)]
    Desired(DesiredError),
    /// The finalizer helper failed (adding or removing the finalizer, or a wrapped error).
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

impl Error {
    /// The short stable label counted in metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube { verb, .. } => match *verb {
                "get" => "kube_get",
                "apply" => "kube_apply",
                "delete" => "kube_delete",
                "create" => "kube_create",
                _ => "kube_patch",
            },
            Error::Token(_) => "token_issue",
            Error::Desired(_) => "desired_object",
            Error::Finalizer(e) => match e.as_ref() {
                finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => {
                    inner.label()
                }
                finalizer::Error::AddFinalizer(_) => "finalizer_add",
                finalizer::Error::RemoveFinalizer(_) => "finalizer_remove",
                _ => "finalizer",
            },
        }
    }
}

fn kube_err(
    verb: &'static str,
    kind: &'static str,
    ns: &str,
    name: &str,
) -> impl FnOnce(kube::Error) -> Error {
    let name = format!("{ns}/{name}");
    move |source| Error::Kube {
        verb,
        kind,
        name,
        source,
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(OPERATOR_FIELD_MANAGER).force()
}

async fn apply_child<K>(client: &Client, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + k8s_openapi::Resource
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    let kind = <K as k8s_openapi::Resource>::KIND;
    api.patch(&name, &apply_params(), &Patch::Apply(obj))
        .await
        .map_err(kube_err("apply", kind, ns, &name))
}

/// Reconciles one AgentCell: wraps [`apply`] and [`cleanup`] in kube-rs's finalizer helper and
/// counts the outcome.
///
/// # Errors
/// [`Error`] from any step; the controller calls [`error_policy`] with it.
pub async fn reconcile(cell: Arc<AgentCellResource>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = cell.namespace().unwrap_or_else(|| "default".into());
    let key = format!("{ns}/{}", cell.name_any());
    let api: Api<AgentCellResource> = Api::namespaced(ctx.client.clone(), &ns);
    let span = tracing::info_span!("reconcile", cell.name = %cell.name_any(), cell.namespace = %ns);
    let result = finalizer(&api, FINALIZER, cell, |event| async {
        match event {
            Event::Apply(cell) => apply(cell, ctx.clone()).await,
            Event::Cleanup(cell) => cleanup(cell, ctx.clone()).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    match &result {
        Ok(action) => {
            ctx.backoff.succeeded(&key);
            ctx.metrics.reconciled(started.elapsed().as_secs_f64());
            tracing::debug!(cell = %key, ?action, "reconciled");
        }
        Err(e) => {
            // Counted in error_policy, which the controller calls for every error.
            tracing::debug!(cell = %key, error = %e, "reconcile failed");
        }
    }
    result
}

/// What the controller does after a failed reconcile: count it by label, log it, and retry with
/// exponential backoff per cell (2 s, 4 s, ... up to 5 min: [`crate::backoff`]).
pub fn error_policy(cell: Arc<AgentCellResource>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!(
        "{}/{}",
        cell.namespace().unwrap_or_default(),
        cell.name_any()
    );
    ctx.metrics.failed(error.label());
    let (attempts, delay) = ctx.backoff.failed(&key);
    tracing::warn!(cell = %key, reason = error.label(), error = %error, attempts, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn write_status(
    ctx: &Context,
    cell: &AgentCellResource,
    desired: &AgentCellStatus,
) -> Result<(), Error> {
    if !status::needs_write(cell, desired) {
        return Ok(());
    }
    let ns = cell.namespace().unwrap_or_default();
    let name = cell.name_any();
    let api: Api<AgentCellResource> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(
        &name,
        &apply_params(),
        &Patch::Apply(status::status_patch(desired)),
    )
    .await
    .map_err(kube_err("apply", "AgentCell status", &ns, &name))?;
    let old = cell.status.as_ref().and_then(|s| s.phase.clone());
    if old != desired.phase {
        ctx.event(
            "cell_phase",
            AuditEvent {
                namespace: Some(ns),
                cell: Some(name),
                reasons: vec![format!(
                    "{} -> {}",
                    old.as_deref().unwrap_or("-"),
                    desired.phase.as_deref().unwrap_or("-")
                )],
                ..AuditEvent::default()
            },
        );
    }
    Ok(())
}

fn now_rfc3339(ctx: &Context) -> Result<String, Error> {
    Ok(token::rfc3339(ctx.clock.now())?)
}

/// Brings a live cell's children and status to what its spec asks.
///
/// An invalid spec or a refused template writes only the status (phase `Invalid`, the message
/// naming the field) and changes no child. A changed template deletes the pod; the next reconcile
/// (requeued shortly, and triggered by the pod's deletion) creates the new one. Capability and
/// `suspended` changes never touch the pod: nodes enforce them.
///
/// # Errors
/// [`Error`] on any failed API call or when a token cannot be minted.
pub async fn apply(cell: Arc<AgentCellResource>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = cell.namespace().unwrap_or_default();
    let name = cell.name_any();
    let now = ctx.clock.now();

    let model = cell.to_model();
    let pod_desired = desired::pod(&cell, &ctx.settings);
    let refusal = match (&model, &pod_desired) {
        (Err(e), _) => Some(e.to_string()),
        (Ok(_), Err(DesiredError::Template(e))) => Some(e.to_string()),
        (Ok(_), Err(e @ DesiredError::MissingMetadata(_))) => {
            return Err(Error::Desired(e.clone()))
        }
        (Ok(_), Ok(_)) => None,
    };
    let (Some(model), Ok(pod_desired)) = (model.ok(), pod_desired) else {
        let reason = refusal.unwrap_or_default();
        tracing::info!(cell.name = %name, cell.namespace = %ns, %reason, "spec refused");
        let st = status::compute(&Observation {
            cell: &cell,
            validity: Err(reason),
            token: None,
            pod: PodObservation::unknown(),
            now: now_rfc3339(&ctx)?,
        });
        write_status(&ctx, &cell, &st).await?;
        return Ok(Action::await_change());
    };

    let client = &ctx.client;
    let sa = desired::service_account(&cell).map_err(Error::Desired)?;
    apply_child::<ServiceAccount>(client, &ns, &sa).await?;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret_name = token_secret_name(&name);
    let existing = secrets.get_opt(&secret_name).await.map_err(kube_err(
        "get",
        "Secret",
        &ns,
        &secret_name,
    ))?;
    let current = match token::decide(existing.as_ref(), &model, ctx.signing_key.kid(), now) {
        TokenDecision::Keep(t) => t,
        TokenDecision::Mint(reason) => {
            let t = token::mint(
                &ctx.signing_key,
                &model,
                now,
                ctx.token_ttl,
                ctx.clock.token_id(),
            )?;
            ctx.metrics.minted(reason);
            tracing::info!(cell.name = %name, cell.namespace = %ns, token.jti = %t.issued.id, %reason, "minted token");
            let replaced = existing
                .as_ref()
                .and_then(|s| s.metadata.annotations.as_ref())
                .and_then(|a| a.get(ANNOTATION_TOKEN_ID))
                .cloned();
            let mut reasons = vec![reason.to_string(), format!("expires {}", t.issued.expiry)];
            if let Some(old) = &replaced {
                reasons.push(format!("replaces token {old}"));
            }
            ctx.event(
                if replaced.is_some() {
                    "token_rotated"
                } else {
                    "token_minted"
                },
                AuditEvent {
                    namespace: Some(ns.clone()),
                    cell: Some(name.clone()),
                    token_id: Some(t.issued.id.clone()),
                    reasons,
                },
            );
            t
        }
    };
    let secret = desired::token_secret(&cell, &current.issued).map_err(Error::Desired)?;
    apply_child::<Secret>(client, &ns, &secret).await?;

    let bundle = ctx.trust.current();
    let mut ca = desired::ca_bundle(&cell, &bundle).map_err(Error::Desired)?;
    // Which cell CAs it holds: what a CA rotation waits for.
    crate::ca::annotate_bundle(&mut ca, &bundle);
    apply_child::<ConfigMap>(client, &ns, &ca).await?;

    let np = desired::network_policy(&cell, &ctx.settings).map_err(Error::Desired)?;
    apply_child::<NetworkPolicy>(client, &ns, &np).await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pname = pod_name(&name);
    let want_hash = pod_desired
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_TEMPLATE_HASH))
        .cloned();
    let observed = match pods
        .get_opt(&pname)
        .await
        .map_err(kube_err("get", "Pod", &ns, &pname))?
    {
        None => {
            let created = apply_child::<Pod>(client, &ns, &pod_desired).await?;
            PodObservation::of(&created)
        }
        Some(p) if p.metadata.deletion_timestamp.is_some() => PodObservation::recreating(),
        Some(p) => {
            let have = p
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_TEMPLATE_HASH))
                .cloned();
            if have == want_hash {
                PodObservation::of(&p)
            } else {
                tracing::info!(cell.name = %name, cell.namespace = %ns, old = ?have, new = ?want_hash, "template changed: recreating the pod");
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: p.metadata.uid.clone(),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                pods.delete(&pname, &dp)
                    .await
                    .map_err(kube_err("delete", "Pod", &ns, &pname))?;
                PodObservation::recreating()
            }
        }
    };
    let recreating = observed.state == status::PodState::Recreating;

    let st = status::compute(&Observation {
        cell: &cell,
        validity: Ok(()),
        token: Some((current.issued.id.clone(), current.issued.expiry.clone())),
        pod: observed,
        now: now_rfc3339(&ctx)?,
    });
    write_status(&ctx, &cell, &st).await?;

    let until_rotation = current.rotation_due().saturating_sub(now).max(1);
    let mut requeue = Duration::from_secs(u64::try_from(until_rotation).unwrap_or(1));
    if recreating {
        requeue = requeue.min(RECREATE_REQUEUE);
    }
    Ok(Action::requeue(requeue))
}

/// The tokens of a deleted cell to revoke: the one in its Secret, and the one its status names
/// when different (`jti`, expiry).
pub fn tokens_to_revoke(
    cell: &AgentCellResource,
    secret: Option<&Secret>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(a) = secret.and_then(|s| s.metadata.annotations.as_ref()) {
        if let (Some(id), Some(exp)) = (a.get(ANNOTATION_TOKEN_ID), a.get(ANNOTATION_TOKEN_EXPIRY))
        {
            out.push((id.clone(), exp.clone()));
        }
    }
    if let Some(st) = &cell.status {
        if let (Some(id), Some(exp)) = (&st.token_id, &st.token_expiry) {
            if !out.iter().any(|(j, _)| j == id) {
                out.push((id.clone(), exp.clone()));
            }
        }
    }
    out
}

/// Revokes a deleted cell's tokens: marks the status `Terminating`, then writes each token's
/// `jti` and expiry into `cellgate-revocations` (creating it when missing, pruning expired
/// entries). Only when this succeeds does the finalizer helper remove the finalizer; the owned
/// objects then go by garbage collection.
///
/// # Errors
/// [`Error`] on any failed API call; the finalizer stays and the cleanup is retried.
pub async fn cleanup(cell: Arc<AgentCellResource>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = cell.namespace().unwrap_or_default();
    let name = cell.name_any();
    write_status(&ctx, &cell, &status::terminating(&cell)).await?;

    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let secret_name = token_secret_name(&name);
    let secret = secrets.get_opt(&secret_name).await.map_err(kube_err(
        "get",
        "Secret",
        &ns,
        &secret_name,
    ))?;
    let revoke = tokens_to_revoke(&cell, secret.as_ref());

    let cns = &ctx.control_namespace;
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), cns);
    let list = cms.get_opt(REVOCATIONS_CONFIGMAP).await.map_err(kube_err(
        "get",
        "ConfigMap",
        cns,
        REVOCATIONS_CONFIGMAP,
    ))?;
    let existing = list
        .as_ref()
        .and_then(|cm| cm.data.clone())
        .unwrap_or_default();
    let changes = revocations::changes(&existing, &revoke, ctx.clock.now());
    if !changes.is_empty() {
        if list.is_some() {
            cms.patch(
                REVOCATIONS_CONFIGMAP,
                &PatchParams::default(),
                &Patch::Merge(revocations::merge_patch(&changes)),
            )
            .await
            .map_err(kube_err("patch", "ConfigMap", cns, REVOCATIONS_CONFIGMAP))?;
        } else {
            cms.create(
                &PostParams::default(),
                &revocations::new_configmap(cns, &changes),
            )
            .await
            .map_err(kube_err("create", "ConfigMap", cns, REVOCATIONS_CONFIGMAP))?;
        }
    }
    for (jti, expiry) in &revoke {
        tracing::info!(cell.name = %name, cell.namespace = %ns, token.jti = %jti, "revoked token of deleted cell");
        ctx.event(
            "token_revoked",
            AuditEvent {
                namespace: Some(ns.clone()),
                cell: Some(name.clone()),
                token_id: Some(jti.clone()),
                reasons: vec!["cell deleted".into(), format!("expires {expiry}")],
            },
        );
    }
    Ok(Action::await_change())
}
