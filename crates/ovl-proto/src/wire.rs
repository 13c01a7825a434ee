//! The kernel's FUSE wire format (`include/uapi/linux/fuse.h`), for transports that carry raw
//! requests: [`decode`] turns the in header, the per-op struct and the payload into an [`Op`],
//! and [`BufAnswer`] writes each answer as the kernel expects its reply body.
//!
//! All integers are little-endian on the machines we run on (the kernel writes host order; the
//! crate refuses to build for a big-endian target rather than decode garbage).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{Answer, Attr, Backing, Ctx, Kind, Op, SetAttrIn, SetTime, Statfs};

#[cfg(target_endian = "big")]
compile_error!("ovl-proto decodes FUSE requests in little-endian order");

/// The request opcodes (`enum fuse_opcode`).
#[allow(missing_docs)]
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
}

/// Size of `struct fuse_in_header`.
pub const IN_HEADER_LEN: usize = 40;
/// Size of `struct fuse_out_header`.
pub const OUT_HEADER_LEN: usize = 16;
/// Size of `struct fuse_attr`.
const ATTR_LEN: usize = 88;
/// Size of `struct fuse_entry_out`.
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;

// `fuse_setattr_in.valid` bits.
const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const FATTR_ATIME: u32 = 1 << 4;
const FATTR_MTIME: u32 = 1 << 5;
const FATTR_FH: u32 = 1 << 6;
const FATTR_ATIME_NOW: u32 = 1 << 7;
const FATTR_MTIME_NOW: u32 = 1 << 8;
const FATTR_KILL_SUIDGID: u32 = 1 << 11;
const FUSE_GETATTR_FH: u32 = 1;
const FUSE_FSYNC_FDATASYNC: u32 = 1;
const FUSE_OPEN_KILL_SUIDGID: u32 = 1;
const FUSE_WRITE_KILL_SUIDGID: u32 = 1 << 2;

/// The in header of a request: what every request carries besides its op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The opcode.
    pub opcode: u32,
    /// The request's id, echoed in its reply.
    pub unique: u64,
    /// The node the request is about.
    pub nodeid: u64,
    /// Who asked.
    pub ctx: Ctx,
}

/// Reads little-endian fields from a byte slice, failing with `EINVAL` past its end.
struct Fields<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn new(b: &'a [u8]) -> Self {
        Fields { b, at: 0 }
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], i32> {
        let s = self.b.get(self.at..self.at + N).ok_or(libc::EINVAL)?;
        self.at += N;
        Ok(s.try_into().expect("slice of N bytes"))
    }

    fn u32(&mut self) -> Result<u32, i32> {
        self.bytes::<4>().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, i32> {
        self.bytes::<8>().map(u64::from_le_bytes)
    }

    fn skip(&mut self, n: usize) -> Result<(), i32> {
        self.at = self.at.checked_add(n).filter(|&a| a <= self.b.len()).ok_or(libc::EINVAL)?;
        Ok(())
    }

    /// A NUL-terminated string (without its NUL).
    fn cstr(&mut self) -> Result<&'a OsStr, i32> {
        let rest = self.b.get(self.at..).ok_or(libc::EINVAL)?;
        let n = rest.iter().position(|&c| c == 0).ok_or(libc::EINVAL)?;
        self.at += n + 1;
        Ok(OsStr::from_bytes(&rest[..n]))
    }

    fn rest(&mut self) -> &'a [u8] {
        let r = self.b.get(self.at..).unwrap_or_default();
        self.at = self.b.len();
        r
    }

    /// `n` bytes.
    fn take(&mut self, n: usize) -> Result<&'a [u8], i32> {
        let s = self.b.get(self.at..self.at.checked_add(n).ok_or(libc::EINVAL)?).ok_or(libc::EINVAL)?;
        self.at += n;
        Ok(s)
    }
}

