//! Fuzzes the PPv2 decoder: it must never panic, and whatever it accepts must survive an
//! encode/decode round trip unchanged.

#![no_main]

use cellgate_proxy_protocol::{encode, parse, ProxyHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((header, used)) = parse(data) else {
        return;
    };
    assert!(used <= data.len() && used <= cellgate_proxy_protocol::MAX_HEADER_LEN);
    let bytes = encode(header.source, header.destination, &header.token)
        .unwrap_or_else(|e| panic!("accepted header does not re-encode: {e}"));
    let (again, again_used): (ProxyHeader, usize) =
        parse(&bytes).unwrap_or_else(|e| panic!("re-encoded header does not parse: {e}"));
    assert_eq!(again, header);
    assert_eq!(again_used, bytes.len());
});
