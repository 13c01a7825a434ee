//! Layer summaries in the store (issue 17): `summaries/ID` lists every object of the frozen
//! layer `ID` ([`ovl_core::presence::Summary`]), so that a view's lookups skip the layers that
//! hold nothing at a path instead of probing every layer below the snapshot.
//!
//! A layer freezes when a newer snapshot is taken (the CoW rules then write into the newer
//! layer); its summary is made beside the mount's work after that (`Snapper::summarize`) and
//! read back at the next mount instead of reading the layer again. A summary must never list
//! less than its layer holds, so: the CoW target never has one (its file is removed before the
//! target is opened, [`remove`]); a summary names the layer root it was read from (a merged layer
//! swapped in under the same id is another directory); a file is written whole or not at all and
//! carries its entry count. Anything that does not fit is not used, and the layer is read again.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};

use crate::store::StagedFile;

use anyhow::Context;
use ovl_core::presence::Summary;
use rustix::fs::{AtFlags, Mode, OFlags};

/// The directory of the summaries in the store.
pub(crate) const DIR: &str = "summaries";

/// The store's summaries directory, `None` if there is none yet.
fn open_dir(store: BorrowedFd<'_>) -> anyhow::Result<Option<std::os::fd::OwnedFd>> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(store, DIR, flags, Mode::empty()) {
        Ok(dir) => Ok(Some(dir)),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e).context("opening the store's summaries"),
    }
}

/// Removes layer `id`'s summary, durably, before anything may write to the layer again.
pub(crate) fn remove(store: BorrowedFd<'_>, id: u64) -> anyhow::Result<()> {
    let Some(dir) = open_dir(store)? else { return Ok(()) };
    match rustix::fs::unlinkat(&dir, id.to_string().as_str(), AtFlags::empty()) {
        Ok(()) => rustix::fs::fsync(&dir).context("syncing the store's summaries")?,
        Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(e).with_context(|| format!("removing the summary of layer {id}")),
    }
    Ok(())
}

/// Removes every layer's summary, durably (after an offline repair changed layers: they are
/// read again at the next mount).
pub(crate) fn remove_all(store: BorrowedFd<'_>) -> anyhow::Result<()> {
    let Some(dir) = open_dir(store)? else { return Ok(()) };
    for e in ovl_core::sys::read_dir_fd(rustix::io::dup(&dir)?)? {
        match rustix::fs::unlinkat(&dir, e.name.as_os_str(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e).context("removing a layer summary"),
        }
    }
    rustix::fs::fsync(&dir).context("syncing the store's summaries")?;
    Ok(())
}

/// The regular file `path` of the store, open for reading, with its status; `None` for anything
/// else (a FIFO planted there must not hang the reader, a device must not be read).
fn open_file(store: BorrowedFd<'_>, path: &str) -> Option<(std::os::fd::OwnedFd, rustix::fs::Stat)> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    let fd = rustix::fs::openat(store, path, flags, Mode::empty()).ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        tracing::warn!(path, "not a regular file in the store's summaries: not read");
        return None;
    }
    Some((fd, st))
}

/// Layer `id`'s summary from its file, if there is one that fits the layer open as `layer`.
pub(crate) fn load(store: BorrowedFd<'_>, id: u64, layer: BorrowedFd<'_>) -> Option<Summary> {
    let (fd, st) = open_file(store, &format!("{DIR}/{id}"))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut bytes).ok()?;
    let mut summary = Summary::decode(&bytes)?;
    if !summary.is_of(layer) {
        tracing::debug!(id, "a summary of another directory under this layer's id: not used");
        return None;
    }
    if !written_by_us(&st) {
        // Views serve a summary's owners and modes as they are (set-ID bits honoured), so only
        // a file this daemon's user wrote, and no one else could, may say them: the store may
        // be LIVE's owner's, who must not make a file of theirs show as root's set-ID program.
        // Where it says, the layer is read (and the summary made again, ours).
        tracing::warn!(id, "the summary of layer {id} is not the daemon's own file: its attributes are not used");
        summary.objects.iter_mut().for_each(|o| o.meta = None);
    }
    Some(summary)
}

/// Whether a summary file with status `st` was written by this process's user and can be
/// rewritten by no one else (a single name, not group- or world-writable).
fn written_by_us(st: &rustix::fs::Stat) -> bool {
    st.st_uid == rustix::process::geteuid().as_raw() && st.st_mode & 0o022 == 0 && st.st_nlink == 1
}

/// Layer `id`'s summary, written and synced under a temporary name: `StagedFile::install` puts
/// it in place (a rename) while the caller holds the locks that keep the layer frozen, so the
/// slow part, the data's fsync, runs without them (a take or delete right after takes waited
/// behind it).
pub(crate) fn stage(store: BorrowedFd<'_>, id: u64, summary: &Summary) -> anyhow::Result<StagedFile> {
    let dir = summaries_dir(store)?;
    crate::store::stage_file(dir.as_fd(), &id.to_string(), true, |w| Ok(w.write_all(&summary.encode())?))
}

/// The store's summaries dir, made if missing.
fn summaries_dir(store: BorrowedFd<'_>) -> anyhow::Result<std::os::fd::OwnedFd> {
    match rustix::fs::mkdirat(store, DIR, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(e).context("making the store's summaries dir"),
    }
    open_dir(store)?.context("the store's summaries dir is gone")
}

/// Puts `bytes` in the summaries dir (made if missing) as `name`, through `NAME.tmp` renamed
/// into place: whole or not at all (not synced: a figure worked out again if a stop loses it).
fn replace(store: BorrowedFd<'_>, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = summaries_dir(store)?;
    crate::store::stage_file(dir.as_fd(), name, false, |w| Ok(w.write_all(bytes)?))?.install()
}

/// The name of snapshot `id`'s referenced bytes in the summaries dir (`crate::refer`).
fn refer_name(id: u64) -> String {
    format!("{id}.refer")
}

/// What snapshot `id`'s tree references, if the store says (a file of ours, whole).
pub(crate) fn load_refer(store: BorrowedFd<'_>, id: u64) -> Option<u64> {
    let (fd, st) = open_file(store, &format!("{DIR}/{}", refer_name(id)))?;
    if !written_by_us(&st) {
        return None;
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut text).ok()?;
    text.strip_prefix("ovlsnap-refer 1 ")?.strip_suffix('\n')?.parse().ok()
}

/// Records what snapshot `id`'s tree references: whole or not at all (a figure worked out again
/// if a crash loses it, so not synced).
pub(crate) fn write_refer(store: BorrowedFd<'_>, id: u64, bytes: u64) -> anyhow::Result<()> {
    replace(store, &refer_name(id), format!("ovlsnap-refer 1 {bytes}\n").as_bytes())
}

/// Removes snapshot `id`'s referenced bytes (it was deleted).
pub(crate) fn remove_refer(store: BorrowedFd<'_>, id: u64) -> anyhow::Result<()> {
    let Some(dir) = open_dir(store)? else { return Ok(()) };
    match rustix::fs::unlinkat(&dir, refer_name(id).as_str(), AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing what snapshot {id} references")),
    }
}
