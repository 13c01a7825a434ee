//! Mounting an overlay: checks, the FUSE session configuration, and running it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use fuser::{Config, InitFlags, Session, SessionACL};
use ovl_core::{LayerStack, MountOptions, Uring};
use ovl_proto::Handler;
use parking_lot::Mutex;

use crate::OverlayFs;
use crate::glue::{Glue, Served};

/// A live overlay mount whose requests are not served yet; [`Mount::run`] serves them.
pub struct Mount {
    session: Session<Glue<OverlayFs>>,
    mountpoint: PathBuf,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount").field("mountpoint", &self.mountpoint).finish()
    }
}

/// True if `path` is a mount point (listed in /proc/self/mountinfo).
pub fn is_mountpoint(path: &Path) -> anyhow::Result<bool> {
    let info = read_mountinfo()?;
    Ok(info.lines().any(|l| l.split(' ').nth(4).map(unescape_mountinfo).as_deref() == Some(path)))
}

/// /proc/self/mountinfo as text. The kernel escapes only space, tab, newline and backslash (as
/// `\NNN` octal) and leaves other bytes of paths as they are; here each byte that is not UTF-8 is
/// escaped the same way, so any mount on the system (not only ours) can be read, and
/// [`unescape_mountinfo`] still gives back every byte.
pub fn read_mountinfo() -> anyhow::Result<String> {
    let raw = std::fs::read("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(mountinfo_text(&raw))
}

/// Mountinfo bytes as text, each byte that is not UTF-8 escaped as `\NNN` (see [`read_mountinfo`]).
fn mountinfo_text(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len());
    for chunk in raw.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\{b:03o}"));
        }
    }
    out
}

/// A mount point as /proc/self/mountinfo prints it, with its octal escapes (`\040` for a space,
/// and so on) undone, byte for byte.
pub fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let code = std::str::from_utf8(&b[i + 1..i + 4]).ok().and_then(|d| u8::from_str_radix(d, 8).ok());
            if let Some(v) = code {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// Checks the mountpoint: an existing directory that is not already a mount point.
pub fn check_mountpoint(mnt: &Path) -> anyhow::Result<PathBuf> {
    let canon = std::fs::canonicalize(mnt).with_context(|| format!("mountpoint {mnt:?}: no such directory"))?;
    if !canon.is_dir() {
        bail!("mountpoint {mnt:?} is not a directory");
    }
    if is_mountpoint(&canon)? {
        bail!("mountpoint {mnt:?} is already in use (something is mounted there)");
    }
    Ok(canon)
}

/// Opens /dev/fuse and mounts it at `mnt` as type `fuse.ovlfs`, the way mount.fuse3 would:
/// other users allowed, the kernel checking permissions, device files and set-ID bits honoured
/// (as on a kernel overlay mount).
fn mount_fuse(mnt: &Path, source: &str, fstype: &str, read_only: bool) -> anyhow::Result<OwnedFd> {
    let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").context("opening /dev/fuse")?;
    let root = rustix::fs::stat(mnt)?;
    let data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},default_permissions,allow_other",
        dev.as_raw_fd(),
        root.st_mode & libc::S_IFMT,
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    );
    let flags = if read_only { rustix::mount::MountFlags::RDONLY } else { rustix::mount::MountFlags::empty() };
    let data = std::ffi::CString::new(data)?;
    rustix::mount::mount(source, mnt, fstype, flags, data.as_c_str())
        .with_context(|| format!("mount({mnt:?}) failed"))?;
    Ok(OwnedFd::from(dev))
}

/// The threads serving a session, each reading its own clone of the `/dev/fuse` descriptor.
pub fn session_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(4, 16)
}

/// Before the mount is made: the session's threads clone `/dev/fuse` only when it starts
/// serving, after the mount was reported live; without descriptors for them (and some to
/// serve with) it would die right there, leaving a mount that answers ENOTCONN.
fn ensure_session_fds() -> anyhow::Result<()> {
    crate::limits::ensure_free(session_threads() + crate::limits::SERVE_RESERVE, false)
        .context("the mount could not be served: no mount was made")
}

/// The environment variable choosing the transport where no `uring=` option does
/// (`on`, `off` or `auto`; the snapshot daemon has no mount options).
pub const URING_ENV: &str = "OVLFS_URING";

