//! The overlay on-disk format and the layer stack, shared by every other crate.
//!
//! `ovl-core` owns what the Linux kernel's overlayfs writes to disk and how we read it back: the
//! names of the overlay xattrs (`trusted.overlay.*`, or `user.overlay.*` with `userxattr`),
//! whiteouts (0/0 character devices, and "xwhiteouts" in `opaque=x` directories), opaque
//! directories (and, read beside them, the AUFS/OCI `.wh.` encoding of image layers: [`aufs`]), the mount options and the validated [`LayerStack`] of lower, upper and work
//! directories (each layer's root held open, or opened while used within a budget: [`LayerRoot`]),
//! and the POSIX ACL xattr format ([`acl`]: what a new object inherits). It also holds the thin [`sys`] wrappers that every crate uses to touch a layer
//! (`openat2` confined beneath the layer root, xattrs by directory fd, `FICLONE`) and the
//! [`Error`] type that maps to an errno at the FUSE boundary.
//!
//! It must not know about FUSE, inodes of the mount, or snapshots, and it never decides *when* to
//! write into a layer: it only knows *how* an object is encoded.
//!
//! ```no_run
//! use ovl_core::{MountOptions, LayerStack};
//! let opts = MountOptions::parse("lowerdir=/l1:/l2,upperdir=/u,workdir=/w").unwrap();
//! let stack = LayerStack::open(&opts).unwrap();
//! assert_eq!(stack.lowers().len(), 2);
//! ```

pub mod acl;
pub mod aufs;
mod error;
mod format;
pub mod idmap;
pub mod index;
mod layer;
mod options;
pub mod origin;
pub mod presence;
mod root;
pub mod statoverride;
pub mod sys;
pub mod unprivileged;

pub use error::{Errno, Error, Result, StackError};
pub use format::{KNOWN_KEYS, Opaque, XattrNames, is_whiteout_stat, make_whiteout, metacopy_value_is_valid};
pub use layer::{Layer, LayerId, LayerStack, UpperLayer};
pub use options::{MountOptions, RedirectDir, Uring};
pub use origin::{Origin, OriginError};
pub use root::{LayerRoot, RootPool};
