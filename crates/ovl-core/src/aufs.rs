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

#[cfg(test)]
mod tests {
    use super::*;

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