/// The transport `option` asks for, else `OVLFS_URING`'s, else auto.
pub fn uring_mode(option: Option<Uring>) -> anyhow::Result<Uring> {
    if let Some(u) = option {
        return Ok(u);
    }
    match std::env::var(URING_ENV) {
        Ok(v) => v.parse().map_err(|e: String| anyhow::anyhow!("{URING_ENV}: {e}")),
        Err(_) => Ok(Uring::Auto),
    }
}

/// The payload buffer of each ring entry, and so the mount's `max_write`: what the kernel
/// sends in one request at most (`max_pages` is 256 pages on this kernel anyway).
const RING_PAYLOAD: u32 = 1 << 20;
/// Ring entries per queue (possible CPU), all on the queue's one ring: its thread serves quick
/// requests in line and hands those that may take long (a big copy-up, an fsync) to helpers,
/// one fewer than entries (`ovl_uring::Rings::start`), so such a request holds up one entry,
/// not the queue. The kernel wants every *possible* CPU's queue filled, and VMs often declare
/// many more than they run: fewer entries per queue there (a helper thread and 1 MiB each).
fn ring_entries_per_queue(queues: usize) -> usize {
    match queues {
        0..=8 => 4,
        9..=32 => 2,
        _ => 1,
    }
}

/// What the INIT negotiation decided about the rings.
enum RingOutcome {
    /// Rings offered to the kernel, to start once the INIT reply is out.
    Ready(ovl_uring::Rings, Arc<dyn Handler>),
    /// Not used, and why (an error for `uring=on`).
    Unused(String),
}

/// The INIT step that offers the kernel rings (see [`ovl_uring`]): only where the kernel offers
/// them, `uring` allows them, passthrough is off (its backing ids belong to `/dev/fuse`), and
/// the rings could be built; the outcome goes to `slot`.
fn offer_rings(
    uring: Uring,
    fuse: OwnedFd,
    access: ovl_uring::Access,
    slot: Arc<Mutex<Option<RingOutcome>>>,
) -> crate::glue::AfterInit {
    Box::new(move |config, handler| {
        let outcome = (|| {
            if uring == Uring::Off {
                return RingOutcome::Unused("uring=off".into());
            }
            if !config.capabilities().contains(InitFlags::FUSE_OVER_IO_URING) {
                return RingOutcome::Unused(
                    "the kernel does not offer FUSE over io_uring (it needs CONFIG_FUSE_IO_URING and \
                     /sys/module/fuse/parameters/enable_uring set to Y)"
                        .into(),
                );
            }
            if std::env::var_os(crate::passthrough::ENV_SWITCH).is_some_and(|v| v == "1") {
                return RingOutcome::Unused("FUSE passthrough is on, which the rings do not carry".into());
            }
            // The rings hold two descriptors per queue (the ring, an eventfd) for the mount's
            // life: where descriptors are scarce (the open-file limit below 16 times that),
            // they are left to the files.
            let queues = ovl_uring::possible_cpus().unwrap_or(1);
            let per_queue = ring_entries_per_queue(queues);
            let ring_fds = queues * 2 + 1;
            let limit = crate::limits::raise();
            if (ring_fds as u64).saturating_mul(16) > limit {
                return RingOutcome::Unused(format!(
                    "the rings' {ring_fds} descriptors are more than a sixteenth of the open-file limit ({limit})"
                ));
            }
            if let Err(e) = config.set_max_write(RING_PAYLOAD) {
                return RingOutcome::Unused(format!("max_write {RING_PAYLOAD} refused ({e})"));
            }
            let payload = RING_PAYLOAD as usize + 4096;
            match ovl_uring::Rings::prepare(fuse.as_fd(), payload, per_queue, access) {
                Ok(rings) => match config.add_capabilities(InitFlags::FUSE_OVER_IO_URING) {
                    Ok(()) => RingOutcome::Ready(rings, handler),
                    Err(_) => RingOutcome::Unused("the kernel took back its offer".into()),
                },
                Err(e) => RingOutcome::Unused(format!("the rings could not be built: {e}")),
            }
        })();
        *slot.lock() = Some(outcome);
    })
}

