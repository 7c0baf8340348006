//! Verification: streams a log line by line and names the first bad record.
//!
//! For each line, in order:
//! 1. It must be a complete line (`\n`-terminated; else [`Fault::Truncated`]) of at most
//!    [`MAX_LINE_LEN`] bytes holding a JSON object with `seq`, `prev` and `hash`
//!    (else [`Fault::Malformed`]).
//! 2. Its `hash` must match its own content and `prev` (else [`Fault::Modified`]). Checking the
//!    record on its own first is what tells an edited record apart from a moved one: a record
//!    moved or orphaned by a deletion is still intact.
//! 3. Its `seq` must be the next one and its `prev` the previous record's hash:
//!    - `seq` lower than expected: [`Fault::Reordered`] (backwards or a repeat);
//!    - `seq` higher than expected: the rest of the file is scanned for the missing numbers;
//!      found later means [`Fault::Reordered`], found nowhere means [`Fault::Deleted`];
//!    - `seq` as expected but `prev` different: [`Fault::Modified`] (this record's `prev`, or
//!      the previous record with a recomputed hash, was rewritten).
//! 4. With a head anchor: the record at the head's `seq` must have the head's hash
//!    ([`Fault::Modified`]), and the file must reach the head's `seq` ([`Fault::Truncated`],
//!    reported at the first missing record). A head behind the file is normal: the writer may
//!    have appended after the last head update.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::chain::{self, head_path, Head, ZERO_HASH};
use crate::error::{Fault, VerifyError};
use crate::MAX_LINE_LEN;

/// Largest head anchor accepted, in bytes. A head is about 90 bytes; the bound only keeps a
/// hostile file from being read whole.
const MAX_HEAD_LEN: u64 = 1024;

/// What an intact log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Number of records (the last `seq`; 0 for an empty log).
    pub records: u64,
    /// Hash of the last record ([`ZERO_HASH`] for an empty log): compare it with an exported head.
    pub last_hash: String,
    /// The head anchor that was checked, if there was one.
    pub head: Option<Head>,
}

/// Verifies the log at `path` and its head anchor `<path>.head` if present.
///
/// # Errors
///
/// The first bad record (see the module docs for how each kind is told apart), a malformed
/// head, or a read failure.
pub fn verify_path(path: &Path) -> Result<VerifyReport, VerifyError> {
    let head = read_head(&head_path(path))?;
    let file = File::open(path).map_err(|source| VerifyError::Io {
        path: path.to_owned(),
        source,
    })?;
    verify_inner(BufReader::new(file), head, path, &mut |_, _, _| Ok(()))
}

/// Verifies a log read from `reader`, without a head anchor (so trailing records cut off at a
/// line boundary go unnoticed: prefer [`verify_path`] or [`verify_reader_with_head`]).
///
/// # Errors
///
/// As [`verify_path`].
pub fn verify_reader<R: Read>(reader: R) -> Result<VerifyReport, VerifyError> {
    verify_reader_with_head(reader, None)
}

/// Verifies a log read from `reader` against `head`, for example a head exported elsewhere.
///
/// # Errors
///
/// As [`verify_path`].
pub fn verify_reader_with_head<R: Read>(
    reader: R,
    head: Option<Head>,
) -> Result<VerifyReport, VerifyError> {
    verify_inner(
        BufReader::new(reader),
        head,
        Path::new("<reader>"),
        &mut |_, _, _| Ok(()),
    )
}

/// Reads the head anchor at `path` (see [`head_path`]); `None` if it does not exist or is
/// empty.
///
/// # Errors
///
/// [`VerifyError::Head`] if it is not a head, [`VerifyError::Io`] if it cannot be read.
pub fn read_head(path: &Path) -> Result<Option<Head>, VerifyError> {
    let io_err = |source| VerifyError::Io {
        path: path.to_owned(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_HEAD_LEN.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    let malformed = |detail: String| VerifyError::Head {
        path: path.to_owned(),
        detail,
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        // What a crash can leave behind the writer's unsynced rename: no head, as if deleted.
        return Ok(None);
    }
    if u64::try_from(bytes.len()).map_or(true, |n| n > MAX_HEAD_LEN) {
        return Err(malformed(format!("longer than {MAX_HEAD_LEN} bytes")));
    }
    let head: Head = serde_json::from_slice(&bytes)
        .map_err(|e| malformed(format!("not {{\"seq\":N,\"hash\":\"...\"}}: {e}")))?;
    if head.seq == 0 || !chain::is_hash(&head.hash) {
        return Err(malformed(format!(
            "seq {} or hash {:?} out of range (seq from 1, hash 64 lowercase hex)",
            head.seq, head.hash
        )));
    }
    Ok(Some(head))
}

/// Outcome of reading one bounded line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// End of input, nothing read.
    Eof,
    /// A `\n`-terminated line, now in the buffer without its `\n`.
    Complete,
    /// A `\n`-terminated line longer than [`MAX_LINE_LEN`]; skipped, buffer empty.
    TooLong,
    /// Bytes at the end of the input with no `\n` after them.
    Unterminated,
}

/// Reads one line into `buf` (cleared first), never buffering more than [`MAX_LINE_LEN`] bytes.
pub(crate) fn next_line<R: BufRead>(reader: &mut R, buf: &mut Vec<u8>) -> io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    let mut any = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(if any { Line::Unterminated } else { Line::Eof });
        }
        any = true;
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = available
            .get(..newline.unwrap_or(available.len()))
            .unwrap_or_default();
        if !too_long {
            if buf.len().saturating_add(chunk.len()) > MAX_LINE_LEN {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        let used = chunk.len().saturating_add(usize::from(newline.is_some()));
        reader.consume(used);
        if newline.is_some() {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete
            });
        }
    }
}

