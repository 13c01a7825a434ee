//! The FUSE glue: each handler turns its arguments into a call of an `OverlayFs` operation and
//! replies once, mapping an error to its errno. No logic lives here.

use std::ffi::OsStr;
use std::path::Path;
use std::time::SystemTime;

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno as FuseErrno, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use ovl_core::Error;

use crate::copyup::Need;
use crate::data::SetAttr;
use crate::fs::OverlayFs;
use crate::passthrough::IoMode;

/// The errno a FUSE reply carries for `e`; unexpected errors are logged.
fn errno(e: Error) -> FuseErrno {
    let code = e.errno().raw_os_error();
    if code == libc::EIO {
        tracing::warn!("{e}");
    } else {
        tracing::debug!("{e}");
    }
    FuseErrno::from_i32(code)
}

/// Runs a handler so that a bug that panics answers `EIO` (the dropped reply does that) and is
/// logged, instead of taking a worker thread, and eventually the mount, down with it.
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

macro_rules! tri {
    ($reply:ident, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $reply.error(errno(e)),
        }
    };
}

/// Answers a getxattr/listxattr: the size when asked for it, the data if it fits, else ERANGE.
pub fn xattr_reply(reply: ReplyXattr, size: u32, data: Vec<u8>) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(FuseErrno::from_i32(libc::ERANGE));
    } else {
        reply.data(&data);
    }
}

