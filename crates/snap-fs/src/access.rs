//! Who is asking, and what they may learn: the control socket's caller as the kernel recorded it
//! (`SO_PEERCRED`, `SO_PEERGROUPS`: never anything the caller says), the kernel's permission
//! check on an object's mode and access ACL, and [`Sight`], which hides from a report the names a
//! caller could not list through the tree itself.
//!
//! It never asks the mount (the daemon must not wait on its own mount): it reads the layers.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use ovl_core::acl::{self, Acl};
use ovl_core::{LayerStack, sys};
use ovl_lookup::DirLayers;
use rustix::fs::Stat;

/// Read permission, as in `rwx` = 4/2/1.
pub const READ: u16 = 4;
/// Search (directories) or execute permission.
pub const SEARCH: u16 = 1;

/// A caller of the control socket, as the kernel recorded it when it connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its process id.
    pub pid: u32,
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
    /// Its supplementary groups.
    pub groups: Vec<u32>,
}

impl Peer {
    /// The kernel's record of whoever is at the other end of `sock`.
    pub fn of(sock: &UnixStream) -> std::io::Result<Peer> {
        let cred = rustix::net::sockopt::socket_peercred(sock)?;
        Ok(Peer {
            pid: cred.pid.as_raw_nonzero().get() as u32,
            uid: cred.uid.as_raw(),
            gid: cred.gid.as_raw(),
            groups: crate::sys::peer_groups(sock)?,
        })
    }

    /// Whether it is root (uid 0 holds every capability the checks here stand for).
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether it is in group `gid`.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// Whether the kernel would grant it `want` (`READ`, `SEARCH`, or both) on a directory with
    /// `st` and access ACL `acl`: root always; the owner by the owner bits; else the ACL if there
    /// is one; else the group bits for a member of the owning group; else the other bits.
    pub fn may(&self, st: &Stat, acl: Option<&Acl>, want: u16) -> bool {
        if self.is_root() {
            return true;
        }
        let mode = st.st_mode as u16;
        let bits = if self.uid == st.st_uid {
            mode >> 6
        } else if let Some(acl) = acl {
            return acl.permits(self.uid, |g| self.in_group(g), st.st_uid, st.st_gid, want);
        } else if self.in_group(st.st_gid) {
            mode >> 3
        } else {
            mode
        };
        bits & want == want
    }

    /// Whether it may `want` on the directory `dir` (open): its mode and access ACL.
    pub fn may_dir(&self, dir: impl std::os::fd::AsFd, want: u16) -> ovl_core::Result<bool> {
        let st = rustix::fs::fstat(&dir)?;
        let acl = access_acl(&dir, None)?;
        Ok(self.may(&st, acl.as_ref(), want))
    }
}

/// The access ACL of `name` in `dir` (`None`: of `dir` itself), if it has a valid one.
fn access_acl(dir: impl std::os::fd::AsFd, name: Option<&std::ffi::CStr>) -> ovl_core::Result<Option<Acl>> {
    // A value the kernel would not have stored is no grant: fall back to the mode bits.
    Ok(sys::get_xattr(dir, name, acl::ACCESS)?.and_then(|v| Acl::parse(&v).ok()))
}

/// What a caller may see of one tree (a view's read-only stack): for each directory, whether it
/// can reach it (search permission on it and everything above) and list it (read permission).
pub(crate) struct Sight<'a> {
    stack: &'a LayerStack,
    peer: &'a Peer,
    /// Directory path → (where it lives, reachable and searchable, readable); `None` if it is not
    /// a directory of this tree.
    dirs: HashMap<PathBuf, Option<(DirLayers, bool, bool)>>,
}

impl<'a> Sight<'a> {
    /// The tree `stack` as `peer` sees it.
    pub fn new(stack: &'a LayerStack, peer: &'a Peer) -> Self {
        Self { stack, peer, dirs: HashMap::new() }
    }

    /// Whether the peer could learn of `path`'s existence by listing its parent through the
    /// tree: it can search every directory down to the parent and read the parent. The root
    /// itself is always seen (who may ask may read LIVE's root).
    pub fn sees(&mut self, path: &Path) -> ovl_core::Result<bool> {
        if self.peer.is_root() {
            return Ok(true);
        }
        let Some(parent) = path.parent() else { return Ok(true) };
        Ok(self.dir(parent)?.is_some_and(|(_, search, read)| search && read))
    }

    fn dir(&mut self, path: &Path) -> ovl_core::Result<Option<(DirLayers, bool, bool)>> {
        if let Some(known) = self.dirs.get(path) {
            return Ok(known.clone());
        }
        let found = match path.parent() {
            None => {
                let dl = DirLayers::root(self.stack)?;
                let top = dl.lowers.first().map(|l| self.stack.layer(l.layer).root()).transpose()?;
                match top {
                    Some(root) => {
                        let (search, read) = (self.peer.may_dir(&*root, SEARCH)?, self.peer.may_dir(&*root, READ)?);
                        Some((dl, search, read))
                    }
                    None => None,
                }
            }
            Some(parent) => self.child_dir(parent, path.file_name().unwrap_or(OsStr::new("")))?,
        };
        self.dirs.insert(path.to_path_buf(), found.clone());
        Ok(found)
    }

    fn child_dir(&mut self, parent: &Path, name: &OsStr) -> ovl_core::Result<Option<(DirLayers, bool, bool)>> {
        let Some((pdl, psearch, _)) = self.dir(parent)? else { return Ok(None) };
        let Some(entry) = ovl_lookup::lookup(self.stack, &pdl, name)? else { return Ok(None) };
        let Some(dl) = entry.dir else { return Ok(None) };
        // The directory shows its top layer's object: owner, mode and ACL come from there.
        let acl = match dl.lowers.first() {
            Some(top) => {
                let (dir, leaf) = sys::open_parent(self.stack.layer(top.layer).root()?, &top.path)?;
                access_acl(&dir, Some(&leaf))?
            }
            None => None,
        };
        let search = psearch && self.peer.may(&entry.stat, acl.as_ref(), SEARCH);
        let read = self.peer.may(&entry.stat, acl.as_ref(), READ);
        Ok(Some((dl, search, read)))
    }
}

/// Makes `dir` (mode 0700) or checks the one there: a directory of the caller's that no one else
/// may write. For what a command keeps beside a path it was given (a pull's blobs, a clone's
/// upper layer): in a shared directory (`/tmp`) another user could otherwise have made it first
/// and swap or plant objects in it, or a symlink, while root uses it. `why` ends the refusal.
pub fn private_dir(dir: &Path, why: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    let m = std::fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !m.is_dir() || m.uid() != rustix::process::geteuid().as_raw() || m.mode() & 0o022 != 0 {
        anyhow::bail!("{} is not a directory of yours that only you may write: {why}", dir.display());
    }
    Ok(())
}
