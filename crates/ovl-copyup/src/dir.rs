//! The upper directory an operation works in, as its caller knows it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use ovl_core::{Result, UpperLayer, sys};

/// Where in the upper layer an operation works: a directory the caller holds open (no path is
/// walked, and a rename of an ancestor meanwhile changes nothing: the handle follows the
/// directory), or an overlay path, opened beneath the upper layer's root at each call (for
/// callers that hold no handle: the snapshot store's copy-on-write, `ovlfs check`).
#[derive(Debug, Clone, Copy)]
pub enum UpperDir<'a> {
    /// An open descriptor (`O_PATH` is enough) of the upper directory itself.
    Held(BorrowedFd<'a>),
    /// The directory's path relative to the upper layer's root (`""`: the root).
    Path(&'a Path),
}

impl<'a> From<&'a Path> for UpperDir<'a> {
    fn from(p: &'a Path) -> Self {
        UpperDir::Path(p)
    }
}

impl<'a> From<&'a PathBuf> for UpperDir<'a> {
    fn from(p: &'a PathBuf) -> Self {
        UpperDir::Path(p)
    }
}

impl<'a> From<BorrowedFd<'a>> for UpperDir<'a> {
    fn from(fd: BorrowedFd<'a>) -> Self {
        UpperDir::Held(fd)
    }
}

/// An [`UpperDir`] open for one operation: borrowed when held, owned when opened from its path.
pub(crate) enum OpenDir<'a> {
    Held(BorrowedFd<'a>),
    Opened(OwnedFd),
}

impl AsFd for OpenDir<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            OpenDir::Held(fd) => *fd,
            OpenDir::Opened(fd) => fd.as_fd(),
        }
    }
}

impl<'a> UpperDir<'a> {
    /// The directory, open (`O_PATH`).
    pub(crate) fn open(self, upper: &UpperLayer) -> Result<OpenDir<'a>> {
        match self {
            UpperDir::Held(fd) => Ok(OpenDir::Held(fd)),
            UpperDir::Path(p) => Ok(OpenDir::Opened(sys::open_dir_path(upper.layer().root()?, p)?)),
        }
    }
}
