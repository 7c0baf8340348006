//! Per-SNI leaf certificates signed by the interception CA, served as ready `rustls::ServerConfig`s.
//!
//! Start at [`LeafMinter::server_config`]: validate the name, look in a bounded LRU of configs,
//! and on a miss mint a leaf (fresh ECDSA P-256 key, SAN = the name, signed by the [`Ca`], chain
//! `[leaf, ca]`). Concurrent misses for one name share one mint (single flight). A cached leaf is
//! replaced once it is within a quarter of its lifetime of expiry, so an agent is never handed a
//! certificate about to lapse.
//!
//! The CA can be replaced while the minter serves ([`LeafMinter::set_ca`], during a CA rotation):
//! every cached leaf of the old CA stops being served at once, and the next handshake for each
//! name gets a leaf of the new one. A mint already under way finishes with the CA it started with
//! and is not cached past the switch.
//!
//! The mint runs inline on the calling task rather than in `spawn_blocking`. Measured with
//! `cargo bench -p cellgate-tls --bench mint` (release, 2 shared cores): keygen + sign is p50
//! ~45 µs, p99 ~90 µs; with building the rustls config (which re-parses the key) p50 ~75 µs. A hop
//! to the blocking pool adds a thread wake-up and a channel round-trip to every miss for little
//! gain at that size, and misses are rare (one per name per ~18 h per node). Inline also keeps
//! the single-flight future free of await points, so a cancelled caller never leaves a mint
//! half-done.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use lru::LruCache;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use crate::ca::{random_serial, Ca, BACKDATE};

/// Default number of names whose configs are kept: enough for the distinct hosts of every agent on
/// a busy node; at roughly 2 KiB per entry (two certificates, a key, the config) about 20 MiB.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Default leaf lifetime. Short, so a leaf copied out of an agent is soon useless, yet long
/// enough that the cache, not the minter, serves nearly every handshake.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// TLS session-resumption entries shared by all configs. One bounded store for the whole minter:
/// rustls's per-config default (256 entries, preallocated) times 10 000 configs would cost far more
/// memory than resumption is worth here.
const SESSION_CACHE_ENTRIES: usize = 4096;

/// Longest DNS name accepted (RFC 1035, in text form without the trailing dot).
const MAX_NAME_LEN: usize = 253;
/// Longest DNS label (RFC 1035).
const MAX_LABEL_LEN: usize = 63;

/// Settings for a [`LeafMinter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinterConfig {
    /// Most names cached at once; the least recently used is evicted beyond it.
    pub capacity: NonZeroUsize,
    /// Validity of a minted leaf (from now; `notBefore` is backdated by [`BACKDATE`] on top). A
    /// leaf never outlives the CA, and is re-minted once within a quarter of this of its expiry.
    pub leaf_lifetime: Duration,
}

impl Default for MinterConfig {
    fn default() -> Self {
        Self {
            capacity: NonZeroUsize::new(DEFAULT_CAPACITY).unwrap_or(NonZeroUsize::MIN),
            leaf_lifetime: DEFAULT_LEAF_LIFETIME,
        }
    }
}

/// Errors minting a leaf.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// The SNI is not a name a certificate can be minted for.
    #[error("invalid server name {name:?}: {reason}")]
    InvalidName {
        /// The name as given (truncated to a sane length for logs).
        name: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// rcgen failed to generate the key or sign the certificate.
    #[error("minting a leaf for {name}: {source}")]
    Generate {
        /// The name being minted.
        name: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// rustls refused the minted certificate or key.
    #[error("building the tls config for {name}: {source}")]
    Config {
        /// The name being minted.
        name: String,
        /// rustls's error.
        #[source]
        source: rustls::Error,
    },
}

impl MintError {
    /// Short stable label for audit records and metrics.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            MintError::InvalidName { .. } => "tls_sni_invalid",
            MintError::Generate { .. } | MintError::Config { .. } => "tls_mint_failed",
        }
    }
}

/// A minted leaf: the chain to present and its private key.
pub struct CertifiedLeaf {
    /// `[leaf, ca]`.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key, PKCS#8. Never printed by `Debug`.
    pub key: PrivateKeyDer<'static>,
    /// When the leaf expires.
    pub not_after: SystemTime,
}

