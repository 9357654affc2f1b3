//! The newest tree head this broker signed, pinned in a file beside its
//! signing key ([`PINNED_HEAD_FILE`]).
//!
//! Whoever can write only the database (a DBA, a restored backup) can drop
//! signed heads, or drop and rewrite entries and make the tree nodes agree
//! again; the broker would then open cleanly and sign a second history under
//! the same log id. The data directory is out of that reach, and a head in
//! it cannot be forged without the signing key, so a log opens only on a
//! database whose history contains the pinned head.
//!
//! The file also says whether the broker closed the log with that head
//! (`"state": "closed"`) or has it open (`"open"`, written at every start):
//! after a close, entries past the pinned head were appended behind the
//! broker's back, and signing them would vouch for accesses nobody made.

use crate::keys::{PINNED_HEAD_FILE, SIGNING_KEY_FILE, log_id_of};
use crate::log::AuditError;
use crate::sth::{SignedTreeHead, verify_tree_head};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// What the pin file holds.
#[derive(Debug)]
pub(crate) enum Pinned {
    /// No file: a first start, or the first start after an upgrade from a
    /// version that kept none.
    Missing,
    /// A head of another log: the signing key was replaced, which starts a
    /// new log.
    OtherLog(SignedTreeHead),
    /// A head of this log, its signature checked.
    Head {
        /// The newest head the broker signed.
        head: SignedTreeHead,
        /// Whether the broker closed the log with it: it then appended
        /// nothing past it.
        closed: bool,
    },
}

/// Whether a broker has the log open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogState {
    /// The broker has the log open, or stopped without closing it (a crash):
    /// entries committed after the pinned head may follow it.
    Open,
    /// The broker closed the log with the pinned head as its final one.
    Closed,
}

/// The file's contents: the head's own fields, and the state beside them.
#[derive(Debug, Serialize, Deserialize)]
struct PinFile {
    #[serde(flatten)]
    head: SignedTreeHead,
    /// Missing in files written before it was kept: read as open, which
    /// refuses nothing a crash could have left.
    #[serde(default)]
    state: Option<LogState>,
}

/// Reads the pin at `path` for the log of `public_key`.
///
/// The signature is checked here so that a damaged file is reported as
/// damaged, never mistaken for (or taken as proof of) a rollback.
pub(crate) fn read(path: &Path, public_key: &[u8; 32]) -> Result<Pinned, AuditError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Pinned::Missing),
        Err(e) => return Err(unusable(path, &format!("cannot be read: {e}"))),
    };
    let file: PinFile = serde_json::from_str(&text).map_err(|e| {
        // The position, not serde's text, which may quote the file.
        unusable(
            path,
            &format!(
                "is not a signed tree head ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ),
        )
    })?;
    let PinFile { head, state } = file;
    if head.log_id != log_id_of(public_key) {
        return Ok(Pinned::OtherLog(head));
    }
    verify_tree_head(&head, public_key).map_err(|_| {
        unusable(
            path,
            &format!(
                "holds a head of {} entries of this log whose signature does not verify with the log's key",
                head.tree_size
            ),
        )
    })?;
    Ok(Pinned::Head {
        head,
        closed: state == Some(LogState::Closed),
    })
}

/// Replaces the pin at `path` with `head` and `state`, durably: a crash
/// leaves the old pin or the new one, never a torn file.
pub(crate) fn write(path: &Path, head: &SignedTreeHead, state: LogState) -> Result<(), AuditError> {
    let failed = |what: &str, e: std::io::Error| AuditError::Pin(format!("cannot {what} {}: {e}", path.display()));
    let file = PinFile {
        head: head.clone(),
        state: Some(state),
    };
    let mut json = serde_json::to_vec_pretty(&file)
        .map_err(|e| AuditError::Pin(format!("cannot encode the head to pin in {}: {e}", path.display())))?;
    json.push(b'\n');
    let temp = temp_path(path);
    // A temporary file left by a crash may have been made by someone else
    // with a wider mode, which opening it would keep.
    match std::fs::remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed("remove the leftover", e)),
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&temp).map_err(|e| failed("create", e))?;
    let written = file.write_all(&json).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(failed("write", e));
    }
    std::fs::rename(&temp, path).map_err(|e| failed("replace", e))?;
    sync_dir(path).map_err(|e| failed("sync the directory of", e))
}

