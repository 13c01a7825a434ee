//! fuser's side of the one request path: each `fuser::Filesystem` handler turns its arguments
//! into an [`Op`] and hands it to the served filesystem's [`Handler`] with an [`Answer`] that
//! replies through fuser. Nothing else lives here: what a request does is decided in one place
//! (`dispatch` for ovl-fs, snap-fs's router for a snapshot mount), whichever transport carried it.

use std::any::Any;
use std::ffi::OsStr;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, CopyFileRangeFlags, Errno as FuseErrno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use ovl_proto::{Answer, Attr, Backing, Ctx, Handler, Kind, Op, SetAttrIn, SetTime, Statfs};

/// A filesystem served over FUSE: a [`Handler`] that also negotiates the connection.
pub trait Served: Handler + 'static {
    /// Negotiates the connection's features at INIT, before any request is served.
    fn init(&mut self, config: &mut KernelConfig) -> std::io::Result<()>;
}

/// A step of the INIT negotiation after the filesystem's own (see [`Glue::new`]).
pub type AfterInit = Box<dyn FnOnce(&mut KernelConfig, Arc<dyn Handler>) + Send + Sync>;

/// fuser's view of a [`Served`] filesystem, shared (`Arc`) with the other transport.
pub struct Glue<S: Served> {
    fs: Arc<S>,
    /// Runs after the filesystem's own negotiation, at INIT (the ring transport's offer),
    /// with the filesystem as the rings will serve it.
    after_init: Option<AfterInit>,
}

impl<S: Served> Glue<S> {
    /// Serves `fs`; `after_init` runs once the filesystem negotiated its features.
    pub fn new(fs: Arc<S>, after_init: Option<AfterInit>) -> Self {
        Glue { fs, after_init }
    }
}

fn ctx(req: &Request) -> Ctx {
    Ctx { uid: req.uid(), gid: req.gid(), pid: req.pid() }
}

/// The fuser form of `a`.
fn fuser_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: UNIX_EPOCH,
        kind: fuser_kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

/// The fuser form of `k`.
fn fuser_kind(k: Kind) -> FileType {
    match k {
        Kind::Fifo => FileType::NamedPipe,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Directory => FileType::Directory,
        Kind::RegularFile => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Socket => FileType::Socket,
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    }
}

/// The fuser reply a request came with.
enum Reply {
    Entry(ReplyEntry),
    Attr(ReplyAttr),
    Data(ReplyData),
    Empty(ReplyEmpty),
    Open(ReplyOpen),
    Create(ReplyCreate),
    Write(ReplyWrite),
    Statfs(ReplyStatfs),
    Xattr(ReplyXattr),
    Lseek(ReplyLseek),
    Dir(ReplyDirectory),
    DirPlus(ReplyDirectoryPlus),
}

impl Reply {
    fn error(self, errno: i32) {
        let e = FuseErrno::from_i32(errno);
        match self {
            Reply::Entry(r) => r.error(e),
            Reply::Attr(r) => r.error(e),
            Reply::Data(r) => r.error(e),
            Reply::Empty(r) => r.error(e),
            Reply::Open(r) => r.error(e),
            Reply::Create(r) => r.error(e),
            Reply::Write(r) => r.error(e),
            Reply::Statfs(r) => r.error(e),
            Reply::Xattr(r) => r.error(e),
            Reply::Lseek(r) => r.error(e),
            Reply::Dir(r) => r.error(e),
            Reply::DirPlus(r) => r.error(e),
        }
    }
}

/// An [`Answer`] that replies through fuser. An answer of the wrong kind for the request (a
/// bug) is logged and answered `EIO`; no answer at all gets fuser's `EIO` when dropped.
struct FuserAnswer {
    op: &'static str,
    reply: Option<Reply>,
}

impl FuserAnswer {
    fn new(op: &'static str, reply: Reply) -> Self {
        FuserAnswer { op, reply: Some(reply) }
    }

    fn mismatch(&mut self, what: &str) {
        tracing::error!(op = self.op, "answered with {what}, which this request cannot carry");
        if let Some(r) = self.reply.take() {
            r.error(libc::EIO);
        }
    }
}

fn backing_id(b: &Backing) -> Option<&BackingId> {
    (**b).downcast_ref::<BackingId>()
}

impl Answer for FuserAnswer {
    fn error(&mut self, errno: i32) {
        if let Some(r) = self.reply.take() {
            r.error(errno);
        }
    }

    fn ok(&mut self) {
        match self.reply.take() {
            Some(Reply::Empty(r)) => r.ok(),
            Some(Reply::Dir(r)) => r.ok(),
            Some(Reply::DirPlus(r)) => r.ok(),
            other => {
                self.reply = other;
                self.mismatch("ok");
            }
        }
    }

