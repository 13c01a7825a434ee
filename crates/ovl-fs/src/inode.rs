//! The inode table: overlay objects known to the kernel, by node id and by identity.
//!
//! A node's id is also its `st_ino` (fuser sends one number for both in entry replies; for the
//! one exception, nodes of single names of a lower hard link, see `OverlayFs::shown_ino`). It is
//! derived from the
//! identity of the real object, `(filesystem index, real inode number)`, so that the same
//! object keeps the same number for the life of the mount; after a copy-up the node keeps its
//! number and gains the upper object's identity as an alias.
//!
//! Lock order: nodes' `names_lock`s, all of a request's at once in rising id
//! (`OverlayFs::hold_paths`), before the change gate; the table's lock before a node's `state` lock; a node's `copy_lock` before its
//! parent's `copy_lock` (copy-up walks from the node up), and no table or state lock is held
//! while waiting for a `copy_lock`. A node's `stage_lock` is taken with no other lock held
//! (`OverlayFs::stage_copy_up`, before the request holds its paths), and `staged` is a leaf.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ovl_lookup::{DirLayers, LowerObject};
use parking_lot::{Mutex, RwLock};
use rustix::fs::FileType;

/// The kernel's id of the root node.
pub(crate) const ROOT: u64 = 1;

/// The identity of a real object: which filesystem of the stack, which inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub fs: u8,
    pub ino: u64,
    /// Nonzero for one name of a hard-linked lower file: without an index, copying up one name
    /// breaks the link (as in the kernel with `index=off`), so each name is its own object.
    pub name: u64,
}

impl Key {
    /// The identity of the real object `ino` on filesystem `fs`.
    pub fn new(fs: u8, ino: u64) -> Self {
        Self { fs, ino, name: 0 }
    }
}

/// Where a node's object lives in the layers. Guarded by the node's `state` lock.
#[derive(Debug)]
pub(crate) struct NodeState {
    /// The names the node is known under, `(parent node, name)`; the first one is used to build
    /// its path. Empty for the root, and for a node whose every name was removed.
    pub names: Vec<(u64, OsString)>,
    /// The object exists in the upper layer at the node's path.
    pub upper: bool,
    /// For a non-dir not (yet) in the upper layer: the lower object shown.
    pub lower: Option<LowerObject>,
    /// For a metacopy file: the lower file that still holds the data.
    pub data: Option<LowerObject>,
    /// For a dir: the lower dirs that merge into it.
    pub lower_dirs: Vec<ovl_lookup::LowerDir>,
    /// For a dir: the upper dir is opaque.
    pub opaque: bool,
    /// The identities that map to this node.
    pub keys: Vec<Key>,
    /// With `index=on`, for a lower file with several links: its entry in `WORKDIR/index`.
    /// Once `upper` is set the object is that entry's inode (shared by every linked-up name),
    /// read and written there whichever name the kernel used.
    pub index: Option<std::ffi::CString>,
    /// The lower file's link count (for `overlay.nlink`), when `index` is set.
    pub lower_nlink: u64,
}

impl NodeState {
    /// The object's data lives in the upper layer (copied up, and not metacopy).
    pub fn has_upper_data(&self) -> bool {
        self.upper && self.data.is_none()
    }
}

/// One overlay object the kernel holds a reference to.
#[derive(Debug)]
pub(crate) struct Node {
    pub id: u64,
    pub kind: FileType,
    lookups: AtomicU64,
    pub state: RwLock<NodeState>,
    /// The node's names as paths use them: held shared by a request while it uses a path built
    /// from them or from a descendant's (`OverlayFs::hold_paths`), exclusive while a rename or
    /// removal changes them (a renamed directory's requests below it wait).
    pub names_lock: Arc<RwLock<()>>,
    /// Held while this node is copied up, so one copy is made however many callers race.
    pub copy_lock: Mutex<()>,
    /// Held while a copy of this node's data is made ahead of its copy-up, before its request
    /// holds any path (`OverlayFs::stage_copy_up`), so one copy is made however many race.
    pub stage_lock: Mutex<()>,
    /// That copy, waiting for the copy-up that places it (`crate::copyup::Staged`).
    pub staged: Mutex<Option<crate::copyup::Staged>>,
    /// The change-hook generation in which `before_modify` last succeeded for this node.
    pub hooked: AtomicU64,
    /// An open of this node was served through the kernel's page cache (see
    /// `crate::passthrough`): its cache may be warm, so it is not passed through.
    pub cached_once: std::sync::atomic::AtomicBool,
    /// A directory's layer dirs held open, with the layers they were opened for
    /// (`crate::dirfds`).
    pub held: Mutex<Option<Arc<crate::dirfds::HeldDir>>>,
    /// `held` was used since the budget last passed this node over.
    pub held_used: std::sync::atomic::AtomicBool,
    /// A directory's path and the locks of its ancestry, as last built (`OverlayFs::memo`):
    /// good while the table's path generation is the one it was built in.
    pub memo: Mutex<Option<Arc<PathMemo>>>,
}

