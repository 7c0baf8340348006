//! Errors of the writer ([`AuditError`]) and of verification ([`VerifyError`], with a stable
//! [`Fault`] label per kind of damage).

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Why a record could not be accepted, or the log could not be opened.
///
/// A caller that gets any error from `submit` or `submit_durable` must fail closed: the
/// decision it was about to act on has no audit record.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The queue to the writer is full: the disk is not keeping up.
    #[error("audit queue is full ({capacity} records waiting); refusing the request rather than dropping its record")]
    Overflow {
        /// Capacity of the queue.
        capacity: usize,
    },
    /// The writer hit an I/O error; nothing more can be appended.
    #[error("audit log is unavailable after a write failure: {reason}")]
    Unavailable {
        /// The failure, as first reported by the writer.
        reason: String,
    },
    /// The log was closed.
    #[error("audit log is closed")]
    Closed,
    /// The existing log does not verify; appending would extend a broken chain.
    #[error("audit log {path} does not verify, refusing to append to it: {source} (move the file and its .head aside to keep them as evidence, then start a new log)")]
    Broken {
        /// The log file.
        path: PathBuf,
        /// What is wrong with it.
        source: VerifyError,
    },
    /// Another writer holds the log's lock.
    #[error("audit log {path} is locked by another writer (is a second node process running on this file?)")]
    Locked {
        /// The log file.
        path: PathBuf,
    },
    /// The log file or its head could not be opened or read.
    #[error("cannot open audit log {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// An option is out of range.
    #[error("invalid audit option {name} = {value}: {hint}")]
    InvalidOptions {
        /// Option name.
        name: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        hint: &'static str,
    },
}

impl AuditError {
    /// Short snake_case label for metrics and for the reason of the refused request.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            AuditError::Overflow { .. } => "audit_overflow",
            AuditError::Unavailable { .. } => "audit_unavailable",
            AuditError::Closed => "audit_closed",
            AuditError::Broken { .. } => "audit_broken",
            AuditError::Locked { .. } => "audit_locked",
            AuditError::Open { .. } => "audit_open_failed",
            AuditError::InvalidOptions { .. } => "audit_invalid_options",
        }
    }
}

/// The kind of damage found by verification. [`Fault::label`] is stable: scripts match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// A record's hash does not match its content, or its `prev` does not match the record
    /// before it although the sequence numbers are contiguous.
    Modified,
    /// The sequence jumps forward and the missing records appear nowhere later: records were
    /// removed from the middle (or the start).
    Deleted,
    /// The sequence goes backwards or repeats, or jumps forward to a record whose predecessors
    /// appear later in the file.
    Reordered,
    /// The last line is incomplete, or the head anchor names records beyond the end of the file.
    Truncated,
    /// A line (or the head anchor) is not a record: not JSON, not an object, missing or
    /// mistyped chain fields, or longer than [`crate::MAX_LINE_LEN`].
    Malformed,
}

impl Fault {
    /// `modified`, `deleted`, `reordered`, `truncated` or `malformed`.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Fault::Modified => "modified",
            Fault::Deleted => "deleted",
            Fault::Reordered => "reordered",
            Fault::Truncated => "truncated",
            Fault::Malformed => "malformed",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Why a log does not verify: the first bad record, or a read failure.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The first bad record. Displays as `record 7 (line 7): modified: hash does not match its content`.
    #[error("record {seq} (line {line}): {kind}: {detail}")]
    Record {
        /// The record's `seq` as found on the line; for a line that cannot be read as a record,
        /// the `seq` that was expected there.
        seq: u64,
        /// 1-based line number in the file (one past the last line for records missing at the end).
        line: u64,
        /// What is wrong.
        kind: Fault,
        /// Human-readable detail.
        detail: String,
    },
    /// The head anchor exists but is not a head.
    #[error("head anchor {path}: malformed: {detail}")]
    Head {
        /// The head file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The log or its head could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file (`<reader>` when verifying a reader).
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

impl VerifyError {
    /// The kind of damage, `None` for a read failure.
    #[must_use]
    pub fn fault(&self) -> Option<Fault> {
        match self {
            VerifyError::Record { kind, .. } => Some(*kind),
            VerifyError::Head { .. } => Some(Fault::Malformed),
            VerifyError::Io { .. } => None,
        }
    }

    /// Stable label: the [`Fault::label`], or `io` for a read failure.
    #[must_use]
    pub fn label(&self) -> &'static str {
        self.fault().map_or("io", Fault::label)
    }

    /// `(seq, line)` of the first bad record, when the error is about one.
    #[must_use]
    pub fn position(&self) -> Option<(u64, u64)> {
        match self {
            VerifyError::Record { seq, line, .. } => Some((*seq, *line)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_record_line_and_kind() {
        let e = VerifyError::Record {
            seq: 7,
            line: 7,
            kind: Fault::Modified,
            detail: "hash does not match its content".into(),
        };
        assert_eq!(
            e.to_string(),
            "record 7 (line 7): modified: hash does not match its content"
        );
        assert_eq!(e.label(), "modified");
        assert_eq!(e.position(), Some((7, 7)));
    }
}