    fn entry(&mut self, node: u64, entry_ttl: Duration, attr_ttl: Duration, attr: &Attr) {
        // fuser sends one number as the node id and the inode number (`carries_ino_apart`).
        let attr = fuser_attr(&Attr { ino: node, ..*attr });
        match self.reply.take() {
            Some(Reply::Entry(r)) => r.entry_with_ttls(&attr_ttl, &entry_ttl, &attr, Generation(0)),
            other => {
                self.reply = other;
                self.mismatch("an entry");
            }
        }
    }

    fn attr(&mut self, ttl: Duration, attr: &Attr) {
        match self.reply.take() {
            Some(Reply::Attr(r)) => r.attr(&ttl, &fuser_attr(attr)),
            other => {
                self.reply = other;
                self.mismatch("attributes");
            }
        }
    }

    fn data(&mut self, data: &[u8]) {
        match self.reply.take() {
            Some(Reply::Data(r)) => r.data(data),
            Some(Reply::Xattr(r)) => r.data(data),
            other => {
                self.reply = other;
                self.mismatch("data");
            }
        }
    }

    fn xattr_size(&mut self, size: u32) {
        match self.reply.take() {
            Some(Reply::Xattr(r)) => r.size(size),
            other => {
                self.reply = other;
                self.mismatch("an xattr size");
            }
        }
    }

    fn opened(&mut self, fh: u64, flags: u32, backing: Option<&Backing>) {
        let flags = FopenFlags::from_bits_retain(flags);
        match (self.reply.take(), backing) {
            (Some(Reply::Open(r)), None) => r.opened(FileHandle(fh), flags),
            (Some(Reply::Open(r)), Some(b)) => match backing_id(b) {
                Some(id) => r.opened_passthrough(FileHandle(fh), flags, id),
                None => r.error(FuseErrno::from_i32(libc::EIO)),
            },
            (other, _) => {
                self.reply = other;
                self.mismatch("an open");
            }
        }
    }

    fn created(&mut self, node: u64, ttl: Duration, attr: &Attr, fh: u64, flags: u32, backing: Option<&Backing>) {
        let (flags, attr) = (FopenFlags::from_bits_retain(flags), fuser_attr(&Attr { ino: node, ..*attr }));
        match (self.reply.take(), backing) {
            (Some(Reply::Create(r)), None) => r.created(&ttl, &attr, Generation(0), FileHandle(fh), flags),
            (Some(Reply::Create(r)), Some(b)) => match backing_id(b) {
                Some(id) => r.created_passthrough(&ttl, &attr, Generation(0), FileHandle(fh), flags, id),
                None => r.error(FuseErrno::from_i32(libc::EIO)),
            },
            (other, _) => {
                self.reply = other;
                self.mismatch("a creation");
            }
        }
    }

    fn written(&mut self, n: u32) {
        match self.reply.take() {
            Some(Reply::Write(r)) => r.written(n),
            other => {
                self.reply = other;
                self.mismatch("a written count");
            }
        }
    }

    fn offset(&mut self, offset: i64) {
        match self.reply.take() {
            Some(Reply::Lseek(r)) => r.offset(offset),
            other => {
                self.reply = other;
                self.mismatch("an offset");
            }
        }
    }

    fn statfs(&mut self, s: &Statfs) {
        match self.reply.take() {
            Some(Reply::Statfs(r)) => {
                r.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize)
            }
            other => {
                self.reply = other;
                self.mismatch("statistics");
            }
        }
    }

    fn dir_entry(&mut self, ino: u64, offset: u64, kind: Kind, name: &OsStr) -> bool {
        let Some(Reply::Dir(r)) = &mut self.reply else {
            self.mismatch("a directory entry");
            return true;
        };
        r.add(INodeNo(ino), offset, fuser_kind(kind), name)
    }

    fn dir_entry_plus(&mut self, node: u64, offset: u64, name: &OsStr, ttl: Duration, attr: &Attr) -> bool {
        let Some(Reply::DirPlus(r)) = &mut self.reply else {
            self.mismatch("a directory entry with attributes");
            return true;
        };
        // fuser takes the node id and `d_ino` from `attr.ino`: the node's id where there is one
        // (`carries_ino_apart`); an entry listed only goes by its listed number.
        let ino = if node == 0 { attr.ino } else { node };
        r.add(INodeNo(ino), offset, name, &ttl, &fuser_attr(&Attr { ino, ..*attr }), Generation(0))
    }

    fn open_backing(&mut self, fd: BorrowedFd<'_>) -> std::io::Result<Backing> {
        let id = match &self.reply {
            Some(Reply::Open(r)) => r.open_backing(fd)?,
            Some(Reply::Create(r)) => r.open_backing(fd)?,
            _ => return Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        };
        Ok(Arc::new(id) as Arc<dyn Any + Send + Sync>)
    }
}

