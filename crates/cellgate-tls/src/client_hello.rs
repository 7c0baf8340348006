//! Peeking at a connection's first bytes: is it TLS or plain HTTP, and if TLS, which SNI and ALPN
//! does the ClientHello carry. Nothing is consumed for good: [`read_client_hello`] returns every
//! byte it read, and [`Rewind`] replays them in front of the socket, so the node can hand the
//! connection to a `tokio_rustls::TlsAcceptor` (interception) or splice it upstream (passthrough).
//!
//! Start at [`parse_client_hello`], a pure function over a byte slice (fuzzed and benchmarked);
//! [`read_client_hello`] only feeds it from a socket until it stops saying
//! [`HelloError::Incomplete`].
//!
//! These bytes come from the agent, so this module is in the strict lint tier: no panicking
//! indexing, no unchecked arithmetic, no unwrap, and every size bounded by a named limit.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::panic
)]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// TLS record header: content type (1), legacy version (2), length (2).
const RECORD_HEADER_LEN: usize = 5;

/// Handshake message header: type (1), length (3).
const HANDSHAKE_HEADER_LEN: usize = 4;

/// Largest record plaintext TLS allows (RFC 8446 section 5.1: 2^14); a longer record is a
/// protocol violation, not merely a large hello.
const MAX_RECORD_LEN: usize = 16_384;

/// Largest ClientHello body accepted. Real hellos are 200 B to 2 KiB; with post-quantum key
/// shares (ML-KEM-768 adds 1.2 KiB per share) and many extensions they stay well under 8 KiB.
/// 16 KiB leaves room for any honest client while bounding what one connection makes us buffer.
pub const MAX_HELLO_LEN: usize = 16_384;

/// Most records a ClientHello may be split over. Clients fragment only at the record size limit,
/// so an honest hello needs one or two; the bound stops a client from dribbling a hello in
/// one-byte records to make us do quadratic work.
pub const MAX_HELLO_RECORDS: usize = 32;

/// Most bytes [`read_client_hello`] buffers before giving up: the largest hello plus its
/// handshake header, split over the most records allowed.
pub const MAX_PEEK_LEN: usize =
    MAX_HELLO_LEN + HANDSHAKE_HEADER_LEN + MAX_HELLO_RECORDS * RECORD_HEADER_LEN;

/// How much [`read_client_hello`] asks the socket for at a time (a typical hello fits in one read).
const READ_CHUNK: usize = 4096;

const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const SNI_HOST_NAME: u8 = 0;

/// Why a ClientHello could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// [`parse_client_hello`] needs more bytes. [`read_client_hello`] keeps reading on this; at
    /// end of stream it becomes [`HelloError::Truncated`].
    #[error("client hello incomplete: {have} bytes so far, at least {needed} more needed")]
    Incomplete {
        /// Bytes available.
        have: usize,
        /// The fewest further bytes that could change the answer.
        needed: usize,
    },
    /// The bytes are not a well-formed ClientHello.
    #[error("malformed client hello: {0}")]
    Malformed(String),
    /// The hello exceeds [`MAX_HELLO_LEN`] or spans more than [`MAX_HELLO_RECORDS`] records.
    #[error("client hello too large: {0}")]
    TooLarge(String),
    /// The peer closed the connection before the hello was complete.
    #[error("connection closed after {have} bytes, before the client hello was complete")]
    Truncated {
        /// Bytes received.
        have: usize,
    },
    /// Reading from the socket failed.
    #[error("reading the client hello: {0}")]
    Io(#[from] io::Error),
}

impl HelloError {
    /// Every label [`HelloError::reason`] gives.
    pub const LABELS: &'static [&'static str] = &[
        "tls_hello_malformed",
        "tls_hello_too_large",
        "tls_hello_truncated",
        "tls_hello_io",
    ];

    /// Short stable label for audit records and metrics.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            HelloError::Malformed(_) => "tls_hello_malformed",
            HelloError::TooLarge(_) => "tls_hello_too_large",
            HelloError::Incomplete { .. } | HelloError::Truncated { .. } => "tls_hello_truncated",
            HelloError::Io(_) => "tls_hello_io",
        }
    }
}

