//! Directory nodes' layer dirs held open (`O_PATH`, [`ovl_lookup::DirHandles`]), a bounded number
//! in all (issue 19). A lookup in a directory, and a `stat`, xattr call, create or removal of an
//! object in it, start from the directory's held descriptors instead of walking its path from
//! each layer root (`openat2` of every component, then `close`: two more system calls per layer
//! and request, and the walk itself grows with the depth).
//!
//! Handles are kept per node with the layers they were opened for ([`HeldDir::layers`]) and used
//! only while the node's layers are still those (same upper path, same lower dirs): a copy-up
//! gives a directory an upper dir, a rename gives it another path, and either makes the next use
//! open them again. So a held descriptor never names another dir than the path would; the
//! request's hold on the node's path (`OverlayFs::hold_paths`) keeps it still while it is used,
//! as before. Opening and storing happen under that hold too.
//!
//! The budget ([`DirFds::new`]) caps the descriptors held by all nodes: a quarter of the
//! open-file limit, at most 8192. Over it, the oldest held dirs are dropped first, those used
//! since they were last passed over get a second chance (a clock). A node forgotten by the kernel
//! closes its own. Where nothing may be held (a budget of 0) every request walks its path, as
//! before. A process that runs out of descriptors (`EMFILE`) drops every held one.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ovl_core::LayerStack;
use ovl_lookup::{DirHandles, DirLayers};
use parking_lot::Mutex;

use crate::inode::{Node, Table};

/// One directory node's held layer dirs, and the layers they were opened for.
#[derive(Debug)]
pub(crate) struct HeldDir {
    pub layers: DirLayers,
    pub handles: DirHandles,
    /// The budget's count of open descriptors, which this one's drop lowers.
    open: Arc<AtomicUsize>,
}

impl Drop for HeldDir {
    fn drop(&mut self) {
        self.open.fetch_sub(self.handles.own_descriptors(), Ordering::Relaxed);
    }
}

/// The budget of held descriptors and the order in which nodes got theirs.
pub(crate) struct DirFds {
    budget: usize,
    open: Arc<AtomicUsize>,
    /// Ids of nodes that were given handles, oldest first (may name nodes since forgotten, or
    /// whose handles were since dropped: skipped when met).
    order: Mutex<VecDeque<u64>>,
}

impl DirFds {
    /// At most `budget` descriptors held at once.
    pub fn new(budget: usize) -> Self {
        Self { budget, open: Arc::default(), order: Mutex::default() }
    }

    /// A budget for this process: a quarter of its open-file limit (layers, open files and a
    /// snapshot daemon's views need the rest), at most 8192.
    pub fn default_budget() -> usize {
        let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        lim.map_or(8192, |l| (l / 4).min(8192) as usize)
    }

    /// How many descriptors are held now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The held dirs of directory `node`, whose layers are `layers`: those kept if they were
    /// opened for the same layers, else opened now (and kept, within the budget). `None` when
    /// there is no budget or opening failed (the caller walks paths instead).
    pub fn get(&self, table: &Table, stack: &LayerStack, node: &Node, layers: &DirLayers) -> Option<Arc<HeldDir>> {
        if self.budget == 0 {
            return None;
        }
        if let Some(h) = node.held.lock().as_ref().filter(|h| h.layers == *layers) {
            node.held_used.store(true, Ordering::Relaxed);
            return Some(h.clone());
        }
        let handles = match DirHandles::open(stack, layers) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(node = node.id, %e, "directory handles not opened");
                if matches!(e.errno(), ovl_core::Errno::MFILE | ovl_core::Errno::NFILE) {
                    // Out of descriptors: the held ones are only a cache, the request is not.
                    self.shed(table);
                }
                return None;
            }
        };
        self.open.fetch_add(handles.own_descriptors(), Ordering::Relaxed);
        let held = Arc::new(HeldDir { layers: layers.clone(), handles, open: self.open.clone() });
        let old = node.held.lock().replace(held.clone());
        drop(old);
        self.admit(table, node.id);
        Some(held)
    }

    /// Drops every node's held dirs (when the process ran out of descriptors).
    fn shed(&self, table: &Table) {
        let ids: Vec<u64> = self.order.lock().drain(..).collect();
        let mut dropped = 0;
        for id in ids {
            if let Some(held) = table.get(id).and_then(|n| n.held.lock().take()) {
                dropped += held.handles.own_descriptors();
            }
        }
        tracing::warn!(dropped, "out of descriptors: directory handles dropped");
    }

    /// Records that node `id` holds dirs, and drops other nodes' over the budget.
    fn admit(&self, table: &Table, id: u64) {
        let mut order = self.order.lock();
        order.push_back(id);
        // Each node is passed over at most twice (once to clear its mark): bounded.
        let mut turns = order.len() * 2;
        while self.open() > self.budget && turns > 0 {
            turns -= 1;
            let Some(victim) = order.pop_front() else { break };
            let Some(n) = table.get(victim) else { continue };
            if victim == id || n.held_used.swap(false, Ordering::Relaxed) {
                order.push_back(victim);
                continue;
            }
            let dropped = n.held.lock().take();
            drop(dropped);
        }
        // Forgotten nodes and dropped handles leave stale ids behind.
        if order.len() > 4 * self.budget.max(64) {
            order.retain(|id| table.get(*id).is_some_and(|n| n.held.lock().is_some()));
        }
    }
}
