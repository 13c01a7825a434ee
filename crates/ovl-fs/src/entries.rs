//! Operations on names: lookup, creating objects, unlink, rmdir, rename, link.

use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use ovl_core::sys;
use ovl_core::{Errno, Result, is_whiteout_stat};
use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, RenameFlags, Stat, Uid};

use ovl_copyup::UpperDir;

use crate::fs::OverlayFs;
use crate::inode::{Node, NodeState};

/// Who makes a new object: uid, gid, and the umask the kernel passed (applied by the daemon
/// when `FUSE_DONT_MASK` was negotiated, see [`OverlayFs::new_owner`]).
pub(crate) type Caller = (u32, u32, u32);

/// Who owns a new object, with which mode and inherited ACLs, as the kernel would decide for the
/// caller.
#[derive(Debug, Clone)]
pub(crate) struct NewOwner {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    /// `system.posix_acl_access` to store, inherited from the parent's default ACL.
    pub acl: Option<Vec<u8>>,
    /// `system.posix_acl_default` to store (a new directory inherits its parent's).
    pub default_acl: Option<Vec<u8>>,
    /// Owner and mode go into this xattr instead of the inode (`xattr_permissions=`).
    pub record: Option<ovl_core::statoverride::OverrideXattr>,
    /// A failed `chown` is not an error (squash options: see `OverlayFs::chown_may_fail`).
    pub chown_may_fail: bool,
    /// The group is the parent's (a set-group-ID parent), as the filesystem gives it.
    gid_from_parent: bool,
    /// The parent is known to have no default ACL (which the filesystem would apply itself).
    no_default_acl: bool,
}

impl NewOwner {
    /// The owner for a new object made by `uid`/`gid` (stored IDs) with permission bits `mode`
    /// in a directory with recorded attributes `parent`: a set-group-ID directory passes on its
    /// group (and, to new directories, the bit itself).
    pub fn new(uid: u32, gid: u32, mode: u32, parent: &Stat, is_dir: bool) -> Self {
        let sgid = parent.st_mode & libc::S_ISGID != 0;
        let gid = if sgid { parent.st_gid } else { gid };
        let mode = if sgid && is_dir { mode | libc::S_ISGID } else { mode };
        Self {
            uid,
            gid,
            mode: mode & 0o7777,
            acl: None,
            default_acl: None,
            record: None,
            chown_may_fail: false,
            gid_from_parent: sgid,
            no_default_acl: false,
        }
    }

    /// Whether an object this process creates with `self.mode` has exactly this owner and mode
    /// at once, nothing to set after (`creator`: the process's user and group IDs, where its
    /// umask is 0): no ACL, no override xattr, no set-ID or sticky bit, the process's own IDs.
    /// Such an object can be created under its name directly, never seen half made.
    fn made_as_is(&self, creator: Option<(u32, u32)>) -> bool {
        let Some((uid, gid)) = creator else { return false };
        self.no_default_acl
            && self.record.is_none()
            && self.acl.is_none()
            && self.default_acl.is_none()
            && self.mode & 0o7000 == 0
            && self.uid == uid
            && (self.gid_from_parent || self.gid == gid)
    }

    /// The override xattr an object of `kind` gets (only files and directories carry one).
    fn record_for(&self, kind: FileType) -> Option<ovl_core::statoverride::OverrideXattr> {
        self.record.filter(|_| matches!(kind, FileType::RegularFile | FileType::Directory))
    }

    /// The mode of the inode: with an override xattr its owner (the daemon) keeps access
    /// whatever mode the xattr records.
    fn real_mode(&self, kind: FileType) -> u32 {
        match (self.record_for(kind), kind) {
            (Some(_), FileType::Directory) => self.mode | 0o700,
            (Some(_), _) => self.mode | 0o600,
            (None, _) => self.mode,
        }
    }

    /// Sets the owner: on the inode, or in the override xattr for types that carry one.
    fn set_owner(&self, dir: BorrowedFd<'_>, name: &CStr, kind: FileType) -> Result<()> {
        if let Some(x) = self.record_for(kind) {
            let o = ovl_core::statoverride::StatOverride { uid: self.uid, gid: self.gid, mode: self.mode, rdev: None };
            return sys::set_xattr(dir, Some(name), x.name(), &o.to_bytes(), 0);
        }
        let owner = (Some(Uid::from_raw(self.uid)), Some(Gid::from_raw(self.gid)));
        match rustix::fs::chownat(dir, name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW) {
            Err(e) if self.chown_may_fail || self.record.is_some() => {
                tracing::debug!("chown of a new object failed, ignored (squash or xattr_permissions): {e}");
                Ok(())
            }
            r => Ok(r?),
        }
    }

