//! The keyring: the RSA public keys trusted to sign RegisterUsage tokens, by PublicKeyVersion.
//!
//! Keys come from two places:
//! - **bundled**: every `keys/*.pem` of the source tree, embedded at build time by `build.rs`
//!   (source `bundled:<file name>`). A running agent needs no key files on disk.
//! - **run-time files**: `registration.public_key_files` (source: the path as given).
//!
//! A file named `v<N>.pem` or `v<N>-<anything>.pem` holds a key of PublicKeyVersion N. A
//! run-time file with any other name counts for the configured version. Keys must be RSA of
//! at least [`MIN_KEY_BITS`] bits, in SubjectPublicKeyInfo PEM (`BEGIN PUBLIC KEY`) or PKCS#1
//! PEM (`BEGIN RSA PUBLIC KEY`).
//!
//! **Fingerprints** are the SHA-256 of the key's DER SubjectPublicKeyInfo, written as lowercase
//! hex pairs separated by colons (`3f:a1:…`, 95 characters). The same digest comes from
//! `openssl pkey -pubin -in key.pem -outform DER | sha256sum` (without the colons).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use jsonwebtoken::DecodingKey;
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use rsa::traits::PublicKeyParts;
use rsa::RsaPublicKey;
use serde::Serialize;
use sha2::{Digest, Sha256};

mod generated {
    include!(concat!(env!("OUT_DIR"), "/bundled_keys.rs"));
}

/// Smallest RSA modulus accepted, in bits.
pub const MIN_KEY_BITS: usize = 2048;
/// Largest PEM file read from disk; a public key is well under 4 KiB.
const MAX_PEM_BYTES: u64 = 64 * 1024;

/// Why a key could not join the keyring.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("cannot read public key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "public key file {path} is larger than {MAX_PEM_BYTES} bytes; it is not a PEM public key"
    )]
    TooLarge { path: PathBuf },
    #[error(
        "{source_name} is not an RSA public key in PEM form ({detail}); expected \
         -----BEGIN PUBLIC KEY----- or -----BEGIN RSA PUBLIC KEY-----"
    )]
    NotRsaPem { source_name: String, detail: String },
    #[error("{source_name} is a {bits}-bit RSA key; at least {MIN_KEY_BITS} bits are required")]
    TooSmall { source_name: String, bits: usize },
    #[error("{source_name}: PublicKeyVersion must be at least 1")]
    BadVersion { source_name: String },
}

/// One trusted key.
#[derive(Clone, Serialize)]
pub struct KeyEntry {
    /// The PublicKeyVersion this key verifies.
    pub version: u32,
    /// SHA-256 of the DER SubjectPublicKeyInfo, lowercase hex pairs joined by colons.
    pub fingerprint: String,
    /// `bundled:<file name>` or the run-time path as configured.
    pub source: String,
    /// RSA modulus size in bits.
    pub bits: usize,
    #[serde(skip)]
    pub(crate) decoding: DecodingKey,
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("version", &self.version)
            .field("fingerprint", &self.fingerprint)
            .field("source", &self.source)
            .field("bits", &self.bits)
            .finish()
    }
}

/// The set of trusted keys. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    entries: Vec<KeyEntry>,
}

/// What `meterd keys` prints, in serializable form.
#[derive(Debug, Clone, Serialize)]
pub struct KeysReport {
    pub keys: Vec<KeyEntry>,
}

impl KeysReport {
    /// The human-readable table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.keys.is_empty() {
            out.push_str("no trusted keys: add keys/v<N>.pem and rebuild, or set registration.public_key_files\n");
            return out;
        }
        for key in &self.keys {
            let _ = writeln!(
                out,
                "v{:<4} RSA-{:<5} {}  {}",
                key.version, key.bits, key.fingerprint, key.source
            );
        }
        out
    }
}

impl std::fmt::Display for KeysReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

impl Keyring {
    /// A keyring with no keys (tests and tools).
    pub fn empty() -> Self {
        Self::default()
    }

