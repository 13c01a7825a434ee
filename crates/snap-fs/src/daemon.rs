//! The snapshot daemon: checks, opens LIVE and its store, mounts the FUSE filesystem at MNT
//! (stacked over LIVE when MNT is LIVE), serves the control socket, and runs until unmounted.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use ovl_core::LayerStack;
use ovl_fs::OverlayFs;
use rustix::fs::{Mode, OFlags};

use crate::control::{self, Status};
use crate::fs::SnapFs;
use crate::snapper::Snapper;
use crate::store::{DEFAULT_NAME, Store};
use crate::view::SNAPDIR_NAME;

/// The mount's filesystem type in /proc/mounts.
pub const FSTYPE: &str = "fuse.ovlsnap";

/// What to serve.
#[derive(Debug, Clone)]
pub struct Config {
    /// The directory to snapshot.
    pub live: PathBuf,
    /// Where to mount (LIVE itself by default).
    pub mount: PathBuf,
    /// The store (`LIVE/.ovlsnap` by default).
    pub store: Option<PathBuf>,
}

/// The mount points of `fstype` mounts, from /proc/self/mountinfo.
pub fn mounts_of_type(fstype: &str) -> anyhow::Result<Vec<PathBuf>> {
    let info = ovl_fs::mount::read_mountinfo()?;
    let mut out = Vec::new();
    for l in info.lines() {
        let Some((left, right)) = l.split_once(" - ") else { continue };
        if right.split(' ').next() == Some(fstype) {
            if let Some(mp) = left.split(' ').nth(4) {
                out.push(ovl_fs::mount::unescape_mountinfo(mp));
            }
        }
    }
    Ok(out)
}

/// Everything checked and opened, the mount not made yet.
pub struct Prepared {
    fs: SnapFs,
    snapper: Arc<Snapper>,
    status: Status,
}

/// LIVE and its store, opened as every mount opens them first: the store locked, an interrupted
/// delete finished or undone, layers no snapshot owns and work dir leftovers removed, and an
/// interrupted directory rename settled (by the CoW target's setup).
pub struct Opened {
    /// LIVE, canonical.
    pub live: PathBuf,
    live_fd: OwnedFd,
    /// Where the store is.
    pub store: PathBuf,
    hidden: Vec<OsString>,
    snapper: Arc<Snapper>,
}

