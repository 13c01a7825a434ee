//! The snapshot filesystem (issue 5): online copy-on-write snapshots of a directory LIVE.
//!
//! It owns the snapshot store (`store`: one kernel overlay layer per snapshot and the list of
//! snapshots), the copy-on-write rules that save the old state into the newest layer before a
//! change reaches LIVE (`cow`), the take gate and hook the live overlay calls (`snapper`), the
//! read-only `.snapshots/NAME` views (`view`), the FUSE routing between the live overlay and
//! the views (`fs`), the control socket (`control`), who may ask it what (`access`: the caller
//! as the kernel recorded it; `policy`: the grants) and the daemon's setup (`daemon`); `names` says how paths are printed and written in JSON. The live
//! tree is `ovl-fs`'s overlay with LIVE as its only (upper) layer.
//!
//! It must never write a layer the stock kernel overlay cannot mount as `lowerdir=u_k:...:LIVE`,
//! never let a change reach LIVE before the state it destroys is saved, never serve a view
//! that changes, and never act on, or tell, a caller of the control socket anything its
//! kernel-recorded credentials do not allow.

pub mod access;
pub mod check;
pub mod control;
mod cow;
pub mod daemon;
pub mod diff;
mod fs;
mod layerwalk;
mod merge;
pub mod names;
pub mod policy;
mod precopy;
mod refer;
mod resolver;
pub mod restore;
pub mod retention;
mod seal;
pub mod snapper;
pub mod store;
pub mod stream;
mod summary;
mod sys;
mod view;

pub use view::SNAPDIR_NAME;
