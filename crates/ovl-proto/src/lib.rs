//! The FUSE requests ovl-fs serves, decoded once for every transport.
//!
//! This crate owns the transport-neutral shape of a request ([`Op`], with the caller in
//! [`Ctx`]), of its answer ([`Answer`]) and of the one thing that serves both ([`Handler`]),
//! plus the kernel's wire format for transports that carry raw requests ([`wire`]: decoding a
//! request from the header, per-op and payload buffers the kernel filled, and encoding each
//! reply). fuser's `/dev/fuse` loop reaches a [`Handler`] through ovl-fs's glue, an io_uring
//! ring (`ovl-uring`) through [`wire`]; both hand the handler the same [`Op`], so the two
//! cannot drift apart.
//!
//! It knows nothing of layers, of fuser or of io_uring, and it never touches a file: it only
//! turns bytes into requests and answers into bytes. It has no `unsafe`.
//!
//! ```
//! use ovl_proto::{Answer, Attr, Ctx, Handler, Op, wire};
//! struct Hello;
//! impl Handler for Hello {
//!     fn handle(&self, _ctx: &Ctx, op: Op<'_>, answer: &mut dyn Answer) {
//!         match op {
//!             Op::Getattr { ino: 1, .. } => answer.attr(std::time::Duration::from_secs(1), &Attr::dir(1)),
//!             _ => answer.error(libc::ENOSYS),
//!         }
//!     }
//!     fn forget(&self, _ino: u64, _nlookup: u64) {}
//! }
//! // A GETATTR of node 1 as the kernel writes it (in header, then `fuse_getattr_in`).
//! let mut header = [0u8; 40];
//! header[4..8].copy_from_slice(&wire::opcode::GETATTR.to_le_bytes());
//! header[8..16].copy_from_slice(&7u64.to_le_bytes());
//! header[16..24].copy_from_slice(&1u64.to_le_bytes());
//! let (req, op) = wire::decode(&header, &[0u8; 16], &[]).unwrap();
//! let mut out = vec![0u8; 4096];
//! let mut ans = wire::BufAnswer::new(req.opcode, &mut out, 4096);
//! Hello.handle(&req.ctx, op, &mut ans);
//! assert_eq!((ans.error_code(), ans.len()), (0, 104)); // a `fuse_attr_out`
//! ```

use std::any::Any;
use std::ffi::OsStr;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::time::{Duration, SystemTime};

pub mod wire;

/// Who asked: the caller's ids, as the kernel stamps every request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ctx {
    /// The caller's file-system user id.
    pub uid: u32,
    /// The caller's file-system group id.
    pub gid: u32,
    /// The caller's thread group id (0 for requests the kernel makes on its own).
    pub pid: u32,
}

/// A file's type, as a reply names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A named pipe.
    Fifo,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A directory.
    Directory,
    /// A regular file.
    RegularFile,
    /// A symbolic link.
    Symlink,
    /// A socket.
    Socket,
}

impl Kind {
    /// The `S_IFMT` bits of this type.
    #[allow(clippy::unnecessary_cast)] // `mode_t` is not a u32 on every target
    pub fn mode_bits(self) -> u32 {
        (match self {
            Kind::Fifo => libc::S_IFIFO,
            Kind::CharDevice => libc::S_IFCHR,
            Kind::BlockDevice => libc::S_IFBLK,
            Kind::Directory => libc::S_IFDIR,
            Kind::RegularFile => libc::S_IFREG,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Socket => libc::S_IFSOCK,
        }) as u32
    }

    /// The type of a file of mode `mode` (its `S_IFMT` bits; anything unknown is a regular file).
    #[allow(clippy::unnecessary_cast)] // `mode_t` is not a u32 on every target
    pub fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT as u32 {
            m if m == libc::S_IFDIR as u32 => Kind::Directory,
            m if m == libc::S_IFLNK as u32 => Kind::Symlink,
            m if m == libc::S_IFIFO as u32 => Kind::Fifo,
            m if m == libc::S_IFSOCK as u32 => Kind::Socket,
            m if m == libc::S_IFCHR as u32 => Kind::CharDevice,
            m if m == libc::S_IFBLK as u32 => Kind::BlockDevice,
            _ => Kind::RegularFile,
        }
    }

    /// The `DT_*` value a directory entry carries.
    pub fn dirent_type(self) -> u32 {
        self.mode_bits() >> 12
    }
}

