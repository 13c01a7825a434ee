//! Directory streams: opendir, readdir, readdirplus.

use std::ffi::{OsStr, OsString};
use std::sync::Arc;

use ovl_core::Result;
use ovl_proto::{Answer, Attr, Kind};
use parking_lot::Mutex;

use crate::fs::{OpenDir, OverlayFs};
use crate::inode::{Node, ROOT};

impl OverlayFs {
    /// The merged listing of `node`, with `.` and `..` first.
    fn listing(&self, node: &Node) -> Result<Vec<(OsString, Kind, u64)>> {
        let (_, layers) = self.dir_of(node)?;
        let entries = ovl_lookup::read_merged(&self.stack, &layers)?;
        let parent = self.live_name(node).map_or(ROOT, |(p, _)| p);
        let mut out = Vec::with_capacity(entries.len() + 2);
        out.push((OsString::from("."), Kind::Directory, node.id));
        out.push((OsString::from(".."), Kind::Directory, parent));
        for e in entries {
            if self.is_hidden(node, &e.name) {
                continue;
            }
            let key = match e.identity {
                Some(id) => crate::inode::Key::new(id.fs_index, id.ino),
                None => self.key_in(e.layer, e.ino),
            };
            let ino = self.table.ino_for(key);
            out.push((e.name, Kind::from_mode(e.file_type.as_raw_mode()), ino));
        }
        Ok(out)
    }

    /// Opens a directory stream. The listing is taken at the first read, not here: with the
    /// kernel's directory cache most opens are never read.
    pub(crate) fn do_opendir(&self, node: &Node) -> Result<u64> {
        self.dir_of(node)?;
        let fh = self.handles.next_id();
        self.handles.dirs.write().insert(fh, Arc::new(Mutex::new(OpenDir::default())));
        Ok(fh)
    }

    fn open_dir(&self, fh: u64) -> Result<Arc<Mutex<OpenDir>>> {
        self.handles.dirs.read().get(&fh).cloned().ok_or_else(|| ovl_core::Errno::BADF.into())
    }

    /// Adds the entries of `node`'s listing from `offset` on to `reply` until it is full.
    pub(crate) fn do_readdir(&self, node: &Node, fh: u64, offset: u64, reply: &mut dyn Answer) -> Result<()> {
        let dir = self.open_dir(fh)?;
        let mut d = dir.lock();
        // Taken at the first read and again at each rewind (a listing always has `.` and `..`).
        if offset == 0 || d.entries.is_empty() {
            d.entries = self.listing(node)?;
        }
        for (i, (name, kind, ino)) in d.entries.iter().enumerate().skip(offset as usize) {
            if reply.dir_entry(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        Ok(())
    }

    /// Adds the entries of `node`'s listing from `offset` on to `reply`, with their attributes.
    pub(crate) fn do_readdirplus(&self, node: &Node, fh: u64, offset: u64, reply: &mut dyn Answer) -> Result<()> {
        let dir = self.open_dir(fh)?;
        let mut d = dir.lock();
        // Taken at the first read and again at each rewind (a listing always has `.` and `..`).
        if offset == 0 || d.entries.is_empty() {
            d.entries = self.listing(node)?;
        }
        let self_attr = self.attr(node, &self.real_stat(node)?);
        // Every entry is looked up in the same parent dirs: each layer's is opened once (the lower
        // layers' once per open dir). Safe under the hold of the dir's path the request has (no
        // ancestor moves) and the kernel's lock of the dir (no rename in it): only copy-up and
        // creation change names meanwhile, and only in the upper layer.
        let upper_root = self.stack.upper().map(|u| u.layer().root()).transpose()?;
        let OpenDir { entries, kept } = &mut *d;
        ovl_lookup::with_dir_cache(upper_root.as_ref().map(|r| std::os::fd::AsFd::as_fd(&**r)), kept, || {
            self.add_plus_entries(node, entries, offset, self_attr, reply)
        })
    }

    /// Adds the entries of a listing from `offset` on to a readdirplus reply, with their
    /// attributes (each one looked up, and counted as a kernel lookup when it fits).
    fn add_plus_entries(
        &self,
        node: &Node,
        entries: &[(std::ffi::OsString, Kind, u64)],
        offset: u64,
        self_attr: Attr,
        reply: &mut dyn Answer,
    ) -> Result<()> {
        for (i, (name, kind, ino)) in entries.iter().enumerate().skip(offset as usize) {
            let off = i as u64 + 1;
            if name == OsStr::new(".") || name == OsStr::new("..") {
                // The kernel links no inode for these two, whatever their number.
                let mut attr = self_attr;
                attr.ino = *ino;
                if reply.dir_entry_plus(0, off, name, self.ttl, &attr) {
                    break;
                }
                continue;
            }
            let (child, st) = match self.do_lookup(node, name) {
                Ok(found) => found,
                Err(e) => {
                    // Still list the name, as plain readdir would, with a zero time-to-live so
                    // the kernel looks it up again on first use and then sees the error.
                    tracing::debug!(?name, "readdirplus lookup: {e}");
                    let mut attr = self_attr;
                    attr.ino = *ino;
                    attr.kind = *kind;
                    if reply.dir_entry_plus(0, off, name, std::time::Duration::ZERO, &attr) {
                        break;
                    }
                    continue;
                }
            };
            // Listed with the number `stat` shows where the transport carries it apart from the
            // node id (`Answer::carries_ino_apart`; fuser lists the node id).
            let (attr, ttl) = self.entry_attr(&child, &st, reply.carries_ino_apart());
            if reply.dir_entry_plus(child.id, off, name, ttl, &attr) {
                self.table.forget(child.id, 1);
                break;
            }
        }
        Ok(())
    }

    pub(crate) fn do_releasedir(&self, fh: u64) {
        self.handles.dirs.write().remove(&fh);
    }
}