/// [`write`] off the async runtime's threads: it waits for two fsyncs.
pub(crate) async fn write_async(path: &Path, head: &SignedTreeHead, state: LogState) -> Result<(), AuditError> {
    let (owned, head) = (path.to_path_buf(), head.clone());
    tokio::task::spawn_blocking(move || write(&owned, &head, state))
        .await
        .map_err(|e| AuditError::Pin(format!("writing {} did not finish: {e}", path.display())))?
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Makes the rename durable: it lives in the directory, not in the file.
#[cfg(unix)]
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// The refusal to start on a pin file that cannot be read or checked.
fn unusable(path: &Path, what: &str) -> AuditError {
    AuditError::Pin(format!(
        "{path} {what}. It records the newest tree head this broker signed, which every start checks the \
         database against; a damaged file says nothing about the database. Restore {PINNED_HEAD_FILE} from \
         this data directory's backup. Only if there is none, remove it: the broker then pins the database's \
         newest head as it finds it, and cannot tell whether the database was rolled back before",
        path = path.display(),
    ))
}

/// The refusal to start on a database whose newest head is older than the
/// pinned one: signed heads, and perhaps the entries under them, are gone.
pub(crate) fn rolled_back(path: &Path, pinned: &SignedTreeHead, latest: Option<&SignedTreeHead>) -> AuditError {
    let found = match latest {
        Some(head) => format!("the database's newest head covers only {} entries", head.tree_size),
        None => "the database holds no signed head of it".to_string(),
    };
    AuditError::RolledBack(format!(
        "log {log_id}: this broker signed a head of {size} entries ({pinned}), but {found}. {remedy}",
        log_id = pinned.log_id,
        size = pinned.tree_size,
        pinned = describe(path, pinned),
        remedy = remedy(path, pinned),
    ))
}

/// The refusal to start on a database whose entries up to the pinned size
/// no longer hash to the pinned root: they were rewritten.
pub(crate) fn rewritten(
    path: &Path,
    pinned: &SignedTreeHead,
    latest: Option<&SignedTreeHead>,
    stored_root: &[u8; 32],
) -> AuditError {
    AuditError::RolledBack(format!(
        "log {log_id}: the database's entries 0..{size} hash to the root {stored}, not to the root this broker \
         signed for them ({pinned}); the database's newest head covers {newest} entries. {remedy}",
        log_id = pinned.log_id,
        size = pinned.tree_size,
        stored = hex::encode(stored_root),
        pinned = describe(path, pinned),
        newest = latest.map_or(0, |h| h.tree_size),
        remedy = remedy(path, pinned),
    ))
}

/// The refusal to start on a database holding entries past the head the
/// broker closed the log with: they were appended while it was stopped,
/// by something else than the broker, and no signature may cover them.
pub(crate) fn appended_while_closed(path: &Path, pinned: &SignedTreeHead, size: u64) -> AuditError {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.display().to_string(),
        _ => "the data directory".to_string(),
    };
    AuditError::AppendedWhileClosed(format!(
        "log {log_id}: this broker closed the log with a head of {signed} entries ({pinned}), but the database \
         now holds {size} entries: entries {signed}..{size} were appended while the broker was stopped, not by \
         it. Signing a head over them would vouch for accesses the broker never logged. Find out who wrote them \
         (the audit_entries rows of this log from sequence {signed} on, and audit_logs.size), then restore the \
         database from a backup taken when the broker stopped, or remove those rows and set the log's size back \
         to {signed}. Only if a broker with this data directory ({dir}) did write them, start it with \
         \"state\": \"open\" in {file}: it then checks those entries before signing them",
        log_id = pinned.log_id,
        signed = pinned.tree_size,
        pinned = describe(path, pinned),
        file = path.display(),
    ))
}

fn describe(path: &Path, head: &SignedTreeHead) -> String {
    let at = i128::from(head.timestamp_ms) * 1_000_000;
    let time = OffsetDateTime::from_unix_timestamp_nanos(at)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{} ms after the epoch", head.timestamp_ms));
    format!(
        "root {}, signed at {time}, pinned in {}",
        hex::encode(head.root_hash),
        path.display()
    )
}