impl<S: Served> Glue<S> {
    fn serve(&self, req: &Request, op: Op<'_>, reply: Reply) {
        let mut answer = FuserAnswer::new(op.name(), reply);
        self.fs.handle(&ctx(req), op, &mut answer);
    }
}

impl<S: Served> Filesystem for Glue<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // The handshake runs before anything else holds the filesystem.
        let fs = Arc::get_mut(&mut self.fs).ok_or_else(|| std::io::Error::other("filesystem shared before INIT"))?;
        fs.init(config)?;
        if let Some(f) = self.after_init.take() {
            f(config, self.fs.clone());
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.serve(req, Op::Lookup { parent: parent.0, name }, Reply::Entry(reply));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.serve(req, Op::Getattr { ino: ino.0, fh: fh.map(|f| f.0) }, Reply::Attr(reply));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttrIn {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            fh: fh.map(|f| f.0),
            kill_suidgid: None,
        };
        self.serve(req, Op::Setattr { ino: ino.0, set }, Reply::Attr(reply));
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        self.serve(req, Op::Readlink { ino: ino.0 }, Reply::Data(reply));
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        self.serve(req, Op::Mknod { parent: parent.0, name, mode, umask, rdev }, Reply::Entry(reply));
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        self.serve(req, Op::Mkdir { parent: parent.0, name, mode, umask }, Reply::Entry(reply));
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.serve(req, Op::Unlink { parent: parent.0, name }, Reply::Empty(reply));
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.serve(req, Op::Rmdir { parent: parent.0, name }, Reply::Empty(reply));
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        self.serve(req, Op::Symlink { parent: parent.0, name: link_name, target }, Reply::Entry(reply));
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let op = Op::Rename { parent: parent.0, name, newparent: newparent.0, newname, flags: flags.bits() };
        self.serve(req, op, Reply::Empty(reply));
    }

    fn link(&self, req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.serve(req, Op::Link { ino: ino.0, newparent: newparent.0, newname }, Reply::Entry(reply));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.serve(req, Op::Open { ino: ino.0, flags: flags.0, kill_suidgid: None }, Reply::Open(reply));
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.serve(req, Op::Read { ino: ino.0, fh: fh.0, offset, size }, Reply::Data(reply));
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill_suidgid = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        self.serve(req, Op::Write { ino: ino.0, fh: fh.0, offset, data, kill_suidgid }, Reply::Write(reply));
    }

    fn flush(&self, req: &Request, ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        self.serve(req, Op::Flush { ino: ino.0, fh: fh.0 }, Reply::Empty(reply));
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.serve(req, Op::Release { ino: ino.0, fh: fh.0 }, Reply::Empty(reply));
    }

    fn fsync(&self, req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.serve(req, Op::Fsync { ino: ino.0, fh: fh.0, datasync }, Reply::Empty(reply));
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.serve(req, Op::Opendir { ino: ino.0 }, Reply::Open(reply));
    }

    fn readdir(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        let op = Op::Readdir { ino: ino.0, fh: fh.0, offset, size: 0, plus: false };
        self.serve(req, op, Reply::Dir(reply));
    }

    fn readdirplus(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectoryPlus) {
        let op = Op::Readdir { ino: ino.0, fh: fh.0, offset, size: 0, plus: true };
        self.serve(req, op, Reply::DirPlus(reply));
    }

    fn releasedir(&self, req: &Request, ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.serve(req, Op::Releasedir { ino: ino.0, fh: fh.0 }, Reply::Empty(reply));
    }

    fn fsyncdir(&self, req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.serve(req, Op::Fsyncdir { ino: ino.0, fh: fh.0, datasync }, Reply::Empty(reply));
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        self.serve(req, Op::Statfs { ino: ino.0 }, Reply::Statfs(reply));
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.serve(req, Op::Setxattr { ino: ino.0, name, value, flags }, Reply::Empty(reply));
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.serve(req, Op::Getxattr { ino: ino.0, name, size }, Reply::Xattr(reply));
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.serve(req, Op::Listxattr { ino: ino.0, size }, Reply::Xattr(reply));
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.serve(req, Op::Removexattr { ino: ino.0, name }, Reply::Empty(reply));
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.serve(req, Op::Access { ino: ino.0, mask: mask.bits() }, Reply::Empty(reply));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.serve(req, Op::Create { parent: parent.0, name, mode, umask, flags }, Reply::Create(reply));
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.serve(req, Op::Fallocate { ino: ino.0, fh: fh.0, offset, length, mode }, Reply::Empty(reply));
    }

    fn lseek(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        self.serve(req, Op::Lseek { ino: ino.0, fh: fh.0, offset, whence }, Reply::Lseek(reply));
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let op = Op::CopyFileRange {
            ino_in: ino_in.0,
            fh_in: fh_in.0,
            offset_in,
            ino_out: ino_out.0,
            fh_out: fh_out.0,
            offset_out,
            len,
        };
        self.serve(req, op, Reply::Write(reply));
    }
}
