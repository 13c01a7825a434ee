//! Copy-up of a node: parents first, one copy however many threads ask, metadata only when the
//! mount has `metacopy=on` and only metadata changes.
//!
//! The slow part of copying up a lower regular file, its data, is done ahead by the request
//! that will need it, before it holds any path ([`OverlayFs::stage_copy_up`]): an
//! unnamed file in the work dir, kept in the node ([`Staged`]) until the copy-up links it in
//! under the hold, in an instant. So a rename of an ancestor directory (which waits for the
//! requests below it) and the lookups queued behind it never wait for a data copy (issue 19), as
//! in the kernel, which copies into a temporary file before it locks the parent.

use std::os::fd::AsFd;
use std::sync::Arc;

use fuser::INodeNo;
use ovl_core::{Errno, Result};
use rustix::fs::FileType;

use crate::fs::OverlayFs;
use crate::inode::Node;

/// How much of an object a change needs in the upper layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// Owner, mode, times or xattrs change: with `metacopy=on` a regular file's data may stay
    /// below.
    Meta,
    /// The data changes (or the object moves): everything comes up.
    Data,
}

/// A copy of a lower regular file's data and metadata made ahead of its copy-up, with the
/// lower object it was made from.
#[derive(Debug)]
pub(crate) struct Staged {
    from: ovl_copyup::Source,
    copy: ovl_copyup::PreparedCopy,
}

/// A request's claim on the copy it staged: dropped at the request's end, it frees the copy if
/// no copy-up used it (the request failed before, or another copied the node up first).
#[must_use]
pub(crate) struct Staging(Option<Arc<Node>>);

impl Staging {
    /// Nothing staged.
    pub(crate) fn none() -> Self {
        Self(None)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Some(node) = &self.0 {
            let unused = node.staged.lock().take();
            drop(unused);
        }
    }
}

/// The lower file a copy-up of a node in this state copies data from, when it is one that can
/// be made ahead: a lower regular file not yet in the upper layer, not a metacopy and not in
/// the inode index (that copy goes into the index, and is rare).
fn stageable(st: &crate::inode::NodeState) -> Option<ovl_copyup::Source> {
    match (&st.lower, st.upper, &st.data, &st.index) {
        (Some(l), false, None, None) => Some(ovl_copyup::Source { layer: l.layer, path: l.path.clone() }),
        _ => None,
    }
}

impl OverlayFs {
    /// First thing in a request that will copy node `ino` up (with its data, or with `Need::Meta`
    /// only its metadata), before it holds any path: copies a lower regular file into
    /// the work dir, to be placed by the copy-up itself. Holds no lock but the node's
    /// `stage_lock` meanwhile. Anything odd (no upper layer, already up, an error) makes no copy:
    /// the copy-up then copies under the lock, as before, and reports.
    pub(crate) fn stage_copy_up(&self, ino: INodeNo, need: Need) -> Staging {
        match self.node(ino) {
            Ok(node) => self.stage_node(node, need),
            Err(_) => Staging::none(),
        }
    }

    /// [`Self::stage_copy_up`] for a node in hand.
    pub(crate) fn stage_node(&self, node: Arc<Node>, need: Need) -> Staging {
        let wants_data = need == Need::Data || !self.stack.options().metacopy;
        if node.kind != FileType::RegularFile || !wants_data || self.stack.writable_upper().is_none() {
            return Staging::none();
        }
        if stageable(&node.state.read()).is_none() {
            return Staging::none();
        }
        {
            let _one = node.stage_lock.lock();
            // Copied up, or staged by another request, while this one waited.
            let Some(from) = stageable(&node.state.read()) else { return Staging::none() };
            if node.staged.lock().is_some() {
                return Staging::none();
            }
            match ovl_copyup::prepare_copy(&self.stack, &from) {
                Ok(copy) => *node.staged.lock() = Some(Staged { from, copy }),
                Err(e) => {
                    tracing::debug!(path = ?from.path, "copy-up not made ahead: {e}");
                    return Staging::none();
                }
            }
        }
        Staging(Some(node))
    }