/// What [`parse_client_hello`] extracts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    /// The `host_name` from the server_name extension, lowercased. Not validated as a DNS name:
    /// the caller decides what to do with odd names (the minter refuses them).
    pub sni: Option<String>,
    /// ALPN protocol names in the client's order. Names that are not UTF-8 are converted lossily.
    pub alpn: Vec<String>,
    /// Bytes of the records that carried the hello, from the start of the buffer.
    pub consumed: usize,
}

/// A peeked ClientHello: what it said, and everything read from the socket to learn it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloPeek {
    /// Every byte read, to be replayed (see [`Rewind`]). May extend past the hello (for example
    /// into early data) if the client sent more in the same segment.
    pub bytes: Vec<u8>,
    /// The SNI, lowercased.
    pub sni: Option<String>,
    /// The ALPN protocols offered.
    pub alpn: Vec<String>,
}

/// Whether `first` starts like a TLS handshake record (`0x16 0x03 0x0X`).
///
/// # Caveats
/// Needs the first three bytes; with fewer it answers false, so peek until three are available
/// (or the peer stops sending).
#[must_use]
pub fn looks_like_tls(first: &[u8]) -> bool {
    matches!(first, [CONTENT_TYPE_HANDSHAKE, 0x03, minor, ..] if *minor <= 0x0f)
}

/// Request methods recognized by [`looks_like_http`]. `PRI` is the start of the HTTP/2
/// prior-knowledge (h2c) preface, `PRI * HTTP/2.0`.
pub const HTTP_METHODS: [&[u8]; 10] = [
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE", b"PRI",
];

/// Whether `first` starts like an HTTP/1.x request line or the h2c preface: a known method token
/// followed by a space.
///
/// # Caveats
/// Needs the method and the space; a shorter prefix answers false.
#[must_use]
pub fn looks_like_http(first: &[u8]) -> bool {
    HTTP_METHODS.iter().any(|method| {
        first
            .strip_prefix(*method)
            .is_some_and(|rest| rest.first() == Some(&b' '))
    })
}

/// Parses the ClientHello at the start of `buf`, which holds TLS records as received.
///
/// # Errors
/// [`HelloError::Incomplete`] when `buf` is a valid prefix that ends before the hello does;
/// [`HelloError::Malformed`] for anything that is not a ClientHello in handshake records;
/// [`HelloError::TooLarge`] beyond [`MAX_HELLO_LEN`] or [`MAX_HELLO_RECORDS`].
pub fn parse_client_hello(buf: &[u8]) -> Result<Parsed, HelloError> {
    let (message, consumed) = reassemble(buf)?;
    let mut parsed = parse_hello_body(message)?;
    parsed.consumed = consumed;
    Ok(parsed)
}

/// Collects the handshake message from consecutive handshake records. Returns the hello body
/// (after the handshake header) and the bytes of records it took.
fn reassemble(buf: &[u8]) -> Result<(Vec<u8>, usize), HelloError> {
    let mut message: Vec<u8> = Vec::new();
    let mut rest = buf;
    let mut records = 0usize;
    loop {
        // Once the handshake header is in, we know exactly how long the message is.
        let wanted = hello_len(&message)?;
        if let Some(total) = wanted {
            if message.len() >= total {
                let consumed = buf.len().saturating_sub(rest.len());
                // Anything after the hello in the last record would be a second handshake
                // message; a client must not send one before the server's reply.
                if message.len() > total {
                    return Err(malformed(format!(
                        "{} bytes of another handshake message follow the client hello",
                        message.len().saturating_sub(total)
                    )));
                }
                message.drain(..HANDSHAKE_HEADER_LEN);
                return Ok((message, consumed));
            }
        }

        let have = buf.len();
        let Some((header, after_header)) = rest.split_first_chunk::<RECORD_HEADER_LEN>() else {
            return Err(HelloError::Incomplete {
                have,
                needed: RECORD_HEADER_LEN.saturating_sub(rest.len()),
            });
        };
        let [content_type, major, _minor, len_hi, len_lo] = *header;
        if content_type != CONTENT_TYPE_HANDSHAKE {
            return Err(malformed(format!(
                "record content type {content_type}, expected handshake (22)"
            )));
        }
        if major != 0x03 {
            return Err(malformed(format!(
                "record version major {major}, expected 3"
            )));
        }
        let record_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        if record_len == 0 {
            return Err(malformed("empty handshake record".to_owned()));
        }
        if record_len > MAX_RECORD_LEN {
            return Err(malformed(format!(
                "record length {record_len} exceeds {MAX_RECORD_LEN}"
            )));
        }
        records = records.saturating_add(1);
        if records > MAX_HELLO_RECORDS {
            return Err(HelloError::TooLarge(format!(
                "client hello spans more than {MAX_HELLO_RECORDS} records"
            )));
        }
        let Some((fragment, after_record)) = after_header.split_at_checked(record_len) else {
            // Judge the declared hello length as soon as its header is in, not after buffering
            // up to a whole record of a hello we will refuse anyway.
            if wanted.is_none() {
                let mut head = message.clone();
                head.extend(after_header.iter().take(HANDSHAKE_HEADER_LEN));
                hello_len(&head)?;
            }
            return Err(HelloError::Incomplete {
                have,
                needed: record_len.saturating_sub(after_header.len()),
            });
        };
        if message.len().saturating_add(fragment.len())
            > MAX_HELLO_LEN.saturating_add(HANDSHAKE_HEADER_LEN)
        {
            return Err(HelloError::TooLarge(format!(
                "more than {MAX_HELLO_LEN} bytes of handshake data"
            )));
        }
        message.extend_from_slice(fragment);
        rest = after_record;
    }
}

