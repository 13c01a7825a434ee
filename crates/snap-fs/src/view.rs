//! Snapshot views: `MNT/.snapshots/NAME/`, the read-only overlay `u_k : ... : u_N : LIVE` of
//! snapshot k, served by the same daemon.
//!
//! View nodes are named by path (snapshot, path inside it) and every operation resolves the
//! path through the layers again, so a view never holds on to a LIVE object that the CoW rules
//! have since saved into a layer. Directories resolved are kept until the next change that may
//! run the CoW rules (or a take, delete, consolidation; [`Views::changing`]), and a path is
//! resolved from its deepest kept directory: a view's directory that hundreds of layers hold
//! (the root, or a top directory every interval touched) is probed in each of them once, not
//! once per request below it (issue 17; the oldest of 300 snapshots walked cold in 20 s before,
//! 1.4 s after, the newest in 1.0 s). An open view file that reads a LIVE file is switched to the
//! saved copy when the CoW rules copy it ([`Views::saved`]), before LIVE changes, so readers
//! keep seeing the snapshot's bytes.
//!
//! The kernel keeps view names for the entry timeout (a walk costs no LOOKUP per file): a view
//! node's bytes never change. A name that shows a LIVE object while LIVE changes it would
//! break that, so when the CoW rules save a LIVE object the node stands for the saved copy from
//! then on (its names resolve to it) and the LIVE object gets a new id for the views that show
//! it later ([`Views::saved`]).
//!
//! Consistency: the CoW rules change a layer and LIVE in several steps; `lock` is held
//! exclusively by a change that runs them, and shared by every view operation that resolves a
//! path, so no view sees a half-made change.
//!
//! Inode numbers (issue 16.4): a non-directory's node id, which FUSE also reports as its
//! `st_ino`, is `VIEW_BASE | n`, `n` the inode number of the object in the layer that shows
//! it: every name of one file (all of them resolve to one object, see the CoW rules) is one
//! node, and the number survives cache drops and remounts. `n` is what the kernel's read-only
//! overlay of the same layers shows; the tag bit cannot go: the kernel shows a LIVE object by
//! the live mount's own number, and the same node id in this one FUSE mount would make the
//! read-only view name an alias of the writable live inode. Directories are named by path
//! (the kernel's numbers for them are not persistent either).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ovl_core::sys;
use ovl_core::{Errno, LayerId, LayerStack, Result};
use ovl_lookup::DirLayers;
use ovl_proto::{Attr, Kind};
use parking_lot::{Mutex, RwLock};
use rustix::fs::{FileType, Mode, OFlags, Stat};

/// Node ids from here up to `1 << 63` belong to views (the live overlay's ids never fall
/// there: see `ovl-fs`'s inode table).
pub(crate) const VIEW_BASE: u64 = 1 << 62;
/// The `.snapshots` directory.
pub(crate) const SNAPDIR: u64 = VIEW_BASE;
/// Non-directories whose inode number is below this are `VIEW_BASE | ino`; directories (and the
/// rare larger inode numbers) get ids from here up.
const BY_PATH_BASE: u64 = VIEW_BASE | (1 << 61);
/// Its name in the mount's root.
pub const SNAPDIR_NAME: &str = ".snapshots";

/// One view's layers.
pub(crate) struct ViewStack {
    stack: LayerStack,
    root: Arc<DirLayers>,
    /// The id of LIVE in `stack` (the bottom layer).
    live: LayerId,
}

impl ViewStack {
    /// The root's layers.
    pub(crate) fn root(&self) -> &Arc<DirLayers> {
        &self.root
    }
}

impl std::ops::Deref for ViewStack {
    type Target = LayerStack;

    fn deref(&self) -> &LayerStack {
        &self.stack
    }
}

/// A layer's path (for messages) and its open root, shared by every stack that uses it.
pub(crate) type SharedLayer = (Arc<Path>, ovl_core::LayerRoot);

/// The views between two changes of the snapshot list: one allocation per take or delete, not
/// one per view (at N = 10,000 the per-view maps were a quarter of a take's time).
#[derive(Default)]
struct ViewSet {
    /// Every layer, oldest snapshot's first, LIVE last; snapshot k's view uses `layers[k..]`.
    layers: Vec<SharedLayer>,
    /// By layer: its id in `Views::holders` when it is frozen (not the CoW target, not LIVE).
    frozen: Vec<Option<u64>>,
    /// The snapshots' ids, in the order of their layers (rising): snapshot `ids[k]`'s view is
    /// `layers[k..]`.
    ids: Vec<u64>,
    /// The views' stacks built so far (a view's stack is built on its first use), within a
    /// budget of layers.
    built: Mutex<Built>,
}

/// The most layers the kept view stacks may have together. A view's stack holds its layers and
/// its root's lower dirs: 374 bytes a layer (measured: RSS after stats in ten views of ~8,500
/// layers each), so a `find` through every view of a store of 10,000 snapshots kept ~50 million
/// layers, gigabytes, until the next take. The budget keeps three stacks of a 10,000-snapshot
/// store (a diff's two and a walk's) or many shallow ones, ~12 MiB: the daemon's memory is to
/// stay flat in N (2^17 was ~47 MiB, a third of the daemon at N = 10,000), and one rebuilt
/// costs ~1 ms at N = 10,000.
const BUILT_LAYERS: usize = 1 << 15;

