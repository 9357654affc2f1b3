//! Private key files on disk: refused when other users can reach them, and
//! written so that a link planted where a key goes cannot redirect it.
//!
//! Reading is shared with the audit log's keys ([`read_private_key`]), so one
//! rule decides what a safe key file is. The checks are Unix-only: elsewhere
//! file modes do not say who may read a file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::TlsError;

/// What a private key file's group may do with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupAccess {
    /// Allowed with a warning: a Kubernetes Secret mounted with `fsGroup` is mode 0440.
    Warn,
    /// Refused like access by others: for keys that nothing but their owner reads.
    Refuse,
}

/// Why a private key file was not read.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Users other than the file's owner (and, where refused, its group) can reach it.
    #[error(
        "refusing private key {}: {whom} can access it (mode {mode:04o}); a private key must be readable by its owner only: run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Exposed {
        /// The file concerned.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Who can reach it besides the owner ("other users", "its group").
        whom: &'static str,
    },
}

/// Reads a private key file, refusing one that users other than its owner can
/// access (any `o+rwx` bit; group bits as `group` says). On Unix only.
///
/// The mode checked is that of the file actually read, so a file swapped in
/// between a check and a read cannot slip through; links are followed, as a
/// Kubernetes Secret volume's files are links.
pub fn read_private_key(path: &Path, group: GroupAccess) -> Result<String, KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    check_mode(path, &file.metadata().map_err(io)?, group)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io)?;
    Ok(text)
}

#[cfg(unix)]
fn check_mode(path: &Path, meta: &std::fs::Metadata, group: GroupAccess) -> Result<(), KeyFileError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    let exposed = |whom| KeyFileError::Exposed {
        path: path.to_owned(),
        mode,
        whom,
    };
    if mode & 0o007 != 0 {
        return Err(exposed("other users"));
    }
    if mode & 0o070 != 0 {
        match group {
            GroupAccess::Refuse => return Err(exposed("its group")),
            GroupAccess::Warn => tracing::warn!(
                file = %path.display(),
                mode = %format!("{mode:04o}"),
                "private key file is readable by its group: expected for a Kubernetes Secret mounted with \
                 fsGroup, otherwise restrict it with `chmod 600`"
            ),
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_path: &Path, _meta: &std::fs::Metadata, _group: GroupAccess) -> Result<(), KeyFileError> {
    Ok(())
}

/// Creates `dir` (mode 0700, with any missing parents) unless it exists, then
/// refuses it if its group or others may write in it: they could replace the
/// keys written there, or plant links where they are about to be written.
pub(crate) fn prepare_dir(dir: &Path) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io)?;
    check_dir(dir)
}

/// Refuses a directory its group or others may write in (see [`prepare_dir`]).
pub(crate) fn check_dir(dir: &Path) -> Result<(), TlsError> {
    let meta = std::fs::metadata(dir).map_err(|source| TlsError::Io {
        path: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(TlsError::InvalidRequest(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(TlsError::InsecureDirectory {
                path: dir.to_owned(),
                mode,
            });
        }
    }
    Ok(())
}

/// Whether [`write_file`] may replace an existing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Replace {
    /// Replace it (a link there is replaced itself, never followed).
    Yes,
    /// Refuse with [`TlsError::AlreadyExists`] if anything (a dangling link too) is there.
    No,
}

/// Writes `contents` to `path` through a new file in the same directory,
/// created exclusively (`O_EXCL` follows no link) with `mode` from the start
/// and synced, then moved into place, so that the target is either the old
/// file or the whole new one, and a link at `path` cannot send the bytes (or a
/// chmod) elsewhere.
pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32, replace: Replace) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| TlsError::InvalidRequest(format!("{} does not name a file", path.display())))?;
    let (temp, mut file) = create_temp(dir, &name.to_string_lossy(), mode).map_err(io)?;
    let written = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io)
        .and_then(|()| place(&temp, path, replace));
    drop(file);
    if let Err(e) = written {
        // Best effort: the error that matters is the one above.
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    sync_dir(dir);
    Ok(())
}

/// Numbers the temporary files of this process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A new file `dir/.<name>.<pid>-<n>.tmp`, never one that was already there.
fn create_temp(dir: &Path, name: &str, mode: u32) -> std::io::Result<(PathBuf, File)> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    // A name taken (by a leftover of a crash, or a link someone planted) is
    // skipped rather than opened: create_new never reuses an existing entry.
    for _ in 0..16 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!(".{name}.{}-{n}.tmp", std::process::id()));
        match options.open(&temp) {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!("no free temporary file name for {name} in {}", dir.display()),
    ))
}

fn place(temp: &Path, path: &Path, replace: Replace) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    match replace {
        // rename(2) replaces the directory entry, whatever it is: a link at
        // `path` is replaced, its target left alone.
        Replace::Yes => std::fs::rename(temp, path).map_err(io),
        // link(2) fails if anything, even a dangling link, holds the name.
        Replace::No => {
            std::fs::hard_link(temp, path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    TlsError::AlreadyExists { path: path.to_owned() }
                } else {
                    io(e)
                }
            })?;
            std::fs::remove_file(temp).map_err(|source| TlsError::Io {
                path: temp.to_owned(),
                source,
            })
        }
    }
}

