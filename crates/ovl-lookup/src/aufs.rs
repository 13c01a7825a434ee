//! Reading the AUFS/OCI whiteout encoding (`.wh.NAME`, `.wh..wh..opq`) and fuse-overlayfs's
//! opaque xattr beside the kernel's, for stacks that read it ([`LayerStack::reads_aufs`]); the
//! rules are in [`ovl_core::aufs`].

use std::os::fd::AsFd;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use ovl_core::{Layer, LayerStack, Opaque, Result, aufs, sys};

use crate::probe::Probe;

/// True when `layer` is the stack's upper layer, which this mount itself changes (its marks are
/// probed each time; a lower layer's are read once: [`LayerStack::lower_marks`]).
fn is_upper(stack: &LayerStack, layer: &Layer) -> bool {
    stack.upper().is_some_and(|u| u.layer().id() == layer.id())
}

/// True when the object at `path` of `layer` (not the root) is hidden by a `.wh.NAME` entry
/// beside it, which also hides it in every layer below. `held`: `path`'s parent dir in `layer`,
/// where the caller holds it open (else it is opened from the layer root).
pub(crate) fn hidden(stack: &LayerStack, layer: &Layer, path: &Path, held: Option<&Arc<OwnedFd>>) -> Result<bool> {
    if !stack.reads_aufs() {
        return Ok(false);
    }
    let (Some(name), Some(dir)) = (path.file_name(), path.parent()) else { return Ok(false) };
    if !is_upper(stack, layer) {
        return Ok(stack.lower_marks(layer, dir)?.is_some_and(|m| m.hides(name)));
    }
    Ok(Probe::open_in(layer.root()?.as_fd(), &path.with_file_name(aufs::whiteout_name(name)), held)?.is_some())
}

/// The opacity of the directory `p` at `path` of `layer` (not a layer root): its
/// `overlay.opaque`, made `Yes` by fuse-overlayfs's opaque xattr or a `.wh..wh..opq` entry in it.
pub(crate) fn opaque(stack: &LayerStack, layer: &Layer, p: &mut Probe, path: &Path) -> Result<Opaque> {
    let o = Opaque::from_value(p.xattr(&stack.names().opaque)?.as_deref());
    if o == Opaque::Yes || !stack.reads_aufs() {
        return Ok(o);
    }
    let marker_inside = if is_upper(stack, layer) {
        Probe::open(layer.root()?.as_fd(), &path.join(marker()))?.is_some()
    } else {
        stack.lower_marks(layer, path)?.is_some_and(|m| m.opaque())
    };
    if marker_inside || aufs::fuse_overlayfs_opaque(p.xattr(aufs::FUSE_OVERLAYFS_OPAQUE)?.as_deref()) {
        return Ok(Opaque::Yes);
    }
    Ok(o)
}

/// [`opaque`] for the root directory of a layer.
pub(crate) fn root_opaque(stack: &LayerStack, root: BorrowedFd<'_>) -> Result<Opaque> {
    let o = Opaque::from_value(sys::get_xattr(root, None, &stack.names().opaque)?.as_deref());
    if o == Opaque::Yes || !stack.reads_aufs() {
        return Ok(o);
    }
    if aufs::fuse_overlayfs_opaque(sys::get_xattr(root, None, aufs::FUSE_OVERLAYFS_OPAQUE)?.as_deref())
        || crate::lookup::stat_in(root, Path::new(marker()))?.is_some()
    {
        return Ok(Opaque::Yes);
    }
    Ok(o)
}

fn marker() -> &'static std::ffi::OsStr {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(aufs::OPAQUE_MARKER.to_bytes())
}