/// The attributes a reply carries (the kernel's `fuse_attr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// The inode number shown as `st_ino`.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    /// Last access.
    pub atime: SystemTime,
    /// Last change of contents.
    pub mtime: SystemTime,
    /// Last change of metadata.
    pub ctime: SystemTime,
    /// The file's type.
    pub kind: Kind,
    /// Permission bits (including set-ID and sticky).
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number of a device file.
    pub rdev: u32,
    /// Preferred I/O size.
    pub blksize: u32,
}

impl Attr {
    /// A directory's attributes with every other field zero (for tests and placeholders).
    pub fn dir(ino: u64) -> Self {
        Attr {
            ino,
            size: 0,
            blocks: 0,
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            kind: Kind::Directory,
            perm: 0o755,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
        }
    }
}

/// A time a `setattr` sets: a given one, or the server's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    /// This time.
    At(SystemTime),
    /// Now.
    Now,
}

/// What a `setattr` changes (each field set only when asked).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttrIn {
    /// New permission bits (the type bits are ignored).
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (truncate).
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<SetTime>,
    /// New modification time.
    pub mtime: Option<SetTime>,
    /// The open file the change came through (`ftruncate`, `fchmod`...).
    pub fh: Option<u64>,
    /// The kernel asks that set-ID bits be cleared (a truncate by a caller without
    /// `CAP_FSETID`). Only the wire transport sees it; fuser does not pass it on.
    pub kill_suidgid: Option<bool>,
}

