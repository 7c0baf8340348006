//! Leader election: of the operator's replicas, only the one holding the Lease runs the
//! controllers. Start at [`Elector::lead`].
//!
//! The lock is the `coordination.k8s.io/v1` Lease [`LEASE_NAME`] in the control namespace, and
//! the protocol is client-go's `leaderelection` with its timings ([`LeaseTimings`]: 15 s, 10 s,
//! 2 s by default):
//! - every `retry_period` a replica reads the Lease. Missing: it creates it naming itself (a
//!   replica that loses the race gets 409 AlreadyExists). Held by another replica: it waits until
//!   it has seen the Lease unchanged for `leaseDurationSeconds`, measured on its own monotonic
//!   clock from the moment it last saw it change (never by comparing the holder's `renewTime`
//!   with its own wall clock, so clock skew between nodes does not matter), then takes it over
//!   with an update carrying the `resourceVersion` it read (a replica that loses that race gets
//!   409 Conflict). Free (`holderIdentity` empty: released) it takes it at once.
//! - the leader renews the same way every `retry_period`. When it has not renewed for
//!   `renew_deadline`, or reads the Lease naming another holder, it has lost: [`Elector::hold`]
//!   returns and [`Elector::lead`] drops the leader's work at once. Because `renew_deadline` <
//!   `lease_duration`, the old leader has stopped before a standby may take the Lease over.
//! - a leader that stops on its own (graceful shutdown) releases the Lease (holder emptied,
//!   `leaseDurationSeconds: 1`) so that a standby takes over within one `retry_period`.
//!
//! Differences from client-go, both on the safe side: no jitter on the retry period, and a
//! leader stops as soon as it reads another holder in the Lease instead of retrying until its
//! renew deadline. The protocol is cooperative: it excludes only replicas that follow it.
//! `renewTime` and `acquireTime` are written with whole seconds (from [`Clock`]), for people
//! and tools; no decision reads them.

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::time::Instant;

use crate::config::LeaseTimings;
use crate::reconcile::Clock;

/// Name of the Lease in the control namespace.
pub const LEASE_NAME: &str = "cellgate-operator";

/// What the election last saw; read by `/readyz` and the run loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Leadership {
    /// No attempt has reached the API server yet.
    #[default]
    Unknown,
    /// This replica holds the Lease and runs the controllers.
    Leading,
    /// Another replica holds the Lease (its identity, when the Lease names one).
    Standby {
        /// The holder, as the Lease names it.
        holder: Option<String>,
    },
}

/// The [`Leadership`] shared between the elector and the admin listener's thread.
#[derive(Debug, Default)]
pub struct LeaderStatus(Mutex<Leadership>);

impl LeaderStatus {
    /// The last state.
    pub fn get(&self) -> Leadership {
        self.lock().clone()
    }

    pub(crate) fn set(&self, l: Leadership) {
        *self.lock() = l;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Leadership> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Where the Lease is and who this replica is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionConfig {
    /// Namespace of the Lease (the control namespace).
    pub namespace: String,
    /// Name of the Lease ([`LEASE_NAME`]).
    pub name: String,
    /// This replica's identity (its pod name): unique among the replicas.
    pub identity: String,
    /// client-go's three timings.
    pub timings: LeaseTimings,
}

/// Why an API call of the election failed (the attempt is retried).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API server refused or failed the call.
    #[error("{verb} lease {namespace}/{name}: {source}")]
    Kube {
        /// `get`, `create` or `update`.
        verb: &'static str,
        /// The Lease's namespace.
        namespace: String,
        /// The Lease's name.
        name: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The call did not answer in time.
    #[error("lease {namespace}/{name}: no answer within {timeout:?}")]
    Timeout {
        /// The Lease's namespace.
        namespace: String,
        /// The Lease's name.
        name: String,
        /// The bound.
        timeout: Duration,
    },
}

/// The result of one attempt to acquire or renew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the Lease (created, taken over or renewed).
    Holding,
    /// Another replica holds the Lease and it has not expired.
    HeldBy(Option<String>),
    /// Another replica wrote the Lease between the read and the write (409): lost the race.
    Conflict,
}

/// Why a leader stopped leading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// No renewal succeeded for the renew deadline; the last error, if any.
    RenewDeadline(Option<String>),
    /// The Lease names another holder.
    TakenBy(Option<String>),
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::RenewDeadline(Some(e)) => {
                write!(f, "the lease could not be renewed before the deadline: {e}")
            }
            Lost::RenewDeadline(None) => {
                write!(f, "the lease could not be renewed before the deadline")
            }
            Lost::TakenBy(h) => write!(
                f,
                "the lease is held by {}",
                h.as_deref().unwrap_or("another replica")
            ),
        }
    }
}