/// The kept view stacks (`T`), by snapshot id, each with its size in layers and when it was
/// last used.
struct Built<T = ViewStack> {
    stacks: HashMap<u64, (Arc<T>, usize, u64)>,
    /// Layers of the kept stacks together.
    layers: usize,
    budget: usize,
    clock: u64,
}

impl<T> Default for Built<T> {
    fn default() -> Self {
        Self { stacks: HashMap::new(), layers: 0, budget: BUILT_LAYERS, clock: 0 }
    }
}

impl<T> Built<T> {
    fn get(&mut self, snap: u64) -> Option<Arc<T>> {
        self.clock += 1;
        let (vs, _, used) = self.stacks.get_mut(&snap)?;
        *used = self.clock;
        Some(vs.clone())
    }

    /// Keeps `vs` (of `layers` layers) for `snap` (one another thread built meanwhile wins),
    /// letting the stacks used longest ago go while over the budget (never the one just kept;
    /// a stack in use stays alive through its users anyway).
    fn keep(&mut self, snap: u64, vs: T, layers: usize) -> Arc<T> {
        if let Some(kept) = self.get(snap) {
            return kept;
        }
        let vs = Arc::new(vs);
        self.layers += layers;
        self.stacks.insert(snap, (vs.clone(), layers, self.clock));
        while self.layers > self.budget && self.stacks.len() > 1 {
            let oldest = self.stacks.iter().filter(|(s, _)| **s != snap).min_by_key(|(_, (_, _, used))| *used);
            let Some(&old) = oldest.map(|(s, _)| s) else { break };
            if let Some((_, gone, _)) = self.stacks.remove(&old) {
                self.layers -= gone;
            }
        }
        vs
    }
}

/// What a view path resolves to.
#[derive(Clone)]
pub(crate) struct Resolved {
    pub stat: Stat,
    pub kind: FileType,
    /// Where the object is: layer and path in it (a dir: its top layer).
    pub layer: LayerId,
    pub path: PathBuf,
    /// For a dir: its layers.
    pub dir: Option<Arc<DirLayers>>,
}

/// How many resolved view directories are kept at most (all dropped when full).
const MAX_DIRS_RESOLVED: usize = 1 << 16;

/// How many lower dirs the kept resolved directories may list together (all dropped when
/// over): a directory of the oldest view lists every layer holding it, so a walk through that
/// view of a store of N snapshots kept O(N) of them (~5 MiB at N = 10,000, 10 changes a take),
/// though a walk needs only the directories on its way.
const MAX_LOWERS_RESOLVED: usize = 1 << 16;

/// Directories of views resolved since the last change: see [`Views::dirs_resolved`].
#[derive(Default)]
struct DirsResolved {
    by_path: HashMap<(u64, PathBuf), (u64, Resolved)>,
    /// The lower dirs they list together.
    lowers: usize,
}

impl DirsResolved {
    fn clear(&mut self) {
        self.by_path.clear();
        self.lowers = 0;
    }

    /// Keeps `r`, resolved when the count of changes was `changes`, dropping every kept one first
    /// when it would go over a bound.
    fn keep(&mut self, key: (u64, PathBuf), changes: u64, r: Resolved) {
        let count = |r: &Resolved| r.dir.as_ref().map_or(0, |d| d.lowers.len());
        // (An entry replaced does not count against the bound.)
        if let Some((_, old)) = self.by_path.remove(&key) {
            self.lowers -= count(&old);
        }
        let lowers = count(&r);
        if self.by_path.len() >= MAX_DIRS_RESOLVED || self.lowers + lowers > MAX_LOWERS_RESOLVED {
            self.clear();
        }
        self.lowers += lowers;
        self.by_path.insert(key, (changes, r));
    }
}

/// One view node: the names (snapshot, path) the kernel looked it up by, and its lookup count.
struct ViewNode {
    names: Vec<(u64, PathBuf)>,
    lookups: u64,
}

#[derive(Default)]
struct Nodes {
    by_id: HashMap<u64, ViewNode>,
    /// Directories by name.
    by_path: HashMap<(u64, PathBuf), u64>,
    /// Ids given to inode numbers too large for `VIEW_BASE | ino`.
    big: HashMap<u64, u64>,
    /// Objects whose id was retired ([`Nodes::retire`]) while the kernel held it: the id
    /// their inode number stands for now.
    moved: HashMap<u64, u64>,
    /// The inode numbers of ids given out by `moved` (to tidy it when they are forgotten).
    moved_of: HashMap<u64, u64>,
    next: u64,
}

impl Nodes {
    /// The id of a non-directory whose object has inode number `ino` in its layer.
    fn object_id(&mut self, ino: u64) -> u64 {
        if let Some(&id) = self.moved.get(&ino) {
            return id;
        }
        self.first_id(ino)
    }

    /// The id of `ino` unless it was retired.
    fn first_id(&mut self, ino: u64) -> u64 {
        if ino < 1 << 61 {
            return VIEW_BASE | ino;
        }
        if let Some(&id) = self.big.get(&ino) {
            return id;
        }
        let id = self.alloc();
        self.big.insert(ino, id);
        id
    }