/// The total length (header included) of the handshake message starting `message`, once its
/// four header bytes are there; refuses anything but a ClientHello within [`MAX_HELLO_LEN`].
fn hello_len(message: &[u8]) -> Result<Option<usize>, HelloError> {
    let Some(&[msg_type, a, b, c]) = message.get(..HANDSHAKE_HEADER_LEN) else {
        return Ok(None);
    };
    if msg_type != HANDSHAKE_CLIENT_HELLO {
        return Err(malformed(format!(
            "handshake message type {msg_type}, expected client hello (1)"
        )));
    }
    let body_len = usize::try_from(u32::from_be_bytes([0, a, b, c])).unwrap_or(usize::MAX);
    if body_len > MAX_HELLO_LEN {
        return Err(HelloError::TooLarge(format!(
            "client hello declares {body_len} bytes, limit {MAX_HELLO_LEN}"
        )));
    }
    Ok(Some(body_len.saturating_add(HANDSHAKE_HEADER_LEN)))
}

/// Parses a ClientHello body (RFC 8446 section 4.1.2; TLS 1.2's is the same shape).
fn parse_hello_body(body: Vec<u8>) -> Result<Parsed, HelloError> {
    let mut r = Reader::new(&body);
    r.take(2, "legacy_version")?;
    r.take(32, "random")?;
    let session_id = r.vec_u8("legacy_session_id")?;
    if session_id.len() > 32 {
        return Err(malformed(format!(
            "session id of {} bytes, at most 32",
            session_id.len()
        )));
    }
    let suites = r.vec_u16("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(malformed(format!(
            "cipher suites length {}, must be even and non-zero",
            suites.len()
        )));
    }
    if r.vec_u8("legacy_compression_methods")?.is_empty() {
        return Err(malformed("no compression methods".to_owned()));
    }
    let mut parsed = Parsed::default();
    if r.is_empty() {
        // A TLS 1.2 hello may omit extensions entirely: no SNI, no ALPN.
        return Ok(parsed);
    }
    let mut extensions = Reader::new(r.vec_u16("extensions")?);
    if !r.is_empty() {
        return Err(malformed(format!(
            "{} bytes after the extensions",
            r.remaining()
        )));
    }
    let mut seen: Vec<u16> = Vec::new();
    while !extensions.is_empty() {
        let ext_type = extensions.u16("extension type")?;
        let data = extensions.vec_u16("extension data")?;
        if seen.contains(&ext_type) {
            return Err(malformed(format!("extension {ext_type} appears twice")));
        }
        seen.push(ext_type);
        match ext_type {
            EXT_SERVER_NAME => parsed.sni = parse_server_name(data)?,
            EXT_ALPN => parsed.alpn = parse_alpn(data)?,
            _ => {}
        }
    }
    Ok(parsed)
}