/// How [`Elector::lead`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Shut down while standing by: nothing was held.
    Standby,
    /// The work ended (graceful shutdown) while leading; the Lease was released.
    Finished,
    /// Leadership was lost; the work was dropped at once.
    Lost(Lost),
}

#[derive(Debug, Clone)]
struct Observed {
    spec: LeaseSpec,
    lease: Lease,
    /// When this replica last saw the spec change (its own monotonic clock).
    at: Instant,
}

/// One replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    config: ElectionConfig,
    clock: Arc<dyn Clock>,
    status: Arc<LeaderStatus>,
    observed: Option<Observed>,
}

impl std::fmt::Debug for Elector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Elector")
            .field("config", &self.config)
            .field("status", &self.status.get())
            .finish_non_exhaustive()
    }
}

fn micro_time(secs: i64) -> MicroTime {
    MicroTime(jiff::Timestamp::from_second(secs).unwrap_or(jiff::Timestamp::UNIX_EPOCH))
}

fn holder_of(spec: &LeaseSpec) -> Option<String> {
    spec.holder_identity.clone().filter(|h| !h.is_empty())
}

impl Elector {
    /// An elector for `config`, publishing what it sees in `status`.
    pub fn new(
        client: Client,
        config: ElectionConfig,
        clock: Arc<dyn Clock>,
        status: Arc<LeaderStatus>,
    ) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            clock,
            status,
            observed: None,
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    fn kube_err(&self, verb: &'static str) -> impl FnOnce(kube::Error) -> LeaseError {
        let (namespace, name) = (self.config.namespace.clone(), self.config.name.clone());
        move |source| LeaseError::Kube {
            verb,
            namespace,
            name,
            source,
        }
    }

    fn record(&self, now: i64, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        let secs = i32::try_from(self.config.timings.lease_duration.as_secs()).unwrap_or(i32::MAX);
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(secs),
            acquire_time: Some(acquired.unwrap_or_else(|| micro_time(now))),
            renew_time: Some(micro_time(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    fn observe(&mut self, lease: Lease) {
        let spec = lease.spec.clone().unwrap_or_default();
        let changed = self.observed.as_ref().is_none_or(|o| o.spec != spec);
        let at = match &self.observed {
            Some(o) if !changed => o.at,
            _ => Instant::now(),
        };
        self.observed = Some(Observed { spec, lease, at });
    }

    /// One attempt, client-go's `tryAcquireOrRenew`: read the Lease, then create, take over or
    /// renew it when this replica may (see the module docs).
    ///
    /// # Errors
    /// [`LeaseError`] when a call fails for another reason than losing a race.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, LeaseError> {
        let now = self.clock.now();
        let name = self.config.name.clone();
        let current = self
            .api
            .get_opt(&name)
            .await
            .map_err(self.kube_err("get"))?;
        let Some(current) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    labels: Some(
                        [
                            ("app.kubernetes.io/name".to_string(), "cellgate".to_string()),
                            (
                                "app.kubernetes.io/component".to_string(),
                                "operator".to_string(),
                            ),
                        ]
                        .into(),
                    ),
                    ..ObjectMeta::default()
                },
                spec: Some(self.record(now, None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(created);
                    Ok(Attempt::Holding)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Conflict),
                Err(e) => Err(self.kube_err("create")(e)),
            };
        };
        self.observe(current.clone());
        let Some(observed) = &self.observed else {
            return Ok(Attempt::Conflict);
        };
        let spec = observed.spec.clone();
        let holder = holder_of(&spec);
        let mine = holder.as_deref() == Some(self.config.identity.as_str());
        if holder.is_some() && !mine {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.config.timings.lease_duration, Duration::from_secs);
            if observed.at + duration > Instant::now() {
                return Ok(Attempt::HeldBy(holder));
            }
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        let spec = if mine {
            self.record(now, spec.acquire_time.clone(), transitions)
        } else {
            self.record(now, None, transitions.saturating_add(1))
        };
        let mut updated = current;
        updated.spec = Some(spec);
        // The update carries the resourceVersion read above: the API server refuses it (409)
        // when another replica wrote the Lease in between.
        match self
            .api
            .replace(&name, &PostParams::default(), &updated)
            .await
        {
            Ok(l) => {
                if !mine {
                    tracing::info!(lease.holder = %self.config.identity, lease.previous = ?holder, "took the lease over");
                }
                self.observe(l);
                Ok(Attempt::Holding)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Attempt::Conflict),
            Err(e) => Err(self.kube_err("update")(e)),
        }
    }

    async fn attempt_within(&mut self, bound: Duration) -> Result<Attempt, LeaseError> {
        let (namespace, name) = (self.config.namespace.clone(), self.config.name.clone());
        tokio::time::timeout(bound, self.try_acquire_or_renew())
            .await
            .unwrap_or(Err(LeaseError::Timeout {
                namespace,
                name,
                timeout: bound,
            }))
    }