    fn alloc(&mut self) -> u64 {
        self.next += 1;
        BY_PATH_BASE + self.next
    }

    /// LIVE's object `ino` was saved into a layer and is about to change: the names the
    /// kernel holds its node by show the saved copy from now on, so the node stands for the
    /// copy's bytes, and LIVE's object, whatever view shows it next, gets a new id. (Otherwise a
    /// newer view's name of the changed object would join the node, and the kernel, which keeps
    /// names for the entry timeout, would show the change under the old view's name.)
    /// Returns the names (parent dir node, name) the kernel may keep of the retired node.
    fn retire(&mut self, ino: u64) -> Vec<(u64, OsString)> {
        let now = self.object_id(ino);
        let Some(node) = self.by_id.get(&now) else { return Vec::new() };
        let names = node
            .names
            .iter()
            .filter_map(|(snap, path)| {
                let dir = self.by_path.get(&(*snap, path.parent()?.to_path_buf()))?;
                Some((*dir, path.file_name()?.to_owned()))
            })
            .collect();
        let id = self.alloc();
        self.moved.insert(ino, id);
        self.moved_of.insert(id, ino);
        names
    }

    /// Node `id` is gone: an object whose ids are all unheld gets its first id back.
    fn tidy_moved(&mut self, id: u64) {
        let ino = match self.moved_of.get(&id).copied() {
            Some(ino) => ino,
            None if self.moved.is_empty() => return,
            None if (VIEW_BASE..BY_PATH_BASE).contains(&id) => id & !VIEW_BASE,
            None => match self.big.iter().find(|(_, v)| **v == id) {
                Some((&ino, _)) => ino,
                None => return,
            },
        };
        let now = self.moved.get(&ino).copied();
        if now != Some(id) {
            // An id retired again since: nothing maps to it any more.
            self.moved_of.remove(&id);
        }
        let Some(now) = now else { return };
        let first = self.first_id(ino);
        if !self.by_id.contains_key(&now) && !self.by_id.contains_key(&first) {
            self.moved.remove(&ino);
            self.moved_of.remove(&now);
        }
    }
}

/// An open view file.
struct ViewFile {
    snap: u64,
    path: PathBuf,
    file: RwLock<Arc<File>>,
    /// The LIVE inode it reads, 0 when it reads a layer.
    live_ino: AtomicU64,
}

/// A directory listing taken at opendir.
pub(crate) type Listing = Vec<(OsString, Kind, u64)>;

/// All snapshot views of one mount.
pub(crate) struct Views {
    /// Held exclusively while the CoW rules change layers and LIVE (see the module docs): taken
    /// so by [`Views::changing`] only.
    lock: RwLock<()>,
    /// Counts the times `lock` was taken exclusively: a resolved directory is kept
    /// ([`Views::dirs_resolved`]) only as long as this has not moved.
    changes: AtomicU64,
    /// Directories of views resolved since the last change (by snapshot and path), with the
    /// count of changes when they were resolved: a path is resolved from its deepest kept
    /// directory, so a lookup or `stat` in a directory that, say, every one of 300 layers holds
    /// does not probe those 300 layers for each of its ancestors again and again.
    dirs_resolved: Mutex<DirsResolved>,
    set: RwLock<Arc<ViewSet>>,
    names: RwLock<BTreeMap<String, u64>>,
    nodes: Mutex<Nodes>,
    /// See [`Views::take_retired_names`].
    retired_names: Mutex<Vec<(u64, OsString)>>,
    files: RwLock<HashMap<u64, Arc<ViewFile>>>,
    /// Open dirs: the snapshot they belong to (0: `.snapshots`) and their listing.
    dirs: RwLock<HashMap<u64, (u64, Arc<Listing>)>>,
    next_fh: AtomicU64,
    /// LIVE root names that are not part of the tree (the store).
    hidden: Vec<OsString>,
    /// The store's overlay options (its xattr namespace).
    opts: ovl_core::MountOptions,
    /// Per snapshot, the paths LIVE changed behind the daemon's back (`crate::seal`): they fail
    /// with EIO instead of showing what was never taken.
    damaged: RwLock<HashMap<u64, std::collections::HashSet<PathBuf>>>,
    born: SystemTime,
    /// What the frozen layers hold (`crate::summary`): lookups skip layers holding nothing.
    pub holders: Arc<RwLock<ovl_core::presence::Holders>>,
}

impl Views {
    pub fn new(hidden: Vec<OsString>, opts: ovl_core::MountOptions) -> Self {
        Self {
            lock: RwLock::new(()),
            changes: AtomicU64::new(0),
            dirs_resolved: Mutex::default(),
            set: RwLock::default(),
            names: RwLock::new(BTreeMap::new()),
            nodes: Mutex::new(Nodes { next: 1, ..Default::default() }),
            retired_names: Mutex::default(),
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            hidden,
            opts: ovl_core::MountOptions { read_only: true, ..opts },
            damaged: RwLock::new(HashMap::new()),
            born: SystemTime::now(),
            holders: Arc::default(),
        }
    }

