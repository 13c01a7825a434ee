//! The kernel's inode index (`index=on`), as it is laid out on disk.
//!
//! `WORKDIR/index` holds one entry per lower hard-linked file that was copied up: a hard link to
//! its upper inode, named by the lowercase hex of the lower file's `overlay.origin` value. The
//! upper inode is shared by every name of the file that was copied up ("linked up"), and
//! `overlay.nlink` on it records how many names the file has in the overlay, relative to the
//! upper inode's link count (`U+N`) or the lower one's (`L+N`). The upper root's
//! `overlay.origin` names the first lower layer's root and the index dir's `overlay.upper`
//! names the upper root, so an index is never used with other layers than its own.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};

use crate::error::{Errno, Error, StackError};
use crate::format::XattrNames;
use crate::layer::Layer;
use crate::origin::{MAX_LEN, Origin};
use crate::sys;

/// The index directory's name in the workdir.
pub const INDEX_DIR: &str = "index";

/// The encoded `overlay.origin` of `name` in `dir` (a directory of `layer`), or `None` when
/// its filesystem cannot make file handles.
pub fn origin_value(layer: &Layer, dir: impl AsFd, name: &CStr) -> Option<Vec<u8>> {
    let handle = sys::name_to_handle(dir, name).ok()?;
    encoded(Origin { uuid: layer.uuid(), handle, path_upper: false })
}

/// The encoded handle of the object `fd` is open on, as the kernel stores it for the upper
/// root's origin (`path_upper == false`) and the index dir's `overlay.upper` (`true`).
fn handle_value(uuid: [u8; 16], fd: impl AsFd, path_upper: bool) -> Option<Vec<u8>> {
    let handle = sys::fd_to_handle(fd).ok()?;
    encoded(Origin { uuid, handle, path_upper })
}

fn encoded(o: Origin) -> Option<Vec<u8>> {
    let v = o.encode();
    (v.len() <= MAX_LEN).then_some(v)
}

/// The name of the index entry for a lower file whose origin value is `origin`.
pub fn index_name(origin: &[u8]) -> CString {
    let hex: String = origin.iter().map(|b| format!("{b:02x}")).collect();
    CString::new(hex).expect("hex has no NUL")
}

/// What an `overlay.nlink` value counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NlinkBase {
    /// The upper inode's link count (`U`).
    Upper,
    /// The lower inode's link count (`L`).
    Lower,
}

/// The `overlay.nlink` value saying the overlay count is `base`'s count plus `diff`.
pub fn nlink_value(base: NlinkBase, diff: i64) -> Vec<u8> {
    let c = match base {
        NlinkBase::Upper => 'U',
        NlinkBase::Lower => 'L',
    };
    format!("{c}{diff:+}").into_bytes()
}

/// The overlay link count an `overlay.nlink` value gives, from the upper and lower inodes'
/// counts; `None` when the value is malformed or the result is not positive (the kernel then
/// falls back to the real inode's count).
pub fn union_nlink(value: &[u8], upper_nlink: u64, lower_nlink: u64) -> Option<u64> {
    let (&c, rest) = value.split_first()?;
    let base = match c {
        b'U' => upper_nlink,
        b'L' => lower_nlink,
        _ => return None,
    };
    if !matches!(rest.first(), Some(b'+' | b'-')) || rest.len() > 11 {
        return None;
    }
    let diff: i64 = std::str::from_utf8(rest).ok()?.parse().ok()?;
    let n = base as i64 + diff;
    (n > 0).then_some(n as u64)
}

/// The overlay link count of the index entry `name` in `index` (the dir), and the entry's
/// `lstat`: from its `overlay.nlink` (`key`), or, when that is missing or malformed, its own
/// link count, as the kernel falls back.
pub fn entry_nlink(
    index: impl AsFd,
    name: &CStr,
    key: &CStr,
    lower_nlink: u64,
) -> crate::Result<(u64, rustix::fs::Stat)> {
    let st = sys::lstat_at(&index, name)?;
    let v = sys::get_xattr(&index, Some(name), key)?;
    let n = v.and_then(|v| union_nlink(&v, st.st_nlink, lower_nlink)).unwrap_or(st.st_nlink);
    Ok((n, st))
}

