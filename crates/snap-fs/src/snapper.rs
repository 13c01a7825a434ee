//! The snapshot state of one mount: the store, the CoW target, the views, and the gate that
//! makes a take one instant. It is the live overlay's [`ChangeHook`].

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ovl_core::sys;
use ovl_fs::hook::{ChangeHook, GateGuard};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::access::{Peer, Sight};
use crate::cow::Cow;
use crate::diff::Change;
use crate::policy::Grant;
use crate::store::{SnapshotInfo, Store};
use crate::view::Views;

/// Descriptors a take uses for a while besides its layer's own: the layer while it is prepared,
/// the list's temp file, the new CoW target's work dir and journal while the old target is still
/// open, the walk for its redirects.
const TAKE_FDS: usize = 8;

/// One line of `ovlsnap list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Listed {
    /// Snapshot name.
    pub name: String,
    /// Snapshot id (order of creation).
    pub id: u64,
    /// Creation time, RFC 3339 (UTC).
    pub created: String,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// Bytes allocated by the snapshot's layer (what it holds of the old state).
    pub layer_bytes: u64,
    /// Entries in the layer: saved objects, whiteouts, saved dirs.
    pub entries: u64,
    /// The bytes deleting it would free (`zfs list`'s `used` of a snapshot): all of the oldest's
    /// layer; of another's, the files the next older snapshot's layer hides (the rest moves into
    /// it). Files with other names and directories' blocks are left out. `null` when the older
    /// layer has no summary yet (just after a take).
    #[serde(default)]
    pub freed_bytes: Option<u64>,
    /// The bytes its tree references (`zfs list`'s `refer`): what its view's objects allocate, a
    /// file of several names once. `null` until worked out (beside the mount's work, after the
    /// take) and for a snapshot whose view LIVE changed behind the daemon's back.
    #[serde(default)]
    pub refer_bytes: Option<u64>,
    /// The part of `refer_bytes` it shares with the newer snapshots and LIVE: all but the files
    /// only its own layer holds (those of one name).
    #[serde(default)]
    pub shared_bytes: Option<u64>,
    /// Why the snapshot's view is no longer what was taken (LIVE changed while not served);
    /// absent while it is intact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damage: Option<crate::store::Damage>,
    /// Its holds' tags (`ovlsnap hold`): while it has any, it cannot be deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holds: Vec<String>,
    /// What it is for, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// User properties (key = value).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub properties: std::collections::BTreeMap<String, String>,
}

/// A view's stack for reading: the one the views keep, or one built for the occasion.
enum ReadStack {
    Kept(Arc<crate::view::ViewStack>),
    Built(Box<ovl_core::LayerStack>),
}

impl ReadStack {
    /// The root's layers.
    fn root(&self) -> anyhow::Result<Arc<ovl_lookup::DirLayers>> {
        match self {
            ReadStack::Kept(s) => Ok(s.root().clone()),
            ReadStack::Built(s) => Ok(Arc::new(ovl_lookup::DirLayers::root(s)?)),
        }
    }
}

impl std::ops::Deref for ReadStack {
    type Target = ovl_core::LayerStack;

    fn deref(&self) -> &ovl_core::LayerStack {
        match self {
            ReadStack::Kept(s) => s,
            ReadStack::Built(s) => s,
        }
    }
}

/// Every snapshot layer's path and root, by id, in rising id (the order of the snapshot list):
/// kept in step with the list by a merge, not a hash of every id per take (issue 17).
#[derive(Default)]
struct LayerRoots(Vec<(u64, crate::view::SharedLayer)>);

impl LayerRoots {
    fn get(&self, id: u64) -> Option<&crate::view::SharedLayer> {
        self.0.binary_search_by_key(&id, |(i, _)| *i).ok().map(|at| &self.0[at].1)
    }

    fn root(&self, id: u64) -> anyhow::Result<&ovl_core::LayerRoot> {
        self.get(id).map(|l| &l.1).with_context(|| format!("layer {id} is not open"))
    }

    fn remove(&mut self, id: u64) {
        if let Ok(at) = self.0.binary_search_by_key(&id, |(i, _)| *i) {
            self.0.remove(at);
        }
    }

    /// The layers, in the list's order.
    fn layers(&self) -> impl Iterator<Item = &crate::view::SharedLayer> {
        self.0.iter().map(|(_, l)| l)
    }

    /// Makes the roots those of `snaps` (rising ids): keeps the ones still listed, opens the new
    /// ones with `open`, drops the others. A take only adds the last one.
    fn sync(
        &mut self,
        snaps: &[SnapshotInfo],
        mut open: impl FnMut(&SnapshotInfo) -> anyhow::Result<crate::view::SharedLayer>,
    ) -> anyhow::Result<()> {
        let n = self.0.len();
        if snaps.len() == n + 1 && self.0.iter().zip(snaps).all(|((id, _), s)| *id == s.id) {
            let s = &snaps[n];
            self.0.push((s.id, open(s)?));
            return Ok(());
        }
        let mut old = std::mem::take(&mut self.0).into_iter().peekable();
        let mut out = Vec::with_capacity(snaps.len());
        let mut failed = None;
        for s in snaps {
            while old.next_if(|(id, _)| *id < s.id).is_some() {}
            match old.next_if(|(id, _)| *id == s.id) {
                Some(kept) => out.push(kept),
                None => match open(s) {
                    Ok(l) => out.push((s.id, l)),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                },
            }
        }
        // On a failure the roots not reached stay (all above the ones kept): the next sync sorts
        // them out.
        out.extend(old.filter(|_| failed.is_some()));
        self.0 = out;
        failed.map_or(Ok(()), Err)
    }
}

/// How many snapshot layer roots a process keeps open at once: an eighth of its open-file
/// limit, between 8 and 256. Others are opened again when used (`ovl_core::LayerRoot`), so a
/// store's snapshots are not bounded by the limit (issue 17). Views answer most lookups and
/// listings of frozen layers from their summaries, so few roots are needed at once: at 10,000
/// snapshots a budget of 2,500 roots and one of 256 walked the oldest view (a layer per changed
/// file) in the same time (0.6-0.8 s cold), and deletes and diffs took the same, while the
/// daemon held 2,525 descriptors against 281.
pub(crate) fn layer_root_budget() -> usize {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    lim.map_or(256, |l| (l / 8).clamp(8, 256) as usize)
}

/// The snapshot machinery of a mount.
pub struct Snapper {
    /// Shared by every change, exclusive for a take.
    gate: RwLock<()>,
    /// Changes with every switch of the CoW target; 0 without snapshots.
    generation: AtomicU64,
    /// How many times the CoW target was switched: the source of generations.
    switches: AtomicU64,
    store: Mutex<Store>,
    cow: Mutex<Option<Cow>>,
    pub(crate) views: Arc<Views>,
    live: Arc<OwnedFd>,
    /// LIVE as a layer of the views' stacks.
    live_root: ovl_core::LayerRoot,
    live_path: PathBuf,
    /// Each snapshot layer's root, opened while used (see [`layer_root_budget`]).
    layer_fds: Mutex<LayerRoots>,
    /// The mount's notifier slot, once the daemon sets it (`Snapper::set_notifier`).
    notifier: std::sync::OnceLock<Arc<std::sync::OnceLock<fuser::Notifier>>>,
    /// The open layer roots' budget.
    root_pool: Arc<ovl_core::RootPool>,
    /// The store's `layers` dir, where closed layer roots are opened again.
    layers_dir: Arc<OwnedFd>,
    hidden: Vec<OsString>,
    /// One seal is made at a time.
    sealing: Mutex<()>,
    /// The generation the last seal written was made for.
    sealed: AtomicU64,
    /// Copies of files made ahead of their first change (`crate::precopy`).
    precopies: Arc<crate::precopy::Precopies>,
    /// One `summarize` at a time.
    summarizing: Mutex<()>,
    /// Set once the summaries and referenced bytes the store has were read after the mount
    /// ([`Snapper::load_summaries`]); `list` waits for it.
    loaded: (Mutex<bool>, parking_lot::Condvar),
    /// The background worker (seal, then summaries): running, and asked for again meanwhile.
    background: Mutex<(bool, bool)>,
    /// What each snapshot's tree references, by id, where worked out (`crate::refer`).
    refer: Mutex<std::collections::BTreeMap<u64, u64>>,
    /// One `account` at a time.
    accounting: Mutex<()>,
    /// A walk for [`Snapper::account`] paused for the worker's other work: the snapshot's id
    /// and how far it got.
    walking: Mutex<Option<(u64, crate::refer::Walk)>>,
}

