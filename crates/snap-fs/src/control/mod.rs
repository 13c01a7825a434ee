//! The control socket: how `ovlsnap` talks to the daemon of a mount. One JSON request per
//! connection, one JSON reply, each on one line.
//!
//! The socket lives in `/run/ovlsnap/` (root's, mode 0755) for root's daemons, or in a directory
//! of the user's own (mode 0700, [`run_dir`]) for a user's, named after the mount point, because
//! the store may be hidden under the mount itself; beside it the daemon's pid file. Trust runs
//! both ways and rests on the kernel, never on what the other side says: the daemon authorizes
//! each request by the caller's credentials (`server`, `crate::policy`), and the client talks
//! only to a socket in a directory no one else can write, whose listener is root or the mount's
//! owner and is the pid the daemon recorded (`client`).

mod client;
mod server;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use client::{call, call_as};
pub use server::serve;

use crate::policy::{Perm, Who};

/// Where the control sockets of root's daemons live.
pub const RUN_DIR: &str = "/run/ovlsnap";

/// The longest request line the daemon reads: far above any valid one (names are at most 255
/// bytes, paths 4096).
pub const MAX_REQUEST: usize = 64 * 1024;

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Take a snapshot; a name is made up when none is given.
    Take {
        /// The snapshot's name.
        name: Option<String>,
        /// What it is for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<String>,
    },
    /// Set a snapshot's description and user properties.
    Set {
        /// The snapshot.
        name: String,
        /// The new description.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        /// Remove the description.
        #[serde(default)]
        no_description: bool,
        /// Properties to set (`None`: to remove), in order.
        #[serde(default)]
        properties: Vec<(String, Option<String>)>,
    },
    /// The snapshots.
    List,
    /// These snapshots (an error naming the first one that does not exist), in list order.
    ListSome {
        /// Their names.
        names: Vec<String>,
    },
    /// The lower layers of a snapshot's view (`snapper::ViewLayers`), from which the client
    /// builds, after checking them, `mount-cmd`'s command and `mount-view`'s mount.
    MountCmd {
        /// Snapshot name.
        name: String,
        /// The most layers the client can mount (a shell command fits fewer than the kernel
        /// takes); a deeper view has its top layers consolidated into one. Default: the kernel's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_layers: Option<usize>,
    },
    /// Who serves the mount.
    Status,
    /// Delete a snapshot.
    Delete {
        /// Its name.
        name: String,
    },
    /// Rename a snapshot.
    Rename {
        /// Its name.
        name: String,
        /// Its new name.
        to: String,
    },
    /// Put hold `tag` on a snapshot (`release`: take it off).
    Hold {
        /// The snapshot.
        name: String,
        /// The hold's tag.
        tag: String,
        /// Take the hold off instead.
        #[serde(default)]
        release: bool,
    },
    /// The differences from snapshot `a` to snapshot `b` (or LIVE).
    Diff {
        /// The older snapshot.
        a: String,
        /// The newer snapshot; LIVE when absent.
        b: Option<String>,
    },
    /// Whether the caller may do `perm`, which the client does itself through the mount (restore,
    /// clone): an error if not.
    Authorize {
        /// What it is about to do.
        perm: Perm,
    },
    /// Grant `perms` to `who` (root or LIVE's owner only).
    Allow {
        /// Whom.
        who: Who,
        /// What.
        perms: BTreeSet<Perm>,
    },
    /// Take `perms` (all when empty) from `who` (root or LIVE's owner only).
    Unallow {
        /// Whom.
        who: Who,
        /// What; everything when empty.
        perms: BTreeSet<Perm>,
    },
    /// The grants.
    Grants,
    /// Seal LIVE for the newest snapshot now, if the last seal is older (`ovlsnap umount` asks
    /// before it unmounts).
    Seal,
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// The error, when the request failed.
    pub error: Option<String>,
    /// The result, as the JSON text the daemon wrote (read straight into its type: a list of
    /// 10,000 snapshots went through a `Value` tree on both sides).
    pub value: Box<serde_json::value::RawValue>,
}

/// What `Status` answers. Paths in the JSON form of [`crate::names`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's pid.
    pub pid: u32,
    /// LIVE.
    #[serde(with = "crate::names::json_path")]
    pub live: PathBuf,
    /// The mount point.
    #[serde(with = "crate::names::json_path")]
    pub mount: PathBuf,
    /// The store.
    #[serde(with = "crate::names::json_path")]
    pub store: PathBuf,
}

/// Where the control sockets of `uid`'s daemons live: [`RUN_DIR`] for root; for another user
/// `/run/user/UID/ovlsnap` when the user's runtime dir is there (and theirs), else
/// `/tmp/ovlsnap-UID` (which the daemon refuses to use unless it is the user's own, mode 0700).
/// Client and daemon compute it alike from the uid alone.
pub fn run_dir(uid: u32) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    if uid == 0 {
        return PathBuf::from(RUN_DIR);
    }
    let runtime = PathBuf::from(format!("/run/user/{uid}"));
    match std::fs::symlink_metadata(&runtime) {
        Ok(m) if m.is_dir() && m.uid() == uid => runtime.join("ovlsnap"),
        _ => PathBuf::from(format!("/tmp/ovlsnap-{uid}")),
    }
}

/// The control socket of the mount at `mnt` (canonical) served by a daemon of `uid`.
pub fn socket_path(mnt: &Path, uid: u32) -> PathBuf {
    run_dir(uid).join(format!("{:016x}.sock", mount_hash(mnt)))
}

/// The file in which the daemon of `uid` serving the mount at `mnt` records its pid, beside its
/// socket.
pub fn pid_path(mnt: &Path, uid: u32) -> PathBuf {
    run_dir(uid).join(format!("{:016x}.pid", mount_hash(mnt)))
}

/// FNV-1a of the mount point: stable across builds, unlike the std hasher.
fn mount_hash(mnt: &Path) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in mnt.as_os_str().as_encoded_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
