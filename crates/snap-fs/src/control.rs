//! The control socket: how `ovlsnap` talks to the daemon of a mount. One JSON request per
//! connection, one JSON reply, each on one line.
//!
//! The socket lives in `/run/ovlsnap/`, named after the mount point, because the store may be
//! hidden under the mount itself.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::snapper::Snapper;

/// Where the control sockets live.
pub const RUN_DIR: &str = "/run/ovlsnap";

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Take a snapshot; a name is made up when none is given.
    Take {
        /// The snapshot's name.
        name: Option<String>,
    },
    /// The snapshots.
    List,
    /// The kernel mount command for a snapshot.
    MountCmd {
        /// Snapshot name.
        name: String,
        /// Where it would be mounted.
        dir: PathBuf,
    },
    /// Who serves the mount.
    Status,
    /// Delete a snapshot.
    Delete {
        /// Its name.
        name: String,
    },
    /// The differences from snapshot `a` to snapshot `b` (or LIVE).
    Diff {
        /// The older snapshot.
        a: String,
        /// The newer snapshot; LIVE when absent.
        b: Option<String>,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// The error, when the request failed.
    pub error: Option<String>,
    /// The result.
    pub value: serde_json::Value,
}

/// What `Status` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's pid.
    pub pid: u32,
    /// LIVE.
    pub live: PathBuf,
    /// The mount point.
    pub mount: PathBuf,
    /// The store.
    pub store: PathBuf,
}

/// The control socket of the mount at `mnt` (canonical).
pub fn socket_path(mnt: &Path) -> PathBuf {
    // FNV-1a: stable across builds, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in mnt.as_os_str().as_encoded_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Path::new(RUN_DIR).join(format!("{h:016x}.sock"))
}

/// Sends `req` to the daemon of `mnt` and returns its value.
pub fn call(mnt: &Path, req: &Request) -> anyhow::Result<serde_json::Value> {
    let path = socket_path(mnt);
    let mut s = UnixStream::connect(&path).with_context(|| format!("no ovlsnap daemon answers for {mnt:?}"))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).context("reading the daemon's answer")?;
    if answer.is_empty() {
        bail!("the ovlsnap daemon for {mnt:?} closed the connection without answering");
    }
    let reply: Reply = serde_json::from_str(&answer).context("the daemon's answer is not valid")?;
    match reply.error {
        Some(e) => Err(anyhow::anyhow!(e)),
        None => Ok(reply.value),
    }
}

/// Serves control requests for `snapper` (mounted at `mnt`, LIVE `live`, store `store`) on
/// `listener` until the process ends.
pub fn serve(listener: UnixListener, snapper: Arc<Snapper>, status: Status) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let snapper = snapper.clone();
        let status = status.clone();
        std::thread::spawn(move || {
            if let Err(e) = handle(conn, &snapper, &status) {
                tracing::warn!("control connection: {e:#}");
            }
        });
    }
}

fn handle(conn: UnixStream, snapper: &Snapper, status: &Status) -> anyhow::Result<()> {
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let result =
        serde_json::from_str::<Request>(&line).context("bad request").and_then(|req| answer(req, snapper, status));
    let reply = match result {
        Ok(value) => Reply { error: None, value },
        Err(e) => Reply { error: Some(format!("{e:#}")), value: serde_json::Value::Null },
    };
    let mut out = serde_json::to_string(&reply)?;
    out.push('\n');
    (&conn).write_all(out.as_bytes())?;
    Ok(())
}

fn answer(req: Request, snapper: &Snapper, status: &Status) -> anyhow::Result<serde_json::Value> {
    Ok(match req {
        Request::Take { name } => {
            // The client syncs the mount first (see `ovlsnap take`): the daemon must never wait
            // on its own mount, or a kill during the wait leaves an unkillable process.
            let name = match name {
                Some(n) => n,
                None => default_name(snapper)?,
            };
            serde_json::to_value(snapper.take(&name)?)?
        }
        Request::List => serde_json::to_value(snapper.list()?)?,
        Request::MountCmd { name, .. } => serde_json::to_value(snapper.view_layers(&name, &status.mount)?)?,
        Request::Status => serde_json::to_value(status)?,
        Request::Delete { name } => serde_json::to_value(snapper.delete(&name)?)?,
        Request::Diff { a, b } => serde_json::to_value(snapper.diff(&a, b.as_deref())?)?,
    })
}

/// A name for an unnamed snapshot: the UTC time, made unique with a suffix.
fn default_name(snapper: &Snapper) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let base = crate::snapper::rfc3339(now);
    let taken: Vec<String> = snapper.list()?.into_iter().map(|l| l.name).collect();
    let mut name = base.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    Ok(name)
}