    /// Stops view operations while the CoW rules (or a take, delete or consolidation) change
    /// layers and LIVE; resolved directories are resolved again after it.
    pub fn changing(&self) -> parking_lot::RwLockWriteGuard<'_, ()> {
        let g = self.lock.write();
        self.changes.fetch_add(1, Ordering::AcqRel);
        self.dirs_resolved.lock().clear();
        g
    }

    /// Held shared by every view operation that resolves a path (see the module docs).
    pub fn reading(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.lock.read()
    }

    /// Replaces the set of views: `layers` are every snapshot's layer, oldest first, then LIVE,
    /// with `frozen` giving each one's id in [`Views::holders`] if it is frozen; `views` gives
    /// each snapshot's id, name and the index of its own layer in `layers` (its view is
    /// `layers[index..]`). A view's stack is built on its first use, so a take costs no work per
    /// view.
    pub fn set<'n>(
        &self,
        layers: Vec<SharedLayer>,
        frozen: Vec<Option<u64>>,
        views: impl ExactSizeIterator<Item = (u64, &'n str, usize)> + Clone,
    ) {
        let ids: Vec<u64> = views.clone().map(|(id, _, _)| id).collect();
        debug_assert!(views.clone().enumerate().all(|(k, (_, _, i))| k == i) && ids.is_sorted());
        *self.set.write() = Arc::new(ViewSet { layers, frozen, ids, built: Mutex::default() });
        self.update_names(views);
        self.changes.fetch_add(1, Ordering::AcqRel);
        self.dirs_resolved.lock().clear();
    }

    /// Makes the names those of `views`. Names change one at a time (a take adds one, a delete
    /// removes one, a rename changes one itself): updated in place, not rebuilt.
    fn update_names<'n>(&self, views: impl ExactSizeIterator<Item = (u64, &'n str, usize)> + Clone) {
        let mut names = self.names.write();
        if let Some((id, name, _)) = views.clone().last()
            && views.len() == names.len() + 1
            && !names.contains_key(name)
        {
            // A take: the others are the names already here (nothing else changes them).
            names.insert(name.to_owned(), id);
            return;
        }
        if views.len() + 1 == names.len() {
            // A delete: the one name whose snapshot is gone goes (no name comparisons: at
            // 10,000 snapshots they were a tenth of a delete).
            let ids: std::collections::HashSet<u64> = views.clone().map(|(id, _, _)| id).collect();
            names.retain(|_, id| ids.contains(id));
            if names.len() == views.len() {
                return;
            }
        }
        for (id, name, _) in views.clone() {
            match names.get_mut(name) {
                Some(n) => *n = id,
                None => {
                    names.insert(name.to_owned(), id);
                }
            }
        }
        // (Every name of `views` is in now: more means some went.)
        if names.len() != views.len() {
            let keep: std::collections::HashSet<&str> = views.map(|(_, n, _)| n).collect();
            names.retain(|n, _| keep.contains(n.as_str()));
        }
    }

    /// Snapshot `id` is called `to` now, not `name`.
    pub fn rename(&self, name: &str, to: &str, id: u64) {
        let mut names = self.names.write();
        if names.get(name) == Some(&id) {
            names.remove(name);
        }
        names.insert(to.to_owned(), id);
    }

    /// Replaces the damaged paths of each snapshot (`crate::store::Damage`).
    pub fn set_damaged(&self, damaged: HashMap<u64, std::collections::HashSet<PathBuf>>) {
        *self.damaged.write() = damaged;
    }

    /// Snapshot `snap`'s view stack, the one the views keep (built if none is): for reading a
    /// view inside the daemon (diffs) without building a stack of its N layers each time. Called
    /// with `lock` held shared.
    pub(crate) fn kept_stack(&self, snap: u64) -> Result<Arc<ViewStack>> {
        self.stack(snap)
    }

    fn stack(&self, snap: u64) -> Result<Arc<ViewStack>> {
        let set = self.set.read().clone();
        let from = set.ids.binary_search(&snap).map_err(|_| Errno::STALE)?;
        if let Some(vs) = set.built.lock().get(snap) {
            return Ok(vs);
        }
        let layers: Vec<_> = set.layers[from..].iter().map(|(p, r)| (p.clone(), r.clone())).collect();
        let live = LayerId(layers.len() as u16 - 1);
        let mut stack = LayerStack::from_open_dirs(layers, None, self.opts.clone())?;
        let frozen = set.frozen.get(from..).unwrap_or_default().to_vec();
        stack.set_presence(ovl_core::presence::Presence::new(self.holders.clone(), frozen));
        // Views number objects by the layer object that shows them (see the module docs).
        stack.use_own_identities();
        let root = Arc::new(DirLayers::root(&stack)?);
        // Two first uses at once both build it; the first one kept is used by both.
        let layers = stack.lowers().len();
        Ok(set.built.lock().keep(snap, ViewStack { stack, root, live }, layers))
    }

    /// Resolves `path` in snapshot `snap`: from its deepest directory resolved since the last
    /// change, else from the root. Called with `lock` held shared.
    fn resolve(&self, snap: u64, path: &Path) -> Result<Resolved> {
        let vs = self.stack(snap)?;
        let changes = self.changes.load(Ordering::Acquire);
        let kept = |p: &Path| {
            let kept = self.dirs_resolved.lock();
            kept.by_path.get(&(snap, p.to_path_buf())).filter(|(c, _)| *c == changes).map(|(_, r)| r.clone())
        };
        let comps: Vec<&OsStr> = path.iter().collect();
        let (mut out, mut done) = match (kept(path), path.parent().and_then(kept)) {
            (Some(r), _) => (r, comps.len()),
            (None, Some(r)) => (r, comps.len() - 1),
            (None, None) => {
                let dir = vs.root.clone();
                let top = dir.lowers.first().ok_or(Errno::IO)?.layer;
                let stat = sys::lstat_beneath(vs.stack.layer(top).root()?, Path::new(""))?;
                (Resolved { stat, kind: FileType::Directory, layer: top, path: PathBuf::new(), dir: Some(dir) }, 0)
            }
        };
        let mut at: PathBuf = comps[..done].iter().collect();
        while done < comps.len() {
            let c = comps[done];
            let dir = match (&out.dir, out.kind) {
                (Some(d), FileType::Directory) => d.clone(),
                _ => return Err(Errno::NOTDIR.into()),
            };
            if done == 0 && self.hidden.iter().any(|h| h == c) {
                return Err(Errno::NOENT.into());
            }
            let e = ovl_lookup::lookup(&vs.stack, &dir, c)?.ok_or(Errno::NOENT)?;
            let (layer, p) = match (&e.lower, &e.dir) {
                (Some(l), _) => (l.layer, l.path.clone()),
                (None, Some(d)) => {
                    let l = d.lowers.first().ok_or(Errno::IO)?;
                    (l.layer, l.path.clone())
                }
                (None, None) => return Err(Errno::IO.into()),
            };
            out = Resolved { stat: e.stat, kind: e.kind, layer, path: p, dir: e.dir.map(Arc::new) };
            done += 1;
            at.push(c);
            if out.kind == FileType::Directory {
                let mut kept = self.dirs_resolved.lock();
                if self.changes.load(Ordering::Acquire) == changes {
                    kept.keep((snap, at.clone()), changes, out.clone());
                }
            }
        }
        // A file LIVE changed behind the daemon's back is not what was taken: say so. (A dir's
        // own change is reported by `list` and `check`; its entries answer for themselves.)
        if out.kind != FileType::Directory && self.damaged.read().get(&snap).is_some_and(|d| d.contains(path)) {
            return Err(Errno::IO.into());
        }
        Ok(out)
    }

    /// The node id for (snap, path), resolved to `r`, counting one kernel lookup.
    fn node_for(&self, snap: u64, path: &Path, r: &Resolved) -> u64 {
        let mut n = self.nodes.lock();
        let id = if r.kind == FileType::Directory {
            match n.by_path.get(&(snap, path.to_path_buf())) {
                Some(&id) => id,
                None => {
                    let id = n.alloc();
                    n.by_path.insert((snap, path.to_path_buf()), id);
                    id
                }
            }
        } else {
            n.object_id(r.stat.st_ino)
        };
        let node = n.by_id.entry(id).or_insert_with(|| ViewNode { names: Vec::new(), lookups: 0 });
        node.lookups += 1;
        if !node.names.iter().any(|(s, p)| *s == snap && p == path) {
            node.names.push((snap, path.to_path_buf()));
        }
        id
    }

    /// The names of node `id`.
    fn names_of(&self, id: u64) -> Result<Vec<(u64, PathBuf)>> {
        self.nodes.lock().by_id.get(&id).map(|v| v.names.clone()).ok_or_else(|| Errno::STALE.into())
    }

    /// A name of node `id` and what it resolves to now. A non-directory prefers a name that
    /// still shows the object the id stands for (another may have been saved or removed since);
    /// failing that, the first name that resolves (the kernel looks it up again after its TTL).
    fn node(&self, id: u64) -> Result<(u64, PathBuf, Resolved)> {
        let names = self.names_of(id)?;
        let mut first = None;
        let mut last_err = None;
        for (snap, path) in names {
            match self.resolve(snap, &path) {
                Ok(r) => {
                    let same = r.kind == FileType::Directory || self.nodes.lock().object_id(r.stat.st_ino) == id;
                    if same {
                        return Ok((snap, path, r));
                    }
                    first.get_or_insert((snap, path, r));
                }
                Err(e) => last_err = Some(e),
            }
        }
        first.ok_or_else(|| last_err.unwrap_or_else(|| Errno::STALE.into()))
    }

    /// Drops `n` kernel lookups of node `id`.
    pub fn forget(&self, id: u64, n: u64) {
        let mut nodes = self.nodes.lock();
        let gone = match nodes.by_id.get_mut(&id) {
            Some(e) => {
                e.lookups = e.lookups.saturating_sub(n);
                e.lookups == 0
            }
            None => false,
        };
        if gone {
            if let Some(node) = nodes.by_id.remove(&id) {
                for key in node.names {
                    if nodes.by_path.get(&key) == Some(&id) {
                        nodes.by_path.remove(&key);
                    }
                }
                nodes.tidy_moved(id);
            }
        }
    }

    /// The attributes of resolved object `r` as node `id`. A directory merged from several
    /// layers has one link, one that a single layer shows has that dir's count, as in the
    /// kernel's overlay.
    fn attr(&self, id: u64, r: &Resolved) -> Attr {
        let st = &r.stat;
        let time = |s: i64, ns: i64| {
            if s >= 0 {
                UNIX_EPOCH + Duration::new(s as u64, ns as u32)
            } else {
                UNIX_EPOCH - Duration::from_secs(s.unsigned_abs())
            }
        };
        let kind = FileType::from_raw_mode(st.st_mode);
        Attr {
            ino: id,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime, st.st_atime_nsec as i64),
            mtime: time(st.st_mtime, st.st_mtime_nsec as i64),
            ctime: time(st.st_ctime, st.st_ctime_nsec as i64),
            kind: Kind::from_mode(kind.as_raw_mode()),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: match &r.dir {
                Some(d) if d.lowers.len() > 1 => 1,
                _ => st.st_nlink as u32,
            },
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
        }
    }

    /// The attributes of `.snapshots`.
    pub fn snapdir_attr(&self) -> Attr {
        Attr {
            ino: SNAPDIR,
            size: 0,
            blocks: 0,
            atime: self.born,
            mtime: self.born,
            ctime: self.born,
            kind: Kind::Directory,
            perm: 0o555,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
        }
    }

    /// Looks `name` up in view dir `parent` (or in `.snapshots`).
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        let _g = self.reading();
        let (snap, path) = if parent == SNAPDIR {
            let id = *self.names.read().get(name.to_str().ok_or(Errno::NOENT)?).ok_or(Errno::NOENT)?;
            (id, PathBuf::new())
        } else {
            // A directory node has one name.
            let (snap, p) = self.names_of(parent)?.into_iter().next().ok_or(Errno::STALE)?;
            (snap, p.join(name))
        };
        let r = self.resolve(snap, &path)?;
        let id = self.node_for(snap, &path, &r);
        Ok(self.attr(id, &r))
    }

    /// The attributes of view node `id`.
    pub fn getattr(&self, id: u64) -> Result<Attr> {
        if id == SNAPDIR {
            return Ok(self.snapdir_attr());
        }
        let _g = self.reading();
        let (_, _, r) = self.node(id)?;
        Ok(self.attr(id, &r))
    }

    /// The target of view symlink `id`.
    pub fn readlink(&self, id: u64) -> Result<Vec<u8>> {
        let _g = self.reading();
        let (snap, _, r) = self.node(id)?;
        let vs = self.stack(snap)?;
        let (dir, name) = sys::open_parent(vs.stack.layer(r.layer).root()?, &r.path)?;
        Ok(rustix::fs::readlinkat(&dir, &name, Vec::new())?.into_bytes())
    }

    /// Opens view file `id` for reading. Also says whether the kernel may keep its cached pages:
    /// not for a file of LIVE, whose content a later take and change give to the same node id
    /// (`VIEW_BASE | ino` of the LIVE inode) while the old content moves to a saved copy.
    pub fn open(&self, id: u64, flags: i32) -> Result<(u64, bool)> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return Err(Errno::ROFS.into());
        }
        let _g = self.reading();
        let (snap, path, _) = self.node(id)?;
        let (file, live_ino) = self.open_real(snap, &path)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let vf = ViewFile { snap, path, file: RwLock::new(Arc::new(file)), live_ino: AtomicU64::new(live_ino) };
        self.files.write().insert(fh, Arc::new(vf));
        Ok((fh, live_ino == 0))
    }

    fn open_real(&self, snap: u64, path: &Path) -> Result<(File, u64)> {
        let r = self.resolve(snap, path)?;
        if r.kind != FileType::RegularFile {
            return Err(Errno::INVAL.into());
        }
        let vs = self.stack(snap)?;
        let root = vs.stack.layer(r.layer).root()?;
        let open = |flags| sys::open_beneath(root.as_fd(), &r.path, flags, Mode::empty());
        // A snapshot's file read leaves its access time as it was taken (the summaries record
        // it), where the daemon may (it owns the file, or is root); LIVE's is LIVE's business.
        let noatime = if r.layer == vs.live { OFlags::empty() } else { OFlags::NOATIME };
        let fd = match open(OFlags::RDONLY | noatime) {
            Err(e) if e.errno() == Errno::PERM && !noatime.is_empty() => open(OFlags::RDONLY)?,
            other => other?,
        };
        let live_ino = if r.layer == vs.live { r.stat.st_ino } else { 0 };
        Ok((File::from(fd), live_ino))
    }

    /// Reads from open view file `fh`.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let f = self.files.read().get(&fh).cloned().ok_or(Errno::BADF)?;
        let file = f.file.read().clone();
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// True while files or directories of snapshot `snap`'s view are open.
    pub fn in_use(&self, snap: u64) -> bool {
        if self.files.read().values().any(|f| f.snap == snap) {
            return true;
        }
        self.dirs.read().values().any(|d| d.0 == snap)
    }

    /// The names the kernel may keep of nodes retired since the last call (parent dir node,
    /// name): it is to forget them, so that they show the saved copy's number, as a lookup does
    /// (their bytes are right either way).
    pub fn take_retired_names(&self) -> Vec<(u64, OsString)> {
        std::mem::take(&mut *self.retired_names.lock())
    }

    /// Closes view file `fh`.
    pub fn release(&self, fh: u64) {
        self.files.write().remove(&fh);
    }

    /// The LIVE inodes in `inos` were just saved into the newest layer and are about to
    /// change: their view nodes now stand for the saved copies ([`Nodes::retire`]), and open
    /// view files reading them switch to what their path shows now (the saved copy). Called
    /// with `lock` held exclusively.
    pub fn saved(&self, inos: &[u64]) {
        if inos.is_empty() {
            return;
        }
        {
            let mut nodes = self.nodes.lock();
            let mut names = self.retired_names.lock();
            for &ino in inos {
                names.extend(nodes.retire(ino));
            }
        }
        let files: Vec<Arc<ViewFile>> = self
            .files
            .read()
            .values()
            .filter(|f| inos.contains(&f.live_ino.load(Ordering::Acquire)))
            .cloned()
            .collect();
        for f in files {
            match self.open_real(f.snap, &f.path) {
                Ok((file, ino)) => {
                    *f.file.write() = Arc::new(file);
                    f.live_ino.store(ino, Ordering::Release);
                }
                Err(e) => {
                    tracing::warn!(path = ?f.path, "could not switch an open snapshot file to its saved copy: {e}")
                }
            }
        }
    }

    /// Opens view dir `id` (or `.snapshots`): its listing, taken now.
    pub fn opendir(&self, id: u64) -> Result<u64> {
        let (snap_of, listing) = if id == SNAPDIR {
            let mut out: Listing = vec![(".".into(), Kind::Directory, SNAPDIR), ("..".into(), Kind::Directory, 1)];
            for name in self.names.read().keys() {
                out.push((name.into(), Kind::Directory, SNAPDIR));
            }
            (0, out)
        } else {
            let _g = self.reading();
            let (snap, path, r) = self.node(id)?;
            let dir = r.dir.ok_or(Errno::NOTDIR)?;
            let vs = self.stack(snap)?;
            let mut out: Listing = vec![(".".into(), Kind::Directory, id), ("..".into(), Kind::Directory, SNAPDIR)];
            for e in ovl_lookup::read_merged(&vs.stack, &dir)? {
                if path.as_os_str().is_empty() && self.hidden.contains(&e.name) {
                    continue;
                }
                // A non-directory's `d_ino` is its `st_ino`, as `ls -i` and `find` expect.
                let ino = if e.file_type == FileType::Directory { e.ino } else { self.nodes.lock().object_id(e.ino) };
                out.push((e.name, Kind::from_mode(e.file_type.as_raw_mode()), ino));
            }
            (snap, out)
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs.write().insert(fh, (snap_of, Arc::new(listing)));
        Ok(fh)
    }

    /// The listing of open dir `fh`.
    pub fn listing(&self, fh: u64) -> Result<Arc<Listing>> {
        self.dirs.read().get(&fh).map(|d| d.1.clone()).ok_or_else(|| Errno::BADF.into())
    }

    /// Closes dir `fh`.
    pub fn releasedir(&self, fh: u64) {
        self.dirs.write().remove(&fh);
    }

    /// The xattr `name` of view node `id`.
    pub fn getxattr(&self, id: u64, name: &OsStr) -> Result<Vec<u8>> {
        let _g = self.reading();
        let (snap, _, r) = self.node(id)?;
        let vs = self.stack(snap)?;
        let names = vs.stack.names();
        let real = names.escape(name);
        let key = std::ffi::CString::new(real.as_encoded_bytes()).map_err(|_| Errno::INVAL)?;
        let root = vs.stack.layer(r.layer).root()?;
        let root = root.as_fd();
        let v = if r.path.as_os_str().is_empty() {
            sys::get_xattr(root, None, &key)?
        } else {
            let (d, n) = sys::open_parent(root, &r.path)?;
            sys::get_xattr(&d, Some(&n), &key)?
        };
        v.ok_or_else(|| Errno::NODATA.into())
    }

    /// The xattr names of view node `id`, NUL-terminated.
    pub fn listxattr(&self, id: u64) -> Result<Vec<u8>> {
        let _g = self.reading();
        let (snap, _, r) = self.node(id)?;
        let vs = self.stack(snap)?;
        let names = vs.stack.names();
        let root = vs.stack.layer(r.layer).root()?;
        let root = root.as_fd();
        let list = if r.path.as_os_str().is_empty() {
            sys::list_xattrs(root, None)?
        } else {
            let (d, n) = sys::open_parent(root, &r.path)?;
            sys::list_xattrs(&d, Some(&n))?
        };
        let mut out = Vec::new();
        for k in list {
            if let Some(shown) = names.unescape(&k) {
                out.extend_from_slice(shown.as_encoded_bytes());
                out.push(0);
            }
        }
        Ok(out)
    }
}