    /// The keys embedded at build time from `keys/*.pem`.
    pub fn bundled() -> Result<Self, KeyringError> {
        let mut ring = Self::empty();
        for (name, version, pem) in generated::BUNDLED_KEYS {
            ring.add_pem(*version, format!("bundled:{name}"), pem)?;
        }
        Ok(ring)
    }

    /// The bundled keys plus `public_key_files`; files not named `v<N>….pem` count for
    /// `configured_version`.
    pub fn load(
        public_key_files: &[PathBuf],
        configured_version: u32,
    ) -> Result<Self, KeyringError> {
        let mut ring = Self::bundled()?;
        for path in public_key_files {
            ring.add_file(path, configured_version)?;
        }
        Ok(ring)
    }

    /// Adds one PEM file read from disk.
    pub fn add_file(&mut self, path: &Path, configured_version: u32) -> Result<(), KeyringError> {
        let io = |source| KeyringError::Io {
            path: path.to_owned(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_PEM_BYTES {
            return Err(KeyringError::TooLarge {
                path: path.to_owned(),
            });
        }
        let pem = std::fs::read_to_string(path).map_err(io)?;
        let version = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(version_from_file_name)
            .unwrap_or(configured_version);
        self.add_pem(version, path.display().to_string(), &pem)
    }

    /// Adds one PEM key for `version`. A key already present for that version (same
    /// fingerprint) is not added twice; the first source is kept.
    pub fn add_pem(
        &mut self,
        version: u32,
        source: impl Into<String>,
        pem: &str,
    ) -> Result<(), KeyringError> {
        let source = source.into();
        if version == 0 {
            return Err(KeyringError::BadVersion {
                source_name: source,
            });
        }
        let key = RsaPublicKey::from_public_key_pem(pem.trim())
            .or_else(|spki_err| {
                RsaPublicKey::from_pkcs1_pem(pem.trim()).map_err(|_| spki_err.to_string())
            })
            .map_err(|detail| KeyringError::NotRsaPem {
                source_name: source.clone(),
                detail,
            })?;
        let bits = key.n().bits();
        if bits < MIN_KEY_BITS {
            return Err(KeyringError::TooSmall {
                source_name: source,
                bits,
            });
        }
        let der = key
            .to_public_key_der()
            .map_err(|e| KeyringError::NotRsaPem {
                source_name: source.clone(),
                detail: e.to_string(),
            })?;
        let fingerprint = fingerprint(der.as_bytes());
        if self
            .entries
            .iter()
            .any(|e| e.version == version && e.fingerprint == fingerprint)
        {
            return Ok(());
        }
        let decoding =
            DecodingKey::from_rsa_raw_components(&key.n().to_bytes_be(), &key.e().to_bytes_be());
        self.entries.push(KeyEntry {
            version,
            fingerprint,
            source,
            bits,
            decoding,
        });
        Ok(())
    }

    /// All keys, bundled first, in the order added.
    pub fn entries(&self) -> &[KeyEntry] {
        &self.entries
    }

    /// The keys trusted for `version`.
    pub fn for_version(&self, version: u32) -> impl Iterator<Item = &KeyEntry> + '_ {
        self.entries.iter().filter(move |e| e.version == version)
    }

    pub fn has_version(&self, version: u32) -> bool {
        self.for_version(version).next().is_some()
    }

    /// The `meterd keys` report.
    pub fn report(&self) -> KeysReport {
        KeysReport {
            keys: self.entries.clone(),
        }
    }
}

/// SHA-256 of `der`, as lowercase hex pairs joined by colons.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let mut out = String::with_capacity(digest.len() * 3);
    for (i, byte) in digest.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// `v12.pem` and `v12-name.pem` give 12; anything else gives `None`.
/// Keep in step with `version_from_file_name` in build.rs.
pub fn version_from_file_name(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".pem")?.strip_prefix('v')?;
    let digits = stem.split_once('-').map_or(stem, |(d, _)| d);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|v| *v >= 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entitlement::test_support::{trusted_public_pem, untrusted_public_pem};

