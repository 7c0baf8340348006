//! Per-cell ceilings, so one cell cannot take what every cell on the node shares: open intake
//! connections, and requests per second (a token bucket; a TCP relay counts as one request).
//!
//! The ceilings come from the cell's `spec.limits` or, where it sets none, the node's defaults
//! (`--cell-max-connections`, `--cell-requests-per-second`; 0 requests per second: no ceiling).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellgate_api::model::Cell;

/// The ceilings that apply to one cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ceilings {
    /// Intake connections open at once.
    pub connections: usize,
    /// Requests per second (burst: one second's worth); 0 means no ceiling.
    pub requests_per_second: u32,
}

impl Ceilings {
    /// The cell's own limits, else the node's defaults.
    pub fn of(cell: &Cell, defaults: Ceilings) -> Self {
        let own = cell.limits.as_ref();
        Self {
            connections: own
                .and_then(|l| l.connections)
                .map_or(defaults.connections, |c| {
                    usize::try_from(c).unwrap_or(usize::MAX)
                }),
            requests_per_second: own
                .and_then(|l| l.requests_per_second)
                .unwrap_or(defaults.requests_per_second),
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Counters of every cell with something open or recently active.
#[derive(Debug, Default)]
pub struct CellLimiter {
    connections: Mutex<HashMap<String, usize>>,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// An intake connection counted against its cell until dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    limiter: Arc<CellLimiter>,
    cell_uid: String,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut map = self
            .limiter
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.cell_uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.cell_uid);
            }
        }
    }
}

impl CellLimiter {
    /// Takes one of the cell's connection slots, or `None` when all `max` are taken.
    pub fn connection(self: &Arc<Self>, cell_uid: &str, max: usize) -> Option<ConnectionSlot> {
        let mut map = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(cell_uid.to_string()).or_insert(0);
        if *n >= max {
            if *n == 0 {
                map.remove(cell_uid);
            }
            return None;
        }
        *n = n.saturating_add(1);
        Some(ConnectionSlot {
            limiter: self.clone(),
            cell_uid: cell_uid.to_string(),
        })
    }

    /// Connections the cell has open.
    pub fn open(&self, cell_uid: &str) -> usize {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(cell_uid)
            .copied()
            .unwrap_or(0)
    }

    /// Takes one request from the cell's bucket; `Err(retry_after)` when it is empty.
    ///
    /// # Errors
    /// When the cell is over its rate, with how long until a request would be let through.
    pub fn request(&self, cell_uid: &str, per_second: u32) -> Result<(), Duration> {
        if per_second == 0 {
            return Ok(());
        }
        let rate = f64::from(per_second);
        let now = Instant::now();
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 65_536 {
            // Forget buckets that have refilled: they carry no state worth keeping.
            map.retain(|_, b| now.duration_since(b.last).as_secs_f64() * rate < rate);
        }
        let b = map.entry(cell_uid.to_string()).or_insert(Bucket {
            tokens: rate,
            last: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(rate);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_are_counted_per_cell_and_released() {
        let l = Arc::new(CellLimiter::default());
        let a1 = l.connection("a", 2).unwrap();
        let _a2 = l.connection("a", 2).unwrap();
        assert!(
            l.connection("a", 2).is_none(),
            "a third slot over the ceiling"
        );
        let _b = l.connection("b", 2).expect("another cell is not affected");
        drop(a1);
        assert_eq!(l.open("a"), 1);
        assert!(l.connection("a", 2).is_some());
        assert!(l.connection("c", 0).is_none());
        assert_eq!(l.open("c"), 0);
    }

    #[test]
    fn the_rate_is_exact_within_a_second_and_refills() {
        let l = CellLimiter::default();
        let ok = (0..50).filter(|_| l.request("a", 10).is_ok()).count();
        assert_eq!(ok, 10, "a burst of one second's worth");
        let wait = l.request("a", 10).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(l.request("b", 10).is_ok(), "per cell");
        std::thread::sleep(Duration::from_millis(120));
        assert!(l.request("a", 10).is_ok(), "refilled");
        assert!(
            (0..1000).all(|_| l.request("c", 0).is_ok()),
            "0: no ceiling"
        );
    }
}
