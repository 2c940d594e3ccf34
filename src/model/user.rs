//! Users own functions and calls and carry a concurrency quota. Their API keys
//! are stored only as SHA-256 hashes.

use super::ids::Name;
use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub name: Name,
    pub key_hash: [u8; 32],
    pub max_concurrency: u32,
    pub admin: bool,
    pub created_ms: u64,
}

/// How every API key begins, so a key can be recognised where it must not
/// go (a call's environment).
pub const API_KEY_PREFIX: &str = "hfk_";

/// A bearer key as handed to a user, once.
pub struct ApiKey(String);

impl ApiKey {
    pub fn generate() -> ApiKey {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        ApiKey(format!(
            "{API_KEY_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        ))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn hash(&self) -> [u8; 32] {
        hash_key(&self.0)
    }
}

/// The stored form of a key. Keys carry 256 random bits, so a plain hash is
/// enough: there is nothing to brute-force.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_hash_stably() {
        let a = ApiKey::generate();
        let b = ApiKey::generate();
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(a.hash(), hash_key(a.as_str()));
        assert!(a.as_str().starts_with("hfk_"));
    }
}
