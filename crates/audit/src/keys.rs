//! The log's two secrets: the Ed25519 key signing tree heads and the HMAC key
//! turning subject keys (national ID numbers, ...) into stable pseudonyms.

use crate::log::AuditError;
use crate::merkle::Hash;
use crate::sth::{SignedTreeHead, signing_input};
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use hmac::{Hmac, Mac};
use lienthong_tls::{GroupAccess, KeyFileError};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the tree-head signing key (PKCS#8 PEM) in the data directory.
pub const SIGNING_KEY_FILE: &str = "audit-signing.key";
/// File name of the subject HMAC secret (64 hex digits) in the data directory.
pub const SUBJECT_KEY_FILE: &str = "subject-hmac.key";
/// File name of the newest tree head the broker signed (JSON) in the data
/// directory, which the database's history is checked against at every start.
pub const PINNED_HEAD_FILE: &str = "audit-head.json";

type HmacSha256 = Hmac<Sha256>;

/// The log's signing key and subject HMAC secret.
#[derive(Clone)]
pub struct LogKeys {
    signing: SigningKey,
    hmac: HmacSha256,
    /// Hex SHA-256 of the subject secret under a label of its own: names the
    /// secret (to tell replicas sharing it from one that is not) without
    /// revealing it.
    subject_fingerprint: String,
    log_id: String,
    public_key_pem: String,
    /// Where the keys were loaded from; `None` for keys held in memory only,
    /// which have no data directory to pin their log's newest head in.
    data_dir: Option<PathBuf>,
}

impl fmt::Debug for LogKeys {
    // Secrets stay out of debug output and therefore out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogKeys")
            .field("log_id", &self.log_id)
            .finish_non_exhaustive()
    }
}