/// Completes the FUSE handshake on `fuse` (mounted at `mnt`) for `fs`, with the rings where
/// `uring` and the kernel allow, and starts them.
fn handshake<S: Served>(
    fs: S,
    fuse: OwnedFd,
    mnt: &Path,
    acl: SessionACL,
    uring: Uring,
) -> anyhow::Result<Session<Glue<S>>> {
    let mut config = Config::default();
    config.acl = acl;
    config.n_threads = Some(session_threads());
    config.clone_fd = true;
    let access = match acl {
        SessionACL::All => ovl_uring::Access::All,
        _ => ovl_uring::Access::Owner(rustix::process::getuid().as_raw()),
    };
    let slot = Arc::new(Mutex::new(None));
    let ring_fd = fuse.try_clone().context("duplicating the FUSE descriptor")?;
    let glue = Glue::new(Arc::new(fs), Some(offer_rings(uring, ring_fd, access, slot.clone())));
    let session = Session::from_fd(glue, fuse, acl, config).with_context(|| format!("FUSE handshake on {mnt:?}"))?;
    match slot.lock().take() {
        Some(RingOutcome::Ready(rings, handler)) => {
            let n = rings.descriptors();
            rings.start(handler).context("starting the io_uring threads")?;
            tracing::debug!(descriptors = n, "serving through io_uring");
        }
        Some(RingOutcome::Unused(why)) if uring == Uring::On => anyhow::bail!("uring=on: {why}"),
        Some(RingOutcome::Unused(why)) => tracing::debug!("serving through /dev/fuse: {why}"),
        None => anyhow::bail!("the FUSE handshake on {mnt:?} ended before INIT"),
    }
    Ok(session)
}

/// Mounts `/dev/fuse` at `mnt` (a canonical path) as type `fstype` and completes the FUSE
/// handshake for `fs`; the session then serves requests with [`Session::run`]. Used for the
/// snapshot filesystem too, which stacks its own handler over this crate's overlay.
pub fn mount_session<S: Served>(
    fs: S,
    mnt: &Path,
    source: &str,
    fstype: &str,
    read_only: bool,
    uring: Uring,
) -> anyhow::Result<Session<Glue<S>>> {
    ensure_session_fds()?;
    let fuse = mount_fuse(mnt, source, fstype, read_only)?;
    handshake(fs, fuse, mnt, SessionACL::All, uring).inspect_err(|_| {
        let _ = rustix::mount::unmount(mnt, rustix::mount::UnmountFlags::DETACH);
    })
}

/// Mounts `fs` at `mnt` without root, the way libfuse does: the setuid `fusermount3` mounts
/// `/dev/fuse` as type `fuse.SUBTYPE` and hands us the descriptor over a socket. The mount is for
/// the mounting user alone (no `allow_other`: other users would reach files with our rights),
/// the kernel checking permissions (`default_permissions`).
pub fn mount_session_user<S: Served>(
    fs: S,
    mnt: &Path,
    source: &str,
    subtype: &str,
    uring: Uring,
) -> anyhow::Result<Session<Glue<S>>> {
    ensure_session_fds()?;
    let fuse = fusermount(mnt, source, subtype)?;
    handshake(fs, fuse, mnt, SessionACL::Owner, uring).inspect_err(|_| {
        let _ = unmount(mnt, true);
    })
}

/// Runs `fusermount3 -o OPTS -- MNT` with one end of a socket pair in `_FUSE_COMMFD` and returns
/// the `/dev/fuse` descriptor it sends back (`SCM_RIGHTS`).
fn fusermount(mnt: &Path, source: &str, subtype: &str) -> anyhow::Result<OwnedFd> {
    use rustix::net::{AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SocketFlags, SocketType};
    if source.contains([',', '\\']) || subtype.contains([',', '\\']) {
        bail!("the mount's source {source:?} cannot be passed to fusermount3 (a comma or backslash)");
    }
    // Ours is closed in the child; the child's end must survive exec, so it is made without
    // CLOEXEC and closed here right after the spawn.
    let (ours, theirs) = rustix::net::socketpair(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    let theirs = {
        let inherited = rustix::io::fcntl_dupfd_cloexec(&theirs, 3)?;
        rustix::io::fcntl_setfd(&inherited, rustix::io::FdFlags::empty())?;
        // Only the child may hold the other end, or our receive never sees it close.
        drop(theirs);
        inherited
    };
    let opts = format!("fsname={source},subtype={subtype},default_permissions");
    let child = std::process::Command::new("fusermount3")
        .arg("-o")
        .arg(&opts)
        .arg("--")
        .arg(mnt)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn();
    drop(theirs);
    let child = child.context("running fusermount3 (install fuse3)")?;
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8; 1];
    let got =
        rustix::net::recvmsg(&ours, &mut [std::io::IoSliceMut::new(&mut byte)], &mut control, RecvFlags::CMSG_CLOEXEC);
    let out = child.wait_with_output().context("waiting for fusermount3")?;
    let mut fd = None;
    if got.is_ok() {
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(mut fds) = msg {
                fd = fds.next();
            }
        }
    }
    match fd {
        Some(fd) if out.status.success() => Ok(fd),
        _ => bail!(
            "fusermount3 could not mount {}: {}",
            mnt.display(),
            String::from_utf8_lossy(&out.stderr).trim().trim_start_matches("fusermount3: ")
        ),
    }
}

