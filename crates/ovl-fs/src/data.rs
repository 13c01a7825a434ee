//! Operations on file contents and attributes: open, read, write, fsync, fallocate, lseek,
//! copy_file_range, setattr, readlink, statfs.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::SystemTime;

use ovl_core::sys;
use ovl_core::{Errno, Result};
use ovl_proto::{SetAttrIn, SetTime};
use rustix::fs::{AtFlags, FallocateFlags, Gid, Mode, OFlags, SeekFrom, Stat, Timespec, Timestamps, Uid};

use crate::fs::{OpenFile, OverlayFs};
use crate::inode::Node;

/// The flags we open a real file with, from the flags the caller opened the overlay file with:
/// access mode and status flags kept, creation flags dropped (handled by us), never following
/// a symlink, and no `O_APPEND` because the kernel already sends the offset to write at.
pub(crate) fn backing_flags(flags: i32) -> OFlags {
    let keep = libc::O_ACCMODE | libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME | libc::O_NONBLOCK;
    OFlags::from_bits_retain((flags & keep) as u32) | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// A setattr's time as `utimensat` takes it.
fn timespec(t: Option<SetTime>) -> Timespec {
    match t {
        None => Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT },
        Some(SetTime::Now) => Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW },
        Some(SetTime::At(t)) => match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => Timespec { tv_sec: d.as_secs() as _, tv_nsec: d.subsec_nanos() as _ },
            Err(e) => {
                let d = e.duration();
                let (s, ns) = if d.subsec_nanos() == 0 {
                    (-(d.as_secs() as i64), 0)
                } else {
                    (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos() as i64)
                };
                Timespec { tv_sec: s as _, tv_nsec: ns as _ }
            }
        },
    }
}

impl OverlayFs {
    /// Opens the real file of `node`, copying it up first when the open may write.
    pub(crate) fn do_open(&self, node: &Arc<Node>, flags: i32, kill_suidgid: bool) -> Result<u64> {
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        let _gate = if writes { self.gate_for(node) } else { None };
        if writes {
            self.hook_modify(node)?;
            self.ensure_upper(node)?;
        }
        // Judged before the open: a copy-up finishing in between then only makes the file
        // switch to the upper copy at its first use.
        let (on_lower, metacopy) = {
            let st = node.state.read();
            (!st.has_upper_data(), st.data.is_some())
        };
        let held = if metacopy { None } else { self.held_place(node) };
        let fd = match held {
            Some((dir, name)) => {
                let name = std::path::Path::new(std::ffi::OsStr::from_bytes(name.to_bytes()));
                sys::open_beneath(&*dir, name, backing_flags(flags), Mode::empty())?
            }
            None => match self.data_location(node) {
                Err(e) if e.errno() == Errno::NOENT && self.unlinked(node) => {
                    self.reopen_unlinked(node, backing_flags(flags))?
                }
                r => {
                    let (root, path) = r?;
                    sys::open_beneath(root, &path, backing_flags(flags), Mode::empty())?
                }
            },
        };
        if flags & libc::O_TRUNC != 0 {
            rustix::fs::ftruncate(&fd, 0)?;
            if kill_suidgid {
                self.kill_suidgid(node, &fd)?;
            }
        }
        Ok(self.add_file(node, flags, File::from(fd), on_lower))
    }

