//! Where the node's policy comes from: the base policy (built into the binary, or `--base-policy`)
//! plus the packs in `--policies`, polled for changes.
//!
//! A change is loaded, self-tested and compiled off to the side; only a set that passes replaces
//! the serving one. A refusal is kept (with `file:line`) for `/readyz` and the logs, and is not
//! retried until the files change again.
//!
//! In Kubernetes mode, once any accepted `CellgatePolicy` or `CellgateClusterPolicy` exists, the
//! set is exactly the accepted versions of those ([`PolicySource::set_kubernetes`], fed by
//! [`crate::kubernetes`]); the directories serve only while there is none.

use std::path::PathBuf;
use std::sync::Mutex;

use cellgate_policy::{PolicyError, PolicyFile, PolicySet, PolicyStore};
use sha2::{Digest, Sha256};

/// The base policy built into the binary.
pub const BUILTIN_BASE_POLICY: &[(&str, &str)] = &[
    (
        "cellgate.rego",
        include_str!("../../../policies/base/cellgate.rego"),
    ),
    (
        "cellgate_test.rego",
        include_str!("../../../policies/base/cellgate_test.rego"),
    ),
];

/// What a poll did.
#[derive(Debug, PartialEq, Eq)]
pub enum Polled {
    /// Nothing changed.
    Unchanged,
    /// A new set serves now.
    Installed(String),
    /// The new files were refused; the previous set (if any) stays.
    Refused(String),
}

/// The policy sources of a node.
#[derive(Debug)]
pub struct PolicySource {
    base: Option<PathBuf>,
    extras: Vec<PathBuf>,
    last: Mutex<Option<[u8; 32]>>,
    error: Mutex<Option<String>>,
    kubernetes: Mutex<Option<Vec<PolicyFile>>>,
}

impl PolicySource {
    /// Sources: `base` (or the built-in base) and the pack directories.
    pub fn new(base: Option<PathBuf>, extras: Vec<PathBuf>) -> Self {
        Self {
            base,
            extras,
            last: Mutex::new(None),
            error: Mutex::new(None),
            kubernetes: Mutex::new(None),
        }
    }

    /// The files of the accepted policies from the API server, replacing the directories (`None`
    /// or empty: back to the directories). Applied by the next [`PolicySource::poll`].
    pub fn set_kubernetes(&self, files: Option<Vec<PolicyFile>>) {
        *self
            .kubernetes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = files.filter(|f| !f.is_empty());
    }

    /// Why the last change was refused, while it stays refused.
    pub fn last_error(&self) -> Option<String> {
        self.error.lock().ok()?.clone()
    }

    fn files(&self) -> Result<Vec<PolicyFile>, PolicyError> {
        if let Some(files) = self
            .kubernetes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
        {
            return Ok(files);
        }
        let mut files = match &self.base {
            Some(dir) => cellgate_policy::set::read_policy_files(dir, &[])?,
            None => BUILTIN_BASE_POLICY
                .iter()
                .map(|(name, source)| PolicyFile {
                    path: PathBuf::from(format!("builtin/policies/base/{name}")),
                    relative: format!("base/{name}"),
                    source: (*source).to_string(),
                })
                .collect(),
        };
        for dir in &self.extras {
            if !dir.exists() {
                continue;
            }
            match cellgate_policy::set::read_policy_files(dir, &[]) {
                Ok(more) => files.extend(more.into_iter().map(|mut f| {
                    f.relative = format!("packs/{}", f.relative);
                    f
                })),
                // An empty packs directory is fine: the base alone decides.
                Err(PolicyError::NoPolicies(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(files)
    }

    /// Reloads into `store` if the files changed since the last poll.
    pub fn poll(&self, store: &PolicyStore) -> Polled {
        let files = self.files();
        let mut h = Sha256::new();
        match &files {
            Ok(fs) => {
                for f in fs {
                    h.update(f.relative.as_bytes());
                    h.update([0]);
                    h.update(f.source.as_bytes());
                    h.update([0]);
                }
            }
            Err(e) => h.update(e.to_string().as_bytes()),
        }
        let print: [u8; 32] = h.finalize().into();
        {
            let Ok(mut last) = self.last.lock() else {
                return Polled::Unchanged;
            };
            if *last == Some(print) {
                return Polled::Unchanged;
            }
            *last = Some(print);
        }
        let result = files.and_then(PolicySet::from_files);
        let mut error = self
            .error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Ok(set) => {
                *error = None;
                let version = store.install(set);
                tracing::info!(policy.version = %version, "policy loaded");
                Polled::Installed(version)
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::warn!(error = %msg, serving = ?store.current().map(|s| s.version().to_string()), "policy refused; the previous policy stays in force");
                *error = Some(msg.clone());
                Polled::Refused(msg)
            }
        }
    }
}
