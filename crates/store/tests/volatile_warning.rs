//! A SQLite database on a memory-backed file system is allowed (the bench
//! and demos use one) but the operator is told that its audit entries do not
//! survive a restart of the machine. In its own test binary because the
//! capturing subscriber is thread-local and tracing caches per-callsite
//! interest process-wide.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lienthong_store::{StoreOptions, file_system, open};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Collects everything the fmt subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What opening a SQLite store in `dir` logs at `warn`.
async fn warnings_opening_in(dir: &Path) -> String {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let options = StoreOptions {
        url: format!("sqlite://{}", dir.join("data/lienthong.db").display()),
        max_connections: 2,
        acquire_timeout: Duration::from_secs(5),
    };
    let store = open(&options).await.unwrap();
    drop(store);
    String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
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
