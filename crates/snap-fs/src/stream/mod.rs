//! Send streams: a snapshot's tree, or the changes between two snapshots, as an OCI image layer
//! tar, and applying one to a directory.
//!
//! A stream is a POSIX tar (ustar headers, PAX records where ustar falls short) that standard
//! tools read: entries relative (`a/b`, directories `a/`), parents before children, xattrs as
//! `SCHILY.xattr.NAME`, times to the nanosecond as PAX `mtime`. A full stream starts with the
//! root's own entry `./`, which `receive` applies only to a target it makes. An incremental stream A→B is an
//! OCI layer: first the whiteouts `DIR/.wh.NAME` (paths of A, removed whole), then B's objects
//! that differ. OCI has no rename, so a directory renamed since A is sent whole at its new place
//! followed by the opaque marker `DIR/.wh..wh..opq`.
//!
//! Names starting with `.wh.` are reserved by OCI for those markers and there is no escape for
//! them, so a tree holding one is refused by `send`, with its path, instead of sent: every
//! receiver (ours, or any OCI tool) would take the object for a marker and delete what it names.
//! `receive` applies a marker only when it is an empty regular file and nothing is below it;
//! any other object under a reserved name is refused as a stream no sender should make. Whiteouts
//! remove exactly the names they give from the target (which plays the lower layers), and opaque
//! markers empty their directory there; neither touches the stream's own entries.
//!
//! Receiving treats the stream as hostile. It is spooled to a file in a stage dir
//! (`.ovlsnap-receive.PID` next to the target when possible, else in the temp dir; the receive
//! holds `flock` on its `lock` file while it lives, and each receive first removes the stages
//! there whose lock nobody holds, left by killed receives), checked down to its end-of-archive marker and unpacked into the stage
//! with `*at` calls that never follow a symlink (names with `..`, absolute names and entries below
//! a non-directory are refused) before the target is touched. Then whiteouts and opaque markers
//! are applied, the staged objects are renamed into place (copied when the target is another
//! filesystem, e.g. a snapshot mount), and their metadata and finally their times are set.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ovl_core::{Errno, sys};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat, Timespec, Timestamps};
use tar::{EntryType, Header};

use crate::diff::Change;
use crate::view::SNAPDIR_NAME;

const BLOCK: u64 = 512;
const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
/// The largest number the 12-byte octal fields (size, mtime) hold.
const MAX_OCTAL_11: u64 = 0o77777777777;
/// The largest number the 8-byte octal fields (uid, gid) hold.
const MAX_OCTAL_7: u64 = 0o7777777;

/// Xattrs a stream never carries: security labels and capabilities (the receiver's policy), and
/// overlay metadata, which would forge an overlay's structure wherever the tree lands.
fn private_xattr(name: &[u8]) -> bool {
    name.starts_with(b"security.") || name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

mod receive;
mod send;

pub use receive::receive;
pub use send::send;

/// A PAX time: seconds and nanoseconds as a decimal fraction (`-1.5` is 1.5 s before the epoch).
pub(crate) fn format_time(sec: i64, nsec: u32) -> String {
    if sec < 0 && nsec > 0 {
        format!("-{}.{:09}", -(sec + 1), 1_000_000_000 - nsec)
    } else {
        format!("{sec}.{nsec:09}")
    }
}

pub(crate) fn parse_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = s.strip_prefix('-').map_or((false, s), |r| (true, r));
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let sec: i64 = int.parse().ok()?;
    let nsec: u32 = format!("{:0<9}", &frac[..frac.len().min(9)]).parse().ok()?;
    Some(match (neg, nsec) {
        (false, _) => (sec, nsec),
        (true, 0) => (-sec, 0),
        (true, _) => (-sec - 1, 1_000_000_000 - nsec),
    })
}

#[cfg(test)]
mod tests {
    use super::receive::{clean, parse_pax};
    use super::send::{How, PaxRecords, Plan, set_path};
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    fn plan(changes: &[Change], dirs: &[&str]) -> Plan {
        Plan::new(changes, |x| Ok(dirs.iter().any(|d| Path::new(d) == x))).unwrap()
    }

    #[test]
    fn a_renamed_dir_is_sent_whole_and_covers_the_changes_inside() {
        let changes = [
            Change::Renamed { path: p("a"), to: p("b") },
            Change::Deleted { path: p("a/x"), at: p("b/x") },
            Change::Modified { path: p("a/y"), at: p("b/y") },
            Change::Renamed { path: p("a/c"), to: p("b/d") },
            Change::Renamed { path: p("a/e"), to: p("out") },
            Change::Added { path: p("a"), at: p("a") },
        ];
        let got = plan(&changes, &["b", "b/d", "out", "a"]);
        assert_eq!(got.whiteouts, BTreeSet::from([p("a")]));
        let want = BTreeMap::from([(p("a"), How::Whole), (p("b"), How::WholeOpaque), (p("out"), How::WholeOpaque)]);
        assert_eq!(got.objects, want);
    }

