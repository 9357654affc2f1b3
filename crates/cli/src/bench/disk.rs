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
            filesystem: filesystem_of(dir),
            fdatasync_p50_us: h.value_at_quantile(0.5),
            fdatasync_p99_us: h.value_at_quantile(0.99),
            samples,
        })
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// The file system `dir` lives on, from `/proc/self/mountinfo` and, for
/// ext4, the mount's options in `/proc/fs/ext4` (a journalled ext4 lists its
/// `data=` mode there; one without a journal has none).
fn filesystem_of(dir: &Path) -> Option<String> {
    let dir = dir.canonicalize().ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (fstype, source) = mount_of(&mountinfo, &dir.to_string_lossy())?;
    if fstype != "ext4" {
        return Some(fstype);
    }
    let device = Path::new(&source).file_name()?.to_string_lossy().into_owned();
    Some(
        match std::fs::read_to_string(format!("/proc/fs/ext4/{device}/options")) {
            Ok(options) => ext4_journal(&options),
            Err(_) => fstype,
        },
    )
}

/// The type and source of the mount `path` (absolute, canonical) is on: the
/// mount point that is the longest prefix of it, the later mount winning
/// among equals (it hides the earlier one).
fn mount_of(mountinfo: &str, path: &str) -> Option<(String, String)> {
    let mut best: Option<(usize, String, String)> = None;
    for line in mountinfo.lines() {
        // `id parent major:minor root mount-point options [optional...] - type source super-options`
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            continue;
        };
        let Some(point) = left.split(' ').nth(4).map(unescape) else {
            continue;
        };
        let mut right = right.split(' ');
        let (Some(fstype), Some(source)) = (right.next(), right.next()) else {
            continue;
        };
        let inside = point == "/"
            || path == point
            || path
                .strip_prefix(point.as_str())
                .is_some_and(|rest| rest.starts_with('/'));
        if inside && best.as_ref().is_none_or(|(len, _, _)| point.len() >= *len) {
            best = Some((point.len(), fstype.to_string(), unescape(source)));
        }
    }
    best.map(|(_, fstype, source)| (fstype, source))
}

/// `mountinfo` writes a space, tab, newline and backslash in a path as octal
/// escapes (`\040`).
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Whether an ext4 mount keeps a journal, from its `/proc/fs/ext4/*/options`.
fn ext4_journal(options: &str) -> String {
    match options.split_whitespace().find_map(|o| o.strip_prefix("data=")) {
        Some(mode) => format!("ext4, journal data={mode}"),
        None => "ext4, no journal".to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const MOUNTINFO: &str = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
23 22 0:21 / /proc rw,nosuid - proc proc rw
24 22 0:22 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24684096k
25 22 7:0 / /mnt/j rw,relatime - ext4 /dev/loop0 rw
26 22 7:1 / /mnt/with\\040space rw - xfs /dev/loop1 rw
27 25 7:2 / /mnt/j rw,relatime - btrfs /dev/loop2 rw
";

    #[test]
    fn a_path_is_on_the_mount_whose_point_is_its_longest_prefix() {
        let on = |p: &str| mount_of(MOUNTINFO, p).map(|(t, s)| format!("{t} {s}"));
        assert_eq!(on("/tmp/bench/broker-data").as_deref(), Some("ext4 /dev/vda"));
        assert_eq!(on("/dev/shm/x").as_deref(), Some("tmpfs tmpfs"));
        assert_eq!(
            on("/dev/shmem").as_deref(),
            Some("ext4 /dev/vda"),
            "a prefix of the name is not a parent"
        );
        assert_eq!(
            on("/mnt/j/data").as_deref(),
            Some("btrfs /dev/loop2"),
            "the later mount on a point hides the earlier"
        );
        assert_eq!(on("/mnt/with space/db").as_deref(), Some("xfs /dev/loop1"));
        assert_eq!(on("/").as_deref(), Some("ext4 /dev/vda"));
        assert_eq!(mount_of("garbage\n", "/x"), None);
    }

    #[test]
    fn an_ext4_mount_lists_a_data_mode_only_with_a_journal() {
        assert_eq!(
            ext4_journal("rw bsddf delalloc journal_checksum barrier data=ordered commit=5"),
            "ext4, journal data=ordered"
        );
        assert_eq!(
            ext4_journal("rw bsddf delalloc nojournal_checksum barrier commit=5"),
            "ext4, no journal"
        );
    }

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
