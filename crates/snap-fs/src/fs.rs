//! The FUSE filesystem of a snapshot mount: the live overlay (LIVE as the only, upper, layer,
//! with the snapshot hook) plus `.snapshots` and the views. Requests are routed by node id:
//! view ids live in `[VIEW_BASE, 1 << 63)`, everything else is the live overlay's.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno as FuseErrno, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use ovl_fs::{OverlayFs, guarded, xattr_reply};

use crate::view::{SNAPDIR, SNAPDIR_NAME, VIEW_BASE, Views};

const TTL: Duration = Duration::from_secs(1);

fn is_view(id: INodeNo) -> bool {
    (VIEW_BASE..1 << 63).contains(&id.0)
}

/// How long the kernel may keep a view name without asking again. A non-directory's node is its
/// object (`VIEW_BASE | ino`, issue 16.4), and the CoW rules move a view name to a saved copy (a
/// new node) when LIVE changes: the kernel must look the name up again each time, or it keeps
/// showing LIVE's changed object under it. Directories are named by path and keep the TTL.
fn view_entry_ttl(attr: &fuser::FileAttr) -> Duration {
    if attr.kind == fuser::FileType::Directory { TTL } else { Duration::ZERO }
}

fn errno(e: ovl_core::Error) -> FuseErrno {
    let code = e.errno().raw_os_error();
    if code == libc::EIO {
        tracing::warn!("snapshot view: {e}");
    }
    FuseErrno::from_i32(code)
}

fn erofs() -> FuseErrno {
    FuseErrno::from_i32(libc::EROFS)
}

macro_rules! tri {
    ($reply:ident, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $reply.error(errno(e)),
        }
    };
}

/// The filesystem served on a snapshot mount.
pub struct SnapFs {
    live: OverlayFs,
    views: Arc<Views>,
}

impl SnapFs {
    /// The live overlay `live` (built with the snapshot hook) and the views.
    /// The live overlay's notifier slot (see `OverlayFs::notifier_slot`).
    pub(crate) fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.live.notifier_slot()
    }

    pub(crate) fn new(live: OverlayFs, views: Arc<Views>) -> Self {
        Self { live, views }
    }
}

/// Answers `EROFS` for a change aimed at a view.
macro_rules! refuse_in_view {
    ($ino:expr, $reply:ident) => {
        if is_view($ino) {
            return $reply.error(erofs());
        }
    };
}

impl Filesystem for SnapFs {
    fn init(&mut self, req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.live.init(req, config)
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1 && name == SNAPDIR_NAME {
            return reply.entry(&TTL, &self.views.snapdir_attr(), Generation(0));
        }
        if is_view(parent) {
            return guarded("lookup", || {
                let attr = tri!(reply, self.views.lookup(parent.0, name));
                reply.entry_with_ttls(&TTL, &view_entry_ttl(&attr), &attr, Generation(0));
            });
        }
        self.live.lookup(req, parent, name, reply)
    }

    fn forget(&self, req: &Request, ino: INodeNo, nlookup: u64) {
        if ino.0 == SNAPDIR {
            return;
        }
        if is_view(ino) {
            return self.views.forget(ino.0, nlookup);
        }
        self.live.forget(req, ino, nlookup)
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if is_view(ino) {
            return guarded("getattr", || {
                let attr = tri!(reply, self.views.getattr(ino.0));
                reply.attr(&TTL, &attr);
            });
        }
        self.live.getattr(req, ino, fh, reply)
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
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        crtime: Option<SystemTime>,
        chgtime: Option<SystemTime>,
        bkuptime: Option<SystemTime>,
        flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        refuse_in_view!(ino, reply);
        self.live
            .setattr(req, ino, mode, uid, gid, size, atime, mtime, ctime, fh, crtime, chgtime, bkuptime, flags, reply)
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        if is_view(ino) {
            return guarded("readlink", || {
                let v = tri!(reply, self.views.readlink(ino.0));
                reply.data(&v);
            });
        }
        self.live.readlink(req, ino, reply)
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        refuse_in_view!(parent, reply);
        self.live.mknod(req, parent, name, mode, umask, rdev, reply)
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        refuse_in_view!(parent, reply);
        self.live.mkdir(req, parent, name, mode, umask, reply)
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        refuse_in_view!(parent, reply);
        self.live.unlink(req, parent, name, reply)
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        refuse_in_view!(parent, reply);
        self.live.rmdir(req, parent, name, reply)
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        refuse_in_view!(parent, reply);
        self.live.symlink(req, parent, link_name, target, reply)
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
        if is_view(parent) || is_view(newparent) {
            // Between a view and the live tree it is another filesystem for `mv`.
            let e = if is_view(parent) && is_view(newparent) { libc::EROFS } else { libc::EXDEV };
            return reply.error(FuseErrno::from_i32(e));
        }
        self.live.rename(req, parent, name, newparent, newname, flags, reply)
    }