/// How [`Snapper::refer_by_walk`] ended.
enum Walked {
    /// All of the tree: its bytes.
    Done(u64),
    /// The snapshot was deleted meanwhile.
    Gone,
    /// Stopped for the worker's other work; it goes on at the next call.
    Paused,
}

impl Snapper {
    /// The snapshot state of LIVE (`live`, open) with its opened `store`; `hidden` are the LIVE
    /// root names that belong to no snapshot.
    pub fn new(live: OwnedFd, live_path: PathBuf, store: Store, hidden: Vec<OsString>) -> anyhow::Result<Self> {
        let opts = store.overlay_options();
        let views = Arc::new(Views::new(hidden.clone(), opts.clone()));
        let live = Arc::new(live);
        let layers_dir = Arc::new(rustix::io::dup(store.layers_dir())?);
        let s = Self {
            gate: RwLock::new(()),
            generation: AtomicU64::new(0),
            switches: AtomicU64::new(0),
            store: Mutex::new(store),
            cow: Mutex::new(None),
            views,
            live_root: ovl_core::LayerRoot::held(live.clone())?,
            live,
            live_path,
            layer_fds: Mutex::new(Default::default()),
            notifier: Default::default(),
            root_pool: ovl_core::RootPool::new(layer_root_budget()),
            layers_dir,
            hidden,
            sealing: Mutex::new(()),
            sealed: AtomicU64::new(u64::MAX),
            precopies: Arc::default(),
            summarizing: Mutex::new(()),
            loaded: (Mutex::new(false), parking_lot::Condvar::new()),
            background: Mutex::new((false, false)),
            refer: Mutex::default(),
            accounting: Mutex::new(()),
            walking: Mutex::new(None),
        };
        s.switch()?;
        Ok(s)
    }

    /// Points the CoW rules at the newest snapshot and rebuilds the views. Changes must be
    /// stopped (or not started yet).
    fn switch(&self) -> anyhow::Result<()> {
        let store = self.store.lock();
        let snaps = store.snapshots();
        // One root per layer, shared by the CoW target and every view, open while used.
        let mut fds = self.layer_fds.lock();
        // (Not opened here: at a mount that would be every layer's root, once each, for nothing.)
        let layers_fs = (rustix::fs::fstat(&*self.layers_dir)?.st_dev, sys::fs_uuid(&*self.layers_dir));
        fds.sync(snaps, |s| {
            let (pool, parent, name) = (&self.root_pool, self.layers_dir.clone(), s.id.to_string());
            let root = match ovl_core::LayerRoot::lazy_unopened(pool, parent.clone(), &name, layers_fs) {
                Ok(Some(root)) => root,
                Ok(None) => ovl_core::LayerRoot::lazy(pool, parent, &name, store.open_layer(s.id)?)?,
                Err(e) => return Err(anyhow::Error::from(e).context(format!("opening layer {}", s.id))),
            };
            Ok((store.path().join(Store::layer_rel(s.id)).into(), root))
        })?;
        let live = (self.live_path.clone(), self.live.clone());
        let Some(newest) = snaps.last() else {
            *self.cow.lock() = None;
            self.generation.store(0, Ordering::Release);
            self.views.set(Vec::new(), Vec::new(), std::iter::empty());
            return Ok(());
        };
        // The CoW target must have no summary before anything writes to it (`crate::summary`).
        self.views.holders.write().forget(newest.id);
        crate::summary::remove(store.root(), newest.id)?;
        let (_, work) = store.work()?;
        let (hidden, journal) = (self.hidden.clone(), rustix::io::dup(store.root())?);
        let pre = self.precopies.clone();
        let target = (store.path().join(Store::layer_rel(newest.id)), fds.root(newest.id)?.get()?);
        let cow = Cow::new(target, work, live, hidden, journal, store.overlay_options(), pre)
            .context("opening the newest snapshot's layer")?;
        let mut all: Vec<_> = fds.layers().cloned().collect();
        all.push((self.live_path.as_path().into(), self.live_root.clone()));
        // (The frozen layers' summaries the store has are read after a mount, beside serving:
        // `load_summaries`; `summarize` makes the missing ones.)
        let frozen = &snaps[..snaps.len() - 1];
        let numbers = frozen.iter().map(|s| Some(s.id)).chain([None, None]).collect();
        let views = snaps.iter().enumerate().map(|(i, s)| (s.id, s.name.as_str(), i));
        self.views.set(all, numbers, views);
        // Only what certainly changed fails; an unverified path may well be as taken.
        let damaged = store
            .damage()
            .iter()
            .filter(|(_, d)| !d.unverified)
            .map(|(id, d)| (*id, d.paths.iter().map(|p| p.0.clone()).collect()));
        self.views.set_damaged(damaged.collect());
        *self.cow.lock() = Some(cow);
        // A new number at every switch, never reused (not the snapshot id: a delete can make an
        // older layer the target again, and what nodes were told under that id no longer holds).
        let next = self.switches.fetch_add(1, Ordering::AcqRel) + 1;
        self.generation.store(next, Ordering::Release);
        Ok(())
    }

    /// Takes snapshot `name`: waits for changes in flight, stops new ones, starts the new layer,
    /// lets changes go on.
    pub fn take(&self, name: &str) -> anyhow::Result<SnapshotInfo> {
        self.take_described(name, None)
    }

    /// [`Snapper::take`], with a description recorded with it.
    pub fn take_described(&self, name: &str, description: Option<&str>) -> anyhow::Result<SnapshotInfo> {
        let _gate = self.gate.write();
        let _views = self.views.changing();
        // Refused up front rather than run out of descriptors halfway (issue 16.3): the daemon
        // must keep serving after the take. (Layers are opened while used, within a budget:
        // their number does not count here.)
        // The layer roots kept open are a cache: closed first when short.
        let need = TAKE_FDS + Self::serve_headroom();
        ovl_fs::limits::ensure_free(need, true)
            .or_else(|_| {
                let closed = self.root_pool.shed();
                tracing::debug!(closed, "descriptors short for a take: open layer roots closed");
                ovl_fs::limits::ensure_free(need, true)
            })
            .with_context(|| {
                format!("snapshot {name:?} was not taken: too few descriptors are free for it and for serving after it")
            })?;
        // Set aside, so that taking the snapshot back never lacks the descriptor it writes with.
        let spare = rustix::io::dup(self.store.lock().root())
            .with_context(|| format!("snapshot {name:?} was not taken: no descriptor free"))?;
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let live = self.live.as_fd();
        let info = self.store.lock().add(name, created, description, |layer| copy_root_meta(live, layer))?;
        if let Err(e) = self.switch() {
            // Without its layer as the CoW target the new snapshot would silently take in later
            // changes: take it back. Its layer is empty (no change ran since `add`), and a failed
            // switch left the previous target in place.
            tracing::error!("switching to snapshot {name:?} failed: {e:#}");
            drop(spare);
            self.store.lock().delete(info.id, None).context("taking back the snapshot that could not start")?;
            return Err(e.context(format!("snapshot {name:?} was not taken")));
        }
        tracing::info!(name, id = info.id, "snapshot taken");
        Ok(info)
    }

    /// Writes the store's list as one checkpoint, its log emptied (`crate::store`).
    pub fn fold_log(&self) -> anyhow::Result<()> {
        let _gate = self.gate.write();
        self.store.lock().fold_log()
    }

    /// Whether a snapshot is named `name`.
    pub fn has_snapshot(&self, name: &str) -> bool {
        self.store.lock().by_name(name).is_some()
    }

    /// How many snapshot layers are open.
    pub fn layer_count(&self) -> usize {
        self.store.lock().snapshots().len()
    }

    /// How many snapshot layer roots may be open at once (see [`layer_root_budget`]).
    pub fn layer_roots_open(&self) -> (usize, usize) {
        (self.root_pool.open(), self.root_pool.budget())
    }

    /// Descriptors to keep free besides the open layer roots (a budget): users' files,
    /// lookups and listings. Those open one directory of a layer at a time per request (a
    /// frozen layer's listing comes from its summary), so the reserve does not grow with the
    /// layers (it did until session 9, which stopped a store at half the limit).
    pub fn serve_headroom() -> usize {
        ovl_fs::limits::SERVE_RESERVE
    }

    /// The store's work dir (`work/work`) and the workdir holding it.
    pub(crate) fn store_work(&self) -> anyhow::Result<(OwnedFd, OwnedFd)> {
        self.store.lock().work()
    }

