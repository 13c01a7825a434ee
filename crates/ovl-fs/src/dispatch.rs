//! The one place where a request becomes an `OverlayFs` operation: each arm of
//! [`Handler::handle`] calls the operation and answers once, mapping an error to its errno.
//! Both transports come here (fuser's `/dev/fuse` loop through `glue`, the io_uring rings
//! through `ovl_uring`), so they cannot serve a request differently. No logic lives here.

use fuser::INodeNo;
use ovl_core::Error;
use ovl_proto::{Answer, Ctx, Handler, Op, guarded};

use crate::copyup::Need;
use crate::fs::OverlayFs;
use crate::passthrough::IoMode;

/// The errno an answer carries for `e`; unexpected errors are logged.
pub fn errno(e: Error) -> i32 {
    let code = e.errno().raw_os_error();
    if code == libc::EIO {
        tracing::warn!("{e}");
    } else {
        tracing::debug!("{e}");
    }
    code
}

macro_rules! tri {
    ($answer:ident, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return $answer.error(errno(e)),
        }
    };
}

impl crate::glue::Served for OverlayFs {
    fn init(&mut self, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        use fuser::InitFlags;
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
}

impl Handler for OverlayFs {
    fn handle(&self, ctx: &Ctx, op: Op<'_>, answer: &mut dyn Answer) {
        let name = op.name();
        guarded(name, || self.serve(ctx, op, answer));
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        self.table.forget(ino, nlookup);
    }
}

impl OverlayFs {
    /// Answers an entry for `node` (attributes `st`; see `OverlayFs::entry_attr`).
    fn answer_entry(&self, a: &mut dyn Answer, node: &crate::inode::Node, st: &rustix::fs::Stat) {
        let (attr, attr_ttl) = self.entry_attr(node, st, a.carries_ino_apart());
        a.entry(node.id, self.ttl, attr_ttl, &attr);
    }