    /// Sets owner, inherited ACLs, then mode (chown may clear set-ID bits), on `dir/name`; on
    /// failure the half made object is removed.
    fn apply(&self, dir: BorrowedFd<'_>, name: &CStr, kind: FileType) -> Result<()> {
        let done = (|| -> Result<()> {
            self.set_owner(dir, name, kind)?;
            if kind == FileType::Symlink {
                return Ok(());
            }
            for (key, value) in [(ovl_core::acl::ACCESS, &self.acl), (ovl_core::acl::DEFAULT, &self.default_acl)] {
                if let Some(v) = value {
                    sys::set_xattr(dir, Some(name), key, v, 0)?;
                }
            }
            Ok(rustix::fs::chmodat(dir, name, Mode::from_raw_mode(self.real_mode(kind)), AtFlags::empty())?)
        })();
        if let Err(e) = done {
            let flags = if kind == FileType::Directory { AtFlags::REMOVEDIR } else { AtFlags::empty() };
            let _ = rustix::fs::unlinkat(dir, name, flags);
            return Err(e);
        }
        Ok(())
    }
}

/// How a new object is made where its name is free.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Made {
    /// Complete under a temporary name in the work dir, then renamed into place.
    Aside,
    /// Under its name at once: `build` makes it complete in one exclusive create.
    AtOnce,
}

impl OverlayFs {
    /// Looks up `name` in `parent` and counts a kernel lookup of the result.
    pub(crate) fn do_lookup(&self, parent: &Node, name: &OsStr) -> Result<(Arc<Node>, Stat)> {
        if name.len() > self.namelen {
            return Err(Errno::NAMETOOLONG.into());
        }
        if self.is_hidden(parent, name) {
            return Err(Errno::NOENT.into());
        }
        let e = self.find(parent, name)?.ok_or(Errno::NOENT)?;
        let node = self.remember(parent.id, name, &e)?;
        // An indexed file is shown as its index entry's inode, with the overlay's link count.
        let st = if node.state.read().index.is_some() { self.real_stat(&node)? } else { e.stat };
        Ok((node, st))
    }

