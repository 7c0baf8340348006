//! The canonical form of an HTTP request path.
//!
//! The node canonicalizes every HTTP request path before the policy sees it and forwards the
//! canonical form, never the raw one. The policy therefore decides on exactly the path the
//! upstream receives, and because the canonical form has nothing left for a normalizing upstream
//! to rewrite (no dot segments, no repeated slashes, no ambiguous escapes), the upstream serves
//! the resource the policy decided on. A path that cannot be made unambiguous is refused.
//!
//! [`canonicalize`] takes an origin-form request path without its query string (the part of the
//! request target before `?`) and applies these rules:
//!
//! 1. **Origin form only.** The path must start with `/`. Anything else is refused, including the
//!    empty string, the absolute form (`http://host/a`) and the `OPTIONS` asterisk form `*`,
//!    which is not a path.
//! 2. **Percent-escapes.** `%XX` of an unreserved character (ALPHA / DIGIT / `-` `.` `_` `~`) is
//!    decoded (`/a%41` is `/aA`, `%2e` is `.`). Every other valid `%XX` is kept, its hex digits
//!    uppercased (`/a%3f` is `/a%3F`, `%c3%a9` is `%C3%A9`). An escape is decoded once only:
//!    `%252e` stays `%252e`. A malformed escape (`%` not followed by two hex digits: `%`, `%4`,
//!    `%zz`) is refused. A raw non-ASCII character is percent-encoded as its UTF-8 bytes
//!    (`/é` is `/%C3%A9`, the same path as `/%c3%a9`).
//! 3. **Refused outright**, whether raw or percent-encoded:
//!    - NUL and every other control character (below 0x20, and 0x7F): `\0`, `%00`, `%0a`, `%7f`;
//!    - backslash, raw `\` and `%5C`, which Windows and lenient upstreams read as `/`;
//!    - an encoded slash `%2F`, which some upstreams decode into a segment separator;
//!    - a raw space, `?` or `#`: the caller passes the path without its query, a fragment is
//!      never sent, and a space ends the request line, so none of them belongs in a path;
//!    - a segment with path parameters (a `;`, raw or `%3B`) whose name before the first `;`
//!      reads, after decoding, as a dot segment or as nothing: `..;`, `..;x`, `.;x`, `%2e%2e;`,
//!      `..%3b`, `;x`. Tomcat and Jetty strip path parameters before resolving dot segments, so
//!      a Java upstream reads `/a/..;/b` as `/a/../b`, and `/a/;x/../b` as `/a//../b`, which it
//!      resolves to `/b`. A `;` in any other segment (`/a;jsessionid=1`, `/a/b;v=2`) is an
//!      ordinary character.
//! 4. **Repeated slashes are merged** (`//a///b` is `/a/b`), as Envoy's `merge_slashes` does.
//!    Merging happens before dot segments are resolved, as nginx and Tomcat do: `/a//../b` is
//!    `/b` (Envoy, resolving first, would make it `/a/b`; either way the upstream receives the
//!    canonical form, so it serves what the policy decided on).
//! 5. **Dot segments are removed** per RFC 3986 §5.2.4, on the form with unreserved escapes
//!    decoded (so `%2e%2E` is `..`): `/a/./b` is `/a/b`, `/a/../b` is `/b`, `/..` and `/../a`
//!    clamp at the root (`/`, `/a`), and a trailing `/.` or `/..` leaves a trailing slash
//!    (`/a/b/..` is `/a/`). Only a whole segment of exactly one or two dots is a dot segment:
//!    `/.well-known`, `/a..b` and `/a/...` are ordinary paths. A trailing slash is kept
//!    (`/a/b/` stays `/a/b/`).
//! 6. **Already canonical paths are returned as they are**, as [`Cow::Borrowed`]: the check
//!    scans the path once and allocates nothing. Only a path that changes is rebuilt.
//! 7. **Size bound.** A path longer than [`MAX_PATH_BYTES`] is refused, and so is one whose
//!    canonical form would be (percent-encoding raw non-ASCII makes a path longer).
//!
//! Canonicalization is idempotent: the canonical form of a canonical path is itself, borrowed.
//! A canonical path is printable ASCII, starts with `/`, and contains no `//`, no dot segment,
//! no `\`, and none of `%2E`, `%2F`, `%5C` in either case.
//!
//! # Reason labels
//!
//! Every refusal is a [`PathError`]; [`PathError::reason`] is the stable label written into
//! audit records and metrics:
//!
//! | label | refused because |
//! |---|---|
//! | `path_not_origin_form` | does not start with `/` (includes `*` and the empty string) |
//! | `path_too_long` | longer than [`MAX_PATH_BYTES`], raw or canonical |
//! | `path_malformed_escape` | `%` not followed by two hex digits |
//! | `path_control_character` | NUL or another control character, raw or encoded |
//! | `path_backslash` | `\` or `%5C` |
//! | `path_encoded_slash` | `%2F` |
//! | `path_invalid_character` | raw space, `?` or `#` |
//! | `path_dot_segment_parameters` | `;` parameters on a dot or empty segment (`..;`, `.;x`, `;x`) |
//!
//! # Lint tier
//!
//! Every byte here comes from the network, so this module is in the strict tier: no `unwrap`,
//! `expect`, `panic`, panicking indexing or unchecked arithmetic outside tests.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::panic
    )
)]