/// Decodes the in header.
pub fn header(h: &[u8]) -> Result<Header, i32> {
    let mut f = Fields::new(h);
    let _len = f.u32()?;
    let opcode = f.u32()?;
    let unique = f.u64()?;
    let nodeid = f.u64()?;
    let uid = f.u32()?;
    let gid = f.u32()?;
    let pid = f.u32()?;
    Ok(Header { opcode, unique, nodeid, ctx: Ctx { uid, gid, pid } })
}

fn time(secs: u64, nsecs: u32) -> SystemTime {
    let secs = secs as i64;
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs.min(999_999_999))
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs.min(999_999_999).into())
    }
}

/// Decodes a request: `header` the in header, `op_in` the per-op struct (as long as the kernel
/// made it, or longer), `payload` what follows it (names, data). Opcodes that ovl-fs does not
/// serve give `ENOSYS`; a request cut short gives `EINVAL`.
pub fn decode<'a>(header_bytes: &[u8], op_in: &'a [u8], payload: &'a [u8]) -> Result<(Header, Op<'a>), i32> {
    let h = header(header_bytes)?;
    Ok((h, decode_op(&h, op_in, payload)?))
}

/// [`decode`] of a request whose in header `h` is already read.
pub fn decode_op<'a>(h: &Header, op_in: &'a [u8], payload: &'a [u8]) -> Result<Op<'a>, i32> {
    use opcode::*;
    let ino = h.nodeid;
    let mut a = Fields::new(op_in);
    let mut p = Fields::new(payload);
    let op = match h.opcode {
        LOOKUP => Op::Lookup { parent: ino, name: p.cstr()? },
        GETATTR => {
            let flags = a.u32()?;
            a.skip(4)?;
            let fh = a.u64()?;
            Op::Getattr { ino, fh: (flags & FUSE_GETATTR_FH != 0).then_some(fh) }
        }
        SETATTR => Op::Setattr { ino, set: setattr(&mut a)? },
        READLINK => Op::Readlink { ino },
        SYMLINK => {
            let name = p.cstr()?;
            Op::Symlink { parent: ino, name, target: Path::new(p.cstr()?) }
        }
        MKNOD => {
            let (mode, rdev, umask) = (a.u32()?, a.u32()?, a.u32()?);
            Op::Mknod { parent: ino, name: p.cstr()?, mode, umask, rdev }
        }
        MKDIR => {
            let (mode, umask) = (a.u32()?, a.u32()?);
            Op::Mkdir { parent: ino, name: p.cstr()?, mode, umask }
        }
        UNLINK => Op::Unlink { parent: ino, name: p.cstr()? },
        RMDIR => Op::Rmdir { parent: ino, name: p.cstr()? },
        RENAME | RENAME2 => {
            let newparent = a.u64()?;
            let flags = if h.opcode == RENAME2 { a.u32()? } else { 0 };
            let name = p.cstr()?;
            Op::Rename { parent: ino, name, newparent, newname: p.cstr()?, flags }
        }
        LINK => {
            let old = a.u64()?;
            Op::Link { ino: old, newparent: ino, newname: p.cstr()? }
        }
        OPEN => {
            let (flags, open_flags) = (a.u32()?, a.u32()?);
            Op::Open { ino, flags: flags as i32, kill_suidgid: Some(open_flags & FUSE_OPEN_KILL_SUIDGID != 0) }
        }
        READ | READDIR | READDIRPLUS => {
            let (fh, offset, size) = (a.u64()?, a.u64()?, a.u32()?);
            match h.opcode {
                READ => Op::Read { ino, fh, offset, size },
                _ => Op::Readdir { ino, fh, offset, size, plus: h.opcode == READDIRPLUS },
            }
        }
        WRITE => {
            let (fh, offset, size, write_flags) = (a.u64()?, a.u64()?, a.u32()?, a.u32()?);
            let data = p.take(size as usize)?;
            Op::Write { ino, fh, offset, data, kill_suidgid: write_flags & FUSE_WRITE_KILL_SUIDGID != 0 }
        }
        FLUSH => Op::Flush { ino, fh: a.u64()? },
        RELEASE => Op::Release { ino, fh: a.u64()? },
        RELEASEDIR => Op::Releasedir { ino, fh: a.u64()? },
        FSYNC | FSYNCDIR => {
            let (fh, flags) = (a.u64()?, a.u32()?);
            let datasync = flags & FUSE_FSYNC_FDATASYNC != 0;
            if h.opcode == FSYNC { Op::Fsync { ino, fh, datasync } } else { Op::Fsyncdir { ino, fh, datasync } }
        }
        OPENDIR => Op::Opendir { ino },
        STATFS => Op::Statfs { ino },
        SETXATTR => {
            // `fuse_setxattr_in` without the FUSE_SETXATTR_EXT fields, which are not negotiated.
            let (size, flags) = (a.u32()?, a.u32()?);
            let name = p.cstr()?;
            Op::Setxattr { ino, name, value: p.take(size as usize)?, flags: flags as i32 }
        }
        GETXATTR => {
            let size = a.u32()?;
            Op::Getxattr { ino, name: p.cstr()?, size }
        }
        LISTXATTR => Op::Listxattr { ino, size: a.u32()? },
        REMOVEXATTR => Op::Removexattr { ino, name: p.cstr()? },
        ACCESS => Op::Access { ino, mask: a.u32()? as i32 },
        CREATE => {
            let (flags, mode, umask) = (a.u32()?, a.u32()?, a.u32()?);
            Op::Create { parent: ino, name: p.cstr()?, mode, umask, flags: flags as i32 }
        }
        FALLOCATE => {
            let (fh, offset, length, mode) = (a.u64()?, a.u64()?, a.u64()?, a.u32()?);
            Op::Fallocate { ino, fh, offset, length, mode: mode as i32 }
        }
        LSEEK => {
            let (fh, offset, whence) = (a.u64()?, a.u64()?, a.u32()?);
            Op::Lseek { ino, fh, offset: offset as i64, whence: whence as i32 }
        }
        COPY_FILE_RANGE => {
            let (fh_in, offset_in, ino_out, fh_out, offset_out, len) =
                (a.u64()?, a.u64()?, a.u64()?, a.u64()?, a.u64()?, a.u64()?);
            Op::CopyFileRange { ino_in: ino, fh_in, offset_in, ino_out, fh_out, offset_out, len }
        }
        _ => return Err(libc::ENOSYS),
    };
    let _ = p.rest();
    Ok(op)
}

