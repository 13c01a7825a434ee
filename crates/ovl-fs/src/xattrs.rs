//! Extended attributes through the mount. Names in the overlay's own namespace are escaped as
//! the kernel does (`trusted.overlay.X` is stored as `trusted.overlay.overlay.X`), so overlay
//! metadata can never be read, set or removed by a user.

use std::ffi::{CString, OsStr};
use std::os::fd::AsFd;
use std::sync::Arc;

use ovl_core::sys;
use ovl_core::{Errno, Result};

use crate::fs::OverlayFs;
use crate::inode::Node;

fn cname(name: &OsStr) -> Result<CString> {
    CString::new(name.as_encoded_bytes()).map_err(|_| Errno::INVAL.into())
}

impl OverlayFs {
    /// Runs `f` on the real object of `node` as (parent dir, Some(name)) or (dir, None) for the
    /// root of a layer, or (the file, None) for an open file whose names were all removed.
    pub(crate) fn on_real<T>(
        &self,
        node: &Node,
        f: impl FnOnce(std::os::fd::BorrowedFd<'_>, Option<&std::ffi::CStr>) -> Result<T>,
    ) -> Result<T> {
        if let Some((dir, name)) = self.held_place(node) {
            return f(std::os::fd::AsFd::as_fd(&*dir), Some(&name));
        }
        let (root, path) = match self.real_location(node) {
            Err(e) if e.errno() == Errno::NOENT && self.unlinked(node) => {
                let of = self.open_file_of(node).ok_or(e)?;
                let file = of.file.read().clone();
                return f(std::os::fd::AsFd::as_fd(&*file), None);
            }
            r => r?,
        };
        if path.as_os_str().is_empty() {
            return f(root.as_fd(), None);
        }
        let (dir, name) = sys::open_parent(root, &path)?;
        f(std::os::fd::AsFd::as_fd(&dir), Some(&name))
    }

    /// fuse-overlayfs's layer metadata (its opaque marker and origin), on a stack that reads its
    /// layers: as hidden as our own, never read, set or removed through the mount.
    fn foreign_metadata(&self, name: &OsStr) -> bool {
        self.stack.reads_aufs() && ovl_core::aufs::is_fuse_overlayfs_metadata(name.as_encoded_bytes())
    }

    /// The value of xattr `name` as callers see it (ACL IDs shifted: `crate::ids`).
    pub(crate) fn do_getxattr(&self, node: &Node, name: &OsStr) -> Result<Vec<u8>> {
        if self.is_private_xattr(name.as_encoded_bytes()) || self.foreign_metadata(name) {
            return Err(Errno::NODATA.into());
        }
        let v = self.stored_xattr(node, name)?;
        Ok(self.shift_acl(name.as_encoded_bytes(), v, true))
    }

    /// The value of xattr `name` as the layer stores it.
    pub(crate) fn stored_xattr(&self, node: &Node, name: &OsStr) -> Result<Vec<u8>> {
        let key = cname(&self.stack.names().escape(name))?;
        self.on_real(node, |d, n| sys::get_xattr(d, n, &key))?.ok_or_else(|| Errno::NODATA.into())
    }

    pub(crate) fn do_listxattr(&self, node: &Node) -> Result<Vec<u8>> {
        let names = self.on_real(node, |d, n| sys::list_xattrs(d, n))?;
        let mut out = Vec::new();
        for n in names {
            if let Some(shown) = self
                .stack
                .names()
                .unescape(&n)
                .filter(|s| !self.is_private_xattr(s.as_encoded_bytes()) && !self.foreign_metadata(s))
            {
                out.extend_from_slice(shown.as_encoded_bytes());
                out.push(0);
            }
        }
        Ok(out)
    }

    pub(crate) fn do_setxattr(&self, node: &Arc<Node>, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        if self.is_private_xattr(name.as_encoded_bytes()) || self.foreign_metadata(name) {
            return Err(Errno::PERM.into());
        }
        let value = &self.shift_acl(name.as_encoded_bytes(), value.to_vec(), false);
        let key = cname(&self.stack.names().escape(name))?;
        let _gate = self.gate_for(node);
        self.hook_modify(node)?;
        self.ensure_upper_meta(node)?;
        self.on_real(node, |d, n| sys::set_xattr(d, n, &key, value, flags))
    }

    pub(crate) fn do_removexattr(&self, node: &Arc<Node>, name: &OsStr) -> Result<()> {
        if self.is_private_xattr(name.as_encoded_bytes()) {
            return Err(Errno::PERM.into());
        }
        if self.foreign_metadata(name) {
            return Err(Errno::NODATA.into());
        }
        let key = cname(&self.stack.names().escape(name))?;
        if self.on_real(node, |d, n| sys::get_xattr(d, n, &key))?.is_none() {
            return Err(Errno::NODATA.into());
        }
        let _gate = self.gate_for(node);
        self.hook_modify(node)?;
        self.ensure_upper_meta(node)?;
        self.on_real(node, |d, n| sys::remove_xattr(d, n, &key))
    }
}