impl fmt::Debug for CertifiedLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertifiedLeaf")
            .field("chain_len", &self.chain.len())
            .field("not_after", &self.not_after)
            .field("key", &"[elided]")
            .finish()
    }
}

struct Entry {
    config: Arc<ServerConfig>,
    /// When this entry stops being served and a new leaf is minted.
    refresh_at: Instant,
    /// The CA generation that signed it; an entry of an earlier one is never served.
    generation: u64,
}

type Flight = Arc<OnceCell<Arc<ServerConfig>>>;

/// Mints and caches per-SNI server configs. Share it behind an `Arc`; all methods take `&self`.
pub struct LeafMinter {
    /// The CA new leaves are signed with, and its generation (bumped by each [`Self::set_ca`]).
    ca: RwLock<(Arc<Ca>, u64)>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    sessions: Arc<dyn StoresServerSessions>,
    config: MinterConfig,
    cache: Mutex<LruCache<String, Entry>>,
    inflight: Mutex<HashMap<String, Flight>>,
    hits: AtomicU64,
    misses: AtomicU64,
    mints: AtomicU64,
}

impl fmt::Debug for LeafMinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafMinter")
            .field("config", &self.config)
            .field("ca", &self.ca().fingerprint())
            .field("cached", &self.len())
            .field("hits", &self.hits())
            .field("misses", &self.misses())
            .field("mints", &self.mints())
            .finish_non_exhaustive()
    }
}