impl LogKeys {
    /// Loads both keys from `data_dir`, creating them (mode 0600) on first start.
    /// Refuses key files readable by group or others, and malformed ones.
    ///
    /// A new subject secret is made only on a first start (no signing key
    /// either): with a signing key there is a log, whose entries name subjects
    /// under the secret it was written with. A signing key missing beside a
    /// secret is a new replica's first start: it gets its own key and keeps
    /// the secret shared by every replica.
    ///
    /// Keys loaded from a directory pin their log's newest signed head there
    /// too ([`LogKeys::pinned_head_path`]).
    pub fn load_or_create(data_dir: &Path) -> Result<LogKeys, AuditError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| AuditError::Keys(format!("cannot create data directory {}: {e}", data_dir.display())))?;
        let signing_path = data_dir.join(SIGNING_KEY_FILE);
        let hmac_path = data_dir.join(SUBJECT_KEY_FILE);
        let existing = read_private(&signing_path)?
            .map(|pem| {
                SigningKey::from_pkcs8_pem(&pem).map_err(|e| {
                    AuditError::Keys(format!(
                        "{} is not an ed25519 pkcs#8 pem private key: {e}",
                        signing_path.display()
                    ))
                })
            })
            .transpose()?;

        let secret = match read_private(&hmac_path)? {
            Some(text) => parse_secret(&text).ok_or_else(|| {
                AuditError::Keys(format!(
                    "{} must hold exactly 64 hex digits (a 32-byte secret)",
                    hmac_path.display()
                ))
            })?,
            None if existing.is_some() => return Err(missing_subject_key(&hmac_path, &signing_path)),
            None => {
                // Written before the signing key, so that a first start cut
                // short in between is still a first start when run again.
                let mut secret = [0u8; 32];
                OsRng.fill_bytes(&mut secret);
                let text = format!("{}\n", hex::encode(secret));
                match write_new_private(&hmac_path, text.as_bytes())? {
                    Created::Yes => secret,
                    Created::AlreadyThere => return LogKeys::load_or_create(data_dir),
                }
            }
        };

        let signing = match existing {
            Some(key) => key,
            None => {
                let key = SigningKey::generate(&mut OsRng);
                let pem = key
                    .to_pkcs8_pem(LineEnding::LF)
                    .map_err(|e| AuditError::Keys(format!("cannot encode a new signing key: {e}")))?;
                match write_new_private(&signing_path, pem.as_bytes())? {
                    Created::Yes => key,
                    // Another process created it between our read and write: use theirs.
                    Created::AlreadyThere => return LogKeys::load_or_create(data_dir),
                }
            }
        };
        let mut keys = LogKeys::from_parts(signing.to_bytes(), secret)?;
        keys.data_dir = Some(data_dir.to_path_buf());
        Ok(keys)
    }

    /// Keys from raw material: a 32-byte Ed25519 seed and a 32-byte HMAC secret.
    pub fn from_parts(signing_seed: [u8; 32], hmac_secret: [u8; 32]) -> Result<LogKeys, AuditError> {
        let signing = SigningKey::from_bytes(&signing_seed);
        let hmac = HmacSha256::new_from_slice(&hmac_secret)
            .map_err(|e| AuditError::Keys(format!("unusable subject hmac secret: {e}")))?;
        let verifying = signing.verifying_key();
        let public_key_pem = verifying
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| AuditError::Keys(format!("cannot encode the public key: {e}")))?;
        let mut fingerprint = Sha256::new();
        fingerprint.update(b"lienthong subject-hmac.key fingerprint v1\0");
        fingerprint.update(hmac_secret);
        Ok(LogKeys {
            log_id: log_id_of(&verifying.to_bytes()),
            signing,
            hmac,
            subject_fingerprint: hex::encode(fingerprint.finalize()),
            public_key_pem,
            data_dir: None,
        })
    }

    /// Fresh random keys held in memory only (tests, benchmarks, throwaway demos).
    pub fn generate() -> Result<LogKeys, AuditError> {
        let mut seed = [0u8; 32];
        let mut secret = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        OsRng.fill_bytes(&mut secret);
        LogKeys::from_parts(seed, secret)
    }

    /// Log id: hex SHA-256 of the raw public key.
    pub fn log_id(&self) -> String {
        self.log_id.clone()
    }

    /// Raw Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The file pinning the newest head signed with these keys
    /// ([`PINNED_HEAD_FILE`] beside the signing key); `None` for keys held in
    /// memory only, whose log is not pinned.
    pub fn pinned_head_path(&self) -> Option<PathBuf> {
        self.data_dir.as_ref().map(|dir| dir.join(PINNED_HEAD_FILE))
    }

    /// Public key as SPKI PEM (`-----BEGIN PUBLIC KEY-----`), for auditors.
    pub fn public_key_pem(&self) -> String {
        self.public_key_pem.clone()
    }

    /// Names the subject secret without revealing it: equal for replicas that
    /// share `subject-hmac.key`, different otherwise.
    pub fn subject_key_fingerprint(&self) -> &str {
        &self.subject_fingerprint
    }

    /// Pseudonym of a subject key: hex HMAC-SHA-256 under the log's secret.
    pub fn subject_hash(&self, subject_key: &str) -> String {
        let mut mac = self.hmac.clone();
        mac.update(subject_key.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Signs the tree head (`tree_size`, `root`) at `timestamp_ms`.
    pub fn sign_tree_head(&self, tree_size: u64, root: &Hash, timestamp_ms: u64) -> SignedTreeHead {
        let input = signing_input(&self.log_id, tree_size, timestamp_ms, root);
        let signature = self.signing.sign(&input);
        SignedTreeHead {
            log_id: self.log_id.clone(),
            tree_size,
            root_hash: *root,
            timestamp_ms,
            signature: signature.to_bytes().to_vec(),
        }
    }
}

/// Log id of a raw Ed25519 public key: hex SHA-256 of its 32 bytes.
pub fn log_id_of(public_key: &[u8; 32]) -> String {
    hex::encode(Sha256::digest(public_key))
}

/// The SPKI PEM of a raw Ed25519 public key (as the database keeps every
/// log's); `InvalidArgument` when the bytes are not one.
pub fn public_key_pem_of(public_key: &[u8]) -> Result<String, AuditError> {
    let raw: [u8; 32] = public_key.try_into().map_err(|_| {
        AuditError::InvalidArgument(format!(
            "a public key of {} bytes is not an ed25519 key (32 bytes)",
            public_key.len()
        ))
    })?;
    VerifyingKey::from_bytes(&raw)
        .map_err(|_| AuditError::InvalidArgument("public key is not a valid ed25519 point".into()))?
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| AuditError::InvalidArgument(format!("cannot encode the public key: {e}")))
}

/// Reads an auditor's copy of the public key: SPKI PEM, or 64 hex digits.
pub fn parse_public_key(text: &str) -> Result<[u8; 32], AuditError> {
    let trimmed = text.trim();
    if trimmed.starts_with("-----BEGIN") {
        let key = VerifyingKey::from_public_key_pem(trimmed)
            .map_err(|e| AuditError::InvalidArgument(format!("public key is not an ed25519 spki pem: {e}")))?;
        return Ok(key.to_bytes());
    }
    let bytes = hex::decode(trimmed)
        .map_err(|_| AuditError::InvalidArgument("public key is neither pem nor 64 hex digits".into()))?;
    let raw: [u8; 32] = bytes
        .try_into()
        .map_err(|_| AuditError::InvalidArgument("hex public key must be 32 bytes (64 hex digits)".into()))?;
    VerifyingKey::from_bytes(&raw)
        .map_err(|_| AuditError::InvalidArgument("public key is not a valid ed25519 point".into()))?;
    Ok(raw)
}