    /// The staged copy of `node`'s lower file `src`, if one was made from the object the node
    /// still stands for (same file, same size and times as its lookup saw).
    fn take_staged(&self, node: &Node, src: &ovl_copyup::Source) -> Option<ovl_copyup::PreparedCopy> {
        let staged = node.staged.lock().take()?;
        let st = node.state.read();
        let seen = &st.lower.as_ref()?.stat;
        let made = staged.copy.source();
        let same = |a: &rustix::fs::Stat| {
            (a.st_dev, a.st_ino, a.st_size, a.st_mtime, a.st_mtime_nsec, a.st_ctime, a.st_ctime_nsec)
        };
        (staged.from.layer == src.layer && staged.from.path == src.path && same(seen) == same(made))
            .then_some(staged.copy)
    }

    /// Makes sure `node` exists in the upper layer with its data, copying it (and, first, its
    /// parents) up.
    pub(crate) fn ensure_upper(&self, node: &Arc<Node>) -> Result<()> {
        self.ensure(node, Need::Data)
    }

    /// Makes sure `node` exists in the upper layer, copying up only metadata where the mount
    /// allows it.
    pub(crate) fn ensure_upper_meta(&self, node: &Arc<Node>) -> Result<()> {
        self.ensure(node, Need::Meta)
    }

    fn ensure(&self, node: &Arc<Node>, need: Need) -> Result<()> {
        {
            let st = node.state.read();
            if st.upper && (need == Need::Meta || st.data.is_none()) {
                return Ok(());
            }
        }
        if self.stack.writable_upper().is_none() {
            return Err(Errno::ROFS.into());
        }
        let _guard = node.copy_lock.lock();
        // An open file whose names were all removed has no place in the upper layer: the kernel's
        // copy-up meets the whiteout that holds its name and fails with EEXIST.
        let (parent, name) = self
            .live_name(node)
            .ok_or_else(|| if self.open_file_of(node).is_some() { Errno::EXIST } else { Errno::NOENT })?;
        let (upper, parent_id, name, src, data, index) = {
            let st = node.state.read();
            let src = match (&st.lower, st.lower_dirs.first()) {
                (Some(l), _) => Some(ovl_copyup::Source { layer: l.layer, path: l.path.clone() }),
                (None, Some(d)) => Some(ovl_copyup::Source { layer: d.layer, path: d.path.clone() }),
                (None, None) => None,
            };
            let data = st.data.as_ref().map(|d| ovl_copyup::Source { layer: d.layer, path: d.path.clone() });
            (st.upper, parent, name, src, data, st.index.clone().map(|i| (i, st.lower_nlink)))
        };
        let parent = self.table.get(parent_id).ok_or(Errno::NOENT)?;
        // The parent's upper dir as the parent node holds it (opened from its path only where
        // the node holds none): the copy is placed through the descriptor, no path walked.
        let pfd = self.upper_dir(&parent)?;
        let up = ovl_copyup::UpperDir::Held(pfd.as_fd());
        if !upper {
            let src = src.ok_or(Errno::IO)?;
            if let Some((ix, lower_nlink)) = index {
                // A lower hard link: the copy goes into the index and the name it is known
                // by is linked up, as the kernel links up the name it copies up through.
                let publish = |st: &rustix::fs::Stat| self.table.add_key(node, self.upper_key(st));
                ovl_copyup::copy_up_to_index(&self.stack, &src, &ix, &publish)?;
                let cname = ovl_core::sys::name_cstr(&name)?;
                ovl_copyup::link_up(&self.stack, &ix, up, &cname, lower_nlink, lower_nlink)?;
                node.state.write().upper = true;
                tracing::debug!(parent = parent_id, ?name, "copied up into the index");
                return Ok(());
            }
            // Without redirects the upper name must be the lower name.
            if src.path.file_name() != Some(name.as_os_str()) {
                return Err(Errno::XDEV.into());
            }
            let regular = node.kind == FileType::RegularFile;
            let meta_only = regular && (data.is_some() || (need == Need::Meta && self.stack.options().metacopy));
            // The upper identity must map to this node before the copy is visible, or a racing
            // lookup would make a second node (and the kernel a second inode) for it.
            let publish = |st: &rustix::fs::Stat| self.table.add_key(node, self.upper_key(st));
            let staged = if meta_only || !regular { None } else { self.take_staged(node, &src) };
            if let Some(copy) = staged {
                publish(&copy.stat()?);
                ovl_copyup::place_copy(&self.stack, copy, up, &name, false)?;
            } else if meta_only {
                ovl_copyup::copy_up_meta(&self.stack, &src, up, &publish)?;
            } else {
                ovl_copyup::copy_up(&self.stack, &src, up, &publish)?;
            }
            let (broke_link, merged_now) = {
                let mut s = node.state.write();
                s.upper = true;
                if meta_only && s.data.is_none() {
                    s.data = s.lower.take();
                }
                let broke = s.lower.take().is_some_and(|l| !node.is_dir() && l.stat.st_nlink > 1);
                (broke, node.is_dir() && s.lower_dirs.len() == 1)
            };
            // A directory of one lower layer showed that directory's link count; with its upper
            // part it is merged and shows 1, as in the kernel (`OverlayFs::attr`). Copied up as
            // the parent of a change further down, nothing else makes the kernel ask again.
            if merged_now {
                self.forget_attrs(&[node.id]);
            }
            // Copying up one name of a lower hard link breaks the link (no index): the link count
            // the kernel holds for this node is wrong now, and nothing else makes it ask again;
            // the name shows the upper file's number now, which cached listings of its dir lack.
            if broke_link {
                self.forget_attrs(&[node.id]);
                let parents: Vec<u64> = node.state.read().names.iter().map(|(p, _)| *p).collect();
                self.forget_listings(parents);
            }
            tracing::debug!(parent = parent_id, ?name, meta_only, "copied up");
        }
        if need == Need::Data {
            let data =
                node.state.read().data.as_ref().map(|d| ovl_copyup::Source { layer: d.layer, path: d.path.clone() });
            if let Some(d) = data {
                ovl_copyup::copy_up_data(&self.stack, &d, up, &ovl_core::sys::name_cstr(&name)?)?;
                node.state.write().data = None;
                tracing::debug!(parent = parent_id, ?name, "copied up data");
            }
        }
        Ok(())
    }