fn setattr(a: &mut Fields<'_>) -> Result<SetAttrIn, i32> {
    let valid = a.u32()?;
    a.skip(4)?;
    let fh = a.u64()?;
    let size = a.u64()?;
    let _lock_owner = a.u64()?;
    let (atime, mtime, _ctime) = (a.u64()?, a.u64()?, a.u64()?);
    let (atimensec, mtimensec, _ctimensec) = (a.u32()?, a.u32()?, a.u32()?);
    let mode = a.u32()?;
    a.skip(4)?;
    let (uid, gid) = (a.u32()?, a.u32()?);
    let has = |bit: u32| valid & bit != 0;
    let set_time = |set: u32, now: u32, secs: u64, nsecs: u32| {
        if has(now) { Some(SetTime::Now) } else { has(set).then(|| SetTime::At(time(secs, nsecs))) }
    };
    Ok(SetAttrIn {
        mode: has(FATTR_MODE).then_some(mode),
        uid: has(FATTR_UID).then_some(uid),
        gid: has(FATTR_GID).then_some(gid),
        size: has(FATTR_SIZE).then_some(size),
        atime: set_time(FATTR_ATIME, FATTR_ATIME_NOW, atime, atimensec),
        mtime: set_time(FATTR_MTIME, FATTR_MTIME_NOW, mtime, mtimensec),
        fh: has(FATTR_FH).then_some(fh),
        kill_suidgid: Some(has(FATTR_KILL_SUIDGID)),
    })
}

