//! Who may do what to a mount's snapshots, in the spirit of `zfs allow`: root and the owner of
//! LIVE may do everything; others may change snapshots only as the store's grants allow, and read
//! (list, diff, status, mount-cmd) only if they could read LIVE's root. Grants live in the store's
//! `snapshots.json` and change only through the daemon; only root and LIVE's owner change them.
//!
//! Decisions rest on the kernel's record of the caller ([`Peer`]), never on what it says.

use std::collections::BTreeSet;
use std::fmt;
use std::os::fd::BorrowedFd;

use serde::{Deserialize, Serialize};

use crate::access::{Peer, READ};

/// Something that changes snapshots and can be delegated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Perm {
    /// Take snapshots.
    Take,
    /// Delete snapshots.
    Delete,
    /// Restore LIVE to a snapshot (the writes themselves are checked by the kernel as the user's).
    Restore,
    /// Mount writable clones of snapshots.
    Clone,
    /// Rename snapshots.
    Rename,
    /// Put holds on snapshots and release them (`zfs hold`, `zfs release`).
    Hold,
}

impl Perm {
    /// Every permission, in display order.
    pub const ALL: [Perm; 6] = [Perm::Take, Perm::Delete, Perm::Restore, Perm::Clone, Perm::Rename, Perm::Hold];

    /// Its name on the command line and in the store.
    pub fn name(self) -> &'static str {
        match self {
            Perm::Take => "take",
            Perm::Delete => "delete",
            Perm::Restore => "restore",
            Perm::Clone => "clone",
            Perm::Rename => "rename",
            Perm::Hold => "hold",
        }
    }

    /// The permission called `name`.
    pub fn parse(name: &str) -> Option<Perm> {
        Perm::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whom a grant is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Who {
    /// A user, by uid.
    User(u32),
    /// The members of a group, by gid.
    Group(u32),
}

/// Permissions granted to one user or group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Whom.
    pub who: Who,
    /// What.
    pub perms: BTreeSet<Perm>,
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Read LIVE's root: list, diff, status, mount-cmd.
    Read,
    /// A change of snapshots.
    Change(Perm),
    /// Change the grants: root or the owner of LIVE only.
    Delegate,
}

/// A refused request: what was missing, for a one-line error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permission denied: uid {uid} may not {what} (root or the owner of LIVE, uid {owner}, {how})")]
pub struct Denied {
    uid: u32,
    owner: u32,
    what: String,
    how: &'static str,
}

/// Decides whether `peer` may do what `need` says on the mount of LIVE (`live`, open) whose store
/// holds `grants`.
pub fn authorize(peer: &Peer, live: BorrowedFd<'_>, grants: &[Grant], need: Need) -> anyhow::Result<()> {
    if peer.is_root() {
        return Ok(());
    }
    let owner = rustix::fs::fstat(live)?.st_uid;
    let denied = |what: String, how| Err(Denied { uid: peer.uid, owner, what, how }.into());
    match need {
        Need::Read if peer.uid == owner || peer.may_dir(live, READ)? => Ok(()),
        Need::Read => denied("read this mount's snapshots: LIVE's root is not readable to it".into(), "can read them"),
        Need::Change(_) | Need::Delegate if peer.uid == owner => Ok(()),
        Need::Change(p) if granted(peer, grants, p) => Ok(()),
        Need::Change(p) => denied(format!("`{p}` snapshots of this mount"), "can grant it with `ovlsnap allow`"),
        Need::Delegate => denied("change who may change snapshots".into(), "can"),
    }
}

/// Whether a grant gives `peer` permission `p`.
fn granted(peer: &Peer, grants: &[Grant], p: Perm) -> bool {
    grants.iter().any(|g| {
        let me = match g.who {
            Who::User(uid) => uid == peer.uid,
            Who::Group(gid) => peer.in_group(gid),
        };
        me && g.perms.contains(&p)
    })
}

/// `grants` with `perms` added for `who`.
pub fn allow(mut grants: Vec<Grant>, who: Who, perms: &BTreeSet<Perm>) -> Vec<Grant> {
    match grants.iter_mut().find(|g| g.who == who) {
        Some(g) => g.perms.extend(perms),
        None => grants.push(Grant { who, perms: perms.clone() }),
    }
    grants.sort_by_key(|g| g.who);
    grants
}

/// `grants` with `perms` (all when empty) taken from `who`; a grant left with nothing goes.
pub fn unallow(mut grants: Vec<Grant>, who: Who, perms: &BTreeSet<Perm>) -> Vec<Grant> {
    for g in grants.iter_mut().filter(|g| g.who == who) {
        if perms.is_empty() {
            g.perms.clear();
        } else {
            g.perms.retain(|p| !perms.contains(p));
        }
    }
    grants.retain(|g| !g.perms.is_empty());
    grants
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, groups: &[u32]) -> Peer {
        Peer { pid: 1, uid, gid: uid, groups: groups.to_vec() }
    }

    #[test]
    fn grants_match_users_and_group_members_for_the_named_permissions_only() {
        let take: BTreeSet<Perm> = [Perm::Take].into();
        let grants = allow(allow(Vec::new(), Who::User(1000), &take), Who::Group(50), &[Perm::Delete].into());
        assert!(granted(&peer(1000, &[]), &grants, Perm::Take));
        assert!(!granted(&peer(1000, &[]), &grants, Perm::Delete));
        assert!(granted(&peer(1001, &[50]), &grants, Perm::Delete));
        assert!(!granted(&peer(1001, &[51]), &grants, Perm::Delete));
        let fewer = unallow(grants.clone(), Who::User(1000), &BTreeSet::new());
        assert!(!granted(&peer(1000, &[]), &fewer, Perm::Take));
        assert_eq!(fewer.len(), 1, "an emptied grant goes");
    }
}