use std::borrow::Cow;
use std::fmt::Write as _;
use std::iter::Peekable;
use std::str::{CharIndices, Split};

/// Longest path accepted, in bytes, raw and canonical. 8 KiB is the request-line budget the
/// common upstreams already enforce (nginx's default `large_client_header_buffers` buffer is
/// 8k, Apache's `LimitRequestLine` is 8190), so a longer path would be refused upstream anyway;
/// the bound also caps what the node spends scanning and rebuilding one path.
pub const MAX_PATH_BYTES: usize = 8 * 1024;

/// Most characters of an offending segment or target quoted in an error message, so that a
/// refusal cannot blow up an audit record.
const MAX_EXCERPT_CHARS: usize = 64;

/// Why a request path has no canonical form. [`PathError::reason`] gives the stable label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path, or its canonical form, is longer than [`MAX_PATH_BYTES`].
    #[error("path is {len} bytes, over the limit of {max}")]
    TooLong {
        /// Length in bytes (of the canonical form when only that is over).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The request target is the `OPTIONS` asterisk form `*`.
    #[error("request target \"*\" (the options asterisk form) is not a path")]
    Asterisk,
    /// The request target does not start with `/`.
    #[error("request target {target:?} does not start with '/'")]
    NotOriginForm {
        /// The target (at most its first 64 characters).
        target: String,
    },
    /// A `%` not followed by two hex digits.
    #[error("malformed percent-escape {escape:?} at offset {offset}")]
    MalformedEscape {
        /// Byte offset of the `%`.
        offset: usize,
        /// The `%` and the (at most two) characters after it.
        escape: String,
    },
    /// NUL or another control character (below 0x20, or 0x7F), raw or percent-encoded.
    #[error("control character 0x{byte:02x} at offset {offset} (written {written:?})")]
    ControlCharacter {
        /// Byte offset of the character or of its escape.
        offset: usize,
        /// The character.
        byte: u8,
        /// How it was written: the raw character or its escape.
        written: String,
    },
    /// A backslash, raw or `%5C`.
    #[error("backslash at offset {offset} (written {written:?}); an upstream may read it as '/'")]
    Backslash {
        /// Byte offset of the backslash or of its escape.
        offset: usize,
        /// How it was written: `\` or the escape.
        written: String,
    },
    /// An encoded slash `%2F`.
    #[error(
        "encoded slash {written:?} at offset {offset}; an upstream may decode it into a separator"
    )]
    EncodedSlash {
        /// Byte offset of the escape.
        offset: usize,
        /// The escape as written.
        written: String,
    },
    /// A raw space, `?` or `#`.
    #[error("character {ch:?} at offset {offset} is not allowed unencoded in a request path")]
    InvalidCharacter {
        /// Byte offset of the character.
        offset: usize,
        /// The character.
        ch: char,
    },
    /// A segment with path parameters whose name reads as `.`, `..` or nothing.
    #[error("segment {segment:?} at offset {offset} is a dot or empty segment with ';' parameters, which a java upstream reads as a dot segment")]
    DotSegmentParameters {
        /// Byte offset of the segment.
        offset: usize,
        /// The segment as written (at most its first 64 characters).
        segment: String,
    },
}

