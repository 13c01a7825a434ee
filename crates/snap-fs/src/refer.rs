//! What a snapshot's tree references (`list`'s REFER, as `zfs list`'s `refer`): the bytes its
//! files, symlinks and devices allocate, read through its view, each name's blocks shared among
//! its links, so that a file of several names in the tree counts once. Directories' own blocks
//! are left out, as in `list`'s USED: a directory a layer holds only to carry changed names has
//! blocks of its own, so theirs would change when layers are merged while the tree does not.
//!
//! A view never changes, so a snapshot's figure is worked out once, beside the mount's work, and
//! kept in the store (`summaries/ID.refer`, [`crate::summary::write_refer`]). Only the first one
//! walks a whole tree ([`walk_some`]); every other comes from a neighbour's: view A is the layers
//! between A and B stacked over view B, so the two differ only at the names those layers list
//! ([`delta`], the same walk as [`crate::diff`]), and the cost grows with what changed in between,
//! not with the size of the tree.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use ovl_core::{LayerStack, Result, sys};
use ovl_lookup::{DirLayers, Entry};
use rustix::fs::{FileType, Stat};

use crate::resolver::Resolver;

/// The bytes one name with status `st` counts for (none for a directory).
fn share(st: &Stat) -> u64 {
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        return 0;
    }
    st.st_blocks as u64 * 512 / st.st_nlink.max(1)
}

/// The bytes of the objects of dir `dir` of `stack` (hidden names left out), and its subdirs.
fn list_dir(stack: &LayerStack, dir: &DirLayers, hidden: &[OsString]) -> Result<(u64, Vec<(OsString, DirLayers)>)> {
    let (mut bytes, mut subdirs) = (0, Vec::new());
    for m in ovl_lookup::read_merged(stack, dir)? {
        if hidden.contains(&m.name) {
            continue;
        }
        let Some(e) = ovl_lookup::lookup(stack, dir, &m.name)? else { continue };
        bytes += share(&e.stat);
        if let Some(d) = e.dir {
            subdirs.push((m.name, d));
        }
    }
    Ok((bytes, subdirs))
}

/// Every byte of `e`'s tree in `stack` (`e` itself included); 0 for nothing.
fn tree(stack: &LayerStack, e: Option<&Entry>) -> Result<u64> {
    let Some(e) = e else { return Ok(0) };
    let mut total = share(&e.stat);
    let mut todo: Vec<DirLayers> = e.dir.iter().cloned().collect();
    while let Some(d) = todo.pop() {
        let (bytes, subdirs) = list_dir(stack, &d, &[])?;
        total += bytes;
        todo.extend(subdirs.into_iter().map(|(_, d)| d));
    }
    Ok(total)
}

/// A whole view's walk, a part at a time: the dirs still to read (paths in the view) and the
/// bytes met so far.
#[derive(Debug, Default)]
pub(crate) struct Walk {
    todo: Vec<PathBuf>,
    started: bool,
    /// The bytes of the objects read so far.
    pub bytes: u64,
}

impl Walk {
    /// Whether every dir was read.
    pub fn done(&self) -> bool {
        self.started && self.todo.is_empty()
    }
}

/// Goes on with `walk` of the view `stack` (`hidden`: root names of no snapshot) for about
/// `budget` names, then returns: the caller holds the views still only that long. The view is
/// the same at every call (a snapshot's), though its stack may have gained layers since.
pub(crate) fn walk_some(stack: &LayerStack, hidden: &[OsString], walk: &mut Walk, budget: usize) -> Result<()> {
    let resolver = Resolver::new(stack)?;
    if !walk.started {
        walk.started = true;
        walk.todo.push(PathBuf::new());
    }
    let mut spent = 0;
    while spent < budget {
        let Some(p) = walk.todo.pop() else { break };
        let dir = if p.as_os_str().is_empty() {
            resolver.root()
        } else {
            match resolver.resolve(&p)?.and_then(|e| e.dir) {
                Some(d) => d,
                // A view does not change: a dir met before is there.
                None => return Err(ovl_core::Errno::STALE.into()),
            }
        };
        let at_root = p.as_os_str().is_empty();
        let (bytes, subdirs) = list_dir(stack, &dir, if at_root { hidden } else { &[] })?;
        spent += 1 + subdirs.len();
        walk.bytes += bytes;
        walk.todo.extend(subdirs.into_iter().map(|(n, _)| p.join(n)));
    }
    Ok(())
}

/// How view `a` (`range` layers stacked over view `b`'s) and view `b` (each with its root's
/// layers) differ in bytes: the bytes
/// of what only A shows and of what only B shows, so that refer(A) = refer(B) + first - second.
/// Only the names the range layers list are read, and the whole trees of what they replace.
pub(crate) fn delta(
    (a, da): (&LayerStack, &DirLayers),
    (b, db): (&LayerStack, &DirLayers),
    range: usize,
    hidden: &[OsString],
) -> Result<(u64, u64)> {
    let (mut only_a, mut only_b) = (0, 0);
    let mut todo = vec![(PathBuf::new(), da.clone(), db.clone())];
    while let Some((p, da, db)) = todo.pop() {
        let mut names = std::collections::BTreeSet::new();
        for ld in da.lowers.iter().filter(|l| (l.layer.0 as usize) < range) {
            for e in sys::read_dir(a.layer(ld.layer).root()?, &ld.path)? {
                names.insert(e.name);
            }
        }
        for x in names {
            if p.as_os_str().is_empty() && hidden.contains(&x) {
                continue;
            }
            let ea = ovl_lookup::lookup(a, &da, &x)?;
            let eb = ovl_lookup::lookup(b, &db, &x)?;
            let px = p.join(&x);
            match (&ea, &eb) {
                // A dir of A merged with B's at the same path: only the range's names differ.
                (Some(ea), Some(eb))
                    if ea.kind == FileType::Directory
                        && eb.kind == FileType::Directory
                        && crate::diff::translate(a, range as u16, &px)?.as_deref() == Some(Path::new(&px)) =>
                {
                    let (Some(sa), Some(sb)) = (ea.dir.clone(), eb.dir.clone()) else {
                        return Err(ovl_core::Errno::IO.into());
                    };
                    todo.push((px, sa, sb));
                }
                // Anything else is another object on each side: a moved dir's tree is counted
                // where A shows it, and B's tree at its new place where the range lists that
                // name (a whiteout).
                _ => {
                    only_a += tree(a, ea.as_ref())?;
                    only_b += tree(b, eb.as_ref())?;
                }
            }
        }
    }
    Ok((only_a, only_b))
}