/// One request, decoded. Names and data borrow from the transport's buffer. Node ids (`ino`,
/// `parent`) are the server's; `fh` is a handle the server gave at open.
#[derive(Debug)]
#[allow(missing_docs)] // The fields are the kernel's, named as in its `fuse_*_in` structs.
pub enum Op<'a> {
    Lookup {
        parent: u64,
        name: &'a OsStr,
    },
    Getattr {
        ino: u64,
        fh: Option<u64>,
    },
    Setattr {
        ino: u64,
        set: SetAttrIn,
    },
    Readlink {
        ino: u64,
    },
    Mknod {
        parent: u64,
        name: &'a OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    },
    Mkdir {
        parent: u64,
        name: &'a OsStr,
        mode: u32,
        umask: u32,
    },
    Unlink {
        parent: u64,
        name: &'a OsStr,
    },
    Rmdir {
        parent: u64,
        name: &'a OsStr,
    },
    Symlink {
        parent: u64,
        name: &'a OsStr,
        target: &'a Path,
    },
    Rename {
        parent: u64,
        name: &'a OsStr,
        newparent: u64,
        newname: &'a OsStr,
        flags: u32,
    },
    Link {
        ino: u64,
        newparent: u64,
        newname: &'a OsStr,
    },
    /// `kill_suidgid`: `FUSE_OPEN_KILL_SUIDGID` when the transport carries it.
    Open {
        ino: u64,
        flags: i32,
        kill_suidgid: Option<bool>,
    },
    Read {
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
    },
    /// `kill_suidgid`: `FUSE_WRITE_KILL_SUIDGID`.
    Write {
        ino: u64,
        fh: u64,
        offset: u64,
        data: &'a [u8],
        kill_suidgid: bool,
    },
    Flush {
        ino: u64,
        fh: u64,
    },
    Release {
        ino: u64,
        fh: u64,
    },
    Fsync {
        ino: u64,
        fh: u64,
        datasync: bool,
    },
    Opendir {
        ino: u64,
    },
    /// `plus`: READDIRPLUS (entries with attributes, each a lookup).
    Readdir {
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
        plus: bool,
    },
    Releasedir {
        ino: u64,
        fh: u64,
    },
    Fsyncdir {
        ino: u64,
        fh: u64,
        datasync: bool,
    },
    Statfs {
        ino: u64,
    },
    Setxattr {
        ino: u64,
        name: &'a OsStr,
        value: &'a [u8],
        flags: i32,
    },
    /// `size` 0 asks for the value's size only.
    Getxattr {
        ino: u64,
        name: &'a OsStr,
        size: u32,
    },
    /// `size` 0 asks for the list's size only.
    Listxattr {
        ino: u64,
        size: u32,
    },
    Removexattr {
        ino: u64,
        name: &'a OsStr,
    },
    Access {
        ino: u64,
        mask: i32,
    },
    Create {
        parent: u64,
        name: &'a OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    },
    Fallocate {
        ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    },
    Lseek {
        ino: u64,
        fh: u64,
        offset: i64,
        whence: i32,
    },
    CopyFileRange {
        ino_in: u64,
        fh_in: u64,
        offset_in: u64,
        ino_out: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
    },
}

/// Reads and writes up to this size are served in line by a transport that serves one queue's
/// requests in one thread (see [`Op::may_block`]).
pub const SMALL_IO: u32 = 128 << 10;

impl Op<'_> {
    /// Whether serving this request may take long for reasons other than the machine being
    /// busy: a copy of file data (a copy-up, a copy ahead of a change), a flush to disk, a
    /// large read or write, the removal of a directory full of whiteouts. A transport that
    /// serves a queue's requests in one thread hands these to helper threads, so that they hold
    /// up nothing else ([`Handler::may_block`] may say so of more).
    pub fn may_block(&self) -> bool {
        match self {
            Op::Lookup { .. }
            | Op::Getattr { .. }
            | Op::Readlink { .. }
            | Op::Mknod { .. }
            | Op::Mkdir { .. }
            | Op::Symlink { .. }
            | Op::Unlink { .. }
            | Op::Flush { .. }
            | Op::Release { .. }
            | Op::Opendir { .. }
            | Op::Readdir { .. }
            | Op::Releasedir { .. }
            | Op::Statfs { .. }
            | Op::Getxattr { .. }
            | Op::Listxattr { .. }
            | Op::Access { .. }
            | Op::Create { .. }
            | Op::Lseek { .. } => false,
            Op::Read { size, .. } => *size > SMALL_IO,
            Op::Write { data, .. } => data.len() > SMALL_IO as usize,
            // An open for writing or truncating may copy the file up first.
            Op::Open { flags, .. } => *flags & libc::O_ACCMODE != libc::O_RDONLY || *flags & libc::O_TRUNC != 0,
            Op::Setattr { .. }
            | Op::Rmdir { .. }
            | Op::Rename { .. }
            | Op::Link { .. }
            | Op::Fsync { .. }
            | Op::Fsyncdir { .. }
            | Op::Setxattr { .. }
            | Op::Removexattr { .. }
            | Op::Fallocate { .. }
            | Op::CopyFileRange { .. } => true,
        }
    }

    /// The operation's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Lookup { .. } => "lookup",
            Op::Getattr { .. } => "getattr",
            Op::Setattr { .. } => "setattr",
            Op::Readlink { .. } => "readlink",
            Op::Mknod { .. } => "mknod",
            Op::Mkdir { .. } => "mkdir",
            Op::Unlink { .. } => "unlink",
            Op::Rmdir { .. } => "rmdir",
            Op::Symlink { .. } => "symlink",
            Op::Rename { .. } => "rename",
            Op::Link { .. } => "link",
            Op::Open { .. } => "open",
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Flush { .. } => "flush",
            Op::Release { .. } => "release",
            Op::Fsync { .. } => "fsync",
            Op::Opendir { .. } => "opendir",
            Op::Readdir { plus: false, .. } => "readdir",
            Op::Readdir { plus: true, .. } => "readdirplus",
            Op::Releasedir { .. } => "releasedir",
            Op::Fsyncdir { .. } => "fsyncdir",
            Op::Statfs { .. } => "statfs",
            Op::Setxattr { .. } => "setxattr",
            Op::Getxattr { .. } => "getxattr",
            Op::Listxattr { .. } => "listxattr",
            Op::Removexattr { .. } => "removexattr",
            Op::Access { .. } => "access",
            Op::Create { .. } => "create",
            Op::Fallocate { .. } => "fallocate",
            Op::Lseek { .. } => "lseek",
            Op::CopyFileRange { .. } => "copy_file_range",
        }
    }
}

/// A backing file registered with the kernel for passthrough, in the form the transport that
/// registered it knows (ovl-fs's glue: fuser's `BackingId`).
pub type Backing = std::sync::Arc<dyn Any + Send + Sync>;

/// File-system statistics, as a statfs reply carries them (the kernel's `fuse_kstatfs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)] // The fields are `statfs(2)`'s.
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// Flags of an open reply (`FOPEN_*`).
pub mod fopen {
    /// Keep the page cache of the file across opens.
    pub const KEEP_CACHE: u32 = 1 << 1;
    /// The directory's listing may be cached.
    pub const CACHE_DIR: u32 = 1 << 3;
    /// No FLUSH is sent at close.
    pub const NOFLUSH: u32 = 1 << 5;
    /// Reads and writes go to the backing file.
    pub const PASSTHROUGH: u32 = 1 << 7;
}