fn parse_secret(text: &str) -> Option<[u8; 32]> {
    hex::decode(text.trim()).ok()?.try_into().ok()
}

/// Reads a private key file, `None` if it does not exist. Refuses files that
/// group or others could access: a leaked signing key lets anyone forge heads,
/// and the broker makes these files itself, so nobody else needs them (the
/// TLS key's rule, stricter on the group).
fn read_private(path: &Path) -> Result<Option<String>, AuditError> {
    match lienthong_tls::read_private_key(path, GroupAccess::Refuse) {
        Ok(text) => Ok(Some(text)),
        Err(KeyFileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AuditError::Keys(e.to_string())),
    }
}

enum Created {
    Yes,
    AlreadyThere,
}

/// Creates `path` with mode 0600 and writes `contents`, never overwriting.
fn write_new_private(path: &Path, contents: &[u8]) -> Result<Created, AuditError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = match options.open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(Created::AlreadyThere),
        Err(e) => return Err(AuditError::Keys(format!("cannot create {}: {e}", path.display()))),
    };
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    if let Err(e) = written {
        // A half-written key would be refused as malformed on the next start.
        let _ = std::fs::remove_file(path);
        return Err(AuditError::Keys(format!("cannot write {}: {e}", path.display())));
    }
    tracing::info!(file = %path.display(), "created audit key file");
    Ok(Created::Yes)
}

/// The refusal to start when the subject secret of an existing log is gone:
/// a new one would make every earlier entry unfindable by its subject.
fn missing_subject_key(hmac_path: &Path, signing_path: &Path) -> AuditError {
    AuditError::Keys(format!(
        "{hmac} is missing, but {signing} exists: this data directory holds an audit log whose \
         subjects are pseudonymised with that secret, and a new one would hide every earlier access \
         from citizens' history queries. Restore {SUBJECT_KEY_FILE} (mode 0600) from this data \
         directory's backup or, on a replica, copy it from the first replica's data_dir (every \
         replica shares it). Only if this directory never logged anything, remove {signing} as \
         well to start a new log with a new secret",
        hmac = hmac_path.display(),
        signing = signing_path.display(),
    ))
}

