//! Error types for encoding and decoding, and the stable reason labels that audit records and
//! metrics carry for every rejected header.

use std::io;

/// Why an identity token cannot be put on the wire, or why the one received is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The header has no TLV of type [`crate::TOKEN_TLV`].
    #[error("no tlv of type 0xe0 (identity token) in the header")]
    Missing,
    /// The token is zero bytes long.
    #[error("the identity token is empty")]
    Empty,
    /// The token is longer than [`crate::MAX_TOKEN_LEN`].
    #[error("the identity token is {len} bytes, over the limit of {max}")]
    TooLong {
        /// Length of the token.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The token holds a byte that is not printable ASCII (a JWT never does; whitespace and
    /// control bytes would let a token smuggle line breaks into logs).
    #[error("the identity token has byte 0x{byte:02x} at offset {offset}; only printable ascii is allowed (is the token file a jwt?)")]
    InvalidByte {
        /// Offset of the first offending byte.
        offset: usize,
        /// The byte.
        byte: u8,
    },
}

/// Why [`crate::encode`] refused to build a header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The token cannot be carried.
    #[error("cannot encode proxy protocol v2 header: {0}")]
    Token(#[from] TokenError),
}

/// What exactly is wrong with a header that is structurally invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The high nibble of byte 13 is not 2.
    #[error("version {0} (byte 13 is 0x{1:02x}); only version 2 exists")]
    Version(u8, u8),
    /// The low nibble of byte 13 is neither LOCAL (0) nor PROXY (1).
    #[error("unknown command {0}")]
    Command(u8),
    /// The address family is not INET or INET6 (UNSPEC and UNIX carry no usable agent address).
    #[error("address family {0} (byte 14 is 0x{1:02x}); only inet (1) and inet6 (2) are accepted")]
    Family(u8, u8),
    /// The transport is not STREAM (Cellgate only proxies TCP).
    #[error("transport protocol {0} (byte 14 is 0x{1:02x}); only stream (1) is accepted")]
    Protocol(u8, u8),
    /// The announced length is shorter than the address block of the announced family.
    #[error("announced length {len} is shorter than the {need}-byte address block of the family")]
    AddressBlockTooShort {
        /// Announced length.
        len: usize,
        /// Address block length of the family.
        need: usize,
    },
    /// A TLV header or value runs past the announced end of the header.
    #[error("tlv at offset {offset} runs past the end of the header ({available} bytes left)")]
    TlvOverrun {
        /// Offset of the TLV from the start of the header.
        offset: usize,
        /// Bytes left in the header at that offset.
        available: usize,
    },
    /// More than one token TLV: ambiguous, so rejected rather than picking one.
    #[error("more than one identity token tlv (second at offset {offset})")]
    DuplicateToken {
        /// Offset of the second token TLV from the start of the header.
        offset: usize,
    },
}

/// Why a connection's PPv2 header was rejected. [`ParseError::reason`] gives the stable label.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The stream does not start with the PPv2 signature.
    #[error("no proxy protocol v2 header: the connection starts with {first_bytes} (hex) instead of the v2 signature")]
    Missing {
        /// Hex of the first bytes seen (at most 16).
        first_bytes: String,
    },
    /// The stream starts with a PPv1 text header (`PROXY ...`).
    #[error("proxy protocol v1 (text) header received; only v2 is accepted")]
    V1Unsupported,
    /// The stream ended before the header was complete.
    #[error("proxy protocol v2 header truncated: stream ended after {have} of {need} bytes")]
    Truncated {
        /// Bytes received.
        have: usize,
        /// Bytes needed for the part being read (16 for the fixed part, else the whole header).
        need: usize,
    },
    /// Structurally invalid header.
    #[error("malformed proxy protocol v2 header: {0}")]
    Malformed(#[from] Malformed),
    /// A LOCAL command: a connection that does not carry an agent (health checks).
    #[error("proxy protocol v2 local command: the connection carries no agent identity")]
    LocalCommand,
    /// The announced header length is over [`crate::MAX_HEADER_LEN`].
    #[error("proxy protocol v2 header announces {announced} bytes, over the limit of {max}")]
    TooLarge {
        /// Whole header length announced (fixed part included).
        announced: usize,
        /// The limit.
        max: usize,
    },
    /// No usable identity token.
    #[error("proxy protocol v2 header without a usable identity token: {0}")]
    NoToken(#[from] TokenError),
    /// Reading from the stream failed.
    #[error("reading proxy protocol v2 header: {0}")]
    Io(#[from] io::Error),
}

impl ParseError {
    /// Every label [`ParseError::reason`] gives.
    pub const LABELS: &'static [&'static str] = &[
        "ppv2_missing",
        "ppv2_v1_unsupported",
        "ppv2_truncated",
        "ppv2_malformed",
        "ppv2_local_command",
        "ppv2_too_large",
        "ppv2_no_token",
        "ppv2_io",
    ];

    /// Short stable snake_case label for audit records and metrics. Never changes once released.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing { .. } => "ppv2_missing",
            Self::V1Unsupported => "ppv2_v1_unsupported",
            Self::Truncated { .. } => "ppv2_truncated",
            Self::Malformed(_) => "ppv2_malformed",
            Self::LocalCommand => "ppv2_local_command",
            Self::TooLarge { .. } | Self::NoToken(TokenError::TooLong { .. }) => "ppv2_too_large",
            Self::NoToken(_) => "ppv2_no_token",
            Self::Io(_) => "ppv2_io",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_labels_are_stable() {
        let cases: Vec<(ParseError, &str)> = vec![
            (
                ParseError::Missing {
                    first_bytes: "47".into(),
                },
                "ppv2_missing",
            ),
            (ParseError::V1Unsupported, "ppv2_v1_unsupported"),
            (
                ParseError::Truncated { have: 1, need: 16 },
                "ppv2_truncated",
            ),
            (
                ParseError::Malformed(Malformed::Command(2)),
                "ppv2_malformed",
            ),
            (ParseError::LocalCommand, "ppv2_local_command"),
            (
                ParseError::TooLarge {
                    announced: 1,
                    max: 0,
                },
                "ppv2_too_large",
            ),
            (
                ParseError::NoToken(TokenError::TooLong {
                    len: 9000,
                    max: 8192,
                }),
                "ppv2_too_large",
            ),
            (ParseError::NoToken(TokenError::Missing), "ppv2_no_token"),
            (ParseError::NoToken(TokenError::Empty), "ppv2_no_token"),
            (ParseError::Io(io::Error::other("boom")), "ppv2_io"),
        ];
        for (err, label) in cases {
            assert_eq!(err.reason(), label, "{err}");
            assert!(ParseError::LABELS.contains(&label), "{label} not in LABELS");
            let message = err.to_string();
            assert_eq!(
                message,
                message.to_lowercase(),
                "messages are lowercase: {message}"
            );
        }
    }
}