    /// The snapshots with their layer usage.
    pub fn list(&self) -> anyhow::Result<Vec<Listed>> {
        self.wait_loaded();
        let store = self.store.lock();
        let holders = self.views.holders.read();
        let refer = self.refer.lock();
        list_store(&store, &holders, |id| refer.get(&id).copied(), None)
    }

    /// [`Snapper::list`] of the snapshots named `names` only, in list order: what it reads grows
    /// with their number, not with the store's (`zfs list NAME`); finding them is one pass over
    /// the names.
    pub fn list_some(&self, names: &[String]) -> anyhow::Result<Vec<Listed>> {
        self.wait_loaded();
        let store = self.store.lock();
        let holders = self.views.holders.read();
        let refer = self.refer.lock();
        let snaps = store.snapshots();
        // (A map, not a search per name: a request may name thousands.)
        let index: std::collections::HashMap<&str, usize> =
            snaps.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
        let mut at = Vec::with_capacity(names.len());
        for n in names {
            at.push(*index.get(n.as_str()).with_context(|| format!("no snapshot named {n:?}"))?);
        }
        at.sort_unstable();
        at.dedup();
        list_store(&store, &holders, |id| refer.get(&id).copied(), Some(&at))
    }

    /// The layers of snapshot `name`'s view as the kernel overlay can mount them, given the mount
    /// point `mnt` of this daemon (its LIVE view). The client builds the mount from them itself
    /// (`ovlsnap mount-cmd`, `ovlsnap mount-view`): a daemon answering with a shell command would
    /// be trusted to run anything as root, so the answer is data the client can check.
    ///
    /// A view of more than `max` layers (at most [`KERNEL_MAX_LOWERS`], the kernel's limit; a
    /// shell command fits fewer in its page of options) gets its top layers consolidated into
    /// one, `STORE/views/TOKEN`, built as a delete's merge builds its layer (hard links to the
    /// frozen layers' files, nothing copied but what lies below them), with changes stopped
    /// meanwhile; only when `may_build` (the caller may add to the store). It lives while a
    /// mount uses it (`Store::consolidation_dir` removes the others).
    pub fn view_layers(
        &self,
        name: &str,
        mnt: &Path,
        max: Option<usize>,
        may_build: bool,
    ) -> anyhow::Result<ViewLayers> {
        // At least the newest snapshot's layer (the CoW target, which still grows) and LIVE stay
        // layers of their own: a consolidated layer holds only frozen layers.
        let max = max.unwrap_or(KERNEL_MAX_LOWERS).clamp(3, KERNEL_MAX_LOWERS);
        let plain = |store: &Store, snaps: &[SnapshotInfo]| {
            // The kernel refuses nested layers and the default store is inside LIVE: the layers
            // are reached through our own descriptor of the store, and LIVE through the mount,
            // which hides the store.
            let mut lowers: Vec<PathBuf> = snaps.iter().map(|s| layer_proc_path(store, s.id)).collect();
            lowers.push(mnt.to_owned());
            ViewLayers { lowers, userxattr: store.overlay_options().userxattr }
        };
        let position = |snaps: &[SnapshotInfo]| {
            snaps.iter().position(|s| s.name == name).with_context(|| format!("no snapshot named {name:?}"))
        };
        {
            let store = self.store.lock();
            let snaps = store.snapshots();
            let i = position(snaps)?;
            if snaps.len() - i < max {
                return Ok(plain(&store, &snaps[i..]));
            }
            if !may_build {
                anyhow::bail!(
                    "snapshot {name:?} has {} layers, more than a kernel mount of it takes ({max}); \
                     consolidating them needs the right to take snapshots",
                    snaps.len() - i + 1
                );
            }
        }
        // Like a delete: the view must not change while its layers are read.
        let _gate = self.gate.write();
        let _views = self.views.changing();
        let store = self.store.lock();
        let snaps = store.snapshots().to_vec();
        let i = position(&snaps)?;
        let depth = snaps.len() - i + 1;
        if depth <= max {
            return Ok(plain(&store, &snaps[i..]));
        }
        // `range` layers become one: depth - range + 1 == max.
        let range = depth - max + 1;
        let (a, b) = (self.view_stack(&store, &snaps[i..])?, self.view_stack(&store, &snaps[i + range..])?);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        // The ids it stands for, for `delete` (`kernel_mount_of`), and a unique number.
        let token = format!("{}-{}-{nanos}", snaps[i].id, snaps[i + range - 1].id);
        let dir = store.consolidation_dir(&token)?;
        let built = crate::merge::build(&a, &b, range as u16, true, &self.hidden, dir.as_fd())
            .map_err(anyhow::Error::from)
            .and_then(|_| Ok(rustix::fs::fsync(&dir)?));
        if let Err(e) = built {
            drop(dir);
            if let Err(e) = store.clean_unused_views() {
                tracing::warn!("removing a half-built consolidated layer: {e:#}");
            }
            return Err(e.context(format!("consolidating the top {range} layers of snapshot {name:?}")));
        }
        tracing::info!(name, range, token, "view layers consolidated for a kernel mount");
        let mut view = plain(&store, &snaps[i + range..]);
        view.lowers.insert(0, store_proc_path(&store).join(crate::store::VIEWS).join(&token));
        Ok(view)
    }
}

/// The most lower layers the kernel overlay stacks (`OVL_MAX_STACK`).
pub const KERNEL_MAX_LOWERS: usize = 500;

/// The lower layers of a snapshot's view for the kernel overlay, top first: each snapshot layer as
/// `/proc/<daemon pid>/fd/<store fd>/layers/<id>`, then the mount point of LIVE last.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ViewLayers {
    /// The layers, top first (in JSON each as [`crate::names`] says).
    #[serde(with = "lowers_json")]
    pub lowers: Vec<PathBuf>,
    /// The layers' overlay metadata is in `user.overlay.*`: the kernel needs `userxattr`.
    #[serde(default)]
    pub userxattr: bool,
}

/// `ViewLayers::lowers` in JSON: a path that is not UTF-8 (the mount point may be) as bytes.
mod lowers_json {
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serializer};

    use crate::names::JsonPath;

    pub fn serialize<S: Serializer>(lowers: &[PathBuf], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(lowers.iter().map(|p| JsonPath(p.clone())))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
        Ok(Vec::<JsonPath>::deserialize(d)?.into_iter().map(|p| p.0).collect())
    }
}

/// Layer `id` of `store` through this process's descriptor of the store.
fn layer_proc_path(store: &Store, id: u64) -> PathBuf {
    store_proc_path(store).join(Store::layer_rel(id))
}

/// The store dir through this process's descriptor of it.
fn store_proc_path(store: &Store) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), store.root().as_raw_fd()))
}

impl Snapper {
    /// The read-only stack of the view whose layers are those of `snaps` (top first), then LIVE.
    fn view_stack(&self, store: &Store, snaps: &[SnapshotInfo]) -> anyhow::Result<ovl_core::LayerStack> {
        let fds = self.layer_fds.lock();
        let mut layers = Vec::with_capacity(snaps.len() + 1);
        for s in snaps {
            let (path, fd) = fds.get(s.id).with_context(|| format!("layer {} is not open", s.id))?;
            layers.push((path.clone(), fd.clone()));
        }
        layers.push((self.live_path.as_path().into(), self.live_root.clone()));
        let opts = ovl_core::MountOptions { read_only: true, ..store.overlay_options() };
        let mut stack = ovl_core::LayerStack::from_open_dirs(layers, None, opts)?;
        // Lookups skip the frozen layers holding nothing at a path, as in the views (never the
        // newest layer, the CoW target, nor LIVE: see `crate::summary`).
        let newest = store.snapshots().last().map(|s| s.id);
        let frozen = snaps.iter().map(|s| (Some(s.id) != newest).then_some(s.id)).chain([None]).collect();
        stack.set_presence(ovl_core::presence::Presence::new(self.views.holders.clone(), frozen));
        // Diffs and merges compare objects, never identities.
        stack.use_own_identities();
        Ok(stack)
    }

    /// The stack of the view of `snaps[0]` (`snaps`: it and every newer snapshot), or of LIVE
    /// alone without snapshots, for reading with the views held: a snapshot's is the one its
    /// view keeps (a diff at N = 10,000 spent an eighth of its time building two stacks of
    /// thousands of layers).
    fn read_stack(&self, store: &Store, snaps: &[SnapshotInfo]) -> anyhow::Result<ReadStack> {
        match snaps.first() {
            Some(s) => Ok(ReadStack::Kept(self.views.kept_stack(s.id)?)),
            None => Ok(ReadStack::Built(Box::new(self.view_stack(store, snaps)?))),
        }
    }