impl PathError {
    /// Every label [`PathError::reason`] gives.
    pub const LABELS: &'static [&'static str] = &[
        "path_too_long",
        "path_not_origin_form",
        "path_malformed_escape",
        "path_control_character",
        "path_backslash",
        "path_encoded_slash",
        "path_invalid_character",
        "path_dot_segment_parameters",
    ];

    /// Stable label for audit records and metrics (see the table in the module documentation).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLong { .. } => "path_too_long",
            Self::Asterisk | Self::NotOriginForm { .. } => "path_not_origin_form",
            Self::MalformedEscape { .. } => "path_malformed_escape",
            Self::ControlCharacter { .. } => "path_control_character",
            Self::Backslash { .. } => "path_backslash",
            Self::EncodedSlash { .. } => "path_encoded_slash",
            Self::InvalidCharacter { .. } => "path_invalid_character",
            Self::DotSegmentParameters { .. } => "path_dot_segment_parameters",
        }
    }
}

/// The canonical form of an origin-form request path (no query), or why it has none.
///
/// Returns `raw` itself, borrowed, when it is already canonical. See the module documentation
/// for the rules.
pub fn canonicalize(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if raw.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong {
            len: raw.len(),
            max: MAX_PATH_BYTES,
        });
    }
    let Some(rest) = raw.strip_prefix('/') else {
        return Err(if raw == "*" {
            PathError::Asterisk
        } else {
            PathError::NotOriginForm {
                target: excerpt(raw),
            }
        });
    };
    let mut rewrite = false;
    for segment in Segments::new(rest) {
        let scanned = scan(segment.text, segment.offset)?;
        rewrite |= scanned.rewrite
            || match scanned.kind {
                Kind::Name => false,
                // An empty segment is a trailing slash when last, else a repeated slash.
                Kind::Empty => !segment.last,
                Kind::Dot | Kind::DotDot => true,
            };
    }
    if !rewrite {
        return Ok(Cow::Borrowed(raw));
    }
    let out = rebuild(rest)?;
    if out.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong {
            len: out.len(),
            max: MAX_PATH_BYTES,
        });
    }
    Ok(Cow::Owned(out))
}

/// What a segment is, once unreserved escapes are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Nothing between two slashes (or after the last one).
    Empty,
    /// Exactly `.`.
    Dot,
    /// Exactly `..`.
    DotDot,
    /// Anything else.
    Name,
}

/// The result of scanning one valid segment.
#[derive(Debug, Clone, Copy)]
struct Scanned {
    kind: Kind,
    /// Whether the segment's text changes in the canonical form (an escape to decode or
    /// uppercase, a raw non-ASCII character to encode).
    rewrite: bool,
}

/// The segments of a path after its leading `/`, with their byte offsets in the whole path.
struct Segments<'a> {
    parts: Peekable<Split<'a, char>>,
    offset: usize,
}

/// One segment of [`Segments`].
struct Segment<'a> {
    text: &'a str,
    /// Byte offset of the segment's first character in the whole path.
    offset: usize,
    /// Whether no `/` follows it.
    last: bool,
}

impl<'a> Segments<'a> {
    fn new(rest: &'a str) -> Self {
        Self {
            parts: rest.split('/').peekable(),
            // `rest` starts after the leading '/'.
            offset: 1,
        }
    }
}

impl<'a> Iterator for Segments<'a> {
    type Item = Segment<'a>;

    fn next(&mut self) -> Option<Segment<'a>> {
        let text = self.parts.next()?;
        let offset = self.offset;
        self.offset = offset.saturating_add(text.len()).saturating_add(1);
        Some(Segment {
            text,
            offset,
            last: self.parts.peek().is_none(),
        })
    }
}

/// How far the decoded name of a segment (before any `;`) reads as a dot segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    Empty,
    Dot,
    DotDot,
    Other,
}

impl Name {
    fn push(self, byte: u8) -> Self {
        match (self, byte) {
            (Self::Empty, b'.') => Self::Dot,
            (Self::Dot, b'.') => Self::DotDot,
            _ => Self::Other,
        }
    }
}

