//! One probe, on a thread of its own: find the network namespace holding the pod's address,
//! enter it ([`super::netns::enter`]), dial the must-deny destination as an ordinary user (the
//! cell's rules exempt only the tagger's uid), send the nonce line, and read what comes back.
//!
//! Everything here blocks, on a thread made for the one probe that exits afterwards: a thread
//! that entered a pod's namespace never runs anything else. [`LocalProber::probe`] is the async
//! face of it, used by the node itself (`--self-check-prober in-process`) and by the
//! `self-check-prober` beside an unprivileged node ([`super::prober`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What a probe line starts with.
pub const PREFIX: &[u8] = b"CELLGATE-SELFCHECK ";
/// Length of a nonce: 128 random bits, lowercase hex.
pub const NONCE_LEN: usize = 32;
/// A whole probe line: the prefix, the nonce and a newline. The intake reads no more than this
/// from a connection to the reserved destination.
pub const LINE_LEN: usize = PREFIX.len() + NONCE_LEN + 1;
/// What the node's intake answers a probe it took (then it closes the connection).
pub const ANSWER: &[u8] = b"CELLGATE-SELFCHECK refused\n";
/// Most bytes of an answer the probe reads: enough to tell the node's answer from another.
pub const ANSWER_MAX: usize = 256;

/// A fresh nonce from the system's CSPRNG.
///
/// # Errors
/// When the system's random source fails (the probe is then not run).
pub fn nonce() -> Result<String, String> {
    let mut b = [0u8; NONCE_LEN / 2];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| "the system random source failed".to_string())?;
    Ok(hex::encode(b))
}

