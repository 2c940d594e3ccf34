//! Safe resubmission: the `Idempotency-Key` a client sends with a call, and
//! what the store keeps with it (the first call's id and a digest of its
//! body), so a resubmission under the same key answers that call again
//! instead of creating a second one.

use super::CallId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// The longest key accepted, in bytes.
pub const IDEMPOTENCY_KEY_MAX: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid Idempotency-Key: use 1-{IDEMPOTENCY_KEY_MAX} of A-Z, a-z, 0-9 and '-', '_', '.', ':', '~', '+', '/', '='"
)]
pub struct BadIdempotencyKey;

/// A client's idempotency key: 1–255 of `A-Za-z0-9-_.:~+/=` (a UUID, a
/// ULID, base64 and the like), checked when built, so every store can use
/// it in a key of its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(s: &str) -> Result<IdempotencyKey, BadIdempotencyKey> {
        let ok = |c: u8| c.is_ascii_alphanumeric() || b"-_.:~+/=".contains(&c);
        if !s.is_empty() && s.len() <= IDEMPOTENCY_KEY_MAX && s.bytes().all(ok) {
            Ok(IdempotencyKey(s.to_string()))
        } else {
            Err(BadIdempotencyKey)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key a schedule's tick `tick_ms` is accepted under: `@schedule:`
    /// and the tick in ms since the epoch. `@` is outside the client
    /// grammar above, so no caller's key can take (or spoil) a tick's.
    pub fn tick(tick_ms: u64) -> IdempotencyKey {
        IdempotencyKey(format!("@schedule:{tick_ms}"))
    }

    /// The key's SHA-256 in hex: a fixed-length spelling made of key-safe
    /// characters only (the NATS store's keys).
    pub fn hashed(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_bytes()))
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an accept under a key brings: the key, and the digest of the
/// request that the first call under it must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: IdempotencyKey,
    /// SHA-256 of the call's body (the payload). Request variables are not
    /// in it: a retry's headers (a new `Date`, a tracing id) differ.
    pub digest: [u8; 32],
}

impl Idempotency {
    pub fn new(key: IdempotencyKey, payload: &[u8]) -> Idempotency {
        Idempotency {
            key,
            digest: Sha256::digest(payload).into(),
        }
    }
}

/// What a store keeps under a key: the call it names and the digest of
/// that call's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub call: [u8; 16],
    pub digest: [u8; 32],
}

impl IdempotencyRecord {
    pub fn call_id(&self) -> CallId {
        CallId::from_bytes(self.call)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_bounded_in_length_and_charset() {
        assert!(IdempotencyKey::parse("3f0c8a4e-1b2d-4c5e-9f00-123456789abc").is_ok());
        assert!(IdempotencyKey::parse("aGVsbG8=/+x:y~z_.").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(IDEMPOTENCY_KEY_MAX)).is_ok());
        assert_eq!(
            IdempotencyKey::parse(&"k".repeat(IDEMPOTENCY_KEY_MAX + 1)),
            Err(BadIdempotencyKey)
        );
        for bad in ["", "a b", "a\nb", "é", "a\0b", "a*b", "a,b"] {
            assert_eq!(
                IdempotencyKey::parse(bad),
                Err(BadIdempotencyKey),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_ticks_key_is_one_no_client_can_send() {
        let k = IdempotencyKey::tick(1_700_000_000_000);
        assert_eq!(k.as_str(), "@schedule:1700000000000");
        assert_eq!(IdempotencyKey::parse(k.as_str()), Err(BadIdempotencyKey));
        assert_ne!(k, IdempotencyKey::tick(1_700_000_002_000));
    }

    #[test]
    fn the_digest_is_of_the_body() {
        let k = IdempotencyKey::parse("k").expect("valid key");
        assert_eq!(
            Idempotency::new(k.clone(), b"a").digest,
            Idempotency::new(k.clone(), b"a").digest
        );
        assert_ne!(
            Idempotency::new(k.clone(), b"a").digest,
            Idempotency::new(k, b"b").digest
        );
    }
}
