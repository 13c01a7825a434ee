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

/// One queue (possible CPU): its ring, the entries registered on it, and the eventfd its
/// helpers ring when they have finished a request.
struct Queue {
    ring: sys::Ring,
    /// The entries' buffers by tag; `None` while a helper serves that entry's request.
    slots: Vec<Option<sys::EntryBufs>>,
    qid: u16,
    wake: OwnedFd,
}

/// Rings built before the INIT reply, not yet registered with the kernel.
pub struct Rings {
    queues: Vec<Queue>,
    /// The FUSE device, kept open while the rings refer to it.
    _fuse: OwnedFd,
    access: Access,
}

impl std::fmt::Debug for Rings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries: usize = self.queues.iter().map(|q| q.slots.len()).sum();
        f.debug_struct("Rings").field("queues", &self.queues.len()).field("entries", &entries).finish()
    }
}

/// The completion tag of a queue's eventfd wait (entries are tagged with their index).
const WAKE: u64 = u64::MAX;

impl Rings {
    /// Builds a ring for each possible CPU's queue with `per_queue` entries, each with a
    /// payload buffer of `payload` bytes, on a duplicate of the FUSE device `fuse`. Fails (and
    /// nothing is left behind) when io_uring is unavailable (`kernel.io_uring_disabled`,
    /// seccomp) or descriptors run out: the caller then does not offer the rings to the kernel.
    pub fn prepare(fuse: BorrowedFd<'_>, payload: usize, per_queue: usize, access: Access) -> std::io::Result<Rings> {
        let fuse = fuse.try_clone_to_owned()?;
        let queues = possible_cpus()?;
        if queues > usize::from(u16::MAX) {
            return Err(std::io::Error::other(format!("{queues} possible CPUs")));
        }
        let per_queue = per_queue.max(1);
        let mut built = Vec::with_capacity(queues);
        for qid in 0..queues {
            // Room for every entry's command and the eventfd wait.
            let ring = sys::ring((per_queue + 1).next_power_of_two() as u32, fuse.as_raw_fd())?;
            let slots = (0..per_queue).map(|_| Some(sys::EntryBufs::new(payload.max(8192)))).collect();
            let wake = rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
            )?;
            built.push(Queue { ring, slots, qid: qid as u16, wake });
        }
        Ok(Rings { queues: built, _fuse: fuse, access })
    }

    /// How many descriptors the rings hold (a ring and an eventfd per queue, plus the
    /// device's duplicate).
    pub fn descriptors(&self) -> usize {
        self.queues.len() * 2 + 1
    }

    /// Starts serving: per queue, one thread pinned to its CPU that registers the queue's
    /// entries and serves what the kernel delivers to them in line, and helpers (one fewer
    /// than entries, at least one) that serve the requests which may take long
    /// ([`Handler::may_block`]), so that those hold up nothing else of the queue. One thread
    /// serving a queue's quick requests is what makes the rings fast: the kernel gives it the
    /// next request as it re-arms the entry, often without a sleep and a wake-up in between
    /// (threads of their own per entry made 5000 creates 2-3x slower on a quiet machine).
    /// Call after the INIT reply was sent (the kernel refuses REGISTER before it, with
    /// `EAGAIN`, which is retried).
    pub fn start(self, handler: Arc<dyn Handler>) -> std::io::Result<()> {
        let Rings { queues, _fuse, access } = self;
        let fuse = Arc::new(_fuse);
        for q in queues {
            let qid = q.qid;
            let (jobs, inbox) = std::sync::mpsc::channel::<Job>();
            let (finished, done) = std::sync::mpsc::channel::<Job>();
            let inbox = Arc::new(std::sync::Mutex::new(inbox));
            let wake = Arc::new(q.wake.try_clone()?);
            for i in 0..q.slots.len().saturating_sub(1).max(1) {
                let (handler, inbox, finished, wake) = (handler.clone(), inbox.clone(), finished.clone(), wake.clone());
                std::thread::Builder::new().name(format!("ovl-ring-{qid}-h{i}")).spawn(move || {
                    pin(qid);
                    help(&inbox, &finished, &wake, &*handler, access);
                })?;
            }
            drop(finished);
            let (handler, fuse) = (handler.clone(), fuse.clone());
            std::thread::Builder::new().name(format!("ovl-ring-{qid}")).spawn(move || {
                if let Err(err) = serve(q, &*handler, access, &jobs, &done) {
                    tracing::warn!(qid, "io_uring queue stopped: {err}");
                }
                drop(fuse);
            })?;
        }
        Ok(())
    }
}

/// A request handed to a helper: the entry's tag and buffers, and, once served, the id to
/// commit its reply under.
struct Job {
    tag: u64,
    bufs: sys::EntryBufs,
    commit_id: u64,
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

/// Serves the requests delivered to `bufs` in line, as a helper does: the reply is written
/// into the buffers; returns the id to commit it under.
struct Server<'h> {
    handler: &'h dyn Handler,
    access: Access,
    /// A copy of a request's names and values, so that the reply can be written in place.
    scratch: Vec<u8>,
}

impl Server<'_> {
    fn serve(&mut self, bufs: &mut sys::EntryBufs) -> u64 {
        // A write's reply (8 bytes), written beside its data until the data was used.
        let mut small = [0u8; 64];
        let (header, payload) = bufs.get();
        let ent = &header[sys::ENT_IN_OUT..];
        let commit_id = u64::from_le_bytes(ent[8..16].try_into().expect("8 bytes"));
        let payload_sz = (u32::from_le_bytes(ent[16..20].try_into().expect("4 bytes")) as usize).min(payload.len());
        let opcode = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let (unique, errno, len) = if opcode == wire::opcode::WRITE {
            let r = one_request(header, &payload[..payload_sz], &mut small, self.handler, self.access);
            payload[..r.2].copy_from_slice(&small[..r.2]);
            r
        } else {
            self.scratch.clear();
            self.scratch.extend_from_slice(&payload[..payload_sz]);
            one_request(header, &self.scratch, payload, self.handler, self.access)
        };
        put_reply(header, unique, errno, len);
        commit_id
    }
}

