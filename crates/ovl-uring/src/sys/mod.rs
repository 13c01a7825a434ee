//! Every `unsafe` of the ring transport: the entry buffers the kernel writes requests into, the
//! command SQEs (with the `len` field the io-uring crate does not expose), and their submission.
//!
//! Invariant: an entry's buffers are allocated once and never freed (leaked): the kernel keeps
//! their addresses from REGISTER until the connection ends and may write them in the serving
//! thread's context until the ring is torn down, so no later allocation may ever occupy them.
//! They are few (one header and one payload buffer per ring entry) and live as long as the mount.

use std::os::fd::RawFd;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

/// `FUSE_IO_URING_CMD_REGISTER`.
const CMD_REGISTER: u32 = 1;
/// `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`.
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// Size of `struct fuse_uring_req_header`: in/out header (128), op struct (128), entry info (32).
pub const HEADER_LEN: usize = 288;
/// Offset of `fuse_uring_req_header.op_in`.
pub const OP_IN: usize = 128;
/// Offset of `fuse_uring_req_header.ring_ent_in_out`.
pub const ENT_IN_OUT: usize = 256;
/// Offset of `io_uring_sqe.len` in the kernel's SQE layout.
const SQE_LEN_OFFSET: usize = 24;

// The kernel's SQE128: a 64-byte SQE followed by 64 bytes of command.
const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);

/// A ring of 128-byte SQEs with the FUSE device registered as fixed file 0.
pub type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

/// Builds a ring with room for `entries` submissions and registers `fuse` as fixed file 0.
pub fn ring(entries: u32, fuse: RawFd) -> std::io::Result<Ring> {
    let ring = Ring::builder().build(entries)?;
    ring.submitter().register_files(&[fuse])?;
    Ok(ring)
}

/// The header and payload buffers of one ring entry (see the module's invariant).
pub struct EntryBufs {
    header: *mut u8,
    payload: *mut u8,
    payload_len: usize,
    /// The two `iovec`s REGISTER points at.
    iov: *mut [libc::iovec; 2],
}

// SAFETY: the buffers are plain memory owned by this value alone (leaked, never shared with
// another value); moving it to another thread moves that ownership.
unsafe impl Send for EntryBufs {}

impl EntryBufs {
    /// Allocates (and leaks) the buffers of an entry whose payload holds `payload_len` bytes.
    pub fn new(payload_len: usize) -> Self {
        let header = Box::leak(vec![0u8; HEADER_LEN.next_multiple_of(4096)].into_boxed_slice()).as_mut_ptr();
        let payload = Box::leak(vec![0u8; payload_len].into_boxed_slice()).as_mut_ptr();
        let iov = Box::leak(Box::new([
            libc::iovec { iov_base: header.cast(), iov_len: HEADER_LEN },
            libc::iovec { iov_base: payload.cast(), iov_len: payload_len },
        ]));
        EntryBufs { header, payload, payload_len, iov }
    }

    /// The header and payload, to read a delivered request and write its reply. Only between
    /// a completion and the next submission for this entry: the kernel writes the buffers
    /// while the entry waits for a request, never while the serving thread holds it, and
    /// `&mut self` keeps the two borrows from outliving the next `submit` (which takes `&self`
    /// of a ring, not of these buffers, so the caller must not submit while holding them:
    /// the serving loop drops them first).
    pub fn get(&mut self) -> (&mut [u8], &mut [u8]) {
        // Both pointers come from leaked boxed slices of exactly these lengths, never freed;
        // no other Rust reference to them exists (this value owns them and lends them only
        // through `&mut self`); the kernel does not write them until the next submission.
        // SAFETY: valid, unaliased memory of these lengths, as said above.
        unsafe {
            (
                std::slice::from_raw_parts_mut(self.header, HEADER_LEN),
                std::slice::from_raw_parts_mut(self.payload, self.payload_len),
            )
        }
    }
}

