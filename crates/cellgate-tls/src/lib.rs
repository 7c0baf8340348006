//! TLS for the node proxy: everything it needs to intercept an agent's TLS and to speak TLS upstream.
//!
//! Where to start reading:
//! - [`client_hello`]: peek at the first bytes of a connection, decide TLS or plain HTTP, and pull
//!   the SNI and ALPN out of the ClientHello without consuming it ([`client_hello::Rewind`] replays
//!   what was read). This is the only module that parses attacker bytes, and it is in the strict
//!   lint tier.
//! - [`ca`]: the interception CA (`cellgate ca init` writes it, the node loads it).
//! - [`mint`]: per-SNI leaf certificates signed by the CA, cached in a bounded LRU as ready
//!   `rustls::ServerConfig`s, with concurrent misses collapsed into one mint.
//! - [`rotation`]: CA rotation: fingerprints, the successor of a CA, and the set of CAs a node
//!   loads from its CA directory (the signing one, and the next while it is introduced).
//! - [`upstream`]: the `rustls::ClientConfig` the node uses towards the real server (system roots
//!   plus extra CAs) and the mapping of certificate failures to stable reason labels.
//! - [`trust`]: the other side of interception, what the agent's clients trust: the cell CA plus
//!   the system roots as a PEM bundle and a Java PKCS#12 trust store (used by `cellgate run` and
//!   the operator alike).
//!
//! Every rustls config here is built with the ring provider passed explicitly
//! ([`crypto_provider`]); nothing relies on a process-wide default provider.

use std::sync::Arc;

pub mod ca;
pub mod client_hello;
pub mod mint;
pub mod rotation;
pub mod trust;
pub mod upstream;

pub use ca::{Ca, CaError, CaFiles};
pub use client_hello::{
    looks_like_http, looks_like_tls, parse_client_hello, read_client_hello, ClientHelloPeek,
    HelloError, Parsed, Rewind,
};
pub use mint::{CertifiedLeaf, LeafMinter, MintError, MinterConfig};
pub use trust::{TrustBundle, TrustError};
pub use upstream::{classify_error, client_config, TlsError};

/// The ALPN protocols Cellgate offers and accepts, in preference order.
pub const ALPN_H2_AND_HTTP1: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The crypto provider every config in this crate is built with: ring, passed explicitly.
///
/// A fresh `Arc` each call is cheap (the provider is a table of static references); callers that
/// build many configs hold one and clone it.
#[must_use]
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The protocol versions Cellgate speaks on both sides: TLS 1.3 and 1.2.
pub(crate) static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