/// The answer to one request. A handler calls exactly one of the final methods (all but
/// [`Answer::dir_entry`], [`Answer::dir_entry_plus`] and [`Answer::open_backing`]); a handler
/// that calls none leaves the transport to answer `EIO`.
pub trait Answer {
    /// Fails the request with `errno` (positive).
    fn error(&mut self, errno: i32);
    /// Succeeds with no data.
    fn ok(&mut self);
    /// A looked-up or created entry: node id `node` (0 with a time-to-live: a cached negative
    /// entry), attributes `attr`, whose `ino` is the number `stat` shows (see
    /// [`Answer::carries_ino_apart`]).
    fn entry(&mut self, node: u64, entry_ttl: Duration, attr_ttl: Duration, attr: &Attr);
    /// Attributes.
    fn attr(&mut self, ttl: Duration, attr: &Attr);
    /// Bytes (read, readlink, an xattr value or list).
    fn data(&mut self, data: &[u8]);
    /// An xattr value's or list's size (when asked with size 0).
    fn xattr_size(&mut self, size: u32);
    /// An open handle; `backing` for a passthrough open.
    fn opened(&mut self, fh: u64, flags: u32, backing: Option<&Backing>);
    /// A created file: its entry (as [`Answer::entry`]) and open handle.
    fn created(&mut self, node: u64, ttl: Duration, attr: &Attr, fh: u64, flags: u32, backing: Option<&Backing>);
    /// Bytes written (write, copy_file_range).
    fn written(&mut self, n: u32);
    /// A seek's result.
    fn offset(&mut self, offset: i64);
    /// File-system statistics.
    fn statfs(&mut self, s: &Statfs);
    /// Adds a directory entry to a readdir answer; true when it did not fit (the answer is
    /// full, and the entry is not in it). Finish with [`Answer::ok`].
    fn dir_entry(&mut self, ino: u64, offset: u64, kind: Kind, name: &OsStr) -> bool;
    /// Adds an entry with attributes to a readdirplus answer; true when it did not fit.
    /// `node` is the entry's node id (its lookup is counted when the entry fits; 0: listed
    /// only, not looked up), `attr.ino` the number listed and shown by `stat` (see
    /// [`Answer::carries_ino_apart`]).
    fn dir_entry_plus(&mut self, node: u64, offset: u64, name: &OsStr, ttl: Duration, attr: &Attr) -> bool;
    /// Whether entries carry their node id apart from the inode number `attr.ino` they show.
    /// A transport that cannot (fuser's replies take both from one number) sends the node id
    /// as both: a node whose id is not its number then needs attributes that never stay valid
    /// (every `stat` asks), and is listed by its node id.
    fn carries_ino_apart(&self) -> bool {
        false
    }
    /// Where the transport can take data written in place (a read of `len` bytes into its
    /// reply buffer), that buffer, at most `len` long; finish with [`Answer::data_filled`].
    fn data_buffer(&mut self, _len: usize) -> Option<&mut [u8]> {
        None
    }
    /// The first `n` bytes of [`Answer::data_buffer`] are the answer.
    fn data_filled(&mut self, _n: usize) {
        self.error(libc::EIO);
    }
    /// Registers `fd` as a passthrough backing file, where the transport can.
    fn open_backing(&mut self, fd: BorrowedFd<'_>) -> std::io::Result<Backing>;

    /// Answers a getxattr/listxattr of `size`: the size when asked for it, the data if it
    /// fits, else `ERANGE`.
    fn xattr(&mut self, size: u32, data: &[u8]) {
        if size == 0 {
            self.xattr_size(data.len() as u32);
        } else if data.len() > size as usize {
            self.error(libc::ERANGE);
        } else {
            self.data(data);
        }
    }
}

/// What serves requests: one `match` from [`Op`] to the filesystem's operations.
pub trait Handler: Send + Sync {
    /// Serves `op` and answers it through `answer` (exactly once).
    fn handle(&self, ctx: &Ctx, op: Op<'_>, answer: &mut dyn Answer);
    /// The kernel dropped `nlookup` references to node `ino` (no answer).
    fn forget(&self, ino: u64, nlookup: u64);
    /// Whether serving `op` may take long ([`Op::may_block`], and whatever else this handler
    /// knows of: a snapshot's copy of a file before its first change).
    fn may_block(&self, op: &Op<'_>) -> bool {
        op.may_block()
    }
}

/// Runs `f` so that a bug that panics answers `EIO` (through the caller, who sees no answer
/// given) and is logged, instead of taking a serving thread, and eventually the mount, down.
pub fn guarded(op: &str, f: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(op, "handler panicked: {msg}");
    }
}