/// Unmounts the FUSE mount at `mnt` (lazily: detached now, gone when unused): with umount(2) as
/// root, else through `fusermount3 -u`, which lets a user unmount what they mounted.
pub fn unmount(mnt: &Path, lazy: bool) -> anyhow::Result<()> {
    let flags = if lazy { rustix::mount::UnmountFlags::DETACH } else { rustix::mount::UnmountFlags::empty() };
    match rustix::mount::unmount(mnt, flags) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::PERM) if !rustix::process::geteuid().is_root() => {
            let mut cmd = std::process::Command::new("fusermount3");
            cmd.arg("-u").arg("-q");
            if lazy {
                cmd.arg("-z");
            }
            let out = cmd.arg("--").arg(mnt).output().context("running fusermount3 -u")?;
            if out.status.success() {
                return Ok(());
            }
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("busy") {
                return Err(anyhow::Error::new(std::io::Error::from_raw_os_error(libc::EBUSY)));
            }
            bail!("unmounting {}: {}", mnt.display(), err.trim().trim_start_matches("fusermount3: "))
        }
        Err(e) => Err(anyhow::Error::new(std::io::Error::from(e))),
    }
}

/// How long the kernel keeps an `ovlfs` mount's entries, attributes and missing names unless
/// `timeout=` says otherwise: a day, as good as for ever (a kernel overlay's never expire; every
/// change goes through the mount; fuse-overlayfs keeps them a billion seconds). With 1 s, the
/// default before, an unlink of a file listed a few seconds earlier cost a `LOOKUP` more.
pub const DEFAULT_TTL: std::time::Duration = std::time::Duration::from_secs(86_400);

impl Mount {
    /// Validates everything, then mounts. Returns once the kernel has completed the FUSE
    /// handshake, so the mount is live.
    pub fn new(opts: &MountOptions, mnt: &Path, source: &str) -> anyhow::Result<Self> {
        let mountpoint = check_mountpoint(mnt)?;
        let mut stack = LayerStack::open(opts).map_err(|e| crate::limits::explain(e.into()))?;
        if std::env::var_os("OVLFS_DISABLE_OVL_WHITEOUT").is_some() {
            tracing::info!("OVLFS_DISABLE_OVL_WHITEOUT: writing whiteouts as .wh.NAME files");
            stack.use_whiteout_files();
        }
        let read_only = opts.is_read_only();
        let fs = OverlayFs::new(stack)
            .context("reading the layer roots")?
            .with_ttl(opts.timeout.unwrap_or(DEFAULT_TTL))
            .cache_missing_names();
        let notifier = fs.notifier_slot();
        let uring = uring_mode(opts.uring)?;
        let session = mount_session(fs, &mountpoint, source, "fuse.ovlfs", read_only, uring)?;
        let _ = notifier.set(session.notifier());
        Ok(Self { session, mountpoint })
    }

    /// Where the overlay is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Serves requests until the filesystem is unmounted.
    pub fn run(self) -> anyhow::Result<()> {
        self.session.run().context("serving the mount")
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    // A mount point that is not UTF-8 anywhere on the system made every reader of mountinfo as
    // text fail (issue 16.5): each such byte is escaped the kernel's way, and comes back whole.
    #[test]
    fn mountinfo_with_bytes_that_are_not_utf8_reads_back_every_byte() {
        let raw = b"45 27 0:40 / /tmp/odd\xff\\040dir rw - fuse.x src rw\n";
        let text = mountinfo_text(raw);
        assert!(text.contains(r"/tmp/odd\377\040dir"), "{text}");
        let point = text.split(' ').nth(4).unwrap();
        assert_eq!(unescape_mountinfo(point).as_os_str().as_bytes(), b"/tmp/odd\xff dir");
    }
}
