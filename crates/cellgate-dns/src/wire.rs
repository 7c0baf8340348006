//! What can be read from a DNS message's raw bytes before handing them to a full parser: the
//! header (so that even a malformed query gets a FORMERR with its id) and the length of the first
//! question's name (so that an over-long name is refused as such instead of as "malformed", which
//! is what the full parser reports for names beyond 255 wire octets).
//!
//! Everything here reads with `get`, never with indexing: these bytes come straight from a cell.

/// Longest name, in presentation form without the trailing dot (RFC 1035 section 2.3.4: 255 octets
/// in wire form, which is 253 characters of text).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label (RFC 1035 section 2.3.4).
pub const MAX_LABEL_LEN: usize = 63;
/// Size of the fixed DNS header.
pub const HEADER_LEN: usize = 12;

/// The fields of the header a responder needs, read without trusting the rest of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawHeader {
    /// Transaction id.
    pub id: u16,
    /// `QR`: set on responses. `None` when the message is too short to say.
    pub is_response: Option<bool>,
    /// Opcode (4 bits). `None` when the message is too short to say.
    pub opcode: Option<u8>,
    /// `RD`, echoed in responses.
    pub recursion_desired: bool,
    /// Number of questions, when the full header is present.
    pub question_count: Option<u16>,
}

/// Reads whatever part of the header is present; `None` when not even the id is.
pub fn raw_header(bytes: &[u8]) -> Option<RawHeader> {
    let id = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]);
    let flags = bytes.get(2).copied();
    let question_count = match (bytes.get(4), bytes.get(5)) {
        (Some(hi), Some(lo)) if bytes.len() >= HEADER_LEN => Some(u16::from_be_bytes([*hi, *lo])),
        _ => None,
    };
    Some(RawHeader {
        id,
        is_response: flags.map(|f| f & 0x80 != 0),
        opcode: flags.map(|f| (f >> 3) & 0x0f),
        recursion_desired: flags.is_some_and(|f| f & 0x01 != 0),
        question_count,
    })
}

/// The first question's name, measured on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameScan {
    /// Within bounds (or not measurable here: compression pointers, truncation, no question). The
    /// full parser decides.
    Unknown,
    /// Longer than [`MAX_NAME_LEN`] characters: this many, at least.
    TooLong(usize),
}

/// Measures the first question's name (labels only; a compression pointer or an extended label
/// type stops the scan and leaves the verdict to the full parser).
pub fn scan_first_name(bytes: &[u8]) -> NameScan {
    let mut pos = HEADER_LEN;
    // Presentation length: label characters plus one dot between labels.
    let mut text_len = 0usize;
    let mut labels = 0usize;
    loop {
        let Some(&len) = bytes.get(pos) else {
            return NameScan::Unknown;
        };
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return NameScan::Unknown;
        }
        let len = usize::from(len);
        if labels > 0 {
            text_len = text_len.saturating_add(1);
        }
        text_len = text_len.saturating_add(len);
        labels = labels.saturating_add(1);
        if text_len > MAX_NAME_LEN {
            return NameScan::TooLong(text_len);
        }
        pos = pos.saturating_add(1).saturating_add(len);
    }
    NameScan::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_of_short_inputs() {
        assert_eq!(raw_header(&[]), None);
        assert_eq!(raw_header(&[1]), None);
        let h = raw_header(&[0x12, 0x34]).unwrap();
        assert_eq!(h.id, 0x1234);
        assert_eq!(h.is_response, None);
        assert_eq!(h.question_count, None);
        let h = raw_header(&[0, 1, 0x81, 0, 0, 2, 0, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(h.is_response, Some(true));
        assert_eq!(h.opcode, Some(0));
        assert!(h.recursion_desired);
        assert_eq!(h.question_count, Some(2));
        let h = raw_header(&[0, 1, 0x28, 0]).unwrap();
        assert_eq!(h.opcode, Some(5));
    }

    #[test]
    fn name_scan() {
        let mut msg = vec![0u8; HEADER_LEN];
        for _ in 0..4 {
            msg.push(63);
            msg.extend(std::iter::repeat_n(b'a', 63));
        }
        // 4 * 63 + 3 dots = 255 characters
        msg.push(0);
        assert_eq!(scan_first_name(&msg), NameScan::TooLong(255));
        let mut ok = vec![0u8; HEADER_LEN];
        ok.extend([3, b'f', b'o', b'o', 0]);
        assert_eq!(scan_first_name(&ok), NameScan::Unknown);
        ok.truncate(HEADER_LEN + 2);
        assert_eq!(scan_first_name(&ok), NameScan::Unknown);
        let mut ptr = vec![0u8; HEADER_LEN];
        ptr.extend([0xc0, 12]);
        assert_eq!(scan_first_name(&ptr), NameScan::Unknown);
    }
}