/// Opens LIVE and its store (`store`: `None` for the default inside LIVE) the way a mount does,
/// which settles what an interrupted run left (see [`Opened`]). Refuses a LIVE that a daemon
/// serves; changes nothing on a failed check.
pub fn open_store(live: &Path, store: Option<&Path>) -> anyhow::Result<Opened> {
    let live = std::fs::canonicalize(live).with_context(|| format!("LIVE {live:?}: no such directory"))?;
    if !live.is_dir() {
        bail!("LIVE {live:?} is not a directory");
    }
    if mounts_of_type(FSTYPE)?.contains(&live) {
        bail!("{live:?} is already an ovlsnap mount (run `ovlsnap umount {}` first)", live.display());
    }
    let live_fd = rustix::fs::open(&live, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .with_context(|| format!("opening {live:?}"))?;
    let (store_path, hidden_store) = match store {
        None => (None, Some(OsString::from(DEFAULT_NAME))),
        Some(p) => {
            std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
                .create(p)
                .with_context(|| format!("creating the store {p:?}"))?;
            let p = std::fs::canonicalize(p)?;
            if p == live {
                bail!("the store cannot be LIVE itself");
            }
            if p.parent() == Some(live.as_path()) {
                (Some(p.clone()), p.file_name().map(|n| n.to_os_string()))
            } else if p.starts_with(&live) {
                bail!("a store inside LIVE must be directly in its root (like the default {DEFAULT_NAME})");
            } else {
                (Some(p), None)
            }
        }
    };
    let store = Store::open(std::os::fd::AsFd::as_fd(&live_fd), &live, store_path.as_deref())?;
    let store_at = store.path().to_path_buf();
    let hidden: Vec<OsString> = hidden_store.into_iter().collect();
    let snapper = Arc::new(Snapper::new(rustix::io::dup(&live_fd)?, live.clone(), store, hidden.clone())?);
    Ok(Opened { live, live_fd, store: store_at, hidden, snapper })
}

/// For a mount already being refused: an error naming the daemon that serves `live` and where,
/// if one says it does (`Ok` otherwise, and the caller gives its own reason). Only used once a
/// refusal is certain, so a daemon of another user claiming a LIVE not its own can at most change
/// the words of a refusal, never cause one.
fn served_refusal(live: &Path) -> anyhow::Result<()> {
    match serving(live) {
        Some(st) => bail!(
            "{:?} is already served by the ovlsnap daemon {} at {:?}: use that mount, or `ovlsnap umount {}` first",
            live,
            st.pid,
            st.mount,
            st.mount.display()
        ),
        None => Ok(()),
    }
}

/// The status of the daemon that serves `live`, if one does: asked of each ovlsnap mount
/// (those whose daemon does not answer, or answers as no one we trust, are passed over).
fn serving(live: &Path) -> Option<Status> {
    let live = std::fs::canonicalize(live).ok()?;
    mounts_of_type(FSTYPE).ok()?.into_iter().find_map(|mnt| {
        let v = control::call(&mnt, &control::Request::Status).ok()?;
        serde_json::from_value::<Status>(v).ok().filter(|st| st.live == live)
    })
}

/// A dead ovlsnap mount at `dir` (its daemon was killed: the kernel answers ENOTCONN) is
/// detached, as root, so that a new mount takes its place (issue 21: `ovlsnap mount` said "not a
/// directory"); without root, the error says what to run.
fn clear_dead_mount(dir: &Path) -> anyhow::Result<()> {
    let Ok(abs) = std::path::absolute(dir) else { return Ok(()) };
    // statfs always asks the daemon (a stat may be answered from cached attributes); a request
    // caught in flight as the daemon died gets ECONNABORTED, later ones ENOTCONN; one queued for
    // io_uring rings that the dead daemon's exit tears down, ECANCELED.
    use rustix::io::Errno;
    let dead = matches!(rustix::fs::statfs(&abs), Err(Errno::NOTCONN | Errno::CONNABORTED | Errno::CANCELED));
    if !dead || !mounts_of_type(FSTYPE)?.contains(&abs) {
        return Ok(());
    }
    if !rustix::process::geteuid().is_root() {
        bail!(
            "{abs:?} is a dead ovlsnap mount (its daemon is gone): run `fusermount3 -u -z {}`, then `ovlsnap mount` again",
            abs.display()
        );
    }
    rustix::mount::unmount(&abs, rustix::mount::UnmountFlags::DETACH)
        .with_context(|| format!("detaching the dead ovlsnap mount {abs:?}"))?;
    tracing::warn!(mount = ?abs, "detached a dead ovlsnap mount (its daemon was gone)");
    Ok(())
}

/// Checks the configuration and opens LIVE and the store; changes nothing on a failed check
/// (but a dead mount of ours on the mount point, which it detaches: `clear_dead_mount`).
pub fn prepare(cfg: &Config) -> anyhow::Result<Prepared> {
    clear_dead_mount(&cfg.mount)?;
    let euid = rustix::process::geteuid();
    if !euid.is_root() {
        // Without root we serve our own directory to ourselves alone: nothing we could not reach.
        use std::os::unix::fs::MetadataExt;
        for (what, dir) in [("LIVE", &cfg.live), ("the mount point", &cfg.mount)] {
            let owner = std::fs::metadata(dir).with_context(|| format!("{what} {dir:?}: no such directory"))?.uid();
            if owner != euid.as_raw() {
                bail!(
                    "without root you can only mount a directory you own: {what} {dir:?} is uid {owner}'s, you are \
                     uid {}",
                    euid.as_raw()
                );
            }
        }
    }
    let mnt =
        std::fs::canonicalize(&cfg.mount).with_context(|| format!("mount point {:?}: no such directory", cfg.mount))?;
    if !mnt.is_dir() {
        bail!("mount point {mnt:?} is not a directory");
    }
    if mounts_of_type(FSTYPE)?.contains(&mnt) {
        served_refusal(&cfg.live)?;
        bail!("{mnt:?} is already an ovlsnap mount (run `ovlsnap umount {}` first)", mnt.display());
    }
    // Before anything is created in LIVE: a LIVE with its own `.snapshots` would lose sight of it
    // (a LIVE served on itself shows the mount's).
    if std::fs::symlink_metadata(cfg.live.join(SNAPDIR_NAME)).is_ok() {
        served_refusal(&cfg.live)?;
        bail!(
            "{:?} contains {SNAPDIR_NAME}, a name the mount reserves for the snapshot views (it would be \
             hidden): rename it first",
            cfg.live
        );
    }
    let opened = open_store(&cfg.live, cfg.store.as_deref());
    if opened.is_err() {
        // Most often its store is locked by a daemon serving it elsewhere: say which.
        served_refusal(&cfg.live)?;
    }
    let Opened { live, live_fd, store: store_at, hidden, snapper } = opened.map_err(ovl_fs::limits::explain)?;
    // Before anything is served: what LIVE changed while no daemon guarded it.
    snapper.verify_live().context("checking LIVE against its seal").map_err(ovl_fs::limits::explain)?;
    // The layers' budget of open roots is open now (`Snapper::layer_roots_open`); serving
    // needs more (see `Snapper::serve_headroom`), and a mount that ran out of descriptors would
    // die after it was reported live.
    let (roots, budget) = snapper.layer_roots_open();
    ovl_fs::limits::ensure_free(Snapper::serve_headroom() + ovl_fs::mount::session_threads(), false).with_context(
        || format!("LIVE cannot be served: {roots} snapshot layers are open (at most {budget} at once)"),
    )?;
    let (workdir, work) = snapper.store_work()?;
    drop(workdir);
    let stack = LayerStack::from_open_dirs(
        Vec::<(PathBuf, ovl_core::LayerRoot)>::new(),
        Some((live.clone(), ovl_core::LayerRoot::held(Arc::new(live_fd))?, work)),
        snapper.overlay_options(),
    )?;
    // LIVE's directories hold their dirs open (ovl-fs's `dirfds`), but fewer than a plain
    // overlay's: every snapshot layer needs a descriptor, and a take needs more free.
    let dir_handles = (ovl_fs::limits::raise() / 16).min(256) as usize;
    let mut overlay = OverlayFs::new(stack)?
        .with_dir_handle_budget(dir_handles)
        .with_hook(snapper.clone())
        .hide_root_name(SNAPDIR_NAME.as_ref());
    for h in &hidden {
        overlay = overlay.hide_root_name(h);
    }
    let fs = SnapFs::new(overlay, snapper.views.clone());
    snapper.set_notifier(fs.notifier_slot());
    let status = Status { pid: std::process::id(), live, mount: mnt, store: store_at };
    Ok(Prepared { fs, snapper, status })
}

/// Mounts `prepared`, calls `ready` once the mount is live, and serves until it is unmounted.
pub fn run(prepared: Prepared, ready: impl FnOnce()) -> anyhow::Result<()> {
    let Prepared { fs, snapper, status } = prepared;
    let (listener, sock) = bind_control(&status.mount)?;
    let source = status.live.display().to_string();
    let notifier = fs.notifier_slot();
    let uring = ovl_fs::mount::uring_mode(None)?;
    let session = if rustix::process::geteuid().is_root() {
        ovl_fs::mount::mount_session(fs, &status.mount, &source, FSTYPE, false, uring)?
    } else {
        let subtype = FSTYPE.trim_start_matches("fuse.");
        ovl_fs::mount::mount_session_user(fs, &status.mount, &source, subtype, uring)?
    };
    let _ = notifier.set(session.notifier());
    {
        let (snapper, status) = (snapper.clone(), status.clone());
        std::thread::spawn(move || control::serve(listener, snapper, status));
    }
    {
        // The store's summaries are read, and layers whose summary is missing (a store from
        // before summaries, a stop before one was written) once, beside the mount's work.
        let worker = snapper.clone();
        let spawned = std::thread::Builder::new().name("summarize".into()).spawn(move || {
            worker.load_summaries();
            if let Err(e) = worker.summarize() {
                tracing::warn!("summarizing layers: {e:#}");
            }
            if let Err(e) = worker.account() {
                tracing::warn!("working out what snapshots reference: {e:#}");
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("summarizing layers: no thread for it: {e}");
            snapper.load_summaries();
        }
    }
    tracing::info!(live = ?status.live, mount = ?status.mount, store = ?status.store, "ovlsnap mount is live");
    ready();
    let out = session.run().context("serving the mount");
    // Unmounted: the list's log goes into its checkpoint, so that the store at rest is one file.
    if let Err(e) = snapper.fold_log() {
        tracing::warn!("folding the snapshot list's log into the list: {e:#} (the next mount does)");
    }
    sock.remove();
    out
}

/// The control socket of a daemon and its pid file, removed when the daemon ends unless a newer
/// daemon of the same mount point replaced them.
struct ControlFiles {
    sock: PathBuf,
    pid: PathBuf,
    ino: u64,
}

impl ControlFiles {
    fn remove(self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.sock).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.pid);
            let _ = std::fs::remove_file(&self.sock);
        }
    }
}

