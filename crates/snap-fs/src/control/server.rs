//! The daemon's side of the control socket: each connection's caller is taken from the kernel
//! (`Peer::of`), its request read with a size and time limit, authorized by `crate::policy`, and
//! answered on a thread of its own. A caller can hold at most [`MAX_IN_FLIGHT`] connections at a
//! time (root is never turned away), so no user can starve the others or exhaust the daemon.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use parking_lot::Mutex;

use super::{MAX_REQUEST, Reply, Request, Status};
use crate::access::Peer;
use crate::policy::{self, Need, Perm};
use crate::snapper::Snapper;
use serde_json::value::RawValue;

/// Connections one non-root uid may have open at once; more are answered "busy" and closed.
pub const MAX_IN_FLIGHT: usize = 16;

/// How long a caller may take to send its request, and the daemon to hand over its answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves control requests for `snapper` (described by `status`) on `listener` until the
/// process ends.
pub fn serve(listener: UnixListener, snapper: Arc<Snapper>, status: Status) {
    let in_flight: Arc<Mutex<HashMap<u32, usize>>> = Arc::default();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let peer = match Peer::of(&conn) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("control connection without credentials: {e}");
                continue;
            }
        };
        {
            let mut counts = in_flight.lock();
            let n = counts.entry(peer.uid).or_default();
            if *n >= MAX_IN_FLIGHT && !peer.is_root() {
                drop(counts);
                tracing::warn!(uid = peer.uid, pid = peer.pid, "control socket: too many connections, refusing one");
                let _ = conn.set_write_timeout(Some(Duration::from_millis(100)));
                let _ = reply(&conn, Err(anyhow::anyhow!("the daemon is busy with this user's other requests")));
                continue;
            }
            *n += 1;
        }
        let (snapper, status, in_flight) = (snapper.clone(), status.clone(), in_flight.clone());
        let spawned = std::thread::Builder::new().name("control".into()).spawn(move || {
            if let Err(e) = handle(&conn, &peer, &snapper, &status) {
                tracing::warn!(uid = peer.uid, pid = peer.pid, "control connection: {e:#}");
            }
            let mut counts = in_flight.lock();
            if let Some(n) = counts.get_mut(&peer.uid) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&peer.uid);
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("control connection: no thread for it: {e}");
        }
    }
}

fn handle(conn: &UnixStream, peer: &Peer, snapper: &Arc<Snapper>, status: &Status) -> anyhow::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let result = read_request(conn).and_then(|req| {
        tracing::debug!(uid = peer.uid, pid = peer.pid, ?req, "control request");
        answer(req, peer, snapper, status)
    });
    if let Err(e) = &result {
        tracing::info!(uid = peer.uid, pid = peer.pid, "control request refused or failed: {e:#}");
    }
    let sent = reply(conn, result);
    // What the request built and dropped (a list's or a diff's answer, the tables a take
    // replaced) goes back to the system once answered.
    crate::daemon::trim_heap_now_and_then();
    sent
}

/// Reads one request line of at most [`MAX_REQUEST`] bytes.
fn read_request(conn: &UnixStream) -> anyhow::Result<Request> {
    let mut line = Vec::new();
    BufReader::new(conn.take(MAX_REQUEST as u64 + 1)).read_until(b'\n', &mut line).context("reading the request")?;
    if line.len() > MAX_REQUEST {
        bail!("request too large (over {MAX_REQUEST} bytes)");
    }
    if line.last() != Some(&b'\n') {
        bail!("incomplete request (no end of line)");
    }
    serde_json::from_slice(&line).context("bad request")
}

/// `value` as JSON text.
fn raw(value: &impl serde::Serialize) -> anyhow::Result<Box<RawValue>> {
    Ok(serde_json::value::to_raw_value(value)?)
}

fn reply(conn: &UnixStream, result: anyhow::Result<Box<RawValue>>) -> anyhow::Result<()> {
    let reply = match result {
        Ok(value) => Reply { error: None, value },
        Err(e) => Reply { error: Some(format!("{e:#}")), value: raw(&())? },
    };
    let mut out = serde_json::to_string(&reply)?;
    out.push('\n');
    let mut w = conn;
    w.write_all(out.as_bytes())?;
    Ok(())
}

/// What `req` needs of its caller.
fn need(req: &Request) -> Need {
    match req {
        Request::Take { .. } => Need::Change(Perm::Take),
        Request::Delete { .. } => Need::Change(Perm::Delete),
        Request::Rename { .. } | Request::Set { .. } => Need::Change(Perm::Rename),
        Request::Hold { .. } => Need::Change(Perm::Hold),
        Request::Authorize { perm } => Need::Change(*perm),
        Request::Allow { .. } | Request::Unallow { .. } => Need::Delegate,
        Request::List
        | Request::ListSome { .. }
        | Request::Status
        | Request::Diff { .. }
        | Request::MountCmd { .. }
        | Request::Grants
        | Request::Seal => Need::Read,
    }
}