fn remedy(path: &Path, pinned: &SignedTreeHead) -> String {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.display().to_string(),
        _ => "the data directory".to_string(),
    };
    format!(
        "Signing on top of this database would give the log a second, different history under the same id. \
         Restore the database from a backup taken at or after that head and start the broker again. If there \
         is none, move {SIGNING_KEY_FILE} and {PINNED_HEAD_FILE} out of {dir} (keep them) so that the broker \
         starts a new log with a new key, and tell the auditors that log {log_id} ended at {size} entries",
        log_id = pinned.log_id,
        size = pinned.tree_size,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::keys::LogKeys;

    #[test]
    fn a_written_pin_reads_back_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PINNED_HEAD_FILE);
        let keys = LogKeys::generate().unwrap();
        assert!(matches!(read(&path, &keys.public_key()).unwrap(), Pinned::Missing));

        let first = keys.sign_tree_head(3, &[1; 32], 10);
        write(&path, &first, LogState::Closed).unwrap();
        let second = keys.sign_tree_head(5, &[2; 32], 20);
        write(&path, &second, LogState::Open).unwrap();
        match read(&path, &keys.public_key()).unwrap() {
            Pinned::Head { head, closed } => assert_eq!((head, closed), (second.clone(), false)),
            other => panic!("{other:?}"),
        }
        write(&path, &second, LogState::Closed).unwrap();
        match read(&path, &keys.public_key()).unwrap() {
            Pinned::Head { head, closed } => assert_eq!((head, closed), (second.clone(), true)),
            other => panic!("{other:?}"),
        }
        assert!(!temp_path(&path).exists(), "no temporary file is left");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }

        let stranger = LogKeys::generate().unwrap();
        assert!(matches!(
            read(&path, &stranger.public_key()).unwrap(),
            Pinned::OtherLog(head) if head == second
        ));
    }

    #[cfg(unix)]
    #[test]
    fn a_leftover_temporary_file_does_not_lend_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PINNED_HEAD_FILE);
        let temp = temp_path(&path);
        std::fs::write(&temp, "half a head").unwrap();
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o644)).unwrap();
        let keys = LogKeys::generate().unwrap();
        write(&path, &keys.sign_tree_head(1, &[1; 32], 1), LogState::Open).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_forged_or_damaged_pin_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PINNED_HEAD_FILE);
        let keys = LogKeys::generate().unwrap();
        let mut forged = keys.sign_tree_head(9, &[4; 32], 30);
        forged.tree_size = 2;
        write(&path, &forged, LogState::Open).unwrap();
        let err = read(&path, &keys.public_key()).unwrap_err();
        assert!(matches!(err, AuditError::Pin(_)), "{err:?}");
        let err = err.to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("signature does not verify"), "{err}");

        std::fs::write(&path, "{\"log_id\": \"38001085718\"").unwrap();
        let err = read(&path, &keys.public_key()).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(!err.contains("38001085718"), "the file is not quoted: {err}");
    }

    /// A file written before the state was kept is read as open: a crash
    /// may have left entries past its head.
    #[test]
    fn a_pin_without_a_state_reads_as_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PINNED_HEAD_FILE);
        let keys = LogKeys::generate().unwrap();
        let head = keys.sign_tree_head(4, &[3; 32], 40);
        std::fs::write(&path, serde_json::to_vec(&head).unwrap()).unwrap();
        match read(&path, &keys.public_key()).unwrap() {
            Pinned::Head { head: read, closed } => assert_eq!((read, closed), (head.clone(), false)),
            other => panic!("{other:?}"),
        }
        // And a head reader that knows nothing of the state still reads it.
        write(&path, &head, LogState::Closed).unwrap();
        let plain: SignedTreeHead = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(plain, head);
    }

    #[test]
    fn entries_appended_while_closed_are_refused_saying_what_to_check() {
        let keys = LogKeys::generate().unwrap();
        let path = Path::new("/var/lib/lienthong").join(PINNED_HEAD_FILE);
        let pinned = keys.sign_tree_head(1665, &[7; 32], 1_750_000_000_000);
        let err = appended_while_closed(&path, &pinned, 1666);
        assert!(matches!(err, AuditError::AppendedWhileClosed(_)), "{err:?}");
        let err = err.to_string();
        for needle in [
            keys.log_id().as_str(),
            "head of 1665 entries",
            "holds 1666 entries",
            "entries 1665..1666",
            "not by it",
            "/var/lib/lienthong/audit-head.json",
            "audit_logs.size",
            "backup taken when the broker stopped",
        ] {
            assert!(err.contains(needle), "{needle:?} missing: {err}");
        }
    }

    #[test]
    fn refusals_say_what_happened_and_what_to_do() {
        let keys = LogKeys::generate().unwrap();
        let path = Path::new("/var/lib/lienthong").join(PINNED_HEAD_FILE);
        let pinned = keys.sign_tree_head(350, &[7; 32], 1_750_000_000_000);
        let older = keys.sign_tree_head(300, &[6; 32], 1_749_000_000_000);
        for err in [
            rolled_back(&path, &pinned, Some(&older)),
            rolled_back(&path, &pinned, None),
            rewritten(&path, &pinned, Some(&keys.sign_tree_head(400, &[8; 32], 1)), &[5; 32]),
        ] {
            assert!(matches!(err, AuditError::RolledBack(_)), "{err:?}");
            let err = err.to_string();
            for needle in [
                keys.log_id().as_str(),
                "350",
                "rolled back or rewritten",
                "2025-06-15T15:06:40Z",
                "/var/lib/lienthong/audit-head.json",
                "backup taken at or after that head",
                "move audit-signing.key and audit-head.json out of /var/lib/lienthong",
                "tell the auditors",
            ] {
                assert!(err.contains(needle), "{needle:?} missing: {err}");
            }
        }
        assert!(
            rolled_back(&path, &pinned, Some(&older))
                .to_string()
                .contains("covers only 300 entries")
        );
        let rewritten = rewritten(&path, &pinned, None, &[5; 32]).to_string();
        assert!(rewritten.contains(&hex::encode([5u8; 32])), "{rewritten}");
        assert!(rewritten.contains(&hex::encode([7u8; 32])), "{rewritten}");
    }
}
