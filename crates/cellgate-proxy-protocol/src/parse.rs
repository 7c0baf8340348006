//! Decoding a header from bytes the node received from the network.
//!
//! Strict tier: every byte here may come from an attacker who reached the node's intake port,
//! so nothing panics, nothing indexes unchecked, all arithmetic is checked, and the length
//! limit is enforced before anything is buffered. [`crate::read_header`] shares the pieces
//! below (signature check, fixed part, body) so the slice and stream decoders cannot drift.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{
    validate_token, Malformed, ParseError, ProxyHeader, TokenError, FIXED_LEN, INET6_ADDR_LEN,
    INET_ADDR_LEN, MAX_HEADER_LEN, SIGNATURE, TLV_HEADER_LEN, TOKEN_TLV,
};

/// How a PPv1 header starts. Only the first five bytes are compared: enough to tell it apart
/// from the v2 signature and from application bytes.
const V1_PREFIX: &[u8] = b"PROXY";

/// What the first bytes of a stream say so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// Consistent with the v2 signature (possibly not all of it seen yet).
    V2,
    /// A proper prefix of `PROXY`: one more byte decides.
    MaybeV1,
    /// Starts with `PROXY`.
    V1,
    /// Anything else.
    Other,
}

/// Classifies the first bytes of a stream.
pub(crate) fn classify(seen: &[u8]) -> Start {
    if SIGNATURE.starts_with(seen) || seen.starts_with(&SIGNATURE) {
        Start::V2
    } else if seen.starts_with(V1_PREFIX) {
        Start::V1
    } else if V1_PREFIX.starts_with(seen) {
        Start::MaybeV1
    } else {
        Start::Other
    }
}

/// The error for `seen`, the bytes of a fixed part that is not (yet) a v2 signature, or that
/// ended after `seen.len()` bytes when `need` were required.
pub(crate) fn start_error(seen: &[u8], need: usize) -> ParseError {
    match classify(seen) {
        Start::V2 => ParseError::Truncated {
            have: seen.len(),
            need,
        },
        Start::V1 => ParseError::V1Unsupported,
        Start::MaybeV1 | Start::Other => ParseError::Missing {
            first_bytes: hex(seen.get(..FIXED_LEN).unwrap_or(seen)),
        },
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().saturating_mul(2));
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Address family of a validated fixed part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Inet,
    Inet6,
}

/// What the fixed 16 bytes announce, once validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fixed {
    pub(crate) family: Family,
    /// Bytes after the fixed part: address block and TLVs. At most
    /// `MAX_HEADER_LEN - FIXED_LEN`.
    pub(crate) body_len: usize,
}

/// Validates the fixed part (whose signature has already been matched): version, command,
/// size limit, family, protocol, in that order.
pub(crate) fn check_fixed(fixed: &[u8; FIXED_LEN]) -> Result<Fixed, ParseError> {
    let [.., version_command, family_protocol, len_hi, len_lo] = *fixed;
    let version = version_command >> 4;
    if version != 2 {
        return Err(Malformed::Version(version, version_command).into());
    }
    match version_command & 0x0F {
        0 => return Err(ParseError::LocalCommand),
        1 => {}
        other => return Err(Malformed::Command(other).into()),
    }
    let body_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    let announced = body_len.saturating_add(FIXED_LEN);
    if announced > MAX_HEADER_LEN {
        return Err(ParseError::TooLarge {
            announced,
            max: MAX_HEADER_LEN,
        });
    }
    let family = match family_protocol >> 4 {
        1 => Family::Inet,
        2 => Family::Inet6,
        other => return Err(Malformed::Family(other, family_protocol).into()),
    };
    match family_protocol & 0x0F {
        1 => {}
        other => return Err(Malformed::Protocol(other, family_protocol).into()),
    }
    let need = match family {
        Family::Inet => INET_ADDR_LEN,
        Family::Inet6 => INET6_ADDR_LEN,
    };
    if body_len < need {
        return Err(Malformed::AddressBlockTooShort {
            len: body_len,
            need,
        }
        .into());
    }
    Ok(Fixed { family, body_len })
}

