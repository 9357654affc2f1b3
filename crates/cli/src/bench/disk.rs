//! The disk under a database the bench starts: how long one `fdatasync`
//! takes there, and what file system it is.
//!
//! Every relayed lookup waits for one durable commit, so the sync time bounds
//! the latency an audit entry adds. The file system says how far the figure
//! carries to a server: this development VM's ext4 has no journal, most
//! servers' have one, and there a sync may also commit the journal.

use super::{histogram, micros};
use anyhow::{Context, Result};
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// The file system under a database directory and how fast it syncs.
#[derive(Debug, Serialize)]
pub(super) struct DiskReport {
    pub(super) path: String,
    /// The file system type, and for ext4 whether it keeps a journal
    /// (`ext4, journal data=ordered`, `ext4, no journal`); absent when
    /// `/proc` does not say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) filesystem: Option<String>,
    pub(super) fdatasync_p50_us: u64,
    pub(super) fdatasync_p99_us: u64,
    pub(super) samples: usize,
}

impl DiskReport {
    /// `in DIR (FILESYSTEM)`, for the report's lines about the disk.
    pub(super) fn place(&self) -> String {
        match &self.filesystem {
            Some(fs) => format!("{} ({fs})", self.path),
            None => self.path.clone(),
        }
    }
}

/// Times `samples` 4 KiB appends each followed by `fdatasync`.
pub(super) fn probe_fsync(dir: &Path, samples: usize) -> Result<DiskReport> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("fsync-probe.tmp");
    let result = (|| -> Result<DiskReport> {
        let mut file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let block = [0u8; 4096];
        let mut h = histogram();
        for _ in 0..samples {
            file.write_all(&block)?;
            let started = Instant::now();
            file.sync_data()?;
            h.saturating_record(micros(started.elapsed()));
        }
        Ok(DiskReport {
            path: dir.display().to_string(),
            filesystem: lienthong_store::file_system(dir).map(|fs| fs.to_string()),
            fdatasync_p50_us: h.value_at_quantile(0.5),
            fdatasync_p99_us: h.value_at_quantile(0.99),
            samples,
        })
    })();
    let _ = std::fs::remove_file(&path);
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn fsync_probe_times_every_sample_and_names_the_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let d = probe_fsync(&dir.path().join("data"), 3).unwrap();
        assert_eq!(d.samples, 3);
        assert!(d.fdatasync_p99_us >= d.fdatasync_p50_us && d.fdatasync_p50_us > 0);
        assert!(
            !dir.path().join("data/fsync-probe.tmp").exists(),
            "the probe file is removed"
        );
        let fs = d.filesystem.clone().expect("Linux's /proc names the file system");
        assert!(!fs.is_empty() && d.place().ends_with(&format!("({fs})")));
    }
}