/// The 80-byte command area of a FUSE ring command: `struct fuse_uring_cmd_req`.
fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[8..16].copy_from_slice(&commit_id.to_le_bytes());
    c[16..18].copy_from_slice(&qid.to_le_bytes());
    c
}

/// Sets `io_uring_sqe.len` of `e`, which `UringCmd80` leaves zero.
fn with_len(e: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // `Entry128` is `repr(C)` over the kernel's `io_uring_sqe` (64 bytes) followed by 64 bytes
    // of command (size asserted above): no padding, and `len` is the `u32` at byte 24.
    // SAFETY: same size, and every byte pattern of an SQE is a valid array of bytes.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(e) };
    raw[SQE_LEN_OFFSET..SQE_LEN_OFFSET + 4].copy_from_slice(&len.to_le_bytes());
    // SAFETY: as above; the bytes came from an `Entry128` and only `len` changed.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

/// Queues the REGISTER of `bufs` as an entry of queue `qid`; its completion carries `tag`.
pub fn push_register(ring: &mut Ring, bufs: &EntryBufs, qid: u16, tag: u64) -> std::io::Result<()> {
    let e = opcode::UringCmd80::new(types::Fixed(0), CMD_REGISTER)
        .cmd(cmd_req(0, qid))
        .addr(Some(bufs.iov as u64))
        .build()
        .user_data(tag);
    push(ring, &with_len(e, 2))
}

/// Queues the COMMIT_AND_FETCH of the reply to request `commit_id` in queue `qid` (the reply
/// already written into the entry's buffers); the next request's completion carries `tag`.
pub fn push_commit(ring: &mut Ring, commit_id: u64, qid: u16, tag: u64) -> std::io::Result<()> {
    let e = opcode::UringCmd80::new(types::Fixed(0), CMD_COMMIT_AND_FETCH)
        .cmd(cmd_req(commit_id, qid))
        .build()
        .user_data(tag);
    push(ring, &e)
}

/// Queues a one-shot wait for `fd` (an eventfd the caller keeps open while the ring lives) to
/// become readable; its completion carries `tag`.
pub fn push_poll(ring: &mut Ring, fd: RawFd, tag: u64) -> std::io::Result<()> {
    let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build().user_data(tag);
    push(ring, &squeue::Entry128::from(e))
}

fn push(ring: &mut Ring, e: &squeue::Entry128) -> std::io::Result<()> {
    // SAFETY: the only memory an entry names is an `EntryBufs`'s `iovec`s and, through them,
    // its header and payload, all leaked and so valid for the rest of the process (a poll
    // names only a descriptor, which its caller keeps open while the ring lives).
    unsafe { ring.submission().push(e) }.map_err(|_| std::io::Error::other("ring submission queue full"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_register_command_carries_its_iovec_count_and_queue() {
        let bufs = EntryBufs::new(8192);
        let e = opcode::UringCmd80::new(types::Fixed(0), CMD_REGISTER)
            .cmd(cmd_req(7, 3))
            .addr(Some(bufs.iov as u64))
            .build();
        let e = with_len(e, 2);
        // SAFETY: as in `with_len`.
        let raw: [u8; 128] = unsafe { std::mem::transmute(e) };
        assert_eq!(raw[0], io_uring::opcode::UringCmd80::CODE);
        assert_eq!(&raw[SQE_LEN_OFFSET..SQE_LEN_OFFSET + 4], &2u32.to_le_bytes());
        // `cmd_op` (u32 at 8), `addr` (u64 at 16), the command at 48: commit id, then qid.
        assert_eq!(&raw[8..12], &CMD_REGISTER.to_le_bytes());
        assert_eq!(&raw[16..24], &(bufs.iov as u64).to_le_bytes());
        assert_eq!(&raw[48 + 8..48 + 16], &7u64.to_le_bytes());
        assert_eq!(&raw[48 + 16..48 + 18], &3u16.to_le_bytes());
    }
}
