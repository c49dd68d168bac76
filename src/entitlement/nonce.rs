//! The RegisterUsage nonce: fresh on every call, so a token from an earlier start (or from
//! another agent) cannot be replayed.

use rand::rngs::OsRng;
use rand::RngCore;

/// Random bytes per nonce: 256 bits from the operating system's CSPRNG, well above the
/// 128 bits required.
pub const NONCE_BYTES: usize = 32;

/// A fresh nonce: [`NONCE_BYTES`] bytes from the OS random source as 64 lowercase hex
/// characters (the API allows up to 255).
pub fn new_nonce() -> Result<String, rand::Error> {
    let mut bytes = [0u8; NONCE_BYTES];
    OsRng.try_fill_bytes(&mut bytes)?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn nonces_are_long_enough_short_enough_and_distinct() {
        let nonces: HashSet<String> = (0..256).map(|_| new_nonce().expect("os rng")).collect();
        assert_eq!(nonces.len(), 256);
        for nonce in &nonces {
            assert_eq!(nonce.len(), 64);
            assert!(nonce.len() <= 255);
            assert!(nonce.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(nonce.len() * 4 >= 128);
        }
    }
}