/// A directory's path and the `names_lock`s of the nodes it is built from (the directory's own
/// first, the root's last), built in path generation `generation` ([`Table::paths`]). Locks, not
/// nodes: a memo never keeps another node alive.
#[derive(Debug)]
pub(crate) struct PathMemo {
    pub generation: u64,
    pub chain: Vec<(u64, Arc<RwLock<()>>)>,
    pub path: std::path::PathBuf,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        self.kind == FileType::Directory
    }

    /// The layers of this directory, given its overlay path.
    pub fn dir_layers(&self, path: &std::path::Path) -> DirLayers {
        let st = self.state.read();
        DirLayers { upper: st.upper.then(|| path.to_path_buf()), lowers: st.lower_dirs.clone() }
    }
}

struct Inner {
    nodes: HashMap<u64, Arc<Node>>,
    keys: HashMap<Key, u64>,
}

/// All nodes the kernel knows, by id and by identity.
pub(crate) struct Table {
    inner: RwLock<Inner>,
    next_alloc: AtomicU64,
    /// The path generation: raised after every change that may give a directory another path
    /// or ancestry (a rename; a directory forgotten, which a path can no longer pass through;
    /// a name removed from or given to a node of several or no names), so that paths and lock
    /// chains built before it are built again (`PathMemo`). A removal of a node's only name
    /// does not raise it (no other node's path runs through a removed name: a removed dir is
    /// empty); the node's own memo is dropped instead.
    paths: AtomicU64,
}

