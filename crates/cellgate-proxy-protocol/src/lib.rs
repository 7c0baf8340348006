//! Proxy Protocol v2 as Cellgate uses it.
//!
//! The tagger sidecar opens one TCP connection to the node proxy per agent connection and
//! writes a PPv2 header first: command PROXY, TCP over IPv4 or IPv6, source = the agent's
//! address, destination = the address the agent originally dialled, and a TLV of type
//! [`TOKEN_TLV`] carrying the agent's identity token (an ASCII JWT). The node reads that header
//! before anything else and rejects the connection if it is missing or malformed.
//!
//! Start reading at [`encode`] (tagger side), [`parse`] and [`read_header`] (node side).
//! Every rejection is a [`ParseError`] whose [`ParseError::reason`] is the stable label written
//! into audit records and metrics.
//!
//! The decoder is hand-written rather than built on the `ppp` crate so that the size limit is
//! checked before anything is buffered, every failure maps to exactly one reason label, and the
//! code that touches attacker-controlled bytes is small enough to audit (`ppp` is used in the
//! tests as an independent cross-check).

mod encode;
mod error;
mod parse;
mod read;

use std::fmt;
use std::net::SocketAddr;

pub use encode::{encode, validate_token};
pub use error::{EncodeError, Malformed, ParseError, TokenError};
pub use parse::parse;
pub use read::read_header;

/// TLV type carrying the identity token. 0xE0..=0xEF is the range the PPv2 spec reserves for
/// custom (application-specific) use, so no standard TLV collides with it.
pub const TOKEN_TLV: u8 = 0xE0;

/// Largest identity token accepted, in bytes. Cellgate tokens are Ed25519 JWTs of well under
/// 1 KiB; 8 KiB leaves room for claim growth while bounding what the node buffers for a peer
/// it has not authenticated yet.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Largest whole header accepted (fixed part, address block and all TLVs), in bytes. The node
/// reads this much from an unauthenticated peer before it knows who it is, so it is kept far
/// below the 64 KiB the 16-bit length field allows: one maximal token, the IPv6 address block,
/// and about 8 KiB of slack for TLVs another hop may add (which Cellgate ignores).
pub const MAX_HEADER_LEN: usize = 16 * 1024;

/// The 12-byte signature every PPv2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Length of the fixed part: signature, version/command, family/protocol, 16-bit length.
pub const FIXED_LEN: usize = 16;

/// Address block length for TCP over IPv4: two addresses and two ports.
const INET_ADDR_LEN: usize = 4 + 4 + 2 + 2;
/// Address block length for TCP over IPv6: two addresses and two ports.
const INET6_ADDR_LEN: usize = 16 + 16 + 2 + 2;
/// A TLV's own header: type byte and 16-bit length.
const TLV_HEADER_LEN: usize = 3;

// The largest header the encoder can produce must be one the decoder accepts and one the
// 16-bit length field can express.
const _: () =
    assert!(FIXED_LEN + INET6_ADDR_LEN + TLV_HEADER_LEN + MAX_TOKEN_LEN <= MAX_HEADER_LEN);
const _: () = assert!(MAX_HEADER_LEN - FIXED_LEN <= u16::MAX as usize);

/// A decoded Cellgate PPv2 header.
///
/// Addresses are canonical: an IPv4-mapped IPv6 address (which the encoder uses when the two
/// addresses have different families) decodes to the plain IPv4 address. Flow info and scope
/// id of IPv6 addresses are not carried by PPv2 and decode as zero.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The agent's address, as the tagger saw it.
    pub source: SocketAddr,
    /// The address the agent dialled before iptables redirected it to the tagger.
    pub destination: SocketAddr,
    /// The identity token: non-empty, printable ASCII, at most [`MAX_TOKEN_LEN`] bytes.
    pub token: String,
}

impl ProxyHeader {
    /// Encodes this header; see [`encode`].
    ///
    /// # Errors
    /// [`EncodeError`] if the token is empty, too long or not printable ASCII.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode(self.source, self.destination, &self.token)
    }
}

// The token is a credential: never print it, not even in debug output.
impl fmt::Debug for ProxyHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyHeader")
            .field("source", &self.source)
            .field("destination", &self.destination)
            .field(
                "token",
                &format_args!("<redacted, {} bytes>", self.token.len()),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_does_not_print_the_token() {
        let header = ProxyHeader {
            source: "10.0.0.1:1234".parse().unwrap(),
            destination: "1.2.3.4:443".parse().unwrap(),
            token: "secret.jwt.value".into(),
        };
        let printed = format!("{header:?}");
        assert!(!printed.contains("secret"), "{printed}");
        assert!(printed.contains("16 bytes"), "{printed}");
    }
}
