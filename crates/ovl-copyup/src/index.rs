//! Copy-up of lower hard links through the inode index (`index=on`, see `ovl_core::index`):
//! the first copy goes into `WORKDIR/index` under the lower file's index name, and each name of
//! the file that must exist in the upper layer is a hard link to it ("link-up").
//! `overlay.nlink` is kept as the kernel keeps it: relative to the lower count before a
//! link-up, relative to the upper count after it and around every link, unlink or rename.

use std::ffi::CStr;

use ovl_core::index::{NlinkBase, nlink_value};
use ovl_core::sys;
use ovl_core::{Errno, LayerStack, Result};
use rustix::fd::AsFd;
use rustix::fs::{AtFlags, FileType, Stat};

use crate::copy::{Source, copy_other_into, copy_regular_into, mark_impure};
use crate::upper::{restore_dir_times, upper_of};

fn index_dir(stack: &LayerStack) -> Result<rustix::fd::BorrowedFd<'_>> {
    upper_of(stack)?.index().ok_or_else(|| Errno::INVAL.into())
}

/// Copies the lower non-directory `src` (with several links) into the index as `index`, with
/// its origin, and `overlay.nlink` saying the overlay count is the lower one. Returns the new
/// upper inode's `lstat`; `publish` sees it before it is visible.
pub fn copy_up_to_index(stack: &LayerStack, src: &Source, index: &CStr, publish: &dyn Fn(&Stat)) -> Result<Stat> {
    let ix = index_dir(stack)?;
    let lower = stack.layer(src.layer);
    let (lparent, lname) = sys::open_parent(lower.root()?, &src.path)?;
    let st = sys::lstat_at(&lparent, &lname)?;
    let origin = ovl_core::index::origin_value(lower, &lparent, &lname).ok_or(Errno::OPNOTSUPP)?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => {
            copy_regular_into(stack, (&lparent, &lname), &st, (ix, index), Some(&origin), publish)?
        }
        FileType::Directory => return Err(Errno::XDEV.into()),
        // A hard-linked symlink or special file: made in the work dir, renamed into the index.
        _ => copy_other_into(stack, (&lparent, &lname), &st, (ix, index), &origin, publish)?,
    }
    sys::set_xattr(ix, Some(index), &stack.names().nlink, &nlink_value(NlinkBase::Lower, 0), 0)?;
    sys::lstat_at(ix, index)
}

/// Links the index entry `index` in as `name` in the upper dir `upper_parent` (which must
/// exist), for a file whose overlay link count is `union` and lower count `lower_nlink`.
pub fn link_up<'u>(
    stack: &LayerStack,
    index: &CStr,
    upper_parent: impl Into<crate::UpperDir<'u>>,
    name: &CStr,
    union: u64,
    lower_nlink: u64,
) -> Result<()> {
    let upper = upper_of(stack)?;
    let ix = index_dir(stack)?;
    let uparent = upper_parent.into().open(upper)?;
    let pst = rustix::fs::fstat(&uparent)?;
    mark_impure(stack, &uparent)?;
    let key = &stack.names().nlink;
    sys::set_xattr(ix, Some(index), key, &nlink_value(NlinkBase::Lower, union as i64 - lower_nlink as i64), 0)?;
    rustix::fs::linkat(ix, index, &uparent, name, AtFlags::empty())?;
    restore_dir_times(uparent.as_fd(), &pst);
    set_nlink_upper(stack, index, union)
}

/// Records that the overlay link count of index entry `index` is `union`, relative to its
/// upper count, before a link, unlink or rename changes both by one.
pub fn set_nlink_upper(stack: &LayerStack, index: &CStr, union: u64) -> Result<()> {
    let ix = index_dir(stack)?;
    let st = sys::lstat_at(ix, index)?;
    let v = nlink_value(NlinkBase::Upper, union as i64 - st.st_nlink as i64);
    sys::set_xattr(ix, Some(index), &stack.names().nlink, &v, 0)
}

/// Removes the index entry of a file whose last overlay name is gone.
pub fn remove_index(stack: &LayerStack, index: &CStr) -> Result<()> {
    match rustix::fs::unlinkat(index_dir(stack)?, index, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
