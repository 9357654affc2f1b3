//! Loading the CA roots, certificate chain and private key from PEM.

use std::path::{Path, PathBuf};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsError;
use crate::keyfile::{GroupAccess, read_private_key};

/// Where a node's TLS files live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The federation CA certificate(s) trusted for peers.
    pub ca: PathBuf,
    /// This node's certificate chain (end entity first).
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// Parsed TLS material: trusted roots, own chain and own key.
pub struct TlsMaterial {
    /// Trust anchors for verifying peers.
    pub roots: Vec<CertificateDer<'static>>,
    /// Own certificate chain, end entity first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Own private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        TlsMaterial {
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is deliberately left out.
        f.debug_struct("TlsMaterial")
            .field("roots", &self.roots.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Reads and parses the three PEM files. A key file other users can access
    /// is refused; a group-readable one is accepted with a warning (see
    /// [`read_private_key`]).
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let material = TlsMaterial {
            roots: certs(&read(&files.ca)?, &files.ca)?,
            chain: certs(&read(&files.cert)?, &files.cert)?,
            key: key(&read_private_key(&files.key, GroupAccess::Warn)?, &files.key)?,
        };
        // rustls would say only `KeyMismatch`, later and naming no file.
        if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
            rustls::sign::CertifiedKey::from_der(
                material.chain.clone(),
                material.key.clone_key(),
                &rustls::crypto::ring::default_provider(),
            )
        {
            return Err(TlsError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            });
        }
        Ok(material)
    }

    /// Parses PEM text held in memory (errors name the part as `<ca>`, `<cert>`, `<key>`).
    pub fn from_pem(ca: &str, cert: &str, key_pem: &str) -> Result<Self, TlsError> {
        Ok(TlsMaterial {
            roots: certs(ca, Path::new("<ca>"))?,
            chain: certs(cert, Path::new("<cert>"))?,
            key: key(key_pem, Path::new("<key>"))?,
        })
    }
}

/// Reads the CA certificates in the PEM file `path` to trust for clients: at least
/// one, each usable as a trust anchor.
pub fn read_trust_anchors(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let roots = certs(&read(path)?, path)?;
    let mut store = rustls::RootCertStore::empty();
    for root in &roots {
        store.add(root.clone()).map_err(|e| TlsError::BadPem {
            path: path.to_owned(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// Every certificate in the PEM file `path`: at least one.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certs(&read(path)?, path)
}

pub(crate) fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

/// All certificates in `pem`; at least one is required.
pub(crate) fn certs(pem: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_pem(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

/// The first private key in `pem`.
pub(crate) fn key(pem: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| bad_pem(path, e))?
        .ok_or_else(|| TlsError::NoKey { path: path.to_owned() })
}

fn bad_pem(path: &Path, e: std::io::Error) -> TlsError {
    TlsError::BadPem {
        path: path.to_owned(),
        reason: format!("malformed PEM: {e}"),
    }
}

// File modes mean nothing elsewhere.
#[cfg(all(test, unix))]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Node files as `lienthong certs` writes them, in a fresh directory.
    fn node_files(dir: &Path) -> TlsFiles {
        crate::init_dir(dir, "gov").unwrap();
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("broker.pem"),
            key: dir.join("broker.key"),
        }
    }

    use crate::keyfile::set_mode;

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = node_files(dir.path());
        TlsMaterial::load(&files).unwrap();
        set_mode(&files.key, 0o644);
        let err = TlsMaterial::load(&files).unwrap_err();
        assert!(
            matches!(err, TlsError::KeyFile(crate::KeyFileError::Exposed { .. })),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains(&files.key.display().to_string()), "{text}");
        assert!(text.contains("chmod 600"), "{text}");
    }

    /// The mode of a Kubernetes Secret mounted with fsGroup.
    #[test]
    fn a_group_readable_key_file_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let files = node_files(dir.path());
        set_mode(&files.key, 0o440);
        TlsMaterial::load(&files).unwrap();
    }

    /// One member's certificate with another's key: the error names both
    /// files, where rustls would say only `KeyMismatch`.
    #[test]
    fn a_key_of_another_certificate_is_named_with_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let files = node_files(dir.path());
        let other = crate::issue_member_in_dir(dir.path(), "someone", &[]).unwrap();
        let mixed = TlsFiles {
            key: other.key.clone(),
            ..files.clone()
        };
        let err = TlsMaterial::load(&mixed).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains(&other.key.display().to_string()) && text.contains(&files.cert.display().to_string()),
            "{text}"
        );
        TlsMaterial::load(&files).unwrap();
    }

    /// Certificates are public: their mode is not checked.
    #[test]
    fn certificate_files_may_be_world_readable() {
        let dir = tempfile::tempdir().unwrap();
        let files = node_files(dir.path());
        set_mode(&files.ca, 0o644);
        set_mode(&files.cert, 0o644);
        TlsMaterial::load(&files).unwrap();
    }
}