/// The chain fields of a parsed line, and the hash its content calls for.
struct Parsed {
    seq: u64,
    prev: String,
    claimed: String,
    computed: String,
}

/// Parses a complete line into its chain fields, or says why it is not a record.
fn parse_record(line: &[u8]) -> Result<Parsed, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("not json: {e}"))?;
    let Value::Object(mut map) = value else {
        return Err("not a json object".to_owned());
    };
    let seq = map
        .get("seq")
        .and_then(Value::as_u64)
        .filter(|&s| s > 0)
        .ok_or("no seq (an integer from 1)")?;
    let prev = match map.get("prev") {
        Some(Value::String(p)) if chain::is_hash(p) => p.clone(),
        _ => return Err(format!("record {seq} has no prev (64 lowercase hex)")),
    };
    let (claimed, computed) = chain::rehash(&mut map, &prev);
    let claimed = match claimed {
        Some(Value::String(h)) if chain::is_hash(&h) => h,
        _ => return Err(format!("record {seq} has no hash (64 lowercase hex)")),
    };
    Ok(Parsed {
        seq,
        prev,
        claimed,
        computed,
    })
}

/// Called with (`seq`, line number, `hash`) of every record that passed the chain checks, in
/// order; an error ends the walk with it.
pub(crate) type OnRecord<'a> = dyn FnMut(u64, u64, &str) -> Result<(), VerifyError> + 'a;

pub(crate) fn verify_inner<R: BufRead>(
    mut reader: R,
    head: Option<Head>,
    path: &Path,
    on_record: &mut OnRecord<'_>,
) -> Result<VerifyReport, VerifyError> {
    let io_err = |source| VerifyError::Io {
        path: PathBuf::from(path),
        source,
    };
    let bad = |seq: u64, line: u64, kind: Fault, detail: String| VerifyError::Record {
        seq,
        line,
        kind,
        detail,
    };
    let mut buf = Vec::new();
    let mut line_no: u64 = 0;
    // Last good record.
    let mut last_seq: u64 = 0;
    let mut last_hash = ZERO_HASH.to_owned();
    loop {
        let read = next_line(&mut reader, &mut buf).map_err(io_err)?;
        if read == Line::Eof {
            break;
        }
        line_no = line_no.saturating_add(1);
        let expected = last_seq.saturating_add(1);
        match read {
            Line::Eof | Line::Complete => {}
            Line::Unterminated => {
                return Err(bad(
                    expected,
                    line_no,
                    Fault::Truncated,
                    "the last line is incomplete (no newline at the end of the file)".to_owned(),
                ))
            }
            Line::TooLong => {
                return Err(bad(
                    expected,
                    line_no,
                    Fault::Malformed,
                    format!("the line is longer than {MAX_LINE_LEN} bytes"),
                ))
            }
        }
        let rec = parse_record(&buf).map_err(|e| bad(expected, line_no, Fault::Malformed, e))?;
        if rec.claimed != rec.computed {
            return Err(bad(
                rec.seq,
                line_no,
                Fault::Modified,
                "hash does not match its content".to_owned(),
            ));
        }
        if rec.seq < expected {
            return Err(bad(
                rec.seq,
                line_no,
                Fault::Reordered,
                format!("seq goes backwards or repeats: record {last_seq} came before it"),
            ));
        }
        if rec.seq > expected {
            let later =
                find_later(&mut reader, &mut buf, line_no, expected, rec.seq).map_err(io_err)?;
            return Err(match later {
                Some((seq, line)) => bad(
                    rec.seq,
                    line_no,
                    Fault::Reordered,
                    format!("it comes before record {seq}, which is at line {line}"),
                ),
                None => bad(
                    rec.seq,
                    line_no,
                    Fault::Deleted,
                    missing(expected, rec.seq, "before it"),
                ),
            });
        }
        if rec.prev != last_hash {
            return Err(bad(
                rec.seq,
                line_no,
                Fault::Modified,
                if last_seq == 0 {
                    "prev of the first record is not 64 zeros".to_owned()
                } else {
                    format!(
                        "prev does not match the hash of record {last_seq}: that record or this one was rewritten"
                    )
                },
            ));
        }
        if let Some(h) = &head {
            if h.seq == rec.seq && h.hash != rec.claimed {
                return Err(bad(
                    rec.seq,
                    line_no,
                    Fault::Modified,
                    "hash differs from the head anchor: the log was rewritten up to here"
                        .to_owned(),
                ));
            }
        }
        on_record(rec.seq, line_no, &rec.claimed)?;
        last_seq = rec.seq;
        last_hash = rec.claimed;
    }
    if let Some(h) = &head {
        if h.seq > last_seq {
            return Err(bad(
                last_seq.saturating_add(1),
                line_no.saturating_add(1),
                Fault::Truncated,
                format!(
                    "the head anchor says the log reaches record {}, the file ends {}",
                    h.seq,
                    if last_seq == 0 {
                        "before the first record".to_owned()
                    } else {
                        format!("at record {last_seq}")
                    }
                ),
            ));
        }
    }
    Ok(VerifyReport {
        records: last_seq,
        last_hash,
        head,
    })
}