    /// Tries every `retry_period` until this replica holds the Lease.
    pub async fn acquire(&mut self) {
        let timings = self.config.timings;
        loop {
            match self.attempt_within(timings.renew_deadline).await {
                Ok(Attempt::Holding) => {
                    self.status.set(Leadership::Leading);
                    tracing::info!(lease.holder = %self.config.identity, "leading: this replica runs the controllers");
                    return;
                }
                Ok(Attempt::HeldBy(holder)) => {
                    if self.status.get()
                        != (Leadership::Standby {
                            holder: holder.clone(),
                        })
                    {
                        tracing::info!(lease.holder = ?holder, "standing by: another replica runs the controllers");
                    }
                    self.status.set(Leadership::Standby { holder });
                }
                Ok(Attempt::Conflict) => {
                    tracing::debug!("another replica wrote the lease first");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: cannot read or write the lease")
                }
            }
            tokio::time::sleep(timings.retry_period).await;
        }
    }

    /// Renews every `retry_period` while this replica leads; returns when it has lost the
    /// Lease (see [`Lost`]).
    pub async fn hold(&mut self) -> Lost {
        let timings = self.config.timings;
        let mut renewed = Instant::now();
        let mut last_error = None;
        loop {
            tokio::time::sleep(timings.retry_period).await;
            let deadline = renewed + timings.renew_deadline;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return self.lost(Lost::RenewDeadline(last_error));
            }
            match self.attempt_within(left).await {
                Ok(Attempt::Holding) => {
                    renewed = Instant::now();
                    last_error = None;
                }
                Ok(Attempt::HeldBy(holder)) => return self.lost(Lost::TakenBy(holder)),
                Ok(Attempt::Conflict) => {
                    last_error = Some("another replica wrote the lease first".to_string());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot renew the lease");
                    last_error = Some(e.to_string());
                }
            }
        }
    }

    fn lost(&mut self, why: Lost) -> Lost {
        tracing::error!(reason = %why, "lost the lease: this replica stops acting");
        let holder = match &why {
            Lost::TakenBy(h) => h.clone(),
            Lost::RenewDeadline(_) => None,
        };
        self.status.set(Leadership::Standby { holder });
        why
    }

    /// Gives the Lease up when this replica holds it, so that a standby takes over at its next
    /// try instead of after the lease duration.
    ///
    /// # Errors
    /// [`LeaseError`] when the update fails (a standby then takes over after the duration).
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        let Some(observed) = self.observed.clone() else {
            return Ok(());
        };
        if holder_of(&observed.spec).as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        let now = micro_time(self.clock.now());
        let mut released = observed.lease;
        released.spec = Some(LeaseSpec {
            holder_identity: Some(String::new()),
            lease_duration_seconds: Some(1),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: observed.spec.lease_transitions,
            ..LeaseSpec::default()
        });
        let name = self.config.name.clone();
        let bound = self.config.timings.renew_deadline;
        let result = tokio::time::timeout(
            bound,
            self.api.replace(&name, &PostParams::default(), &released),
        )
        .await;
        self.status.set(Leadership::Standby { holder: None });
        match result {
            Ok(Ok(l)) => {
                self.observe(l);
                tracing::info!("released the lease");
                Ok(())
            }
            Ok(Err(e)) => Err(self.kube_err("update")(e)),
            Err(_) => Err(LeaseError::Timeout {
                namespace: self.config.namespace.clone(),
                name,
                timeout: bound,
            }),
        }
    }

    /// Stands by until this replica holds the Lease (or `shutdown` resolves), then runs the work
    /// that `work` makes while renewing. The work is made only once leading. When the work ends
    /// (it follows the same shutdown), the Lease is released; when the Lease is lost, the work is
    /// dropped at once (its in-flight reconciles are aborted) and [`Outcome::Lost`] returned.
    pub async fn lead<W, F>(&mut self, work: W, shutdown: impl Future<Output = ()>) -> Outcome
    where
        W: FnOnce() -> F,
        F: Future<Output = ()>,
    {
        let mut shutdown = pin!(shutdown);
        tokio::select! {
            () = self.acquire() => {}
            () = &mut shutdown => return Outcome::Standby,
        }
        let work = pin!(work());
        let outcome = tokio::select! {
            () = work => None,
            lost = self.hold() => Some(lost),
        };
        match outcome {
            Some(lost) => Outcome::Lost(lost),
            None => {
                if let Err(e) = self.release().await {
                    tracing::warn!(error = %e, "could not release the lease; a standby takes over when it expires");
                }
                Outcome::Finished
            }
        }
    }
}