    #[test]
    fn a_changed_dir_is_sent_alone_only_when_changes_below_show_it_was_a_dir() {
        let changes = [
            Change::Modified { path: p("m"), at: p("m") },
            Change::Added { path: p("m/new"), at: p("m/new") },
            Change::Modified { path: p("t"), at: p("t") },
            Change::Modified { path: p("f"), at: p("f") },
        ];
        let got = plan(&changes, &["m", "t"]);
        assert_eq!(got.whiteouts, BTreeSet::from([p("t")]));
        let want = BTreeMap::from([
            (p("f"), How::Entry),
            (p("m"), How::Entry),
            (p("m/new"), How::Whole),
            (p("t"), How::Whole),
        ]);
        assert_eq!(got.objects, want);
    }

    #[test]
    fn a_changed_root_leaves_the_changes_below_it_in_the_stream() {
        // The root is a directory on both sides: its own change (its times, after anything at
        // the top changed) replaces nothing. It once made the stream empty: the root was taken
        // for a replaced directory, sent "whole" (a full stream skips the root's own entry) and
        // so covering every change below it.
        let changes = [
            Change::Modified { path: p(""), at: p("") },
            Change::Added { path: p("new"), at: p("new") },
            Change::Deleted { path: p("old"), at: p("old") },
            Change::Modified { path: p("d/f"), at: p("d/f") },
        ];
        let got = plan(&changes, &["", "d"]);
        assert_eq!(got.whiteouts, BTreeSet::from([p("old")]));
        let want =
            BTreeMap::from([(p(""), How::Entry), (p("d"), How::Entry), (p("d/f"), How::Entry), (p("new"), How::Whole)]);
        assert_eq!(got.objects, want);
        // Alone, too: the root's change is its entry (which `send` skips), no whiteout of it.
        let got = plan(&[Change::Modified { path: p(""), at: p("") }], &[""]);
        assert!(got.whiteouts.is_empty(), "{got:?}");
        assert_eq!(got.objects, BTreeMap::from([(p(""), How::Entry)]));
    }

    #[test]
    fn pax_records_count_their_own_length() {
        for n in [0, 1, 5, 6, 7, 90, 95, 96, 97, 990, 995, 1000] {
            let mut r = PaxRecords::default();
            r.add(b"k", &vec![b'v'; n]);
            assert_eq!(parse_pax(&r.0).unwrap(), vec![(b"k".to_vec(), vec![b'v'; n])], "value of {n} bytes");
        }
        let mut r = PaxRecords::default();
        r.add(b"SCHILY.xattr.user.bin", b"a\nb=\0c");
        assert_eq!(parse_pax(&r.0).unwrap(), vec![(b"SCHILY.xattr.user.bin".to_vec(), b"a\nb=\0c".to_vec())]);
        assert!(parse_pax(b"9 k=v\n").is_err(), "a wrong length");
        assert!(parse_pax(b"6 k=v").is_err(), "no newline");
    }

    #[test]
    fn times_round_trip() {
        for t in [(0, 0), (1, 5), (1_700_000_000, 999_999_999), (-1, 0), (-2, 500_000_000), (-1, 1)] {
            assert_eq!(parse_time(format_time(t.0, t.1).as_bytes()), Some(t), "{t:?}");
        }
        assert_eq!(parse_time(b"12"), Some((12, 0)));
        assert_eq!(parse_time(b"1.5x"), None);
    }

    #[test]
    fn unsafe_names_are_refused() {
        assert_eq!(clean(b"./a//b/").unwrap(), Some(p("a/b")));
        assert_eq!(clean(b"./").unwrap(), None);
        for bad in [&b"/etc/passwd"[..], b"../x", b"a/../../x", b"a/.."] {
            assert!(clean(bad).is_err(), "{:?}", OsStr::from_bytes(bad));
        }
    }

    #[test]
    fn long_paths_split_or_go_to_pax() {
        let mut h = Header::new_ustar();
        let mut pax = PaxRecords::default();
        let path = [&[b'a'; 120][..], b"/", &[b'b'; 90], b"/"].concat();
        set_path(&mut h, &path, &mut pax);
        assert!(pax.0.is_empty());
        assert_eq!(h.path_bytes().as_ref(), &path[..]);
        let long = [&[b'c'; 200][..], b"/", &[b'd'; 120]].concat();
        set_path(&mut Header::new_ustar(), &long, &mut pax);
        assert_eq!(parse_pax(&pax.0).unwrap(), vec![(b"path".to_vec(), long)]);
    }
}