/// Validates one segment (no `/` in it) starting at byte `offset` of the whole path, and says
/// what it is and whether its text changes.
fn scan(segment: &str, offset: usize) -> Result<Scanned, PathError> {
    let mut rewrite = false;
    let mut name = Name::Empty;
    let mut params = false;
    let mut chars = segment.char_indices();
    while let Some((i, c)) = chars.next() {
        let at = offset.saturating_add(i);
        let byte = match c {
            '%' => {
                let (value, uppercase) =
                    escape(&mut chars).ok_or_else(|| PathError::MalformedEscape {
                        offset: at,
                        escape: escape_text(segment, i),
                    })?;
                refuse_escaped(value, at, || escape_text(segment, i))?;
                rewrite |= is_unreserved(value) || !uppercase;
                value
            }
            '\\' => {
                return Err(PathError::Backslash {
                    offset: at,
                    written: c.to_string(),
                })
            }
            ' ' | '?' | '#' => return Err(PathError::InvalidCharacter { offset: at, ch: c }),
            // `u8::try_from(char)` also succeeds for U+0080..=U+00FF: ASCII is checked first.
            _ => match u8::try_from(c) {
                Ok(byte) if c.is_ascii() => {
                    if byte.is_ascii_control() {
                        return Err(PathError::ControlCharacter {
                            offset: at,
                            byte,
                            written: c.to_string(),
                        });
                    }
                    byte
                }
                // Raw non-ASCII (at least two UTF-8 bytes): percent-encoded in the canonical
                // form. It is neither '.' nor ';', so any non-dot byte stands in for the name.
                _ => {
                    rewrite = true;
                    0x80
                }
            },
        };
        if !params {
            if byte == b';' {
                params = true;
                if name != Name::Other {
                    return Err(PathError::DotSegmentParameters {
                        offset,
                        segment: excerpt(segment),
                    });
                }
            } else {
                name = name.push(byte);
            }
        }
    }
    let kind = match name {
        Name::Empty => Kind::Empty,
        Name::Dot => Kind::Dot,
        Name::DotDot => Kind::DotDot,
        Name::Other => Kind::Name,
    };
    Ok(Scanned { kind, rewrite })
}

/// Reads the two hex digits after a `%`: the byte they encode, and whether both were already
/// uppercase (or digits). `None` if they are not two hex digits.
fn escape(chars: &mut CharIndices<'_>) -> Option<(u8, bool)> {
    let (_, high) = chars.next()?;
    let (_, low) = chars.next()?;
    let value = high
        .to_digit(16)?
        .checked_mul(16)?
        .checked_add(low.to_digit(16)?)?;
    let value = u8::try_from(value).ok()?;
    Some((
        value,
        !high.is_ascii_lowercase() && !low.is_ascii_lowercase(),
    ))
}

/// Refuses a byte that may not appear even percent-encoded; `written` gives the escape text.
fn refuse_escaped(
    value: u8,
    offset: usize,
    written: impl FnOnce() -> String,
) -> Result<(), PathError> {
    match value {
        b'/' => Err(PathError::EncodedSlash {
            offset,
            written: written(),
        }),
        b'\\' => Err(PathError::Backslash {
            offset,
            written: written(),
        }),
        byte if byte.is_ascii_control() => Err(PathError::ControlCharacter {
            offset,
            byte,
            written: written(),
        }),
        _ => Ok(()),
    }
}

/// The escape starting at byte `i` of `segment`, as written: the `%` and at most two more
/// characters.
fn escape_text(segment: &str, i: usize) -> String {
    segment
        .get(i..)
        .map(|s| s.chars().take(3).collect())
        .unwrap_or_default()
}

/// At most the first [`MAX_EXCERPT_CHARS`] characters of `s`.
fn excerpt(s: &str) -> String {
    s.chars().take(MAX_EXCERPT_CHARS).collect()
}

