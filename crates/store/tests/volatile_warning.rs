//! A SQLite database on a memory-backed file system is allowed (the bench
//! and demos use one) but the operator is told that its audit entries do not
//! survive a restart of the machine. In its own test binary because the
//! capturing subscriber is thread-local and tracing caches per-callsite
//! interest process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lienthong_store::{StoreOptions, file_system, open};
use std::path::Path;
use std::time::Duration;

/// What opening a SQLite store in `dir` logs at `warn`.
async fn warnings_opening_in(dir: &Path) -> String {
    // The subscriber writes into a file of its own, read back afterwards.
    let log = tempfile::NamedTempFile::new().unwrap();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(log.reopen().unwrap())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let options = StoreOptions {
        url: format!("sqlite://{}", dir.join("data/lienthong.db").display()),
        max_connections: 2,
        acquire_timeout: Duration::from_secs(5),
        allow_unverified_postgres: false,
    };
    let store = open(&options).await.unwrap();
    drop(store);
    std::fs::read_to_string(log.path()).unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn a_database_in_memory_backed_storage_is_opened_with_a_warning() {
    let shm = Path::new("/dev/shm");
    if file_system(shm).is_some_and(|fs| fs.volatile()) {
        let dir = tempfile::tempdir_in(shm).unwrap();
        let logged = warnings_opening_in(dir.path()).await;
        assert!(
            logged.contains("memory-backed file system") && logged.contains("tmpfs"),
            "opening on /dev/shm logged: {logged:?}"
        );
        assert!(logged.contains(&dir.path().join("data").display().to_string()));
    }
    let dir = tempfile::tempdir().unwrap();
    if file_system(dir.path()).is_some_and(|fs| !fs.volatile()) {
        let logged = warnings_opening_in(dir.path()).await;
        assert!(
            !logged.contains("memory-backed"),
            "a disk-backed directory is opened quietly: {logged:?}"
        );
    }
}