/// A process (pid, command name) whose current or root directory is `dir` or inside it, read
/// from `/proc` (others' processes only as root): what holds a view without an open file.
pub(crate) fn process_inside(dir: &std::path::Path) -> Option<(u32, String)> {
    let procs = std::fs::read_dir("/proc").ok()?;
    procs.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let inside =
            ["cwd", "root"].iter().any(|l| std::fs::read_link(e.path().join(l)).is_ok_and(|p| p.starts_with(dir)));
        inside.then(|| {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            (pid, comm.trim().to_owned())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::{Built, DirsResolved, MAX_LOWERS_RESOLVED, Nodes, Resolved, VIEW_BASE, ViewNode};

    /// A retired object's node keeps its id while held, the object gets fresh ids for later
    /// lookups (each retirement its own), and once none of its ids is held it has its first id
    /// again and nothing is left in the maps.
    #[test]
    fn a_retired_object_gets_fresh_ids_until_the_kernel_forgot_them_all() {
        let mut n = Nodes { next: 1, ..Default::default() };
        let held = |n: &mut Nodes, id: u64, name: Option<(u64, &str)>| {
            let names = name.map(|(s, p)| vec![(s, std::path::PathBuf::from(p))]).unwrap_or_default();
            n.by_id.insert(id, ViewNode { names, lookups: 1 });
        };
        let first = n.object_id(5);
        assert_eq!(first, VIEW_BASE | 5);
        assert!(n.retire(5).is_empty(), "an unheld node retires nothing");
        assert_eq!(n.object_id(5), first);
        let dir = n.alloc();
        n.by_path.insert((1, "a".into()), dir);
        held(&mut n, first, Some((1, "a/f")));
        assert_eq!(n.retire(5), vec![(dir, "f".into())], "the names the kernel may keep");
        let second = n.object_id(5);
        assert_ne!(second, first);
        held(&mut n, second, None);
        n.retire(5);
        let third = n.object_id(5);
        assert!(third != first && third != second);
        held(&mut n, third, None);
        // Forgotten one by one: while its newest id is held, the object keeps it.
        for gone in [first, second] {
            n.by_id.remove(&gone);
            n.tidy_moved(gone);
            assert_eq!(n.object_id(5), third);
        }
        n.by_id.remove(&third);
        n.tidy_moved(third);
        assert_eq!(n.object_id(5), first, "no id of it held: its first id again");
        assert!(n.moved.is_empty() && n.moved_of.is_empty(), "{:?} {:?}", n.moved, n.moved_of);
        // Its first and newest ids unheld, an older one still held: the first id is free again
        // (the older node has an id of its own).
        held(&mut n, first, None);
        n.retire(5);
        let fourth = n.object_id(5);
        held(&mut n, fourth, None);
        n.retire(5);
        n.by_id.remove(&first);
        n.tidy_moved(first);
        assert_eq!(n.object_id(5), first);
        n.by_id.remove(&fourth);
        n.tidy_moved(fourth);
        assert!(n.moved.is_empty() && n.moved_of.is_empty(), "{:?} {:?}", n.moved, n.moved_of);
    }

    #[test]
    fn kept_resolved_dirs_stay_within_their_budget_of_lower_dirs() {
        use ovl_lookup::{DirLayers, LowerDir};
        let dir = |lowers: usize| Resolved {
            stat: ovl_core::sys::blank_stat(),
            kind: rustix::fs::FileType::Directory,
            layer: ovl_core::LayerId(0),
            path: "d".into(),
            dir: Some(std::sync::Arc::new(DirLayers {
                upper: None,
                lowers: (0..lowers)
                    .map(|k| LowerDir { layer: ovl_core::LayerId(k as u16), path: "d".into(), xwhiteouts: false })
                    .collect(),
            })),
        };
        let mut kept = DirsResolved::default();
        let each = 1000;
        for k in 0..MAX_LOWERS_RESOLVED / each {
            kept.keep((1, format!("d{k}").into()), 0, dir(each));
        }
        assert_eq!(kept.lowers, MAX_LOWERS_RESOLVED / each * each);
        assert_eq!(kept.by_path.len(), MAX_LOWERS_RESOLVED / each, "all fit");
        // The same key again replaces, and counts only the new one.
        kept.keep((1, "d0".into()), 0, dir(1));
        assert_eq!(kept.lowers, (MAX_LOWERS_RESOLVED / each - 1) * each + 1);
        // One more dir of many lower dirs would go over: the kept ones go first.
        kept.keep((2, "e".into()), 0, dir(each * 2));
        assert_eq!((kept.by_path.len(), kept.lowers), (1, each * 2));
        assert!(kept.by_path.contains_key(&(2, "e".into())));
    }

    #[test]
    fn kept_view_stacks_stay_within_their_layer_budget_and_the_used_ones_stay() {
        let mut b: Built<u64> = Built { budget: 100, ..Built::default() };
        for snap in 0..10 {
            b.keep(snap, snap, 30);
            assert!(b.layers <= 100 || b.stacks.len() == 1, "{} layers kept", b.layers);
            // Snapshot 0 is used after every other: it is never the one to go.
            assert_eq!(b.get(0).as_deref(), Some(&0), "after keeping {snap}");
        }
        assert_eq!(b.layers, 90);
        let mut kept: Vec<u64> = b.stacks.keys().copied().collect();
        kept.sort();
        assert_eq!(kept, [0, 8, 9], "the two used last besides the one always used");
        // Kept again: the one there wins and nothing is counted twice.
        assert_eq!(*b.keep(9, 99, 30), 9);
        assert_eq!(b.layers, 90);
        // A stack bigger than the budget alone is still kept (it is in use).
        b.keep(20, 20, 500);
        assert_eq!(b.stacks.len(), 1);
        assert_eq!(b.layers, 500);
        assert_eq!(b.get(20).as_deref(), Some(&20));
    }
}