/// server_name extension (RFC 6066 section 3): a list of (type, name); only host_name (0) exists.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut ext = Reader::new(data);
    let mut list = Reader::new(ext.vec_u16("server name list")?);
    if !ext.is_empty() {
        return Err(malformed("bytes after the server name list".to_owned()));
    }
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8("server name type")?;
        let name = list.vec_u16("server name")?;
        if name_type != SNI_HOST_NAME {
            continue;
        }
        if host.is_some() {
            return Err(malformed("two host names in server_name".to_owned()));
        }
        if name.is_empty() {
            return Err(malformed("empty host name in server_name".to_owned()));
        }
        if !name.iter().all(|b| b.is_ascii_graphic()) {
            return Err(malformed(format!(
                "host name {:?} has non-printable or non-ascii bytes",
                String::from_utf8_lossy(name)
            )));
        }
        host = Some(String::from_utf8_lossy(name).to_ascii_lowercase());
    }
    Ok(host)
}

/// ALPN extension (RFC 7301 section 3.1): a non-empty list of non-empty protocol names.
fn parse_alpn(data: &[u8]) -> Result<Vec<String>, HelloError> {
    let mut ext = Reader::new(data);
    let mut list = Reader::new(ext.vec_u16("alpn protocol list")?);
    if !ext.is_empty() {
        return Err(malformed("bytes after the alpn protocol list".to_owned()));
    }
    if list.is_empty() {
        return Err(malformed("empty alpn protocol list".to_owned()));
    }
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let name = list.vec_u8("alpn protocol")?;
        if name.is_empty() {
            return Err(malformed("empty alpn protocol name".to_owned()));
        }
        protocols.push(String::from_utf8_lossy(name).into_owned());
    }
    Ok(protocols)
}

fn malformed(reason: String) -> HelloError {
    HelloError::Malformed(reason)
}

/// A cursor over a complete message: running out of bytes here is malformation, not truncation.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], HelloError> {
        let Some((head, tail)) = self.buf.split_at_checked(n) else {
            return Err(malformed(format!(
                "{what} needs {n} bytes, {} left",
                self.buf.len()
            )));
        };
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8, HelloError> {
        match self.take(1, what)? {
            [b] => Ok(*b),
            _ => Err(malformed(format!("{what}: short read"))),
        }
    }

    fn u16(&mut self, what: &str) -> Result<u16, HelloError> {
        match self.take(2, what)? {
            [a, b] => Ok(u16::from_be_bytes([*a, *b])),
            _ => Err(malformed(format!("{what}: short read"))),
        }
    }

    /// A vector with a one-byte length prefix.
    fn vec_u8(&mut self, what: &str) -> Result<&'a [u8], HelloError> {
        let len = self.u8(what)?;
        self.take(usize::from(len), what)
    }

    /// A vector with a two-byte length prefix.
    fn vec_u16(&mut self, what: &str) -> Result<&'a [u8], HelloError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }
}

/// Reads from `s` until the buffered bytes hold a complete ClientHello, and returns them all.
///
/// Reads no more than [`MAX_PEEK_LEN`] bytes. Add a timeout around it: a client that sends
/// nothing keeps it waiting.
///
/// # Errors
/// [`HelloError::Truncated`] if the stream ends first, [`HelloError::Io`] on a read error, and
/// the parse errors of [`parse_client_hello`] (never `Incomplete`).
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    s: &mut S,
) -> Result<ClientHelloPeek, HelloError> {
    let mut bytes: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    loop {
        match parse_client_hello(&bytes) {
            Ok(parsed) => {
                return Ok(ClientHelloPeek {
                    bytes,
                    sni: parsed.sni,
                    alpn: parsed.alpn,
                })
            }
            Err(HelloError::Incomplete { .. }) => {}
            Err(e) => return Err(e),
        }
        let room = MAX_PEEK_LEN.saturating_sub(bytes.len());
        if room == 0 {
            // Unreachable with the limits as set (the parser stops first), kept as the backstop
            // that bounds the buffer whatever the parser does.
            return Err(HelloError::TooLarge(format!(
                "no complete client hello in {MAX_PEEK_LEN} bytes"
            )));
        }
        let chunk = u64::try_from(room.min(READ_CHUNK)).unwrap_or(u64::MAX);
        let n = (&mut *s).take(chunk).read_buf(&mut bytes).await?;
        if n == 0 {
            return Err(HelloError::Truncated { have: bytes.len() });
        }
    }
}

