//! Offline check of a snapshot store (`ovlsnap check`): the snapshot list, the layer dirs, what
//! an interrupted run left, and every snapshot layer as the kernel reads it, i.e. as the upper
//! layer over the layers below it in the view stack `layers/k : ... : layers/N : LIVE`
//! (`ovl_fs::check`).
//!
//! Store findings, besides the layer kinds of [`ovl_fs::check`]:
//!
//! | kind | severity | what |
//! |---|---|---|
//! | `snapshot-list-missing`, `snapshot-list-corrupt` | error | `snapshots.json` absent (with layers or a backup) or unreadable; a repair rebuilds it |
//! | `snapshot-list-rebuilt` | fixable (repaired) | what a repair did to rebuild a lost list: restored the backup, adopted a layer, left out a snapshot without one |
//! | `snapshot-entry-invalid` | error | an id 0, not below `next_id`, or twice; a bad or repeated name |
//! | `store-of-other-live` | error | the list names another directory than LIVE |
//! | `layer-missing` | error | a listed snapshot without `layers/ID` |
//! | `layer-unlisted` | fixable | a layer dir no snapshot owns (interrupted take or delete) |
//! | `stale-work-entry` | fixable | a half-made copy in `work/work` |
//! | `rename-in-progress`, `delete-in-progress` | fixable | a journal of an interrupted run (also an empty delete journal) |
//! | `delete-journal-corrupt` | error | an unreadable delete journal: no daemon starts |
//! | `snapshot-list-temp` | fixable | `snapshots.json.tmp` of an interrupted write |
//! | `store-in-use` | warning | a daemon serves the store: checked as it runs |
//! | `snapshot-changed-unserved` | error | LIVE changed paths this snapshot shows while no daemon served it (found at a mount) |
//! | `snapshot-unverified` | warning | no seal to check LIVE against at a mount: changes while unserved cannot be ruled out |
//!
//! A repair settles the store the way the next mount would, by the same code
//! ([`daemon::open_store`]: journals settled, unowned layers and work leftovers removed), then
//! removes the layers' whiteouts that hide nothing, and checks again. It needs the store's lock
//! (no daemon running). A lost or unreadable snapshot list is rebuilt first (`store::rebuild_meta`:
//! the backup list, every layer it does not name adopted as `recovered-ID`; no layer is ever
//! removed for it); otherwise it repairs nothing while the list is unusable or a listed layer is
//! missing (layers judged over a wrong stack would lose whiteouts they need).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use ovl_core::{LayerStack, MountOptions, sys};
use ovl_fs::check::{Finding, Report, Severity};
use rustix::fs::{FlockOperation, Mode, OFlags};

use crate::control::{self, Request, Status};
use crate::cow::{JOURNAL, read_journal, rename_happened};
use crate::daemon::{self, FSTYPE};
use crate::store::{
    DEFAULT_NAME, MERGING, META, META_BACKUP, Meta, delete_journal_cut_short, live_id, pending_delete, valid_name,
};

/// How many times (20 ms apart) the store's lock is tried before it counts as a daemon's.
const LOCK_TRIES: u32 = 50;

/// Store errors that keep a repair from opening the store (the mount would refuse it too, or
/// would take it for a new store and drop every layer).
const BLOCKING: &[&str] = &[
    "snapshot-list-missing",
    "snapshot-list-corrupt",
    "snapshot-entry-invalid",
    "store-of-other-live",
    "layer-missing",
];