impl Table {
    /// A table holding only the root node.
    pub fn new(root_key: Key, root: NodeState) -> Self {
        let node = Arc::new(Node {
            id: ROOT,
            kind: FileType::Directory,
            lookups: AtomicU64::new(1),
            state: RwLock::new(root),
            names_lock: Arc::default(),
            copy_lock: Mutex::new(()),
            stage_lock: Mutex::new(()),
            staged: Mutex::new(None),
            hooked: AtomicU64::new(0),
            cached_once: std::sync::atomic::AtomicBool::new(false),
            held: Mutex::new(None),
            held_used: std::sync::atomic::AtomicBool::new(false),
            memo: Mutex::new(None),
        });
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, node);
        let mut keys = HashMap::new();
        keys.insert(root_key, ROOT);
        Self {
            inner: RwLock::new(Inner { nodes, keys }),
            next_alloc: AtomicU64::new(1 << 63),
            paths: AtomicU64::new(0),
        }
    }

    /// The path generation now (see [`Table::paths`]).
    pub fn paths(&self) -> u64 {
        self.paths.load(Ordering::SeqCst)
    }

    /// Raises the path generation, after a change of names that may move paths (see
    /// [`Table::paths`]); called by the changer before it lets go of its locks.
    pub fn paths_moved(&self) {
        self.paths.fetch_add(1, Ordering::SeqCst);
    }

    /// The node with id `id`.
    pub fn get(&self, id: u64) -> Option<Arc<Node>> {
        self.inner.read().nodes.get(&id).cloned()
    }

    /// The node an identity maps to, if any.
    pub fn by_key(&self, key: Key) -> Option<Arc<Node>> {
        let inner = self.inner.read();
        inner.keys.get(&key).and_then(|id| inner.nodes.get(id)).cloned()
    }

    /// Forgets that `key` names an existing node: that node's object is gone and its inode
    /// number was reused by the filesystem for the object being registered. The node itself
    /// lives on (the kernel may still hold it) but is no longer found by that identity, so the
    /// new object gets a node (and kernel inode) of its own.
    pub fn detach_key(&self, key: Key) {
        let mut inner = self.inner.write();
        if let Some(id) = inner.keys.remove(&key) {
            if let Some(node) = inner.nodes.get(&id) {
                node.state.write().keys.retain(|k| *k != key);
            }
        }
    }

    /// The node id an identity has or would get; for `d_ino` in directory listings.
    pub fn ino_for(&self, key: Key) -> u64 {
        // An identity's derived number first: a node of a reused inode number has an id of
        // its own but shows the derived number (`OverlayFs::shown_ino`), and d_ino agrees.
        let mapped = self.inner.read().keys.get(&key).copied();
        match (mapped, derived_ino(key)) {
            (Some(ROOT), _) => ROOT,
            (_, Some(n)) => n,
            (Some(id), None) => id,
            (None, None) => key.ino,
        }
    }

    /// Finds the node for `key` or makes one with `make`, and counts one kernel lookup.
    /// Returns the node and whether it was just made.
    pub fn lookup_or_insert(&self, key: Key, kind: FileType, make: impl FnOnce() -> NodeState) -> (Arc<Node>, bool) {
        let mut inner = self.inner.write();
        if let Some(node) = inner.keys.get(&key).and_then(|id| inner.nodes.get(id)) {
            if node.kind == kind {
                node.lookups.fetch_add(1, Ordering::Relaxed);
                return (node.clone(), false);
            }
        }
        let mut id = derive(key);
        if id == 0 || id == ROOT || inner.nodes.contains_key(&id) {
            id = self.next_alloc.fetch_add(1, Ordering::Relaxed);
        }
        let mut state = make();
        state.keys = vec![key];
        let node = Arc::new(Node {
            id,
            kind,
            lookups: AtomicU64::new(1),
            state: RwLock::new(state),
            names_lock: Arc::default(),
            copy_lock: Mutex::new(()),
            stage_lock: Mutex::new(()),
            staged: Mutex::new(None),
            hooked: AtomicU64::new(0),
            cached_once: std::sync::atomic::AtomicBool::new(false),
            held: Mutex::new(None),
            held_used: std::sync::atomic::AtomicBool::new(false),
            memo: Mutex::new(None),
        });
        inner.nodes.insert(id, node.clone());
        inner.keys.insert(key, id);
        (node, true)
    }

    /// Counts one more kernel lookup of `node` (readdirplus, link).
    pub fn add_lookup(&self, node: &Node) {
        node.lookups.fetch_add(1, Ordering::Relaxed);
    }

    /// Maps another identity (the upper object after a copy-up) to `node`.
    pub fn add_key(&self, node: &Node, key: Key) {
        let mut inner = self.inner.write();
        inner.keys.insert(key, node.id);
        node.state.write().keys.push(key);
    }

    /// Drops `n` kernel lookups; forgets the node when none remain.
    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT {
            return;
        }
        let mut inner = self.inner.write();
        let Some(node) = inner.nodes.get(&id).cloned() else { return };
        let prev = node.lookups.fetch_sub(n.min(node.lookups.load(Ordering::Relaxed)), Ordering::Relaxed);
        if prev <= n {
            inner.nodes.remove(&id);
            if node.is_dir() {
                self.paths_moved();
            }
            for k in &node.state.read().keys {
                if inner.keys.get(k) == Some(&id) {
                    inner.keys.remove(k);
                }
            }
        }
    }

    /// Removes the name `(parent, name)` from `node`; when no name is left the node's
    /// identities are released so a new object reusing the inode number gets a new node.
    pub fn unlink_name(&self, node: &Node, parent: u64, name: &OsStr) {
        let released = {
            let mut st = node.state.write();
            st.names.retain(|(p, n)| !(*p == parent && n == name));
            if st.names.is_empty() {
                node.memo.lock().take();
                std::mem::take(&mut st.keys)
            } else {
                // Its path may now run through another name.
                self.paths_moved();
                Vec::new()
            }
        };
        if !released.is_empty() {
            let mut inner = self.inner.write();
            for k in released {
                if inner.keys.get(&k) == Some(&node.id) {
                    inner.keys.remove(&k);
                }
            }
        }
    }
}

/// The node id for an identity: the real inode number, with the filesystem index in the top
/// byte so numbers from different filesystems never collide; numbers that do not fit are
/// allocated from the top half.
/// The number an identity shows when no other object claims it first: its derived id, or for
/// a number too large to derive one from, the real inode number itself.
pub(crate) fn natural_ino(key: Key) -> u64 {
    match derive(Key { name: 0, ..key }) {
        0 => key.ino,
        id => id,
    }
}

/// The number derived from an identity of one object (not one name of a lower hard link),
/// if it fits (`derive`).
pub(crate) fn derived_ino(key: Key) -> Option<u64> {
    Some(derive(key)).filter(|n| *n != 0)
}

fn derive(key: Key) -> u64 {
    if key.ino < (1 << 56) && key.name == 0 { ((key.fs as u64) << 56) | key.ino } else { 0 }
}