    /// Clears the set-UID bit, and the set-GID bit of a group-executable file, of the file open
    /// as `file`, as the kernel does when a caller without `CAP_FSETID` writes or truncates it
    /// (with `FUSE_HANDLE_KILLPRIV_V2` negotiated that is ours to do). The kernel keeps the mode
    /// it cached, so it is told to drop it. (`security.capability` needs nothing: the daemon's
    /// own write removes it from the real file.)
    pub(crate) fn kill_suidgid(&self, node: &Node, file: &impl AsFd) -> Result<()> {
        let mode = rustix::fs::fstat(file)?.st_mode;
        let mut kill = libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            kill |= libc::S_ISGID;
        }
        if mode & kill != 0 {
            rustix::fs::fchmod(file, Mode::from_raw_mode(mode & 0o7777 & !kill))?;
            self.forget_attrs(&[node.id]);
        }
        Ok(())
    }

    /// Enters the change gate for a change of the file open as `fh` and tells the hook.
    fn gate_handle(&self, fh: u64, ino: u64) -> Result<Option<crate::hook::GateGuard<'_>>> {
        if self.hook.is_none() {
            return Ok(None);
        }
        let of = self.handles.get(fh, ino)?;
        // Told already in this generation (most writes): the gate alone, no path needed.
        let gate = self.gate_for(&of.node);
        let hooked = of.node.hooked.load(std::sync::atomic::Ordering::Acquire);
        if self.hook.as_deref().is_some_and(|h| hooked == h.generation()) {
            return Ok(gate);
        }
        drop(gate);
        // The hook is told the node's path: held as a request holds it, before the gate.
        let _held = self.hold_again(&of.node);
        let gate = self.gate_for(&of.node);
        self.hook_modify(&of.node)?;
        Ok(gate)
    }

    pub(crate) fn add_file(&self, node: &Arc<Node>, flags: i32, file: File, on_lower: bool) -> u64 {
        let fh = self.handles.next_id();
        let of = OpenFile {
            node: node.clone(),
            flags,
            file: parking_lot::RwLock::new(Arc::new(file)),
            on_lower: std::sync::atomic::AtomicBool::new(on_lower),
        };
        self.handles.files.write().insert(fh, Arc::new(of));
        fh
    }

    pub(crate) fn do_read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; size as usize];
        let done = self.read_into(ino, fh, offset, &mut buf)?;
        buf.truncate(done);
        Ok(buf)
    }

    /// Reads into `buf` from `offset` until it is full or the file ends; the bytes read.
    pub(crate) fn read_into(&self, ino: u64, fh: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let f = self.file(fh, ino)?;
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(done)
    }

    pub(crate) fn do_write(&self, ino: u64, fh: u64, offset: u64, data: &[u8], kill_suidgid: bool) -> Result<u32> {
        let _gate = self.gate_handle(fh, ino)?;
        let f = self.file(fh, ino)?;
        if kill_suidgid {
            let node = self.handles.get(fh, ino)?.node.clone();
            self.kill_suidgid(&node, &*f)?;
        }
        f.write_all_at(data, offset)?;
        Ok(data.len() as u32)
    }

    pub(crate) fn do_fsync(&self, ino: u64, fh: u64, datasync: bool) -> Result<()> {
        let f = self.file(fh, ino)?;
        if datasync {
            rustix::fs::fdatasync(&f)?
        } else {
            rustix::fs::fsync(&f)?
        }
        Ok(())
    }

    pub(crate) fn do_release(&self, fh: u64) {
        self.handles.files.write().remove(&fh);
    }

    pub(crate) fn do_fallocate(&self, ino: u64, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let _gate = self.gate_handle(fh, ino)?;
        let f = self.file(fh, ino)?;
        rustix::fs::fallocate(&f, FallocateFlags::from_bits_retain(mode as _), offset, length)?;
        Ok(())
    }

    pub(crate) fn do_lseek(&self, ino: u64, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        let f = self.file(fh, ino)?;
        let pos = match whence {
            libc::SEEK_SET => SeekFrom::Start(offset as u64),
            libc::SEEK_CUR => SeekFrom::Current(offset),
            libc::SEEK_END => SeekFrom::End(offset),
            libc::SEEK_DATA => SeekFrom::Data(offset as u64),
            libc::SEEK_HOLE => SeekFrom::Hole(offset as u64),
            _ => return Err(Errno::INVAL.into()),
        };
        Ok(rustix::fs::seek(&f, pos)? as i64)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn do_copy_file_range(
        &self,
        ino_in: u64,
        fh_in: u64,
        off_in: u64,
        ino_out: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<u32> {
        let _gate = self.gate_handle(fh_out, ino_out)?;
        let fin = self.file(fh_in, ino_in)?;
        let fout = self.file(fh_out, ino_out)?;
        let (mut i, mut o) = (off_in, off_out);
        let n = rustix::fs::copy_file_range(
            &*fin,
            Some(&mut i),
            &*fout,
            Some(&mut o),
            len.min(u32::MAX as u64 / 2) as usize,
        )?;
        Ok(n as u32)
    }

    /// Applies a setattr: copy-up first (attributes of a lower object never change), then each
    /// change on the upper object. Returns the new `lstat`. `kill_suidgid`: clear the set-ID bits
    /// after truncating (`FUSE_HANDLE_KILLPRIV_V2`).
    pub(crate) fn do_setattr(&self, node: &Arc<Node>, a: &SetAttrIn, kill_suidgid: bool) -> Result<Stat> {
        let _gate = self.gate_for(node);
        self.hook_modify(node)?;
        if self.unlinked(node) && !node.is_dir() {
            return self.setattr_unlinked(node, a, kill_suidgid);
        }
        if a.size.is_some() {
            self.ensure_upper(node)?;
        } else {
            self.ensure_upper_meta(node)?;
        }
        self.stack.writable_upper().ok_or(Errno::ROFS)?;
        // The upper object (an indexed file's index entry).
        let (root, path) = self.real_location(node)?;
        let root = root.as_fd();
        let (dir, name) = match self.held_place(node) {
            Some((d, n)) => (d, Some(n)),
            None if path.as_os_str().is_empty() => (Arc::new(rustix::io::dup(root)?), None),
            None => {
                let (d, n) = sys::open_parent(root, &path)?;
                (Arc::new(d), Some(n))
            }
        };
        let name_ref = name.as_deref().unwrap_or(c"");
        let at = if name.is_some() { AtFlags::SYMLINK_NOFOLLOW } else { AtFlags::EMPTY_PATH };
        // `chown(f, -1, -1)` reaches us as a SETATTR with nothing in it (only the kernel's ctime):
        // it still kills set-ID bits and capabilities, for root too, which with
        // `FUSE_HANDLE_KILLPRIV_V2` is ours to do. The upper fs's own chown does exactly that.
        let bare_chown = a.mode.is_none()
            && a.uid.is_none()
            && a.gid.is_none()
            && a.size.is_none()
            && a.atime.is_none()
            && a.mtime.is_none();
        // Owners the caller writes are shifted to stored IDs; where the layer keeps owner and mode
        // in an override xattr (`xattr_permissions=`), they go there and the inode keeps its own.
        let uid = a.uid.map(|u| self.stored_owner(u, 0).0);
        let gid = a.gid.map(|g| self.stored_owner(0, g).1);
        let recorded = self.set_recorded(node, (dir.as_fd(), name.as_deref()), uid, gid, a.mode)?;
        if !recorded && (uid.is_some() || gid.is_some() || bare_chown) {
            match rustix::fs::chownat(&dir, name_ref, uid.map(Uid::from_raw), gid.map(Gid::from_raw), at) {
                Err(e) if self.chown_may_fail() && !bare_chown => {
                    tracing::debug!("chown failed, ignored under a squash option: {e}");
                }
                r => r?,
            }
        }
        if let Some(mode) = a.mode.filter(|_| !recorded) {
            if node.kind != rustix::fs::FileType::Symlink {
                match &name {
                    Some(n) => rustix::fs::chmodat(&dir, n, Mode::from_raw_mode(mode & 0o7777), AtFlags::empty())?,
                    None => rustix::fs::fchmod(root, Mode::from_raw_mode(mode & 0o7777))?,
                }
            }
        }
        if let Some(size) = a.size {
            match a.fh.and_then(|fh| self.file(fh, node.id).ok()) {
                Some(f) => {
                    rustix::fs::ftruncate(&f, size)?;
                    if kill_suidgid {
                        self.kill_suidgid(node, &*f)?;
                    }
                }
                None => {
                    let fd = sys::open_beneath(root, &path, OFlags::WRONLY, Mode::empty())?;
                    rustix::fs::ftruncate(&fd, size)?;
                    if kill_suidgid {
                        self.kill_suidgid(node, &fd)?;
                    }
                }
            }
        }
        if a.atime.is_some() || a.mtime.is_some() {
            let times = Timestamps { last_access: timespec(a.atime), last_modification: timespec(a.mtime) };
            match &name {
                Some(n) => rustix::fs::utimensat(&dir, n, &times, AtFlags::SYMLINK_NOFOLLOW)?,
                None => sys::set_times(root.as_fd(), &times)?,
            }
        }
        self.real_stat(node)
    }

    /// Opens again, with `flags`, an open file whose names were all removed (`open` of
    /// `/proc/PID/fd/N`), through our own descriptor's magic link.
    fn reopen_unlinked(&self, node: &Node, flags: OFlags) -> Result<std::os::fd::OwnedFd> {
        let of = self.open_file_of(node).ok_or(Errno::NOENT)?;
        let magic = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&**of.file.read()));
        // The magic link must be followed; there is nothing to create.
        let flags = (flags | OFlags::CLOEXEC) - OFlags::NOFOLLOW - OFlags::CREATE - OFlags::EXCL;
        Ok(rustix::fs::open(magic, flags, Mode::empty())?)
    }

    /// `do_setattr` for an open file whose names were all removed (`fchmod` after `unlink`):
    /// the change goes to the real file through its open descriptor, as the kernel overlay
    /// changes its upper inode. A file still in a lower layer would need a copy-up to a name a
    /// whiteout now holds: the kernel fails that with `EEXIST`, and so do we.
    fn setattr_unlinked(&self, node: &Arc<Node>, a: &SetAttrIn, kill_suidgid: bool) -> Result<Stat> {
        let of = self.open_file_of(node).ok_or(Errno::NOENT)?;
        if of.on_lower.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Errno::EXIST.into());
        }
        let file = of.file.read().clone();
        let uid = a.uid.map(|u| self.stored_owner(u, 0).0);
        let gid = a.gid.map(|g| self.stored_owner(0, g).1);
        let recorded = self.set_recorded(node, (file.as_fd(), None), uid, gid, a.mode)?;
        let bare_chown = [a.mode, a.uid, a.gid].iter().all(Option::is_none)
            && a.size.is_none()
            && a.atime.is_none()
            && a.mtime.is_none();
        if !recorded && (uid.is_some() || gid.is_some() || bare_chown) {
            match rustix::fs::fchown(&*file, uid.map(Uid::from_raw), gid.map(Gid::from_raw)) {
                Err(e) if self.chown_may_fail() && !bare_chown => {
                    tracing::debug!("chown failed, ignored under a squash option: {e}");
                }
                r => r?,
            }
        }
        if let Some(mode) = a.mode.filter(|_| !recorded) {
            rustix::fs::fchmod(&*file, Mode::from_raw_mode(mode & 0o7777))?;
        }
        if let Some(size) = a.size {
            // The handle may be read-only (`truncate /proc/PID/fd/N`): open the file again
            // for writing through our own descriptor's magic link.
            let writable = a.fh.and_then(|fh| self.handles.get(fh, node.id).ok());
            let fd = match writable.filter(|o| o.flags & libc::O_ACCMODE != libc::O_RDONLY) {
                Some(o) => o.file.read().clone(),
                None => Arc::new(File::from(self.reopen_unlinked(node, OFlags::WRONLY | OFlags::CLOEXEC)?)),
            };
            rustix::fs::ftruncate(&*fd, size)?;
            if kill_suidgid {
                self.kill_suidgid(node, &*fd)?;
            }
        }
        if a.atime.is_some() || a.mtime.is_some() {
            let times = Timestamps { last_access: timespec(a.atime), last_modification: timespec(a.mtime) };
            rustix::fs::futimens(&*file, &times)?;
        }
        self.real_stat(node)
    }

    pub(crate) fn do_readlink(&self, node: &Node) -> Result<Vec<u8>> {
        let (dir, name) = match self.held_place(node) {
            Some(held) => held,
            None => {
                let (root, path) = self.real_location(node)?;
                let root = root.as_fd();
                let (d, n) = sys::open_parent(root, &path)?;
                (Arc::new(d), n)
            }
        };
        Ok(rustix::fs::readlinkat(&dir, &name, Vec::new())?.into_bytes())
    }

    pub(crate) fn do_statfs(&self) -> Result<rustix::fs::StatVfs> {
        let root = match self.stack.upper() {
            Some(u) => u.layer().root()?,
            None => self.stack.lowers()[0].root()?,
        };
        let fd =
            sys::open_beneath(&*root, std::path::Path::new(""), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
        Ok(rustix::fs::fstatvfs(&fd)?)
    }
}

impl OverlayFs {
    pub(crate) fn do_fsyncdir(&self, node: &Node) -> Result<()> {
        let (root, path) = self.real_location(node)?;
        let root = root.as_fd();
        let fd = sys::open_beneath(root, &path, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
        rustix::fs::fsync(&fd)?;
        Ok(())
    }
}