/// Checks the store of LIVE (`store`: `None` for the default `LIVE/.ovlsnap`). When a daemon
/// serves it, the check runs read-only through the daemon's descriptors and says so; with
/// `repair` that is refused. Otherwise, with `repair`, what is fixable is settled and removed,
/// then the store is checked again.
pub fn check_store(live: &Path, store: Option<&Path>, repair: bool) -> anyhow::Result<Report> {
    let live = std::fs::canonicalize(live).with_context(|| format!("LIVE {live:?}"))?;
    if daemon::mounts_of_type(FSTYPE)?.contains(&live) {
        if repair {
            bail!(
                "a daemon serves {}: unmount it first (`ovlsnap umount {}`), then repair",
                live.display(),
                live.display()
            );
        }
        return check_mount(&live);
    }
    let store_path = match store {
        Some(p) => std::fs::canonicalize(p).with_context(|| format!("the store {p:?}: no such directory"))?,
        None => live.join(DEFAULT_NAME),
    };
    let root = rustix::fs::open(&store_path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .with_context(|| format!("no snapshot store at {}", store_path.display()))?;
    let live_fd = rustix::fs::open(&live, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .with_context(|| format!("opening {live:?}"))?;
    let target =
        Target { store: store_path.clone(), access: store_path, root, live: (live.clone(), Arc::new(live_fd)) };
    let mut lock = target.lock()?;
    if lock.is_none() {
        if repair {
            bail!("a daemon holds the lock of the store {}: unmount it first, then repair", target.store.display());
        }
        let mut report = target.inspect()?;
        let detail = "a daemon holds the store's lock: checked while it runs, findings may be transient";
        report.findings.push(Finding::new(Severity::Warning, "store-in-use", &target.store, detail));
        report.sort();
        return Ok(report);
    }
    let mut report = target.inspect()?;
    let mut rebuilt = Vec::new();
    if repair {
        let lost: Vec<Finding> = report
            .findings
            .iter()
            .filter(|f| matches!(f.kind, "snapshot-list-missing" | "snapshot-list-corrupt"))
            .cloned()
            .collect();
        if !lost.is_empty() {
            // The list is lost: rebuild it from its backup and the layers, never dropping one.
            let (meta, notes) = crate::store::rebuild_meta(target.root.as_fd(), &live_id(target.live.1.as_fd())?)?;
            crate::store::install_rebuilt_meta(target.root.as_fd(), &meta)?;
            for n in notes {
                tracing::warn!("rebuilding the snapshot list: {n}");
                rebuilt.push(Finding::new(Severity::Fixable, "snapshot-list-rebuilt", target.store.join(META), n));
            }
            rebuilt.extend(lost);
            report = target.inspect()?;
        }
    }
    // With the list unusable or a layer missing, the mount would refuse the store (or take it
    // for a new one), and the layers' findings are judged against a wrong stack: repair nothing.
    let blocked = report.findings.iter().any(|f| BLOCKING.contains(&f.kind));
    if !repair || blocked || report.fixable().next().is_none() {
        report.repaired = rebuilt;
        return Ok(report);
    }
    let mut repaired = rebuilt;
    let store_level: Vec<Finding> = report.fixable().filter(|f| !is_layer_fix(f)).cloned().collect();
    if !store_level.is_empty() {
        // The mount's own recovery, under the store's lock (ours is let go for it).
        drop(lock);
        drop(daemon::open_store(&live, store).context("settling the store as a mount would")?);
        lock = target.lock()?;
        if lock.is_none() {
            bail!("a daemon took the store's lock during the repair");
        }
    }
    // The layers as they are once settled.
    let again = target.inspect()?;
    let gone = |f: &Finding| !again.findings.iter().any(|g| g.kind == f.kind && g.path == f.path);
    repaired.extend(store_level.into_iter().filter(gone));
    repaired.extend(target.repair_layers(&again)?);
    let mut report = target.inspect()?;
    report.repaired = repaired;
    report.sort();
    drop(lock);
    Ok(report)
}

/// Checks the store of the ovlsnap mount `mnt` while its daemon runs, read-only, through the
/// daemon's own descriptors of the store and of LIVE (the store may be hidden under the mount).
/// What the newest layer and LIVE show may change while it runs; the report says so.
pub fn check_mount(mnt: &Path) -> anyhow::Result<Report> {
    let status: Status = serde_json::from_value(control::call(mnt, &Request::Status)?)?;
    let mnt_dev = rustix::fs::stat(mnt)?.st_dev;
    let (store_access, root) = daemon_fd(status.pid, &status.store, mnt_dev)?;
    let (_, live_fd) = daemon_fd(status.pid, &status.live, mnt_dev)?;
    let target =
        Target { store: status.store.clone(), access: store_access, root, live: (status.live, Arc::new(live_fd)) };
    let mut report = target.inspect()?;
    let detail = format!(
        "served by the daemon {} at {}: checked while it runs, findings may be transient (unmount for a \
         repair)",
        status.pid,
        status.mount.display()
    );
    report.findings.push(Finding::new(Severity::Warning, "store-in-use", &status.store, detail));
    report.sort();
    Ok(report)
}

/// A descriptor that process `pid` holds on the directory `path` (not on the mount with device
/// `mnt_dev` over it): its `/proc/PID/fd/N` path and the directory, opened through it.
fn daemon_fd(pid: u32, path: &Path, mnt_dev: u64) -> anyhow::Result<(PathBuf, OwnedFd)> {
    let fds = PathBuf::from(format!("/proc/{pid}/fd"));
    for e in std::fs::read_dir(&fds).with_context(|| format!("reading {}", fds.display()))?.flatten() {
        if std::fs::read_link(e.path()).ok().as_deref() != Some(path) {
            continue;
        }
        let Ok(fd) = rustix::fs::open(e.path(), OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        else {
            continue;
        };
        if rustix::fs::fstat(&fd)?.st_dev != mnt_dev {
            return Ok((e.path(), fd));
        }
    }
    bail!("the daemon {pid} holds no descriptor of {}", path.display())
}

/// The store's lock, held by this process until dropped (nothing to hold for a store without a
/// lock file).
struct StoreLock {
    _file: Option<File>,
}

/// The whiteout findings a layer repair removes.
fn is_layer_fix(f: &Finding) -> bool {
    matches!(f.kind, "orphan-whiteout" | "whiteout-in-opaque-dir")
}

/// A store to check: where it is shown (`store`) and opened (`access`: the same path, or the
/// daemon's `/proc/PID/fd/N`), and LIVE.
struct Target {
    store: PathBuf,
    access: PathBuf,
    root: OwnedFd,
    live: (PathBuf, Arc<OwnedFd>),
}

impl Target {
    /// Takes the store's lock without waiting (held until the guard drops): `None` when a daemon
    /// holds it.
    fn lock(&self) -> anyhow::Result<Option<StoreLock>> {
        let fd = match rustix::fs::openat(&self.root, "lock", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            // Never served by a daemon.
            Err(rustix::io::Errno::NOENT) => return Ok(Some(StoreLock { _file: None })),
            Err(e) => return Err(e).context("opening the store's lock"),
        };
        // A daemon that is exiting lets go within moments; one that serves, never.
        for _ in 0..LOCK_TRIES {
            match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(Some(StoreLock { _file: Some(File::from(fd)) })),
                Err(rustix::io::Errno::WOULDBLOCK) => std::thread::sleep(std::time::Duration::from_millis(20)),
                Err(e) => return Err(e).context("locking the store"),
            }
        }
        Ok(None)
    }

    fn finding(&self, report: &mut Report, severity: Severity, kind: &'static str, rel: &str, detail: String) {
        let path = if rel.is_empty() { self.store.clone() } else { self.store.join(rel) };
        report.findings.push(Finding::new(severity, kind, path, detail));
    }

    /// Everything the check looks at; writes nothing.
    fn inspect(&self) -> anyhow::Result<Report> {
        let mut report = Report::default();
        let layers = match rustix::fs::openat(
            &self.root,
            "layers",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Some(fd),
            Err(rustix::io::Errno::NOENT) => None,
            Err(e) => return Err(e).context("opening the store's layers"),
        };
        let dirs: Vec<String> = match &layers {
            Some(fd) => sys::read_dir_fd(rustix::io::dup(fd)?)?
                .into_iter()
                .map(|e| e.name.to_string_lossy().into_owned())
                .collect(),
            None => Vec::new(),
        };
        let meta = self.meta(&mut report, !dirs.is_empty())?;
        if let (Some(meta), Some(layers)) = (&meta, &layers) {
            self.layer_dirs(&mut report, meta, &dirs);
            self.damage(&mut report, meta);
            self.journals(&mut report, meta, layers.as_fd())?;
            let checks =
                self.each_layer(meta, layers.as_fd(), false, |stack| Ok(ovl_fs::check::check_upper(stack)?))?;
            for layer in checks {
                report.merge(layer);
            }
        }
        let mut work = ovl_fs::check::check_workdir(&self.access.join("work"))?;
        for f in work.findings.iter_mut() {
            if let Ok(rest) = f.path.strip_prefix(&self.access) {
                f.path = self.store.join(rest);
            }
        }
        report.merge(work);
        if rustix::fs::statat(&self.root, "snapshots.json.tmp", rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok() {
            let detail = "an interrupted write of the snapshot list (the list itself is whole)".to_string();
            self.finding(&mut report, Severity::Fixable, "snapshot-list-temp", "snapshots.json.tmp", detail);
        }
        report.sort();
        Ok(report)
    }

    /// Reads and checks `snapshots.json`; `None` when it cannot be used.
    fn meta(&self, report: &mut Report, has_layers: bool) -> anyhow::Result<Option<Meta>> {
        report.checked += 1;
        let fd = match rustix::fs::openat(&self.root, META, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => {
                let backup = rustix::fs::statat(&self.root, META_BACKUP, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok();
                if has_layers || backup {
                    let detail = "the snapshot list is missing while layers (or its backup) are there: no mount \
                                  starts; --repair rebuilds it from the backup and adopts every layer"
                        .to_string();
                    self.finding(report, Severity::Error, "snapshot-list-missing", META, detail);
                }
                return Ok(None);
            }
            Err(e) => return Err(e).context("opening snapshots.json"),
        };
        let text = std::io::read_to_string(File::from(fd)).context("reading snapshots.json")?;
        let mut meta: Meta = match serde_json::from_str(&text) {
            Ok(m) => m,
            Err(e) => {
                let detail = format!(
                    "the snapshot list does not parse ({e}): no daemon starts on this store; --repair rebuilds it \
                     from the backup and adopts every layer"
                );
                self.finding(report, Severity::Error, "snapshot-list-corrupt", META, detail);
                return Ok(None);
            }
        };
        if !(1..=crate::store::META_VERSION).contains(&meta.version) {
            let detail = format!(
                "the snapshot list has format version {}; this ovlsnap reads versions 1 to {}",
                meta.version,
                crate::store::META_VERSION
            );
            self.finding(report, Severity::Error, "snapshot-list-corrupt", META, detail);
            return Ok(None);
        }
        if let Err(e) = crate::store::read_log(self.root.as_fd(), &mut meta, false) {
            let detail = format!(
                "the log of changes since the list's checkpoint is unreadable ({e:#}): no daemon starts on this \
                 store; --repair rebuilds the list from the log's good records and adopts every layer"
            );
            self.finding(report, Severity::Error, "snapshot-list-corrupt", crate::store::LOG, detail);
            return Ok(None);
        }
        let live = live_id(self.live.1.as_fd())?;
        if meta.live != live {
            let detail = format!(
                "the store belongs to another directory than {} (filesystem {} inode {}, not {} inode {})",
                self.live.0.display(),
                meta.live.fs,
                meta.live.ino,
                live.fs,
                live.ino
            );
            self.finding(report, Severity::Error, "store-of-other-live", META, detail);
        }
        let (mut ids, mut names) = (HashMap::new(), HashMap::new());
        for s in &meta.snapshots {
            let mut bad = Vec::new();
            if s.id == 0 || s.id >= meta.next_id {
                bad.push(format!("id {} is not between 1 and next_id {}", s.id, meta.next_id));
            }
            if let Some(other) = ids.insert(s.id, s.name.clone()) {
                bad.push(format!("id {} is also {other:?}'s", s.id));
            }
            if !valid_name(&s.name) {
                bad.push("the name is not a valid snapshot name".to_string());
            }
            if names.insert(s.name.clone(), s.id).is_some() {
                bad.push("the name is listed twice".to_string());
            }
            if !bad.is_empty() {
                let detail = format!("snapshot {:?} (id {}): {}", s.name, s.id, bad.join("; "));
                self.finding(report, Severity::Error, "snapshot-entry-invalid", META, detail);
            }
        }
        Ok(Some(meta))
    }

    /// Snapshots a mount found changed behind the daemon's back (`crate::seal`): each is an
    /// error, with the paths; one that cannot be verified at all is a warning.
    fn damage(&self, report: &mut Report, meta: &Meta) {
        for (id, d) in &meta.damage {
            let name =
                meta.snapshots.iter().find(|s| s.id == *id).map_or(format!("id {id}"), |s| format!("{:?}", s.name));
            let rel = format!("layers/{id}");
            const SHOWN: usize = 20;
            let mut paths: Vec<String> = d.paths.iter().take(SHOWN).map(|p| crate::names::shown(&p.0)).collect();
            if d.paths.len() > SHOWN {
                paths.push(format!("and {} more", d.paths.len() - SHOWN));
            }
            let detail = if paths.is_empty() {
                format!("snapshot {name}: {}", d.reason)
            } else {
                format!("snapshot {name}: {}: {}", d.reason, paths.join(", "))
            };
            if d.unverified {
                self.finding(report, Severity::Warning, "snapshot-unverified", &rel, detail);
            } else {
                self.finding(report, Severity::Error, "snapshot-changed-unserved", &rel, detail);
            }
        }
    }

    /// Every listed snapshot has its layer; every layer dir belongs to one.
    fn layer_dirs(&self, report: &mut Report, meta: &Meta, dirs: &[String]) {
        for s in &meta.snapshots {
            if !dirs.contains(&s.id.to_string()) {
                let detail = format!("snapshot {:?} (id {}) has no layer: its view cannot be shown", s.name, s.id);
                self.finding(report, Severity::Error, "layer-missing", &format!("layers/{}", s.id), detail);
            }
        }
        for d in dirs {
            report.checked += 1;
            if d.parse::<u64>().is_ok_and(|id| meta.snapshots.iter().any(|s| s.id == id)) {
                continue;
            }
            let detail = if d.ends_with(".merging") {
                "the merged layer of an interrupted delete, owned by no snapshot (the next mount removes it)"
            } else {
                "a layer no snapshot owns, left by an interrupted take or delete (the next mount removes it)"
            };
            self.finding(report, Severity::Fixable, "layer-unlisted", &format!("layers/{d}"), detail.to_string());
        }
    }

    /// The journals of an interrupted directory rename or delete, and what settling them does.
    fn journals(&self, report: &mut Report, meta: &Meta, layers: BorrowedFd<'_>) -> anyhow::Result<()> {
        let transient = "until then the layer findings may show the unfinished state";
        match read_journal(self.root.as_fd())? {
            None => {}
            Some(Ok(p)) => {
                let outcome = if rename_happened(self.live.1.as_fd(), &p) {
                    format!("LIVE shows it done, so the next mount keeps the {} rewritten redirects", p.undo.len())
                } else {
                    format!("LIVE does not show it, so the next mount puts back {} redirects", p.undo.len())
                };
                let detail =
                    format!("a directory rename to {} was interrupted: {outcome}; {transient}", p.to.display());
                self.finding(report, Severity::Fixable, "rename-in-progress", JOURNAL, detail);
            }
            Some(Err(e)) => {
                let detail =
                    format!("the journal of an interrupted rename does not parse ({e}): the next mount drops it");
                self.finding(report, Severity::Fixable, "rename-in-progress", JOURNAL, detail);
            }
        }
        if delete_journal_cut_short(self.root.as_fd()) {
            let detail = "an empty journal of a delete: a daemon stopped while writing it, before the merged layer \
                          was swapped in; the next mount removes it"
                .to_string();
            self.finding(report, Severity::Fixable, "delete-in-progress", MERGING, detail);
            return Ok(());
        }
        match pending_delete(self.root.as_fd(), layers) {
            Ok(None) => {}
            Ok(Some((m, swapped))) => {
                let name = |id: u64| {
                    meta.snapshots.iter().find(|s| s.id == id).map_or(format!("id {id}"), |s| format!("{:?}", s.name))
                };
                let outcome = if swapped && meta.snapshots.iter().any(|s| s.id == m.drop) {
                    "the merged layer is in place, so the next mount finishes the delete"
                } else {
                    "the merged layer is not in place, so the next mount undoes it"
                };
                let detail = format!(
                    "a delete of snapshot {} (merged into {}) was interrupted: {outcome}; {transient}",
                    name(m.drop),
                    name(m.into)
                );
                self.finding(report, Severity::Fixable, "delete-in-progress", MERGING, detail);
            }
            Err(e) => {
                let detail = format!("{e:#}: no daemon starts on this store until it is removed");
                self.finding(report, Severity::Error, "delete-journal-corrupt", MERGING, detail);
            }
        }
        Ok(())
    }

    /// Runs `f` on the stack of each listed snapshot's layer: the layer as the upper (writable
    /// when asked), the newer layers and LIVE below it, as its view stacks them.
    fn each_layer<T>(
        &self,
        meta: &Meta,
        layers: BorrowedFd<'_>,
        writable: bool,
        f: impl Fn(&LayerStack) -> anyhow::Result<T>,
    ) -> anyhow::Result<Vec<T>> {
        // Layer roots are opened while used, within a budget (thousands of layers may be
        // more than the open-file limit allows at once).
        let pool = ovl_core::RootPool::new(crate::snapper::layer_root_budget());
        let parent = Arc::new(rustix::io::dup(layers)?);
        let mut open = Vec::new();
        for s in &meta.snapshots {
            let fd = rustix::fs::openat(
                layers,
                s.id.to_string().as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            );
            if let Ok(fd) = fd {
                let root = ovl_core::LayerRoot::lazy(&pool, parent.clone(), &s.id.to_string(), fd)?;
                open.push((s.id, self.store.join(crate::store::Store::layer_rel(s.id)), root));
            }
        }
        let mut out = Vec::new();
        for (i, (_, path, fd)) in open.iter().enumerate() {
            let mut lowers: Vec<(PathBuf, ovl_core::LayerRoot)> =
                open[i + 1..].iter().map(|(_, p, fd)| (p.clone(), fd.clone())).collect();
            lowers.push((self.live.0.clone(), ovl_core::LayerRoot::held(self.live.1.clone())?));
            let work = match sys::open_beneath(
                &self.root,
                Path::new("work/work"),
                OFlags::RDONLY | OFlags::DIRECTORY,
                Mode::empty(),
            ) {
                Ok(w) => w,
                Err(_) => rustix::io::dup(&self.root)?,
            };
            let options = MountOptions { read_only: !writable, userxattr: meta.userxattr, ..Default::default() };
            let stack = LayerStack::from_open_dirs(lowers, Some((path.clone(), fd.clone(), work)), options)?;
            out.push(f(&stack)?);
        }
        Ok(out)
    }

    /// Removes the whiteouts `report` found to hide nothing, layer by layer.
    fn repair_layers(&self, report: &Report) -> anyhow::Result<Vec<Finding>> {
        let fixes: Vec<&Finding> = report.fixable().filter(|f| is_layer_fix(f)).collect();
        if fixes.is_empty() {
            return Ok(Vec::new());
        }
        let Some(meta) = crate::store::read_meta(self.root.as_fd())? else { return Ok(Vec::new()) };
        let layers = rustix::fs::openat(
            &self.root,
            "layers",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let done = self.each_layer(&meta, layers.as_fd(), true, |stack| {
            Ok(ovl_fs::check::repair_upper(stack, fixes.iter().copied())?)
        })?;
        let done: Vec<Finding> = done.into_iter().flatten().collect();
        if !done.is_empty() {
            // The layers' summaries list what was just removed: they are made again.
            crate::summary::remove_all(self.root.as_fd())?;
        }
        Ok(done)
    }
}
