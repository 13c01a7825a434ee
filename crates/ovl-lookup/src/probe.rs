//! One object of a layer, looked at once: its parent directory opened once, its `lstat`, and its
//! xattr names listed at most once, so that asking for several overlay xattrs of an object that
//! has none (the common case) costs one `llistxattr` instead of one `getxattr` each.

use std::ffi::{CStr, CString, OsString};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use ovl_core::sys;
use ovl_core::{Errno, Result};
use rustix::fs::Stat;

/// An object found in a layer.
pub(crate) struct Probe {
    dir: OwnedFd,
    name: CString,
    /// The object's `lstat`.
    pub st: Stat,
    names: Option<Vec<OsString>>,
}

/// Errors that mean "nothing there" for a path in a layer: missing, a non-directory or a symlink
/// on the way (`openat2` answers `ELOOP`), or a name too long to exist.
pub(crate) fn is_absent(e: Errno) -> bool {
    matches!(e, Errno::NOENT | Errno::NOTDIR | Errno::NAMETOOLONG | Errno::LOOP)
}

impl Probe {
    /// Looks at `path` (not the layer root) beneath `root`; `None` when nothing is there.
    pub fn open(root: BorrowedFd<'_>, path: &Path) -> Result<Option<Self>> {
        let (dir, name) = match sys::open_parent(root, path) {
            Ok(x) => x,
            Err(e) if is_absent(e.errno()) => return Ok(None),
            Err(e) => return Err(e),
        };
        match sys::lstat_at(&dir, &name) {
            Ok(st) => Ok(Some(Self { dir, name, st, names: None })),
            Err(e) if is_absent(e.errno()) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The value of xattr `key`, if the object has it.
    pub fn xattr(&mut self, key: &CStr) -> Result<Option<Vec<u8>>> {
        if self.names.is_none() {
            self.names = Some(sys::list_xattrs(&self.dir, Some(&self.name))?);
        }
        let listed = self.names.as_deref().unwrap_or_default();
        if !listed.iter().any(|n| n.as_bytes() == key.to_bytes()) {
            return Ok(None);
        }
        sys::get_xattr(&self.dir, Some(&self.name), key)
    }
}
