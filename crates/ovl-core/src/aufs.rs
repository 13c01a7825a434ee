//! The other whiteout encoding: the AUFS/OCI one that containers/storage writes into image
//! layers when a mount program is set, and that fuse-overlayfs writes where it cannot `mknod`.
//!
//! In a directory of any layer, an entry named `.wh.NAME` (of any type and mode) hides `NAME` in
//! that layer and every layer below; an entry `.wh..wh..opq`, or the xattr
//! `user.fuseoverlayfs.opaque` starting with `y`, makes the directory opaque. Names starting with
//! `.wh.` are never shown. These are the rules fuse-overlayfs 1.x reads (its `load_dir`,
//! `do_lookup_file` and `is_directory_opaque`); note that it hides `NAME` also in the layer that
//! holds `.wh.NAME`, where the OCI image spec would not. The kernel reads none of this.
//!
//! A stack reads this encoding when [`crate::LayerStack::reads_aufs`] says so (every stack
//! [`crate::LayerStack::open`] makes); it writes `.wh.NAME` files only when
//! [`crate::LayerStack::writes_whiteout_files`] (the upper fs refused a 0/0 `mknod`).

use std::ffi::{CStr, OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// The prefix of whiteout names.
pub const PREFIX: &[u8] = b".wh.";

/// The entry that makes its directory opaque.
pub const OPAQUE_MARKER: &CStr = c".wh..wh..opq";

/// fuse-overlayfs's opaque marker xattr (written where it may not set `trusted.overlay.opaque`).
pub const FUSE_OVERLAYFS_OPAQUE: &CStr = c"user.fuseoverlayfs.opaque";

/// fuse-overlayfs's metadata about an object's place in the stack (opaque marker, and `origin`:
/// the path of a copied-up file in the layers below, which it reads only for inode numbers).
/// Never copied up, never shown through the mount.
pub const FUSE_OVERLAYFS_METADATA: &[&[u8]] = &[b"user.fuseoverlayfs.opaque", b"user.fuseoverlayfs.origin"];

/// True for a name this encoding reserves (`.wh.` and anything after it).
pub fn is_reserved(name: &OsStr) -> bool {
    name.as_bytes().starts_with(PREFIX)
}

/// `.wh.NAME`, the whiteout of `name`.
pub fn whiteout_name(name: &OsStr) -> OsString {
    let mut v = PREFIX.to_vec();
    v.extend_from_slice(name.as_bytes());
    OsString::from_vec(v)
}

/// True for an xattr name that is fuse-overlayfs's layer metadata ([`FUSE_OVERLAYFS_METADATA`]).
pub fn is_fuse_overlayfs_metadata(xattr: &[u8]) -> bool {
    FUSE_OVERLAYFS_METADATA.contains(&xattr)
}

/// True when a `user.fuseoverlayfs.opaque` value says opaque (fuse-overlayfs reads the first
/// byte only).
pub fn fuse_overlayfs_opaque(value: Option<&[u8]>) -> bool {
    value.is_some_and(|v| v.first() == Some(&b'y'))
}

/// What one directory of a lower layer holds of this encoding: the names its `.wh.NAME` entries
/// hide, and whether it holds [`OPAQUE_MARKER`]. Read once per directory with one listing (lower
/// layers do not change under a mount), so a lookup does not probe for `.wh.NAME` in each lower
/// layer (it cost a cold `lstat` 20% and a negative lookup 50% more; issue 18).
#[derive(Debug, Default)]
pub struct DirMarks {
    hidden: std::collections::HashSet<OsString>,
    opaque: bool,
}

impl DirMarks {
    /// The marks of a directory holding entries `names`.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a OsStr>) -> Self {
        let mut m = DirMarks::default();
        for n in names {
            let b = n.as_bytes();
            if b == OPAQUE_MARKER.to_bytes() {
                m.opaque = true;
            } else if let Some(hidden) = b.strip_prefix(PREFIX) {
                m.hidden.insert(OsStr::from_bytes(hidden).to_owned());
            }
        }
        m
    }

    /// True when `name` in this directory is hidden by a `.wh.NAME` entry.
    pub fn hides(&self, name: &OsStr) -> bool {
        !self.hidden.is_empty() && self.hidden.contains(name)
    }

    /// True when the directory holds the opaque marker.
    pub fn opaque(&self) -> bool {
        self.opaque
    }
}

/// The lower directories read so far, by `(layer, path in it)`: their marks, or `None` where the
/// layer has no directory there. Bounded: emptied when it grows past [`MarksCache::MAX`].
#[derive(Debug, Default)]
pub struct MarksCache(std::sync::RwLock<std::collections::HashMap<MarksKey, Option<std::sync::Arc<DirMarks>>>>);

/// A directory of a layer: the layer and the path in it.
type MarksKey = (crate::LayerId, std::path::PathBuf);

impl MarksCache {
    /// The most directories kept.
    pub const MAX: usize = 1 << 16;

    /// The marks of `dir` in `layer`, read with `read` (its entries' names, `None` when there is no
    /// such directory) the first time.
    pub fn get(
        &self,
        layer: crate::LayerId,
        dir: &std::path::Path,
        read: impl FnOnce() -> crate::Result<Option<Vec<OsString>>>,
    ) -> crate::Result<Option<std::sync::Arc<DirMarks>>> {
        let key = (layer, dir.to_path_buf());
        if let Some(m) = self.0.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(m.clone());
        }
        let marks =
            read()?.map(|names| std::sync::Arc::new(DirMarks::from_names(names.iter().map(OsString::as_os_str))));
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= Self::MAX {
            map.clear();
        }
        map.insert(key, marks.clone());
        Ok(marks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_of_a_listing() {
        let names = [".wh.a", "b", ".wh..wh..opq", ".wh..wh.plnk", "c"].map(OsStr::new);
        let m = DirMarks::from_names(names);
        assert!(m.hides(OsStr::new("a")));
        assert!(!m.hides(OsStr::new("b")));
        assert!(m.hides(OsStr::new(".wh.plnk")), "a hidden name is whatever follows the prefix");
        assert!(m.opaque());
        assert!(!DirMarks::from_names([OsStr::new("x")]).opaque());
    }

    #[test]
    fn names() {
        assert!(is_reserved(OsStr::new(".wh.a")));
        assert!(is_reserved(OsStr::new(".wh..wh..opq")));
        assert!(!is_reserved(OsStr::new(".wh")));
        assert!(!is_reserved(OsStr::new("a.wh.b")));
        assert_eq!(whiteout_name(OsStr::new("a")), ".wh.a");
        assert!(is_fuse_overlayfs_metadata(b"user.fuseoverlayfs.origin"));
        assert!(!is_fuse_overlayfs_metadata(b"user.fuseoverlayfs.override_stat"));
        assert!(fuse_overlayfs_opaque(Some(b"yes")));
        assert!(!fuse_overlayfs_opaque(Some(b"")) && !fuse_overlayfs_opaque(None));
    }
}
