//! `ovlfs`: the kernel overlay filesystem, served over FUSE.
//!
//! This crate is the only one that knows fuser. It owns the inode table (node ids that are also
//! stable `st_ino`s, names and layer locations per node), the open file and directory tables,
//! the [`fuser::Filesystem`] implementation (thin handlers in `ops`, the logic in modules by
//! concern: `entries` for names, `data` for contents and attributes, `dirs` for listings,
//! `xattrs`), and the mount itself ([`mount`]). Lookups and listings come from `ovl-lookup`;
//! every object the overlay writes into the upper layer on its own behalf (copy-up, whiteouts,
//! opaque dirs, creation over a whiteout) comes from `ovl-copyup`.
//!
//! It must not encode the on-disk format itself (that is `ovl-core`), and it must never let an
//! error become a panic: every handler replies with an errno.
//!
//! ```no_run
//! let opts = ovl_core::MountOptions::parse("lowerdir=/l,upperdir=/u,workdir=/w").unwrap();
//! let session = ovl_fs::mount::Mount::new(&opts, "/mnt".as_ref(), "ovlfs").unwrap();
//! session.run().unwrap(); // until `umount /mnt`
//! ```

pub mod check;
mod copyup;
mod data;
mod dirfds;
mod dirs;
mod dispatch;
mod entries;
mod fs;
pub mod glue;
pub mod hook;
mod ids;
mod inode;
pub mod limits;
pub mod mount;
mod passthrough;
mod xattrs;

pub use dispatch::errno;
pub use fs::OverlayFs;
pub use glue::{Glue, Served};
