//! FUSE over io_uring: the kernel hands requests to rings of entries the daemon registered,
//! instead of `read`s of `/dev/fuse`, and takes each reply with the command that re-arms the
//! entry for the next request (one system call per request instead of two, and no wake-up
//! of a reader thread).
//!
//! This crate owns the rings: it builds them before the INIT reply ([`Rings::prepare`]), starts
//! one serving thread per ring entry once the connection is up ([`Rings::start`]), decodes each
//! request with [`ovl_proto::wire`], hands it to the mount's [`Handler`], and commits the
//! answer. Every `unsafe` is in `sys`.
//!
//! It knows nothing of overlays and decides nothing about a request: the handler does. It never
//! reads `/dev/fuse` (fuser does, for INIT, FORGET, INTERRUPT and notifications, which the
//! kernel keeps there) and never falls back on its own: a REGISTER the kernel refuses makes
//! the kernel itself go back to `/dev/fuse`.
//!
//! Facts this rests on (kernel `fs/fuse/dev_uring.c`, Documentation/filesystems/fuse-io-uring.rst):
//! the kernel uses the rings only once every possible CPU's queue has an entry; a request goes
//! to the queue of the CPU its caller runs on and waits there for a free entry; an entry's
//! buffers must hold `max(8 KiB, max_write, max_pages * 4 KiB)` bytes of payload.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use ovl_proto::{Handler, Op, wire};

mod sys;

/// The `fuse_out_header` and entry info a reply leaves in an entry's header buffer.
fn put_reply(header: &mut [u8], unique: u64, errno: i32, body: usize) {
    let len = (wire::OUT_HEADER_LEN + body) as u32;
    header[0..4].copy_from_slice(&len.to_le_bytes());
    header[4..8].copy_from_slice(&(-errno).to_le_bytes());
    header[8..16].copy_from_slice(&unique.to_le_bytes());
    // `ring_ent_in_out.payload_sz`.
    header[sys::ENT_IN_OUT + 16..sys::ENT_IN_OUT + 20].copy_from_slice(&(body as u32).to_le_bytes());
}

/// Who may use the mount: every user, or only its owner (and, as fuser allows, the kernel's
/// own requests that carry no caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Everyone (`allow_other`).
    All,
    /// Only this user.
    Owner(u32),
}

/// The CPUs the kernel may ever schedule on (`/sys/devices/system/cpu/possible`): one queue each.
pub fn possible_cpus() -> std::io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0usize;
    for part in text.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| s.trim().parse::<usize>().map_err(|e| std::io::Error::other(format!("{text:?}: {e}")));
        let (a, b) = (parse(a)?, parse(b)?);
        n = n.max(b + 1);
        if a > b {
            return Err(std::io::Error::other(format!("possible CPUs {text:?}")));
        }
    }
    Ok(n)
}

/// One ring entry with its own ring and serving thread.
struct Entry {
    ring: sys::Ring,
    bufs: sys::EntryBufs,
    qid: u16,
}

/// Rings built before the INIT reply, not yet registered with the kernel.
pub struct Rings {
    entries: Vec<Entry>,
    /// The FUSE device, kept open while the rings refer to it.
    _fuse: OwnedFd,
    access: Access,
}

impl std::fmt::Debug for Rings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rings").field("entries", &self.entries.len()).finish()
    }
}

impl Rings {
    /// Builds `per_queue` single-entry rings for each possible CPU's queue, each with a payload
    /// buffer of `payload` bytes, on a duplicate of the FUSE device `fuse`. Fails (and nothing
    /// is left behind) when io_uring is unavailable (`kernel.io_uring_disabled`, seccomp) or
    /// descriptors run out: the caller then does not offer the rings to the kernel.
    pub fn prepare(fuse: BorrowedFd<'_>, payload: usize, per_queue: usize, access: Access) -> std::io::Result<Rings> {
        let fuse = fuse.try_clone_to_owned()?;
        let queues = possible_cpus()?;
        if queues > usize::from(u16::MAX) {
            return Err(std::io::Error::other(format!("{queues} possible CPUs")));
        }
        let mut entries = Vec::with_capacity(queues * per_queue);
        for qid in 0..queues {
            for _ in 0..per_queue.max(1) {
                let ring = sys::ring(2, fuse.as_raw_fd())?;
                entries.push(Entry { ring, bufs: sys::EntryBufs::new(payload.max(8192)), qid: qid as u16 });
            }
        }
        Ok(Rings { entries, _fuse: fuse, access })
    }

    /// How many descriptors the rings hold (one each, plus the device's duplicate).
    pub fn descriptors(&self) -> usize {
        self.entries.len() + 1
    }

    /// Starts serving: one thread per entry, which registers the entry and then serves the
    /// requests delivered to it with `handler` until the connection ends. Call after the INIT
    /// reply was sent (the kernel refuses REGISTER before it, with `EAGAIN`, which is retried).
    pub fn start(self, handler: Arc<dyn Handler>) -> std::io::Result<()> {
        let Rings { entries, _fuse, access } = self;
        let fuse = Arc::new(_fuse);
        for (i, e) in entries.into_iter().enumerate() {
            let (handler, fuse) = (handler.clone(), fuse.clone());
            std::thread::Builder::new().name(format!("ovl-ring-{}-{i}", e.qid)).spawn(move || {
                let qid = e.qid;
                if let Err(err) = serve(e, &*handler, access) {
                    tracing::warn!(qid, "io_uring entry stopped: {err}");
                }
                drop(fuse);
            })?;
        }
        Ok(())
    }
}