    /// The differences from snapshot `a` to snapshot `b` (newer), or to LIVE without `b`, as
    /// `peer` may know them: a change whose name it could not list in the tree it is in (A for
    /// what was there, B for what is there) is left out.
    pub fn diff(&self, a: &str, b: Option<&str>, peer: &Peer) -> anyhow::Result<crate::diff::Report> {
        // No change is half-made while we read the layers.
        let _views = self.views.reading();
        let store = self.store.lock();
        let snaps = store.snapshots();
        let index =
            |n: &str| snaps.iter().position(|s| s.name == n).with_context(|| format!("no snapshot named {n:?}"));
        let ia = index(a)?;
        let ib = match b {
            Some(b) => index(b)?,
            None => snaps.len(),
        };
        if ib < ia {
            anyhow::bail!("{a:?} is newer than {:?}: give the older snapshot first", b.unwrap_or("LIVE"));
        }
        let (sa, sb) = (self.read_stack(&store, &snaps[ia..])?, self.read_stack(&store, &snaps[ib..])?);
        let (ra, rb) = (sa.root()?, sb.root()?);
        let (sa, sb): (&ovl_core::LayerStack, &ovl_core::LayerStack) = (&sa, &sb);
        let mut report =
            crate::diff::Differ::new(sa, sb, ib - ia, &self.hidden).with_roots(ra, rb).run()?.for_display();
        if !peer.is_root() {
            let (mut in_a, mut in_b) = (Sight::new(sa, peer), Sight::new(sb, peer));
            let mut kept = Vec::with_capacity(report.changes.len());
            for c in report.changes {
                let seen = match &c {
                    Change::Added { path, .. } => in_b.sees(path)?,
                    Change::Deleted { path, .. } => in_a.sees(path)?,
                    Change::Modified { path, at } | Change::Renamed { path, to: at } => {
                        in_a.sees(path)? && in_b.sees(at)?
                    }
                };
                if seen {
                    kept.push(c);
                }
            }
            report.changes = kept;
        }
        Ok(report)
    }

    /// The options every stack over the store's layers is read with (its xattr namespace).
    pub fn overlay_options(&self) -> ovl_core::MountOptions {
        self.store.lock().overlay_options()
    }

    /// LIVE's root, open (who may read it may read the snapshots).
    pub fn live_root(&self) -> BorrowedFd<'_> {
        self.live.as_fd()
    }

    /// Who besides root and LIVE's owner may change snapshots.
    pub fn grants(&self) -> Vec<Grant> {
        self.store.lock().grants().to_vec()
    }

    /// Changes the grants with `f`, durably.
    pub fn change_grants(&self, f: impl FnOnce(Vec<Grant>) -> Vec<Grant>) -> anyhow::Result<Vec<Grant>> {
        let mut store = self.store.lock();
        let grants = f(store.grants().to_vec());
        store.set_grants(grants.clone())?;
        Ok(grants)
    }
}

