//! Fuzzes the request-path canonicalizer: it must never panic, whatever it accepts must be its
//! own canonical form (returned borrowed), and no canonical form may keep anything a normalizing
//! upstream would still rewrite (dot segments, repeated slashes, encoded `/`, `\` or `.`).

#![no_main]

use std::borrow::Cow;

use cellgate_api::path::{canonicalize, MAX_PATH_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let canonical = match canonicalize(raw) {
        Ok(canonical) => canonical,
        Err(e) => {
            let message = e.to_string();
            assert!(!e.reason().is_empty());
            assert!(
                !message.chars().any(char::is_control),
                "raw control character in error message {message:?}"
            );
            return;
        }
    };
    if let Cow::Borrowed(same) = canonical {
        assert_eq!(same, raw, "borrowed form differs from the input");
    }
    let c: &str = &canonical;
    assert!(
        c.starts_with('/') && c.len() <= MAX_PATH_BYTES,
        "{raw:?} -> {c:?}"
    );
    match canonicalize(c) {
        Ok(Cow::Borrowed(again)) => assert_eq!(again, c, "{raw:?}"),
        other => panic!("{raw:?} -> {c:?} is not a borrowed fixed point: {other:?}"),
    }
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
    assert!(
        c.bytes().all(|b| b.is_ascii_graphic() && b != b'\\'),
        "{raw:?} -> {c:?} has a byte that is not printable ascii, or a backslash"
    );
});
