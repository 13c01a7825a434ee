//! Name lookup down the layer stack and the merged directory listing.
//!
//! Given where a directory lives in each layer ([`DirLayers`]), [`lookup`] finds what a name in
//! it is in the merged view: the topmost object wins, whiteouts and xwhiteouts hide everything
//! below, a non-directory or an opaque directory stops the descent, and directories of the same
//! name in lower layers merge. [`read_merged`] lists a merged directory: the union of the
//! layers' entries, each name once, whiteouts filtered out. Stacks that read it also honour the
//! AUFS/OCI encoding (`.wh.NAME`, `.wh..wh..opq`) of image layers and fuse-overlayfs's markers.
//!
//! Architecture invariant: this crate never writes to a layer. It knows nothing of FUSE or of
//! inode numbers of the mount.
//!
//! ```no_run
//! # use ovl_core::{LayerStack, MountOptions};
//! # let stack = LayerStack::open(&MountOptions::parse("lowerdir=/l").unwrap()).unwrap();
//! let root = ovl_lookup::DirLayers::root(&stack).unwrap();
//! for e in ovl_lookup::read_merged(&stack, &root).unwrap() {
//!     println!("{:?}", e.name);
//! }
//! ```

mod aufs;
mod identity;
mod index;
mod lookup;
mod probe;
mod readdir;
mod redirect;

pub use identity::{Identity, OriginTarget, identity, resolve_origin};
pub use index::{IndexRef, index_of};
pub use lookup::{DirLayers, Entry, LowerDir, LowerObject, lookup, lookup_in, lower_has_name};
pub use probe::{DirHandles, KeptDirs, with_dir_cache};
pub use readdir::{MergedEntry, read_merged};
pub use redirect::{MAX_REDIRECT, parse_redirect_value, redirect_error, redirect_is_valid};