impl LeafMinter {
    /// A minter signing with `ca`.
    #[must_use]
    pub fn new(ca: Arc<Ca>, config: MinterConfig) -> Self {
        Self {
            ca: RwLock::new((ca, 0)),
            provider: crate::crypto_provider(),
            sessions: ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES),
            config,
            cache: Mutex::new(LruCache::new(config.capacity)),
            inflight: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            mints: AtomicU64::new(0),
        }
    }

    /// The server config presenting a leaf for `sni`, from the cache or freshly minted.
    ///
    /// The config offers ALPN `h2` and `http/1.1`, TLS 1.3 and 1.2, no client auth, no 0-RTT.
    /// The name is matched case-insensitively (it is lowercased before anything else).
    ///
    /// # Errors
    /// [`MintError::InvalidName`] for a name that is not a DNS name or IP literal (wildcards,
    /// trailing dots, bad characters, over-long names or labels); [`MintError::Generate`] or
    /// [`MintError::Config`] if minting fails.
    pub async fn server_config(&self, sni: &str) -> Result<Arc<ServerConfig>, MintError> {
        let name = LeafName::parse(sni)?;
        if let Some(config) = self.fresh(&name.key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(config);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);

        let flight = lock(&self.inflight)
            .entry(name.key.clone())
            .or_default()
            .clone();
        let _guard = FlightGuard {
            minter: self,
            key: &name.key,
            flight: &flight,
        };
        let config = flight
            .get_or_try_init(|| async {
                // A flight that finished between our cache miss and joining the map has already
                // filled the cache; don't mint twice.
                if let Some(config) = self.fresh(&name.key) {
                    return Ok(config);
                }
                self.mint_config(&name)
            })
            .await?;
        Ok(Arc::clone(config))
    }

    /// Mints a leaf for `sni` without touching the cache (the benchmark's uncached path).
    ///
    /// # Errors
    /// As [`LeafMinter::server_config`].
    pub fn mint_leaf(&self, sni: &str) -> Result<CertifiedLeaf, MintError> {
        let name = LeafName::parse(sni)?;
        let leaf = self.sign(&name)?;
        Ok(leaf)
    }

    /// The CA new leaves are signed with.
    #[must_use]
    pub fn ca(&self) -> Arc<Ca> {
        Arc::clone(&self.current().0)
    }

    /// Signs new leaves with `ca` from now on, and forgets every cached leaf of the CA before it
    /// (the next handshake for each name gets a fresh leaf). Returns whether the CA changed: the
    /// same certificate given again changes nothing.
    pub fn set_ca(&self, ca: Arc<Ca>) -> bool {
        {
            let mut current = self.ca.write().unwrap_or_else(PoisonError::into_inner);
            if current.0.fingerprint() == ca.fingerprint() {
                return false;
            }
            let generation = current.1.wrapping_add(1);
            *current = (ca, generation);
        }
        lock(&self.cache).clear();
        true
    }

    fn current(&self) -> (Arc<Ca>, u64) {
        let current = self.ca.read().unwrap_or_else(PoisonError::into_inner);
        (Arc::clone(&current.0), current.1)
    }

    /// Cache hits since creation.
    #[must_use]
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Cache misses (including stale entries) since creation; concurrent misses for one name each
    /// count, but share one mint.
    #[must_use]
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Leaves minted since creation.
    #[must_use]
    pub fn mints(&self) -> u64 {
        self.mints.load(Ordering::Relaxed)
    }

    /// Names currently cached.
    #[must_use]
    pub fn len(&self) -> usize {
        lock(&self.cache).len()
    }

    /// Whether nothing is cached.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A cached config that is not yet due for refresh. Bumps the entry's recency.
    fn fresh(&self, key: &str) -> Option<Arc<ServerConfig>> {
        let generation = self.current().1;
        let mut cache = lock(&self.cache);
        let entry = cache.get(key)?;
        (Instant::now() < entry.refresh_at && entry.generation == generation)
            .then(|| Arc::clone(&entry.config))
    }

    fn mint_config(&self, name: &LeafName) -> Result<Arc<ServerConfig>, MintError> {
        let started = Instant::now();
        let (ca, generation) = self.current();
        let leaf = self.sign_with(&ca, name)?;
        let config_err = |source| MintError::Config {
            name: name.key.clone(),
            source,
        };
        let remaining = leaf
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(crate::PROTOCOL_VERSIONS)
            .map_err(config_err)?
            .with_no_client_auth()
            .with_single_cert(leaf.chain, leaf.key)
            .map_err(config_err)?;
        config.alpn_protocols = crate::ALPN_H2_AND_HTTP1
            .iter()
            .map(|p| p.to_vec())
            .collect();
        config.session_storage = Arc::clone(&self.sessions);
        let config = Arc::new(config);
        let refresh_at = Instant::now() + (remaining - remaining / 4);
        let mut cache = lock(&self.cache);
        // A switch of CA while this leaf was minted: serve it this once, cache it not.
        if generation == self.current().1 {
            cache.put(
                name.key.clone(),
                Entry {
                    config: Arc::clone(&config),
                    refresh_at,
                    generation,
                },
            );
        }
        drop(cache);
        tracing::debug!(
            server.name = %name.key,
            elapsed_us = started.elapsed().as_micros(),
            "minted leaf certificate"
        );
        Ok(config)
    }

    fn sign(&self, name: &LeafName) -> Result<CertifiedLeaf, MintError> {
        self.sign_with(&self.current().0, name)
    }

    fn sign_with(&self, ca: &Ca, name: &LeafName) -> Result<CertifiedLeaf, MintError> {
        let leaf = sign_leaf(ca, &name.key, self.config.leaf_lifetime).map_err(|source| {
            MintError::Generate {
                name: name.key.clone(),
                source,
            }
        })?;
        self.mints.fetch_add(1, Ordering::Relaxed);
        Ok(leaf)
    }
}

/// Removes a finished (or abandoned) flight from the in-flight map. Late joiners that already
/// hold the `Arc` still read its value; newcomers find the cache filled.
struct FlightGuard<'a> {
    minter: &'a LeafMinter,
    key: &'a str,
    flight: &'a Flight,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let mut map = lock(&self.minter.inflight);
        if map
            .get(self.key)
            .is_some_and(|current| Arc::ptr_eq(current, self.flight))
        {
            map.remove(self.key);
        }
    }
}

/// Signs a leaf for `name` (an IP literal or an already validated DNS name) with `ca`.
pub(crate) fn sign_leaf(
    ca: &Ca,
    name: &str,
    lifetime: Duration,
) -> Result<CertifiedLeaf, rcgen::Error> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let san = match name.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.try_into()?),
    };
    params.subject_alt_names = vec![san];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = (now + lifetime).min(ca.not_after());
    params.serial_number = Some(random_serial()?);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, ca.issuer())?;
    Ok(CertifiedLeaf {
        chain: vec![cert.der().clone(), ca.cert_der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        not_after: SystemTime::from(params.not_after),
    })
}

/// A validated, normalized name: the cache key and what goes in the SAN.
#[derive(Debug)]
struct LeafName {
    key: String,
}