/// Makes (or repairs) our socket directory ([`control::run_dir`]): root's `/run/ovlsnap`, mode
/// 0755, or a user's own, mode 0700, so no one else can plant a socket or pid file in it. An
/// older ovlsnap made `/run/ovlsnap` world-writable; a user's dir that someone else made (it may
/// be in `/tmp`) is refused.
fn secure_run_dir(uid: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let dir = control::run_dir(uid);
    let mode = if uid == 0 { 0o755 } else { 0o700 };
    match std::fs::DirBuilder::new().mode(mode).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {dir:?}")),
    }
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir() || meta.uid() != uid {
        bail!("{dir:?} is not a directory of uid {uid}'s (it is uid {}): remove it and mount again", meta.uid());
    }
    if meta.mode() & 0o7777 != mode {
        tracing::warn!(mode = format!("{:o}", meta.mode() & 0o7777), "making {dir:?} mode {mode:o}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Binds the control socket of the mount at `mnt` (anyone may connect: each request is
/// authorized by its caller's credentials) and records our pid beside it.
fn bind_control(mnt: &Path) -> anyhow::Result<(UnixListener, ControlFiles)> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let uid = rustix::process::geteuid().as_raw();
    secure_run_dir(uid)?;
    let sock = control::socket_path(mnt, uid);
    // Whatever is there is a dead daemon's (a live one would have its mount here, refused above).
    match std::fs::remove_file(&sock) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the stale control socket {sock:?}")),
    }
    let listener = UnixListener::bind(&sock).with_context(|| format!("binding the control socket {sock:?}"))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666))?;
    let ino = std::fs::symlink_metadata(&sock)?.ino();
    let pid = control::pid_path(mnt, uid);
    let tmp = pid.with_extension(format!("pid.{}", std::process::id()));
    std::fs::write(&tmp, format!("{}\n", std::process::id())).with_context(|| format!("writing {tmp:?}"))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&tmp, &pid).with_context(|| format!("writing {pid:?}"))?;
    Ok((listener, ControlFiles { sock, pid, ino }))
}

