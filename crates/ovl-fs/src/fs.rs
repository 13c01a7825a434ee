//! The overlay filesystem state and the helpers every operation shares: node paths, attributes,
//! copy-up of a node and its parents, and the handle tables.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use fuser::INodeNo;
use ovl_core::sys;
use ovl_core::{Errno, LayerStack, Result};
use ovl_lookup::{DirLayers, Entry};
use ovl_proto::{Attr, Kind};
use parking_lot::{Mutex, RwLock};
use rustix::fs::{FileType, Stat};

use crate::hook::{ChangeHook, GateGuard};
use crate::inode::{Key, Node, NodeState, PathMemo, ROOT, Table};

/// An open regular file: the real file it reads and writes. A file opened in a lower layer
/// switches to the upper copy once the node is copied up, so a descriptor opened before the
/// copy-up sees what is written through others after it (as with the kernel since 4.19).
#[derive(Debug)]
pub(crate) struct OpenFile {
    pub node: Arc<Node>,
    pub flags: i32,
    pub file: RwLock<Arc<File>>,
    pub on_lower: AtomicBool,
}

/// An open directory: its merged listing, taken at the first readdir and again at each rewind, so
/// offsets stay valid across readdir calls and seekdir; and its lower layers' dirs as readdirplus
/// looks up its entries (see [`ovl_lookup::KeptDirs`]).
#[derive(Default)]
pub(crate) struct OpenDir {
    pub entries: Vec<(OsString, Kind, u64)>,
    pub kept: ovl_lookup::KeptDirs,
}

/// The open file and directory handles.
#[derive(Default)]
pub(crate) struct Handles {
    next: AtomicU64,
    pub files: RwLock<HashMap<u64, Arc<OpenFile>>>,
    pub dirs: RwLock<HashMap<u64, Arc<Mutex<OpenDir>>>>,
}

impl Handles {
    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The open file `fh`, checked to belong to node `ino`.
    pub fn get(&self, fh: u64, ino: u64) -> Result<Arc<OpenFile>> {
        match self.files.read().get(&fh) {
            Some(f) if f.node.id == ino => Ok(f.clone()),
            _ => Err(Errno::BADF.into()),
        }
    }
}

/// A request's hold on its nodes' paths ([`OverlayFs::hold`], [`OverlayFs::hold_paths`]): the
/// `names_lock`s of those nodes and of every ancestor, shared, and of the nodes a change renames
/// or removes, exclusive.
pub(crate) struct Held {
    _shared: Vec<parking_lot::ArcRwLockReadGuard<parking_lot::RawRwLock, ()>>,
    _exclusive: Vec<parking_lot::ArcRwLockWriteGuard<parking_lot::RawRwLock, ()>>,
}

impl Held {
    fn none() -> Self {
        Self { _shared: Vec::new(), _exclusive: Vec::new() }
    }
}

/// The `names_lock`s a path of a node is built from, the node's own first (see `PathMemo`).
type Chain = Vec<(u64, Arc<RwLock<()>>)>;

/// How [`OverlayFs::hold_paths`] takes shared locks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// As a request does: behind a rename waiting for the lock.
    Fair,
    /// For a caller that may hold some of them already (never behind a waiting rename).
    Recursive,
    /// Not at all: `None` if any is held exclusive.
    Try,
}

/// The overlay filesystem served over FUSE.
pub struct OverlayFs {
    pub(crate) stack: LayerStack,
    pub(crate) table: Table,
    pub(crate) handles: Handles,
    /// How long the kernel may keep an entry and its attributes (1 s unless told,
    /// [`OverlayFs::with_ttl`]).
    pub(crate) ttl: Duration,
    /// How long the kernel may remember that a name does not exist (a lookup answered with node
    /// 0 instead of `ENOENT`); zero, the default, answers `ENOENT` (see
    /// [`OverlayFs::cache_missing_names`]).
    pub(crate) negative_ttl: Duration,
    /// Told of every change before it is made (the snapshot filesystem).
    pub(crate) hook: Option<Arc<dyn ChangeHook>>,
    /// Names in the root dir that do not exist for the mount's users.
    pub(crate) hidden: Vec<OsString>,
    /// Tells the kernel to drop cached attributes, once the session is up (see
    /// [`OverlayFs::notifier_slot`]).
    pub(crate) notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// How open files are served: by the daemon or passed through (`crate::passthrough`).
    pub(crate) passthrough: crate::passthrough::Passthrough,
    /// `FUSE_HANDLE_KILLPRIV_V2` was negotiated: the daemon clears set-ID bits on writes,
    /// truncates and `O_TRUNC` opens by callers without `CAP_FSETID` (see `kill_suidgid`).
    pub(crate) killpriv: bool,
    /// `FUSE_POSIX_ACL` and `FUSE_DONT_MASK` were negotiated: the kernel enforces and caches
    /// ACLs, and the daemon applies the umask or, instead, the parent's default ACL to new objects.
    pub(crate) posix_acl: bool,
    /// ID shift and override xattrs: how owners and modes read and write (`crate::ids`).
    pub(crate) owners: crate::ids::Owners,
    /// The longest name any layer's filesystem takes (`f_namemax`): a longer name is
    /// `ENAMETOOLONG` at lookup, before any layer is asked, as in the kernel's `ovl_lookup`;
    /// `statfs` shows it.
    pub(crate) namelen: usize,
    /// Directory nodes' layer dirs held open, within a budget (`crate::dirfds`).
    pub(crate) dir_fds: crate::dirfds::DirFds,
    /// This process's user and group IDs where its umask is 0, read at the first create
    /// (`OverlayFs::creator`).
    creator: std::sync::OnceLock<Option<(u32, u32)>>,
}