/// Whether `s` has the shape of a nonce (so nothing else is ever written in a probe line).
pub fn is_nonce(s: &str) -> bool {
    s.len() == NONCE_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The probe line carrying `nonce`.
pub fn line(nonce: &str) -> Vec<u8> {
    let mut l = PREFIX.to_vec();
    l.extend_from_slice(nonce.as_bytes());
    l.push(b'\n');
    l
}

/// The nonce of a probe line (exactly [`LINE_LEN`] bytes, as [`line`] makes them), if `buf` is one.
pub fn parse_line(buf: &[u8]) -> Option<&str> {
    let rest = buf.strip_prefix(PREFIX)?.strip_suffix(b"\n")?;
    let nonce = std::str::from_utf8(rest).ok()?;
    is_nonce(nonce).then_some(nonce)
}

/// What one probe saw, from inside the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case", deny_unknown_fields)]
pub enum Outcome {
    /// No network namespace in `dir` holds the pod's address (`searched` were looked at).
    NoNamespace {
        /// The directory searched.
        dir: String,
        /// Namespaces entered and looked at.
        searched: usize,
    },
    /// The probe could not run: no privilege to enter namespaces, no prober, no random source.
    Unavailable {
        /// Why.
        detail: String,
    },
    /// The connection was refused (a reset), inside the pod or beyond it.
    Refused,
    /// The pod's own filter refused to send it (`connect` failed with EPERM or EACCES).
    Dropped,
    /// No route, or another error of `connect`.
    Unreachable {
        /// The error.
        detail: String,
    },
    /// Nothing answered the connection attempt in time.
    TimedOut,
    /// The connection opened; `answer` is what came back before the end or the deadline (at
    /// most [`ANSWER_MAX`] bytes, lossy UTF-8).
    Connected {
        /// What came back.
        answer: String,
    },
}

/// Probes from this process: each probe on a thread of its own. Remembers which namespace held
/// each address, so a probe usually enters one namespace instead of searching them all (the
/// remembered one is checked again every time).
#[derive(Debug, Clone)]
pub struct LocalProber {
    target: SocketAddr,
    netns_dir: PathBuf,
    hints: Arc<Mutex<HashMap<IpAddr, PathBuf>>>,
}

impl LocalProber {
    /// A prober dialling `target` from the namespaces under `netns_dir`.
    pub fn new(target: SocketAddr, netns_dir: PathBuf) -> Self {
        Self {
            target,
            netns_dir,
            hints: Arc::default(),
        }
    }

    /// Probes from the namespace holding `ip`, sending `nonce`, within about `timeout` (plus the
    /// search for the namespace).
    pub async fn probe(&self, ip: IpAddr, nonce: &str, timeout: Duration) -> Outcome {
        let hint = self.hints.lock().ok().and_then(|h| h.get(&ip).cloned());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (dir, target, line) = (self.netns_dir.clone(), self.target, line(nonce));
        let spawned = std::thread::Builder::new()
            .name("cellgate-probe".into())
            .spawn(move || {
                let _ = tx.send(probe_blocking(
                    &dir,
                    hint.as_deref(),
                    ip,
                    target,
                    &line,
                    timeout,
                ));
            });
        if let Err(e) = spawned {
            return Outcome::Unavailable {
                detail: format!("cannot start a probe thread: {e}"),
            };
        }
        let Ok((outcome, found)) = rx.await else {
            return Outcome::Unavailable {
                detail: "the probe thread ended without a result".into(),
            };
        };
        if let Ok(mut h) = self.hints.lock() {
            match found {
                Some(p) => h.insert(ip, p),
                None => h.remove(&ip),
            };
        }
        outcome
    }
}

/// The whole probe, blocking. Call only on a thread that exits afterwards (it enters a pod's
/// network namespace for good). Returns the outcome and the namespace that held `ip`.
fn probe_blocking(
    dir: &Path,
    hint: Option<&Path>,
    ip: IpAddr,
    target: SocketAddr,
    line: &[u8],
    timeout: Duration,
) -> (Outcome, Option<PathBuf>) {
    match enter_namespace_of(dir, hint, ip) {
        Ok(path) => (dial(target, line, timeout), Some(path)),
        Err(outcome) => (outcome, None),
    }
}

/// Enters the network namespace under `dir` (`hint` first) that holds `ip`.
fn enter_namespace_of(dir: &Path, hint: Option<&Path>, ip: IpAddr) -> Result<PathBuf, Outcome> {
    let listed = std::fs::read_dir(dir).map_err(|e| Outcome::Unavailable {
        detail: format!("cannot read {}: {e}", dir.display()),
    })?;
    let mut paths: Vec<PathBuf> = listed.filter_map(|e| Some(e.ok()?.path())).collect();
    paths.sort();
    let candidates = hint
        .filter(|h| h.parent() == Some(dir))
        .map(Path::to_path_buf)
        .into_iter()
        .chain(paths.into_iter().filter(|p| Some(p.as_path()) != hint));
    let (mut searched, mut unopened) = (0, None);
    for path in candidates {
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                unopened = Some(format!("cannot open {}: {e}", path.display()));
                continue;
            }
        };
        match super::netns::enter(&file) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                return Err(Outcome::Unavailable {
                    detail: format!(
                        "cannot enter the network namespace {}: {e} (entering needs CAP_SYS_ADMIN)",
                        path.display()
                    ),
                })
            }
            // Not a network namespace (another file in the directory).
            Err(_) => continue,
        }
        searched += 1;
        if holds(ip) {
            return Ok(path);
        }
    }
    match unopened {
        Some(detail) if searched == 0 => Err(Outcome::Unavailable { detail }),
        _ => Err(Outcome::NoNamespace {
            dir: dir.display().to_string(),
            searched,
        }),
    }
}