/// RFC 3986 unreserved: ALPHA / DIGIT / `-` / `.` / `_` / `~`.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// Builds the canonical form of `/` + `rest`, a path that [`scan`] found valid but not
/// canonical.
fn rebuild(rest: &str) -> Result<String, PathError> {
    // Never longer than the input, unless raw non-ASCII has to be encoded.
    let mut out = String::with_capacity(rest.len().saturating_add(1));
    let mut trailing_slash = false;
    for segment in Segments::new(rest) {
        let kind = scan(segment.text, segment.offset)?.kind;
        match kind {
            Kind::Name => {
                out.push('/');
                push_canonical(segment.text, &mut out);
            }
            // A repeated slash: merged away.
            Kind::Empty | Kind::Dot => {}
            // Remove the last segment and its '/': `out` is "" or "/seg1/seg2...", with no '/'
            // inside a segment, so that is everything from the last '/'. At the root, nothing.
            Kind::DotDot => {
                if let Some(last) = out.rfind('/') {
                    out.truncate(last);
                }
            }
        }
        trailing_slash = segment.last && kind != Kind::Name;
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Appends the canonical text of one valid segment: unreserved escapes decoded, other escapes
/// uppercased, raw non-ASCII percent-encoded.
fn push_canonical(segment: &str, out: &mut String) {
    let mut chars = segment.char_indices();
    while let Some((_, c)) = chars.next() {
        if c == '%' {
            let digits = chars.clone();
            match escape(&mut chars) {
                Some((value, _)) if is_unreserved(value) => out.push(char::from(value)),
                Some(_) => {
                    out.push('%');
                    for (_, digit) in digits.take(2) {
                        out.push(digit.to_ascii_uppercase());
                    }
                }
                // Not reached: `scan` refused malformed escapes. Kept as written.
                None => out.push(c),
            }
        } else if c.is_ascii() {
            out.push(c);
        } else {
            let mut utf8 = [0; 4];
            for byte in c.encode_utf8(&mut utf8).bytes() {
                // Writing to a String cannot fail.
                let _ = write!(out, "%{byte:02X}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a table case expects.
    enum Expect {
        /// Already canonical: returned borrowed.
        Same,
        /// Rewritten to this.
        To(&'static str),
        /// Refused with this reason label.
        Refused(&'static str),
    }
    use Expect::{Refused, Same, To};

    const NOT_ORIGIN: &str = "path_not_origin_form";
    const MALFORMED: &str = "path_malformed_escape";
    const CONTROL: &str = "path_control_character";
    const BACKSLASH: &str = "path_backslash";
    const SLASH: &str = "path_encoded_slash";
    const INVALID: &str = "path_invalid_character";
    const DOT_PARAMS: &str = "path_dot_segment_parameters";

    const CASES: &[(&str, Expect)] = &[
        // Rule 1: origin form only.
        ("*", Refused(NOT_ORIGIN)),
        ("", Refused(NOT_ORIGIN)),
        ("a/b", Refused(NOT_ORIGIN)),
        ("http://host/a", Refused(NOT_ORIGIN)),
        // Rule 2: percent-escapes.
        ("/a%41", To("/aA")),
        ("/a%7e%2d%5f%30", To("/a~-_0")),
        ("/a%3f", To("/a%3F")),
        ("/a%3F", Same),
        ("/a%2a", To("/a%2A")),
        ("/%c3%a9", To("/%C3%A9")),
        ("/%C3%A9", Same),
        ("/caf\u{e9}", To("/caf%C3%A9")),
        ("/\u{1F600}/x", To("/%F0%9F%98%80/x")),
        ("/a%252e%252e/b", Same),
        ("/a%zz", Refused(MALFORMED)),
        ("/a%", Refused(MALFORMED)),
        ("/a%4", Refused(MALFORMED)),
        ("/a%4/b", Refused(MALFORMED)),
        ("/a%u002e", Refused(MALFORMED)),
        ("/a%\u{e9}9", Refused(MALFORMED)),
        // Rule 3: refused outright.
        ("/%00", Refused(CONTROL)),
        ("/a\0b", Refused(CONTROL)),
        ("/a%0a", Refused(CONTROL)),
        ("/a%1F", Refused(CONTROL)),
        ("/a%7f", Refused(CONTROL)),
        ("/a\tb", Refused(CONTROL)),
        ("/a\u{7f}", Refused(CONTROL)),
        ("/allowed\\..\\secret", Refused(BACKSLASH)),
        ("/allowed/%5c..%5csecret", Refused(BACKSLASH)),
        ("/allowed/%5C..", Refused(BACKSLASH)),
        ("/allowed/%2fsecret", Refused(SLASH)),
        ("/allowed/%2F..%2Fsecret", Refused(SLASH)),
        ("/a/%2e%2e%2fb", Refused(SLASH)),
        ("/a b", Refused(INVALID)),
        ("/a?b", Refused(INVALID)),
        ("/a#b", Refused(INVALID)),
        ("/allowed/..;/secret", Refused(DOT_PARAMS)),
        ("/allowed/..;x/secret", Refused(DOT_PARAMS)),
        ("/allowed/.;x/secret", Refused(DOT_PARAMS)),
        ("/allowed/..;", Refused(DOT_PARAMS)),
        ("/allowed/%2e%2e;/secret", Refused(DOT_PARAMS)),
        ("/allowed/.%2E;x/secret", Refused(DOT_PARAMS)),
        ("/allowed/..%3b/secret", Refused(DOT_PARAMS)),
        ("/allowed/;x/../../secret", Refused(DOT_PARAMS)),
        ("/a;jsessionid=1", Same),
        ("/a/b;v=2/../c", To("/a/c")),
        ("/a/...;x", Same),
        // Rule 4: repeated slashes.
        ("/allowed//secret", To("/allowed/secret")),
        ("//a///b", To("/a/b")),
        ("//", To("/")),
        ("/a//", To("/a/")),
        ("/a//../b", To("/b")),
        // Rule 5: dot segments.
        ("/allowed/../secret", To("/secret")),
        ("/allowed/%2e%2e/secret", To("/secret")),
        ("/allowed/%2E%2e/secret", To("/secret")),
        ("/allowed/.%2e/secret", To("/secret")),
        ("/a/./b/../c", To("/a/c")),
        ("/a/./b", To("/a/b")),
        ("/../../x", To("/x")),
        ("/../a", To("/a")),
        ("/..", To("/")),
        ("/.", To("/")),
        ("/%2e", To("/")),
        ("/a/..", To("/")),
        ("/a/../", To("/")),
        ("/a/b/..", To("/a/")),
        ("/a/.", To("/a/")),
        ("/a/./", To("/a/")),
        ("/a/b/c/../../d", To("/a/d")),
        ("/.well-known/x", Same),
        ("/a..b", Same),
        ("/a/...", Same),
        ("/a/..../b", Same),
        ("/a/.%2e./b", To("/a/.../b")),
        ("/a/.x/..x/x..", Same),
        // Rule 6: canonical paths borrowed.
        ("/", Same),
        ("/a/b", Same),
        ("/a/b/", Same),
        ("/a/b%20c/%7B%22k%22%7D", Same),
        ("/a/{\"k\":1}|x", Same),
    ];

    #[test]
    fn table() {
        assert!(CASES.len() >= 40);
        for (raw, expect) in CASES {
            let got = canonicalize(raw);
            match (expect, &got) {
                (Same, Ok(Cow::Borrowed(c))) => assert_eq!(c, raw, "{raw:?}"),
                (To(want), Ok(Cow::Owned(c))) => assert_eq!(c, want, "{raw:?}"),
                (Refused(label), Err(e)) => assert_eq!(e.reason(), *label, "{raw:?}: {e}"),
                _ => panic!(
                    "{raw:?}: expected {}, got {got:?}",
                    match expect {
                        Same => "it unchanged and borrowed".to_owned(),
                        To(want) => format!("owned {want:?}"),
                        Refused(label) => format!("refusal {label}"),
                    }
                ),
            }
        }
    }

    #[test]
    fn size_bound() {
        let at_limit = format!("/{}", "a".repeat(MAX_PATH_BYTES - 1));
        assert!(matches!(canonicalize(&at_limit), Ok(Cow::Borrowed(_))));
        let over = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        assert_eq!(
            canonicalize(&over),
            Err(PathError::TooLong {
                len: MAX_PATH_BYTES + 1,
                max: MAX_PATH_BYTES
            })
        );
        // Short enough raw, too long once the raw non-ASCII is percent-encoded.
        let grows = format!("/{}", "\u{e9}".repeat(2000));
        assert!(grows.len() <= MAX_PATH_BYTES);
        let err = canonicalize(&grows).unwrap_err();
        assert_eq!(err.reason(), "path_too_long");
        assert_eq!(
            err,
            PathError::TooLong {
                len: 1 + 2000 * 6,
                max: MAX_PATH_BYTES
            }
        );
        // The raw limit applies even when the canonical form would be short.
        let dots = format!("/a{}", "/.".repeat(MAX_PATH_BYTES / 2));
        assert_eq!(canonicalize(&dots).unwrap_err().reason(), "path_too_long");
    }

    #[test]
    fn errors_carry_the_offending_value() {
        let cases: &[(&str, PathError)] = &[
            ("*", PathError::Asterisk),
            (
                "http://h/",
                PathError::NotOriginForm {
                    target: "http://h/".into(),
                },
            ),
            (
                "/ab%z1",
                PathError::MalformedEscape {
                    offset: 3,
                    escape: "%z1".into(),
                },
            ),
            (
                "/ab%",
                PathError::MalformedEscape {
                    offset: 3,
                    escape: "%".into(),
                },
            ),
            (
                "/a/b%00",
                PathError::ControlCharacter {
                    offset: 4,
                    byte: 0,
                    written: "%00".into(),
                },
            ),
            (
                "/a/\u{1b}",
                PathError::ControlCharacter {
                    offset: 3,
                    byte: 0x1b,
                    written: "\u{1b}".into(),
                },
            ),
            (
                "/a\\b",
                PathError::Backslash {
                    offset: 2,
                    written: "\\".into(),
                },
            ),
            (
                "/a/%5c",
                PathError::Backslash {
                    offset: 3,
                    written: "%5c".into(),
                },
            ),
            (
                "/a/x%2f",
                PathError::EncodedSlash {
                    offset: 4,
                    written: "%2f".into(),
                },
            ),
            ("/a/x?", PathError::InvalidCharacter { offset: 4, ch: '?' }),
            (
                "/allowed/..;x/secret",
                PathError::DotSegmentParameters {
                    offset: 9,
                    segment: "..;x".into(),
                },
            ),
        ];
        for (raw, want) in cases {
            let got = canonicalize(raw).unwrap_err();
            assert_eq!(&got, want, "{raw:?}");
            let message = got.to_string();
            assert_eq!(message, message.to_lowercase(), "{raw:?}: {message}");
            assert!(
                !message.chars().any(char::is_control),
                "{raw:?}: raw control character in {message:?}"
            );
        }
        let long = format!("x{}", "y".repeat(1000));
        let PathError::NotOriginForm { target } = canonicalize(&long).unwrap_err() else {
            panic!("not refused as not origin form");
        };
        assert_eq!(target.chars().count(), MAX_EXCERPT_CHARS);
    }

    #[test]
    fn reasons_are_valid_decision_labels() {
        let errors = [
            PathError::TooLong { len: 1, max: 0 },
            PathError::Asterisk,
            PathError::NotOriginForm {
                target: String::new(),
            },
            PathError::MalformedEscape {
                offset: 0,
                escape: String::new(),
            },
            PathError::ControlCharacter {
                offset: 0,
                byte: 0,
                written: String::new(),
            },
            PathError::Backslash {
                offset: 0,
                written: String::new(),
            },
            PathError::EncodedSlash {
                offset: 0,
                written: String::new(),
            },
            PathError::InvalidCharacter { offset: 0, ch: ' ' },
            PathError::DotSegmentParameters {
                offset: 0,
                segment: String::new(),
            },
        ];
        for e in &errors {
            crate::policy::DecisionDoc::node_deny(e.reason(), e.to_string())
                .validate()
                .unwrap_or_else(|err| panic!("{}: {err}", e.reason()));
            assert!(e.reason().starts_with("path_"));
            assert!(PathError::LABELS.contains(&e.reason()), "{}", e.reason());
        }
    }

    /// An independent model of the rules: escapes normalized over the whole path, slashes
    /// merged, then RFC 3986 §5.2.4 `remove_dot_segments` as the RFC writes it.
    fn model(raw: &str) -> String {
        let mut decoded = String::new();
        let bytes = raw.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = &raw[i + 1..i + 3];
                let value = u8::from_str_radix(hex, 16).unwrap();
                if is_unreserved(value) {
                    decoded.push(char::from(value));
                } else {
                    decoded.push('%');
                    decoded.push_str(&hex.to_uppercase());
                }
                i += 3;
            } else if bytes[i] < 0x80 {
                decoded.push(char::from(bytes[i]));
                i += 1;
            } else {
                decoded.push_str(&format!("%{:02X}", bytes[i]));
                i += 1;
            }
        }
        let mut merged = String::new();
        for c in decoded.chars() {
            if !(c == '/' && merged.ends_with('/')) {
                merged.push(c);
            }
        }
        let pop = |output: &mut String| match output.rfind('/') {
            Some(i) => output.truncate(i),
            None => output.clear(),
        };
        let mut input = merged;
        let mut output = String::new();
        while !input.is_empty() {
            if input.starts_with("../") {
                input.replace_range(..3, "");
            } else if input.starts_with("./") {
                input.replace_range(..2, "");
            } else if input.starts_with("/./") {
                input.replace_range(..3, "/");
            } else if input == "/." {
                input = "/".into();
            } else if input.starts_with("/../") {
                input.replace_range(..4, "/");
                pop(&mut output);
            } else if input == "/.." {
                input = "/".into();
                pop(&mut output);
            } else if input == "." || input == ".." {
                input.clear();
            } else {
                let end = input[1..].find('/').map_or(input.len(), |i| i + 1);
                output.push_str(&input[..end]);
                input.replace_range(..end, "");
            }
        }
        output
    }

    /// Asserts the invariants of a canonical form `c` of `raw`.
    fn check_canonical(raw: &str, c: &str) {
        assert!(c.starts_with('/'), "{raw:?} -> {c:?}");
        assert!(
            matches!(canonicalize(c), Ok(Cow::Borrowed(again)) if again == c),
            "{raw:?} -> {c:?} is not a borrowed fixed point: {:?}",
            canonicalize(c)
        );
        for bad in ["/../", "/./", "//"] {
            assert!(!c.contains(bad), "{raw:?} -> {c:?} contains {bad:?}");
        }
        assert!(
            !c.ends_with("/..") && !c.ends_with("/."),
            "{raw:?} -> {c:?}"
        );
        let upper = c.to_ascii_uppercase();
        for bad in ["%2F", "%5C", "%2E"] {
            assert!(!upper.contains(bad), "{raw:?} -> {c:?} contains {bad}");
        }
    }

    #[test]
    fn idempotent_on_pseudo_random_paths() {
        const ALPHABET: &[char] = &[
            '/', '.', '%', '2', 'e', 'E', 'f', 'F', '5', 'c', 'C', ';', 'a', '\\',
        ];
        // Knuth's MMIX LCG; the high bits are the well-mixed ones.
        let mut state: u64 = 0x5eed_cafe_f00d_0001;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        let (mut accepted, mut rewritten) = (0, 0);
        for _ in 0..4000 {
            let len = next() % 16;
            let mut raw = String::new();
            // One in ten does not start with '/' (unless the alphabet puts one there).
            if next() % 10 != 0 {
                raw.push('/');
            }
            for _ in 0..len {
                raw.push(ALPHABET[next() % ALPHABET.len()]);
            }
            match canonicalize(&raw) {
                Ok(c) => {
                    accepted += 1;
                    if matches!(c, Cow::Owned(_)) {
                        rewritten += 1;
                        assert_ne!(c, raw, "owned but unchanged");
                    }
                    check_canonical(&raw, &c);
                    assert_eq!(c, model(&raw), "{raw:?}");
                }
                Err(e) => {
                    // Every refusal is for a reason the raw text shows.
                    let upper = raw.to_ascii_uppercase();
                    assert!(
                        !raw.starts_with('/')
                            || raw.contains('\\')
                            || raw.contains('%')
                            || raw.contains(';'),
                        "{raw:?} refused: {e}"
                    );
                    if e.reason() == "path_encoded_slash" {
                        assert!(upper.contains("%2F"), "{raw:?}");
                    }
                }
            }
        }
        assert!(accepted >= 400, "only {accepted} accepted");
        assert!(rewritten >= 200, "only {rewritten} rewritten");
    }

    #[test]
    fn model_agrees_on_the_table() {
        for (raw, expect) in CASES {
            if let Same | To(_) = expect {
                let c = canonicalize(raw).unwrap();
                assert_eq!(c, model(raw), "{raw:?}");
                check_canonical(raw, &c);
            }
        }
    }
}
