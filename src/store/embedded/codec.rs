//! Record and key encoding. One bincode options value everywhere; every record
//! starts with a version byte so a later release can migrate old records.

use bincode::Options;
use serde::{de::DeserializeOwned, Serialize};

/// Version byte of every record written by this release.
const RECORD_VERSION: u8 = 1;
/// No single record is larger than a payload plus its metadata.
const DECODE_LIMIT: u64 = 256 * 1024 * 1024;

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_big_endian()
        .with_limit(DECODE_LIMIT)
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("record has unknown version {0}")]
    Version(u8),
    #[error("empty record")]
    Empty,
    #[error("corrupt record: {0}")]
    Bincode(#[from] bincode::Error),
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![RECORD_VERSION];
    options().serialize_into(&mut out, value)?;
    Ok(out)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match bytes.split_first() {
        None => Err(CodecError::Empty),
        Some((&RECORD_VERSION, rest)) => Ok(options().deserialize(rest)?),
        Some((&v, _)) => Err(CodecError::Version(v)),
    }
}

/// `prefix 0x00 seq_be`: names never hold a NUL, so a prefix scan of
/// `prefix 0x00` sees exactly that owner's entries, in sequence order.
pub fn seq_key(prefix: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 9);
    k.extend_from_slice(prefix.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn seq_prefix(prefix: &str) -> Vec<u8> {
    let mut k = prefix.as_bytes().to_vec();
    k.push(0);
    k
}

/// The sequence number at the end of a `seq_key`.
pub fn key_seq(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if key.len() >= 8 {
        b.copy_from_slice(&key[key.len() - 8..]);
    }
    u64::from_be_bytes(b)
}

/// The owner part of a `seq_key`.
pub fn key_prefix(key: &[u8]) -> &[u8] {
    &key[..key.len().saturating_sub(9)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version() {
        let v = (String::from("x"), 7u64, vec![1u8, 2]);
        let bytes = encode(&v).unwrap();
        assert_eq!(bytes[0], RECORD_VERSION);
        assert_eq!(decode::<(String, u64, Vec<u8>)>(&bytes).unwrap(), v);
        let mut bad = bytes.clone();
        bad[0] = 99;
        assert!(matches!(
            decode::<(String, u64, Vec<u8>)>(&bad),
            Err(CodecError::Version(99))
        ));
        assert!(decode::<u64>(&[]).is_err());
        assert!(decode::<String>(&[RECORD_VERSION, 0xff]).is_err());
    }

    #[test]
    fn seq_keys_sort_by_owner_then_seq() {
        let a = seq_key("ab", 2);
        let b = seq_key("ab", 10);
        let c = seq_key("ab-c", 1);
        assert!(a < b && b < c);
        assert!(b.starts_with(&seq_prefix("ab")) && !c.starts_with(&seq_prefix("ab")));
        assert_eq!(key_seq(&b), 10);
        assert_eq!(key_prefix(&c), b"ab-c");
    }
}
