//! Building the header the tagger writes at the start of each connection to the node.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::{
    EncodeError, TokenError, FIXED_LEN, INET6_ADDR_LEN, INET_ADDR_LEN, MAX_TOKEN_LEN, SIGNATURE,
    TLV_HEADER_LEN, TOKEN_TLV,
};

/// Version 2, command PROXY.
pub(crate) const VERSION_COMMAND_PROXY: u8 = 0x21;
/// Family INET, protocol STREAM.
pub(crate) const FAMILY_TCP4: u8 = 0x11;
/// Family INET6, protocol STREAM.
pub(crate) const FAMILY_TCP6: u8 = 0x21;

/// Checks that `token` can be carried in the token TLV: non-empty, at most
/// [`MAX_TOKEN_LEN`] bytes, printable ASCII only (what a JWT is made of).
///
/// # Errors
/// The [`TokenError`] naming the first problem.
pub fn validate_token(token: &str) -> Result<(), TokenError> {
    let bytes = token.as_bytes();
    if bytes.is_empty() {
        return Err(TokenError::Empty);
    }
    if bytes.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong {
            len: bytes.len(),
            max: MAX_TOKEN_LEN,
        });
    }
    match bytes.iter().position(|b| !b.is_ascii_graphic()) {
        Some(offset) => Err(TokenError::InvalidByte {
            offset,
            byte: bytes.get(offset).copied().unwrap_or_default(),
        }),
        None => Ok(()),
    }
}

/// Encodes a PROXY/TCP header from `source` (the agent) to `destination` (what it dialled),
/// with `token` in a [`TOKEN_TLV`] TLV.
///
/// If both addresses are IPv4 (or IPv4-mapped IPv6) the header uses family INET; otherwise
/// INET6, with an IPv4 address written in its IPv4-mapped form. IPv6 flow info and scope id
/// are not carried.
///
/// # Errors
/// [`EncodeError::Token`] if the token fails [`validate_token`].
pub fn encode(
    source: SocketAddr,
    destination: SocketAddr,
    token: &str,
) -> Result<Vec<u8>, EncodeError> {
    validate_token(token)?;
    let (src_ip, dst_ip) = (source.ip().to_canonical(), destination.ip().to_canonical());
    let (family, addr_len) = match (src_ip, dst_ip) {
        (IpAddr::V4(_), IpAddr::V4(_)) => (FAMILY_TCP4, INET_ADDR_LEN),
        _ => (FAMILY_TCP6, INET6_ADDR_LEN),
    };
    let body_len = addr_len + TLV_HEADER_LEN + token.len();
    // Cannot fail: the token is at most MAX_TOKEN_LEN, and lib.rs asserts at compile time that
    // the largest header fits the 16-bit length field.
    let wire_len = u16::try_from(body_len).map_err(|_| TokenError::TooLong {
        len: token.len(),
        max: MAX_TOKEN_LEN,
    })?;
    let token_len = u16::try_from(token.len()).map_err(|_| TokenError::TooLong {
        len: token.len(),
        max: MAX_TOKEN_LEN,
    })?;

    let mut out = Vec::with_capacity(FIXED_LEN + body_len);
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_COMMAND_PROXY);
    out.push(family);
    out.extend_from_slice(&wire_len.to_be_bytes());
    match (src_ip, dst_ip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.extend_from_slice(&as_v6(s).octets());
            out.extend_from_slice(&as_v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out.push(TOKEN_TLV);
    out.extend_from_slice(&token_len.to_be_bytes());
    out.extend_from_slice(token.as_bytes());
    Ok(out)
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_validation() {
        assert_eq!(validate_token(""), Err(TokenError::Empty));
        assert_eq!(
            validate_token("a b"),
            Err(TokenError::InvalidByte {
                offset: 1,
                byte: b' '
            })
        );
        assert_eq!(
            validate_token("ab\n"),
            Err(TokenError::InvalidByte {
                offset: 2,
                byte: b'\n'
            })
        );
        assert!(matches!(
            validate_token("é"),
            Err(TokenError::InvalidByte { offset: 0, .. })
        ));
        assert_eq!(
            validate_token(&"a".repeat(MAX_TOKEN_LEN + 1)),
            Err(TokenError::TooLong {
                len: MAX_TOKEN_LEN + 1,
                max: MAX_TOKEN_LEN
            })
        );
        assert_eq!(validate_token(&"a".repeat(MAX_TOKEN_LEN)), Ok(()));
        assert_eq!(validate_token("eyJhbGciOiJFZERTQSJ9.e30.c2ln-_"), Ok(()));
    }

    #[test]
    fn encode_rejects_bad_tokens() {
        let a: SocketAddr = "10.0.0.1:1".parse().unwrap();
        assert_eq!(encode(a, a, ""), Err(EncodeError::Token(TokenError::Empty)));
        assert!(encode(a, a, "has space").is_err());
    }

    #[test]
    fn v4_layout_is_exact() {
        let bytes = encode(
            "10.1.2.3:40000".parse().unwrap(),
            "93.184.216.34:443".parse().unwrap(),
            "tok",
        )
        .unwrap();
        let mut want = SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 12 + 3 + 3]);
        want.extend_from_slice(&[10, 1, 2, 3, 93, 184, 216, 34]);
        want.extend_from_slice(&40000u16.to_be_bytes());
        want.extend_from_slice(&443u16.to_be_bytes());
        want.extend_from_slice(&[0xE0, 0, 3, b't', b'o', b'k']);
        assert_eq!(bytes, want);
    }

    #[test]
    fn mixed_families_use_inet6_with_mapped_v4() {
        let bytes = encode(
            "10.1.2.3:40000".parse().unwrap(),
            "[2001:db8::1]:443".parse().unwrap(),
            "tok",
        )
        .unwrap();
        assert_eq!(bytes[13], FAMILY_TCP6);
        assert_eq!(
            &bytes[16..32],
            &"::ffff:10.1.2.3".parse::<Ipv6Addr>().unwrap().octets()
        );
    }

    #[test]
    fn mapped_pair_is_encoded_as_inet() {
        let bytes = encode(
            "[::ffff:10.1.2.3]:1".parse().unwrap(),
            "[::ffff:1.2.3.4]:2".parse().unwrap(),
            "tok",
        )
        .unwrap();
        assert_eq!(bytes[13], FAMILY_TCP4);
    }
}
