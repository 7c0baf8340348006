//! The audit file as the exporter's spool: a durable cursor and a reader that resumes from it.
//!
//! The exporter never keeps records of its own. It reads the audit log, from the byte offset of
//! the first record not yet exported, up to the log's durable head (`<log>.head`: the last
//! record the writer synced), and after the collector accepted a batch it moves the cursor past
//! it. The cursor lives in `<log>.otlp-cursor`:
//!
//! ```json
//! {"hash":"<hash of the last exported record>","offset":<byte offset after it>,"seq":<its seq>}
//! ```
//!
//! written to a temporary file, synced and renamed over the old one, so a crash leaves the old
//! cursor or the new one, never a torn one. A cursor that does not match the log (the record at
//! its offset is not `seq + 1` chained to `hash`: the log was replaced or restored from a
//! backup) is discarded and the export starts again from the first record: delivery is at least
//! once, and the record hash is the receiver's dedupe key.
//!
//! Only durable records are read: a record the writer has written but not yet synced could be
//! lost in a crash and replaced by a different record with the same `seq`, and an exported copy
//! of it would then contradict the log.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use cellgate_audit::{head_path, read_head, Record, MAX_LINE_LEN, ZERO_HASH};
use serde::{Deserialize, Serialize};

/// Where the export stands: the last record the collector accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cursor {
    /// `seq` of the last exported record (0: none yet).
    pub seq: u64,
    /// Byte offset just after that record's line.
    pub offset: u64,
    /// `hash` of that record (64 `0` before the first).
    pub hash: String,
}

impl Cursor {
    /// Before the first record.
    #[must_use]
    pub fn start() -> Cursor {
        Cursor {
            seq: 0,
            offset: 0,
            hash: ZERO_HASH.to_owned(),
        }
    }
}

/// Where the cursor of the log at `log` lives: `<log>.otlp-cursor`.
#[must_use]
pub fn cursor_path(log: &Path) -> PathBuf {
    let mut name = OsString::from(log.as_os_str());
    name.push(".otlp-cursor");
    PathBuf::from(name)
}

/// Why the spool cannot be read or the cursor not saved.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// An I/O error on the log, its head or the cursor.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A line of the log that is not a record (the log is damaged: `cellgate audit verify`).
    #[error("{path}: the line at byte {offset} is not an audit record: {message}")]
    Corrupt {
        /// The log.
        path: PathBuf,
        /// Where the line starts.
        offset: u64,
        /// What is wrong.
        message: String,
    },
}

/// Reads the cursor; a missing one is the start, an unreadable one is reported and treated as
/// the start (at least once: the backlog is sent again, never skipped).
#[must_use]
pub fn load_cursor(log: &Path) -> Cursor {
    let path = cursor_path(log);
    match fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<Cursor>(&bytes) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e,
                    "export cursor unreadable: exporting the audit log again from its first record");
                Cursor::start()
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Cursor::start(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e,
                "export cursor unreadable: exporting the audit log again from its first record");
            Cursor::start()
        }
    }
}

/// Saves the cursor atomically (temporary file, `sync_data`, rename).
///
/// # Errors
/// [`SpoolError::Io`] naming the file.
pub fn save_cursor(log: &Path, cursor: &Cursor) -> Result<(), SpoolError> {
    let path = cursor_path(log);
    let mut tmp = OsString::from(path.as_os_str());
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let io_err = |source| SpoolError::Io {
        path: path.clone(),
        source,
    };
    let body = serde_json::to_vec(cursor).map_err(|e| io_err(io::Error::other(e)))?;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err)?;
    f.write_all(&body).map_err(io_err)?;
    f.sync_data().map_err(io_err)?;
    fs::rename(&tmp, &path).map_err(io_err)?;
    Ok(())
}

/// `seq` of the log's last durable record (its head anchor), 0 when there is none yet.
///
/// # Errors
/// [`SpoolError::Io`] when the head exists but cannot be read or parsed.
pub fn durable_seq(log: &Path) -> Result<u64, SpoolError> {
    let path = head_path(log);
    match read_head(&path) {
        Ok(head) => Ok(head.map_or(0, |h| h.seq)),
        Err(e) => Err(SpoolError::Io {
            path,
            source: io::Error::other(e.to_string()),
        }),
    }
}

/// One record read from the spool, with the cursor that stands after it.
#[derive(Debug, Clone)]
pub struct Spooled {
    /// The record, chain fields filled.
    pub record: Record,
    /// The cursor once this record is exported.
    pub after: Cursor,
}