/// Paths of the key files under `data_dir`, for operators and backups.
pub fn key_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    (data_dir.join(SIGNING_KEY_FILE), data_dir.join(SUBJECT_KEY_FILE))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_private_files_and_reloads_the_same_keys() {
        let dir = tempfile::tempdir().unwrap();
        let first = LogKeys::load_or_create(dir.path()).unwrap();
        let (signing, hmac) = key_paths(dir.path());
        #[cfg(unix)]
        {
            assert_eq!(mode(&signing), 0o600);
            assert_eq!(mode(&hmac), 0o600);
        }
        assert!(
            std::fs::read_to_string(&signing)
                .unwrap()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        let second = LogKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(first.log_id(), second.log_id());
        assert_eq!(first.public_key(), second.public_key());
        assert_eq!(first.subject_hash("38001085718"), second.subject_hash("38001085718"));
        assert_eq!(first.log_id(), log_id_of(&first.public_key()));
        assert_eq!(first.log_id().len(), 64);
    }

    #[cfg(unix)]
    #[test]
    fn refuses_key_files_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        LogKeys::load_or_create(dir.path()).unwrap();
        let (signing, hmac) = key_paths(dir.path());
        // The broker makes these files itself: unlike a TLS key, mounted from a
        // Kubernetes Secret, not even the group may read them.
        for path in [&signing, &hmac] {
            for mode in [0o640, 0o604, 0o644] {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
                let err = LogKeys::load_or_create(dir.path()).unwrap_err().to_string();
                assert!(err.contains(path.file_name().unwrap().to_str().unwrap()), "{err}");
                assert!(err.contains(&format!("{mode:04o}")), "{err}");
                assert!(err.contains("chmod 600"), "{err}");
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        LogKeys::load_or_create(dir.path()).unwrap();
    }

    #[test]
    fn refuses_malformed_key_files_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        LogKeys::load_or_create(dir.path()).unwrap();
        let (signing, hmac) = key_paths(dir.path());

        std::fs::write(&hmac, "not hex\n").unwrap();
        let err = LogKeys::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains(SUBJECT_KEY_FILE), "{err}");
        assert!(!err.contains("not hex"), "file contents must not be echoed: {err}");

        std::fs::write(
            &signing,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = LogKeys::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains(SIGNING_KEY_FILE), "{err}");
    }

    /// An existing log's subject secret is never replaced behind the
    /// operator's back: the broker refuses to start, naming the file and
    /// where to restore it from, and leaves the directory as it was.
    #[test]
    fn a_missing_subject_secret_beside_a_signing_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = LogKeys::load_or_create(dir.path()).unwrap();
        let (signing, hmac) = key_paths(dir.path());
        let secret = std::fs::read(&hmac).unwrap();
        std::fs::remove_file(&hmac).unwrap();

        let err = LogKeys::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, AuditError::Keys(_)), "{err:?}");
        let err = err.to_string();
        assert!(
            err.contains(&hmac.display().to_string()),
            "names the missing file: {err}"
        );
        assert!(
            err.contains(&signing.display().to_string()),
            "names the signing key: {err}"
        );
        assert!(
            err.contains("backup") && err.contains("first replica's data_dir"),
            "{err}"
        );
        assert!(!hmac.exists(), "no new secret was made");

        std::fs::write(&hmac, &secret).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&hmac, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let restored = LogKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(restored.log_id(), first.log_id());
        assert_eq!(restored.subject_hash("38001085718"), first.subject_hash("38001085718"));
    }

    /// A first start makes both files; a new replica, whose data directory
    /// holds only the shared secret copied in, makes its own signing key and
    /// keeps that secret.
    #[test]
    fn a_first_start_makes_both_keys_and_a_new_replica_keeps_the_shared_secret() {
        let dir = tempfile::tempdir().unwrap();
        let (signing, hmac) = key_paths(dir.path());
        let first = LogKeys::load_or_create(dir.path()).unwrap();
        assert!(signing.exists() && hmac.exists());

        let replica = tempfile::tempdir().unwrap();
        let (replica_signing, replica_hmac) = key_paths(replica.path());
        std::fs::copy(&hmac, &replica_hmac).unwrap();
        let second = LogKeys::load_or_create(replica.path()).unwrap();
        assert!(replica_signing.exists());
        assert_ne!(second.log_id(), first.log_id(), "a replica has a key of its own");
        assert_eq!(second.subject_hash("38001085718"), first.subject_hash("38001085718"));
        assert_eq!(std::fs::read(&replica_hmac).unwrap(), std::fs::read(&hmac).unwrap());
    }

    #[test]
    fn subject_hash_is_keyed_and_deterministic() {
        let a = LogKeys::from_parts([1; 32], [2; 32]).unwrap();
        let a2 = LogKeys::from_parts([9; 32], [2; 32]).unwrap();
        let b = LogKeys::from_parts([1; 32], [3; 32]).unwrap();
        let h = a.subject_hash("38001085718");
        assert_eq!(h.len(), 64);
        assert_eq!(h, a.subject_hash("38001085718"));
        assert_eq!(h, a2.subject_hash("38001085718"), "the hash depends on the secret only");
        assert_ne!(h, b.subject_hash("38001085718"));
        assert_ne!(h, a.subject_hash("38001085719"));
        // RFC 4231 test case 2 pins the construction to standard HMAC-SHA-256:
        // HMAC zero-pads short keys, so "Jefe" padded to 32 bytes is the same key.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let rfc = LogKeys::from_parts([1; 32], key).unwrap();
        assert_eq!(
            rfc.subject_hash("what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// Replicas sharing the secret share its fingerprint, whatever their
    /// signing keys; another secret has another; neither is the secret.
    #[test]
    fn the_subject_fingerprint_names_the_secret_only() {
        let a = LogKeys::from_parts([1; 32], [2; 32]).unwrap();
        let replica = LogKeys::from_parts([9; 32], [2; 32]).unwrap();
        let other = LogKeys::from_parts([1; 32], [3; 32]).unwrap();
        assert_eq!(a.subject_key_fingerprint(), replica.subject_key_fingerprint());
        assert_ne!(a.subject_key_fingerprint(), other.subject_key_fingerprint());
        assert_eq!(a.subject_key_fingerprint().len(), 64);
        assert_ne!(a.subject_key_fingerprint(), hex::encode([2u8; 32]));
    }

    #[test]
    fn debug_output_hides_secrets() {
        let keys = LogKeys::from_parts([7; 32], [8; 32]).unwrap();
        let debug = format!("{keys:?}");
        assert!(debug.contains(&keys.log_id()));
        assert!(!debug.contains(&hex::encode([7u8; 32])));
        assert!(!debug.contains(&hex::encode([8u8; 32])));
    }

    #[test]
    fn public_key_round_trips_through_pem_and_hex() {
        let keys = LogKeys::generate().unwrap();
        assert_eq!(parse_public_key(&keys.public_key_pem()).unwrap(), keys.public_key());
        assert_eq!(
            parse_public_key(&hex::encode(keys.public_key())).unwrap(),
            keys.public_key()
        );
        assert_eq!(public_key_pem_of(&keys.public_key()).unwrap(), keys.public_key_pem());
        assert!(public_key_pem_of(&[7; 31]).is_err());
        assert!(parse_public_key("abcd").is_err());
        assert!(parse_public_key("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----").is_err());
    }
}