impl LeafName {
    /// Lowercases `sni` and checks it is an IP literal or a DNS name a client could send as SNI:
    /// at most 253 characters, labels of 1 to 63 letters, digits, hyphens (not at either end) or
    /// underscores, no wildcard, no trailing dot.
    ///
    /// Underscores are outside strict LDH but occur in real internal host names, and both rustls's
    /// `DnsName` and webpki accept them; refusing them would break interception for those hosts.
    fn parse(sni: &str) -> Result<LeafName, MintError> {
        let invalid = |reason| MintError::InvalidName {
            name: sni.chars().take(MAX_NAME_LEN + 1).collect(),
            reason,
        };
        if let Ok(ip) = sni.parse::<IpAddr>() {
            return Ok(LeafName {
                key: ip.to_string(),
            });
        }
        if sni.is_empty() {
            return Err(invalid("it is empty"));
        }
        if sni.len() > MAX_NAME_LEN {
            return Err(invalid("longer than 253 characters"));
        }
        if sni.starts_with("*.") {
            return Err(invalid("wildcards are not valid in sni"));
        }
        if sni.ends_with('.') {
            return Err(invalid("sni must not end with a dot"));
        }
        let key = sni.to_ascii_lowercase();
        for label in key.split('.') {
            if label.is_empty() {
                return Err(invalid("empty label"));
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(invalid("label longer than 63 characters"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(invalid(
                    "only letters, digits, '-' and '_' are allowed in a label",
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(invalid("a label must not start or end with '-'"));
            }
        }
        // What our rules accept, the client side must accept too (e.g. no all-numeric last label).
        if rustls_pki_types::DnsName::try_from(key.as_str()).is_err() {
            return Err(invalid("not a valid dns name"));
        }
        Ok(LeafName { key })
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here is a single map operation that
/// leaves the map consistent even if a panic unwinds through it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls_pki_types::{ServerName, UnixTime};

    fn minter(capacity: usize, lifetime: Duration) -> LeafMinter {
        let ca = Arc::new(Ca::generate("Cellgate mint test CA").unwrap());
        LeafMinter::new(
            ca,
            MinterConfig {
                capacity: NonZeroUsize::new(capacity).unwrap(),
                leaf_lifetime: lifetime,
            },
        )
    }

    fn verify(ca: &Ca, leaf: &CertifiedLeaf, name: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crate::crypto_provider())
                .build()
                .unwrap();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        verifier
            .verify_server_cert(
                &leaf.chain[0],
                &leaf.chain[1..],
                &name,
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
    }

    #[test]
    fn minted_leaf_verifies_for_its_name_only() {
        let m = minter(10, DEFAULT_LEAF_LIFETIME);
        let leaf = m.mint_leaf("API.Example.com").unwrap();
        assert_eq!(leaf.chain.len(), 2);
        assert_eq!(&leaf.chain[1], m.ca().cert_der());
        verify(&m.ca(), &leaf, "api.example.com").unwrap();
        let err = verify(&m.ca(), &leaf, "other.example.com").unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{err:?}"
        );
        // a leaf from another CA does not verify against this one
        let other = minter(10, DEFAULT_LEAF_LIFETIME);
        let foreign = other.mint_leaf("api.example.com").unwrap();
        assert!(verify(&m.ca(), &foreign, "api.example.com").is_err());
        assert!(!format!("{leaf:?}").contains("PRIVATE"));
    }

    #[test]
    fn ip_literal_gets_ip_san() {
        let m = minter(10, DEFAULT_LEAF_LIFETIME);
        for ip in ["10.1.2.3", "2001:db8::1"] {
            let leaf = m.mint_leaf(ip).unwrap();
            verify(&m.ca(), &leaf, ip).unwrap();
        }
    }

    #[test]
    fn leaf_never_outlives_the_ca() {
        let m = minter(10, Duration::from_secs(10 * 365 * 24 * 3600));
        let leaf = m.mint_leaf("long.example").unwrap();
        assert!(leaf.not_after <= SystemTime::from(m.ca().not_after()));
    }

    #[test]
    fn name_validation() {
        for ok in [
            "example.com",
            "a",
            "EXAMPLE.com",
            "x-y.example",
            "_svc.example",
            &"a".repeat(63),
        ] {
            LeafName::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        assert_eq!(LeafName::parse("ExAmple.COM").unwrap().key, "example.com");
        let long_name = ["a".repeat(63).as_str(); 4].join(".");
        for bad in [
            "",
            "*.example.com",
            "example.com.",
            "a..b",
            ".a",
            "-a.example",
            "a-.example",
            "exa mple.com",
            "exämple.com",
            "a/b",
            &"a".repeat(64),
            long_name.as_str(),
        ] {
            let err = LeafName::parse(bad).unwrap_err();
            assert_eq!(err.reason(), "tls_sni_invalid", "{bad}");
        }
    }

    #[tokio::test]
    async fn second_call_is_a_hit_with_the_same_config() {
        let m = minter(10, DEFAULT_LEAF_LIFETIME);
        let a = m.server_config("a.example").await.unwrap();
        let b = m.server_config("A.EXAMPLE").await.unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!((m.hits(), m.misses(), m.mints()), (1, 1, 1));
        assert_eq!(a.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(m.inflight.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn capacity_bounds_the_cache() {
        let m = minter(2, DEFAULT_LEAF_LIFETIME);
        let a = m.server_config("a.example").await.unwrap();
        m.server_config("b.example").await.unwrap();
        m.server_config("c.example").await.unwrap();
        assert_eq!(m.len(), 2);
        // a was least recently used and is gone: a new mint, a different config
        let a2 = m.server_config("a.example").await.unwrap();
        assert!(!Arc::ptr_eq(&a, &a2));
        assert_eq!(m.mints(), 4);
        assert_eq!(m.len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_share_one_mint() {
        let m = Arc::new(minter(10, DEFAULT_LEAF_LIFETIME));
        let barrier = Arc::new(tokio::sync::Barrier::new(50));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let m = Arc::clone(&m);
                let barrier = Arc::clone(&barrier);
                tokio::spawn(async move {
                    barrier.wait().await;
                    m.server_config("flight.example").await.unwrap()
                })
            })
            .collect();
        let mut configs = Vec::new();
        for t in tasks {
            configs.push(t.await.unwrap());
        }
        assert_eq!(m.mints(), 1);
        assert!(configs.iter().all(|c| Arc::ptr_eq(c, &configs[0])));
        assert_eq!(m.hits() + m.misses(), 50);
        assert!(m.inflight.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn leaf_near_expiry_is_reminted() {
        let m = minter(10, Duration::from_millis(400));
        let a = m.server_config("short.example").await.unwrap();
        let b = m.server_config("short.example").await.unwrap();
        assert!(Arc::ptr_eq(&a, &b), "fresh within 3/4 of the lifetime");
        // past 3/4 of 400 ms (but before expiry) the entry is stale
        tokio::time::sleep(Duration::from_millis(320)).await;
        let c = m.server_config("short.example").await.unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(m.mints(), 2);
    }

    #[tokio::test]
    async fn a_new_ca_replaces_every_cached_leaf() {
        let m = minter(10, DEFAULT_LEAF_LIFETIME);
        let old = m.ca();
        let a = m.server_config("a.example").await.unwrap();
        assert!(Arc::ptr_eq(
            &a,
            &m.server_config("a.example").await.unwrap()
        ));
        assert!(!m.set_ca(Arc::clone(&old)), "the same CA changes nothing");
        assert_eq!(m.len(), 1);
        let new = Arc::new(Ca::generate("Cellgate rotated test CA").unwrap());
        assert!(m.set_ca(Arc::clone(&new)));
        assert!(m.is_empty());
        assert_eq!(m.ca().fingerprint(), new.fingerprint());
        let b = m.server_config("a.example").await.unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(m.mints(), 2);
        let leaf = m.mint_leaf("a.example").unwrap();
        verify(&new, &leaf, "a.example").unwrap();
        assert!(verify(&old, &leaf, "a.example").is_err());
    }

    #[tokio::test]
    async fn invalid_name_is_refused_before_minting() {
        let m = minter(10, DEFAULT_LEAF_LIFETIME);
        let err = m.server_config("*.example.com").await.unwrap_err();
        assert!(matches!(err, MintError::InvalidName { .. }), "{err}");
        assert!(err.to_string().contains("*.example.com"), "{err}");
        assert_eq!(m.mints(), 0);
    }
}