/// Whether the request delivered to `bufs` may take long (see [`Handler::may_block`]); one
/// that does not decode does not (it is answered at once).
fn blocks(bufs: &mut sys::EntryBufs, handler: &dyn Handler) -> bool {
    let (header, payload) = bufs.get();
    let ent = &header[sys::ENT_IN_OUT..];
    let payload_sz = (u32::from_le_bytes(ent[16..20].try_into().expect("4 bytes")) as usize).min(payload.len());
    let Ok(h) = wire::header(&header[..wire::IN_HEADER_LEN]) else { return false };
    wire::decode_op(&h, &header[sys::OP_IN..sys::ENT_IN_OUT], &payload[..payload_sz])
        .is_ok_and(|op| handler.may_block(&op))
}

/// A helper: serves the requests its queue hands it, gives each back to be committed, and
/// wakes the queue's thread, until that thread is gone.
fn help(
    inbox: &std::sync::Mutex<std::sync::mpsc::Receiver<Job>>,
    finished: &std::sync::mpsc::Sender<Job>,
    wake: &OwnedFd,
    handler: &dyn Handler,
    access: Access,
) {
    let mut server = Server { handler, access, scratch: Vec::new() };
    loop {
        let next = inbox.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recv();
        let Ok(mut job) = next else { return };
        job.commit_id = server.serve(&mut job.bufs);
        if finished.send(job).is_err() {
            return;
        }
        // (Nonblocking: a counter already at its limit is a wake-up already pending.)
        let _ = rustix::io::write(wake, &1u64.to_ne_bytes());
    }
}

/// Waits until at least one command of `ring` completed; the completions, as (tag, result).
fn completions(ring: &mut sys::Ring, out: &mut Vec<(u64, i32)>) -> std::io::Result<()> {
    out.clear();
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        out.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        if !out.is_empty() {
            return Ok(());
        }
    }
}

/// Registers queue `q`'s entries and serves what the kernel delivers to them until the
/// connection ends: quick requests in line, the others through the helpers (`jobs`, back
/// through `done` with a wake-up of the queue's eventfd).
fn serve(
    mut q: Queue,
    handler: &dyn Handler,
    access: Access,
    jobs: &std::sync::mpsc::Sender<Job>,
    done: &std::sync::mpsc::Receiver<Job>,
) -> std::io::Result<()> {
    pin(q.qid);
    let qid = q.qid;
    for (tag, bufs) in q.slots.iter().enumerate() {
        sys::push_register(&mut q.ring, bufs.as_ref().expect("all entries at start"), qid, tag as u64)?;
    }
    sys::push_poll(&mut q.ring, q.wake.as_raw_fd(), WAKE)?;
    let mut server = Server { handler, access, scratch: Vec::new() };
    let mut open = q.slots.len();
    let mut tries = 0;
    let mut events = Vec::new();
    loop {
        completions(&mut q.ring, &mut events)?;
        for &(tag, res) in &events {
            if tag == WAKE {
                let _ = rustix::io::read(&q.wake, &mut [0u8; 8]);
                while let Ok(job) = done.try_recv() {
                    sys::push_commit(&mut q.ring, job.commit_id, qid, job.tag)?;
                    q.slots[job.tag as usize] = Some(job.bufs);
                }
                sys::push_poll(&mut q.ring, q.wake.as_raw_fd(), WAKE)?;
                continue;
            }
            let slot = usize::try_from(tag)
                .ok()
                .filter(|t| *t < q.slots.len())
                .ok_or_else(|| std::io::Error::other(format!("a completion of no entry: {tag}")))?;
            match res {
                0 => {}
                // REGISTER before the kernel has seen the INIT reply: again, a little later.
                r if r == -libc::EAGAIN && tries < 5000 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    let bufs = q.slots[slot].as_ref().ok_or_else(|| std::io::Error::other("entry away"))?;
                    sys::push_register(&mut q.ring, bufs, qid, tag)?;
                    continue;
                }
                // The connection ended (umount, abort): the normal way out, once for each entry.
                r if r == -libc::ENOTCONN || r == -libc::ECONNABORTED || r == -libc::ENODEV => {
                    open -= 1;
                    if open == 0 {
                        return Ok(());
                    }
                    continue;
                }
                r => return Err(std::io::Error::from_raw_os_error(-r)),
            }
            let mut bufs = q.slots[slot].take().ok_or_else(|| std::io::Error::other("a request for an entry away"))?;
            if blocks(&mut bufs, handler) {
                if let Err(std::sync::mpsc::SendError(job)) = jobs.send(Job { tag, bufs, commit_id: 0 }) {
                    // No helper left (only while the mount ends): served here.
                    let mut job = job;
                    let commit_id = server.serve(&mut job.bufs);
                    sys::push_commit(&mut q.ring, commit_id, qid, tag)?;
                    q.slots[slot] = Some(job.bufs);
                }
                continue;
            }
            let commit_id = server.serve(&mut bufs);
            sys::push_commit(&mut q.ring, commit_id, qid, tag)?;
            q.slots[slot] = Some(bufs);
        }
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
