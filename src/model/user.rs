//! Users own functions and calls and carry a concurrency quota, budgets
//! (queued calls and bytes, functions, request rate) and a share of the
//! host's slots kept for them (`reserved`). Their API keys are stored only
//! as SHA-256 hashes.

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
    /// What the user may consume; an unset budget follows `[scheduler]`'s
    /// default, so changing the default reaches every user who set none.
    pub limits: UserLimits,
}

impl User {
    /// Host slots kept for this user: their own reservation, else the
    /// default for their role, never more than their quota (they could not
    /// use more).
    pub fn reserved(&self, admin_default: u32, default: u32) -> u32 {
        let own = self.limits.reserved;
        own.unwrap_or(if self.admin { admin_default } else { default })
            .min(self.max_concurrency)
    }
}

/// A user's budgets as stored: `None` follows the config's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserLimits {
    /// Calls accepted and not yet started (PENDING).
    pub max_queued: Option<u64>,
    /// STDIN bytes of those calls.
    pub max_queued_bytes: Option<u64>,
    pub max_functions: Option<u32>,
    /// Requests per second per API key and per call URL (token bucket).
    pub rate: Option<u32>,
    /// Slots of `host_max_running` kept for the user's calls: no other
    /// user's call takes one while it is unused (`None`: `[scheduler]
    /// admin_reserved` for an admin, `default_reserved` for anyone else).
    pub reserved: Option<u32>,
}

/// The budgets in force for a user: their own, else the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub max_queued: u64,
    pub max_queued_bytes: u64,
    pub max_functions: u32,
    pub rate: u32,
    /// Host slots kept for the user, at most their `max_concurrency` (they
    /// could never use more).
    pub reserved: u32,
}

impl Budget {
    /// What the store checks when it accepts a call of this user.
    pub fn queue(&self) -> QueueBudget {
        QueueBudget {
            max_calls: self.max_queued,
            max_bytes: self.max_queued_bytes,
        }
    }
}

/// The owner's queue budget, checked by `Store::accept` in the write that
/// queues the call, so that concurrent accepts cannot pass it together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueBudget {
    pub max_calls: u64,
    pub max_bytes: u64,
}

impl QueueBudget {
    /// No budget (tests, migrations).
    pub const UNLIMITED: QueueBudget = QueueBudget {
        max_calls: u64::MAX,
        max_bytes: u64::MAX,
    };
}

/// A user record as written before reservations existed (sled schema 5,
/// and NATS records of that release): read, then upgraded.
#[derive(Debug, Clone, Deserialize)]
pub struct UserV2 {
    pub name: Name,
    pub key_hash: [u8; 32],
    pub max_concurrency: u32,
    pub admin: bool,
    pub created_ms: u64,
    pub limits: UserLimitsV1,
}

/// `UserLimits` before `reserved`.
#[derive(Debug, Clone, Deserialize)]
pub struct UserLimitsV1 {
    pub max_queued: Option<u64>,
    pub max_queued_bytes: Option<u64>,
    pub max_functions: Option<u32>,
    pub rate: Option<u32>,
}

impl From<UserV2> for User {
    fn from(u: UserV2) -> User {
        let l = u.limits;
        User {
            name: u.name,
            key_hash: u.key_hash,
            max_concurrency: u.max_concurrency,
            admin: u.admin,
            created_ms: u.created_ms,
            limits: UserLimits {
                max_queued: l.max_queued,
                max_queued_bytes: l.max_queued_bytes,
                max_functions: l.max_functions,
                rate: l.rate,
                reserved: None,
            },
        }
    }
}

/// A user record as written before budgets existed (sled schema 4 and
/// earlier, and NATS records of those releases): read, then upgraded.
#[derive(Debug, Clone, Deserialize)]
pub struct UserV1 {
    pub name: Name,
    pub key_hash: [u8; 32],
    pub max_concurrency: u32,
    pub admin: bool,
    pub created_ms: u64,
}

impl From<UserV1> for User {
    fn from(u: UserV1) -> User {
        User {
            name: u.name,
            key_hash: u.key_hash,
            max_concurrency: u.max_concurrency,
            admin: u.admin,
            created_ms: u.created_ms,
            limits: UserLimits::default(),
        }
    }
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
    fn a_reservation_follows_the_role_default_and_stops_at_the_quota() {
        let mut u = User::from(UserV1 {
            name: Name::parse("bob").unwrap(),
            key_hash: [0; 32],
            max_concurrency: 2,
            admin: false,
            created_ms: 0,
        });
        assert_eq!(u.reserved(1, 0), 0);
        u.admin = true;
        assert_eq!(u.reserved(1, 0), 1);
        u.limits.reserved = Some(0);
        assert_eq!(u.reserved(1, 0), 0, "their own, even 0");
        u.limits.reserved = Some(5);
        assert_eq!(u.reserved(1, 0), 2, "never above the quota");
    }

    #[test]
    fn keys_are_random_and_hash_stably() {
        let a = ApiKey::generate();
        let b = ApiKey::generate();
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(a.hash(), hash_key(a.as_str()));
        assert!(a.as_str().starts_with("hfk_"));
    }
}