/// Decodes the body (everything after the fixed part; exactly `fixed.body_len` bytes).
pub(crate) fn parse_body(fixed: Fixed, body: &[u8]) -> Result<ProxyHeader, ParseError> {
    let too_short = || Malformed::AddressBlockTooShort {
        len: body.len(),
        need: match fixed.family {
            Family::Inet => INET_ADDR_LEN,
            Family::Inet6 => INET6_ADDR_LEN,
        },
    };
    let (src_ip, dst_ip, rest): (IpAddr, IpAddr, &[u8]) = match fixed.family {
        Family::Inet => {
            let (src, rest) = body.split_first_chunk::<4>().ok_or_else(too_short)?;
            let (dst, rest) = rest.split_first_chunk::<4>().ok_or_else(too_short)?;
            (
                Ipv4Addr::from(*src).into(),
                Ipv4Addr::from(*dst).into(),
                rest,
            )
        }
        Family::Inet6 => {
            let (src, rest) = body.split_first_chunk::<16>().ok_or_else(too_short)?;
            let (dst, rest) = rest.split_first_chunk::<16>().ok_or_else(too_short)?;
            // A mapped address means the encoder had one IPv4 and one IPv6 address; give
            // the node the plain IPv4 address so it compares equal to the pod's.
            (
                Ipv6Addr::from(*src).to_canonical(),
                Ipv6Addr::from(*dst).to_canonical(),
                rest,
            )
        }
    };
    let (src_port, rest) = rest.split_first_chunk::<2>().ok_or_else(too_short)?;
    let (dst_port, tlvs) = rest.split_first_chunk::<2>().ok_or_else(too_short)?;

    let tlv_start = FIXED_LEN.saturating_add(body.len().saturating_sub(tlvs.len()));
    let token = find_token(tlvs, tlv_start)?;
    let token = std::str::from_utf8(token).map_err(|e| TokenError::InvalidByte {
        offset: e.valid_up_to(),
        byte: token.get(e.valid_up_to()).copied().unwrap_or_default(),
    })?;
    validate_token(token)?;

    Ok(ProxyHeader {
        source: SocketAddr::new(src_ip, u16::from_be_bytes(*src_port)),
        destination: SocketAddr::new(dst_ip, u16::from_be_bytes(*dst_port)),
        token: token.to_owned(),
    })
}

/// Walks the TLVs and returns the value of the single token TLV. Other TLVs are skipped (a hop
/// may add its own, e.g. NOOP padding or a CRC32C which Cellgate does not check).
/// `offset` is where `tlvs` starts in the header, for error messages.
fn find_token(mut tlvs: &[u8], mut offset: usize) -> Result<&[u8], ParseError> {
    let mut token = None;
    while !tlvs.is_empty() {
        let overrun = Malformed::TlvOverrun {
            offset,
            available: tlvs.len(),
        };
        let Some((&[kind, len_hi, len_lo], rest)) = tlvs.split_first_chunk::<TLV_HEADER_LEN>()
        else {
            return Err(overrun.into());
        };
        let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        let Some((value, rest)) = rest.split_at_checked(len) else {
            return Err(overrun.into());
        };
        if kind == TOKEN_TLV {
            if token.is_some() {
                return Err(Malformed::DuplicateToken { offset }.into());
            }
            token = Some(value);
        }
        offset = offset.saturating_add(TLV_HEADER_LEN).saturating_add(len);
        tlvs = rest;
    }
    token.ok_or(ParseError::NoToken(TokenError::Missing))
}

