//! Fuzzes the protobuf walker that lets the node decode a `CheckRequest` whose `body` is not
//! UTF-8 (crates/cellgate-node/src/ext_authz/wire.rs, included here as it is, so the fuzz build
//! needs none of the node's dependencies). It must never panic, never change the length, change
//! only `HttpRequest.body` tag bytes into `raw_body` ones, say truthfully whether it changed
//! anything, be idempotent, and pass callbacks only spans inside the buffer.

#![no_main]

#[path = "../../crates/cellgate-node/src/ext_authz/wire.rs"]
#[allow(dead_code)]
mod wire;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = data.to_vec();
    let changed = wire::body_to_raw(&mut b);
    assert_eq!(b.len(), data.len());
    let mut diffs = 0;
    for (before, after) in data.iter().zip(&b) {
        if before != after {
            assert_eq!((*before, *after), (wire::BODY_TAG, wire::RAW_BODY_TAG));
            diffs += 1;
        }
    }
    assert_eq!(changed, diffs > 0);
    let mut again = b.clone();
    assert!(!wire::body_to_raw(&mut again), "a second pass changed more");
    assert_eq!(again, b);
    for field in [1, 2, 4, 11] {
        let _ = wire::for_each_len_field(data, 0, data.len(), field, &mut |ts, tl, vs, ve| {
            assert!(tl >= 1 && ts + tl <= vs && vs <= ve && ve <= data.len());
        });
    }
});
