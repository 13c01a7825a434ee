//! FUSE passthrough: reads, writes and mmap of a file whose data is in the upper layer go from
//! the kernel straight to the upper file, without a round trip to the daemon.
//!
//! Which opens may pass through (see ARCHITECTURE.md, "Consistent descriptors across copy-up"):
//! only regular files whose data is already in the upper layer (`NodeState::has_upper_data`),
//! only on mounts without a change hook (the snapshot filesystem must see every write), and only
//! when the kernel offered `FUSE_PASSTHROUGH` at init. Lower files stay served by the daemon,
//! which can switch an open descriptor to the upper copy at copy-up; the kernel cannot switch
//! the backing file of a passthrough open.
//!
//! How the kernel's inode io modes (fs/fuse/iomode.c) are kept, so that no open ever fails:
//! - a FUSE inode is either in *cached* mode (any open without `FOPEN_PASSTHROUGH`) or in
//!   *passthrough* mode (opens with `FOPEN_PASSTHROUGH`), never both: a passthrough open while
//!   cached opens exist fails (`ETXTBSY`), and so does a cached open while passthrough opens
//!   exist (`EINVAL`); the opener sees `EIO`;
//! - all passthrough opens of one inode must name the same backing file (else `EBUSY`);
//! - `FOPEN_KEEP_CACHE` is refused with `FOPEN_PASSTHROUGH`.
//!
//! So this module counts, per node, the opens served each way and holds one backing file id while
//! the node has passthrough opens. A node with cached opens gets cached opens (even if its data
//! is upper now: a descriptor opened before the copy-up is still open); a node with passthrough
//! opens gets passthrough opens with the same backing id. The daemon counts an open before it
//! replies and forgets it when `RELEASE` arrives, after the kernel dropped it, so its counts are
//! never below the kernel's and its choice never conflicts with the kernel's mode.
//!
//! A node that had an open served through the page cache is never passed through until the
//! kernel forgets it: its cache may be warm, and a passthrough open would make the kernel drop
//! it while other requests on the inode wait.
//!
//! The kernel's page cache of the inode needs no extra care: a passthrough open (without
//! `FOPEN_KEEP_CACHE`) empties it, and nothing can fill it while the inode is in passthrough
//! mode, so the first cached open after the last passthrough close starts from an empty cache.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use fuser::{InitFlags, KernelConfig};
use ovl_proto::Backing;
use parking_lot::Mutex;
use rustix::fs::FileType;

use crate::fs::OverlayFs;
use crate::inode::Node;

/// Set to `1` to turn passthrough on. It speeds up files already in the upper layer (measured
/// on a 512 MiB upper file: hot reads 5.0-5.4 -> 15.5-17.8 GB/s, 4 KiB `pwrite`s 19-37k ->
/// 193k per second, ext4 itself 17.3 GB/s and 283k) and none of the rows of
/// `cargo xtask bench-compare` (a 4 KiB file's saved `WRITE` round trip costs about what the
/// backing-file registration costs, and the hot read is of a lower file). It stays off by
/// default because the kernel writes to a backing file with the daemon's credentials: set-ID
/// files are never passed through for that reason, but a file made set-ID (by root's `chmod`)
/// while another user holds it open for writing through passthrough keeps its bits at that
/// user's next write, where the kernel overlay clears them. (The `stat` stalls of up to 30 ms
/// once seen with it came from switching a warm node to passthrough: `cached_once`.)
pub const ENV_SWITCH: &str = "OVLFS_PASSTHROUGH";

/// How one open is served.
#[derive(Debug)]
pub(crate) enum IoMode {
    /// By the kernel from this backing file.
    Passthrough(Backing),
    /// By the daemon, through the kernel's page cache.
    Cached,
}

/// The opens of one node, by how they are served.
#[derive(Debug, Default)]
struct NodeOpens {
    cached: u32,
    passthrough: u32,
    /// Held while `passthrough > 0`: every passthrough open of the node names this one.
    backing: Option<Backing>,
}

#[derive(Debug, Default)]
struct Opens {
    nodes: HashMap<u64, NodeOpens>,
    /// Each open file handle: its node and whether it passes through.
    handles: HashMap<u64, (u64, bool)>,
}

/// The passthrough state of a mount.
#[derive(Debug, Default)]
pub(crate) struct Passthrough {
    /// Negotiated at init; fixed afterwards.
    enabled: bool,
    /// An `open_backing` failure was logged (it is logged once).
    warned: AtomicBool,
    opens: Mutex<Opens>,
}

