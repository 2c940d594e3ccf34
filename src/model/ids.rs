//! Identifiers that validate when they are built, so the rest of the code never
//! sees a bad one.

use serde::{Deserialize, Serialize};
use std::fmt;
use subtle::ConstantTimeEq;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("invalid name {0:?}: use 1-63 of a-z, 0-9 and '-', starting and ending with a letter or digit")]
    Name(String),
    #[error("invalid call id {0:?}")]
    CallId(String),
}

/// A function or user name: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    pub fn parse(s: &str) -> Result<Name, IdError> {
        let b = s.as_bytes();
        let ok_inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
        let ok_edge = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        let valid = !b.is_empty()
            && b.len() <= 63
            && b.iter().all(ok_inner)
            && b.first().is_some_and(ok_edge)
            && b.last().is_some_and(ok_edge);
        if valid {
            Ok(Name(s.to_string()))
        } else {
            Err(IdError::Name(s.chars().take(80).collect()))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Name::parse(&s)
    }
}
impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}
impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A function's identity: its owner and its name. Two users may own
/// functions of the same name; everything kept per function (record,
/// secret, calls, counters, caches, containers, pool) is kept per key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FnKey {
    pub owner: Name,
    pub name: Name,
}

impl FnKey {
    pub fn new(owner: Name, name: Name) -> FnKey {
        FnKey { owner, name }
    }

    /// Parses `OWNER/NAME`, both parts validated.
    pub fn parse(s: &str) -> Result<FnKey, IdError> {
        let (o, n) = s
            .split_once('/')
            .ok_or_else(|| IdError::Name(s.chars().take(80).collect()))?;
        Ok(FnKey::new(Name::parse(o)?, Name::parse(n)?))
    }

    /// `owner NUL name`: the embedded store's key (names never hold a NUL,
    /// so two keys never share a spelling, and `key NUL` prefixes exactly
    /// one function's entries).
    pub fn store_key(&self) -> String {
        format!("{}\0{}", self.owner, self.name)
    }

    /// `owner_name`: a NATS stream or subject token. `_` is in no name, so
    /// the split is unambiguous.
    pub fn token(&self) -> String {
        format!("{}_{}", self.owner, self.name)
    }
}

impl fmt::Display for FnKey {
    /// `owner/name`, as the CLI accepts it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

/// A call id: a random UUID, shown hyphenated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CallId(uuid::Uuid);

impl CallId {
    pub fn new() -> CallId {
        CallId(uuid::Uuid::new_v4())
    }
    pub fn parse(s: &str) -> Result<CallId, IdError> {
        uuid::Uuid::parse_str(s)
            .map(CallId)
            .map_err(|_| IdError::CallId(s.chars().take(80).collect()))
    }
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
    pub fn from_bytes(b: [u8; 16]) -> CallId {
        CallId(uuid::Uuid::from_bytes(b))
    }
}

impl Default for CallId {
    fn default() -> Self {
        Self::new()
    }
}
impl TryFrom<String> for CallId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        CallId::parse(&s)
    }
}
impl From<CallId> for String {
    fn from(c: CallId) -> String {
        c.to_string()
    }
}
impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// The capability part of a call URL: a v4 UUID (122 random bits). Compared in
/// constant time so response timing says nothing about how much of a guess was right.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Secret(String);

impl Secret {
    pub fn new() -> Secret {
        Secret(uuid::Uuid::new_v4().hyphenated().to_string())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn matches(&self, candidate: &str) -> bool {
        self.0.as_bytes().ct_eq(candidate.as_bytes()).into()
    }
}

impl Default for Secret {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "hello-world", "f1", &"a".repeat(63)] {
            assert!(Name::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "é",
            &"a".repeat(64),
            "a/b",
        ] {
            assert!(Name::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn function_keys() {
        let k = FnKey::parse("bob/resize").unwrap();
        assert_eq!((k.owner.as_str(), k.name.as_str()), ("bob", "resize"));
        assert_eq!(k.to_string(), "bob/resize");
        assert_eq!(k.store_key(), "bob\0resize");
        assert_eq!(k.token(), "bob_resize");
        for bad in [
            "resize",
            "bob/",
            "/resize",
            "bob/re/size",
            "Bob/resize",
            "../x",
        ] {
            assert!(FnKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn call_ids_round_trip() {
        let id = CallId::new();
        assert_eq!(CallId::parse(&id.to_string()), Ok(id));
        assert_eq!(CallId::from_bytes(*id.as_bytes()), id);
        assert!(CallId::parse("nope").is_err());
    }

    #[test]
    fn secrets_compare() {
        let s = Secret::new();
        assert!(s.matches(s.as_str()));
        assert!(!s.matches(&Secret::new().0));
        assert!(!s.matches(""));
    }
}
