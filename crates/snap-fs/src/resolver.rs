//! Paths of a read-only stack resolved one after another, each from its deepest directory
//! already resolved: a diff or a merge resolves many paths of one view, mostly siblings, and
//! resolving each from the root costs a lookup per ancestor through every layer holding it (and
//! the root's layers' marks read again each time: a cost in the number of snapshots).
//!
//! Only for a stack nothing changes while the resolver lives (a merge under the gate, a diff of
//! frozen views: what changes while a diff runs is reported as by any walk of a moving tree).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use ovl_core::{LayerStack, Result};
use ovl_lookup::{DirLayers, Entry};

/// Resolves paths of `stack`, keeping every directory it met.
pub(crate) struct Resolver<'a> {
    stack: &'a LayerStack,
    dirs: RefCell<HashMap<PathBuf, DirLayers>>,
}

impl<'a> Resolver<'a> {
    pub fn new(stack: &'a LayerStack) -> Result<Self> {
        Ok(Self::with_root(stack, DirLayers::root(stack)?))
    }

    /// With the root's layers known.
    pub fn with_root(stack: &'a LayerStack, root: DirLayers) -> Self {
        Self { stack, dirs: RefCell::new(HashMap::from([(PathBuf::new(), root)])) }
    }

    /// The root's layers.
    pub fn root(&self) -> DirLayers {
        self.dirs.borrow().get(Path::new("")).cloned().unwrap_or_default()
    }

    /// What `p` is in the stack (`None`: nothing there, or a non-directory on the way).
    pub fn resolve(&self, p: &Path) -> Result<Option<Entry>> {
        let comps: Vec<&OsStr> = p.iter().collect();
        let Some((last, parents)) = comps.split_last() else { return Ok(None) };
        // The deepest parent already known.
        let (mut dir, mut done) = {
            let dirs = self.dirs.borrow();
            (0..=parents.len())
                .rev()
                .find_map(|k| dirs.get(&parents[..k].iter().collect::<PathBuf>()).map(|d| (d.clone(), k)))
                .unwrap_or_default()
        };
        let mut at: PathBuf = parents[..done].iter().collect();
        while done < parents.len() {
            let c = parents[done];
            let Some(d) = ovl_lookup::lookup(self.stack, &dir, c)?.and_then(|e| e.dir) else { return Ok(None) };
            at.push(c);
            self.dirs.borrow_mut().insert(at.clone(), d.clone());
            dir = d;
            done += 1;
        }
        let e = ovl_lookup::lookup(self.stack, &dir, last)?;
        if let Some(d) = e.as_ref().and_then(|e| e.dir.as_ref()) {
            at.push(last);
            self.dirs.borrow_mut().insert(at, d.clone());
        }
        Ok(e)
    }
}