/// Reads up to `max` records after `cursor`, none beyond `until` (the durable `seq`).
///
/// Returns the records and, when the cursor did not match the log, `true` with records read
/// from the start of the log instead (the caller logs and counts it).
///
/// # Errors
/// [`SpoolError`] on I/O errors or a line that is not a record.
pub fn read_batch(
    log: &Path,
    cursor: &Cursor,
    until: u64,
    max: usize,
) -> Result<(Vec<Spooled>, bool), SpoolError> {
    if until <= cursor.seq {
        return Ok((Vec::new(), false));
    }
    let first = read_from(log, cursor, until, max)?;
    if let Some(first_rec) = first.first() {
        let expected = cursor.seq.saturating_add(1);
        if first_rec.record.seq != expected || first_rec.record.prev != cursor.hash {
            return Ok((read_from(log, &Cursor::start(), until, max)?, true));
        }
    } else if cursor.seq > 0 {
        // The durable head is past the cursor but nothing follows its offset: the log was
        // replaced by a shorter one.
        return Ok((read_from(log, &Cursor::start(), until, max)?, true));
    }
    Ok((first, false))
}

fn read_from(
    log: &Path,
    cursor: &Cursor,
    until: u64,
    max: usize,
) -> Result<Vec<Spooled>, SpoolError> {
    let io_err = |source| SpoolError::Io {
        path: log.to_owned(),
        source,
    };
    let mut file = File::open(log).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if cursor.offset > len {
        return Ok(Vec::new());
    }
    file.seek(SeekFrom::Start(cursor.offset)).map_err(io_err)?;
    let limit = u64::try_from(MAX_LINE_LEN)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut out = Vec::new();
    let mut offset = cursor.offset;
    let mut line = Vec::with_capacity(1024);
    while out.len() < max {
        line.clear();
        let n = (&mut reader)
            .take(limit)
            .read_until(b'\n', &mut line)
            .map_err(io_err)?;
        if n == 0 || line.last() != Some(&b'\n') {
            // End of the file, or a line still being written: not durable yet.
            break;
        }
        let record: Record = serde_json::from_slice(&line).map_err(|e| SpoolError::Corrupt {
            path: log.to_owned(),
            offset,
            message: e.to_string(),
        })?;
        if record.seq > until {
            break;
        }
        offset = offset.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        let after = Cursor {
            seq: record.seq,
            offset,
            hash: record.hash.clone(),
        };
        out.push(Spooled { record, after });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellgate_audit::{AuditLog, Decision};

    async fn log_with(dir: &Path, n: usize) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let (log, _w) = AuditLog::open(&path, Default::default()).await.unwrap();
        for i in 0..n {
            let mut r = Record::new("n", "intake", "http", Decision::Allow, "allowed");
            r.path = Some(format!("/r/{i}"));
            log.submit(r).unwrap();
        }
        log.flush().await.unwrap();
        log.close().await.unwrap();
        path
    }

    #[tokio::test]
    async fn reads_in_chain_order_resumes_from_the_cursor_and_stops_at_the_durable_head() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 10).await;
        assert_eq!(durable_seq(&log).unwrap(), 10);
        let (first, reset) = read_batch(&log, &Cursor::start(), 10, 4).unwrap();
        assert!(!reset);
        let seqs: Vec<u64> = first.iter().map(|s| s.record.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        let cursor = first.last().unwrap().after.clone();
        save_cursor(&log, &cursor).unwrap();
        assert_eq!(load_cursor(&log), cursor);
        let (rest, reset) = read_batch(&log, &cursor, 7, 100).unwrap();
        assert!(!reset);
        let seqs: Vec<u64> = rest.iter().map(|s| s.record.seq).collect();
        assert_eq!(seqs, vec![5, 6, 7], "nothing past the durable seq");
        let (none, _) = read_batch(&log, &rest.last().unwrap().after, 7, 100).unwrap();
        assert!(none.is_empty());
    }

    #[tokio::test]
    async fn a_cursor_that_does_not_match_the_log_starts_again_from_the_first_record() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 5).await;
        let (batch, _) = read_batch(&log, &Cursor::start(), 5, 3).unwrap();
        let mut wrong = batch.last().unwrap().after.clone();
        wrong.hash = "f".repeat(64);
        let (again, reset) = read_batch(&log, &wrong, 5, 100).unwrap();
        assert!(reset, "a mismatched cursor is reported");
        assert_eq!(again.first().unwrap().record.seq, 1, "nothing is skipped");
        assert_eq!(again.len(), 5);
        // A garbage cursor file reads as the start.
        fs::write(cursor_path(&log), b"{not json").unwrap();
        assert_eq!(load_cursor(&log), Cursor::start());
    }

    #[tokio::test]
    async fn a_torn_last_line_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 2).await;
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(br#"{"seq":3,"prev":"#).unwrap();
        let (batch, _) = read_batch(&log, &Cursor::start(), 3, 100).unwrap();
        assert_eq!(batch.len(), 2);
    }
}