fn answer(req: Request, peer: &Peer, snapper: &Arc<Snapper>, status: &Status) -> anyhow::Result<Box<RawValue>> {
    policy::authorize(peer, snapper.live_root(), &snapper.grants(), need(&req))?;
    Ok(match req {
        Request::Take { name, description } => {
            // The client syncs the mount first (see `ovlsnap take`): the daemon must never wait
            // on its own mount, or a kill during the wait leaves an unkillable process.
            let name = match name {
                Some(n) => n,
                None => default_name(snapper)?,
            };
            let taken = raw(&snapper.take_described(&name, description.as_deref())?)?;
            reseal(snapper);
            taken
        }
        Request::List => raw(&snapper.list()?)?,
        Request::ListSome { names } => raw(&snapper.list_some(&names)?)?,
        Request::MountCmd { name, max_layers } => {
            // Consolidating a deep view writes a layer into the store and stops changes while
            // it is built: for those who may add snapshots.
            let may_build =
                policy::authorize(peer, snapper.live_root(), &snapper.grants(), Need::Change(Perm::Take)).is_ok();
            raw(&snapper.view_layers(&name, &status.mount, max_layers, may_build)?)?
        }
        Request::Status => raw(&status)?,
        Request::Delete { name } => {
            // A shell inside the view holds no open file, only its current directory: it would
            // get ESTALE after the merge.
            let view = status.mount.join(crate::SNAPDIR_NAME).join(&name);
            if let Some((pid, comm)) = crate::view::process_inside(&view) {
                anyhow::bail!(
                    "snapshot {name:?} is in use: process {pid} ({comm}) has its current or root directory in \
                     .snapshots/{name}; leave it and retry"
                );
            }
            let deleted = raw(&snapper.delete(&name)?)?;
            reseal(snapper);
            deleted
        }
        Request::Rename { name, to } => raw(&snapper.rename(&name, &to)?)?,
        Request::Set { name, description, no_description, properties } => {
            let description = if no_description { Some(None) } else { description.as_deref().map(Some) };
            raw(&snapper.set(&name, description, &properties)?)?
        }
        Request::Hold { name, tag, release } => raw(&snapper.hold(&name, &tag, !release)?)?,
        Request::Diff { a, b } => raw(&snapper.diff(&a, b.as_deref(), peer)?)?,
        Request::Authorize { .. } => raw(&())?,
        Request::Allow { who, perms } => raw(&snapper.change_grants(|g| policy::allow(g, who, &perms))?)?,
        Request::Unallow { who, perms } => raw(&snapper.change_grants(|g| policy::unallow(g, who, &perms))?)?,
        Request::Grants => raw(&snapper.grants())?,
        // Harmless to ask: no work unless a take or delete since the last seal.
        Request::Seal => {
            snapper.seal_now()?;
            raw(&())?
        }
    })
}

/// Seals LIVE for the new newest snapshot, then summarizes the layer that froze and works out
/// what the new snapshot references, beside the mount's work (`crate::seal`, `crate::summary`,
/// `crate::refer`): one worker at a time, which goes round again
/// when takes or deletes came in meanwhile (a thread per take piled up, each waiting for the one
/// before: 607 threads after 1000 quick takes of a 20k-file LIVE).
fn reseal(snapper: &Arc<Snapper>) {
    if !snapper.background_wanted() {
        return;
    }
    let worker = snapper.clone();
    let spawned = std::thread::Builder::new().name("seal".into()).spawn(move || {
        loop {
            if let Err(e) = worker.seal_now() {
                tracing::warn!("sealing LIVE: {e:#}");
            }
            if let Err(e) = worker.summarize() {
                tracing::warn!("summarizing layers: {e:#}");
            }
            if let Err(e) = worker.account() {
                tracing::warn!("working out what snapshots reference: {e:#}");
            }
            if !worker.background_again() {
                break;
            }
        }
    });
    if let Err(e) = spawned {
        snapper.background_failed();
        tracing::warn!("sealing LIVE: no thread for it: {e}");
    }
}

/// A name for an unnamed snapshot: the UTC time, made unique with a suffix.
fn default_name(snapper: &Snapper) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let base = crate::snapper::rfc3339(now);
    // (Not from `list`: that reads every snapshot's usage, O(N) a take at N = 10,000.)
    let mut name = base.clone();
    let mut n = 2;
    while snapper.has_snapshot(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    Ok(name)
}