/// True when `path` is (inside) an ovlsnap mount: returns that mount point.
pub fn mount_containing(path: &Path) -> anyhow::Result<Option<PathBuf>> {
    let mut best: Option<PathBuf> = None;
    for m in mounts_of_type(FSTYPE)? {
        if path.starts_with(&m) && best.as_ref().is_none_or(|b| m.as_os_str().len() > b.as_os_str().len()) {
            best = Some(m);
        }
    }
    Ok(best)
}

/// Sets the allocator up for a long-lived daemon (one arena: see [`crate::sys::bound_malloc_arenas`]).
/// Call it first in the daemon's process, before any thread starts.
pub fn tune_allocator() {
    crate::sys::bound_malloc_arenas(1);
}

/// [`crate::sys::trim_heap`], at most once a second: a trim holds the allocator's lock while it
/// walks the heap, and control requests may come in bursts (a timer's takes, a shell's
/// completions). At 10,000 snapshots a daemon that trims after takes ended a walk of the oldest
/// view 6 MiB smaller (66 -> 60 MiB).
pub(crate) fn trim_heap_now_and_then() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let last = LAST_MS.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 1000
        && LAST_MS.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    {
        let started = std::time::Instant::now();
        crate::sys::trim_heap();
        tracing::debug!("heap trimmed in {:?}", started.elapsed());
    }
}