/// Opens `WORKDIR/index` for an `index=on` stack, as the kernel's mount does: creates it (when
/// writable), sets or verifies the upper root's `overlay.origin` (the first lower root) and
/// the index dir's `overlay.upper` (the upper root). A mismatch means the upper layer or the
/// index belong to other layers; the mount is refused, as by the kernel.
pub(crate) fn open_index(
    upper: &Layer,
    workdir: &OwnedFd,
    lower0: &Layer,
    names: &XattrNames,
    writable: bool,
) -> Result<Option<OwnedFd>, StackError> {
    let err = |what: &str, source: Error| StackError::Index { what: what.to_owned(), source };
    let dir = Path::new(INDEX_DIR);
    if writable {
        match rustix::fs::mkdirat(workdir, INDEX_DIR, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(err("cannot create the index dir", e.into())),
        }
    }
    let index = match sys::open_beneath(workdir, dir, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) if !writable && e.errno() == Errno::NOENT => return Ok(None),
        Err(e) => return Err(err("cannot open the index dir", e)),
    };
    let no_handles = || err("index=on needs file handles on the upper and first lower layer", Errno::OPNOTSUPP.into());
    let lower_root = lower0.root().map_err(|e| err("cannot open the first lower layer", e))?;
    let upper_root = upper.root().map_err(|e| err("cannot open the upper layer", e))?;
    let root_origin = handle_value(lower0.uuid(), &*lower_root, false).ok_or_else(no_handles)?;
    let upper_handle = handle_value(upper.uuid(), &*upper_root, true).ok_or_else(no_handles)?;
    verify_or_set(&*upper_root, &names.origin, &root_origin, writable)
        .map_err(|e| err("the upper root's origin does not name the first lower layer's root", e))?;
    verify_or_set(index.as_fd(), &names.upper, &upper_handle, writable)
        .map_err(|e| err("the index dir belongs to another upper layer (its `upper` xattr)", e))?;
    if writable {
        remove_orphans(&index, names).map_err(|e| err("cannot clean the index dir", e))?;
    }
    Ok(Some(index))
}

/// Removes what the kernel's mount removes from the index dir too: entries of files whose every
/// name is gone (only the index holds the inode, and `overlay.nlink` counts no name: a kill
/// between removing the last name and removing its entry leaves that), and temporary names
/// (`#...`: the kernel uses the index dir as its work dir). Entries whose count is relative to
/// the lower file are kept: their lower names may still show them.
fn remove_orphans(index: &OwnedFd, names: &XattrNames) -> Result<(), Error> {
    for e in sys::read_dir_fd(rustix::io::dup(index)?)? {
        let name = CString::new(e.name.as_encoded_bytes()).map_err(|_| Error::from(Errno::INVAL))?;
        let temp = e.name.as_encoded_bytes().first() == Some(&b'#');
        let st = match sys::lstat_at(index, &name) {
            Ok(st) => st,
            Err(e) if e.errno() == Errno::NOENT => continue,
            Err(e) => return Err(e),
        };
        let dir = rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory;
        let orphan = !dir && st.st_nlink == 1 && {
            let v = sys::get_xattr(index, Some(&name), &names.nlink)?;
            v.as_deref().is_some_and(|v| v.first() == Some(&b'U') && union_nlink(v, 1, 0).is_none())
        };
        if (temp && !dir) || orphan {
            match rustix::fs::unlinkat(index, &name, rustix::fs::AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Checks that `fd` holds `key = want`, setting it when absent (and `set`); `ESTALE` when it
/// holds anything else.
fn verify_or_set(fd: impl AsFd, key: &CStr, want: &[u8], set: bool) -> Result<(), Error> {
    match sys::get_xattr(&fd, None, key)? {
        Some(v) if v == want => Ok(()),
        Some(_) => Err(Errno::STALE.into()),
        None if set => sys::set_xattr(&fd, None, key, want, 0),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nlink_values_read_as_the_kernel_reads_them() {
        assert_eq!(nlink_value(NlinkBase::Upper, 0), b"U+0");
        assert_eq!(nlink_value(NlinkBase::Lower, -1), b"L-1");
        assert_eq!(union_nlink(b"U+0", 2, 3), Some(2));
        assert_eq!(union_nlink(b"U-1", 3, 2), Some(2));
        assert_eq!(union_nlink(b"L+1", 1, 2), Some(3));
        for bad in [&b""[..], b"U", b"U0", b"X+1", b"U+x", b"U-5", b"U+99999999999999"] {
            assert_eq!(union_nlink(bad, 2, 2), None, "{bad:?}");
        }
    }

    #[test]
    fn index_names_are_lowercase_hex() {
        assert_eq!(index_name(&[0x00, 0xfb, 0x1a]).as_bytes(), b"00fb1a");
    }
}