/// Keeps the thread on its queue's CPU where the scheduler allows: the kernel completes an
/// entry's command in the thread that submitted it, and requests of that CPU come to it.
fn pin(qid: u16) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(usize::from(qid));
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        tracing::debug!(qid, "not pinned: {e}");
    }
}

/// Waits for the completion of the one command in flight; its result (0, or a negative errno).
fn complete(ring: &mut sys::Ring) -> std::io::Result<i32> {
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        if let Some(c) = ring.completion().next() {
            return Ok(c.result());
        }
    }
}

/// Registers entry `e` and serves what the kernel delivers to it until the connection ends.
fn serve(mut e: Entry, handler: &dyn Handler, access: Access) -> std::io::Result<()> {
    pin(e.qid);
    // REGISTER, retried while the kernel has not seen the INIT reply yet.
    let mut tries = 0;
    let mut res = loop {
        sys::push_register(&mut e.ring, &e.bufs, e.qid)?;
        let res = complete(&mut e.ring)?;
        if res == -libc::EAGAIN && tries < 5000 {
            tries += 1;
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        }
        break res;
    };
    // A copy of a request's names and values, so that the reply can be written in place.
    let mut scratch: Vec<u8> = Vec::new();
    // A write's reply (8 bytes), written beside its data until the data was used.
    let mut small = [0u8; 64];
    loop {
        match res {
            0 => {}
            // The connection ended (umount, abort): the normal way out.
            r if r == -libc::ENOTCONN || r == -libc::ECONNABORTED || r == -libc::ENODEV => return Ok(()),
            r => return Err(std::io::Error::from_raw_os_error(-r)),
        }
        let commit_id = {
            let (header, payload) = e.bufs.get();
            let ent = &header[sys::ENT_IN_OUT..];
            let commit_id = u64::from_le_bytes(ent[8..16].try_into().expect("8 bytes"));
            let payload_sz = (u32::from_le_bytes(ent[16..20].try_into().expect("4 bytes")) as usize).min(payload.len());
            let opcode = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
            let (unique, errno, len) = if opcode == wire::opcode::WRITE {
                let r = one_request(header, &payload[..payload_sz], &mut small, handler, access);
                payload[..r.2].copy_from_slice(&small[..r.2]);
                r
            } else {
                scratch.clear();
                scratch.extend_from_slice(&payload[..payload_sz]);
                one_request(header, &scratch, payload, handler, access)
            };
            put_reply(header, unique, errno, len);
            commit_id
        };
        sys::push_commit(&mut e.ring, commit_id, e.qid)?;
        res = complete(&mut e.ring)?;
    }
}

/// Decodes and serves one delivered request, its reply body written into `out`; its unique
/// id, errno and reply length.
fn one_request(
    header: &[u8],
    payload: &[u8],
    out: &mut [u8],
    handler: &dyn Handler,
    access: Access,
) -> (u64, i32, usize) {
    // The header buffer always holds a whole in header (`sys::HEADER_LEN` bytes).
    let Ok(h) = wire::header(&header[..wire::IN_HEADER_LEN]) else { return (0, libc::EIO, 0) };
    let unique = h.unique;
    let op = match wire::decode_op(&h, &header[sys::OP_IN..sys::ENT_IN_OUT], payload) {
        Ok(op) => op,
        Err(errno) => {
            tracing::debug!(opcode = h.opcode, errno, "ring request not decoded");
            return (unique, errno, 0);
        }
    };
    if let Access::Owner(owner) = access
        && h.ctx.uid != owner
        && !kernel_may_send_without_caller(&op)
    {
        return (unique, libc::EACCES, 0);
    }
    tracing::debug!(unique, nodeid = h.nodeid, uid = h.ctx.uid, pid = h.ctx.pid, "ring request {}", op.name());
    let limit = wire::reply_limit(&op, out.len());
    let mut answer = wire::BufAnswer::new(h.opcode, out, limit);
    handler.handle(&h.ctx, op, &mut answer);
    (unique, answer.error_code(), answer.len())
}

/// The requests a mount for its owner alone still serves for other callers: those the kernel
/// makes on an open file's behalf (as fuser's session does).
fn kernel_may_send_without_caller(op: &Op<'_>) -> bool {
    matches!(
        op,
        Op::Read { .. }
            | Op::Readdir { .. }
            | Op::Write { .. }
            | Op::Fsync { .. }
            | Op::Fsyncdir { .. }
            | Op::Release { .. }
            | Op::Releasedir { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_header_carries_length_negated_errno_and_payload_size() {
        let mut h = vec![0u8; sys::HEADER_LEN];
        put_reply(&mut h, 42, libc::ENOENT, 0);
        assert_eq!(&h[0..4], &16u32.to_le_bytes());
        assert_eq!(&h[4..8], &(-libc::ENOENT).to_le_bytes());
        assert_eq!(&h[8..16], &42u64.to_le_bytes());
        put_reply(&mut h, 43, 0, 128);
        assert_eq!(&h[0..4], &144u32.to_le_bytes());
        assert_eq!(&h[sys::ENT_IN_OUT + 16..sys::ENT_IN_OUT + 20], &128u32.to_le_bytes());
    }

    #[test]
    fn possible_cpus_counts_every_queue() {
        let n = possible_cpus().unwrap();
        assert!(n >= std::thread::available_parallelism().unwrap().get(), "{n}");
    }
}