/// Scans the rest of the input for a record with `seq` in `from..to`; returns its seq and line.
/// Lines that are not records are skipped: only the first fault is reported.
fn find_later<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    mut line_no: u64,
    from: u64,
    to: u64,
) -> io::Result<Option<(u64, u64)>> {
    loop {
        let read = next_line(reader, buf)?;
        line_no = line_no.saturating_add(1);
        match read {
            Line::Eof => return Ok(None),
            Line::TooLong => continue,
            Line::Complete | Line::Unterminated => {}
        }
        let seq = serde_json::from_slice::<Value>(buf)
            .ok()
            .and_then(|v| v.get("seq").and_then(Value::as_u64));
        if let Some(seq) = seq.filter(|s| (from..to).contains(s)) {
            return Ok(Some((seq, line_no)));
        }
    }
}

fn missing(from: u64, to: u64, where_: &str) -> String {
    let last = to.saturating_sub(1);
    if from == last {
        format!("record {from} is missing {where_}")
    } else {
        format!("records {from} to {last} are missing {where_}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::seal;
    use crate::{Decision, Record};

    fn log(n: u64) -> (Vec<Vec<u8>>, Head) {
        let mut prev = ZERO_HASH.to_owned();
        let mut lines = Vec::new();
        for seq in 1..=n {
            let mut rec = Record::new("n", "intake", "http", Decision::Allow, "ok");
            rec.path = Some(format!("/{seq}"));
            let mut line = Vec::new();
            seal(&mut rec, seq, &prev, &mut line).unwrap();
            prev = rec.hash;
            lines.push(line);
        }
        (lines, Head { seq: n, hash: prev })
    }

    fn check(lines: &[Vec<u8>], head: Option<Head>) -> Result<VerifyReport, VerifyError> {
        verify_reader_with_head(lines.concat().as_slice(), head)
    }

    fn fault(lines: &[Vec<u8>], head: Option<Head>) -> (Fault, u64, u64) {
        let err = check(lines, head).unwrap_err();
        let (seq, line) = err.position().unwrap();
        (err.fault().unwrap(), seq, line)
    }

    #[test]
    fn intact_and_empty_logs_verify() {
        let (lines, head) = log(20);
        let report = check(&lines, Some(head.clone())).unwrap();
        assert_eq!((report.records, report.last_hash), (20, head.hash));
        let empty = verify_reader(&b""[..]).unwrap();
        assert_eq!((empty.records, empty.last_hash.as_str()), (0, ZERO_HASH));
    }

    #[test]
    fn each_fault_is_named_at_the_right_record() {
        let (lines, head) = log(10);
        let h = || Some(head.clone());

        let mut modified = lines.clone();
        modified[4] = String::from_utf8(modified[4].clone())
            .unwrap()
            .replace("\"/5\"", "\"/6\"")
            .into_bytes();
        assert_eq!(fault(&modified, h()), (Fault::Modified, 5, 5));

        let mut deleted = lines.clone();
        deleted.remove(4);
        assert_eq!(fault(&deleted, h()), (Fault::Deleted, 6, 5));
        let mut first_deleted = lines.clone();
        first_deleted.remove(0);
        assert_eq!(fault(&first_deleted, h()), (Fault::Deleted, 2, 1));
        let mut two_deleted = lines.clone();
        two_deleted.drain(3..5);
        assert_eq!(fault(&two_deleted, h()), (Fault::Deleted, 6, 4));

        let mut swapped = lines.clone();
        swapped.swap(4, 5);
        assert_eq!(fault(&swapped, h()), (Fault::Reordered, 6, 5));
        let mut moved = lines.clone();
        let r3 = moved.remove(2);
        moved.insert(7, r3);
        assert_eq!(fault(&moved, h()), (Fault::Reordered, 4, 3));
        let mut repeated = lines.clone();
        repeated.insert(5, lines[4].clone());
        assert_eq!(fault(&repeated, h()), (Fault::Reordered, 5, 6));

        let mut cut = lines.concat();
        cut.truncate(cut.len() - 10);
        let err = verify_reader_with_head(cut.as_slice(), h()).unwrap_err();
        assert_eq!(
            (err.fault(), err.position()),
            (Some(Fault::Truncated), Some((10, 10)))
        );
        let mut no_newline = lines.concat();
        no_newline.pop();
        let err = verify_reader(no_newline.as_slice()).unwrap_err();
        assert_eq!(err.fault(), Some(Fault::Truncated));

        assert_eq!(fault(&lines[..7], h()), (Fault::Truncated, 8, 8));
        assert_eq!(fault(&[], h()), (Fault::Truncated, 1, 1));
        // Without the head, a clean cut at a line boundary cannot be seen.
        assert_eq!(check(&lines[..7], None).unwrap().records, 7);

        let mut malformed = lines.clone();
        malformed[2] = b"hello\n".to_vec();
        assert_eq!(fault(&malformed, h()), (Fault::Malformed, 3, 3));
    }

    #[test]
    fn rewritten_tail_is_caught_by_prev_or_head() {
        let (lines, head) = log(6);
        // Rewrite record 3 and recompute its hash: record 4's prev no longer matches.
        let mut rec: Record = serde_json::from_slice(&lines[2]).unwrap();
        rec.path = Some("/forged".into());
        let mut forged = lines.clone();
        let mut line = Vec::new();
        let prev = rec.prev.clone();
        seal(&mut rec, 3, &prev, &mut line).unwrap();
        forged[2] = line;
        assert_eq!(fault(&forged, None), (Fault::Modified, 4, 4));
        // Rewrite the whole chain from scratch: only the head notices.
        let (mut rewritten, _) = log(6);
        let mut rec: Record = serde_json::from_slice(&rewritten[5]).unwrap();
        rec.path = Some("/forged".into());
        let mut line = Vec::new();
        let prev = rec.prev.clone();
        seal(&mut rec, 6, &prev, &mut line).unwrap();
        rewritten[5] = line;
        assert!(check(&rewritten, None).is_ok());
        assert_eq!(fault(&rewritten, Some(head)), (Fault::Modified, 6, 6));
    }

    #[test]
    fn overlong_lines_are_malformed_without_being_buffered() {
        let (lines, _) = log(2);
        let mut data = lines[0].clone();
        data.extend(std::iter::repeat_n(b'x', MAX_LINE_LEN + 1));
        data.push(b'\n');
        let err = verify_reader(data.as_slice()).unwrap_err();
        assert_eq!(err.position(), Some((2, 2)));
        assert_eq!(err.fault(), Some(Fault::Malformed));
    }

    #[test]
    fn empty_head_is_no_head_and_garbage_is_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h");
        std::fs::write(&path, "").unwrap();
        assert_eq!(read_head(&path).unwrap(), None);
        std::fs::write(&path, "{\"seq\":1}").unwrap();
        assert!(matches!(read_head(&path), Err(VerifyError::Head { .. })));
        std::fs::write(&path, format!("{{\"seq\":0,\"hash\":\"{ZERO_HASH}\"}}")).unwrap();
        assert!(matches!(read_head(&path), Err(VerifyError::Head { .. })));
        assert_eq!(read_head(&dir.path().join("missing")).unwrap(), None);
    }

    #[test]
    fn stale_head_is_accepted_but_must_match() {
        let (lines, _) = log(5);
        let rec3: Record = serde_json::from_slice(&lines[2]).unwrap();
        let stale = Head {
            seq: 3,
            hash: rec3.hash,
        };
        assert_eq!(check(&lines, Some(stale)).unwrap().records, 5);
        let wrong = Head {
            seq: 3,
            hash: "1".repeat(64),
        };
        assert_eq!(fault(&lines, Some(wrong)), (Fault::Modified, 3, 3));
    }
}
