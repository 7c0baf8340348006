//! Fuzzes the ClientHello parser: it must never panic, never claim more bytes than it was given,
//! and an accepted hello must parse the same way when it is the whole input.

#![no_main]

use cellgate_tls::client_hello::{parse_client_hello, HelloError, MAX_PEEK_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_client_hello(data) {
        Ok(parsed) => {
            assert!(parsed.consumed <= data.len() && parsed.consumed <= MAX_PEEK_LEN);
            let again = parse_client_hello(&data[..parsed.consumed])
                .unwrap_or_else(|e| panic!("accepted hello fails on its own bytes: {e}"));
            assert_eq!(again, parsed);
        }
        Err(HelloError::Incomplete { have, needed }) => {
            assert_eq!(have, data.len());
            assert!(needed > 0);
        }
        Err(_) => {}
    }
});