impl OverlayFs {
    /// An overlay of `stack`, ready to be mounted.
    pub fn new(stack: LayerStack) -> Result<Self> {
        let root = DirLayers::root(&stack)?;
        let (root_key, upper) = match stack.upper() {
            Some(u) => (Key::new(u.layer().fs_index(), rustix::fs::fstat(u.layer().root()?)?.st_ino), true),
            None => {
                let l = &stack.lowers()[0];
                (Key::new(l.fs_index(), rustix::fs::fstat(l.root()?)?.st_ino), false)
            }
        };
        let opaque = stack.upper().is_some() && root.lowers.is_empty();
        let owners = crate::ids::Owners::open(&stack)?;
        let mut namelen = 0;
        for root in stack.upper().map(|u| u.layer().root()).into_iter().chain(stack.lowers().iter().map(|l| l.root())) {
            namelen = namelen.max(rustix::fs::fstatfs(root?)?.f_namelen as usize);
        }
        let state = NodeState {
            names: Vec::new(),
            upper,
            lower: None,
            data: None,
            lower_dirs: root.lowers,
            opaque,
            keys: vec![root_key],
            index: None,
            lower_nlink: 0,
        };
        Ok(Self {
            table: Table::new(root_key, state),
            stack,
            handles: Handles::default(),
            ttl: Duration::from_secs(1),
            negative_ttl: Duration::ZERO,
            hook: None,
            hidden: Vec::new(),
            notifier: Arc::default(),
            killpriv: false,
            posix_acl: false,
            passthrough: Default::default(),
            owners,
            namelen,
            dir_fds: crate::dirfds::DirFds::new(crate::dirfds::DirFds::default_budget()),
            creator: std::sync::OnceLock::new(),
        })
    }

    /// Lets the kernel keep entries and attributes for `ttl` instead of 1 s. Safe for as long as
    /// every change reaches the layers through this mount, as a kernel overlay assumes (its
    /// dentries never expire): the kernel updates or drops what it keeps at each change it
    /// sends, and the daemon tells it of the changes it makes on its own (`forget_attrs`). Not
    /// for a filesystem stacked over this one that changes the view by other means (the snapshot
    /// filesystem's views and rollbacks): it keeps 1 s.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Lets the kernel remember for as long as it keeps an entry ([`Self::ttl`]) that a name
    /// looked up does not exist, as it keeps negative dentries on a kernel overlay: a name looked
    /// up again (a container runtime probes the same missing paths several times at each start)
    /// costs no round trip. Every change through the mount updates the kernel's entry itself;
    /// a name made in a layer behind the mount's back shows within the TTL, as a changed one
    /// does. Not for a filesystem stacked over this one that changes the view by other means
    /// (the snapshot filesystem's views and rollbacks): it keeps the default, `ENOENT`.
    pub fn cache_missing_names(mut self) -> Self {
        self.negative_ttl = self.ttl;
        self
    }

    /// Holds at most `budget` descriptors of directories' layer dirs open (`crate::dirfds`;
    /// default: a quarter of the open-file limit, at most 8192; 0: none, every request walks
    /// its path from the layer roots).
    pub fn with_dir_handle_budget(mut self, budget: usize) -> Self {
        self.dir_fds = crate::dirfds::DirFds::new(budget);
        self
    }

    /// Calls `hook` before every change (see [`crate::hook`]).
    pub fn with_hook(mut self, hook: Arc<dyn ChangeHook>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Makes `name` in the root dir invisible: lookups fail with `ENOENT`, listings skip it, and
    /// nothing can be created, renamed or removed under that name (`EPERM`).
    pub fn hide_root_name(mut self, name: &OsStr) -> Self {
        self.hidden.push(name.to_os_string());
        self
    }

    /// True when `name` in `parent` is hidden from the mount's users.
    pub(crate) fn is_hidden(&self, parent: &Node, name: &OsStr) -> bool {
        parent.id == ROOT && self.hidden.iter().any(|h| h == name)
    }

    /// The change gate for an operation that may call any hook, when there is a hook.
    pub(crate) fn gate(&self) -> Option<GateGuard<'_>> {
        self.hook.as_ref().map(|h| h.gate(false))
    }

