//! The client's side of the control socket. Before it believes a word, it checks that the
//! socket is the one the mount's daemon made: in a directory only root can write, owned by root
//! or the mount's owner, and that the process listening on it (as the kernel reports it) runs
//! as one of those and is the pid the daemon recorded. A planted or stale socket gives a clear
//! error and no output.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, bail};

use super::{Reply, Request, pid_path, run_dir, socket_path};
use crate::access::Peer;

/// Sends `req` to the daemon of `mnt` (a canonical `fuse.ovlsnap` mount point) and returns its
/// value, or its error.
pub fn call(mnt: &Path, req: &Request) -> anyhow::Result<serde_json::Value> {
    call_as(mnt, req)
}

/// [`call`], its value read as a `T`.
pub fn call_as<T: serde::de::DeserializeOwned>(mnt: &Path, req: &Request) -> anyhow::Result<T> {
    let (mut s, pid) = connect(mnt)?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    let mut answer = String::new();
    let sent = s.write_all(line.as_bytes()).context("sending the request");
    let read = sent.and_then(|()| BufReader::new(s).read_line(&mut answer).context("reading the daemon's answer"));
    // A daemon killed while it still held its socket (exiting, or killed after the connect)
    // resets the connection: say that it is gone rather than how the socket failed.
    if (read.is_err() || answer.is_empty()) && gone(pid) {
        return Err(dead_daemon(mnt, pid));
    }
    read?;
    if answer.is_empty() {
        bail!("the ovlsnap daemon for {mnt:?} closed the connection without answering");
    }
    let reply: Reply = serde_json::from_str(&answer).context("the daemon's answer is not valid")?;
    match reply.error {
        Some(e) => Err(anyhow::anyhow!(e)),
        None => serde_json::from_str(reply.value.get()).context("the daemon's answer is not valid"),
    }
}

/// What to tell about the dead daemon `pid` of `mnt`.
fn dead_daemon(mnt: &Path, pid: u32) -> anyhow::Error {
    anyhow::anyhow!(
        "the ovlsnap daemon of {} (pid {pid}) is gone and its mount is dead: run `umount -l {}`, then `ovlsnap mount` \
         again",
        mnt.display(),
        mnt.display()
    )
}

/// Whether process `pid` has ended (or ends within a second: an exit closes its sockets before
/// the process is gone).
fn gone(pid: u32) -> bool {
    let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else { return false };
    for _ in 0..50 {
        if rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH) {
            return true;
        }
        // A zombie: ended, not yet reaped (the state follows the command name's closing paren).
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero())).unwrap_or_default();
        if stat.rsplit_once(')').is_some_and(|(_, rest)| matches!(rest.trim_start().chars().next(), Some('Z' | 'X'))) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

/// Connects to the daemon of `mnt` once the socket and its listener pass the checks; returns the
/// stream and the daemon's pid.
fn connect(mnt: &Path) -> anyhow::Result<(UnixStream, u32)> {
    let owner = mount_owner(mnt)?;
    let trusted = |uid: u32| uid == 0 || uid == owner;
    let refuse = |why: String| -> anyhow::Error {
        anyhow::anyhow!("refusing to trust the control socket of {}: {why}", mnt.display())
    };
    let run = run_dir(owner);
    let dir = std::fs::symlink_metadata(&run)
        .with_context(|| format!("no ovlsnap daemon answers for {mnt:?} ({} is missing)", run.display()))?;
    if !dir.is_dir() || dir.uid() != owner || dir.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "{} must be a directory of uid {owner}'s that no one else can write (it is uid {}, mode {:o}); an \
             older ovlsnap made /run/ovlsnap world-writable: `chmod 755 /run/ovlsnap` as root, or mount again",
            run.display(),
            dir.uid(),
            dir.mode() & 0o7777
        )));
    }
    let sock = socket_path(mnt, owner);
    let meta = std::fs::symlink_metadata(&sock)
        .with_context(|| format!("no ovlsnap daemon answers for {mnt:?} (no control socket {sock:?})"))?;
    if !meta.file_type().is_socket() || !trusted(meta.uid()) {
        return Err(refuse(format!("{sock:?} is not a socket made by root or the mount's owner (uid {owner})")));
    }
    let pid = recorded_pid(&pid_path(mnt, owner), &trusted).map_err(|e| refuse(format!("{e:#}")))?;
    let s = match UnixStream::connect(&sock) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => return Err(dead_daemon(mnt, pid)),
        Err(e) => return Err(e).with_context(|| format!("no ovlsnap daemon answers for {mnt:?}")),
    };
    let peer = Peer::of(&s).context("reading the credentials of the daemon")?;
    if !trusted(peer.uid) {
        return Err(refuse(format!(
            "it is served by uid {} (pid {}), neither root nor the mount's owner (uid {owner}): a socket planted by \
             another user?",
            peer.uid, peer.pid
        )));
    }
    if peer.pid != pid {
        return Err(refuse(format!("it is served by pid {}, but the daemon recorded pid {pid}", peer.pid)));
    }
    Ok((s, pid))
}

/// The pid a daemon recorded in `path` beside its socket, from a file a `trusted` uid owns.
fn recorded_pid(path: &Path, trusted: &dyn Fn(u32) -> bool) -> anyhow::Result<u32> {
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("no pid file {path:?}"))?;
    if !meta.is_file() || !trusted(meta.uid()) {
        bail!("{path:?} is not a file made by root or the mount's owner");
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
    text.trim().parse().with_context(|| format!("{path:?} holds no pid"))
}

/// The uid that made the FUSE mount at `mnt` (its `user_id=` option; root when absent).
fn mount_owner(mnt: &Path) -> anyhow::Result<u32> {
    let info = ovl_fs::mount::read_mountinfo()?;
    let mut owner = None;
    for l in info.lines() {
        let Some((left, right)) = l.split_once(" - ") else { continue };
        let Some(point) = left.split(' ').nth(4) else { continue };
        if ovl_fs::mount::unescape_mountinfo(point) != mnt {
            continue;
        }
        // The last mount on top wins: "fstype source super_options".
        let supers = right.split(' ').nth(2).unwrap_or("");
        owner = Some(supers.split(',').find_map(|o| o.strip_prefix("user_id=")?.parse().ok()).unwrap_or(0));
    }
    owner.with_context(|| format!("{mnt:?} is not mounted"))
}