    fn link(&self, req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        if is_view(ino) || is_view(newparent) {
            let e = if is_view(newparent) { libc::EROFS } else { libc::EXDEV };
            return reply.error(FuseErrno::from_i32(e));
        }
        self.live.link(req, ino, newparent, newname, reply)
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if is_view(ino) {
            return guarded("open", || {
                let (fh, keep) = tri!(reply, self.views.open(ino.0, flags.0));
                let cache = if keep { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
                reply.opened(FileHandle(fh), cache | FopenFlags::FOPEN_NOFLUSH);
            });
        }
        self.live.open(req, ino, flags, reply)
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if is_view(ino) {
            return guarded("read", || {
                let v = tri!(reply, self.views.read(fh.0, offset, size));
                reply.data(&v);
            });
        }
        self.live.read(req, ino, fh, offset, size, flags, lock_owner, reply)
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        refuse_in_view!(ino, reply);
        self.live.write(req, ino, fh, offset, data, write_flags, flags, lock_owner, reply)
    }

    fn flush(&self, req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        if is_view(ino) {
            return reply.ok();
        }
        self.live.flush(req, ino, fh, lock_owner, reply)
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        flush: bool,
        reply: ReplyEmpty,
    ) {
        if is_view(ino) {
            self.views.release(fh.0);
            return reply.ok();
        }
        self.live.release(req, ino, fh, flags, lock_owner, flush, reply)
    }

    fn fsync(&self, req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        if is_view(ino) {
            return reply.ok();
        }
        self.live.fsync(req, ino, fh, datasync, reply)
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if is_view(ino) {
            return guarded("opendir", || {
                let fh = tri!(reply, self.views.opendir(ino.0));
                // `.snapshots` changes with every take; a view never changes.
                let f = if ino.0 == SNAPDIR {
                    FopenFlags::empty()
                } else {
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR
                };
                reply.opened(FileHandle(fh), f);
            });
        }
        self.live.opendir(req, ino, flags, reply)
    }

    fn readdir(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if is_view(ino) {
            return guarded("readdir", || {
                let list = tri!(reply, self.views.listing(fh.0));
                for (i, (name, kind, child)) in list.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*child), i as u64 + 1, *kind, name) {
                        break;
                    }
                }
                reply.ok();
            });
        }
        self.live.readdir(req, ino, fh, offset, reply)
    }

    fn readdirplus(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        if is_view(ino) {
            return guarded("readdirplus", || {
                let list = tri!(reply, self.views.listing(fh.0));
                let self_attr = tri!(reply, self.views.getattr(ino.0));
                for (i, (name, kind, child)) in list.iter().enumerate().skip(offset as usize) {
                    let off = i as u64 + 1;
                    let looked = if name == "." || name == ".." { None } else { self.views.lookup(ino.0, name).ok() };
                    let full = match looked {
                        Some(attr) => {
                            let full = reply.add(attr.ino, off, name, &view_entry_ttl(&attr), &attr, Generation(0));
                            if full {
                                self.views.forget(attr.ino.0, 1);
                            }
                            full
                        }
                        None => {
                            let mut attr = self_attr;
                            attr.ino = INodeNo(*child);
                            attr.kind = *kind;
                            let ttl = if name == "." || name == ".." { TTL } else { Duration::ZERO };
                            reply.add(INodeNo(*child), off, name, &ttl, &attr, Generation(0))
                        }
                    };
                    if full {
                        break;
                    }
                }
                reply.ok();
            });
        }
        self.live.readdirplus(req, ino, fh, offset, reply)
    }

    fn releasedir(&self, req: &Request, ino: INodeNo, fh: FileHandle, flags: OpenFlags, reply: ReplyEmpty) {
        if is_view(ino) {
            self.views.releasedir(fh.0);
            return reply.ok();
        }
        self.live.releasedir(req, ino, fh, flags, reply)
    }

    fn fsyncdir(&self, req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        if is_view(ino) {
            return reply.ok();
        }
        self.live.fsyncdir(req, ino, fh, datasync, reply)
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        self.live.statfs(req, ino, reply)
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        refuse_in_view!(ino, reply);
        self.live.setxattr(req, ino, name, value, flags, position, reply)
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if is_view(ino) {
            return guarded("getxattr", || {
                if ino.0 == SNAPDIR {
                    return reply.error(FuseErrno::from_i32(libc::ENODATA));
                }
                let v = tri!(reply, self.views.getxattr(ino.0, name));
                xattr_reply(reply, size, v);
            });
        }
        self.live.getxattr(req, ino, name, size, reply)
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if is_view(ino) {
            return guarded("listxattr", || {
                let v = if ino.0 == SNAPDIR { Vec::new() } else { tri!(reply, self.views.listxattr(ino.0)) };
                xattr_reply(reply, size, v);
            });
        }
        self.live.listxattr(req, ino, size, reply)
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        refuse_in_view!(ino, reply);
        self.live.removexattr(req, ino, name, reply)
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if is_view(ino) {
            if mask.contains(AccessFlags::W_OK) {
                return reply.error(erofs());
            }
            return reply.ok();
        }
        self.live.access(req, ino, mask, reply)
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
        refuse_in_view!(parent, reply);
        self.live.create(req, parent, name, mode, umask, flags, reply)
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
        refuse_in_view!(ino, reply);
        self.live.fallocate(req, ino, fh, offset, length, mode, reply)
    }

    fn lseek(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        if is_view(ino) {
            return reply.error(FuseErrno::from_i32(libc::ENOSYS));
        }
        self.live.lseek(req, ino, fh, offset, whence, reply)
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
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        if is_view(ino_in) || is_view(ino_out) {
            // The kernel falls back to read + write.
            return reply.error(FuseErrno::from_i32(libc::EXDEV));
        }
        self.live.copy_file_range(req, ino_in, fh_in, offset_in, ino_out, fh_out, offset_out, len, flags, reply)
    }
}
