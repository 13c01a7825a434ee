//! Owners and modes between the layers and the mount (issue 18): the one place where the ID
//! shift of `uidmapping=`/`gidmapping=`/`squash_*` (`ovl_core::idmap`) and the override xattr
//! of `xattr_permissions=` (`ovl_core::statoverride`) are applied.
//!
//! Two views of an object's `lstat`: *recorded* is owner and mode as the layers record them (the
//! override xattr, where the object's layer keeps one, else the inode), in stored IDs; *shown*
//! is recorded with the IDs shifted, what every attribute reply carries (`OverlayFs::attr`).
//! What callers write goes the other way: [`OverlayFs::stored_owner`] for new objects,
//! [`OverlayFs::set_recorded`] for chown/chmod.

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd};

use ovl_core::idmap::IdShift;
use ovl_core::statoverride::{OverrideXattr, StatOverride};
use ovl_core::{Errno, LayerId, LayerStack, Result, sys};
use rustix::fs::{FileType, Stat};

use crate::fs::OverlayFs;
use crate::inode::Node;

/// The ID shift and which override xattr each layer's objects use.
#[derive(Debug, Default)]
pub(crate) struct Owners {
    shift: IdShift,
    /// By `LayerId.0`: the override xattr of the layer's objects, if it keeps one.
    overrides: Vec<Option<OverrideXattr>>,
}

impl Owners {
    /// Reads the options and the layer roots: a root carrying an override xattr makes its layer
    /// use that one (as fuse-overlayfs decides); `xattr_permissions=` makes the upper layer use
    /// its xattr if the root names none, and gives a writable upper root a value (from the first
    /// lower root that has one, else from the root's own inode).
    pub(crate) fn open(stack: &LayerStack) -> Result<Self> {
        let opts = stack.options();
        let upper = stack.upper().map(|u| u.layer());
        let layers: Vec<_> = upper.into_iter().chain(stack.lowers()).collect();
        let mut overrides = vec![None; layers.iter().map(|l| l.id().0 as usize + 1).max().unwrap_or(0)];
        for l in &layers {
            overrides[l.id().0 as usize] = probe_root(l.root()?.as_fd())?.map(|(x, _)| x);
        }
        if let (Some(want), Some(u)) = (opts.xattr_permissions, upper) {
            if overrides[u.id().0 as usize].is_none() {
                overrides[u.id().0 as usize] = Some(want);
                if stack.writable_upper().is_some() {
                    let from_lower = stack
                        .lowers()
                        .iter()
                        .find_map(|l| l.root().ok().and_then(|r| probe_root(r.as_fd()).ok().flatten()));
                    let value = match from_lower {
                        Some((_, v)) => v,
                        None => StatOverride::from_stat(&rustix::fs::fstat(u.root()?)?).to_bytes(),
                    };
                    sys::set_xattr(u.root()?, None, want.name(), &value, 0)?;
                    tracing::info!("xattr_permissions: owner and mode of the upper layer kept in {:?}", want.name());
                }
            }
        }
        Ok(Self { shift: opts.ids.clone(), overrides })
    }

    fn of(&self, layer: LayerId) -> Option<OverrideXattr> {
        self.overrides.get(layer.0 as usize).copied().flatten()
    }

    /// True if any layer keeps owners in an override xattr (its names are then hidden).
    pub(crate) fn any_override(&self) -> bool {
        self.overrides.iter().any(Option::is_some)
    }
}

