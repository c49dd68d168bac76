//! RegisterUsage tokens: verification never panics and never accepts a token that no trusted
//! key signed.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meterd::entitlement::{verify, Expected, Keyring};

fn keyring() -> &'static Keyring {
    static K: OnceLock<Keyring> = OnceLock::new();
    K.get_or_init(|| Keyring::bundled().expect("the bundled keyring loads"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let expected = Expected {
        product_code: "prod-demo1234".to_owned(),
        nonce: "bm9uY2UtZm9yLWZ1enppbmc".to_owned(),
        public_key_version: 1,
    };
    // Nobody but AWS Marketplace holds the bundled key's private half, so no fuzzed input
    // may verify.
    assert!(verify(token, keyring(), &expected).is_err());
});
