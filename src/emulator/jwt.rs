//! RegisterUsage signing keys and the PS256 JWT they sign.
//!
//! Claims use the camelCase names that AWS's shipped integrations read: `productCode`,
//! `publicKeyVersion`, `nonce` (only when the request sent one) and `iat`.

use std::collections::BTreeMap;
use std::time::SystemTime;

use anyhow::Context;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding};
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde::Serialize;

use super::config::KeyConfig;

const GENERATED_KEY_BITS: usize = 2048;

pub(crate) struct SigningKey {
    encoding: EncodingKey,
    pub public_pem: String,
    pub expired_at: Option<SystemTime>,
}

/// One published key, as `GET /_emulator/public-keys` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublicKeyInfo {
    pub version: u32,
    pub pem: String,
    /// RFC 3339; present when the version is configured to expire.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RegisterClaims<'a> {
    product_code: &'a str,
    public_key_version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce: Option<&'a str>,
    iat: i64,
}

fn parse_private_key(pem: &str) -> anyhow::Result<RsaPrivateKey> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    RsaPrivateKey::from_pkcs8_pem(pem)
        .or_else(|_| RsaPrivateKey::from_pkcs1_pem(pem))
        .context("not an RSA private key in PKCS#8 or PKCS#1 PEM")
}

impl SigningKey {
    fn new(private: &RsaPrivateKey, expired_at: Option<SystemTime>) -> anyhow::Result<Self> {
        let der = private.to_pkcs1_der().context("encoding the private key")?;
        let public_pem = RsaPublicKey::from(private)
            .to_public_key_pem(LineEnding::LF)
            .context("encoding the public key")?;
        Ok(Self {
            encoding: EncodingKey::from_rsa_der(der.as_bytes()),
            public_pem,
            expired_at,
        })
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expired_at.is_some_and(|at| now >= at)
    }

    /// Any claims as a PS256 JWT (License Manager's SignedToken).
    pub fn sign_claims(
        &self,
        claims: &impl serde::Serialize,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        jsonwebtoken::encode(&Header::new(Algorithm::PS256), claims, &self.encoding)
    }

    pub fn sign(
        &self,
        product_code: &str,
        version: u32,
        nonce: Option<&str>,
        iat: i64,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let claims = RegisterClaims {
            product_code,
            public_key_version: version,
            nonce,
            iat,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::PS256), &claims, &self.encoding)
    }
}

pub(crate) struct Keyring {
    keys: BTreeMap<u32, SigningKey>,
}

impl Keyring {
    /// Loads or generates each configured version; generated keys derive from `seed`.
    pub fn from_config(configs: &[KeyConfig], seed: u64) -> anyhow::Result<Self> {
        let default = [KeyConfig {
            version: 1,
            private_key_path: None,
            private_key_pem: None,
            expired_at: None,
        }];
        let configs = if configs.is_empty() {
            &default[..]
        } else {
            configs
        };
        let mut keys = BTreeMap::new();
        for config in configs {
            let private = match (&config.private_key_pem, &config.private_key_path) {
                (Some(pem), _) => parse_private_key(pem)
                    .with_context(|| format!("key version {}", config.version))?,
                (None, Some(path)) => {
                    let pem = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    parse_private_key(&pem).with_context(|| format!("key {}", path.display()))?
                }
                (None, None) => {
                    let mut rng = StdRng::seed_from_u64(seed ^ u64::from(config.version));
                    RsaPrivateKey::new(&mut rng, GENERATED_KEY_BITS)
                        .context("generating an RSA key")?
                }
            };
            keys.insert(
                config.version,
                SigningKey::new(&private, config.expired_at)?,
            );
        }
        Ok(Self { keys })
    }

    /// The lowest version's key (License Manager's signed tokens).
    pub fn first(&self) -> Option<&SigningKey> {
        self.keys.values().next()
    }

    pub fn get(&self, version: u32) -> Option<&SigningKey> {
        self.keys.get(&version)
    }

    pub fn public_keys(&self) -> Vec<PublicKeyInfo> {
        self.keys
            .iter()
            .map(|(version, key)| PublicKeyInfo {
                version: *version,
                pem: key.public_pem.clone(),
                expired_at: key
                    .expired_at
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::config::DEMO_SIGNING_KEY_PEM;
    use base64::Engine;
    use jsonwebtoken::{DecodingKey, Validation};

    fn demo_keyring() -> Keyring {
        Keyring::from_config(
            &[KeyConfig {
                version: 1,
                private_key_path: None,
                private_key_pem: Some(DEMO_SIGNING_KEY_PEM.to_owned()),
                expired_at: None,
            }],
            0,
        )
        .expect("demo key loads")
    }

    #[test]
    fn token_is_ps256_with_camel_case_claims_and_verifies_under_the_public_key() {
        let ring = demo_keyring();
        let key = ring.get(1).expect("version 1");
        let token = key
            .sign("prod-x", 1, Some("n-1"), 1_700_000_000)
            .expect("signs");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts[0]).expect("b64")).expect("json");
        assert_eq!(header, serde_json::json!({"alg": "PS256", "typ": "JWT"}));

        let decoding = DecodingKey::from_rsa_pem(key.public_pem.as_bytes()).expect("public pem");
        let mut validation = Validation::new(Algorithm::PS256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        let data = jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation)
            .expect("verifies");
        assert_eq!(
            data.claims,
            serde_json::json!({"productCode": "prod-x", "publicKeyVersion": 1, "nonce": "n-1", "iat": 1_700_000_000})
        );
        assert!(key.public_pem.starts_with("-----BEGIN PUBLIC KEY-----"));
    }

    #[test]
    fn nonce_is_omitted_when_not_sent() {
        let ring = demo_keyring();
        let token = ring
            .get(1)
            .expect("v1")
            .sign("p", 1, None, 5)
            .expect("signs");
        let payload = token.split('.').nth(1).expect("payload");
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims: serde_json::Value =
            serde_json::from_slice(&b64.decode(payload).expect("b64")).expect("json");
        assert!(claims.get("nonce").is_none());
    }
}