    fn serve(&self, ctx: &Ctx, op: Op<'_>, a: &mut dyn Answer) {
        match op {
            Op::Lookup { parent, name } => {
                let (_held, p) = tri!(a, self.hold(INodeNo(parent)));
                match self.do_lookup(&p, name) {
                    Ok((node, st)) => self.answer_entry(a, &node, &st),
                    Err(e) if e.errno() == ovl_core::Errno::NOENT && !self.negative_ttl.is_zero() => {
                        a.entry(0, self.negative_ttl, self.negative_ttl, &self.missing_attr())
                    }
                    Err(e) => a.error(errno(e)),
                }
            }
            Op::Getattr { ino, fh } => {
                let (_held, node) = tri!(a, self.hold(INodeNo(ino)));
                let st = match fh.and_then(|fh| self.file(fh, ino).ok()) {
                    Some(f) => tri!(a, rustix::fs::fstat(&*f).map_err(Error::from)),
                    None => tri!(a, self.real_stat(&node)),
                };
                a.attr(self.ttl, &self.stat_attr(&node, &st));
            }
            Op::Setattr { ino, set } => {
                self.prepare_change(INodeNo(ino));
                let need = if set.size.is_some() { Need::Data } else { Need::Meta };
                let _staged = self.stage_copy_up(INodeNo(ino), need);
                let (_held, node) = tri!(a, self.hold(INodeNo(ino)));
                // fuser does not pass FATTR_KILL_SUIDGID (sent for a truncate by a caller
                // without CAP_FSETID): there root stands for CAP_FSETID.
                let kill = set.kill_suidgid.unwrap_or(ctx.uid != 0);
                let kill_suidgid = self.killpriv && set.size.is_some() && kill;
                let st = tri!(a, self.do_setattr(&node, &set, kill_suidgid));
                a.attr(self.ttl, &self.stat_attr(&node, &st));
            }
            Op::Readlink { ino } => {
                let (_held, node) = tri!(a, self.hold(INodeNo(ino)));
                a.data(&tri!(a, self.do_readlink(&node)));
            }
            Op::Mknod { parent, name, mode, umask, rdev } => {
                let (_held, p) = tri!(a, self.hold(INodeNo(parent)));
                let (node, st) = tri!(a, self.do_mknod(&p, name, mode, rdev, (ctx.uid, ctx.gid, umask)));
                self.answer_entry(a, &node, &st);
            }
            Op::Mkdir { parent, name, mode, umask } => {
                let (_held, p) = tri!(a, self.hold(INodeNo(parent)));
                let (node, st) = tri!(a, self.do_mkdir(&p, name, mode, (ctx.uid, ctx.gid, umask)));
                self.answer_entry(a, &node, &st);
            }
            Op::Unlink { parent, name } => {
                self.prepare_change_at(INodeNo(parent), name, true);
                tri!(a, self.remove(INodeNo(parent), name, false));
                a.ok();
            }
            Op::Rmdir { parent, name } => {
                tri!(a, self.remove(INodeNo(parent), name, true));
                a.ok();
            }
            Op::Symlink { parent, name, target } => {
                let (_held, p) = tri!(a, self.hold(INodeNo(parent)));
                let (node, st) = tri!(a, self.do_symlink(&p, name, target, ctx.uid, ctx.gid));
                self.answer_entry(a, &node, &st);
            }
            Op::Rename { parent, name, newparent, newname, flags } => {
                let (parent, newparent) = (INodeNo(parent), INodeNo(newparent));
                let flags = rustix::fs::RenameFlags::from_bits_retain(flags);
                self.prepare_change_at(parent, name, false);
                if flags.contains(rustix::fs::RenameFlags::EXCHANGE) {
                    self.prepare_change_at(newparent, newname, false);
                }
                let _staged = self.stage_rename_source((parent, name), (newparent, newname), flags);
                let (p, np) = (tri!(a, self.node(parent)), tri!(a, self.node(newparent)));
                // Both parents' paths, and the renamed nodes' names (see `OverlayFs::hold_paths`).
                let (held, found) = self.hold_change((&p, name), (&np, newname));
                let r = self.do_rename(&p, name, &np, newname, flags, found);
                drop(held);
                if r.is_err() {
                    self.forget_attrs(&[p.id, np.id]);
                }
                tri!(a, r);
                a.ok();
            }
            Op::Link { ino, newparent, newname } => {
                self.prepare_change(INodeNo(ino));
                let _staged = self.stage_copy_up(INodeNo(ino), Need::Data);
                let (node, np) = (tri!(a, self.node(INodeNo(ino))), tri!(a, self.node(INodeNo(newparent))));
                // The file's path (copy-up, the hook) and the new parent's.
                let _held = self.hold_nodes(&[&node, &np]);
                let st = tri!(a, self.do_link(&node, &np, newname));
                self.table.add_lookup(&node);
                self.answer_entry(a, &node, &st);
            }
            Op::Open { ino, flags, kill_suidgid } => {
                let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
                let _staged = writes.then(|| {
                    self.prepare_change(INodeNo(ino));
                    self.stage_copy_up(INodeNo(ino), Need::Data)
                });
                let (_held, node) = tri!(a, self.hold(INodeNo(ino)));
                // As for truncate: where the transport does not pass FUSE_OPEN_KILL_SUIDGID,
                // root stands for CAP_FSETID.
                let kill = self.killpriv && flags & libc::O_TRUNC != 0 && kill_suidgid.unwrap_or(ctx.uid != 0);
                let fh = tri!(a, self.do_open(&node, flags, kill));
                // Every change reaches the files through this mount, so the kernel's page cache
                // of an inode stays right across opens (and across a copy-up, which keeps
                // contents). Our flush does nothing, so the kernel need not send it. A
                // passthrough open must not keep the cache (the kernel refuses it).
                use ovl_proto::fopen::{KEEP_CACHE, NOFLUSH};
                match self.passthrough_open(&node, fh, |fd| a.open_backing(fd)) {
                    IoMode::Passthrough(id) => a.opened(fh, NOFLUSH, Some(&id)),
                    IoMode::Cached => a.opened(fh, KEEP_CACHE | NOFLUSH, None),
                }
            }
            // Straight into the transport's buffer where it has one (the rings).
            Op::Read { ino, fh, offset, size } => match a.data_buffer(size as usize) {
                Some(buf) => {
                    let n = tri!(a, self.read_into(ino, fh, offset, buf));
                    a.data_filled(n);
                }
                None => a.data(&tri!(a, self.do_read(ino, fh, offset, size))),
            },
            Op::Write { ino, fh, offset, data, kill_suidgid } => {
                self.prepare_change(INodeNo(ino));
                a.written(tri!(a, self.do_write(ino, fh, offset, data, kill_suidgid)));
            }
            Op::Flush { .. } => a.ok(),
            Op::Release { fh, .. } => {
                self.do_release(fh);
                self.passthrough_release(fh);
                a.ok();
            }
            Op::Fsync { ino, fh, datasync } => {
                tri!(a, self.do_fsync(ino, fh, datasync));
                a.ok();
            }
            Op::Opendir { ino } => {
                let (_held, node) = tri!(a, self.hold(INodeNo(ino)));
                let fh = tri!(a, self.do_opendir(&node));
                // Listings may be cached: the kernel drops the cache when an entry op changes
                // the dir.
                a.opened(fh, ovl_proto::fopen::KEEP_CACHE | ovl_proto::fopen::CACHE_DIR, None);
            }
            Op::Readdir { ino, fh, offset, plus, .. } => {
                let (_held, node) = tri!(a, self.hold(INodeNo(ino)));
                let r = if plus {
                    self.do_readdirplus(&node, fh, offset, a)
                } else {
                    self.do_readdir(&node, fh, offset, a)
                };
                match r {
                    Ok(()) => a.ok(),
                    Err(e) => a.error(errno(e)),
                }
            }
            Op::Releasedir { fh, .. } => {
                self.do_releasedir(fh);
                a.ok();
            }
            Op::Fsyncdir { ino, .. } => {
                let (_held, node) = tri!(a, self.hold(INodeNo(ino)));
                tri!(a, self.do_fsyncdir(&node));
                a.ok();
            }
            Op::Statfs { .. } => {
                let s = tri!(a, self.do_statfs());
                a.statfs(&ovl_proto::Statfs {
                    blocks: s.f_blocks,
                    bfree: s.f_bfree,
                    bavail: s.f_bavail,
                    files: s.f_files,
                    ffree: s.f_ffree,
                    bsize: s.f_bsize as u32,
                    namelen: self.namelen as u32,
                    frsize: s.f_frsize as u32,
                });
            }
            Op::Setxattr { ino, name, value, flags } => {
                self.prepare_change(INodeNo(ino));
                let _staged = self.stage_copy_up(INodeNo(ino), Need::Meta);
                let (_held, node) = tri!(a, self.hold(INodeNo(ino)));
                tri!(a, self.do_setxattr(&node, name, value, flags));
                a.ok();
            }
            Op::Getxattr { ino, name, size } => {
                let (_held, node) = tri!(a, self.hold(INodeNo(ino)));
                let v = tri!(a, self.do_getxattr(&node, name));
                a.xattr(size, &v);
            }
            Op::Listxattr { ino, size } => {
                let (_held, node) = tri!(a, self.hold(INodeNo(ino)));
                let v = tri!(a, self.do_listxattr(&node));
                a.xattr(size, &v);
            }
            Op::Removexattr { ino, name } => {
                self.prepare_change(INodeNo(ino));
                let _staged = self.stage_copy_up(INodeNo(ino), Need::Meta);
                let (_held, node) = tri!(a, self.hold(INodeNo(ino)));
                tri!(a, self.do_removexattr(&node, name));
                a.ok();
            }
            Op::Access { ino, mask } => {
                // (Only that the node is known.)
                tri!(a, self.node(INodeNo(ino)));
                if mask & libc::W_OK != 0 && self.stack.writable_upper().is_none() {
                    return a.error(libc::EROFS);
                }
                a.ok();
            }
            Op::Create { parent, name, mode, umask, flags } => {
                let (_held, p) = tri!(a, self.hold(INodeNo(parent)));
                let (node, st, fd) = tri!(a, self.do_create(&p, name, mode, flags, (ctx.uid, ctx.gid, umask)));
                let fh = self.add_file(&node, flags, std::fs::File::from(fd), false);
                // One time-to-live for the entry and its attributes here (`answer_entry`).
                let (attr, ttl) = self.entry_attr(&node, &st, a.carries_ino_apart());
                let ttl = ttl.min(self.ttl);
                let noflush = ovl_proto::fopen::NOFLUSH;
                match self.passthrough_open(&node, fh, |fd| a.open_backing(fd)) {
                    IoMode::Passthrough(id) => a.created(node.id, ttl, &attr, fh, noflush, Some(&id)),
                    IoMode::Cached => a.created(node.id, ttl, &attr, fh, noflush, None),
                }
            }
            Op::Fallocate { ino, fh, offset, length, mode } => {
                self.prepare_change(INodeNo(ino));
                tri!(a, self.do_fallocate(ino, fh, offset, length, mode));
                a.ok();
            }
            Op::Lseek { ino, fh, offset, whence } => a.offset(tri!(a, self.do_lseek(ino, fh, offset, whence))),
            Op::CopyFileRange { ino_in, fh_in, offset_in, ino_out, fh_out, offset_out, len } => {
                self.prepare_change(INodeNo(ino_out));
                let n = tri!(a, self.do_copy_file_range(ino_in, fh_in, offset_in, ino_out, fh_out, offset_out, len));
                a.written(n);
            }
        }
    }
}