/// The override xattr a layer root carries, and its value.
fn probe_root(root: BorrowedFd<'_>) -> Result<Option<(OverrideXattr, Vec<u8>)>> {
    for x in OverrideXattr::ALL {
        match sys::get_xattr(root, None, x.name()) {
            Ok(Some(v)) => return Ok(Some((x, v))),
            Ok(None) => {}
            Err(e) if e.errno() == Errno::NOTSUP || e.errno() == Errno::PERM || e.errno() == Errno::ACCESS => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// True for the object types an override xattr applies to.
fn carries_override(st: &Stat) -> bool {
    matches!(FileType::from_raw_mode(st.st_mode), FileType::RegularFile | FileType::Directory)
}

impl OverlayFs {
    /// The layer whose object holds `node`'s metadata now.
    fn meta_layer(&self, node: &Node) -> Option<LayerId> {
        let st = node.state.read();
        if st.upper {
            return self.stack.upper().map(|u| u.layer().id());
        }
        st.lower.as_ref().map(|l| l.layer).or_else(|| st.lower_dirs.first().map(|d| d.layer))
    }

    /// The override xattr kept on `node`'s object, if its layer keeps one for its type.
    fn override_of(&self, node: &Node, st: &Stat) -> Option<OverrideXattr> {
        if !self.owners.any_override() || !carries_override(st) {
            return None;
        }
        self.meta_layer(node).and_then(|l| self.owners.of(l))
    }

    /// Reads the override xattr `x` of `node`'s object.
    fn read_override(&self, node: &Node, x: OverrideXattr) -> Result<Option<StatOverride>> {
        let v = self.on_real(node, |d, n| sys::get_xattr(d, n, x.name()))?;
        v.map(|v| StatOverride::parse(&v)).transpose()
    }

    /// `st` (an `lstat` of `node`'s object) with owner and mode as the layers record them.
    pub(crate) fn recorded(&self, node: &Node, st: &Stat) -> Stat {
        let mut st = *st;
        if let Some(x) = self.override_of(node, &st) {
            match self.read_override(node, x) {
                Ok(Some(o)) => o.apply(&mut st),
                Ok(None) => {}
                Err(e) => tracing::warn!("node {}: ignoring its {:?}: {e}", node.id, x.name()),
            }
        }
        st
    }

    /// `st` (an `lstat` of `node`'s object) as callers see it: recorded, IDs shifted.
    pub(crate) fn shown(&self, node: &Node, st: &Stat) -> Stat {
        let mut st = self.recorded(node, st);
        let s = &self.owners.shift;
        if !s.is_identity() {
            st.st_uid = s.shown_uid(st.st_uid);
            st.st_gid = s.shown_gid(st.st_gid);
        }
        st
    }

    /// The stored owner for an owner a caller writes or creates as.
    pub(crate) fn stored_owner(&self, uid: u32, gid: u32) -> (u32, u32) {
        (self.owners.shift.stored_uid(uid), self.owners.shift.stored_gid(gid))
    }

    /// An ACL xattr value as shown (`to_shown`) or as stored: named users and groups shifted by
    /// the mappings (squash options change only objects' owners). Other names pass unchanged.
    pub(crate) fn shift_acl(&self, name: &[u8], value: Vec<u8>, to_shown: bool) -> Vec<u8> {
        let s = &self.owners.shift;
        let is_acl = name == ovl_core::acl::ACCESS.to_bytes() || name == ovl_core::acl::DEFAULT.to_bytes();
        if !is_acl || (s.uids.is_identity() && s.gids.is_identity()) {
            return value;
        }
        let Ok(mut acl) = ovl_core::acl::Acl::parse(&value) else { return value };
        if to_shown {
            acl.map_ids(|u| s.uids.shown(u), |g| s.gids.shown(g));
        } else {
            acl.map_ids(|u| s.uids.stored(u), |g| s.gids.stored(g));
        }
        acl.to_bytes()
    }

    /// True if `name` is an override xattr the mount keeps for itself (hidden from callers).
    pub(crate) fn is_private_xattr(&self, name: &[u8]) -> bool {
        self.owners.any_override() && OverrideXattr::is_override_name(name)
    }

    /// The override xattr new objects of the upper layer get instead of a real owner.
    pub(crate) fn upper_override(&self) -> Option<OverrideXattr> {
        self.stack.upper().and_then(|u| self.owners.of(u.layer().id()))
    }

    /// True if a failed `chown` of a new or changed object is not an error: the squash options
    /// show one owner whatever is stored (fuse-overlayfs ignores the failure too).
    pub(crate) fn chown_may_fail(&self) -> bool {
        self.owners.shift.is_squashing()
    }

    /// Records owner and mode changes of `node`'s upper object (`uid`/`gid` already stored IDs)
    /// in its override xattr, if its layer keeps one; returns false if the inode itself is to be
    /// changed.
    pub(crate) fn set_recorded(
        &self,
        node: &Node,
        (dir, name): (BorrowedFd<'_>, Option<&CStr>),
        uid: Option<u32>,
        gid: Option<u32>,
        mode: Option<u32>,
    ) -> Result<bool> {
        if !self.owners.any_override() || (uid.is_none() && gid.is_none() && mode.is_none()) {
            return Ok(false);
        }
        let real = &self.real_stat(node)?;
        let Some(x) = self.override_of(node, real) else { return Ok(false) };
        let mut o = match sys::get_xattr(dir, name, x.name())? {
            Some(v) => StatOverride::parse(&v).unwrap_or_else(|_| StatOverride::from_stat(real)),
            None => StatOverride::from_stat(real),
        };
        o.uid = uid.unwrap_or(o.uid);
        o.gid = gid.unwrap_or(o.gid);
        if let Some(m) = mode {
            o.mode = (o.mode & libc::S_IFMT) | (m & 0o7777);
        }
        sys::set_xattr(dir.as_fd(), name, x.name(), &o.to_bytes(), 0)?;
        Ok(true)
    }
}
