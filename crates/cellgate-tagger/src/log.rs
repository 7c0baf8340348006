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