/// Decodes the header at the start of `buf`, which must hold the whole header (it may hold
/// more: the count of header bytes is returned alongside, and the rest is the payload).
///
/// # Errors
/// A [`ParseError`]; [`ParseError::Truncated`] if `buf` ends inside the header.
pub fn parse(buf: &[u8]) -> Result<(ProxyHeader, usize), ParseError> {
    let Some(fixed) = buf.first_chunk::<FIXED_LEN>() else {
        return Err(start_error(buf, FIXED_LEN));
    };
    if classify(fixed) != Start::V2 {
        return Err(start_error(fixed, FIXED_LEN));
    }
    let fixed = check_fixed(fixed)?;
    let total = FIXED_LEN.saturating_add(fixed.body_len);
    let Some(body) = buf.get(FIXED_LEN..total) else {
        return Err(ParseError::Truncated {
            have: buf.len(),
            need: total,
        });
    };
    Ok((parse_body(fixed, body)?, total))
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;
    use crate::{encode, MAX_TOKEN_LEN};

    const TOKEN: &str = "eyJhbGciOiJFZERTQSIsImtpZCI6ImsxIn0.eyJzdWIiOiJjZWxsIn0.c2lnbmF0dXJl";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A header built by hand: fixed part with `vc`, `fp` and the right length, then `body`.
    fn raw(vc: u8, fp: u8, body: &[u8]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&[vc, fp]);
        out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
        out.extend_from_slice(value);
        out
    }

    fn v4_addrs() -> Vec<u8> {
        vec![10, 0, 0, 1, 1, 2, 3, 4, 0x30, 0x39, 0x01, 0xbb]
    }

    fn reason(buf: &[u8]) -> &'static str {
        parse(buf).unwrap_err().reason()
    }

    #[test]
    fn round_trip_v4() {
        let (src, dst) = (addr("10.0.0.1:12345"), addr("1.2.3.4:443"));
        let bytes = encode(src, dst, TOKEN).unwrap();
        let (header, used) = parse(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!((header.source, header.destination), (src, dst));
        assert_eq!(header.token, TOKEN);
        assert_eq!(header.encode().unwrap(), bytes);
    }

    #[test]
    fn round_trip_v6() {
        let (src, dst) = (addr("[fd00::5]:40000"), addr("[2001:db8::1]:8443"));
        let bytes = encode(src, dst, TOKEN).unwrap();
        assert_eq!(bytes[13], 0x21);
        let (header, used) = parse(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!((header.source, header.destination), (src, dst));
        assert_eq!(header.token, TOKEN);
    }

    #[test]
    fn round_trip_mixed_families_decodes_canonical_addresses() {
        let (src, dst) = (addr("10.0.0.1:12345"), addr("[2001:db8::1]:443"));
        let (header, _) = parse(&encode(src, dst, TOKEN).unwrap()).unwrap();
        assert_eq!((header.source, header.destination), (src, dst));
    }

    #[test]
    fn reports_bytes_consumed_and_leaves_the_payload() {
        let mut bytes = encode(addr("10.0.0.1:1"), addr("1.2.3.4:2"), TOKEN).unwrap();
        let header_len = bytes.len();
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let (_, used) = parse(&bytes).unwrap();
        assert_eq!(used, header_len);
        assert_eq!(&bytes[used..], b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn other_tlvs_are_ignored_before_and_after_the_token() {
        let mut body = v4_addrs();
        body.extend(tlv(0x04, &[0; 7])); // NOOP
        body.extend(tlv(0x01, b"h2")); // ALPN
        body.extend(tlv(TOKEN_TLV, TOKEN.as_bytes()));
        body.extend(tlv(0xE1, b"other custom"));
        body.extend(tlv(0x03, &[0; 4])); // CRC32C, not checked
        let bytes = raw(0x21, 0x11, &body);
        let (header, used) = parse(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(header.token, TOKEN);
        assert_eq!(header.source, addr("10.0.0.1:12345"));
        assert_eq!(header.destination, addr("1.2.3.4:443"));
    }

    #[test]
    fn truncated_at_every_offset() {
        let bytes = encode(addr("[fd00::5]:40000"), addr("[2001:db8::1]:443"), TOKEN).unwrap();
        for cut in 0..bytes.len() {
            let err = parse(&bytes[..cut]).unwrap_err();
            assert_eq!(err.reason(), "ppv2_truncated", "cut at {cut}: {err}");
        }
    }

    #[test]
    fn missing_signature() {
        let err = parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err();
        assert_eq!(err.reason(), "ppv2_missing");
        assert!(err.to_string().contains("474554202f"), "{err}");
        assert_eq!(reason(b"\x16\x03\x01\x02\x00"), "ppv2_missing"); // a TLS ClientHello
        assert_eq!(reason(b"PRO"), "ppv2_missing"); // too short to be v1 either
        let mut almost = SIGNATURE.to_vec();
        almost[11] = b'X';
        almost.extend_from_slice(&[0x21, 0x11, 0, 0]);
        assert_eq!(reason(&almost), "ppv2_missing");
    }

    #[test]
    fn v1_is_unsupported() {
        assert_eq!(
            reason(b"PROXY TCP4 10.0.0.1 1.2.3.4 1234 443\r\n"),
            "ppv2_v1_unsupported"
        );
        assert_eq!(reason(b"PROXY"), "ppv2_v1_unsupported");
    }

    #[test]
    fn local_command() {
        assert_eq!(reason(&raw(0x20, 0x00, &[])), "ppv2_local_command");
        assert_eq!(reason(&raw(0x20, 0x11, &v4_addrs())), "ppv2_local_command");
    }

    #[test]
    fn malformed_fixed_parts() {
        for (vc, fp, body, what) in [
            (0x11, 0x11, v4_addrs(), "version"),
            (0x31, 0x11, v4_addrs(), "version"),
            (0x22, 0x11, v4_addrs(), "command"),
            (0x21, 0x01, v4_addrs(), "family"),   // UNSPEC
            (0x21, 0x31, vec![0; 216], "family"), // UNIX
            (0x21, 0x41, v4_addrs(), "family"),
            (0x21, 0x12, v4_addrs(), "protocol"), // UDP over IPv4
            (0x21, 0x22, vec![0; 36], "protocol"), // UDP over IPv6
            (0x21, 0x10, v4_addrs(), "protocol"), // UNSPEC
            (0x21, 0x11, vec![0; 11], "shorter"),
            (0x21, 0x21, v4_addrs(), "shorter"), // INET6 with an INET-sized block
        ] {
            let err = parse(&raw(vc, fp, &body)).unwrap_err();
            assert_eq!(err.reason(), "ppv2_malformed", "{what}: {err}");
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn malformed_tlvs() {
        // A TLV header cut short.
        let mut body = v4_addrs();
        body.extend(tlv(TOKEN_TLV, TOKEN.as_bytes()));
        body.extend_from_slice(&[0x04, 0x00]);
        let err = parse(&raw(0x21, 0x11, &body)).unwrap_err();
        assert_eq!(err.reason(), "ppv2_malformed", "{err}");
        // A TLV value longer than what is left.
        let mut body = v4_addrs();
        body.extend_from_slice(&[TOKEN_TLV, 0x00, 0x10, b'a']);
        let err = parse(&raw(0x21, 0x11, &body)).unwrap_err();
        assert_eq!(err.reason(), "ppv2_malformed", "{err}");
        assert!(err.to_string().contains("offset 28"), "{err}");
        // Two tokens.
        let mut body = v4_addrs();
        body.extend(tlv(TOKEN_TLV, b"first"));
        body.extend(tlv(TOKEN_TLV, b"second"));
        let err = parse(&raw(0x21, 0x11, &body)).unwrap_err();
        assert!(
            matches!(
                err,
                ParseError::Malformed(Malformed::DuplicateToken { offset: 36 })
            ),
            "{err}"
        );
    }

    #[test]
    fn no_usable_token() {
        let cases: Vec<(Vec<u8>, TokenError)> = vec![
            (v4_addrs(), TokenError::Missing),
            ([v4_addrs(), tlv(0x04, b"x")].concat(), TokenError::Missing),
            (
                [v4_addrs(), tlv(TOKEN_TLV, b"")].concat(),
                TokenError::Empty,
            ),
            (
                [v4_addrs(), tlv(TOKEN_TLV, b"ab\xffc")].concat(),
                TokenError::InvalidByte {
                    offset: 2,
                    byte: 0xff,
                },
            ),
            (
                [v4_addrs(), tlv(TOKEN_TLV, b"ab\ncd")].concat(),
                TokenError::InvalidByte {
                    offset: 2,
                    byte: b'\n',
                },
            ),
        ];
        for (body, want) in cases {
            let err = parse(&raw(0x21, 0x11, &body)).unwrap_err();
            assert_eq!(err.reason(), "ppv2_no_token", "{err}");
            assert!(
                matches!(&err, ParseError::NoToken(got) if *got == want),
                "{err}"
            );
        }
    }

    #[test]
    fn oversize_header_is_rejected_before_reading_it() {
        // Only the fixed part is present: the announced length alone decides.
        let mut bytes = SIGNATURE.to_vec();
        let len = u16::try_from(MAX_HEADER_LEN - FIXED_LEN + 1).unwrap();
        bytes.extend_from_slice(&[0x21, 0x11]);
        bytes.extend_from_slice(&len.to_be_bytes());
        let err = parse(&bytes).unwrap_err();
        assert!(
            matches!(err, ParseError::TooLarge { announced, max } if announced == MAX_HEADER_LEN + 1 && max == MAX_HEADER_LEN),
            "{err}"
        );
        bytes[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(reason(&bytes), "ppv2_too_large");
        // Exactly at the limit is fine (padding TLV around a normal token).
        let mut body = v4_addrs();
        body.extend(tlv(TOKEN_TLV, TOKEN.as_bytes()));
        let pad = MAX_HEADER_LEN - FIXED_LEN - body.len() - 3;
        body.extend(tlv(0x04, &vec![0; pad]));
        let bytes = raw(0x21, 0x11, &body);
        assert_eq!(bytes.len(), MAX_HEADER_LEN);
        assert_eq!(parse(&bytes).unwrap().1, MAX_HEADER_LEN);
    }

    #[test]
    fn oversize_token_is_too_large() {
        let mut body = v4_addrs();
        body.extend(tlv(TOKEN_TLV, &vec![b'a'; MAX_TOKEN_LEN + 1]));
        let err = parse(&raw(0x21, 0x11, &body)).unwrap_err();
        assert_eq!(err.reason(), "ppv2_too_large", "{err}");
    }

    #[test]
    fn ppp_decodes_what_we_encode() {
        for (src, dst) in [
            (addr("10.0.0.1:12345"), addr("1.2.3.4:443")),
            (addr("[fd00::5]:40000"), addr("[2001:db8::1]:8443")),
        ] {
            let bytes = encode(src, dst, TOKEN).unwrap();
            let header = ppp::v2::Header::try_from(bytes.as_slice()).unwrap();
            assert_eq!(header.command, ppp::v2::Command::Proxy);
            assert_eq!(header.protocol, ppp::v2::Protocol::Stream);
            assert_eq!(header.len(), bytes.len());
            let want: ppp::v2::Addresses = (src, dst).into();
            assert_eq!(header.addresses, want);
            let tlvs: Vec<_> = header.tlvs().map(|t| t.unwrap()).collect();
            assert_eq!(tlvs.len(), 1);
            assert_eq!(tlvs[0].kind, TOKEN_TLV);
            assert_eq!(&*tlvs[0].value, TOKEN.as_bytes());
        }
    }

    #[test]
    fn we_decode_what_ppp_encodes() {
        for (src, dst) in [
            (addr("10.0.0.1:12345"), addr("1.2.3.4:443")),
            (addr("[fd00::5]:40000"), addr("[2001:db8::1]:8443")),
        ] {
            let bytes =
                ppp::v2::Builder::with_addresses(0x21, ppp::v2::Protocol::Stream, (src, dst))
                    .write_tlv(0x04, &[0, 0])
                    .unwrap()
                    .write_tlv(TOKEN_TLV, TOKEN.as_bytes())
                    .unwrap()
                    .build()
                    .unwrap();
            let (header, used) = parse(&bytes).unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!((header.source, header.destination), (src, dst));
            assert_eq!(header.token, TOKEN);
        }
    }
}
