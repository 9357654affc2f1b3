//! What a database directory sits on, as the kernel reports it.
//!
//! An audit entry counts as durable once its commit is synced. That holds only
//! if the file system keeps the file across a restart of the machine, which a
//! memory-backed one (`tmpfs`, `ramfs`) does not. And whether an ext4 mount
//! keeps a journal changes what each sync costs.

use std::fmt;
use std::path::Path;

/// The file system a directory is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSystem {
    /// Its type as the kernel names it (`ext4`, `xfs`, `tmpfs`).
    pub kind: String,
    /// For ext4, whether it keeps a journal; `Unknown` for other types.
    pub journal: Journal,
}

/// Whether an ext4 file system keeps a journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Journal {
    /// A journal, with its data mode (`ordered`, `writeback`, `journal`).
    Data(String),
    /// No journal.
    None,
    /// Not ext4, or `/proc` did not say.
    Unknown,
}

impl FileSystem {
    /// True when files there live in memory and are gone after the machine
    /// restarts, however often they are synced.
    pub fn volatile(&self) -> bool {
        matches!(self.kind.as_str(), "tmpfs" | "ramfs")
    }
}

impl fmt::Display for FileSystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.journal {
            Journal::Data(mode) => write!(f, "{}, journal data={mode}", self.kind),
            Journal::None => write!(f, "{}, no journal", self.kind),
            Journal::Unknown => f.write_str(&self.kind),
        }
    }
}

/// The file system `dir` (which must exist) is on, from `/proc/self/mountinfo`
/// and, for ext4, the mount's options in `/proc/fs/ext4` (a journalled ext4
/// lists its `data=` mode there; one without a journal has none). `None`
/// where `/proc` does not tell.
pub fn file_system(dir: &Path) -> Option<FileSystem> {
    let dir = dir.canonicalize().ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (kind, source) = mount_of(&mountinfo, &dir.to_string_lossy())?;
    let journal = if kind == "ext4" {
        Path::new(&source)
            .file_name()
            .and_then(|device| std::fs::read_to_string(Path::new("/proc/fs/ext4").join(device).join("options")).ok())
            .map_or(Journal::Unknown, |options| ext4_journal(&options))
    } else {
        Journal::Unknown
    };
    Some(FileSystem { kind, journal })
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
        let (Some(kind), Some(source)) = (right.next(), right.next()) else {
            continue;
        };
        let inside = point == "/"
            || path == point
            || path
                .strip_prefix(point.as_str())
                .is_some_and(|rest| rest.starts_with('/'));
        if inside && best.as_ref().is_none_or(|(len, _, _)| point.len() >= *len) {
            best = Some((point.len(), kind.to_string(), unescape(source)));
        }
    }
    best.map(|(_, kind, source)| (kind, source))
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
fn ext4_journal(options: &str) -> Journal {
    match options.split_whitespace().find_map(|o| o.strip_prefix("data=")) {
        Some(mode) => Journal::Data(mode.to_string()),
        None => Journal::None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

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
        let journalled = ext4_journal("rw bsddf delalloc journal_checksum barrier data=ordered commit=5");
        assert_eq!(journalled, Journal::Data("ordered".into()));
        assert_eq!(
            ext4_journal("rw bsddf delalloc nojournal_checksum barrier commit=5"),
            Journal::None
        );
        let fs = |kind: &str, journal| FileSystem {
            kind: kind.into(),
            journal,
        };
        assert_eq!(fs("ext4", journalled).to_string(), "ext4, journal data=ordered");
        assert_eq!(fs("ext4", Journal::None).to_string(), "ext4, no journal");
        assert_eq!(fs("xfs", Journal::Unknown).to_string(), "xfs");
    }

    #[test]
    fn only_memory_backed_file_systems_are_volatile() {
        let fs = |kind: &str| FileSystem {
            kind: kind.into(),
            journal: Journal::Unknown,
        };
        assert!(fs("tmpfs").volatile() && fs("ramfs").volatile());
        assert!(!fs("ext4").volatile() && !fs("xfs").volatile() && !fs("zfs").volatile());
    }

    #[test]
    fn the_kernel_names_the_file_system_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let fs = file_system(dir.path()).unwrap();
        assert!(!fs.kind.is_empty());
        // Wherever the machine mounts a tmpfs at /dev/shm, it is found volatile.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        if mounts.lines().any(|l| l.starts_with("tmpfs /dev/shm ")) {
            assert!(file_system(Path::new("/dev/shm")).unwrap().volatile());
        }
        assert_eq!(file_system(&dir.path().join("missing")), None);
    }
}
