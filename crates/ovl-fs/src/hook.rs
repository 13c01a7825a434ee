//! Change hooks: how a stacking user of `OverlayFs` (the snapshot filesystem) sees every change
//! before it reaches the upper layer, at one place per kind of change.
//!
//! Every changing operation holds [`ChangeHook::gate`] (a shared lock) from its hook call until
//! its change is done, so the hook's owner can stop changes at one instant by taking the lock
//! exclusively. Inside the gate the operation calls the `before_*` method that fits; an error
//! there fails the operation with that errno and changes nothing.
//!
//! Paths are overlay paths (relative, `""` for the root), valid at the time of the call.

use std::path::Path;

use ovl_core::Result;

/// Anything held for the duration of a change; dropping it ends the change.
pub trait Held {}
impl<T> Held for T {}

/// What a changing operation holds while it runs (see [`ChangeHook::gate`]).
pub type GateGuard<'a> = Box<dyn Held + 'a>;

/// Called before each change; see the module docs.
pub trait ChangeHook: Send + Sync + 'static {
    /// The gate, held by each changing operation for its whole duration. `quiet` is true when
    /// the caller expects no hook work (a node already told in the current generation), so
    /// the hook owner need not keep readers of its own state out.
    fn gate(&self, quiet: bool) -> GateGuard<'_>;
    /// Called before the gate by a change that may be the first of `path`'s object in this
    /// generation (`removal`: it is about to be removed): the hook may do the slow part of its
    /// `before_*` work now, holding none of the locks the gate stands for, so that other changes
    /// need not wait for it. Only a hint: the change itself still calls `before_*` inside the
    /// gate, which must be right whatever happened here.
    fn prepare(&self, _path: &Path, _removal: bool) {}
    /// The current generation (read inside the gate). `0`: no hook work at all. A node whose
    /// `before_modify` succeeded in generation `g` is not asked again while it stays `g`.
    fn generation(&self) -> u64;
    /// The object at `path` is about to change (data, attributes or xattrs).
    fn before_modify(&self, path: &Path) -> Result<()>;
    /// A new object is about to be made at `path` (create, mkdir, mknod, symlink, link).
    fn before_create(&self, path: &Path) -> Result<()>;
    /// The object at `path` is about to be removed (unlink, rmdir, or replaced by a rename).
    fn before_remove(&self, path: &Path) -> Result<()>;
    /// `from` is about to move to `to` (both exist and swap places when `exchange`). A target
    /// that gets replaced has already been passed to `before_remove`.
    fn before_rename(&self, from: &Path, to: &Path, exchange: bool) -> Result<()>;
    /// The name `path` is gone (unlinked, removed, or renamed away), still inside the gate: the
    /// hook may drop what it kept only for that name. Best effort: nothing fails the change.
    fn after_remove(&self, _path: &Path) {}
}
