//! A minimal protobuf wire walker for one repair: Envoy sends `HttpRequest.body` (a proto3
//! `string`) with the request's bytes as they came, which prost refuses when they are not UTF-8
//! (Envoy sets `raw_body` instead only with `pack_as_bytes`). [`body_to_raw`] finds every
//! `CheckRequest.attributes.request.http.body` in the encoded message and retags it as
//! `raw_body` (field 12, `bytes`): same wire type, one-byte tag either way, so no length changes
//! and the message decodes.
//!
//! The input is hostile (whatever reaches the gRPC socket), so this module is held to the
//! strict lint tier: no indexing, no unchecked arithmetic, no panics; it is fuzzed
//! (`fuzz/fuzz_targets/check_request_body.rs`, which includes this file as it is).

#![deny(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_possible_truncation
)]

/// Field numbers on the way to `HttpRequest`: `CheckRequest.attributes` (1),
/// `AttributeContext.request` (4), `Request.http` (2).
pub const PATH_TO_HTTP: [u32; 3] = [1, 4, 2];
/// `HttpRequest.body` (11), length-delimited.
pub const HTTP_BODY: u32 = 11;
/// The tag byte of `HttpRequest.body`: field 11, wire type 2.
pub const BODY_TAG: u8 = 0x5a;
/// The tag byte of `HttpRequest.raw_body`: field 12, wire type 2.
pub const RAW_BODY_TAG: u8 = 0x62;

/// Reads a varint at `*i`, advancing `*i` past it; `None` when it is cut short or longer than
/// ten bytes.
pub fn read_varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64u32).step_by(7) {
        let byte = *b.get(*i)?;
        *i = i.checked_add(1)?;
        v |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Calls `f(tag_start, tag_len, value_start, value_end)` for each length-delimited field
/// `field` of the message in `b[start..end]`. `None` (after the calls for the fields before it)
/// when the message is not well formed; every span passed to `f` is within `start..end`.
pub fn for_each_len_field(
    b: &[u8],
    start: usize,
    end: usize,
    field: u32,
    f: &mut dyn FnMut(usize, usize, usize, usize),
) -> Option<()> {
    let b = b.get(..end)?;
    let mut i = start;
    while i < end {
        let tag_start = i;
        let key = read_varint(b, &mut i)?;
        let tag_len = i.checked_sub(tag_start)?;
        let num = u32::try_from(key >> 3).ok()?;
        match key & 7 {
            0 => {
                read_varint(b, &mut i)?;
            }
            1 => i = i.checked_add(8)?,
            5 => i = i.checked_add(4)?,
            2 => {
                let len = usize::try_from(read_varint(b, &mut i)?).ok()?;
                let value_start = i;
                i = i.checked_add(len)?;
                if i > end {
                    return None;
                }
                if num == field {
                    f(tag_start, tag_len, value_start, i);
                }
            }
            _ => return None,
        }
    }
    (i == end).then_some(())
}

/// Retags every `HttpRequest.body` that is not UTF-8 as `raw_body`. Returns whether anything
/// changed; only [`BODY_TAG`] bytes ever change, each to [`RAW_BODY_TAG`], and the length never.
pub fn body_to_raw(b: &mut [u8]) -> bool {
    let mut spans = vec![(0, b.len())];
    for field in PATH_TO_HTTP {
        let mut next = Vec::new();
        for (s, e) in spans {
            let _ = for_each_len_field(b, s, e, field, &mut |_, _, vs, ve| next.push((vs, ve)));
        }
        spans = next;
    }
    let mut tags = Vec::new();
    for (s, e) in spans {
        let _ = for_each_len_field(b, s, e, HTTP_BODY, &mut |ts, tl, vs, ve| {
            let text = b.get(vs..ve).map(std::str::from_utf8);
            if tl == 1 && matches!(text, Some(Err(_))) {
                tags.push(ts);
            }
        });
    }
    let mut changed = false;
    for t in tags {
        if let Some(tag) = b.get_mut(t).filter(|tag| **tag == BODY_TAG) {
            *tag = RAW_BODY_TAG;
            changed = true;
        }
    }
    changed
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_bounded() {
        let mut i = 0;
        assert_eq!(read_varint(&[0x96, 0x01], &mut i), Some(150));
        assert_eq!(i, 2);
        let mut i = 0;
        assert_eq!(read_varint(&[0x80, 0x80], &mut i), None, "cut short");
        let mut i = 0;
        assert_eq!(read_varint(&[0xff; 11], &mut i), None, "over ten bytes");
        let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        let mut i = 0;
        assert_eq!(read_varint(&max, &mut i), Some(u64::MAX));
    }

    #[test]
    fn tags_match_the_field_numbers() {
        assert_eq!(u32::from(BODY_TAG), (HTTP_BODY << 3) | 2);
        assert_eq!(u32::from(RAW_BODY_TAG), (12 << 3) | 2);
    }

    /// A `CheckRequest` with `attributes.request.http.body` = `body`, nested by hand.
    fn nested(body: &[u8]) -> Vec<u8> {
        let wrap = |tag: u8, inner: Vec<u8>| {
            let mut v = vec![tag, u8::try_from(inner.len()).unwrap()];
            v.extend(inner);
            v
        };
        let mut http = vec![0x0a, 3, b'G', b'E', b'T']; // HttpRequest.id (1)
        http.extend(wrap(BODY_TAG, body.to_vec()));
        wrap(0x0a, wrap(0x22, wrap(0x12, http)))
    }

    #[test]
    fn only_a_body_that_is_not_utf8_is_retagged() {
        let mut ok = nested(b"hello");
        let before = ok.clone();
        assert!(!body_to_raw(&mut ok));
        assert_eq!(ok, before);

        let mut bad = nested(&[0xff, 0xfe, 0x00]);
        let before = bad.clone();
        assert!(body_to_raw(&mut bad));
        let diffs: Vec<_> = before.iter().zip(&bad).filter(|(a, b)| a != b).collect();
        assert_eq!(diffs, vec![(&BODY_TAG, &RAW_BODY_TAG)]);
    }

    #[test]
    fn malformed_messages_change_nothing() {
        for junk in [
            &[0x0a, 0xff][..],
            &[0x0a, 0x05, 0x22],
            &[0x0b],
            &[
                0x0a, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01,
            ],
        ] {
            let mut b = junk.to_vec();
            assert!(!body_to_raw(&mut b));
            assert_eq!(b, junk);
        }
    }
}
