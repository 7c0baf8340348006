//! The identity token, read from the file the operator mounts (a Kubernetes Secret volume) and
//! re-read when that file changes, so a rotated token is used by the next connection without a
//! restart.
//!
//! Each connection costs one `stat` of the file: cheaper than a poller, and a rotation takes
//! effect exactly at the next connection. Kubernetes rotates Secret volumes by swapping a
//! symlink, so the fingerprint includes the inode, not just size and mtime.

use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use cellgate_proxy_protocol::{validate_token, TokenError, MAX_TOKEN_LEN};

use crate::log;

/// Largest token file read. A token is at most [`MAX_TOKEN_LEN`] bytes; the slack covers a
/// trailing newline and surrounding whitespace. A bigger file is not a token, and reading it
/// whole would let a misconfigured mount blow up a sidecar that should use a few MB.
const MAX_TOKEN_FILE_LEN: u64 = MAX_TOKEN_LEN as u64 + 1024;

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file cannot be read.
    #[error("cannot read token file {path}: {source}")]
    Read {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is bigger than any token.
    #[error("token file {path} is {len} bytes, more than the {max} a token can take")]
    TooBig {
        /// The token file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The content is not a usable token.
    #[error("token file {path} does not hold a usable token: {source}")]
    Invalid {
        /// The token file.
        path: PathBuf,
        /// What is wrong with it.
        source: TokenError,
    },
}

/// An identity token. `Debug` and `Display` never print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

impl Token {
    /// The token itself, for putting on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<redacted, {} bytes>)", self.0.len())
    }
}

/// What identifies one version of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

#[derive(Debug)]
struct State {
    /// Fingerprint of the last version looked at, good or bad, so a bad version is reported
    /// once rather than on every connection.
    seen: Option<Fingerprint>,
    /// The last good token.
    token: Token,
    /// The last problem reported, so a persisting problem is logged once.
    last_problem: Option<String>,
}

/// The token file and the last good token read from it.
#[derive(Debug)]
pub struct TokenSource {
    path: PathBuf,
    state: Mutex<State>,
}

impl TokenSource {
    /// Reads the token file once; the tagger does not start without a good token.
    ///
    /// # Errors
    /// [`TokenFileError`] if the file is missing, unreadable, too big, empty or not a token.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, TokenFileError> {
        let path = path.into();
        let (seen, token) = read(&path)?;
        Ok(Self {
            path,
            state: Mutex::new(State {
                seen: Some(seen),
                token,
                last_problem: None,
            }),
        })
    }

    /// The token to use for a new connection: re-reads the file if it changed since last time.
    /// If the new version is unusable (empty or half-written during a rotation, or gone), the
    /// last good token is kept and the problem is logged once.
    pub fn current(&self) -> Token {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = std::fs::metadata(&self.path).map(|m| Fingerprint::of(&m));
        let problem = match now {
            Ok(fp) if Some(fp) == state.seen => return state.token.clone(),
            Ok(fp) => {
                state.seen = Some(fp);
                match read(&self.path) {
                    Ok((fp, token)) => {
                        state.seen = Some(fp);
                        state.token = token;
                        state.last_problem = None;
                        log::info(format_args!(
                            "token file {} changed; new connections use the new token",
                            self.path.display()
                        ));
                        return state.token.clone();
                    }
                    Err(e) => e.to_string(),
                }
            }
            Err(source) => TokenFileError::Read {
                path: self.path.clone(),
                source,
            }
            .to_string(),
        };
        if state.last_problem.as_deref() != Some(problem.as_str()) {
            log::warn(format_args!("{problem}; keeping the last good token"));
            state.last_problem = Some(problem);
        }
        state.token.clone()
    }

    /// The token file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read(path: &Path) -> Result<(Fingerprint, Token), TokenFileError> {
    use std::io::Read as _;
    let read_err = |source| TokenFileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if meta.len() > MAX_TOKEN_FILE_LEN {
        return Err(TokenFileError::TooBig {
            path: path.to_owned(),
            len: meta.len(),
            max: MAX_TOKEN_FILE_LEN,
        });
    }
    let mut bytes = Vec::new();
    // `take` guards against a file that grows between the check and the read.
    file.take(MAX_TOKEN_FILE_LEN)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let invalid = |source| TokenFileError::Invalid {
        path: path.to_owned(),
        source,
    };
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        invalid(TokenError::InvalidByte {
            offset: e.valid_up_to(),
            byte: bytes.get(e.valid_up_to()).copied().unwrap_or_default(),
        })
    })?;
    // Secrets created with `echo` or `kubectl create secret --from-file` often end in a newline.
    let text = text.trim_ascii();
    validate_token(text).map_err(invalid)?;
    Ok((Fingerprint::of(&meta), Token(Arc::from(text))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_trims_and_follows_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first.token.value\n").unwrap();
        let source = TokenSource::load(&path).unwrap();
        assert_eq!(source.current().expose(), "first.token.value");

        // Rotation by rename, as Kubernetes does with its ..data symlink.
        let tmp = dir.path().join("token.tmp");
        std::fs::write(&tmp, "second.token.value").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(source.current().expose(), "second.token.value");

        // In-place rewrite, same length.
        std::fs::write(&path, "third.token.value!").unwrap();
        assert_eq!(source.current().expose(), "third.token.value!");

        // Mid-rotation: empty, then gone, then back.
        std::fs::write(&path, "").unwrap();
        assert_eq!(source.current().expose(), "third.token.value!");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(source.current().expose(), "third.token.value!");
        std::fs::write(&path, "fourth").unwrap();
        assert_eq!(source.current().expose(), "fourth");
    }

    #[test]
    fn refuses_to_start_without_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let err = TokenSource::load(&path).unwrap_err();
        assert!(matches!(err, TokenFileError::Read { .. }), "{err}");
        std::fs::write(&path, " \n").unwrap();
        let err = TokenSource::load(&path).unwrap_err();
        assert!(
            matches!(
                err,
                TokenFileError::Invalid {
                    source: TokenError::Empty,
                    ..
                }
            ),
            "{err}"
        );
        std::fs::write(&path, "two words").unwrap();
        assert!(TokenSource::load(&path).is_err());
        std::fs::write(&path, vec![b'a'; 10_000]).unwrap();
        let err = TokenSource::load(&path).unwrap_err();
        assert!(
            matches!(err, TokenFileError::TooBig { len: 10_000, .. }),
            "{err}"
        );
    }

    #[test]
    fn debug_hides_the_token() {
        let token = Token(Arc::from("secret"));
        assert!(!format!("{token:?}").contains("secret"));
    }
}