impl Snapper {
    /// At mount, before anything is served: compares LIVE with the seal the last serving left
    /// (`crate::seal`), marks every snapshot whose view shows what changed (their views then
    /// fail those paths with EIO, `list` and `check` say so), and seals LIVE anew.
    pub fn verify_live(&self) -> anyhow::Result<()> {
        let _seal = self.sealing.lock();
        let mut store = self.store.lock();
        let snaps = store.snapshots().to_vec();
        let Some(newest) = snaps.last() else {
            // Sealed even without snapshots: should we stop right after the first take, before
            // its seal, the next mount still checks everything LIVE showed then.
            let marks = crate::seal::record(&self.view_stack(&store, &[])?, &self.hidden)?;
            write_seal_or_warn(store.root(), &crate::seal::Seal { newest: 0, marks });
            self.sealed.store(self.generation.load(Ordering::Acquire), Ordering::Release);
            return Ok(());
        };
        let now = crate::seal::record(&self.view_stack(&store, &snaps[snaps.len() - 1..])?, &self.hidden)?;
        let when = rfc3339(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0));
        let mut found: std::collections::BTreeMap<u64, crate::store::Damage> = Default::default();
        // A seal that cannot be read is no seal: the snapshots are then unverified, and the mount
        // goes on (refusing it would leave no way to the data).
        let sealed = crate::seal::read(store.root()).unwrap_or_else(|e| {
            tracing::error!("the seal cannot be read ({e:#}): every snapshot is marked unverified");
            None
        });
        match sealed {
            None => {
                let reason = format!(
                    "found unverified at the mount of {when}: LIVE was never sealed for this store (made by an \
                     older ovlsnap, or stopped before its first seal), so changes made while it was not served \
                     cannot be ruled out"
                );
                for s in &snaps {
                    found.insert(
                        s.id,
                        crate::store::Damage { reason: reason.clone(), paths: Vec::new(), unverified: true },
                    );
                }
            }
            Some(old) => {
                let drift = crate::seal::drift(&old, &now);
                // Where the newest view shows each drifted path from LIVE now (a gone path: nothing).
                let newest_stack = self.view_stack(&store, &snaps[snaps.len() - 1..])?;
                let mut at_newest = Vec::with_capacity(drift.len());
                for p in &drift {
                    at_newest.push(crate::seal::shown_at(&newest_stack, &self.hidden, p)?);
                }
                // From the newest layer down: does a layer at or above snapshot i redirect dirs?
                let mut redirected = vec![false; snaps.len()];
                if !drift.is_empty() {
                    let names = newest_stack.names().clone();
                    let mut any = false;
                    for i in (0..snaps.len()).rev() {
                        let fds = self.layer_fds.lock().get(snaps[i].id).map(|l| l.1.clone());
                        if let Some(root) = fds {
                            any |= crate::seal::has_redirects(root.get()?.as_fd(), &names)?;
                        }
                        redirected[i] = any;
                    }
                }
                for (i, s) in snaps.iter().enumerate() {
                    if drift.is_empty() {
                        break;
                    }
                    let stack = self.view_stack(&store, &snaps[i..])?;
                    // A seal of the current newest view vouches for every snapshot: a difference
                    // one shows at the same LIVE object is a change behind our back. A seal made
                    // before a take (a stop before its seal) or before the newest was deleted
                    // describes another view, whose paths may lead to other objects (a directory
                    // renamed in between): then a difference is only unverified.
                    let guarded = old.newest == newest.id;
                    let (mut sure, mut maybe) = (Vec::new(), false);
                    for (p, now_at) in drift.iter().zip(&at_newest) {
                        let here = crate::seal::shown_at(&stack, &self.hidden, p)?;
                        let same = match (now_at, &here) {
                            (crate::seal::Shown::Live(q), crate::seal::Shown::Live(r)) => q == r,
                            (crate::seal::Shown::Layer, crate::seal::Shown::Missing) => true,
                            (crate::seal::Shown::Missing, crate::seal::Shown::Missing) => true,
                            _ => false,
                        };
                        if same {
                            sure.push(crate::names::JsonPath(p.clone()));
                        } else if redirected[i] && here != crate::seal::Shown::Layer {
                            // A redirect may show LIVE's object under another path here.
                            maybe = true;
                        }
                    }
                    if sure.is_empty() && !maybe {
                        continue;
                    }
                    let unverified = !guarded || sure.is_empty();
                    let reason = if guarded && !sure.is_empty() {
                        format!(
                            "found at the mount of {when}: LIVE changed {} path(s) this snapshot shows while no \
                             daemon served it",
                            sure.len()
                        )
                    } else if guarded {
                        format!(
                            "found unverified at the mount of {when}: LIVE changed while no daemon served it, \
                             under directories this snapshot shows renamed; what it shows cannot be matched"
                        )
                    } else {
                        format!(
                            "found unverified at the mount of {when}: the daemon stopped before it sealed LIVE after \
                             the last take or delete, and {} path(s) this snapshot shows differ from the last seal \
                             (changed while served before that, or while not served)",
                            sure.len()
                        )
                    };
                    found.insert(s.id, crate::store::Damage { reason, paths: sure, unverified });
                }
            }
        }
        if !found.is_empty() {
            for (id, d) in &found {
                tracing::error!(id, "snapshot no longer as taken: {}", d.reason);
            }
            store.add_damage(found)?;
        }
        write_seal_or_warn(store.root(), &crate::seal::Seal { newest: newest.id, marks: now });
        drop(store);
        self.switch()?;
        self.sealed.store(self.generation.load(Ordering::Acquire), Ordering::Release);
        Ok(())
    }

    /// Makes sure the seal is made for the current newest snapshot, waiting for one in flight:
    /// after a take or a delete that changed the newest snapshot, LIVE is sealed as the newest
    /// view shows it now, beside the mount's work (changes go on meanwhile: see `crate::seal`
    /// for why that is safe; the seal is written only if no take or delete came in between).
    /// The background worker asks for it after each take or delete, and `ovlsnap umount` before
    /// it unmounts, while LIVE is still guarded, so that a clean stop never leaves a seal a take
    /// behind.
    pub fn seal_now(&self) -> anyhow::Result<()> {
        let _seal = self.sealing.lock();
        if self.sealed.load(Ordering::Acquire) == self.generation.load(Ordering::Acquire) {
            return Ok(());
        }
        self.reseal_locked()
    }

    /// Asks for the background work after a take or delete: true when the caller is to start the
    /// worker, false when one runs (it goes round once more, see [`Self::background_again`]).
    pub fn background_wanted(&self) -> bool {
        let mut b = self.background.lock();
        if b.0 {
            b.1 = true;
            return false;
        }
        b.0 = true;
        true
    }

    /// For the worker at the end of a round: whether to go round again (asked for meanwhile); if
    /// not, the worker is done and the next request starts a new one.
    pub fn background_again(&self) -> bool {
        let mut b = self.background.lock();
        if std::mem::take(&mut b.1) {
            return true;
        }
        b.0 = false;
        false
    }

    /// The worker could not be started: the next request tries again.
    pub fn background_failed(&self) {
        *self.background.lock() = (false, false);
    }

    /// Reads the summaries (`crate::summary`) and referenced bytes (`crate::refer`) the store
    /// has, after a mount, beside serving: a mount reads no file per snapshot (issue 17: at
    /// ~10,000 snapshots that was 0.4 s warm and 3 s cold), views probe the layers not read
    /// yet meanwhile, and `list` waits for it. A batch of layers at a time: read without locks,
    /// used only for a layer that is still frozen and still that directory (a take or delete may
    /// run between batches).
    pub fn load_summaries(&self) {
        /// Says "loaded" however the reading ends (a panic too): `list` must not wait for it.
        struct Done<'a>(&'a Snapper);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                *self.0.loaded.0.lock() = true;
                self.0.loaded.1.notify_all();
            }
        }
        let _done = Done(self);
        const BATCH: usize = 256;
        let started = std::time::Instant::now();
        let (mut after, mut read) = (0u64, 0usize);
        loop {
            let batch: Vec<(u64, ovl_core::LayerRoot)> = {
                let store = self.store.lock();
                let snaps = store.snapshots();
                let fds = self.layer_fds.lock();
                let frozen = &snaps[..snaps.len().saturating_sub(1)];
                let from = frozen.partition_point(|s| s.id <= after);
                frozen[from..].iter().take(BATCH).filter_map(|s| Some((s.id, fds.get(s.id)?.1.clone()))).collect()
            };
            let Some(&(last, _)) = batch.last() else { break };
            after = last;
            let (root, mut found) = (rustix::io::dup(self.store.lock().root()), Vec::new());
            let Ok(root) = root else { break };
            for (id, layer) in batch {
                let refer = crate::summary::load_refer(root.as_fd(), id);
                let summary = layer.get().ok().and_then(|fd| crate::summary::load(root.as_fd(), id, fd.as_fd()));
                found.push((id, layer, summary, refer));
            }
            let _views = self.views.reading();
            let store = self.store.lock();
            let snaps = store.snapshots();
            let frozen = &snaps[..snaps.len().saturating_sub(1)];
            let fds = self.layer_fds.lock();
            let mut holders = self.views.holders.write();
            let mut refer = self.refer.lock();
            for (id, layer, summary, bytes) in found {
                let still = frozen.binary_search_by_key(&id, |s| s.id).is_ok()
                    && fds.get(id).is_some_and(|(_, r)| (r.dev(), r.ino()) == (layer.dev(), layer.ino()));
                if !still {
                    continue;
                }
                if let Some(summary) = summary.filter(|_| !holders.knows(id)) {
                    holders.add(id, &summary);
                    read += 1;
                }
                if let Some(b) = bytes {
                    refer.entry(id).or_insert(b);
                }
            }
        }
        tracing::debug!(read, ms = started.elapsed().as_millis() as u64, "the store's layer summaries read");
    }

    /// Waits until [`Snapper::load_summaries`] is done (a minute at most: then the layers not
    /// read yet are read for the answer, as for a layer without a summary).
    fn wait_loaded(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut loaded = self.loaded.0.lock();
        while !*loaded {
            if self.loaded.1.wait_until(&mut loaded, deadline).timed_out() {
                tracing::warn!("the layer summaries are still being read: listing from the layers");
                return;
            }
        }
    }

    /// Makes the summaries (`crate::summary`) of the frozen layers that have none, one layer at
    /// a time, beside the mount's work: after a take (the layer that froze), and at a mount for
    /// layers whose summary is missing or does not fit.
    pub fn summarize(&self) -> anyhow::Result<()> {
        // (Not before the store's own summaries are in: it would read their layers instead.)
        self.wait_loaded();
        let _one = self.summarizing.lock();
        let mut failed = std::collections::HashSet::new();
        loop {
            let next = {
                let store = self.store.lock();
                let snaps = store.snapshots();
                let holders = self.views.holders.read();
                let fds = self.layer_fds.lock();
                let frozen = &snaps[..snaps.len().saturating_sub(1)];
                // (An older summary serves lookups meanwhile; version 2 lacks sizes for `list`,
                // version 3 the attributes that spare a lookup its disk reads.)
                let missing = frozen.iter().rev().find(|s| !holders.knows_all(s.id) && !failed.contains(&s.id));
                missing.and_then(|s| Some((s.id, fds.get(s.id)?.1.clone())))
            };
            let Some((id, fd)) = next else { return Ok(()) };
            let summary = match fd.get().and_then(|fd| ovl_core::presence::Summary::read(fd.as_fd())) {
                Ok(summary) => summary,
                Err(e) => {
                    tracing::warn!(id, "reading the layer for its summary: {e}; its lookups probe it");
                    failed.insert(id);
                    continue;
                }
            };
            // Written and synced first, without locks; put in place and used only if the layer
            // is still frozen and still that directory: no take or delete runs meanwhile.
            let root = rustix::io::dup(self.store.lock().root())?;
            let staged = crate::summary::stage(root.as_fd(), id, &summary);
            let installed = {
                let _views = self.views.reading();
                let store = self.store.lock();
                let snaps = store.snapshots();
                let frozen = &snaps[..snaps.len().saturating_sub(1)];
                let same = self.layer_fds.lock().get(id).is_some_and(|(_, r)| summary.is_of_dir(r.dev(), r.ino()));
                if !frozen.iter().any(|s| s.id == id) || !same {
                    continue;
                }
                let installed = staged.and_then(|mut s| s.install().map(|()| s));
                self.views.holders.write().add(id, &summary);
                installed
            };
            if let Err(e) = installed.and_then(|s| s.sync()) {
                // Used all the same: it describes the layer; the next mount reads the layer again.
                tracing::warn!(id, "writing the layer's summary: {e:#}");
            }
            tracing::debug!(id, entries = summary.objects.len(), "layer summarized");
        }
    }

    /// Works out what each snapshot's tree references (`crate::refer`) where the store does not
    /// say yet, beside the mount's work: from a neighbour's figure and the layers in between
    /// (after a take, the new snapshot's from the one before), or, for a store that has none, by
    /// one walk of the newest view, a part at a time.
    pub fn account(&self) -> anyhow::Result<()> {
        self.wait_loaded();
        let _one = self.accounting.lock();
        loop {
            // A snapshot LIVE changed behind the daemon's back is neither worked out nor a base:
            // its figure (if any) is of the tree as taken, its view is not that tree.
            // An unknown one next to a known one, the newest first (a take's new snapshot): found
            // without a pass over all of them in the usual case (no copy of the list either).
            let (newest, step, any_known) = {
                let store = self.store.lock();
                let refer = self.refer.lock();
                let damage = store.damage();
                let mut intact = store
                    .snapshots()
                    .iter()
                    .rev()
                    .filter(|s| !damage.contains_key(&s.id))
                    .map(|s| (s.id, refer.get(&s.id).copied()));
                let mut cur = intact.next();
                let (newest, mut newer, mut step, mut any_known) = (cur.map(|c| c.0), None, None, false);
                while let Some((id, known)) = cur {
                    let older = intact.next();
                    if known.is_some() {
                        any_known = true;
                    } else if let Some((o, Some(_))) = older {
                        step = Some((id, o, false));
                        break;
                    } else if let Some((n, Some(_))) = newer {
                        step = Some((id, n, true));
                        break;
                    }
                    newer = Some((id, known));
                    cur = older;
                }
                (newest, step, any_known)
            };
            let Some(newest) = newest else { return Ok(()) };
            let (id, bytes) = match step {
                None if any_known => return Ok(()),
                None => match self.refer_by_walk(newest)? {
                    Walked::Done(bytes) => (newest, bytes),
                    Walked::Gone => continue,
                    Walked::Paused => return Ok(()),
                },
                Some((id, from, newer)) => {
                    let (older, younger) = if newer { (id, from) } else { (from, id) };
                    let Some((only_older, only_younger)) = self.refer_delta(older, younger)? else { continue };
                    let Some(base) = self.refer.lock().get(&from).copied() else { continue };
                    let bytes = if newer {
                        (base + only_older).saturating_sub(only_younger)
                    } else {
                        (base + only_younger).saturating_sub(only_older)
                    };
                    (id, bytes)
                }
            };
            let store = self.store.lock();
            if store.info(id).is_none() {
                continue;
            }
            if let Err(e) = crate::summary::write_refer(store.root(), id, bytes) {
                tracing::warn!(
                    id,
                    "recording what the snapshot references: {e:#} (worked out again at the next mount)"
                );
            }
            self.refer.lock().insert(id, bytes);
            tracing::debug!(id, bytes, "referenced bytes worked out");
        }
    }

    /// How the views of snapshots `older` and `younger` differ in bytes ([`crate::refer::delta`]);
    /// `None` if either is gone.
    fn refer_delta(&self, older: u64, younger: u64) -> anyhow::Result<Option<(u64, u64)>> {
        let _views = self.views.reading();
        let (a, b, range) = {
            let store = self.store.lock();
            let snaps = store.snapshots();
            let at = |id| snaps.iter().position(|s| s.id == id);
            let (Some(ia), Some(ib)) = (at(older), at(younger)) else { return Ok(None) };
            (self.read_stack(&store, &snaps[ia..])?, self.read_stack(&store, &snaps[ib..])?, ib - ia)
        };
        let (ra, rb) = (a.root()?, b.root()?);
        Ok(Some(crate::refer::delta((&a, &ra), (&b, &rb), range, &self.hidden)?))
    }

    /// What snapshot `id`'s tree references, by a walk of all of it, holding the views a few
    /// thousand names at a time (changes in LIVE wait for that long, not for the whole walk);
    /// `Walked::Gone` if it was deleted meanwhile.
    ///
    /// A take or delete meanwhile pauses it (`Walked::Paused`): the worker seals and summarizes
    /// first, then comes back and goes on where it stopped (a walk of a large tree takes
    /// minutes; the seal must not wait that long behind a take).
    fn refer_by_walk(&self, id: u64) -> anyhow::Result<Walked> {
        let mut walk = match self.walking.lock().take() {
            Some((was, walk)) if was == id => walk,
            _ => crate::refer::Walk::default(),
        };
        while !walk.done() {
            if self.background.lock().1 {
                tracing::debug!(id, "the walk for what the snapshot references pauses for a take or delete");
                *self.walking.lock() = Some((id, walk));
                return Ok(Walked::Paused);
            }
            let _views = self.views.reading();
            let stack = {
                let store = self.store.lock();
                let snaps = store.snapshots();
                let Some(i) = snaps.iter().position(|s| s.id == id) else { return Ok(Walked::Gone) };
                self.view_stack(&store, &snaps[i..])?
            };
            crate::refer::walk_some(&stack, &self.hidden, &mut walk, 4096)?;
        }
        Ok(Walked::Done(walk.bytes))
    }

    /// What snapshot `id`'s tree references, if worked out ([`Snapper::account`]).
    pub fn referenced(&self, id: u64) -> Option<u64> {
        self.refer.lock().get(&id).copied()
    }

    fn reseal_locked(&self) -> anyhow::Result<()> {
        for _ in 0..3 {
            let generation = self.generation.load(Ordering::Acquire);
            let (stack, newest) = {
                let _views = self.views.reading();
                let store = self.store.lock();
                let snaps = store.snapshots();
                let Some(newest) = snaps.last() else { return Ok(()) };
                (self.view_stack(&store, &snaps[snaps.len() - 1..])?, newest.id)
            };
            let marks = match crate::seal::record(&stack, &self.hidden) {
                // Something moved or went while it was read: read again.
                Err(e)
                    if matches!(
                        e.errno(),
                        ovl_core::Errno::AGAIN | ovl_core::Errno::NOENT | ovl_core::Errno::NOTDIR
                    ) =>
                {
                    continue;
                }
                other => other?,
            };
            if !crate::seal::consistent(&stack, &self.hidden, &marks)? {
                continue;
            }
            // Written and synced without the store's lock; put in place under it, if no take or
            // delete came in between.
            let root = rustix::io::dup(self.store.lock().root())?;
            let mut staged = crate::seal::stage(root.as_fd(), &crate::seal::Seal { newest, marks })?;
            let store = self.store.lock();
            if self.generation.load(Ordering::Acquire) == generation {
                staged.install()?;
                drop(store);
                staged.sync()?;
                self.sealed.store(generation, Ordering::Release);
                return Ok(());
            }
        }
        tracing::warn!("LIVE not sealed: snapshots or directories kept changing; the next take or umount seals it");
        Ok(())
    }
}

