//! What is mounted where, read from `/proc/self/mountinfo`, and a guard that unmounts on drop.
//!
//! We poll mountinfo with a deadline instead of sleeping: a mount is "live" when the kernel lists it.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cmd::cmd;

/// How long a mount or unmount may take to show in mountinfo.
const DEADLINE: Duration = Duration::from_secs(10);

/// One line of mountinfo, the parts we use.
#[derive(Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// The filesystem type, e.g. `overlay`, `fuse.ovlfs`, `tmpfs`.
    pub fs_type: String,
}

/// Every mount this process sees.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_line).collect())
}

/// The mount at `path`, if `path` is a mount point (the topmost one when several are stacked).
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    let path = absolute(path)?;
    Ok(mounts()?.into_iter().rev().find(|entry| entry.mount_point == path))
}

/// Whether anything is mounted at `path`.
pub fn is_mounted(path: &Path) -> Result<bool> {
    Ok(mount_at(path)?.is_some())
}

/// Whether anything is mounted at `dir` or below it.
pub fn has_mounts_under(dir: &Path) -> Result<bool> {
    let dir = absolute(dir)?;
    Ok(mounts()?.iter().any(|entry| entry.mount_point.starts_with(&dir)))
}

/// Detaches whatever is mounted at `dir` or below (deepest first), then removes `dir`, unless
/// something is still mounted there: we never delete through a mount. Warnings, not errors: for
/// scratch dirs on drop.
pub fn detach_and_remove(dir: &Path) {
    let mut points: Vec<PathBuf> =
        mounts().unwrap_or_default().into_iter().map(|m| m.mount_point).filter(|p| p.starts_with(dir)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in &points {
        let _ = std::process::Command::new("umount").arg("-l").arg(p).status();
    }
    if !points.is_empty() {
        // A lazy unmount finishes in the background.
        thread::sleep(Duration::from_millis(100));
    }
    if has_mounts_under(dir).unwrap_or(true) {
        eprintln!("warning: left {} in place: something is still mounted there", dir.display());
    } else if let Err(e) = std::fs::remove_dir_all(dir) {
        eprintln!("warning: could not remove {}: {e}", dir.display());
    }
}

/// Waits until something is mounted at `path`, or fails after the deadline.
pub fn wait_until_mounted(path: &Path) -> Result<MountEntry> {
    let start = Instant::now();
    loop {
        if let Some(entry) = mount_at(path)? {
            return Ok(entry);
        }
        if start.elapsed() > DEADLINE {
            bail!("{} did not show up as mounted within {DEADLINE:?}", path.display());
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// `path` made absolute with its parent resolved, without touching `path` itself: stat on the mount point
/// of a FUSE daemon that died fails with ENOTCONN, and we must still be able to find and unmount it.
fn absolute(path: &Path) -> Result<PathBuf> {
    let path = std::path::absolute(path).with_context(|| format!("making {} absolute", path.display()))?;
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => match parent.canonicalize() {
            Ok(parent) => Ok(parent.join(name)),
            Err(_) => Ok(path),
        },
        _ => Ok(path),
    }
}

/// Parses `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`.
fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let mount_point = left.split(' ').nth(4)?;
    let fs_type = right.split(' ').next()?;
    Some(MountEntry { mount_point: PathBuf::from(unescape(mount_point)), fs_type: fs_type.to_owned() })
}

/// Undoes mountinfo's octal escapes (`\040` for space, `\011` tab, `\012` newline, `\134` backslash).
fn unescape(field: &str) -> OsString {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|digits| digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match (bytes[i], octal) {
            (b'\\', Some(digits)) => {
                out.push(digits.iter().fold(0u8, |acc, d| acc.wrapping_mul(8) + (d - b'0')));
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    OsString::from_vec(out)
}

/// Unmounts its mount point when dropped, if something is still mounted there; `unmount` does it early
/// and reports errors. Create it *before* mounting, so that a mount which half-succeeded is cleaned too.
pub struct MountGuard {
    mount_point: PathBuf,
}

impl MountGuard {
    /// A guard for whatever gets mounted at `mount_point`.
    pub fn new(mount_point: &Path) -> Self {
        MountGuard { mount_point: mount_point.to_owned() }
    }

    /// Unmounts now (echoing `umount`), waiting until mountinfo no longer lists the mount.
    pub fn unmount(&mut self) -> Result<()> {
        if !is_mounted(&self.mount_point)? {
            return Ok(());
        }
        cmd("umount").arg(&self.mount_point).run()?;
        let start = Instant::now();
        while is_mounted(&self.mount_point)? {
            if start.elapsed() > DEADLINE {
                bail!("{} is still mounted {DEADLINE:?} after umount", self.mount_point.display());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if !is_mounted(&self.mount_point).unwrap_or(true) {
            return;
        }
        println!("cleaning up: unmounting {}", self.mount_point.display());
        if self.unmount().is_ok() {
            return;
        }
        // A non-root FUSE mount can only be undone by fusermount3; a busy one only lazily.
        let unmounted = cmd("fusermount3").arg("-u").arg(&self.mount_point).succeeds()
            || cmd("umount").arg("-l").arg(&self.mount_point).succeeds();
        if !unmounted {
            eprintln!("warning: could not unmount {}; unmount it by hand", self.mount_point.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mount_point_and_type() {
        let line = "36 35 98:0 /mnt1 /mnt/my\\040dir rw,noatime master:1 - fuse.ovlfs ovlfs rw,user_id=0";
        let entry = parse_line(line).expect("a valid line");
        assert_eq!(entry.mount_point, Path::new("/mnt/my dir"));
        assert_eq!(entry.fs_type, "fuse.ovlfs");
    }

    #[test]
    fn parses_a_line_without_optional_fields() {
        let line = "25 1 0:22 / /tmp rw,relatime - tmpfs tmpfs rw";
        let entry = parse_line(line).expect("a valid line");
        assert_eq!(entry, MountEntry { mount_point: PathBuf::from("/tmp"), fs_type: "tmpfs".to_owned() });
        assert_eq!(parse_line("garbage"), None);
    }

    #[test]
    fn unescapes_octal_and_keeps_other_backslashes() {
        assert_eq!(unescape(r"a\040b\011c\134d"), OsString::from("a b\tc\\d"));
        assert_eq!(unescape(r"a\b\09"), OsString::from(r"a\b\09"));
    }

    #[test]
    fn the_root_is_mounted_and_a_plain_directory_is_not() -> Result<()> {
        assert!(is_mounted(Path::new("/"))?);
        assert!(!is_mounted(&std::env::temp_dir().join("xtask-surely-not-a-mount-point"))?);
        Ok(())
    }
}
