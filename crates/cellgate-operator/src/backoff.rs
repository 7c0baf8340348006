//! The retry backoff of the controllers' error policies, one counter per object.
//!
//! kube-runtime's `Controller` calls the error policy after every failed reconcile and requeues
//! the object after the delay it returns. Each controller (AgentCells, and the two policy kinds)
//! keeps a [`Backoff`]: the n-th consecutive failure of one object waits [`delay`]`(n)` =
//! [`BACKOFF_BASE`] · 2^(n-1), at most [`BACKOFF_MAX`] (2 s, 4 s, 8 s, ... 5 min); a successful
//! reconcile of that object starts it again from [`BACKOFF_BASE`]. Other objects are not slowed
//! by one that keeps failing. A watch event on the object (it or a child changed) still
//! reconciles it at once: the scheduler keeps the earlier of the two times.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// First retry delay after an error; doubled per consecutive failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(2);
/// Longest retry delay after errors.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The retry delay after `attempts` consecutive failures (1 is the first failure).
pub fn delay(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1u32 << exp).min(BACKOFF_MAX)
}

/// Consecutive failures per object (`namespace/name`, or `name` for cluster-scoped objects).
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Counts one more failure of `key`; returns the count and the delay before the retry.
    pub fn failed(&self, key: &str) -> (u32, Duration) {
        let mut f = self.lock();
        let n = f.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        (*n, delay(*n))
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_per_object_caps_and_resets() {
        assert_eq!(delay(1), Duration::from_secs(2));
        assert_eq!(delay(2), Duration::from_secs(4));
        assert_eq!(delay(5), Duration::from_secs(32));
        assert_eq!(delay(9), BACKOFF_MAX);
        assert_eq!(delay(u32::MAX), BACKOFF_MAX);
        let b = Backoff::default();
        assert_eq!(b.failed("a/x"), (1, Duration::from_secs(2)));
        assert_eq!(b.failed("a/x"), (2, Duration::from_secs(4)));
        // Another object starts from the base.
        assert_eq!(b.failed("a/y"), (1, Duration::from_secs(2)));
        b.succeeded("a/x");
        assert_eq!(b.failed("a/x"), (1, Duration::from_secs(2)));
    }
}