    /// Creates a new object `name` in `parent` with `build(dir, name)`, always complete under a
    /// temporary name in the work dir first, then renamed into place (over the whiteout that
    /// holds the name, if one does): a crash never leaves a half-made object in the upper layer.
    /// Registers the new node (one kernel lookup).
    pub(crate) fn create_object<T>(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        kind: FileType,
        build: impl FnOnce(BorrowedFd<'_>, &CStr) -> Result<T>,
    ) -> Result<(Arc<Node>, Stat, T)> {
        self.create_object_made(parent, name, kind, None, Made::Aside, |d, n, _| build(d, n))
    }

    /// [`Self::create_object`] for a new name of `linked` (a hard link), which the hook is told
    /// about as a change of `linked` first, inside the same gate: its link count changes.
    fn create_object_linking<T>(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        kind: FileType,
        linked: Option<&Node>,
        build: impl FnOnce(BorrowedFd<'_>, &CStr) -> Result<T>,
    ) -> Result<(Arc<Node>, Stat, T)> {
        self.create_object_made(parent, name, kind, linked, Made::Aside, |d, n, _| build(d, n))
    }

    /// [`Self::create_object_linking`], where a fresh name (no whiteout holds it) may be made
    /// `how`; `build` is told how it makes the object where it is called (over a whiteout, or
    /// `how` aside: always aside).
    fn create_object_made<T>(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        kind: FileType,
        linked: Option<&Node>,
        how: Made,
        build: impl FnOnce(BorrowedFd<'_>, &CStr, Made) -> Result<T>,
    ) -> Result<(Arc<Node>, Stat, T)> {
        let _gate = self.gate();
        if self.is_hidden(parent, name) {
            return Err(Errno::PERM.into());
        }
        self.refuse_reserved(name)?;
        let cname = sys::name_cstr(name)?;
        // A hook is told only of creates that will happen; without one, the check below does.
        if self.hook.is_some() && sys::lstat_at(self.upper_dir(parent)?, &cname).is_ok_and(|st| !is_whiteout_stat(&st))
        {
            return Err(Errno::EXIST.into());
        }
        if let Some(node) = linked {
            self.hook_modify(node)?;
        }
        self.hook_create(parent, name)?;
        let pfd = self.upper_dir(parent)?;
        let up = UpperDir::Held(pfd.as_fd());
        let is_dir = kind == FileType::Directory;
        let aufs_marker = ovl_copyup::settle_aufs_whiteout(&self.stack, up, &cname)?;
        // Whether the new dir ends up opaque.
        let mut over_whiteout = false;
        let out = match sys::lstat_at(&pfd, &cname) {
            // Complete the moment it exists (`build` creates it exclusively).
            Err(e) if e.errno() == Errno::NOENT && how == Made::AtOnce => build(pfd.as_fd(), &cname, Made::AtOnce)?,
            Err(e) if e.errno() == Errno::NOENT => {
                let mut out = None;
                ovl_copyup::create_fresh(&self.stack, up, &cname, |c| {
                    out = Some(build(c.work, c.name, Made::Aside)?);
                    Ok(())
                })?;
                out.ok_or(Errno::IO)?
            }
            Ok(st) if is_whiteout_stat(&st) => {
                over_whiteout = true;
                let mut out = None;
                ovl_copyup::create_over_whiteout(&self.stack, up, &cname, is_dir, |c| {
                    out = Some(build(c.work, c.name, Made::Aside)?);
                    Ok(())
                })?;
                out.ok_or(Errno::IO)?
            }
            Ok(_) => return Err(Errno::EXIST.into()),
            Err(e) => return Err(e),
        };
        if aufs_marker {
            // Whiteouts are files here: the new dir hides the lower ones as if made over a
            // whiteout, then the marker that still hides it goes.
            if is_dir && !over_whiteout {
                ovl_copyup::set_opaque(&self.stack, upper_child(pfd.as_fd(), &cname)?.as_fd())?;
                over_whiteout = true;
            }
            ovl_copyup::remove_aufs_whiteout(&self.stack, up, &cname)?;
        }
        // With redirects on, the kernel makes a new dir in a merged parent opaque (an
        // optimization that also keeps a later redirect from merging it with lower dirs).
        if is_dir && !over_whiteout && self.stack.options().redirect_dir == ovl_core::RedirectDir::On {
            let (_, players) = self.dir_of(parent)?;
            if players.is_merged() {
                ovl_copyup::set_opaque(&self.stack, upper_child(pfd.as_fd(), &cname)?.as_fd())?;
                over_whiteout = true;
            }
        }
        let st = sys::lstat_at(&pfd, &cname)?;
        let key = self.upper_key(&st);
        // A brand-new inode (not a link to one, which `do_link` also makes here): whatever node
        // still maps its number belonged to a dead object.
        if kind == FileType::Directory || st.st_nlink <= 1 {
            self.table.detach_key(key);
        }
        let (node, _) = self.table.lookup_or_insert(key, FileType::from_raw_mode(st.st_mode), || NodeState {
            names: vec![(parent.id, name.to_os_string())],
            upper: true,
            lower: None,
            lower_dirs: Vec::new(),
            opaque: is_dir && over_whiteout,
            data: None,
            keys: Vec::new(),
            index: None,
            lower_nlink: 0,
        });
        Ok((node, st, out))
    }

    /// The attributes of `parent` as the owner rules need them.
    fn parent_stat(&self, parent: &Node) -> Result<Stat> {
        Ok(self.recorded(parent, &self.real_stat(parent)?))
    }

    /// The owner of a new object made by a caller with `uid`/`gid` (as the mount shows IDs).
    fn owner_for(&self, parent: &Node, (uid, gid): (u32, u32), mode: u32, is_dir: bool) -> Result<NewOwner> {
        let (uid, gid) = self.stored_owner(uid, gid);
        let mut owner = NewOwner::new(uid, gid, mode, &self.parent_stat(parent)?, is_dir);
        owner.record = self.upper_override();
        owner.chown_may_fail = self.chown_may_fail();
        Ok(owner)
    }

    /// The owner, mode and ACLs of a new object of `kind` made by `caller` in `parent`. With
    /// `FUSE_POSIX_ACL` the kernel leaves the umask to us and we do what its `posix_acl_create`
    /// does: the parent's default ACL, if it has one, narrows the mode and gives the access ACL
    /// (and, to a directory, the default ACL itself); otherwise the umask applies.
    fn new_owner(&self, parent: &Node, (uid, gid, umask): Caller, mode: u32, kind: FileType) -> Result<NewOwner> {
        let is_dir = kind == FileType::Directory;
        let mut owner = self.owner_for(parent, (uid, gid), mode, is_dir)?;
        if !self.posix_acl || kind == FileType::Symlink {
            return Ok(owner);
        }
        let default = match self.stored_xattr(parent, OsStr::new("system.posix_acl_default")) {
            Ok(v) => match ovl_core::acl::Acl::parse(&v) {
                Ok(acl) => Some(acl),
                Err(e) => {
                    tracing::warn!("ignoring a malformed default ACL of a parent dir: {e}");
                    None
                }
            },
            Err(e) if e.errno() == Errno::NODATA => None,
            Err(e) => return Err(e),
        };
        match default {
            None => {
                owner.mode &= !(umask & 0o777);
                owner.no_default_acl = true;
            }
            Some(acl) => {
                let (mode, access) = acl.inherit(owner.mode);
                owner.mode = mode;
                owner.acl = access.map(|a| a.to_bytes());
                owner.default_acl = is_dir.then(|| acl.to_bytes());
            }
        }
        Ok(owner)
    }

    pub(crate) fn do_mkdir(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        mode: u32,
        caller: Caller,
    ) -> Result<(Arc<Node>, Stat)> {
        let owner = self.new_owner(parent, caller, mode & 0o7777, FileType::Directory)?;
        let (node, st, ()) = self.create_object(parent, name, FileType::Directory, |dir, n| {
            rustix::fs::mkdirat(dir, n, Mode::from_raw_mode(owner.mode & 0o777))?;
            owner.apply(dir, n, FileType::Directory)
        })?;
        Ok((node, st))
    }

    pub(crate) fn do_mknod(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> Result<(Arc<Node>, Stat)> {
        let kind = FileType::from_raw_mode(mode);
        // A 0/0 character device in the upper layer is a whiteout: the kernel refuses to make one.
        if kind == FileType::CharacterDevice && rdev == 0 {
            return Err(Errno::PERM.into());
        }
        let owner = self.new_owner(parent, caller, mode & 0o7777, kind)?;
        let (node, st, ()) = self.create_object(parent, name, kind, |dir, n| {
            if kind == FileType::RegularFile {
                drop(rustix::fs::openat(
                    dir,
                    n,
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )?);
            } else {
                rustix::fs::mknodat(dir, n, kind, Mode::from_raw_mode(0o600), rdev as u64)?;
            }
            owner.apply(dir, n, kind)
        })?;
        Ok((node, st))
    }

    pub(crate) fn do_symlink(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        target: &Path,
        uid: u32,
        gid: u32,
    ) -> Result<(Arc<Node>, Stat)> {
        let owner = self.owner_for(parent, (uid, gid), 0o777, false)?;
        let (node, st, ()) = self.create_object(parent, name, FileType::Symlink, |dir, n| {
            rustix::fs::symlinkat(target, dir, n)?;
            owner.apply(dir, n, FileType::Symlink)
        })?;
        Ok((node, st))
    }

    /// Creates and opens a regular file; returns the open file.
    pub(crate) fn do_create(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Arc<Node>, Stat, OwnedFd)> {
        let owner = self.new_owner(parent, caller, mode & 0o7777, FileType::RegularFile)?;
        let oflags = crate::data::backing_flags(flags) | OFlags::CREATE | OFlags::EXCL;
        // Made as asked by `openat` alone: created under its name at once (three system calls
        // and a rename fewer than building it aside; issue 20).
        let how = if owner.made_as_is(self.creator()) { Made::AtOnce } else { Made::Aside };
        self.create_object_made(parent, name, FileType::RegularFile, None, how, |dir, n, made| {
            if made == Made::AtOnce {
                return Ok(rustix::fs::openat(dir, n, oflags, Mode::from_raw_mode(owner.mode))?);
            }
            let fd = rustix::fs::openat(dir, n, oflags, Mode::from_raw_mode(0o600))?;
            owner.apply(dir, n, FileType::RegularFile)?;
            Ok(fd)
        })
    }

    pub(crate) fn do_link(&self, node: &Arc<Node>, newparent: &Arc<Node>, newname: &OsStr) -> Result<Stat> {
        if node.is_dir() {
            return Err(Errno::PERM.into());
        }
        self.ensure_upper(node)?;
        let index = node.state.read().index.clone();
        let (sdir, sname) = match &index {
            // A file in the inode index gains a name: linked to its index entry, counted first.
            Some(ix) => {
                let union = self.index_nlink(node)?.ok_or(Errno::IO)?;
                ovl_copyup::set_nlink_upper(&self.stack, ix, union)?;
                let dir = self.stack.upper().and_then(|u| u.index()).ok_or(Errno::IO)?;
                (rustix::io::dup(dir)?, ix.clone())
            }
            None => {
                let src = self.path_of(node)?;
                let upper = self.stack.writable_upper().ok_or(Errno::ROFS)?;
                sys::open_parent(upper.layer().root()?, &src)?
            }
        };
        let (_, st, ()) =
            self.create_object_linking(newparent, newname, FileType::RegularFile, Some(node), |dir, n| {
                rustix::fs::linkat(&sdir, &sname, dir, n, AtFlags::empty())?;
                Ok(())
            })?;
        {
            let mut s = node.state.write();
            if !s.names.iter().any(|(p, n)| *p == newparent.id && n == newname) {
                if s.names.is_empty() {
                    self.table.paths_moved();
                }
                s.names.push((newparent.id, newname.to_os_string()));
            }
        }
        // The reply's attributes are the kernel's until they expire: an indexed file shows the
        // overlay's link count (its lower names count too), not the new upper name's.
        if index.is_some() {
            return self.real_stat(node);
        }
        Ok(st)
    }

    /// The node for what a lookup found as `name` in `parent` (the kernel has looked it up, so
    /// it is normally known; otherwise it is registered).
    fn node_of(&self, parent: &Node, name: &OsStr, e: &ovl_lookup::Entry) -> Result<Arc<Node>> {
        match self.table.by_key(self.key_of(e)) {
            Some(n) => Ok(n),
            None => self.remember(parent.id, name, e),
        }
    }

    /// Unlinks (`rmdir`: `want_dir`) `name` in `parent`, holding the parent's path and the
    /// removed node's names (see `OverlayFs::hold_removal`).
    pub(crate) fn remove(&self, parent: fuser::INodeNo, name: &OsStr, want_dir: bool) -> Result<()> {
        let p = self.node(parent)?;
        let (_held, found) = self.hold_removal(&p, name);
        self.do_unlink(&p, name, want_dir, found)
    }

    /// Removes `name` from `parent`: `found`, what a lookup of it found where the caller has
    /// it and it still stands (`OverlayFs::hold_removal`), else looked up here.
    pub(crate) fn do_unlink(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        want_dir: bool,
        found: Option<ovl_lookup::Entry>,
    ) -> Result<()> {
        let _gate = self.gate();
        if self.is_hidden(parent, name) {
            return Err(Errno::NOENT.into());
        }
        let e = match found {
            Some(e) => e,
            None => self.find(parent, name)?.ok_or(Errno::NOENT)?,
        };
        let is_dir = e.kind == FileType::Directory;
        if want_dir && !is_dir {
            return Err(Errno::NOTDIR.into());
        }
        if !want_dir && is_dir {
            return Err(Errno::ISDIR.into());
        }
        if is_dir {
            let layers = e.dir.as_ref().ok_or(Errno::IO)?;
            if !ovl_lookup::read_merged(&self.stack, layers)?.is_empty() {
                return Err(Errno::NOTEMPTY.into());
            }
        }
        let cname = sys::name_cstr(name)?;
        // A name of a file in the inode index is linked up first and counted down in the index
        // (as the kernel does); the index entry goes with the last name.
        let mut in_upper = e.upper.is_some();
        let mut index_left = None;
        if !is_dir && self.indexed() {
            let node = self.node_of(parent, name, &e)?;
            if let Some(ix) = self.link_up_name(&node, parent, name, in_upper)? {
                in_upper = true;
                let union = self.index_nlink(&node)?.ok_or(Errno::IO)?;
                ovl_copyup::set_nlink_upper(&self.stack, &ix, union)?;
                index_left = Some((ix, union - 1));
            }
        }
        // An entry found only in lower layers obviously needs hiding; one in the upper layer
        // does if a lower layer also has the name.
        let needs_whiteout = !in_upper || {
            let (_, players) = self.dir_of(parent)?;
            ovl_lookup::lower_has_name(&self.stack, &players, name)?
        };
        let pfd = self.upper_dir(parent)?;
        let up = UpperDir::Held(pfd.as_fd());
        self.hook_remove(parent, name)?;
        match (in_upper, needs_whiteout) {
            (true, true) => ovl_copyup::replace_with_whiteout(&self.stack, up, &cname)?,
            (true, false) => ovl_copyup::remove_upper(&self.stack, up, &cname, is_dir)?,
            (false, true) => ovl_copyup::whiteout(&self.stack, up, &cname)?,
            (false, false) => return Err(Errno::IO.into()),
        }
        if let Some((ix, 0)) = &index_left {
            ovl_copyup::remove_index(&self.stack, ix)?;
        }
        if let Some(node) = self.table.by_key(self.key_of(&e)) {
            self.table.unlink_name(&node, parent.id, name);
        }
        self.hook_after_remove(parent, name);
        Ok(())
    }

    /// Makes the copy-up of a rename's source ahead (`Self::stage_copy_up`), before the rename
    /// holds any path: the data copy of a large lower file then holds up no other
    /// request (issue 19). Only where the kernel copies up too (a lower non-dir, not a metacopy,
    /// and a rename the VFS lets through to the overlay), so the upper layer ends the same;
    /// anything odd is left to the rename itself, which checks again, copies and reports.
    pub(crate) fn stage_rename_source(
        &self,
        (parent, name): (fuser::INodeNo, &OsStr),
        (newparent, newname): (fuser::INodeNo, &OsStr),
        flags: RenameFlags,
    ) -> crate::copyup::Staging {
        let none = crate::copyup::Staging::none();
        // (No lower layer, as under ovlsnap's LIVE: nothing to copy, and no lookup to spend.)
        // An exchange has more ways to fail first: left to the rename.
        if self.stack.writable_upper().is_none()
            || self.stack.lowers().is_empty()
            || flags.contains(RenameFlags::EXCHANGE)
        {
            return none;
        }
        let node = {
            let (Ok(p), Ok(np)) = (self.node(parent), self.node(newparent)) else { return none };
            let _held = self.hold_nodes(&[&p, &np]);
            let Ok(Some(src)) = self.find(&p, name) else { return none };
            if src.kind == FileType::Directory || src.upper.is_some() || src.data.is_some() {
                return none;
            }
            match self.find(&np, newname) {
                Ok(Some(d)) => {
                    let same = self.key_of(&d) == self.key_of(&src);
                    if flags.contains(RenameFlags::NOREPLACE) || d.kind == FileType::Directory || same {
                        return none;
                    }
                }
                Ok(None) => {}
                Err(_) => return none,
            }
            let Some(node) = self.table.by_key(self.key_of(&src)) else { return none };
            node
        };
        self.stage_node(node, crate::copyup::Need::Data)
    }

    pub(crate) fn do_rename(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        newparent: &Arc<Node>,
        newname: &OsStr,
        flags: RenameFlags,
        found: Option<(ovl_lookup::Entry, Option<ovl_lookup::Entry>)>,
    ) -> Result<()> {
        let exchange = flags.contains(RenameFlags::EXCHANGE);
        if flags.contains(RenameFlags::WHITEOUT) || (exchange && flags.contains(RenameFlags::NOREPLACE)) {
            return Err(Errno::INVAL.into());
        }
        let _gate = self.gate();
        if self.is_hidden(parent, name) {
            return Err(Errno::NOENT.into());
        }
        if self.is_hidden(newparent, newname) {
            return Err(Errno::PERM.into());
        }
        self.refuse_reserved(newname)?;
        // What the hold's lookups found, where it still stands (`OverlayFs::hold_change`).
        let (src, dst) = match found {
            Some(f) => f,
            None => (self.find(parent, name)?.ok_or(Errno::NOENT)?, self.find(newparent, newname)?),
        };
        if parent.id == newparent.id && name == newname {
            return Ok(());
        }
        let src_dir = src.kind == FileType::Directory;
        // The checks the VFS makes before the filesystem sees a rename.
        if let Some(d) = &dst {
            if flags.contains(RenameFlags::NOREPLACE) {
                return Err(Errno::EXIST.into());
            }
            let dst_dir = d.kind == FileType::Directory;
            if !exchange && src_dir && !dst_dir {
                return Err(Errno::NOTDIR.into());
            }
            if !exchange && !src_dir && dst_dir {
                return Err(Errno::ISDIR.into());
            }
        } else if exchange {
            return Err(Errno::NOENT.into());
        }
        // Then the overlay's, in the kernel's order: without redirects a directory that has
        // lower parts cannot move; a replaced directory must be empty in the merged view.
        let has_lower_dir = |e: &ovl_lookup::Entry| e.dir.as_ref().is_some_and(|d| d.is_merged());
        let redirects = self.stack.options().redirect_dir == ovl_core::RedirectDir::On;
        if !redirects && (has_lower_dir(&src) || (exchange && dst.as_ref().is_some_and(has_lower_dir))) {
            return Err(Errno::XDEV.into());
        }
        // A pure-upper target is left to the real rename (which fails if it is not empty, after
        // the source was made opaque, exactly as in the kernel).
        let merged_target = dst.as_ref().filter(|d| !exchange && has_lower_dir(d));
        if let Some(d) = merged_target {
            if !ovl_lookup::read_merged(&self.stack, d.dir.as_ref().ok_or(Errno::IO)?)?.is_empty() {
                return Err(Errno::NOTEMPTY.into());
            }
        }

        if let Some(d) = dst.as_ref().filter(|_| !exchange && self.hook.is_some()) {
            // The hook saves what the rename destroys, so the rename must not fail after it.
            if d.kind == FileType::Directory
                && !ovl_lookup::read_merged(&self.stack, d.dir.as_ref().ok_or(Errno::IO)?)?.is_empty()
            {
                return Err(Errno::NOTEMPTY.into());
            }
            self.hook_remove(newparent, newname)?;
        }
        self.hook_rename((parent, name), (newparent, newname), exchange)?;
        let src_node = self.table.by_key(self.key_of(&src));
        let dst_node = dst.as_ref().and_then(|d| self.table.by_key(self.key_of(d)));
        let src_node = match src_node {
            Some(n) => n,
            None => self.remember(parent.id, name, &src)?,
        };
        self.ensure_upper(&src_node)?;
        if !src_dir {
            self.link_up_name(&src_node, parent, name, src.upper.is_some())?;
        }
        let mut index_left = None;
        if let Some(d) = dst.as_ref().filter(|d| d.kind != FileType::Directory && self.indexed()) {
            let dn = self.node_of(newparent, newname, d)?;
            if let Some(ix) = self.link_up_name(&dn, newparent, newname, d.upper.is_some())? {
                if !exchange {
                    let union = self.index_nlink(&dn)?.ok_or(Errno::IO)?;
                    ovl_copyup::set_nlink_upper(&self.stack, &ix, union)?;
                    index_left = Some((ix, union - 1));
                }
            }
        }
        if let (Some(d), true) = (&dst, exchange) {
            let dn = match &dst_node {
                Some(n) => n.clone(),
                None => self.remember(newparent.id, newname, d)?,
            };
            self.ensure_upper(&dn)?;
        }
        let (pfd, npfd) = (self.upper_dir(parent)?, self.upper_dir(newparent)?);
        let (up, nup) = (UpperDir::Held(pfd.as_fd()), UpperDir::Held(npfd.as_fd()));
        let (_, players) = self.dir_of(parent)?;
        let (_, nplayers) = self.dir_of(newparent)?;
        let cname = sys::name_cstr(name)?;
        let cnew = sys::name_cstr(newname)?;

        // A pure-upper dir moving into a merged parent must not let that parent's lower
        // entries of the same name show through it.
        let src_opaque = src_dir && !src.opaque && !has_lower_dir(&src) && nplayers.is_merged();
        if src_opaque {
            ovl_copyup::set_opaque(&self.stack, upper_child(pfd.as_fd(), &cname)?.as_fd())?;
        }
        // A dir with lower parts keeps finding them through a redirect to where they are.
        let samedir = parent.id == newparent.id;
        if has_lower_dir(&src) {
            self.set_redirect(&self.path_of(parent)?.join(name), samedir)?;
            ovl_copyup::mark_impure(&self.stack, nup)?;
        }
        if exchange {
            let d = dst.as_ref().ok_or(Errno::IO)?;
            if has_lower_dir(d) {
                self.set_redirect(&self.path_of(newparent)?.join(newname), samedir)?;
                ovl_copyup::mark_impure(&self.stack, up)?;
            } else if d.kind == FileType::Directory && !d.opaque && players.is_merged() {
                ovl_copyup::set_opaque(&self.stack, upper_child(npfd.as_fd(), &cnew)?.as_fd())?;
            }
            rustix::fs::renameat_with(&pfd, &cname, &npfd, &cnew, RenameFlags::EXCHANGE)?;
        } else {
            let needs_whiteout = ovl_lookup::lower_has_name(&self.stack, &players, name)?;
            let aufs_marker = ovl_copyup::settle_aufs_whiteout(&self.stack, nup, &cnew)?;
            let target = match sys::lstat_at(&npfd, &cnew) {
                Ok(st) => Some(st),
                Err(e) if e.errno() == Errno::NOENT => None,
                Err(e) => return Err(e),
            };
            let onto_whiteout = target.as_ref().is_some_and(is_whiteout_stat);
            if merged_target.is_some_and(|d| d.upper.is_some()) {
                // An empty merged dir may still hold whiteouts in its upper part.
                ovl_copyup::clear_dir(&self.stack, upper_child(npfd.as_fd(), &cnew)?.as_fd())?;
            }
            if src_dir && onto_whiteout {
                rustix::fs::renameat_with(&pfd, &cname, &npfd, &cnew, RenameFlags::EXCHANGE)?;
                if !needs_whiteout {
                    rustix::fs::unlinkat(&pfd, &cname, AtFlags::empty())?;
                }
            } else if needs_whiteout && self.stack.writes_whiteout_files() {
                rustix::fs::renameat(&pfd, &cname, &npfd, &cnew)?;
                ovl_copyup::whiteout(&self.stack, up, &cname)?;
            } else {
                let f = if needs_whiteout { RenameFlags::WHITEOUT } else { RenameFlags::empty() };
                rustix::fs::renameat_with(&pfd, &cname, &npfd, &cnew, f)?;
            }
            if aufs_marker {
                ovl_copyup::remove_aufs_whiteout(&self.stack, nup, &cnew)?;
            }
        }
        if let Some((ix, 0)) = &index_left {
            ovl_copyup::remove_index(&self.stack, ix)?;
        }
        // Bookkeeping: the moved node now answers to the new name.
        let rename_alias = |node: &Node, from: (u64, &OsStr), to: (u64, &OsStr)| {
            let mut s = node.state.write();
            for n in s.names.iter_mut() {
                if n.0 == from.0 && n.1 == from.1 {
                    *n = (to.0, to.1.to_os_string());
                }
            }
            if src_opaque && node.is_dir() {
                s.opaque = true;
            }
        };
        if exchange {
            if let Some(dn) = &dst_node {
                rename_alias(dn, (newparent.id, newname), (u64::MAX, OsStr::new("")));
            }
            rename_alias(&src_node, (parent.id, name), (newparent.id, newname));
            if let Some(dn) = &dst_node {
                rename_alias(dn, (u64::MAX, OsStr::new("")), (parent.id, name));
            }
        } else {
            if let Some(dn) = &dst_node {
                self.table.unlink_name(dn, newparent.id, newname);
            }
            rename_alias(&src_node, (parent.id, name), (newparent.id, newname));
            self.hook_after_remove(parent, name);
        }
        // Paths below the moved node changed (it still holds its exclusive lock).
        self.table.paths_moved();
        Ok(())
    }

    /// Refuses a new name the AUFS encoding reserves (`.wh.*`) on a stack that reads it: such an
    /// object would hide another, and could never be seen or removed (fuse-overlayfs refuses
    /// creating files so named with `EINVAL` too).
    fn refuse_reserved(&self, name: &OsStr) -> Result<()> {
        if self.stack.reads_aufs() && ovl_core::aufs::is_reserved(name) {
            return Err(Errno::INVAL.into());
        }
        Ok(())
    }

    /// Writes `overlay.redirect` on the upper dir `upper_path` (its overlay path too) of a dir
    /// with lower parts, about to be renamed, as the kernel's `ovl_set_redirect` does. A redirect
    /// it has is kept when the dir stays in its parent or the redirect is absolute. Else, in the
    /// same parent, its current name (relative); elsewhere, the absolute path of where it is now
    /// in the merged namespace of the layers below, built from the overlay path upward with each
    /// dir's own redirect standing for its name (and an absolute one ending the walk), so that
    /// the layers below resolve it through their own redirects and whiteouts, however deep the
    /// stack. Longer than the kernel's `redirect_max` (256): `EXDEV`, as in the kernel.
    fn set_redirect(&self, upper_path: &Path, samedir: bool) -> Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let own = self.upper_redirect(upper_path)?;
        if own.as_ref().is_some_and(|r| samedir || r.starts_with(b"/")) {
            return Ok(());
        }
        let value = if samedir {
            upper_path.file_name().ok_or(Errno::XDEV)?.as_bytes().to_vec()
        } else {
            let mut parts: Vec<Vec<u8>> = Vec::new();
            let mut dir = upper_path.to_path_buf();
            let mut redirect = own;
            loop {
                match redirect {
                    Some(r) if r.starts_with(b"/") => {
                        parts.push(r[1..].to_vec());
                        break;
                    }
                    Some(r) => parts.push(r),
                    None => parts.push(dir.file_name().ok_or(Errno::XDEV)?.as_bytes().to_vec()),
                }
                if !dir.pop() || dir.as_os_str().is_empty() {
                    break;
                }
                redirect = self.upper_redirect(&dir)?;
            }
            parts.reverse();
            let mut v = Vec::new();
            for p in parts {
                v.push(b'/');
                v.extend_from_slice(&p);
            }
            v
        };
        if value.len() > 256 {
            return Err(Errno::XDEV.into());
        }
        ovl_copyup::set_redirect(&self.stack, upper_path, &value)
    }

    /// The `overlay.redirect` of the upper dir `path`, if it has one the kernel follows (a value
    /// it would refuse fails lookups of the dir, so the kernel never builds on one).
    fn upper_redirect(&self, path: &Path) -> Result<Option<Vec<u8>>> {
        let upper = self.stack.writable_upper().ok_or(Errno::ROFS)?;
        let dir = sys::open_dir_path(upper.layer().root()?, path)?;
        let v = sys::get_xattr(&dir, None, &self.stack.names().redirect)?;
        Ok(v.map(|mut v| {
            // The value ends at a NUL, as the kernel reads it.
            v.truncate(v.iter().position(|b| *b == 0).unwrap_or(v.len()));
            v
        })
        .filter(|v| ovl_lookup::redirect_is_valid(v)))
    }
}

/// The upper dir `name` in the upper dir `parent`, open `O_PATH`: a change to a child dir (an
/// opaque mark, clearing its whiteouts) reaches it from its parent's descriptor, not by a path
/// from the upper root.
fn upper_child(parent: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::openat(parent, name, flags, rustix::fs::Mode::empty())?)
}
