//! How one snapshot layer resolves a path, exactly as the kernel's overlay lookup walks it: the
//! state of the path in the layer, and the path at which the layers below continue. The CoW rules
//! use it on the newest layer; diff, restore and delete chain it through several layers to map a
//! path of one snapshot to the same object's path in a newer one.

use std::ffi::OsStr;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use ovl_core::sys;
use ovl_core::{Errno, Result, XattrNames, is_whiteout_stat};
use rustix::fs::{FileType, Stat};

/// What one layer says about a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    /// A parent is a whiteout or a non-dir, or an opaque dir stops the layers below: this layer
    /// (and those above) alone decide.
    Covered,
    /// Nothing here: the layers below decide, at the lower path.
    Absent,
    /// A whiteout: the path does not exist.
    Whiteout,
    /// A non-directory (device, inode).
    File(u64, u64),
    /// A directory; unless opaque, it merges with the layers below at the lower path.
    Dir { opaque: bool },
}

/// A path as one layer resolves it.
#[derive(Debug)]
pub(crate) struct Walk {
    pub state: State,
    /// Where the layers below look for this path (when this layer does not decide alone).
    pub lower: PathBuf,
}

pub(crate) fn rel(p: &Path) -> impl Iterator<Item = &OsStr> {
    p.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n),
        _ => None,
    })
}

fn lstat_in(layer: BorrowedFd<'_>, p: &Path) -> Result<Option<Stat>> {
    match sys::lstat_beneath(layer, p) {
        Ok(st) => Ok(Some(st)),
        Err(e) if matches!(e.errno(), Errno::NOENT | Errno::NOTDIR) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Resolves path `s` in one layer the way the kernel's lookup does, and where the layers below
/// continue: an opaque dir on the way stops the layers below, unless an absolute redirect further
/// down restarts them; redirects rewrite where below the lookup goes.
pub(crate) fn layer_walk(layer: BorrowedFd<'_>, names: &XattrNames, s: &Path) -> Result<Walk> {
    let comps: Vec<&OsStr> = rel(s).collect();
    let mut lower = PathBuf::new();
    let mut cur = PathBuf::new();
    let mut absent = false;
    let mut stopped = false;
    for (i, c) in comps.iter().enumerate() {
        let last = i + 1 == comps.len();
        cur.push(c);
        if absent {
            lower.push(c);
            continue;
        }
        let Some(st) = lstat_in(layer, &cur)? else {
            absent = true;
            lower.push(c);
            continue;
        };
        let ft = FileType::from_raw_mode(st.st_mode);
        if ft != FileType::Directory {
            lower.push(c);
            let state = match (last, is_whiteout_stat(&st)) {
                (false, _) => State::Covered,
                (true, true) => State::Whiteout,
                (true, false) => State::File(st.st_dev, st.st_ino),
            };
            return Ok(Walk { state, lower });
        }
        let fd = sys::open_dir_path(layer, &cur)?;
        let opaque =
            ovl_core::Opaque::from_value(sys::get_xattr(&fd, None, &names.opaque)?.as_deref()) == ovl_core::Opaque::Yes;
        if opaque {
            // The kernel reads no redirect of an opaque dir.
            stopped = true;
            lower.push(c);
            if last {
                return Ok(Walk { state: State::Dir { opaque: true }, lower });
            }
            continue;
        }
        match sys::get_xattr(&fd, None, &names.redirect)? {
            Some(r) => match r.strip_prefix(b"/") {
                Some(abs) => {
                    lower = PathBuf::from(OsStr::from_bytes(abs));
                    stopped = false;
                }
                None => lower.push(OsStr::from_bytes(&r)),
            },
            None => lower.push(c),
        }
        if last {
            let state = if stopped { State::Covered } else { State::Dir { opaque: false } };
            return Ok(Walk { state, lower });
        }
    }
    // Only the root (no components) gets here without `absent`.
    let state = match (absent, stopped) {
        (true, true) => State::Covered,
        (true, false) => State::Absent,
        (false, _) => State::Dir { opaque: false },
    };
    Ok(Walk { state, lower })
}