    /// The change gate for an operation that changes `node` only: quiet when the node was
    /// already told in the current generation (which changes only while the gate is closed).
    pub(crate) fn gate_for(&self, node: &Node) -> Option<GateGuard<'_>> {
        let h = self.hook.as_deref()?;
        loop {
            let quiet = node.hooked.load(Ordering::Acquire) == h.generation();
            let g = h.gate(quiet);
            if !quiet || node.hooked.load(Ordering::Acquire) == h.generation() {
                return Some(g);
            }
        }
    }

    /// The hook's generation, `0` when there is nothing to tell.
    fn hook_generation(&self) -> Option<(&dyn ChangeHook, u64)> {
        let h = self.hook.as_deref()?;
        let g = h.generation();
        (g != 0).then_some((h, g))
    }

    /// First thing in a request that may change node `ino`, before it holds paths and the
    /// gate: lets the hook prepare for the node's first change in this generation (see
    /// [`ChangeHook::prepare`]; a big copy then holds no lock other requests need). The path is
    /// read without holding it: a rename racing with it only makes the hint useless.
    pub(crate) fn prepare_change(&self, ino: INodeNo) {
        let Some((h, g)) = self.hook_generation() else { return };
        let Ok(node) = self.node(ino) else { return };
        if node.hooked.load(Ordering::Acquire) != g {
            if let Ok(path) = self.path_of(&node) {
                h.prepare(&path, false);
            }
        }
    }

    /// Like [`Self::prepare_change`] for `name` in `parent` (renamed, or removed when `removal`).
    pub(crate) fn prepare_change_at(&self, parent: INodeNo, name: &OsStr, removal: bool) {
        let Some((h, _)) = self.hook_generation() else { return };
        let Ok(parent) = self.node(parent) else { return };
        if self.is_hidden(&parent, name) {
            return;
        }
        if let Ok(path) = self.path_of(&parent) {
            h.prepare(&path.join(name), removal);
        }
    }

    /// Tells the hook that `node` is about to change, once per generation.
    pub(crate) fn hook_modify(&self, node: &Node) -> Result<()> {
        let Some((h, g)) = self.hook_generation() else { return Ok(()) };
        if node.hooked.load(Ordering::Acquire) == g {
            return Ok(());
        }
        h.before_modify(&self.path_of(node)?)?;
        node.hooked.store(g, Ordering::Release);
        Ok(())
    }

    /// Tells the hook that `name` is about to be created in `parent`.
    pub(crate) fn hook_create(&self, parent: &Node, name: &OsStr) -> Result<()> {
        let Some((h, _)) = self.hook_generation() else { return Ok(()) };
        h.before_create(&self.path_of(parent)?.join(name))
    }

    /// Tells the hook that `name` in `parent` is about to be removed.
    pub(crate) fn hook_remove(&self, parent: &Node, name: &OsStr) -> Result<()> {
        let Some((h, _)) = self.hook_generation() else { return Ok(()) };
        h.before_remove(&self.path_of(parent)?.join(name))
    }

    /// Tells the hook that `name` in `parent` is gone (see [`ChangeHook::after_remove`]).
    pub(crate) fn hook_after_remove(&self, parent: &Node, name: &OsStr) {
        let Some((h, _)) = self.hook_generation() else { return };
        if let Ok(p) = self.path_of(parent) {
            h.after_remove(&p.join(name));
        }
    }

    /// Tells the hook about a rename.
    pub(crate) fn hook_rename(&self, from: (&Node, &OsStr), to: (&Node, &OsStr), exchange: bool) -> Result<()> {
        let Some((h, _)) = self.hook_generation() else { return Ok(()) };
        h.before_rename(&self.path_of(from.0)?.join(from.1), &self.path_of(to.0)?.join(to.1), exchange)
    }

    /// Where the mount puts the session's notifier once the session exists (the filesystem
    /// moves into the session, so it cannot be given one before).
    pub fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// Makes the kernel drop the cached attributes of `ids`. For a change the kernel does not
    /// expect: a rename that fails in the upper layer after changing it (ext4 restores the
    /// source entry of a failed `RENAME_WHITEOUT`, which updates the source dir's times). Only
    /// attributes (offset -1): no page is locked, so it is safe while the kernel waits on us.
    pub(crate) fn forget_attrs(&self, ids: &[u64]) {
        if let Some(n) = self.notifier.get() {
            for id in ids {
                if let Err(e) = n.inval_inode(INodeNo(*id), -1, 0) {
                    tracing::debug!(id, %e, "attribute invalidation not sent");
                }
            }
        }
    }

    /// Makes the kernel drop its cached listings (`FOPEN_CACHE_DIR`) of directories `ids`: the
    /// numbers they list changed. Sent from a thread of its own after the request (dropping a
    /// directory's cached pages locks them, which a request in flight must not wait for).
    pub(crate) fn forget_listings(&self, ids: Vec<u64>) {
        let Some(n) = self.notifier.get().cloned() else { return };
        let sent = std::thread::Builder::new().name("ovlfs-inval".into()).spawn(move || {
            for id in ids {
                if let Err(e) = n.inval_inode(INodeNo(id), 0, 0) {
                    tracing::debug!(id, %e, "listing invalidation not sent");
                }
            }
        });
        if let Err(e) = sent {
            tracing::debug!(%e, "listing invalidation not started");
        }
    }

    /// The layer stack being served.
    pub fn stack(&self) -> &LayerStack {
        &self.stack
    }

    pub(crate) fn node(&self, ino: INodeNo) -> Result<Arc<Node>> {
        self.table.get(ino.0).ok_or_else(|| Errno::STALE.into())
    }

    /// Node `ino` for a request that builds paths from its names (and its parents'): holds the
    /// names of the node and of every ancestor shared until the [`Held`] drops (see
    /// [`Self::hold_paths`]).
    pub(crate) fn hold(&self, ino: INodeNo) -> Result<(Held, Arc<Node>)> {
        let node = self.node(ino)?;
        let held = self.hold_paths(&[&node], &[], Wait::Fair).ok_or(Errno::IO)?;
        Ok((held, node))
    }

    /// The paths of `nodes` held together, for a request that uses several (see
    /// [`Self::hold_paths`]).
    pub(crate) fn hold_nodes(&self, nodes: &[&Arc<Node>]) -> Held {
        // Never `None` when waiting.
        self.hold_paths(nodes, &[], Wait::Fair).unwrap_or(Held::none())
    }

    /// Like [`Self::hold`] for a node in hand, by a caller that may hold some of these locks
    /// already (a write on an open file telling the hook, a file switched to its upper copy).
    pub(crate) fn hold_again(&self, node: &Arc<Node>) -> Held {
        // Never `None` when waiting.
        self.hold_paths(&[node], &[], Wait::Recursive).unwrap_or(Held::none())
    }

    /// [`Self::hold`] by a caller that holds other nodes' paths already and so must not wait
    /// (out of order): `None` when a rename or removal holds one of them.
    pub(crate) fn try_hold(&self, node: &Arc<Node>) -> Option<Held> {
        self.hold_paths(&[node], &[], Wait::Try)
    }

    /// The locks of the nodes from `node` up to the root along first live names (see
    /// [`Self::path_of`]): those whose names a path of `node` is built from. A directory's are
    /// its memo's (`Self::memo`), a non-directory's its own and its parent's memo's. Where no
    /// path can be built, the walk stops early, where a name leads to a node the table no
    /// longer has (that path fails later, as it would have).
    fn chain(&self, node: &Arc<Node>) -> Chain {
        let own = (node.id, node.names_lock.clone());
        if node.is_dir() {
            if let Some(m) = self.memo(node) {
                return m.chain.clone();
            }
        } else if let Some(m) = self.live_parent(node).filter(|p| p.is_dir()).and_then(|p| self.memo(&p)) {
            return std::iter::once(own).chain(m.chain.iter().cloned()).collect();
        }
        let mut out = vec![own];
        let mut cur = node.clone();
        while cur.id != ROOT && out.len() <= 4096 {
            let Some(parent) = self.live_parent(&cur) else { break };
            out.push((parent.id, parent.names_lock.clone()));
            cur = parent;
        }
        out
    }

    /// Directory `node`'s path and the locks it is built from: its memo if it was built in
    /// this path generation (`Table::paths`: no rename since, nor anything else that moves
    /// paths), else built now from the first live names up to the root, or up to the first
    /// ancestor with a memo of this generation, and kept. `None` where no path can be built.
    pub(crate) fn memo(&self, node: &Node) -> Option<Arc<PathMemo>> {
        let generation = self.table.paths();
        if let Some(m) = node.memo.lock().as_ref().filter(|m| m.generation == generation) {
            return Some(m.clone());
        }
        let mut chain: Chain = vec![(node.id, node.names_lock.clone())];
        let mut parts: Vec<OsString> = Vec::new();
        let mut id = node.id;
        let mut cur: Option<Arc<Node>> = None;
        let mut base = PathBuf::new();
        while id != ROOT {
            let (parent, name) = match &cur {
                Some(c) => self.live_name(c)?,
                None => self.live_name(node)?,
            };
            parts.push(name);
            if chain.len() > 4096 {
                return None;
            }
            let p = self.table.get(parent)?;
            let ready = p.memo.lock().as_ref().filter(|m| m.generation == generation).cloned();
            if let Some(m) = ready {
                chain.extend(m.chain.iter().cloned());
                base = m.path.clone();
                break;
            }
            chain.push((p.id, p.names_lock.clone()));
            id = p.id;
            cur = Some(p);
        }
        let mut path = base;
        path.extend(parts.iter().rev());
        let memo = Arc::new(PathMemo { generation, chain, path });
        *node.memo.lock() = Some(memo.clone());
        Some(memo)
    }

    /// Holds the paths of `nodes` (their names and their ancestors', shared) and the names of
    /// `changed` (exclusive: the nodes a rename or removal renames; their parents' paths are
    /// among `nodes`). Objects are reached by path from a layer root, so a path must not change
    /// between being computed from the node table and being used, and a name changes only under
    /// its node's lock held exclusive: a rename of a directory waits for the requests on
    /// anything below it, and holds up only those. Every lock is taken in rising node id, so
    /// that two holds never wait for each other (before the change hook's gate); the ancestry
    /// is read first without locks, and read again under them: if a rename changed it
    /// meanwhile, everything is let go and taken again.
    fn hold_paths(&self, nodes: &[&Arc<Node>], changed: &[Arc<Node>], wait: Wait) -> Option<Held> {
        for attempt in 0.. {
            let generation = self.table.paths();
            let mut held = Held::none();
            let chains: Vec<Chain> = nodes.iter().map(|n| self.chain(n)).collect();
            let mut locks: Vec<(u64, &Arc<RwLock<()>>, bool)> = Vec::with_capacity(8);
            for (id, lock) in chains.iter().flatten() {
                locks.push((*id, lock, false));
            }
            for n in changed {
                locks.push((n.id, &n.names_lock, true));
            }
            // By id, an exclusive one first among equal ids, and then only it.
            locks.sort_by_key(|(id, _, exclusive)| (*id, !*exclusive));
            locks.dedup_by_key(|(id, _, _)| *id);
            for (_, lock, exclusive) in locks {
                if exclusive {
                    held._exclusive.push(lock.write_arc());
                    continue;
                }
                held._shared.push(match wait {
                    Wait::Fair => lock.read_arc(),
                    Wait::Recursive => lock.read_arc_recursive(),
                    Wait::Try => lock.try_read_recursive_arc()?,
                });
            }
            // Nothing moved paths since the chains were read: they stand. (A change that moves
            // them holds a node of each chain it moves exclusive until it has raised the
            // generation, so a chain read while it ran was waited for above.)
            let same = self.table.paths() == generation
                || nodes
                    .iter()
                    .zip(&chains)
                    .all(|(n, before)| self.chain(n).iter().map(|a| a.0).eq(before.iter().map(|a| a.0)));
            if same || attempt >= 100 {
                if !same {
                    tracing::warn!("node paths kept changing while being held: going on with the last");
                }
                return Some(held);
            }
            drop(held);
            if wait == Wait::Try {
                return None;
            }
            std::thread::yield_now();
        }
        None
    }

    /// Holds the paths of the parents and the nodes a rename of `from` to `to` changes, found
    /// under a first hold of the parents' paths; with what those lookups found, where it still
    /// stands under the final hold, so the rename need not look its names up again (see
    /// [`Self::hold_names`]). A moved directory's requests below it wait.
    pub(crate) fn hold_change(
        &self,
        from: (&Arc<Node>, &OsStr),
        to: (&Arc<Node>, &OsStr),
    ) -> (Held, Option<(Entry, Option<Entry>)>) {
        let (held, found) = self.hold_names(&[from, to]);
        let found = found.and_then(|f| {
            let [src, dst]: [Option<Entry>; 2] = f.try_into().ok()?;
            Some((src?, dst))
        });
        (held, found)
    }

    /// [`Self::hold_names`] for a removal of `name` from `parent`: a removed directory is empty,
    /// so no path runs through it.
    pub(crate) fn hold_removal(&self, parent: &Arc<Node>, name: &OsStr) -> (Held, Option<Entry>) {
        let (held, found) = self.hold_names(&[(parent, name)]);
        (held, found.and_then(|f| f.into_iter().next().flatten()))
    }

    /// Holds the paths of the parents of `names` and, exclusive, the nodes at those names, found
    /// under a first hold of the parents' paths (the kernel holds the parents' directory locks
    /// across a rename or removal, so the names still name the same nodes under the second
    /// hold). Returns what each lookup found (`None`: no such name) where that still stands
    /// under the final hold, so the change need not look its names up again: nothing moved paths
    /// in between (`Table::paths`), each name found has a node, and none was copied up
    /// meanwhile (an open for writing may do that beside the change: the kernel holds the
    /// parent's lock across it, not the file's across an open). Not with an inode index, whose
    /// entries a change reads again anyway, nor after a lookup failed (the change reports it).
    fn hold_names(&self, names: &[(&Arc<Node>, &OsStr)]) -> (Held, Option<Vec<Option<Entry>>>) {
        let generation = self.table.paths();
        let parents: Vec<&Arc<Node>> = names.iter().map(|(p, _)| *p).collect();
        let mut failed = false;
        let found: Vec<(Option<Entry>, Option<Arc<Node>>)> = {
            let _paths = self.hold_paths(&parents, &[], Wait::Fair);
            names
                .iter()
                .map(|(parent, name)| match self.find(parent, name) {
                    Ok(Some(e)) => {
                        let node = self.table.by_key(self.key_of(&e));
                        (Some(e), node)
                    }
                    Ok(None) => (None, None),
                    Err(_) => {
                        failed = true;
                        (None, None)
                    }
                })
                .collect()
        };
        let changed: Vec<Arc<Node>> = found.iter().filter_map(|(_, n)| n.clone()).collect();
        let held = self.hold_paths(&parents, &changed, Wait::Fair).unwrap_or(Held::none());
        let stands = |e: &Entry, n: &Node| {
            let st = n.state.read();
            st.upper == e.upper.is_some() && st.data.is_none() == e.data.is_none()
        };
        let good = !failed
            && !self.indexed()
            && self.table.paths() == generation
            && found.iter().all(|(e, n)| match (e, n) {
                (None, _) => true,
                (Some(e), Some(n)) => stands(e, n),
                (Some(_), None) => false,
            });
        (held, good.then(|| found.into_iter().map(|(e, _)| e).collect()))
    }

    /// The first name of `node` whose parent the kernel still knows (or the root). A hard-linked
    /// file keeps names under parents the kernel has since forgotten (`drop_caches`, memory
    /// pressure): its dentry there went, and the inode lives on through another name. Such a
    /// name is still on disk, but no path can be built through a node that is gone.
    pub(crate) fn live_name(&self, node: &Node) -> Option<(u64, OsString)> {
        let parent = self.live_parent(node)?.id;
        node.state.read().names.iter().find(|(p, _)| *p == parent).cloned()
    }

    /// The parent node of `node`'s first live name. The table's lock is taken before a node's
    /// state lock, never after (a copy-up publishing an identity holds the table's and waits for
    /// the state's): the parents' ids are read out of the state first, copied only for a node
    /// of several names.
    fn live_parent(&self, node: &Node) -> Option<Arc<Node>> {
        let (first, several) = {
            let st = node.state.read();
            (st.names.first().map(|(p, _)| *p), st.names.len() > 1)
        };
        if !several {
            return self.table.get(first?);
        }
        let parents: Vec<u64> = node.state.read().names.iter().map(|(p, _)| *p).collect();
        parents.into_iter().find_map(|p| self.table.get(p))
    }

    /// The overlay path of a node (`""` for the root), from its first live name up to the root.
    /// A hard-linked file whose path through that name cannot be built (an ancestor forgotten
    /// meanwhile: the kernel's FORGETs of a dropped dentry chain can be served in any order,
    /// while this request runs) is reached through its other names.
    pub(crate) fn path_of(&self, node: &Node) -> Result<PathBuf> {
        if node.is_dir() {
            if let Some(m) = self.memo(node) {
                return Ok(m.path.clone());
            }
        } else if let Some((parent, name)) = self.live_name(node) {
            let memo = self.table.get(parent).filter(|p| p.is_dir()).and_then(|p| self.memo(&p));
            if let Some(m) = memo {
                return Ok(m.path.join(name));
            }
        }
        let first = self.path_through(node, self.live_name(node));
        if first.is_ok() || node.is_dir() {
            return first;
        }
        let names: Vec<(u64, OsString)> = node.state.read().names.clone();
        if names.len() < 2 {
            return first;
        }
        names.into_iter().find_map(|name| self.path_through(node, Some(name)).ok()).ok_or_else(|| first.unwrap_err())
    }

    /// The path of `node` through its name `cur`, then its ancestors' first live names.
    fn path_through(&self, node: &Node, mut cur: Option<(u64, OsString)>) -> Result<PathBuf> {
        let mut parts: Vec<OsString> = Vec::new();
        let mut id = node.id;
        while id != ROOT {
            let Some((parent, name)) = cur else { return Err(Errno::NOENT.into()) };
            parts.push(name);
            id = parent;
            if parts.len() > 4096 {
                return Err(Errno::LOOP.into());
            }
            cur = if id == ROOT { None } else { self.live_name(&*self.table.get(id).ok_or(Errno::NOENT)?) };
        }
        Ok(parts.iter().rev().collect())
    }

    /// A directory node's path and layers.
    pub(crate) fn dir_of(&self, node: &Node) -> Result<(PathBuf, DirLayers)> {
        if !node.is_dir() {
            return Err(Errno::NOTDIR.into());
        }
        let path = self.path_of(node)?;
        let layers = node.dir_layers(&path);
        Ok((path, layers))
    }

    /// The user and group IDs objects this process creates get, where they get exactly the
    /// modes asked for (a umask of 0, as the daemons set before serving); `None` otherwise.
    pub(crate) fn creator(&self) -> Option<(u32, u32)> {
        *self.creator.get_or_init(|| {
            let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
            let umask = status.lines().find_map(|l| l.strip_prefix("Umask:"))?.trim();
            (u32::from_str_radix(umask, 8).ok()? == 0)
                .then(|| (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw()))
        })
    }

    /// True when the mount keeps an inode index (`index=on`).
    pub(crate) fn indexed(&self) -> bool {
        self.stack.upper().is_some_and(|u| u.index().is_some())
    }

    /// The identity of what a lookup found: its origin's (see `ovl_lookup::identity`), except
    /// that on a writable mount without an index each name of a hard-linked lower file is its
    /// own object, as in the kernel: copying up one name breaks the link. (The kernel shares one
    /// inode among the names only where no copy-up can break it: with an index, or without an
    /// upper layer.) Such a node shows the lower file's number all the same: `shown_ino`.
    pub(crate) fn key_of(&self, e: &Entry) -> Key {
        let mut key = Key::new(e.identity.fs_index, e.identity.ino);
        let breakable = self.stack.upper().is_some() && !self.indexed();
        if let Some(l) = e.lower.as_ref().filter(|l| l.stat.st_nlink > 1 && breakable) {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (l.layer, &l.path).hash(&mut h);
            key.name = h.finish() | 1;
        }
        key
    }

    /// The `st_ino` `node` shows, for `getattr` and `setattr` replies. A node's id is its number
    /// in entry replies (fuser sends one number for both), but two kinds of node need an id other
    /// than their object's number, and show, as the kernel does, the number of the object behind
    /// them all the same: a node standing for one name of a lower hard link (`key_of`; the lower
    /// file's identity, shared by all its names, and after the copy-up that broke the link, the
    /// upper file's, the number it gets after a remount), and a node for an object whose inode
    /// number the upper fs reused while the kernel still held the dead object's node (issue 19:
    /// `rmdir d; mkdir e` with a process still in `d`; `OverlayFs::remember`). The kernel takes
    /// `st_ino` from the attributes of each reply, so such nodes are given attributes that never
    /// stay valid (`attr_ttl`): every `stat` asks.
    pub(crate) fn shown_ino(&self, node: &Node, st: &Stat) -> u64 {
        let s = node.state.read();
        match s.keys.first() {
            _ if node.id == ROOT => node.id,
            Some(k) if k.name != 0 && s.lower.is_some() => crate::inode::natural_ino(*k),
            Some(k) if k.name != 0 => crate::inode::natural_ino(self.upper_key(st)),
            Some(k) => crate::inode::derived_ino(*k).unwrap_or(node.id),
            None => node.id,
        }
    }

    /// How long the kernel may keep the attributes of an entry reply for `node`: not at all
    /// where they would carry a number other than the one `stat` must show (`shown_ino`).
    pub(crate) fn attr_ttl(&self, node: &Node) -> Duration {
        let s = node.state.read();
        let other = node.id != ROOT
            && s.keys
                .first()
                .is_some_and(|k| k.name != 0 || crate::inode::derived_ino(*k).is_some_and(|n| n != node.id));
        if other { Duration::ZERO } else { self.ttl }
    }

    /// The attributes and their time-to-live for an entry of `node` in a reply that carries
    /// the node id apart from the number shown (`apart`: the number `stat` shows, kept for the
    /// TTL) or not (the transport sends the node id as both: none for a node whose id is not its
    /// number, `attr_ttl`).
    pub(crate) fn entry_attr(&self, node: &Node, st: &Stat, apart: bool) -> (Attr, Duration) {
        if apart { (self.stat_attr(node, st), self.ttl) } else { (self.attr(node, st), self.attr_ttl(node)) }
    }

    /// `attr` with the number `stat` shows (`shown_ino`): for `getattr` and `setattr` replies.
    pub(crate) fn stat_attr(&self, node: &Node, st: &Stat) -> Attr {
        let mut attr = self.attr(node, st);
        attr.ino = self.shown_ino(node, st);
        attr
    }

    /// The identity of an object listed from `layer`.
    pub(crate) fn key_in(&self, layer: ovl_core::LayerId, ino: u64) -> Key {
        Key::new(self.stack.layer(layer).fs_index(), ino)
    }

    /// The identity of a new object in the upper layer.
    pub(crate) fn upper_key(&self, st: &Stat) -> Key {
        let fs = self.stack.upper().map(|u| u.layer().fs_index()).unwrap_or(0);
        Key::new(fs, st.st_ino)
    }

    /// Registers what a lookup found under `(parent, name)` and counts one kernel lookup.
    pub(crate) fn remember(&self, parent: u64, name: &OsStr, e: &Entry) -> Result<Arc<Node>> {
        let key = self.key_of(e);
        // An upper object known by its own inode number, found under a name its node does not
        // have: a hard link made behind our back, or a new object whose inode number the upper
        // fs reused from a dead one we still map (its node's names now lead elsewhere). Only the
        // first may share the node.
        if e.upper.is_some() && key == self.upper_key(&e.stat) {
            if let Some(old) = self.table.by_key(key) {
                let known = old.state.read().names.iter().any(|(p, n)| *p == parent && n == name);
                // Its path must hold still while it is checked. This request holds other paths
                // already (and a change the gate, which a rename may wait for), so it does not
                // wait: a node it cannot check counts as reused (a node of its own is the safe
                // mistake).
                let names = self.try_hold(&old);
                let holds = names.is_some() && self.real_stat(&old).is_ok_and(|st| st.st_ino == key.ino);
                if !known && !holds {
                    tracing::debug!(node = old.id, ?name, "inode number reused: a new node");
                    self.table.detach_key(key);
                }
            }
        }
        let index = self.index_of(parent, name, e)?;
        let (node, fresh) = self.table.lookup_or_insert(key, e.kind, || NodeState {
            names: vec![(parent, name.to_os_string())],
            upper: e.upper.is_some() || index.as_ref().is_some_and(|i| i.present),
            lower: e.lower.clone(),
            data: e.data.clone(),
            lower_dirs: e.dir.as_ref().map(|d| d.lowers.clone()).unwrap_or_default(),
            opaque: e.opaque,
            keys: Vec::new(),
            index: index.as_ref().map(|i| i.name.clone()),
            lower_nlink: index.as_ref().map_or(0, |i| i.lower_nlink),
        });
        if !fresh {
            let mut st = node.state.write();
            if let Some(i) = index {
                if st.index.is_none() {
                    st.index = Some(i.name);
                }
                st.upper |= i.present;
                st.lower_nlink = st.lower_nlink.max(i.lower_nlink);
            } else if e.upper.is_some() && !st.upper {
                st.upper = true;
                st.lower = None;
                st.data = e.data.clone();
            }
            if !st.names.iter().any(|(p, n)| *p == parent && n == name) {
                if st.names.is_empty() {
                    self.table.paths_moved();
                }
                st.names.push((parent, name.to_os_string()));
            }
        }
        Ok(node)
    }

    /// The index entry of what a lookup found as `name` in `parent` (`index=on` only).
    fn index_of(&self, parent: u64, name: &OsStr, e: &Entry) -> Result<Option<ovl_lookup::IndexRef>> {
        if !self.indexed() || e.kind == FileType::Directory {
            return Ok(None);
        }
        let path = match &e.upper {
            Some(_) => self.path_of(&*self.table.get(parent).ok_or(Errno::NOENT)?)?.join(name),
            None => PathBuf::new(),
        };
        ovl_lookup::index_of(&self.stack, e, &path)
    }

    /// Looks `name` up in directory `parent`.
    pub(crate) fn find(&self, parent: &Node, name: &OsStr) -> Result<Option<Entry>> {
        let (layers, held) = self.dir_held(parent)?;
        ovl_lookup::lookup_in(&self.stack, &layers, held.as_ref().map(|h| &h.handles), name)
    }

    /// A directory node's layers, and its layer dirs held open where the budget allows
    /// (`crate::dirfds`).
    pub(crate) fn dir_held(&self, node: &Node) -> Result<(DirLayers, Option<Arc<crate::dirfds::HeldDir>>)> {
        let (_, layers) = self.dir_of(node)?;
        let held = self.dir_fds.get(&self.table, &self.stack, node, &layers);
        Ok((layers, held))
    }

    /// `node`'s real object (where [`Self::real_location`] finds it) as its parent dir, held
    /// open by the parent node, and its name: no path walk. `None` where the parent holds no
    /// dirs, or the object is not in one of them (an index entry, a layer root, a lower
    /// object found through a redirect).
    pub(crate) fn held_place(&self, node: &Node) -> Option<(Arc<std::os::fd::OwnedFd>, std::ffi::CString)> {
        if node.id == ROOT {
            return None;
        }
        let (parent, name) = self.live_name(node)?;
        let (upper, lower) = {
            let st = node.state.read();
            if st.index.is_some() && st.upper {
                return None;
            }
            let lower = match (&st.lower, st.lower_dirs.first()) {
                (Some(l), _) => Some((l.layer, l.path.clone())),
                (None, Some(d)) => Some((d.layer, d.path.clone())),
                (None, None) => None,
            };
            (st.upper, lower)
        };
        let (_, held) = self.dir_held(&*self.table.get(parent)?).ok()?;
        let held = held?;
        if upper {
            return Some((held.handles.upper()?.clone(), sys::name_cstr(&name).ok()?));
        }
        let (layer, path) = lower?;
        let fd = held.handles.lower(layer, path.parent()?)?.clone();
        Some((fd, sys::name_cstr(path.file_name()?).ok()?))
    }

    /// An open file of `node`, for a node no name reaches any more (every name removed while
    /// it was open): its descriptors are all that reach the real file.
    pub(crate) fn open_file_of(&self, node: &Node) -> Option<Arc<OpenFile>> {
        let files = self.handles.files.read();
        files.values().find(|f| f.node.id == node.id).cloned()
    }

    /// True when no name of the mount reaches `node` any more (the root always has one).
    pub(crate) fn unlinked(&self, node: &Node) -> bool {
        node.id != ROOT && self.live_name(node).is_none()
    }

    /// The real object's `lstat` as the mount shows it; for an open file whose names are all
    /// gone, its open descriptor's `fstat` (link count 0 for an upper file, as in the kernel).
    pub(crate) fn real_stat(&self, node: &Node) -> Result<Stat> {
        let mut st = match self.held_place(node) {
            Some((dir, name)) => sys::lstat_at(&*dir, &name)?,
            None => match self.real_location(node) {
                Err(e) if e.errno() == Errno::NOENT && self.unlinked(node) => {
                    let of = self.open_file_of(node).ok_or(e)?;
                    let file = of.file.read().clone();
                    return Ok(rustix::fs::fstat(&*file)?);
                }
                r => {
                    let (root, path) = r?;
                    sys::lstat_beneath(root, &path)?
                }
            },
        };
        if let Some(n) = self.index_nlink(node)? {
            st.st_nlink = n;
        }
        let data = node.state.read().data.clone();
        if let Some(d) = data {
            // A metacopy file shows the size and blocks of the file holding its data.
            let ds = sys::lstat_beneath(self.stack.layer(d.layer).root()?, &d.path)?;
            st.st_size = ds.st_size;
            st.st_blocks = ds.st_blocks;
        }
        Ok(st)
    }

    /// The attributes the kernel sees for `node`, built from its real object's `lstat` (owner
    /// and mode as recorded and shifted: `crate::ids`).
    pub(crate) fn attr(&self, node: &Node, st: &Stat) -> Attr {
        let st = &self.shown(node, st);
        // Merged as the kernel's `ovl_path_type` says: an upper part over a lower one, or no
        // upper part and several lower ones. It shows a link count of 1, as in the kernel (the
        // subdirs of all its parts are not counted); a directory of one layer shows its own.
        let merged_dir = node.is_dir() && {
            let s = node.state.read();
            if s.upper { !s.lower_dirs.is_empty() } else { s.lower_dirs.len() > 1 }
        };
        let time = |s: i64, ns: i64| {
            if s >= 0 {
                UNIX_EPOCH + Duration::new(s as u64, ns as u32)
            } else {
                UNIX_EPOCH - Duration::from_secs(s.unsigned_abs()) + Duration::from_nanos(ns as u64)
            }
        };
        Attr {
            ino: node.id,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime, st.st_atime_nsec as i64),
            mtime: time(st.st_mtime, st.st_mtime_nsec as i64),
            ctime: time(st.st_ctime, st.st_ctime_nsec as i64),
            kind: Kind::from_mode(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: if merged_dir { 1 } else { st.st_nlink as u32 },
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
        }
    }

    /// The attributes of a negative entry: node 0, which the kernel takes for "no such name".
    pub(crate) fn missing_attr(&self) -> Attr {
        Attr {
            ino: 0,
            size: 0,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            kind: Kind::RegularFile,
            perm: 0,
            nlink: 0,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 0,
        }
    }

    /// The upper directory `node` as an `O_PATH` fd (held by the node where the budget
    /// allows), after copying it up.
    pub(crate) fn upper_dir(&self, node: &Arc<Node>) -> Result<Arc<std::os::fd::OwnedFd>> {
        self.ensure_upper(node)?;
        if let Some(fd) = self.dir_held(node)?.1.and_then(|h| h.handles.upper().cloned()) {
            return Ok(fd);
        }
        let u = self.stack.writable_upper().ok_or(Errno::ROFS)?;
        Ok(Arc::new(sys::open_dir_path(u.layer().root()?, &self.path_of(node)?)?))
    }

    /// The real file behind handle `fh` of node `ino`, switched to the upper copy if the node was
    /// copied up since the handle was opened in a lower layer.
    pub(crate) fn file(&self, fh: u64, ino: u64) -> Result<Arc<File>> {
        let of = self.handles.get(fh, ino)?;
        if of.on_lower.load(Ordering::Acquire) && of.node.state.read().has_upper_data() {
            // Recursive: the caller may hold them already (setattr of an open file).
            let _held = self.hold_again(&of.node);
            let mut slot = of.file.write();
            if of.on_lower.load(Ordering::Acquire) {
                let (root, path) = self.data_location(&of.node)?;
                let root = root.as_fd();
                let fd =
                    sys::open_beneath(root, &path, crate::data::backing_flags(of.flags), rustix::fs::Mode::empty())?;
                *slot = Arc::new(File::from(fd));
                of.on_lower.store(false, Ordering::Release);
            }
        }
        Ok(of.file.read().clone())
    }

    /// The layer root and path of the file holding `node`'s data: the lower data of a metacopy
    /// file, else the object itself.
    pub(crate) fn data_location(&self, node: &Node) -> Result<(Arc<std::os::fd::OwnedFd>, PathBuf)> {
        if let Some(d) = &node.state.read().data {
            return Ok((self.stack.layer(d.layer).root()?, d.path.clone()));
        }
        self.real_location(node)
    }

    /// The overlay link count of an indexed node with an index entry (`index=on`).
    pub(crate) fn index_nlink(&self, node: &Node) -> Result<Option<u64>> {
        let (name, lower_nlink) = {
            let st = node.state.read();
            match (&st.index, st.upper) {
                (Some(n), true) => (n.clone(), st.lower_nlink),
                _ => return Ok(None),
            }
        };
        let ix = self.stack.upper().and_then(|u| u.index()).ok_or(Errno::IO)?;
        let (n, _) = ovl_core::index::entry_nlink(ix, &name, &self.stack.names().nlink, lower_nlink)?;
        Ok(Some(n))
    }

    /// The layer root and path where `node`'s object (its metadata) is read from now.
    pub(crate) fn real_location(&self, node: &Node) -> Result<(Arc<std::os::fd::OwnedFd>, PathBuf)> {
        let st = node.state.read();
        if let (Some(ix), true) = (&st.index, st.upper) {
            let dir = self.stack.upper().and_then(|u| u.index_shared()).ok_or(Errno::IO)?;
            return Ok((dir, PathBuf::from(std::ffi::OsStr::from_bytes(ix.as_bytes()))));
        }
        if st.upper {
            drop(st);
            let u = self.stack.upper().ok_or(Errno::IO)?;
            return Ok((u.layer().root()?, self.path_of(node)?));
        }
        if let Some(l) = &st.lower {
            return Ok((self.stack.layer(l.layer).root()?, l.path.clone()));
        }
        if let Some(d) = st.lower_dirs.first() {
            return Ok((self.stack.layer(d.layer).root()?, d.path.clone()));
        }
        Err(Errno::NOENT.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    // The kernel drops an unpinned dentry chain (`drop_caches`) and sends a FORGET for each
    // dir; several serving threads may handle them in any order, so a parent can leave the table
    // before its child dir. A hard-linked file open under another name must still be reached:
    // a CI run saw `ENOENT` for an append through the link
    // (`ops::a_link_held_open_across_a_cache_drop_stays_reachable_like_the_kernel`).
    #[test]
    fn a_link_is_reached_through_its_other_name_when_an_ancestor_of_the_first_is_forgotten() {
        let tmp = tempfile::tempdir().unwrap();
        let (l, u, w) = (tmp.path().join("l"), tmp.path().join("u"), tmp.path().join("w"));
        for d in [&l, &w, &u.join("c/f/c"), &u.join("b")] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(u.join("c/f/c/a"), b"x").unwrap();
        std::fs::hard_link(u.join("c/f/c/a"), u.join("b/n808")).unwrap();
        let opts = format!("lowerdir={},upperdir={},workdir={}", l.display(), u.display(), w.display());
        let stack = LayerStack::open(&ovl_core::MountOptions::parse(&opts).unwrap()).unwrap();
        let fs = OverlayFs::new(stack).unwrap();
        let root = fs.table.get(ROOT).unwrap();
        let look = |p: &Arc<Node>, n: &str| fs.do_lookup(p, OsStr::new(n)).unwrap().0;
        let c = look(&root, "c");
        let f = look(&c, "f");
        let cc = look(&f, "c");
        let file = look(&cc, "a");
        let b = look(&root, "b");
        assert_eq!(look(&b, "n808").id, file.id, "one node for both names");
        assert_eq!(fs.path_of(&file).unwrap(), Path::new("c/f/c/a"));
        // `c/f` forgotten before `c/f/c`.
        fs.table.forget(f.id, u64::MAX);
        assert!(fs.table.get(f.id).is_none());
        assert_eq!(fs.path_of(&file).unwrap(), Path::new("b/n808"));
        // A dir has one name: its path fails as before.
        assert!(fs.path_of(&cc).is_err());
    }

    // Paths and lock chains of directories are built once per path generation (issue 19: no
    // request walks the names up to the root while nothing moved), and every change that
    // moves a path builds them again: a rename of an ancestor, of the dir itself, a removal
    // of one name of a linked file, a forgotten ancestor.
    #[test]
    fn dir_paths_are_built_once_and_follow_every_change_that_moves_them() {
        let tmp = tempfile::tempdir().unwrap();
        let (l, u, w) = (tmp.path().join("l"), tmp.path().join("u"), tmp.path().join("w"));
        for d in [&l.join("a/b/c/d"), &w, &u.join("x")] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(l.join("a/b/c/d/f"), b"x").unwrap();
        std::fs::write(u.join("x/one"), b"y").unwrap();
        std::fs::hard_link(u.join("x/one"), u.join("two")).unwrap();
        let opts = format!("lowerdir={},upperdir={},workdir={},redirect_dir=on", l.display(), u.display(), w.display());
        let stack = LayerStack::open(&ovl_core::MountOptions::parse(&opts).unwrap()).unwrap();
        let fs = OverlayFs::new(stack).unwrap();
        let root = fs.table.get(ROOT).unwrap();
        let look = |p: &Arc<Node>, n: &str| fs.do_lookup(p, OsStr::new(n)).unwrap().0;
        let (a, x) = (look(&root, "a"), look(&root, "x"));
        let b = look(&a, "b");
        let c = look(&b, "c");
        let d = look(&c, "d");
        let f = look(&d, "f");
        let ids = |n: &Arc<Node>| fs.chain(n).iter().map(|(id, _)| *id).collect::<Vec<_>>();
        assert_eq!(fs.path_of(&f).unwrap(), Path::new("a/b/c/d/f"));
        assert_eq!(ids(&f), [f.id, d.id, c.id, b.id, a.id, ROOT]);
        let memo = fs.memo(&d).unwrap();
        assert!(Arc::ptr_eq(&memo, &fs.memo(&d).unwrap()), "built again with nothing moved");
        // An ancestor renamed.
        fs.do_rename(&a, OsStr::new("b"), &x, OsStr::new("bb"), rustix::fs::RenameFlags::empty(), None).unwrap();
        assert!(!Arc::ptr_eq(&memo, &fs.memo(&d).unwrap()), "kept across a rename");
        assert_eq!(fs.path_of(&f).unwrap(), Path::new("x/bb/c/d/f"));
        assert_eq!(fs.path_of(&d).unwrap(), Path::new("x/bb/c/d"));
        assert_eq!(ids(&f), [f.id, d.id, c.id, b.id, x.id, ROOT]);
        // The dir itself renamed.
        fs.do_rename(&c, OsStr::new("d"), &root, OsStr::new("top"), rustix::fs::RenameFlags::empty(), None).unwrap();
        assert_eq!(fs.path_of(&f).unwrap(), Path::new("top/f"));
        assert_eq!(ids(&d), [d.id, ROOT]);
        // One name of a linked file removed: its path runs through the other.
        let one = look(&x, "one");
        assert_eq!(look(&root, "two").id, one.id);
        assert_eq!(fs.path_of(&one).unwrap(), Path::new("x/one"));
        fs.do_unlink(&x, OsStr::new("one"), false, None).unwrap();
        assert_eq!(fs.path_of(&one).unwrap(), Path::new("two"));
        assert_eq!(ids(&one), [one.id, ROOT]);
        // A removed dir has no path, even through a memo built before.
        let e = fs.do_mkdir(&root, OsStr::new("e"), 0o755, (0, 0, 0)).unwrap().0;
        assert_eq!(fs.path_of(&e).unwrap(), Path::new("e"));
        fs.do_unlink(&root, OsStr::new("e"), true, None).unwrap();
        assert!(fs.path_of(&e).is_err(), "a removed dir kept its path");
        // A forgotten ancestor: no path through it.
        fs.table.forget(b.id, u64::MAX);
        assert!(fs.path_of(&c).is_err(), "a path through a forgotten dir");
    }
}