/// Seconds and nanoseconds since the epoch, as the kernel stores them (negative before it).
fn wire_time(t: SystemTime) -> (u64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs().min(i64::MAX as u64), d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            // -1.25 s is stored as -2 s + 750 ms.
            let (secs, nanos) = (d.as_secs() as i64, d.subsec_nanos());
            if nanos == 0 { ((-secs) as u64, 0) } else { ((-secs - 1) as u64, 1_000_000_000 - nanos) }
        }
    }
}

/// A reply body being written into the transport's buffer.
#[derive(Debug)]
struct Out<'a> {
    buf: &'a mut [u8],
    len: usize,
    /// Something did not fit (the reply is then an error).
    overflow: bool,
}

impl Out<'_> {
    fn extend_from_slice(&mut self, b: &[u8]) {
        match self.buf.get_mut(self.len..self.len + b.len()) {
            Some(dst) => {
                dst.copy_from_slice(b);
                self.len += b.len();
            }
            None => self.overflow = true,
        }
    }

    /// Pads with zeros up to `n` bytes.
    fn resize(&mut self, n: usize, _zero: u8) {
        if n > self.buf.len() {
            self.overflow = true;
        } else if n > self.len {
            self.buf[self.len..n].fill(0);
            self.len = n;
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn clear(&mut self) {
        self.len = 0;
        self.overflow = false;
    }
}

/// Writes `fuse_attr`.
fn put_attr(out: &mut Out<'_>, a: &Attr) {
    let (at, atn) = wire_time(a.atime);
    let (mt, mtn) = wire_time(a.mtime);
    let (ct, ctn) = wire_time(a.ctime);
    for v in [a.ino, a.size, a.blocks, at, mt, ct] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let mode = a.kind.mode_bits() | u32::from(a.perm);
    for v in [atn, mtn, ctn, mode, a.nlink, a.uid, a.gid, a.rdev, a.blksize, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn put_ttl(out: &mut Out<'_>, ttl: Duration) -> u32 {
    out.extend_from_slice(&ttl.as_secs().to_le_bytes());
    ttl.subsec_nanos()
}

/// Writes `fuse_entry_out`.
fn put_entry(out: &mut Out<'_>, ino: u64, entry_ttl: Duration, attr_ttl: Duration, attr: &Attr) {
    out.extend_from_slice(&ino.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes()); // generation
    let en = put_ttl(out, entry_ttl);
    let an = put_ttl(out, attr_ttl);
    out.extend_from_slice(&en.to_le_bytes());
    out.extend_from_slice(&an.to_le_bytes());
    put_attr(out, attr);
}

/// Writes `fuse_open_out`.
fn put_open(out: &mut Out<'_>, fh: u64, flags: u32) {
    out.extend_from_slice(&fh.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes()); // backing_id
}

/// Writes a `fuse_dirent` (without the entry part of a `fuse_direntplus`), padded to 8 bytes.
fn put_dirent(out: &mut Out<'_>, ino: u64, offset: u64, kind: Kind, name: &OsStr) {
    let name = name.as_bytes();
    out.extend_from_slice(&ino.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(&kind.dirent_type().to_le_bytes());
    out.extend_from_slice(name);
    out.resize(out.len().next_multiple_of(8), 0);
}

/// An [`Answer`] written as a reply body straight into the transport's buffer, for transports
/// that send raw replies. After the handler ran: [`BufAnswer::error_code`] (0 or a positive
/// errno) and the body's length ([`BufAnswer::len`]) go into the transport's out header.
#[derive(Debug)]
pub struct BufAnswer<'a> {
    opcode: u32,
    /// The most the reply may hold (the buffer, or a readdir's asked size).
    limit: usize,
    body: Out<'a>,
    error: i32,
    answered: bool,
}

impl<'a> BufAnswer<'a> {
    /// An answer to a request of `opcode` written into `buf`, holding up to `limit` bytes.
    pub fn new(opcode: u32, buf: &'a mut [u8], limit: usize) -> Self {
        let limit = limit.min(buf.len());
        BufAnswer { opcode, limit, body: Out { buf, len: 0, overflow: false }, error: 0, answered: false }
    }

    /// The errno to send (positive; 0 for success). `EIO` if the handler gave no answer.
    pub fn error_code(&self) -> i32 {
        if self.answered { self.error } else { libc::EIO }
    }

    /// The reply body (empty on error).
    pub fn body(&self) -> &[u8] {
        &self.body.buf[..self.len()]
    }

    /// The length of the body (0 on error).
    pub fn len(&self) -> usize {
        if self.error_code() != 0 { 0 } else { self.body.len }
    }

    /// True when the body is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn finish(&mut self) {
        if self.answered {
            tracing::error!(opcode = self.opcode, "a request was answered twice");
        }
        self.answered = true;
        if self.body.overflow || self.body.len > self.limit {
            tracing::error!(opcode = self.opcode, len = self.body.len, limit = self.limit, "reply too long");
            self.error = libc::EIO;
        }
    }

    fn fits(&self, extra: usize) -> bool {
        self.body.len + extra <= self.limit
    }
}

impl Answer for BufAnswer<'_> {
    fn error(&mut self, errno: i32) {
        self.body.clear();
        self.error = if errno > 0 && errno < 512 { errno } else { libc::EIO };
        self.finish();
    }

    fn ok(&mut self) {
        self.finish();
    }

    fn entry(&mut self, node: u64, entry_ttl: Duration, attr_ttl: Duration, attr: &Attr) {
        put_entry(&mut self.body, node, entry_ttl, attr_ttl, attr);
        self.finish();
    }

    fn attr(&mut self, ttl: Duration, attr: &Attr) {
        let n = put_ttl(&mut self.body, ttl);
        self.body.extend_from_slice(&n.to_le_bytes());
        self.body.extend_from_slice(&0u32.to_le_bytes());
        put_attr(&mut self.body, attr);
        self.finish();
    }

    fn data(&mut self, data: &[u8]) {
        self.body.extend_from_slice(data);
        self.finish();
    }

    fn data_buffer(&mut self, len: usize) -> Option<&mut [u8]> {
        self.body.clear();
        let end = len.min(self.limit);
        Some(&mut self.body.buf[..end])
    }

    fn data_filled(&mut self, n: usize) {
        self.body.len = n.min(self.limit);
        self.finish();
    }

    fn xattr_size(&mut self, size: u32) {
        self.body.extend_from_slice(&size.to_le_bytes());
        self.body.extend_from_slice(&0u32.to_le_bytes());
        self.finish();
    }

    fn opened(&mut self, fh: u64, flags: u32, backing: Option<&Backing>) {
        if backing.is_some() {
            // A backing id belongs to the transport that registered it (see `open_backing`).
            return self.error(libc::EIO);
        }
        put_open(&mut self.body, fh, flags);
        self.finish();
    }

    fn created(&mut self, node: u64, ttl: Duration, attr: &Attr, fh: u64, flags: u32, backing: Option<&Backing>) {
        if backing.is_some() {
            return self.error(libc::EIO);
        }
        put_entry(&mut self.body, node, ttl, ttl, attr);
        put_open(&mut self.body, fh, flags);
        self.finish();
    }

    fn written(&mut self, n: u32) {
        self.body.extend_from_slice(&n.to_le_bytes());
        self.body.extend_from_slice(&0u32.to_le_bytes());
        self.finish();
    }

    fn offset(&mut self, offset: i64) {
        self.body.extend_from_slice(&offset.to_le_bytes());
        self.finish();
    }

    fn statfs(&mut self, s: &Statfs) {
        for v in [s.blocks, s.bfree, s.bavail, s.files, s.ffree] {
            self.body.extend_from_slice(&v.to_le_bytes());
        }
        for v in [s.bsize, s.namelen, s.frsize, 0, 0, 0, 0, 0, 0, 0] {
            self.body.extend_from_slice(&v.to_le_bytes());
        }
        self.finish();
    }

    fn dir_entry(&mut self, ino: u64, offset: u64, kind: Kind, name: &OsStr) -> bool {
        let len = (24 + name.len()).next_multiple_of(8);
        if !self.fits(len) {
            return true;
        }
        put_dirent(&mut self.body, ino, offset, kind, name);
        false
    }

    fn dir_entry_plus(&mut self, node: u64, offset: u64, name: &OsStr, ttl: Duration, attr: &Attr) -> bool {
        let len = ENTRY_OUT_LEN + (24 + name.len()).next_multiple_of(8);
        if !self.fits(len) {
            return true;
        }
        // The kernel links node `node` (none for 0) and lists `d_ino` as given.
        put_entry(&mut self.body, node, ttl, ttl, attr);
        put_dirent(&mut self.body, attr.ino, offset, attr.kind, name);
        false
    }

    fn carries_ino_apart(&self) -> bool {
        true
    }

    fn open_backing(&mut self, _fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Backing> {
        Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
}

/// The most bytes the reply to `op` may hold, given a payload buffer of `buf` bytes: a
/// readdir's or read's asked size, else the buffer.
pub fn reply_limit(op: &Op<'_>, buf: usize) -> usize {
    match op {
        Op::Readdir { size, .. } | Op::Read { size, .. } => (*size as usize).min(buf),
        Op::Getxattr { size, .. } | Op::Listxattr { size, .. } if *size > 0 => (*size as usize).min(buf),
        _ => buf,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(opcode: u32, nodeid: u64) -> Vec<u8> {
        let mut h = vec![0u8; IN_HEADER_LEN];
        h[4..8].copy_from_slice(&opcode.to_le_bytes());
        h[8..16].copy_from_slice(&99u64.to_le_bytes());
        h[16..24].copy_from_slice(&nodeid.to_le_bytes());
        h[24..28].copy_from_slice(&1000u32.to_le_bytes());
        h[28..32].copy_from_slice(&100u32.to_le_bytes());
        h[32..36].copy_from_slice(&4242u32.to_le_bytes());
        h
    }

    #[test]
    fn names_and_ids_are_decoded_as_the_kernel_lays_them_out() {
        let (h, op) = decode(&head(opcode::LOOKUP, 5), &[], b"file\0").unwrap();
        assert_eq!(h.ctx, Ctx { uid: 1000, gid: 100, pid: 4242 });
        assert_eq!(h.unique, 99);
        assert!(matches!(op, Op::Lookup { parent: 5, name } if name == "file"));

        let mut arg = 7u64.to_le_bytes().to_vec();
        arg.extend_from_slice(&1u32.to_le_bytes()); // RENAME_NOREPLACE
        arg.extend_from_slice(&[0; 4]);
        let (_, op) = decode(&head(opcode::RENAME2, 5), &arg, b"a\0bb\0").unwrap();
        assert!(
            matches!(op, Op::Rename { parent: 5, name, newparent: 7, newname, flags: 1 } if name == "a" && newname == "bb")
        );

        let (_, op) = decode(&head(opcode::SYMLINK, 3), &[], b"link\0/target/x\0").unwrap();
        assert!(
            matches!(op, Op::Symlink { parent: 3, name, target } if name == "link" && target == Path::new("/target/x"))
        );
    }

    #[test]
    fn a_request_cut_short_or_unknown_is_refused_not_misread() {
        assert_eq!(decode(&head(opcode::LOOKUP, 1), &[], b"no-nul").unwrap_err(), libc::EINVAL);
        assert_eq!(decode(&head(opcode::GETATTR, 1), &[0; 8], &[]).unwrap_err(), libc::EINVAL);
        assert_eq!(decode(&head(9999, 1), &[], &[]).unwrap_err(), libc::ENOSYS);
        assert_eq!(decode(&head(opcode::LOOKUP, 1)[..20], &[], b"x\0").unwrap_err(), libc::EINVAL);
        // A write whose data is shorter than its size field.
        let mut w = vec![0u8; 40];
        w[16..20].copy_from_slice(&10u32.to_le_bytes());
        assert_eq!(decode(&head(opcode::WRITE, 1), &w, b"12345").unwrap_err(), libc::EINVAL);
    }

    #[test]
    fn setattr_fields_are_set_only_when_valid() {
        let mut a = vec![0u8; 88];
        a[0..4].copy_from_slice(&(FATTR_MODE | FATTR_SIZE | FATTR_MTIME_NOW | FATTR_ATIME).to_le_bytes());
        a[16..24].copy_from_slice(&4096u64.to_le_bytes());
        a[32..40].copy_from_slice(&1_700_000_000u64.to_le_bytes());
        a[56..60].copy_from_slice(&5u32.to_le_bytes());
        a[68..72].copy_from_slice(&0o640u32.to_le_bytes());
        let (_, op) = decode(&head(opcode::SETATTR, 2), &a, &[]).unwrap();
        let Op::Setattr { ino: 2, set } = op else { panic!("{op:?}") };
        assert_eq!(set.mode, Some(0o640));
        assert_eq!(set.size, Some(4096));
        assert_eq!(set.uid, None);
        assert_eq!(set.mtime, Some(SetTime::Now));
        assert_eq!(set.atime, Some(SetTime::At(UNIX_EPOCH + Duration::new(1_700_000_000, 5))));
        assert_eq!(set.fh, None);
    }

    #[test]
    fn replies_have_the_kernel_struct_sizes() {
        let attr = Attr::dir(1);
        let mut b = vec![0u8; 4096];
        let mut a = BufAnswer::new(opcode::LOOKUP, &mut b, 4096);
        a.entry(9, Duration::from_secs(1), Duration::from_millis(1500), &attr);
        assert_eq!((a.error_code(), a.len()), (0, 128));
        // The node id, then (in the attributes at offset 40) the number shown.
        assert_eq!((&a.body()[..8], &a.body()[40..48]), (&9u64.to_le_bytes()[..], &1u64.to_le_bytes()[..]));
        // entry_valid 1 s, attr_valid 1 s + 500 ms.
        assert_eq!(&a.body()[16..24], &1u64.to_le_bytes());
        assert_eq!(&a.body()[36..40], &500_000_000u32.to_le_bytes());
        // mode = S_IFDIR | 0755 at offset 40 + 60.
        assert_eq!(&a.body()[100..104], &(libc::S_IFDIR | 0o755).to_le_bytes());
        let mut b = vec![0u8; 4096];
        let mut a = BufAnswer::new(opcode::CREATE, &mut b, 4096);
        a.created(1, Duration::ZERO, &attr, 7, 0, None);
        assert_eq!(a.len(), 144);
        let mut b = vec![0u8; 4096];
        let mut a = BufAnswer::new(opcode::STATFS, &mut b, 4096);
        a.statfs(&Statfs {
            blocks: 1,
            bfree: 2,
            bavail: 3,
            files: 4,
            ffree: 5,
            bsize: 4096,
            namelen: 255,
            frsize: 4096,
        });
        assert_eq!(a.len(), 80);
        let mut b = vec![0u8; 4096];
        let mut a = BufAnswer::new(opcode::GETXATTR, &mut b, 4096);
        a.xattr(0, b"value");
        assert_eq!(a.body(), &[5, 0, 0, 0, 0, 0, 0, 0]);
        let mut b = vec![0u8; 4096];
        let mut a = BufAnswer::new(opcode::GETXATTR, &mut b, 4096);
        a.xattr(2, b"value");
        assert_eq!(a.error_code(), libc::ERANGE);
        assert!(a.is_empty());
    }

    #[test]
    fn a_directory_answer_stops_at_the_asked_size() {
        let mut b = vec![0u8; 64];
        let mut a = BufAnswer::new(opcode::READDIR, &mut b, 64);
        assert!(!a.dir_entry(1, 1, Kind::Directory, OsStr::new(".")));
        assert!(!a.dir_entry(2, 2, Kind::RegularFile, OsStr::new("abcdefgh")));
        assert!(a.dir_entry(3, 3, Kind::RegularFile, OsStr::new("c")), "64 bytes hold two entries");
        a.ok();
        assert_eq!(a.len(), 32 + 32);
        assert_eq!(&a.body()[32 + 20..32 + 24], &(libc::S_IFREG >> 12).to_le_bytes());
        let mut b = vec![0u8; 4096];
        let mut a = BufAnswer::new(opcode::READDIRPLUS, &mut b, 4096);
        assert!(!a.dir_entry_plus(9, 1, OsStr::new("x"), Duration::ZERO, &Attr::dir(5)));
        a.ok();
        assert_eq!(a.len(), 128 + 32);
        // The node id links the entry; the number shown (attributes and `d_ino`) is apart.
        let (node, shown, d_ino) = (&a.body()[..8], &a.body()[40..48], &a.body()[128..136]);
        assert_eq!((node, shown, d_ino), (&9u64.to_le_bytes()[..], &5u64.to_le_bytes()[..], &5u64.to_le_bytes()[..]));
    }

    #[test]
    fn no_answer_is_an_io_error() {
        let mut b = vec![0u8; 4096];
        let a = BufAnswer::new(opcode::GETATTR, &mut b, 4096);
        assert_eq!(a.error_code(), libc::EIO);
        let mut b = vec![0u8; 4096];
        let mut a = BufAnswer::new(opcode::GETATTR, &mut b, 4096);
        a.error(0);
        assert_eq!(a.error_code(), libc::EIO);
    }

    // A request is what the kernel wrote, but a decoder that panics on a short or odd one
    // would take a serving thread down: random bytes of every opcode decode or fail cleanly.
    #[test]
    fn random_requests_decode_or_fail_without_panicking() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(20);
        let mut decoded = 0;
        for _ in 0..50_000 {
            let opcode = rng.random_range(0..60u32);
            let mut h = head(opcode, rng.random());
            if rng.random_bool(0.1) {
                h.truncate(rng.random_range(0..IN_HEADER_LEN));
            }
            let arg: Vec<u8> = (0..rng.random_range(0..100)).map(|_| rng.random()).collect();
            let payload: Vec<u8> =
                (0..rng.random_range(0..64)).map(|_| if rng.random_bool(0.2) { 0 } else { rng.random() }).collect();
            if let Ok((_, op)) = decode(&h, &arg, &payload) {
                decoded += 1;
                let mut b = vec![0u8; reply_limit(&op, 4096)];
                let mut a = BufAnswer::new(opcode, &mut b, reply_limit(&op, 4096));
                a.error(libc::ENOENT);
                assert_eq!(a.error_code(), libc::ENOENT);
            }
        }
        assert!(decoded > 5_000, "only {decoded} random requests decoded: the generator is off");
    }

    #[test]
    fn times_before_the_epoch_keep_their_nanoseconds_positive() {
        assert_eq!(wire_time(UNIX_EPOCH - Duration::from_millis(1250)), ((-2i64) as u64, 750_000_000));
        assert_eq!(time((-2i64) as u64, 750_000_000), UNIX_EPOCH - Duration::from_millis(1250));
    }
}
