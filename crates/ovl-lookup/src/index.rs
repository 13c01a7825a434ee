//! Which inode-index entry (`index=on`, see `ovl_core::index`) stands for a looked-up file.

use std::ffi::CString;
use std::path::Path;

use ovl_core::index::index_name;
use ovl_core::sys;
use ovl_core::{Errno, LayerStack, Result};
use rustix::fs::FileType;

use crate::Entry;

/// An object's entry in the inode index.
#[derive(Debug, Clone)]
pub struct IndexRef {
    /// Its name in `WORKDIR/index`.
    pub name: CString,
    /// The entry exists: the object has an upper inode, shared by its linked-up names.
    pub present: bool,
    /// The lower file's link count (0 when found from an upper name).
    pub lower_nlink: u64,
}

/// For a non-directory of an `index=on` stack: its index entry when it is a lower object with
/// several links, or an upper name linked to such an entry (`upper_path` is the entry's
/// overlay path, needed to read its origin). `None` for everything else, and for a metacopy
/// file (indexed copy-up always copies data).
pub fn index_of(stack: &LayerStack, e: &Entry, upper_path: &Path) -> Result<Option<IndexRef>> {
    let Some(up) = stack.upper() else { return Ok(None) };
    let Some(ix) = up.index() else { return Ok(None) };
    // Every non-dir, as the kernel's `ovl_need_index`: hard-linked symlinks and special files
    // too (an upper layer rotated down brings them).
    if e.kind == FileType::Directory || e.data.is_some() {
        return Ok(None);
    }
    if let Some(ust) = &e.upper {
        if ust.st_nlink < 2 {
            return Ok(None);
        }
        let (dir, name) = sys::open_parent(up.layer().root()?, upper_path)?;
        let Some(origin) = sys::get_xattr(&dir, Some(&name), &stack.names().origin)? else { return Ok(None) };
        let ixname = index_name(&origin);
        return Ok(match sys::lstat_at(ix, &ixname) {
            Ok(st) if st.st_ino == ust.st_ino && st.st_dev == ust.st_dev => {
                Some(IndexRef { name: ixname, present: true, lower_nlink: 0 })
            }
            _ => None,
        });
    }
    let Some(l) = e.lower.as_ref().filter(|l| l.stat.st_nlink > 1) else { return Ok(None) };
    let layer = stack.layer(l.layer);
    let (dir, name) = sys::open_parent(layer.root()?, &l.path)?;
    let Some(origin) = ovl_core::index::origin_value(layer, &dir, &name) else { return Ok(None) };
    let ixname = index_name(&origin);
    let present = match sys::lstat_at(ix, &ixname) {
        Ok(st) => FileType::from_raw_mode(st.st_mode) == e.kind,
        Err(e) if e.errno() == Errno::NOENT => false,
        Err(e) => return Err(e),
    };
    Ok(Some(IndexRef { name: ixname, present, lower_nlink: l.stat.st_nlink }))
}