/// Makes a rename in `dir` durable. Best effort: the file's contents are
/// already synced, and some filesystems refuse to sync a directory.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Sets `path`'s permission bits, for the tests of the crate's key files.
#[cfg(all(test, unix))]
#[allow(clippy::unwrap_used)]
pub(crate) fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[cfg(unix)]
    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[cfg(unix)]
    #[test]
    fn a_key_others_can_access_is_refused_naming_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("broker.key");
        std::fs::write(&key, "secret").unwrap();
        for mode in [0o644, 0o604, 0o602, 0o601, 0o444] {
            set_mode(&key, mode);
            for group in [GroupAccess::Warn, GroupAccess::Refuse] {
                let err = read_private_key(&key, group).unwrap_err();
                assert!(
                    matches!(
                        err,
                        KeyFileError::Exposed {
                            whom: "other users",
                            ..
                        }
                    ),
                    "{err:?}"
                );
                let text = err.to_string();
                assert!(text.contains(&format!("{mode:04o}")), "{text}");
                assert!(text.contains(&format!("chmod 600 {}", key.display())), "{text}");
                assert!(!text.contains("secret"), "contents are never echoed: {text}");
            }
        }
        set_mode(&key, 0o600);
        assert_eq!(read_private_key(&key, GroupAccess::Refuse).unwrap(), "secret");
        set_mode(&key, 0o400);
        assert_eq!(read_private_key(&key, GroupAccess::Refuse).unwrap(), "secret");
    }

    /// A Kubernetes Secret mounted with fsGroup is 0440 (and a link into
    /// `..data/`): allowed where group access is, refused where it is not.
    #[cfg(unix)]
    #[test]
    fn a_group_readable_key_is_allowed_only_where_the_group_may_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("..data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("broker.key"), "secret").unwrap();
        set_mode(&data.join("broker.key"), 0o440);
        let key = dir.path().join("broker.key");
        std::os::unix::fs::symlink("..data/broker.key", &key).unwrap();
        assert_eq!(read_private_key(&key, GroupAccess::Warn).unwrap(), "secret");
        let err = read_private_key(&key, GroupAccess::Refuse).unwrap_err();
        assert!(
            matches!(err, KeyFileError::Exposed { whom: "its group", .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("0440"), "{err}");
    }

    #[test]
    fn a_missing_key_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("absent.key");
        match read_private_key(&key, GroupAccess::Warn) {
            Err(KeyFileError::Io { path, source }) => {
                assert_eq!(path, key);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
    }

    /// A link planted where a key is about to be written is replaced, and
    /// the file it points at is neither written nor chmod-ed.
    #[cfg(unix)]
    #[test]
    fn writing_replaces_a_planted_link_instead_of_following_it() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, "precious").unwrap();
        set_mode(&victim, 0o644);
        let key = dir.path().join("evil.key");
        std::os::unix::fs::symlink(&victim, &key).unwrap();

        write_file(&key, b"KEY", 0o600, Replace::Yes).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(mode_of(&victim), 0o644);
        assert!(std::fs::symlink_metadata(&key).unwrap().file_type().is_file());
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "KEY");
        assert_eq!(mode_of(&key), 0o600);
        assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
    }

    #[test]
    fn writing_replaces_an_existing_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("m1.key");
        std::fs::write(&key, "an older and much longer key").unwrap();
        write_file(&key, b"new", 0o600, Replace::Yes).unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "new");
        #[cfg(unix)]
        assert_eq!(mode_of(&key), 0o600);
    }

    #[test]
    fn a_file_that_must_be_new_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("ca.key");
        write_file(&key, b"first", 0o600, Replace::No).unwrap();
        let err = write_file(&key, b"second", 0o600, Replace::No).unwrap_err();
        assert!(matches!(err, TlsError::AlreadyExists { .. }), "{err:?}");
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "first");
        assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
    }

    /// Not even a dangling link is written through.
    #[cfg(unix)]
    #[test]
    fn a_file_that_must_be_new_is_not_created_through_a_dangling_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere.key");
        let key = dir.path().join("ca.key");
        std::os::unix::fs::symlink(&target, &key).unwrap();
        let err = write_file(&key, b"KEY", 0o600, Replace::No).unwrap_err();
        assert!(matches!(err, TlsError::AlreadyExists { .. }), "{err:?}");
        assert!(!target.exists());
        assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
    }

    /// A name planted where the temporary file would go is skipped, not opened.
    #[cfg(unix)]
    #[test]
    fn a_planted_temporary_name_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, "precious").unwrap();
        let next = COUNTER.load(Ordering::Relaxed);
        for n in next..next + 4 {
            let name = format!(".m1.key.{}-{n}.tmp", std::process::id());
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
        }
        write_file(&dir.path().join("m1.key"), b"KEY", 0o600, Replace::Yes).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(dir.path().join("m1.key")).unwrap(), "KEY");
    }

    #[cfg(unix)]
    #[test]
    fn a_new_directory_is_private_and_a_shared_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("a/certs");
        prepare_dir(&certs).unwrap();
        assert_eq!(mode_of(&certs), 0o700);
        assert_eq!(mode_of(&dir.path().join("a")), 0o700);

        for mode in [0o775, 0o757, 0o1777, 0o722] {
            set_mode(&certs, mode);
            let err = prepare_dir(&certs).unwrap_err();
            assert!(matches!(err, TlsError::InsecureDirectory { .. }), "{err:?}");
            let text = err.to_string();
            assert!(text.contains(&certs.display().to_string()), "{text}");
            assert!(text.contains(&format!("{mode:04o}")), "{text}");
            assert!(text.contains("chmod go-w"), "{text}");
        }
        // Readable by all is fine: the keys in it are 0600 themselves.
        set_mode(&certs, 0o755);
        prepare_dir(&certs).unwrap();
    }
}