/// A stream that first yields `prefix`, then reads from the inner stream; writes go straight to
/// the inner stream. Lets bytes peeked off a socket be "put back" for the next consumer.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    /// Wraps `inner` so that reads return `prefix` first.
    pub fn new(prefix: impl Into<Bytes>, inner: S) -> Self {
        Self {
            prefix: prefix.into(),
            inner,
        }
    }

    /// The unread part of the prefix and the inner stream.
    pub fn into_inner(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }

    /// The inner stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner stream, mutably. Reading from it directly skips the unread prefix.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::panic
)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn labels_are_exactly_the_reasons() {
        let all = [
            HelloError::Malformed(String::new()),
            HelloError::TooLarge(String::new()),
            HelloError::Incomplete { have: 0, needed: 1 },
            HelloError::Truncated { have: 0 },
            HelloError::Io(io::Error::other("x")),
        ];
        let mut got: Vec<&str> = all.iter().map(HelloError::reason).collect();
        got.dedup();
        assert_eq!(got, HelloError::LABELS);
    }

    /// A ClientHello as a real rustls client sends it.
    pub(crate) fn rustls_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let mut config = rustls::ClientConfig::builder_with_provider(crate::crypto_provider())
            .with_protocol_versions(crate::PROTOCOL_VERSIONS)
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Re-splits the handshake message of a single-record hello into records of `size` bytes.
    fn refragment(hello: &[u8], size: usize) -> Vec<u8> {
        let message = &hello[RECORD_HEADER_LEN..];
        let mut out = Vec::new();
        for chunk in message.chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn parses_a_rustls_hello() {
        let hello = rustls_hello("API.example.com", &[b"h2", b"http/1.1"]);
        assert!(looks_like_tls(&hello));
        let parsed = parse_client_hello(&hello).unwrap();
        assert_eq!(parsed.sni.as_deref(), Some("api.example.com"));
        assert_eq!(parsed.alpn, vec!["h2", "http/1.1"]);
        assert_eq!(parsed.consumed, hello.len());

        // bytes after the hello (say, early data) are not part of it
        let mut more = hello.clone();
        more.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert_eq!(parse_client_hello(&more).unwrap().consumed, hello.len());
    }

    #[test]
    fn hello_without_alpn_or_sni() {
        let hello = rustls_hello("10.0.0.1", &[]);
        let parsed = parse_client_hello(&hello).unwrap();
        assert_eq!(parsed.sni, None, "rustls sends no SNI for an IP");
        assert!(parsed.alpn.is_empty());
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let hello = rustls_hello("api.example.com", &[b"h2"]);
        for cut in 0..hello.len() {
            match parse_client_hello(&hello[..cut]) {
                Err(HelloError::Incomplete { have, needed }) => {
                    assert_eq!(have, cut);
                    assert!(needed > 0);
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        // and the same over a hello fragmented into many records
        let fragmented = refragment(&hello, 37);
        for cut in 0..fragmented.len() {
            assert!(
                matches!(
                    parse_client_hello(&fragmented[..cut]),
                    Err(HelloError::Incomplete { .. })
                ),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn fragmented_hello_parses() {
        let hello = rustls_hello("frag.example", &[b"http/1.1"]);
        let fragmented = refragment(&hello, 100);
        let parsed = parse_client_hello(&fragmented).unwrap();
        assert_eq!(parsed.sni.as_deref(), Some("frag.example"));
        assert_eq!(parsed.consumed, fragmented.len());
    }

    #[test]
    fn oversize_is_refused_early() {
        // declares a 1 MiB hello: refused from the first 9 bytes
        let buf = [22, 3, 1, 0x40, 0x00, 1, 0x10, 0x00, 0x00];
        let err = parse_client_hello(&buf).unwrap_err();
        assert_eq!(err.reason(), "tls_hello_too_large", "{err}");
        // dribbled in one-byte records
        let hello = rustls_hello("api.example.com", &[b"h2"]);
        let err = parse_client_hello(&refragment(&hello, 1)).unwrap_err();
        assert_eq!(err.reason(), "tls_hello_too_large", "{err}");
        // a record longer than TLS allows
        let err = parse_client_hello(&[22, 3, 1, 0x40, 0x01]).unwrap_err();
        assert_eq!(err.reason(), "tls_hello_malformed", "{err}");
    }

    #[test]
    fn garbage_is_malformed() {
        for buf in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            &[21, 3, 3, 0, 2, 2, 40],      // alert
            &[22, 2, 0, 0, 4, 1, 0, 0, 0], // SSLv2-ish version
            &[22, 3, 1, 0, 0],             // empty record
            &[22, 3, 1, 0, 4, 2, 0, 0, 0], // server hello
            &[22, 3, 1, 0, 4, 1, 0, 0, 0], // empty client hello body
        ] {
            let err = parse_client_hello(buf).unwrap_err();
            assert_eq!(err.reason(), "tls_hello_malformed", "{buf:?}: {err}");
        }
    }

    #[test]
    fn mutated_hellos_never_panic() {
        let hello = rustls_hello("api.example.com", &[b"h2", b"http/1.1"]);
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut buf = hello.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % buf.len();
                buf[i] = next() as u8;
            }
            let cut = (next() as usize) % (buf.len() + 1);
            let _ = parse_client_hello(&buf[..cut]);
        }
    }

    #[test]
    fn duplicate_extension_is_malformed() {
        // minimal TLS 1.2 hello with two ALPN extensions
        let alpn = [0u8, 16, 0, 5, 0, 3, 2, b'h', b'2'];
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        let exts: Vec<u8> = alpn.iter().chain(alpn.iter()).copied().collect();
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut msg = vec![1, 0, 0, body.len() as u8];
        msg.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1, 0, msg.len() as u8];
        rec.extend_from_slice(&msg);
        let err = parse_client_hello(&rec).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        // with one copy it parses
        let exts_len = alpn.len() as u16;
        let mut one = rec[..rec.len() - alpn.len()].to_vec();
        let ext_len_at = RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN + 2 + 32 + 1 + 2 + 2 + 2;
        one[ext_len_at..ext_len_at + 2].copy_from_slice(&exts_len.to_be_bytes());
        one[4] = (one.len() - RECORD_HEADER_LEN) as u8;
        one[8] = (one.len() - RECORD_HEADER_LEN - HANDSHAKE_HEADER_LEN) as u8;
        assert_eq!(parse_client_hello(&one).unwrap().alpn, vec!["h2"]);
    }

    #[test]
    fn sniffing() {
        assert!(looks_like_tls(&[22, 3, 1]));
        assert!(looks_like_tls(&[22, 3, 3, 0, 5]));
        assert!(!looks_like_tls(&[22, 3]));
        assert!(!looks_like_tls(&[22, 2, 1]));
        assert!(!looks_like_tls(b"GET / HTTP/1.1"));
        for ok in [
            &b"GET / HTTP/1.1"[..],
            b"POST /x",
            b"CONNECT host:443 HTTP/1.1",
            b"PRI * HTTP/2.0\r\n",
            b"OPTIONS *",
        ] {
            assert!(looks_like_http(ok), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b"GET"[..],
            b"GETX /",
            b"get /",
            b"",
            &[22, 3, 1],
            b"SSH-2.0",
        ] {
            assert!(!looks_like_http(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[tokio::test]
    async fn reads_a_hello_dribbled_over_the_socket() {
        let hello = refragment(&rustls_hello("slow.example", &[b"h2"]), 200);
        let (mut client, mut server) = tokio::io::duplex(64);
        let sent = hello.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(7) {
                client.write_all(chunk).await.unwrap();
            }
            client
        });
        let peek = read_client_hello(&mut server).await.unwrap();
        assert_eq!(peek.sni.as_deref(), Some("slow.example"));
        assert_eq!(peek.alpn, vec!["h2"]);
        assert_eq!(peek.bytes, hello);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn truncated_stream_and_garbage() {
        let hello = rustls_hello("api.example.com", &[b"h2"]);
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(&hello[..hello.len() / 2]).await.unwrap();
        drop(client);
        let err = read_client_hello(&mut server).await.unwrap_err();
        assert!(matches!(err, HelloError::Truncated { have } if have == hello.len() / 2));
        assert_eq!(err.reason(), "tls_hello_truncated");

        let mut http = &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..];
        let err = read_client_hello(&mut http).await.unwrap_err();
        assert_eq!(err.reason(), "tls_hello_malformed");

        let mut empty = &b""[..];
        let err = read_client_hello(&mut empty).await.unwrap_err();
        assert!(matches!(err, HelloError::Truncated { have: 0 }));
    }

    #[tokio::test]
    async fn rewind_replays_the_prefix_then_the_stream() {
        use tokio::io::AsyncReadExt;
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut rewound = Rewind::new(b"hello".to_vec(), server);
        let mut small = [0u8; 3];
        rewound.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"hel");
        let mut rest = Vec::new();
        rewound.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"lo world");
    }
}