/// Whether the namespace this thread is in has `ip` on one of its interfaces: only a local
/// address can be bound. A namespace that allows binding non-local addresses cannot be told
/// this way and is passed over.
fn holds(ip: IpAddr) -> bool {
    // Per namespace, read through the namespace of the thread that opens it.
    let sysctl = match ip {
        IpAddr::V4(_) => "/proc/sys/net/ipv4/ip_nonlocal_bind",
        IpAddr::V6(_) => "/proc/sys/net/ipv6/ip_nonlocal_bind",
    };
    if std::fs::read_to_string(sysctl).is_ok_and(|v| v.trim() != "0") {
        return false;
    }
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Dials `target` from the current namespace, sends `line` and reads the answer.
fn dial(target: SocketAddr, line: &[u8], timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let mut s = match TcpStream::connect_timeout(&target, timeout) {
        Ok(s) => s,
        Err(e) => return connect_failed(&e),
    };
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut answer = Vec::new();
    if s.set_write_timeout(Some(left())).is_ok() && s.write_all(line).is_ok() {
        let mut buf = [0u8; ANSWER_MAX];
        while answer.len() < ANSWER_MAX && s.set_read_timeout(Some(left())).is_ok() {
            let room = ANSWER_MAX - answer.len();
            match s.read(buf.get_mut(..room).unwrap_or_default()) {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(buf.get(..n).unwrap_or_default()),
            }
            if Instant::now() >= deadline {
                break;
            }
        }
    }
    Outcome::Connected {
        answer: String::from_utf8_lossy(&answer).into_owned(),
    }
}

fn connect_failed(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Outcome::TimedOut,
        ErrorKind::ConnectionRefused => Outcome::Refused,
        ErrorKind::PermissionDenied => Outcome::Dropped,
        _ => Outcome::Unreachable {
            detail: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_exactly_a_nonce() {
        let n = nonce().unwrap();
        assert!(is_nonce(&n), "{n}");
        assert_ne!(n, nonce().unwrap());
        let l = line(&n);
        assert_eq!(l.len(), LINE_LEN);
        assert_eq!(parse_line(&l), Some(n.as_str()));
        for bad in [
            &b"CELLGATE-SELFCHECK 0123\n"[..],
            b"CELLGATE-SELFCHECK 0123456789ABCDEF0123456789abcdef\n",
            b"CELLGATE-SELFCHECK 0123456789abcdef0123456789abcdef",
            b"GET / HTTP/1.1\r\nHost: 192.0.2.1\r\n\r\n",
            b"",
        ] {
            assert_eq!(parse_line(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn outcomes_travel_as_tagged_json() {
        let o = Outcome::Connected {
            answer: "CELLGATE-SELFCHECK refused\n".into(),
        };
        let j = serde_json::to_string(&o).unwrap();
        assert_eq!(
            j,
            r#"{"outcome":"connected","answer":"CELLGATE-SELFCHECK refused\n"}"#
        );
        assert_eq!(serde_json::from_str::<Outcome>(&j).unwrap(), o);
        assert_eq!(
            serde_json::from_str::<Outcome>(r#"{"outcome":"refused"}"#).unwrap(),
            Outcome::Refused
        );
        assert!(serde_json::from_str::<Outcome>(r#"{"outcome":"governed"}"#).is_err());
    }

    #[test]
    fn connect_errors_are_told_apart() {
        use std::io::{Error, ErrorKind};
        assert_eq!(
            connect_failed(&Error::from(ErrorKind::TimedOut)),
            Outcome::TimedOut
        );
        assert_eq!(
            connect_failed(&Error::from(ErrorKind::ConnectionRefused)),
            Outcome::Refused
        );
        assert_eq!(
            connect_failed(&Error::from_raw_os_error(libc::EPERM)),
            Outcome::Dropped
        );
        assert!(matches!(
            connect_failed(&Error::from_raw_os_error(libc::ENETUNREACH)),
            Outcome::Unreachable { .. }
        ));
    }

    #[test]
    fn a_missing_directory_is_unavailable_not_ungoverned() {
        let o = enter_namespace_of(
            Path::new("/nonexistent/cellgate-netns"),
            None,
            "10.0.0.1".parse().unwrap(),
        )
        .unwrap_err();
        assert!(matches!(o, Outcome::Unavailable { .. }), "{o:?}");
        // An empty directory: nothing searched, no namespace holds the address.
        let dir = tempfile::tempdir().unwrap();
        let o = enter_namespace_of(dir.path(), None, "10.0.0.1".parse().unwrap()).unwrap_err();
        assert_eq!(
            o,
            Outcome::NoNamespace {
                dir: dir.path().display().to_string(),
                searched: 0
            }
        );
    }
}