impl Filesystem for OverlayFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let want = InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO;
        let _ = config.add_capabilities(want & config.capabilities());
        // Without it the kernel asks for `security.capability` before every write (one round
        // trip each); with it the daemon clears set-ID bits itself (`OverlayFs::kill_suidgid`).
        let killpriv = InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        self.killpriv = config.capabilities().contains(killpriv) && config.add_capabilities(killpriv).is_ok();
        // Without it the kernel checks the mode bits only: a named user's deny entry in an ACL
        // did not keep that user out, as it does through the kernel overlay. With it the kernel
        // enforces and caches ACLs, and leaves the umask to the daemon, which a parent's default
        // ACL replaces (`OverlayFs::new_owner`).
        let acl = InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK;
        self.posix_acl = config.capabilities().contains(acl) && config.add_capabilities(acl).is_ok();
        self.negotiate_passthrough(config);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guarded("lookup", || {
            let (_held, p) = tri!(reply, self.hold(parent));
            let (node, st) = match self.do_lookup(&p, name) {
                Ok(found) => found,
                Err(e) if e.errno() == ovl_core::Errno::NOENT && !self.negative_ttl.is_zero() => {
                    return reply.entry(&self.negative_ttl, &self.missing_attr(), Generation(0));
                }
                Err(e) => return reply.error(errno(e)),
            };
            reply.entry_with_ttls(&self.attr_ttl(&node), &self.ttl, &self.attr(&node, &st), Generation(0));
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.table.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        guarded("getattr", || {
            let (_held, node) = tri!(reply, self.hold(ino));
            let st = match fh.and_then(|fh| self.file(fh.0, ino.0).ok()) {
                Some(f) => tri!(reply, rustix::fs::fstat(&*f).map_err(Error::from)),
                None => tri!(reply, self.real_stat(&node)),
            };
            reply.attr(&self.ttl, &self.stat_attr(&node, &st));
        });
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
        guarded("setattr", || {
            self.prepare_change(ino);
            let _staged = self.stage_copy_up(ino, if size.is_some() { Need::Data } else { Need::Meta });
            let (_held, node) = tri!(reply, self.hold(ino));
            // fuser does not pass FATTR_KILL_SUIDGID (sent for a truncate by a caller without
            // CAP_FSETID): root stands for CAP_FSETID.
            let kill_suidgid = self.killpriv && size.is_some() && req.uid() != 0;
            let a = SetAttr { mode, uid, gid, size, atime, mtime, fh: fh.map(|f| f.0), kill_suidgid };
            let st = tri!(reply, self.do_setattr(&node, &a));
            reply.attr(&self.ttl, &self.stat_attr(&node, &st));
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        guarded("readlink", || {
            let (_held, node) = tri!(reply, self.hold(ino));
            let v = tri!(reply, self.do_readlink(&node));
            reply.data(&v);
        });
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        guarded("mknod", || {
            let (_held, p) = tri!(reply, self.hold(parent));
            let (node, st) = tri!(reply, self.do_mknod(&p, name, mode, rdev, (req.uid(), req.gid(), umask)));
            reply.entry_with_ttls(&self.attr_ttl(&node), &self.ttl, &self.attr(&node, &st), Generation(0));
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        guarded("mkdir", || {
            let (_held, p) = tri!(reply, self.hold(parent));
            let (node, st) = tri!(reply, self.do_mkdir(&p, name, mode, (req.uid(), req.gid(), umask)));
            reply.entry_with_ttls(&self.attr_ttl(&node), &self.ttl, &self.attr(&node, &st), Generation(0));
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("unlink", || {
            self.prepare_change_at(parent, name, true);
            tri!(reply, self.remove(parent, name, false));
            reply.ok();
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("rmdir", || {
            tri!(reply, self.remove(parent, name, true));
            reply.ok();
        });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        guarded("symlink", || {
            let (_held, p) = tri!(reply, self.hold(parent));
            let (node, st) = tri!(reply, self.do_symlink(&p, link_name, target, req.uid(), req.gid()));
            reply.entry_with_ttls(&self.attr_ttl(&node), &self.ttl, &self.attr(&node, &st), Generation(0));
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        guarded("rename", || {
            self.prepare_change_at(parent, name, false);
            if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                self.prepare_change_at(newparent, newname, false);
            }
            let flags = rustix::fs::RenameFlags::from_bits_retain(flags.bits());
            let _staged = self.stage_rename_source((parent, name), (newparent, newname), flags);
            let (p, np) = (tri!(reply, self.node(parent)), tri!(reply, self.node(newparent)));
            // Both parents' paths, and the renamed nodes' names (see `OverlayFs::hold_paths`).
            let held = self.hold_change((&p, name), Some((&np, newname)));
            let r = self.do_rename(&p, name, &np, newname, flags);
            drop(held);
            if r.is_err() {
                self.forget_attrs(&[p.id, np.id]);
            }
            tri!(reply, r);
            reply.ok();
        });
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        guarded("link", || {
            self.prepare_change(ino);
            let _staged = self.stage_copy_up(ino, Need::Data);
            let (node, np) = (tri!(reply, self.node(ino)), tri!(reply, self.node(newparent)));
            // The file's path (copy-up, the hook) and the new parent's.
            let _held = self.hold_nodes(&[&node, &np]);
            let st = tri!(reply, self.do_link(&node, &np, newname));
            self.table.add_lookup(&node);
            reply.entry_with_ttls(&self.attr_ttl(&node), &self.ttl, &self.attr(&node, &st), Generation(0));
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        guarded("open", || {
            let writes = flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
            let _staged = writes.then(|| {
                self.prepare_change(ino);
                self.stage_copy_up(ino, Need::Data)
            });
            let (_held, node) = tri!(reply, self.hold(ino));
            // As for truncate: FUSE_OPEN_KILL_SUIDGID is not passed by fuser; root stands for
            // CAP_FSETID.
            let kill = self.killpriv && flags.0 & libc::O_TRUNC != 0 && req.uid() != 0;
            let fh = tri!(reply, self.do_open(&node, flags.0, kill));
            // Every change reaches the files through this mount, so the kernel's page cache of
            // an inode stays right across opens (and across a copy-up, which keeps contents).
            // Our flush does nothing, so the kernel need not send it. A passthrough open must
            // not keep the cache (the kernel refuses it).
            match self.passthrough_open(&node, fh, |fd| reply.open_backing(fd)) {
                IoMode::Passthrough(id) => reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &id),
                IoMode::Cached => {
                    reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH)
                }
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        guarded("read", || {
            let v = tri!(reply, self.do_read(ino.0, fh.0, offset, size));
            reply.data(&v);
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        guarded("write", || {
            self.prepare_change(ino);
            let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
            let n = tri!(reply, self.do_write(ino.0, fh.0, offset, data, kill));
            reply.written(n);
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        guarded("flush", || {
            reply.ok();
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        guarded("release", || {
            self.do_release(fh.0);
            self.passthrough_release(fh.0);
            reply.ok();
        });
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        guarded("fsync", || {
            tri!(reply, self.do_fsync(ino.0, fh.0, datasync));
            reply.ok();
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        guarded("opendir", || {
            let (_held, node) = tri!(reply, self.hold(ino));
            let fh = tri!(reply, self.do_opendir(&node));
            // Listings may be cached: the kernel drops the cache when an entry op changes the dir.
            reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR);
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        guarded("readdir", || {
            let (_held, node) = match self.hold(ino) {
                Ok(n) => n,
                Err(e) => return reply.error(errno(e)),
            };
            match self.do_readdir(&node, fh.0, offset, reply) {
                Ok(r) => r.ok(),
                Err(e) => tracing::warn!("readdir: {e}"),
            }
        });
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectoryPlus) {
        guarded("readdirplus", || {
            let (_held, node) = match self.hold(ino) {
                Ok(n) => n,
                Err(e) => return reply.error(errno(e)),
            };
            match self.do_readdirplus(&node, fh.0, offset, reply) {
                Ok(r) => r.ok(),
                Err(e) => tracing::warn!("readdirplus: {e}"),
            }
        });
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        guarded("releasedir", || {
            self.do_releasedir(fh.0);
            reply.ok();
        });
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        guarded("fsyncdir", || {
            let (_held, node) = tri!(reply, self.hold(ino));
            tri!(reply, self.do_fsyncdir(&node));
            reply.ok();
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        guarded("statfs", || {
            let s = tri!(reply, self.do_statfs());
            reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                self.namelen as u32,
                s.f_frsize as u32,
            );
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        guarded("setxattr", || {
            self.prepare_change(ino);
            let _staged = self.stage_copy_up(ino, Need::Meta);
            let (_held, node) = tri!(reply, self.hold(ino));
            tri!(reply, self.do_setxattr(&node, name, value, flags));
            reply.ok();
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        guarded("getxattr", || {
            let (_held, node) = tri!(reply, self.hold(ino));
            let v = tri!(reply, self.do_getxattr(&node, name));
            xattr_reply(reply, size, v);
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        guarded("listxattr", || {
            let (_held, node) = tri!(reply, self.hold(ino));
            let v = tri!(reply, self.do_listxattr(&node));
            xattr_reply(reply, size, v);
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("removexattr", || {
            self.prepare_change(ino);
            let _staged = self.stage_copy_up(ino, Need::Meta);
            let (_held, node) = tri!(reply, self.hold(ino));
            tri!(reply, self.do_removexattr(&node, name));
            reply.ok();
        });
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        guarded("access", || {
            // (Only that the node is known.)
            tri!(reply, self.node(ino));
            if mask.contains(AccessFlags::W_OK) && self.stack.writable_upper().is_none() {
                return reply.error(FuseErrno::from_i32(libc::EROFS));
            }
            reply.ok();
        });
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
        guarded("create", || {
            let (_held, p) = tri!(reply, self.hold(parent));
            let (node, st, fd) = tri!(reply, self.do_create(&p, name, mode, flags, (req.uid(), req.gid(), umask)));
            let fh = self.add_file(&node, flags, std::fs::File::from(fd), false);
            let attr = self.attr(&node, &st);
            // One time-to-live for the entry and its attributes here: none for a node whose
            // number is not its id (`OverlayFs::attr_ttl`).
            let ttl = &self.attr_ttl(&node).min(self.ttl);
            let (fh, noflush) = (FileHandle(fh), FopenFlags::FOPEN_NOFLUSH);
            match self.passthrough_open(&node, fh.0, |fd| reply.open_backing(fd)) {
                IoMode::Passthrough(id) => reply.created_passthrough(ttl, &attr, Generation(0), fh, noflush, &id),
                IoMode::Cached => reply.created(ttl, &attr, Generation(0), fh, noflush),
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        guarded("fallocate", || {
            self.prepare_change(ino);
            tri!(reply, self.do_fallocate(ino.0, fh.0, offset, length, mode));
            reply.ok();
        });
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        guarded("lseek", || {
            let o = tri!(reply, self.do_lseek(ino.0, fh.0, offset, whence));
            reply.offset(o);
        });
    }

    fn copy_file_range(
        &self,
        _req: &Request,
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
        guarded("copy_file_range", || {
            self.prepare_change(ino_out);
            let n = tri!(
                reply,
                self.do_copy_file_range(ino_in.0, fh_in.0, offset_in, ino_out.0, fh_out.0, offset_out, len)
            );
            reply.written(n);
        });
    }
}