    /// For a node in the inode index (`index=on`): makes sure its name `name` in `parent`
    /// exists in the upper layer, linked to the index entry (`linked` says it already is).
    /// The kernel links a name up before removing or renaming it, so the index can count it.
    /// Returns the index entry's name, `None` for a node not in the index.
    pub(crate) fn link_up_name(
        &self,
        node: &Arc<Node>,
        parent: &Arc<Node>,
        name: &std::ffi::OsStr,
        linked: bool,
    ) -> Result<Option<std::ffi::CString>> {
        let Some(ix) = node.state.read().index.clone() else { return Ok(None) };
        self.ensure_upper(node)?;
        if linked {
            return Ok(Some(ix));
        }
        let _guard = node.copy_lock.lock();
        let pfd = self.upper_dir(parent)?;
        let cname = ovl_core::sys::name_cstr(name)?;
        match ovl_core::sys::lstat_at(&pfd, &cname) {
            Ok(st) if !ovl_core::is_whiteout_stat(&st) => return Ok(Some(ix)),
            Ok(_) => return Err(Errno::IO.into()),
            Err(e) if e.errno() == Errno::NOENT => {}
            Err(e) => return Err(e),
        }
        let union = self.index_nlink(node)?.ok_or(Errno::IO)?;
        let lower_nlink = node.state.read().lower_nlink;
        ovl_copyup::link_up(&self.stack, &ix, ovl_copyup::UpperDir::Held(pfd.as_fd()), &cname, union, lower_nlink)?;
        Ok(Some(ix))
    }
}