impl Snapper {
    /// Deletes snapshot `name`, online: the oldest just loses its layer; any other has its layer
    /// merged into the next older one, leaving every other view as it was. Changes wait meanwhile
    /// (the merge reads LIVE when the newest snapshot is deleted). Refused while a view of the
    /// snapshot is open or mounted.
    pub fn delete(&self, name: &str) -> anyhow::Result<crate::store::SnapshotInfo> {
        // The kernel sends RELEASE of a closed file asynchronously: a process (or a clone's
        // kernel overlay, which reads the view as its lower layer) that closed its last file of
        // the view a moment ago may still count as a user. Such releases are given a moment to
        // arrive, before changes are stopped; a view still open after it is refused below.
        let id = self.store.lock().by_name(name).map(|s| s.id);
        if let Some(id) = id {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            while self.views.in_use(id) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        let info = self.delete_stopped(name)?;
        // Only with every lock let go: the kernel takes `.snapshots`' directory lock to forget a
        // name, which a view lookup in flight may hold while it waits for the views' lock. (Made
        // under the delete's locks, a stress test's delete hung for a minute in CI.)
        self.forget_view_name(name);
        self.forget_retired_names();
        Ok(info)
    }

    /// [`Snapper::delete`] with changes stopped and the views' lock held, until it returns.
    fn delete_stopped(&self, name: &str) -> anyhow::Result<crate::store::SnapshotInfo> {
        let _gate = self.gate.write();
        let _views = self.views.changing();
        let mut store = self.store.lock();
        // (No copy of the list: at 10,000 snapshots that was a twentieth of a delete.)
        let (i, info, older) = {
            let snaps = store.snapshots();
            let i = snaps.iter().position(|s| s.name == name).with_context(|| format!("no snapshot named {name:?}"))?;
            (i, snaps[i].clone(), i.checked_sub(1).map(|o| (snaps[o].id, snaps[o].name.clone())))
        };
        let newest = i + 1 == store.snapshots().len();
        let held = store.holds(info.id);
        if let Some(tag) = held.first() {
            anyhow::bail!(
                "snapshot {name:?} is held ({}): `ovlsnap release {} {name}` first",
                held.join(", "),
                shell_word(tag)
            );
        }
        if self.views.in_use(info.id) {
            anyhow::bail!(
                "snapshot {name:?} is in use: files or directories of .snapshots/{name} are open; close them and retry"
            );
        }
        if let Some(at) = kernel_mount_of(&store, info.id)? {
            anyhow::bail!(
                "snapshot {name:?} is mounted at {} (from `ovlsnap mount-view` or `mount-cmd`); unmount it first",
                at.display()
            );
        }
        if let Some((into, into_name)) = older {
            let (a, b) = {
                let snaps = store.snapshots();
                (self.view_stack(&store, &snaps[i - 1..])?, self.view_stack(&store, &snaps[i + 1..])?)
            };
            // The merged layer is another directory under `into`'s id: its summary is made anew.
            self.views.holders.write().forget(into);
            crate::summary::remove(store.root(), into)?;
            let (dir_name, dir) = store.merge_dir(into)?;
            let gone = crate::merge::build(&a, &b, 2, false, &self.hidden, std::os::fd::AsFd::as_fd(&dir))
                .with_context(|| format!("merging snapshot {name:?} into {into_name:?}"))?;
            rustix::fs::fsync(&dir)?;
            // Older views' names of what the merged layers held or copied now show other objects.
            self.views.saved(&gone);
            drop((a, b));
            store.delete(info.id, Some((into, &dir_name)))?;
            self.layer_fds.lock().remove(into);
        } else {
            store.delete(info.id, None)?;
        }
        self.layer_fds.lock().remove(info.id);
        self.views.holders.write().forget(info.id);
        if let Err(e) = crate::summary::remove(store.root(), info.id) {
            tracing::warn!(id = info.id, "the summary of a deleted layer stays: {e:#}");
        }
        self.refer.lock().remove(&info.id);
        if let Err(e) = crate::summary::remove_refer(store.root(), info.id) {
            tracing::warn!(id = info.id, "what a deleted snapshot referenced stays recorded: {e:#}");
        }
        drop(store);
        let sealed = self.generation.load(Ordering::Acquire);
        self.switch()?;
        if !newest {
            // The newest layer and LIVE are as they were: a seal made for them still holds.
            let now = self.generation.load(Ordering::Acquire);
            let _ = self.sealed.compare_exchange(sealed, now, Ordering::AcqRel, Ordering::Acquire);
        }
        tracing::info!(name, id = info.id, "snapshot deleted");
        Ok(info)
    }

    /// Renames snapshot `name` to `to`. Its view, open files in it and kernel mounts of it go on
    /// (they know it by id); `.snapshots/NAME` is gone at once, `.snapshots/TO` is there.
    pub fn rename(&self, name: &str, to: &str) -> anyhow::Result<crate::store::SnapshotInfo> {
        let info = {
            let mut store = self.store.lock();
            let id = store.by_name(name).with_context(|| format!("no snapshot named {name:?}"))?.id;
            store.rename(id, to)?;
            // Under the store's lock, as a take or delete sets the names.
            self.views.rename(name, to, id);
            store.info(id).cloned().context("the renamed snapshot is gone")?
        };
        self.forget_view_name(name);
        tracing::info!(name, to, id = info.id, "snapshot renamed");
        Ok(info)
    }

    /// Sets snapshot `name`'s description (`Some(None)`: removes it) and user properties (a
    /// `None` value removes the key), one durable change each, in order. Returns the snapshot.
    pub fn set(
        &self,
        name: &str,
        description: Option<Option<&str>>,
        properties: &[(String, Option<String>)],
    ) -> anyhow::Result<SnapshotInfo> {
        let mut store = self.store.lock();
        let id = store.by_name(name).with_context(|| format!("no snapshot named {name:?}"))?.id;
        if let Some(d) = description {
            store.describe(id, d)?;
        }
        for (key, value) in properties {
            store.set_property(id, key, value.as_deref())?;
        }
        store.info(id).cloned().context("the snapshot is gone")
    }

    /// Puts hold `tag` on snapshot `name` (`hold` false: takes it off). Returns its holds.
    pub fn hold(&self, name: &str, tag: &str, hold: bool) -> anyhow::Result<Vec<String>> {
        let mut store = self.store.lock();
        let id = store.by_name(name).with_context(|| format!("no snapshot named {name:?}"))?.id;
        store.set_hold(id, tag, hold)?;
        tracing::info!(name, tag, hold, "snapshot hold changed");
        Ok(store.holds(id))
    }

    /// Where the session's notifier will be (see `OverlayFs::notifier_slot`): to make the
    /// kernel forget names of `.snapshots` that went (it keeps them for the entry TTL).
    pub fn set_notifier(&self, slot: Arc<std::sync::OnceLock<fuser::Notifier>>) {
        let _ = self.notifier.set(slot);
    }

    /// Makes the kernel forget `.snapshots/NAME` (a snapshot deleted or renamed). No lock may be
    /// held: the kernel may wait for a request of the mount meanwhile.
    fn forget_view_name(&self, name: &str) {
        if let Some(n) = self.notifier.get().and_then(|slot| slot.get()) {
            let dir = fuser::INodeNo(crate::view::SNAPDIR);
            if let Err(e) = n.inval_entry(dir, std::ffi::OsStr::new(name)) {
                tracing::debug!(name, %e, "no invalidation of .snapshots/NAME sent");
            }
        }
    }
}

/// `word`, quoted for a shell if it needs to be.
fn shell_word(word: &str) -> String {
    if !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_.,:@+=/".contains(c)) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// Where a kernel overlay made from `mount-cmd` or `mount-view` uses layer `id` of this daemon's
/// store, if it does.
fn kernel_mount_of(store: &Store, id: u64) -> anyhow::Result<Option<PathBuf>> {
    let needle = layer_proc_path(store, id);
    let needle = needle.to_str().context("a layer path is not UTF-8")?;
    let views = store_proc_path(store).join(crate::store::VIEWS);
    let views = format!("{}/", views.to_str().context("the store's path is not UTF-8")?);
    // A consolidated layer `FIRST-LAST-N` stands for the snapshot layers FIRST to LAST.
    let consolidates = |opt: &str| {
        let Some(token) = opt.strip_prefix(&views) else { return false };
        let mut ids = token.split('-').map(|n| n.parse::<u64>().ok());
        matches!((ids.next(), ids.next()), (Some(Some(first)), Some(Some(last))) if (first..=last).contains(&id))
    };
    let info = ovl_fs::mount::read_mountinfo()?;
    for l in info.lines() {
        let Some((left, right)) = l.split_once(" - ") else { continue };
        // `mount-cmd` shows as one `lowerdir=A:B:C`, `mount-view` as `lowerdir+=A,lowerdir+=B,..`;
        // our layer paths hold none of `,:=\` (nor anything mountinfo escapes), so a plain split
        // finds them in either form.
        if right.starts_with("overlay ") && right.split([',', ':', '=']).any(|opt| opt == needle || consolidates(opt)) {
            return Ok(left.split(' ').nth(4).map(ovl_fs::mount::unescape_mountinfo));
        }
    }
    Ok(None)
}

/// The snapshots of `store` with their usage: from `known` (a frozen layer's summary: objects,
/// bytes), else read from the layer.
pub fn list_store(
    store: &Store,
    holders: &ovl_core::presence::Holders,
    refer: impl Fn(u64) -> Option<u64>,
    only: Option<&[usize]>,
) -> anyhow::Result<Vec<Listed>> {
    list_of(
        store.snapshots(),
        holders,
        |id| store.open_layer(id),
        |id| store.damage().get(&id).cloned(),
        |id| store.holds(id),
        refer,
        only,
    )
}

/// The list of `snaps` (oldest first): usage and the bytes a delete would free from `holders`
/// (layers with a summary in use), else from the layer, read now (`open_layer`).
pub(crate) fn list_of(
    snaps: &[SnapshotInfo],
    holders: &ovl_core::presence::Holders,
    open_layer: impl Fn(u64) -> anyhow::Result<OwnedFd>,
    damage: impl Fn(u64) -> Option<crate::store::Damage>,
    holds: impl Fn(u64) -> Vec<String>,
    refer: impl Fn(u64) -> Option<u64>,
    only: Option<&[usize]>,
) -> anyhow::Result<Vec<Listed>> {
    let mut out = Vec::new();
    let all: Vec<usize>;
    let which = match only {
        Some(at) => at,
        None => {
            all = (0..snaps.len()).collect();
            &all
        }
    };
    for &i in which {
        let s = &snaps[i];
        let older = i.checked_sub(1).map(|o| snaps[o].id);
        let (entries, bytes, freed, own) = match holders.usage(s.id) {
            Some((entries, bytes)) => (entries, bytes, holders.freed_by(s.id, older), holders.own_bytes(s.id)),
            None => {
                // The newest layer (still written to) or one not summarized yet.
                let summary = ovl_core::presence::Summary::read(open_layer(s.id)?.as_fd())?;
                let freed = holders.freed_by_summary(&summary, older);
                (summary.objects.len() as u64, summary.bytes, freed, Some(summary.own_bytes()))
            }
        };
        let refer = damage(s.id).is_none().then(|| refer(s.id)).flatten();
        out.push(Listed {
            name: s.name.clone(),
            id: s.id,
            created: rfc3339(s.created),
            created_unix: s.created,
            layer_bytes: bytes,
            entries,
            freed_bytes: freed,
            refer_bytes: refer,
            shared_bytes: refer.zip(own).map(|(r, own)| r.saturating_sub(own)),
            damage: damage(s.id),
            holds: holds(s.id),
            description: s.description.clone(),
            properties: s.properties.clone(),
        });
    }
    Ok(out)
}

/// A new layer's root carries LIVE root's owner, mode, xattrs and times at take time: the kernel
/// shows the top layer's root.
fn copy_root_meta(live: std::os::fd::BorrowedFd<'_>, layer: std::os::fd::BorrowedFd<'_>) -> anyhow::Result<()> {
    let st = rustix::fs::fstat(live)?;
    for key in sys::list_xattrs(live, None)? {
        if ovl_core::XattrNames::is_any_overlay(key.as_encoded_bytes()) {
            continue;
        }
        let key = std::ffi::CString::new(key.as_encoded_bytes())?;
        if let Some(v) = sys::get_xattr(live, None, &key)? {
            sys::set_xattr(layer, None, &key, &v, 0)?;
        }
    }
    rustix::fs::fchown(layer, Some(rustix::fs::Uid::from_raw(st.st_uid)), Some(rustix::fs::Gid::from_raw(st.st_gid)))?;
    rustix::fs::fchmod(layer, rustix::fs::Mode::from_raw_mode(st.st_mode & 0o7777))?;
    let ts = |sec: i64, nsec: u64| rustix::fs::Timespec { tv_sec: sec as _, tv_nsec: nsec as _ };
    let times = rustix::fs::Timestamps {
        last_access: ts(st.st_atime as i64, st.st_atime_nsec as u64),
        last_modification: ts(st.st_mtime as i64, st.st_mtime_nsec as u64),
    };
    sys::set_times(layer, &times)?;
    Ok(())
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(secs: u64) -> String {
    let (y, m, d) = civil(secs / 86_400);
    let rem = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The civil date (year, month, day) of `days` since 1970-01-01 (Howard Hinnant's algorithm).
pub(crate) fn civil(days: u64) -> (i64, u32, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m as u32, d as u32)
}

/// Days since 1970-01-01 of the civil date `y`-`m`-`d` (the inverse of [`civil`]; a day past
/// the month's end runs on into the next month).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Writes the mount's seal; a failure (a full disk) does not refuse the mount: the old seal stays,
/// which still holds while LIVE is served, and what it cannot vouch for shows as unverified.
fn write_seal_or_warn(root: std::os::fd::BorrowedFd<'_>, seal: &crate::seal::Seal) {
    if let Err(e) = crate::seal::write(root, seal) {
        tracing::error!("sealing LIVE at the mount: {e:#}");
    }
}

/// Ends a change that may have run CoW rules (dropped before the locks it sits with).
struct Finish<'a>(&'a Snapper);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0.cow.lock().as_mut() {
            if let Err(e) = c.finish() {
                tracing::error!("settling a directory rename: {e}");
            }
        }
    }
}

/// After a change that saved LIVE objects the views showed: makes the kernel forget the view
/// names it keeps of them (see `Views::saved`), before the change's reply.
struct ForgetRetired<'a>(&'a Snapper);

