//! Signed tree heads: the log's signed statement "my tree of N entries has this
//! root", which inclusion and consistency proofs are checked against.

use crate::keys::log_id_of;
use crate::merkle::Hash;
use crate::verify::VerifyError;
use ed25519_dalek::{Signature, VerifyingKey};
use lienthong_store::StoredTreeHead;
use serde::{Deserialize, Serialize};

/// Domain separation prefix of the signed bytes, so a tree-head signature can
/// never be replayed as a signature over anything else.
pub const SIGNING_PREFIX: &[u8] = b"lienthong-sth-v1";

/// A tree head signed by the log's Ed25519 key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTreeHead {
    /// Hex SHA-256 of the log's public key.
    pub log_id: String,
    /// Entries covered.
    pub tree_size: u64,
    /// Merkle root of the first `tree_size` entries.
    #[serde(with = "hex_hash")]
    pub root_hash: Hash,
    /// Signing time, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Ed25519 signature over [`signing_input`].
    #[serde(with = "hex_bytes")]
    pub signature: Vec<u8>,
}

/// The bytes signed: `"lienthong-sth-v1" || log_id || u64be(size) || u64be(ts) || root`.
pub fn signing_input(log_id: &str, tree_size: u64, timestamp_ms: u64, root: &Hash) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNING_PREFIX.len() + log_id.len() + 8 + 8 + 32);
    out.extend_from_slice(SIGNING_PREFIX);
    out.extend_from_slice(log_id.as_bytes());
    out.extend_from_slice(&tree_size.to_be_bytes());
    out.extend_from_slice(&timestamp_ms.to_be_bytes());
    out.extend_from_slice(root);
    out
}

/// Checks that `sth` belongs to the log of `public_key` and carries a valid
/// signature by it.
pub fn verify_tree_head(sth: &SignedTreeHead, public_key: &[u8; 32]) -> Result<(), VerifyError> {
    let expected = log_id_of(public_key);
    if sth.log_id != expected {
        return Err(VerifyError::WrongLog {
            expected,
            found: sth.log_id.clone(),
        });
    }
    let key = VerifyingKey::from_bytes(public_key)
        .map_err(|_| VerifyError::BadPublicKey("not a valid ed25519 point".into()))?;
    let bad = || VerifyError::BadSignature {
        log_id: sth.log_id.clone(),
        tree_size: sth.tree_size,
    };
    let signature = Signature::from_slice(&sth.signature).map_err(|_| bad())?;
    let input = signing_input(&sth.log_id, sth.tree_size, sth.timestamp_ms, &sth.root_hash);
    key.verify_strict(&input, &signature).map_err(|_| bad())
}

impl From<SignedTreeHead> for StoredTreeHead {
    fn from(sth: SignedTreeHead) -> Self {
        StoredTreeHead {
            log_id: sth.log_id,
            tree_size: sth.tree_size,
            root_hash: sth.root_hash,
            timestamp_ms: sth.timestamp_ms,
            signature: sth.signature,
        }
    }
}

impl From<&SignedTreeHead> for StoredTreeHead {
    fn from(sth: &SignedTreeHead) -> Self {
        StoredTreeHead::from(sth.clone())
    }
}

impl From<StoredTreeHead> for SignedTreeHead {
    fn from(head: StoredTreeHead) -> Self {
        SignedTreeHead {
            log_id: head.log_id,
            tree_size: head.tree_size,
            root_hash: head.root_hash,
            timestamp_ms: head.timestamp_ms,
            signature: head.signature,
        }
    }
}

/// Serde adapter: a 32-byte hash as 64 hex digits.
pub mod hex_hash {
    use crate::merkle::Hash;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Serializes as lowercase hex.
    pub fn serialize<S: Serializer>(hash: &Hash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(hash))
    }

    /// Parses 64 hex digits.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(&text).map_err(|_| D::Error::custom("hash must be hex"))?;
        bytes
            .try_into()
            .map_err(|_| D::Error::custom("hash must be 32 bytes (64 hex digits)"))
    }
}

/// Serde adapter: bytes as hex.
pub mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Serializes as lowercase hex.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    /// Parses hex.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(&text).map_err(|_| D::Error::custom("expected hex"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::keys::LogKeys;

    #[test]
    fn signing_input_layout_is_fixed() {
        let input = signing_input("ab", 0x0102, 0x0a0b, &[0xee; 32]);
        let mut want = b"lienthong-sth-v1ab".to_vec();
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x0a, 0x0b]);
        want.extend_from_slice(&[0xee; 32]);
        assert_eq!(input, want);
    }

    #[test]
    fn signed_heads_verify_and_any_change_breaks_them() {
        let keys = LogKeys::generate().unwrap();
        let sth = keys.sign_tree_head(7, &[3; 32], 1_700_000_000_000);
        verify_tree_head(&sth, &keys.public_key()).unwrap();

        let mut bigger = sth.clone();
        bigger.tree_size += 1;
        assert!(matches!(
            verify_tree_head(&bigger, &keys.public_key()),
            Err(VerifyError::BadSignature { .. })
        ));
        let mut other_root = sth.clone();
        other_root.root_hash[0] ^= 1;
        assert!(verify_tree_head(&other_root, &keys.public_key()).is_err());
        let mut later = sth.clone();
        later.timestamp_ms += 1;
        assert!(verify_tree_head(&later, &keys.public_key()).is_err());
        let mut short = sth.clone();
        short.signature.pop();
        assert!(verify_tree_head(&short, &keys.public_key()).is_err());

        let stranger = LogKeys::generate().unwrap();
        let err = verify_tree_head(&sth, &stranger.public_key()).unwrap_err();
        assert!(matches!(err, VerifyError::WrongLog { .. }), "{err}");
    }

    #[test]
    fn json_and_store_round_trips() {
        let keys = LogKeys::generate().unwrap();
        let sth = keys.sign_tree_head(42, &[9; 32], 5);
        let json = serde_json::to_value(&sth).unwrap();
        assert_eq!(json["root_hash"], hex::encode([9u8; 32]));
        assert_eq!(json["signature"].as_str().unwrap().len(), 128);
        let back: SignedTreeHead = serde_json::from_value(json).unwrap();
        assert_eq!(back, sth);
        let stored = StoredTreeHead::from(&sth);
        assert_eq!(SignedTreeHead::from(stored), sth);
        let bad =
            serde_json::json!({"log_id": "x", "tree_size": 1, "root_hash": "abcd", "timestamp_ms": 0, "signature": ""});
        assert!(serde_json::from_value::<SignedTreeHead>(bad).is_err());
    }
}