    #[test]
    fn bundled_keyring_holds_the_reference_v1_key() {
        let ring = Keyring::bundled().expect("bundled keys parse");
        let v1: Vec<_> = ring.for_version(1).collect();
        assert!(!v1.is_empty(), "keys/v1.pem is bundled");
        let entry = v1
            .iter()
            .find(|e| e.source == "bundled:v1.pem")
            .expect("v1.pem is bundled under its file name");
        assert_eq!(entry.bits, 3072);
        // The digest of the reference file's DER SubjectPublicKeyInfo.
        let pem = include_str!("../../keys/v1.pem");
        let der = RsaPublicKey::from_public_key_pem(pem)
            .and_then(|k| k.to_public_key_der())
            .expect("reference key parses");
        assert_eq!(entry.fingerprint, fingerprint(der.as_bytes()));
        assert_eq!(entry.fingerprint.len(), 95);
    }

    #[test]
    fn file_names_carry_the_version() {
        assert_eq!(version_from_file_name("v1.pem"), Some(1));
        assert_eq!(version_from_file_name("v12-myproduct.pem"), Some(12));
        assert_eq!(version_from_file_name("v0.pem"), None);
        assert_eq!(version_from_file_name("v.pem"), None);
        assert_eq!(version_from_file_name("v1x.pem"), None);
        assert_eq!(version_from_file_name("aws-marketplace-v1.pem"), None);
        assert_eq!(version_from_file_name("v1.pem.bak"), None);
    }

    #[test]
    fn run_time_files_take_their_version_from_the_name_or_the_configured_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let named = dir.path().join("v7-seller.pem");
        let unnamed = dir.path().join("seller-key.pem");
        std::fs::write(&named, trusted_public_pem()).expect("write");
        std::fs::write(&unnamed, untrusted_public_pem()).expect("write");
        let ring = Keyring::load(&[named.clone(), unnamed.clone()], 3).expect("loads");
        let v7: Vec<_> = ring.for_version(7).collect();
        assert_eq!(v7.len(), 1);
        assert_eq!(v7[0].source, named.display().to_string());
        let v3: Vec<_> = ring.for_version(3).collect();
        assert_eq!(v3.len(), 1);
        assert_eq!(v3[0].source, unnamed.display().to_string());
        assert!(ring.has_version(1), "bundled keys stay");
    }

    #[test]
    fn bad_files_are_refused_with_their_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let junk = dir.path().join("v1-junk.pem");
        std::fs::write(
            &junk,
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        )
        .expect("write");
        let err = Keyring::empty().add_file(&junk, 1).unwrap_err();
        assert!(matches!(err, KeyringError::NotRsaPem { .. }), "{err}");
        assert!(err.to_string().contains("v1-junk.pem"));
        let missing = dir.path().join("absent.pem");
        let err = Keyring::empty().add_file(&missing, 1).unwrap_err();
        assert!(matches!(err, KeyringError::Io { .. }), "{err}");
    }

    #[test]
    fn small_keys_and_version_zero_are_refused() {
        use rsa::pkcs8::LineEnding;
        let small = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 1024).expect("keygen");
        let pem = small
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem");
        let err = Keyring::empty().add_pem(1, "small", &pem).unwrap_err();
        assert!(
            matches!(err, KeyringError::TooSmall { bits: 1024, .. }),
            "{err}"
        );
        let err = Keyring::empty()
            .add_pem(0, "zero", &trusted_public_pem())
            .unwrap_err();
        assert!(matches!(err, KeyringError::BadVersion { .. }), "{err}");
    }

    #[test]
    fn duplicate_keys_are_listed_once_and_report_renders() {
        let mut ring = Keyring::empty();
        ring.add_pem(2, "a", &trusted_public_pem()).expect("add");
        ring.add_pem(2, "b", &trusted_public_pem()).expect("add");
        ring.add_pem(3, "c", &trusted_public_pem()).expect("add");
        assert_eq!(ring.entries().len(), 2);
        let text = ring.report().render();
        assert!(
            text.contains("v2") && text.contains("RSA-2048") && text.contains(" a"),
            "{text}"
        );
        let json = serde_json::to_value(ring.report()).expect("serializes");
        assert_eq!(json["keys"][0]["source"], "a");
        assert!(json["keys"][0].get("decoding").is_none());
    }
}
