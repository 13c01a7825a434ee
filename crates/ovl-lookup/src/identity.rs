//! Stable identities for inode numbers, from `overlay.origin`.
//!
//! An object copied up keeps the identity of the lower object it came from; an object in a
//! lower layer that was itself once copied up (a layer rotated down from upper) keeps the
//! identity of *its* origin. Following that chain gives an inode number that survives copy-up,
//! remount and layer rotation.

use std::path::Path;

use ovl_core::sys;
use ovl_core::{Layer, LayerStack, Origin, OriginError, Result};
use rustix::fs::Stat;

/// Where the oldest known copy of an object lives: a filesystem of the stack and an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The filesystem's index in the stack ([`Layer::fs_index`]).
    pub fs_index: u8,
    /// The inode number there.
    pub ino: u64,
}

/// The most origins we follow (a chain of rotated layers); deeper chains stop there.
const MAX_CHAIN: usize = 16;

/// The identity of the object at `path` in `layer`, whose `lstat` is `st`. A stale, foreign or
/// corrupt origin is ignored (the object is its own identity), as by the kernel: identity only
/// feeds inode numbers, so bad metadata must never make an object unreachable.
pub fn identity(stack: &LayerStack, layer: &Layer, path: &Path, st: &Stat) -> Result<Identity> {
    let value = if path.as_os_str().is_empty() {
        sys::get_xattr(layer.root()?, None, &stack.names().origin)?
    } else {
        let (dir, name) = sys::open_parent(layer.root()?, path)?;
        sys::get_xattr(&dir, Some(&name), &stack.names().origin)?
    };
    identity_from(stack, layer, path, st, value)
}

/// [`identity`] when the object's `overlay.origin` value was already read.
pub(crate) fn identity_from(
    stack: &LayerStack,
    layer: &Layer,
    path: &Path,
    st: &Stat,
    mut value: Option<Vec<u8>>,
) -> Result<Identity> {
    let mut id = Identity { fs_index: layer.fs_index(), ino: st.st_ino };
    let key = &stack.names().origin;
    // The mount's index vouches only for links of its own upper layer's objects: the first hop
    // from an upper object. An object in a lower layer (a rotated upper) whose origin has
    // several links may be one of several broken copies of it, each its own object.
    let vouched = stack.upper().is_some_and(|u| u.index().is_some() && u.layer().id() == layer.id());
    for hop in 0..MAX_CHAIN {
        let Some(v) = value else { break };
        let origin = match Origin::decode(&v) {
            Ok(o) => o,
            Err(OriginError::OtherEndian) => break,
            Err(OriginError::Corrupt) => {
                tracing::warn!(?path, "ignoring an invalid overlay.origin");
                break;
            }
        };
        let Some(fd) = decode(stack, &origin) else { break };
        let st = rustix::fs::fstat(&fd)?;
        // As the kernel: a non-dir whose origin has several links takes the origin's number
        // only with an index (which proves the link unbroken: `vouched`); without one, each
        // copied-up name is an object of its own (two of them would otherwise share one
        // identity).
        let is_dir = rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory;
        if !is_dir && st.st_nlink > 1 && !(vouched && hop == 0) {
            break;
        }
        let Some(found) = stack.layer_on_dev(st.st_dev) else { break };
        id = Identity { fs_index: found.fs_index(), ino: st.st_ino };
        value = sys::get_xattr(&fd, None, key)?;
    }
    Ok(id)
}

/// Opens the object an origin names, if it still exists on a lower layer's filesystem.
fn decode(stack: &LayerStack, origin: &Origin) -> Option<std::os::fd::OwnedFd> {
    match resolve_origin(stack, origin) {
        OriginTarget::Found(fd) => Some(fd),
        OriginTarget::Foreign | OriginTarget::Stale(_) => None,
    }
}

/// What a decoded `overlay.origin` names, seen from a stack.
#[derive(Debug)]
pub enum OriginTarget {
    /// The object, open (`O_PATH`).
    Found(std::os::fd::OwnedFd),
    /// No lower layer is on the filesystem the origin names (or, for a null UUID, the lower
    /// layers are on several filesystems, so it names none for sure).
    Foreign,
    /// The filesystem is there but the handle no longer opens (the object was deleted): the
    /// errno of `open_by_handle_at`.
    Stale(ovl_core::Errno),
}

/// Opens the object `origin` names on the filesystem of a lower layer, as the kernel decodes an
/// origin: the handle must belong to a lower layer's filesystem (by UUID; a null UUID only when
/// every lower layer is on one filesystem).
pub fn resolve_origin(stack: &LayerStack, origin: &Origin) -> OriginTarget {
    let mut candidates = stack.lowers_with_uuid(&origin.uuid).peekable();
    let Some(first) = candidates.peek() else { return OriginTarget::Foreign };
    if origin.uuid == [0; 16] && stack.lowers().iter().any(|l| l.dev() != first.dev()) {
        return OriginTarget::Foreign;
    }
    let root = match first.root() {
        Ok(r) => r,
        Err(e) => return OriginTarget::Stale(e.errno()),
    };
    match sys::open_by_handle(&*root, &origin.handle) {
        Ok(fd) => OriginTarget::Found(fd),
        Err(e) => OriginTarget::Stale(e.errno()),
    }
}