/// How long a change waits for the kernel to forget view names of what it saved. The kernel
/// takes each name's directory lock, which a view lookup in flight holds until a daemon thread
/// answers it; that may be the very thread waiting (a ring's), so it waits only this long and
/// lets a helper thread finish. A name left is only a stale number: its bytes are the saved copy's.
const FORGET_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

impl Drop for ForgetRetired<'_> {
    fn drop(&mut self) {
        self.0.forget_retired_names();
    }
}

impl Snapper {
    /// Makes the kernel forget the view names of retired nodes (`Views::take_retired_names`),
    /// waiting at most [`FORGET_WAIT`]. No lock may be held.
    fn forget_retired_names(&self) {
        let names = self.views.take_retired_names();
        if names.is_empty() {
            return;
        }
        let Some(n) = self.notifier.get().and_then(|slot| slot.get()).cloned() else { return };
        let (done, wait) = std::sync::mpsc::channel();
        let sent = std::thread::Builder::new().name("ovlsnap-inval".into()).spawn(move || {
            for (dir, name) in names {
                if let Err(e) = n.inval_entry(fuser::INodeNo(dir), &name) {
                    tracing::debug!(dir, ?name, %e, "view name invalidation not sent");
                }
            }
            let _ = done.send(());
        });
        match sent {
            Ok(_) => {
                if wait.recv_timeout(FORGET_WAIT).is_err() {
                    tracing::debug!("view name invalidations still waiting for a directory lock");
                }
            }
            Err(e) => tracing::debug!(%e, "view name invalidation not started"),
        }
    }
}

