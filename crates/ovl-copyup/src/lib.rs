//! Every object the overlay writes into an upper layer on a user's behalf: copy-up of lower
//! objects, whiteouts, opaque directories, and objects created over a whiteout. Whiteouts are
//! the kernel's 0/0 devices, or `.wh.NAME` files only where the upper fs refuses those
//! ([`ovl_core::LayerStack::writes_whiteout_files`]); a `.wh.NAME` another program left in the
//! upper layer is turned into a kernel whiteout before an object takes the name
//! ([`settle_aufs_whiteout`]).
//!
//! Each change is built in `WORKDIR/work` (an `O_TMPFILE` for regular files, a temporary name
//! for the rest), given its data, owner, mode, times and xattrs, and only then linked or renamed
//! into place, so a killed daemon leaves either the old state or the new one, never a half-made
//! object in the upper layer. Stale work entries are removed when the stack is opened
//! ([`ovl_core::LayerStack::open`]).
//!
//! Architecture invariant: this is the only crate that creates, replaces or removes objects in
//! an upper layer. It never copies overlay-private xattrs (`*.overlay.*`) from a lower object,
//! and it never decides *whether* a copy-up is needed: its callers (ovl-fs, snap-fs) do, holding
//! the per-inode lock that makes one copy-up per object.
//!
//! ```no_run
//! # use ovl_core::{LayerStack, MountOptions, LayerId};
//! # let stack = LayerStack::open(&MountOptions::parse("lowerdir=/l,upperdir=/u,workdir=/w").unwrap()).unwrap();
//! let src = ovl_copyup::Source { layer: LayerId(1), path: "a/b".into() };
//! // The upper dir `a` by its path from the upper root...
//! ovl_copyup::copy_up(&stack, &src, std::path::Path::new("a"), &|_| {}).unwrap();
//! // ...or by a descriptor of it the caller holds: no path walked.
//! let held = std::fs::File::open("/u/a").unwrap();
//! let a = ovl_copyup::UpperDir::Held(std::os::fd::AsFd::as_fd(&held));
//! ovl_copyup::set_opaque(&stack, a).unwrap();
//! ```

mod copy;
mod dir;
mod index;
mod upper;

pub use copy::{
    PreparedCopy, Source, copy_up, copy_up_data, copy_up_meta, copy_up_replacing, place_copy, prepare_copy,
};
pub use dir::UpperDir;
pub use index::{copy_up_to_index, link_up, remove_index, set_nlink_upper};
pub use upper::{
    Created, SHARED_WHITEOUT, clear_dir, create_fresh, create_over_whiteout, mark_impure, remove_aufs_whiteout,
    remove_upper, remove_whiteout, replace_with_whiteout, set_opaque, set_redirect, settle_aufs_whiteout, whiteout,
};
