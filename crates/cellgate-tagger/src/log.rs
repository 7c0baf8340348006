//! One-line log messages on stderr. The tagger deliberately has no logging framework: it logs
//! rarely (start, stop, failures) and must stay small. Messages never contain the token.

use std::fmt;
use std::io::Write as _;

fn emit(level: &str, msg: fmt::Arguments<'_>) {
    // One write per line so concurrent messages do not interleave; a failed write to stderr
    // has nowhere better to go.
    let line = format!("cellgate-tagger {level}: {msg}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Logs a normal event.
pub(crate) fn info(msg: fmt::Arguments<'_>) {
    emit("info", msg);
}

/// Logs something that went wrong but that the tagger handled.
pub(crate) fn warn(msg: fmt::Arguments<'_>) {
    emit("warn", msg);
}

/// Lets at most one message through per interval and counts the ones it holds back, so a flood
/// of the same event (an agent opening connections past its ceiling) cannot flood the log.
#[derive(Debug)]
pub(crate) struct Throttle {
    interval: std::time::Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl Throttle {
    pub(crate) const fn new(interval: std::time::Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a message may be written now, `n` being how many were held back since the
    /// last one written; `None` when this one is held back (and counted).
    pub(crate) fn admit(&mut self, now: std::time::Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed = self.suppressed.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn throttle_lets_one_message_through_per_interval_and_counts_the_rest() {
        let mut t = Throttle::new(Duration::from_secs(1));
        let start = Instant::now();
        assert_eq!(t.admit(start), Some(0), "the first message is written");
        for ms in [1, 200, 999] {
            assert_eq!(t.admit(start + Duration::from_millis(ms)), None);
        }
        let later = start + Duration::from_millis(1000);
        assert_eq!(
            t.admit(later),
            Some(3),
            "the next one reports the 3 held back"
        );
        assert_eq!(t.admit(later + Duration::from_millis(10)), None);
        assert_eq!(t.admit(later + Duration::from_secs(5)), Some(1));
        assert_eq!(t.admit(later + Duration::from_secs(10)), Some(0));
    }
}