impl Snapper {
    /// Copies the file at LIVE `path` ahead of its first change, and finds its names when it has
    /// several links, when the newest snapshot will need its state (see `crate::precopy`); waits
    /// for such work another change of it started.
    fn precopy(&self, path: &Path, removal: bool) -> ovl_core::Result<()> {
        use crate::precopy::{Ahead, Claim};
        use rustix::fs::FileType;
        if self.generation.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let st = sys::lstat_beneath(self.live.as_fd(), path)?;
        let kind = FileType::from_raw_mode(st.st_mode);
        // An empty file is copied in no time; the last name of a removed file is linked, not copied.
        let copy = kind == FileType::RegularFile && st.st_size > 0 && (!removal || st.st_nlink > 1);
        let names = kind != FileType::Directory && st.st_nlink > 1;
        if !copy && !names {
            return Ok(());
        }
        let (claim, stack) = {
            let cow = self.cow.lock();
            let Some(c) = cow.as_ref() else { return Ok(()) };
            (self.precopies.claim(&st, || c.needs_copy(path, &st))?, c.stack())
        };
        let slot = match claim {
            Claim::Skip => return Ok(()),
            Claim::Wait(slot) => {
                slot.wait();
                return Ok(());
            }
            Claim::Copy(slot) => slot,
        };
        let made = (|| {
            let names = if names { Some(crate::cow::live_names(self.live.as_fd(), &self.hidden, &st)?) } else { None };
            let copy = if copy {
                let src = ovl_copyup::Source { layer: crate::cow::LIVE, path: path.to_owned() };
                let c = ovl_copyup::prepare_copy(&stack, &src)?;
                // The path may lead to another file by now: then this copy is not the slot's.
                if (c.source().st_dev, c.source().st_ino) != (st.st_dev, st.st_ino) {
                    return Err(ovl_core::Errno::AGAIN.into());
                }
                Some(c)
            } else {
                None
            };
            Ok(Ahead { source: st, copy, names })
        })();
        slot.fill(made);
        Ok(())
    }
}

impl ChangeHook for Snapper {
    fn prepare(&self, path: &Path, removal: bool) {
        if let Err(e) = self.precopy(path, removal) {
            tracing::debug!(?path, "no copy ahead: {e}");
        }
    }

    fn gate(&self, quiet: bool) -> GateGuard<'_> {
        let g = self.gate.read();
        if quiet || self.generation.load(Ordering::Acquire) == 0 {
            Box::new(g)
        } else {
            // Fields drop in order: `Finish` runs while both locks are still held,
            // `ForgetRetired` after both are released.
            Box::new((Finish(self), self.views.changing(), g, ForgetRetired(self)))
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn before_modify(&self, path: &Path) -> ovl_core::Result<()> {
        let copied = match self.cow.lock().as_ref() {
            Some(c) => c.before_modify(path)?,
            None => return Ok(()),
        };
        self.views.saved(&copied);
        Ok(())
    }

    fn before_create(&self, path: &Path) -> ovl_core::Result<()> {
        match self.cow.lock().as_ref() {
            Some(c) => c.before_create(path),
            None => Ok(()),
        }
    }

    fn before_remove(&self, path: &Path) -> ovl_core::Result<()> {
        let copied = match self.cow.lock().as_mut() {
            Some(c) => c.before_remove(path)?,
            None => return Ok(()),
        };
        self.views.saved(&copied);
        Ok(())
    }

    fn after_remove(&self, path: &Path) {
        if let Some(c) = self.cow.lock().as_mut() {
            if let Err(e) = c.drop_orphan_whiteout(path) {
                tracing::debug!(?path, "keeping a whiteout that may be an orphan now: {e}");
            }
        }
    }

    fn before_rename(&self, from: &Path, to: &Path, exchange: bool) -> ovl_core::Result<()> {
        let copied = match self.cow.lock().as_mut() {
            Some(c) => c.before_rename(from, to, exchange)?,
            None => return Ok(()),
        };
        self.views.saved(&copied);
        Ok(())
    }
}