impl Passthrough {
    /// Decides how handle `fh`, just opened for `node` on `file`, is served, and records it.
    /// `eligible`: the node may pass through (see the module docs). `open_backing` registers a
    /// backing file with the kernel; when it fails the open is served by the daemon.
    fn open(
        &self,
        node: u64,
        fh: u64,
        eligible: bool,
        file: BorrowedFd<'_>,
        open_backing: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<Backing>,
    ) -> IoMode {
        if !self.enabled {
            return IoMode::Cached;
        }
        let mut opens = self.opens.lock();
        let n = opens.nodes.entry(node).or_default();
        let mode = match &n.backing {
            // The kernel's inode is (or may still be) in passthrough mode: only a passthrough
            // open on the same backing file can succeed.
            Some(id) => IoMode::Passthrough(id.clone()),
            None if eligible && n.cached == 0 => match open_backing(file) {
                Ok(id) => {
                    n.backing = Some(id.clone());
                    IoMode::Passthrough(id)
                }
                Err(e) => {
                    if !self.warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!("FUSE passthrough unavailable, the daemon serves file data: open_backing: {e}");
                    }
                    IoMode::Cached
                }
            },
            None => IoMode::Cached,
        };
        let passes = matches!(mode, IoMode::Passthrough(_));
        if passes {
            n.passthrough += 1;
        } else {
            n.cached += 1;
        }
        opens.handles.insert(fh, (node, passes));
        mode
    }

    /// Forgets handle `fh` (released by the kernel). The backing id of a node is closed with
    /// its last passthrough open.
    fn release(&self, fh: u64) {
        if !self.enabled {
            return;
        }
        let closed = {
            let mut opens = self.opens.lock();
            let Some((node, passes)) = opens.handles.remove(&fh) else { return };
            let Some(n) = opens.nodes.get_mut(&node) else { return };
            let mut closed = None;
            if passes {
                n.passthrough -= 1;
                if n.passthrough == 0 {
                    closed = n.backing.take();
                }
            } else {
                n.cached -= 1;
            }
            if n.cached == 0 && n.passthrough == 0 {
                opens.nodes.remove(&node);
            }
            closed
        };
        // The ioctl that closes the backing id runs outside the lock.
        drop(closed);
    }
}

impl OverlayFs {
    /// Asks the kernel for passthrough at init, when it offers it and this mount may use it.
    pub(crate) fn negotiate_passthrough(&mut self, config: &mut KernelConfig) {
        if self.hook.is_some() || std::env::var_os(ENV_SWITCH).is_none_or(|v| v != "1") {
            return;
        }
        let Some(upper) = self.stack.writable_upper() else { return };
        if !config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH) {
            return;
        }
        // Backing files on a stacked filesystem (an overlay, or FUSE with passthrough) need a
        // depth of 2, which in turn keeps this mount from being a layer of a kernel overlay;
        // on a plain filesystem 1 is enough and leaves that possible.
        #[allow(clippy::unnecessary_cast)] // `f_type` is not an i64 on every target
        let stacked = upper.layer().root().ok().and_then(|r| rustix::fs::fstatfs(r).ok()).is_some_and(|s| {
            matches!(s.f_type as i64, OVERLAYFS_SUPER_MAGIC | FUSE_SUPER_MAGIC | ECRYPTFS_SUPER_MAGIC)
        });
        let depth = if stacked { 2 } else { 1 };
        if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(depth).is_ok() {
            self.passthrough.enabled = true;
            tracing::debug!(depth, "FUSE passthrough negotiated");
        }
    }

    /// Decides how handle `fh` of `node`, just opened, is served (see the module docs).
    pub(crate) fn passthrough_open(
        &self,
        node: &Node,
        fh: u64,
        open_backing: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<Backing>,
    ) -> IoMode {
        if !self.passthrough.enabled {
            return IoMode::Cached;
        }
        let Ok(file) = self.handles.get(fh, node.id).map(|of| of.file.read().clone()) else {
            return IoMode::Cached;
        };
        // A node once opened through the page cache stays there: switching it to passthrough
        // makes the kernel drop its cached pages while the open waits, and other requests on
        // the inode with it (33 ms stat stalls after a 512 MiB file was read, then copied up).
        // Nor does a set-user/group-ID file: the kernel writes to a backing file with the
        // daemon's credentials, so a write by a user without CAP_FSETID would keep the bits that
        // the kernel overlay (and `OverlayFs::kill_suidgid`, for daemon-served writes) clears.
        let set_id = file.metadata().is_ok_and(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.permissions().mode() & (libc::S_ISUID | libc::S_ISGID) != 0
        });
        let eligible = self.hook.is_none()
            && node.kind == FileType::RegularFile
            && !set_id
            && !node.cached_once.load(Ordering::Relaxed)
            && node.state.read().has_upper_data();
        let mode = self.passthrough.open(node.id, fh, eligible, file.as_fd(), open_backing);
        if matches!(mode, IoMode::Cached) {
            node.cached_once.store(true, Ordering::Relaxed);
        }
        tracing::debug!(node = node.id, fh, passthrough = matches!(mode, IoMode::Passthrough(_)), "open");
        mode
    }

    /// Forgets how handle `fh` was served; called on release.
    pub(crate) fn passthrough_release(&self, fh: u64) {
        self.passthrough.release(fh);
    }
}

/// `f_type` of an overlay (linux/magic.h).
const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
/// `f_type` of a FUSE filesystem.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
/// `f_type` of eCryptfs.
const ECRYPTFS_SUPER_MAGIC: i64 = 0xf15f;

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    fn fake_backing() -> std::io::Result<Backing> {
        Err(std::io::Error::from_raw_os_error(libc::EPERM))
    }

    #[test]
    fn disabled_serves_everything_cached() {
        let p = Passthrough::default();
        let f = File::open("/").unwrap();
        assert!(matches!(p.open(1, 1, true, f.as_fd(), |_| unreachable!()), IoMode::Cached));
        p.release(1);
    }

    #[test]
    fn failed_backing_falls_back_to_cached_and_counts() {
        let p = Passthrough { enabled: true, ..Default::default() };
        let f = File::open("/").unwrap();
        assert!(matches!(p.open(7, 1, true, f.as_fd(), |_| fake_backing()), IoMode::Cached));
        // A cached open keeps later opens cached, without asking for a backing id.
        assert!(matches!(p.open(7, 2, true, f.as_fd(), |_| unreachable!()), IoMode::Cached));
        p.release(1);
        p.release(2);
        assert!(p.opens.lock().nodes.is_empty());
        assert!(p.opens.lock().handles.is_empty());
    }
}
