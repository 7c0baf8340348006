//! Reading a header off a live stream without consuming a byte of what follows it.
//!
//! Strict tier, like [`crate::parse`]: the stream is attacker-controlled. The fixed 16 bytes
//! are read first (giving up as soon as the bytes seen cannot be a v2 signature, so a client
//! that speaks HTTP or TLS straight at the node is rejected without waiting for 16 bytes),
//! then exactly the announced length, which is checked against [`crate::MAX_HEADER_LEN`]
//! before the buffer is allocated. No read asks for more than the header still owes, so the
//! payload stays in the stream (or its buffer) for the caller.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::parse::{check_fixed, classify, parse_body, start_error, Start};
use crate::{ParseError, ProxyHeader, FIXED_LEN};

/// Reads one PPv2 header from `r`, consuming exactly its bytes.
///
/// # Errors
/// A [`ParseError`]; [`ParseError::Truncated`] if the stream ends inside the header,
/// [`ParseError::Io`] if a read fails.
///
/// # Caveats
/// There is no timeout here: a peer that sends half a header and stalls holds the future
/// forever. Wrap the call in `tokio::time::timeout`.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<ProxyHeader, ParseError> {
    let mut fixed = [0u8; FIXED_LEN];
    let mut have = 0usize;
    while have < FIXED_LEN {
        let Some(dst) = fixed.get_mut(have..) else {
            break;
        };
        let n = r.read(dst).await?;
        let seen_before = fixed.get(..have).unwrap_or_default();
        if n == 0 {
            return Err(start_error(seen_before, FIXED_LEN));
        }
        have = have.saturating_add(n).min(FIXED_LEN);
        let seen = fixed.get(..have).unwrap_or_default();
        match classify(seen) {
            Start::V2 | Start::MaybeV1 => {}
            Start::V1 | Start::Other => return Err(start_error(seen, FIXED_LEN)),
        }
    }
    // A full 16 bytes that classify as V2 are the signature itself.
    let fixed = check_fixed(&fixed)?;
    // Bounded by MAX_HEADER_LEN in check_fixed, so this allocation is bounded too.
    let mut body = vec![0u8; fixed.body_len];
    let mut got = 0usize;
    while got < body.len() {
        let Some(dst) = body.get_mut(got..) else {
            break;
        };
        let n = r.read(dst).await?;
        if n == 0 {
            return Err(ParseError::Truncated {
                have: FIXED_LEN.saturating_add(got),
                need: FIXED_LEN.saturating_add(fixed.body_len),
            });
        }
        got = got.saturating_add(n);
    }
    parse_body(fixed, &body)
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncWriteExt, ReadBuf};

    use super::*;
    use crate::encode;

    const TOKEN: &str = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJjZWxsIn0.c2ln";

    fn header_bytes() -> Vec<u8> {
        encode(
            "10.0.0.1:5555".parse().unwrap(),
            "1.2.3.4:443".parse().unwrap(),
            TOKEN,
        )
        .unwrap()
    }

    /// Hands out at most one byte per read, like a slow network.
    struct Trickle<'a>(&'a [u8]);

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some((first, rest)) = self.0.split_first() {
                buf.put_slice(&[*first]);
                self.0 = rest;
            }
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn leaves_the_payload_in_the_stream() {
        let mut bytes = header_bytes();
        bytes.extend_from_slice(b"payload");
        let mut r: &[u8] = &bytes;
        let header = read_header(&mut r).await.unwrap();
        assert_eq!(header.token, TOKEN);
        assert_eq!(header.destination, "1.2.3.4:443".parse().unwrap());
        assert_eq!(r, b"payload");

        let mut slow = Trickle(&bytes);
        let header = read_header(&mut slow).await.unwrap();
        assert_eq!(header.source, "10.0.0.1:5555".parse().unwrap());
        assert_eq!(slow.0, b"payload");
    }

    #[tokio::test]
    async fn over_a_socket_pair_the_payload_follows() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            client.write_all(&header_bytes()).await.unwrap();
            client.write_all(b"hello").await.unwrap();
            client
        });
        let header = read_header(&mut server).await.unwrap();
        assert_eq!(header.token, TOKEN);
        let _client = writer.await.unwrap();
        let mut rest = [0u8; 5];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"hello");
    }

    #[tokio::test]
    async fn truncated_at_every_offset() {
        let bytes = header_bytes();
        for cut in 0..bytes.len() {
            let mut r: &[u8] = &bytes[..cut];
            let err = read_header(&mut r).await.unwrap_err();
            assert_eq!(err.reason(), "ppv2_truncated", "cut at {cut}: {err}");
            let mut slow = Trickle(&bytes[..cut]);
            let err = read_header(&mut slow).await.unwrap_err();
            assert_eq!(
                err.reason(),
                "ppv2_truncated",
                "trickled, cut at {cut}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn rejects_a_non_header_without_waiting_for_sixteen_bytes() {
        // The writer stays open: if read_header waited for 16 bytes this would hang.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"G").await.unwrap();
        let err = read_header(&mut server).await.unwrap_err();
        assert_eq!(err.reason(), "ppv2_missing");

        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"PROXY").await.unwrap();
        let err = read_header(&mut server).await.unwrap_err();
        assert_eq!(err.reason(), "ppv2_v1_unsupported");
        drop(client);
    }

    #[tokio::test]
    async fn every_reason_over_a_stream() {
        let mut local = crate::SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        let mut huge = crate::SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let mut udp = crate::SIGNATURE.to_vec();
        udp.extend_from_slice(&[0x21, 0x12, 0x00, 0x0c]);
        udp.extend_from_slice(&[0; 12]);
        let mut no_token = crate::SIGNATURE.to_vec();
        no_token.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c]);
        no_token.extend_from_slice(&[0; 12]);
        let cases: [(&[u8], &str); 6] = [
            (b"GET / HTTP/1.1\r\n\r\n", "ppv2_missing"),
            (b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n", "ppv2_v1_unsupported"),
            (&local, "ppv2_local_command"),
            (&huge, "ppv2_too_large"),
            (&udp, "ppv2_malformed"),
            (&no_token, "ppv2_no_token"),
        ];
        for (bytes, want) in cases {
            let mut r = bytes;
            let err = read_header(&mut r).await.unwrap_err();
            assert_eq!(err.reason(), want, "{err}");
        }
    }

    #[tokio::test]
    async fn io_errors_are_reported() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionReset)))
            }
        }
        let err = read_header(&mut Broken).await.unwrap_err();
        assert_eq!(err.reason(), "ppv2_io");
    }
}
